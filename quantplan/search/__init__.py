"""search: the best plans for a sensitivity table and a memory budget (numbers only: never imports torch).

`space` (which schemes a layer may take), `budget` (exact sizes), `problem` (table x space x budget as arrays),
`knapsack` (the exact proxy optimum), `lagrange` (fast Lagrangian choices), `recipes` (FPTQ and uniform
baselines), `trials` (Optuna trial spaces), `study` (the ask/tell driver on RDB storage), `synthetic` (tables
for tests and benchmarks). See docs/SEARCH.md.
"""
