"""Sensitivity maths as pure functions: activation statistics, diagonal Fisher, weight and activation costs.

Costs predict the increase of the mean next-token loss (nats per token) when one layer is quantized, in the
second-order Fisher form (ModelOpt AutoQuantize / FGMP, arXiv 2504.14152):

    weight:      dL_w(l, c) = 1/2 sum_i F_ii (w_i - Q_c(w_i))^2
    activation:  dL_x(l, a) = 1/2 sum_{t,j} T (dL/dx_tj)^2 (x_tj - Q_a(x_tj))^2      (per micro-batch, averaged)

Estimator (docs/SENSITIVITY.md): calibration tokens are cut into micro-batches b of T_b predicted tokens; L_b is
the mean loss of the micro-batch and g_b = dL_b/dW. The per-token Fisher E_t[(dl_t/dw)^2] is estimated as
F = mean_b T_b g_b^2, which is unbiased when per-token gradients are independent and zero-mean; correlated
tokens (same sequence) and a non-zero mean gradient bias it upwards, more so for larger micro-batches. For
activations dL_b/dx_t = (1/T_b) dl/dx_t, so T_b (dL_b/dx_t)^2 = (1/T_b)(dl/dx_t)^2 averages the per-token term.

Everything here is tensor-in, tensor-out; `workers/tasks.py` distributes it on Ray.
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import logging
import os
import platform
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quantplan.quant.act_handlers import act_handler
from quantplan.quant.apply import model_trunk, quantizable_modules, trace_feeders
from quantplan.quant.modules import linear_layout, linear_shape
from quantplan.quant.quantizers import (  # round_scale: the stored fp16 scale, as quantize_weight rounds it
    fake_quantize_weight,
    round_scale,
)
from quantplan.quant.schemes import ActScheme, ActSchemes, WeightScheme
from quantplan.workers.lm import split_lm
from quantplan.workers.table import LayerSensitivity, SensitivityTable

log = logging.getLogger(__name__)

WEIGHT_SCHEMES: tuple[WeightScheme, ...] = tuple(
    WeightScheme(b, g, a) for b, g, a in itertools.product((2, 3, 4, 8), (32, 64, 128, -1), (False, True))
)
# Every registered quantized activation strategy (a8-static, a8-dynamic, a8-lae, a8-smooth, then registered ones),
# read live: activation costs are [len(ACT_SCHEMES)] vectors in this order.
ACT_SCHEMES: ActSchemes = ActSchemes(quantized=True)
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)
HIST_LOG10 = (-8.0, 6.0)  # |x| histogram over log10 range, 1024 equal bins (+ under/overflow), mergeable
HIST_BINS = 1024
HIST_EDGES = torch.logspace(*HIST_LOG10, HIST_BINS + 1, dtype=torch.float64)
PERCENTILES = (99.0, 99.9, 99.99)
# Part of the cache key: bump when the computed numbers change. 2: micro-batches run through the model in
# batches (per-micro-batch gradients from hooks); same estimator, float32 sums in another order. 3: the
# per-micro-batch gradients of small layers come from one bmm, batches of BATCH_TOKENS (float order again).
# 4: activation costs on the last batch of sequences only (`act_set_start`); statistics from the Fisher forward.
ESTIMATOR_VERSION = 4
# Tokens per forward (whole sequences, at least one): at most BATCH_TOKENS, and at most BATCH_ELEMENTS divided by
# the model's widest layer (in or out features), so that one activation of a batch stays about 12 MiB of float32.
# Larger batches cut the per-operation overhead of the hooks on small models; on wider ones larger batches run
# slower per token (at width 2,752: 1,024 tokens 14.3 s, 4,096 tokens 17.4 s for the same plain fwd+bwd) and
# hold more memory between forward and backward (docs/SENSITIVITY.md, memory).
BATCH_TOKENS = 4096
BATCH_ELEMENTS = 3 << 20
# Default size of the act set, the last sequences whose activation costs are measured (act_set_start), and how
# many of its batches sensitivity_pass holds between their forward and backward (their activations at once).
ACT_TOKENS = 4096
ACT_IN_FLIGHT = 4


def batch_sequences(seq_len: int, width: int = 0) -> int:
    """Sequences per forward for a model whose widest layer has `width` features (0: unknown)."""
    tokens = min(BATCH_TOKENS, BATCH_ELEMENTS // width) if width > 0 else BATCH_TOKENS
    return max(1, tokens // max(seq_len, 1))


def model_width(model: nn.Module) -> int:
    """The widest in or out features of the model's quantizable layers."""
    return max((max(linear_shape(m)) for m in quantizable_modules(model).values()), default=0)


def _batch_size(model: nn.Module, tokens: torch.Tensor, batch_size: int | None) -> int:
    return batch_size or batch_sequences(tokens.shape[1], model_width(model))


# -- memory model (docs/SENSITIVITY.md, "Memory") ---------------------------------------------------------------
# Resident bytes of the interpreter with torch and transformers imported, before any model (measured on CPU).
RUNTIME_BYTES = 450 << 20
# Float32 values saved between forward and backward per token, per input and output feature of every quantizable
# layer (a Llama block keeps its q/k/v, gate/up inputs, its outputs, attention and MLP temporaries: measured on
# SmolLM2-135M, docs/BENCHMARKS.md "Sensitivity memory").
ACT_VALUES_PER_FEATURE = 1.0
# Activations a worker may hold by default, on top of runtime, weights and Fisher sums (`default_max_memory`).
DEFAULT_ACT_BYTES = 1 << 30


# glibc's malloc serves blocks of at least its mmap threshold with mmap (returned to the system on free), but
# raises that threshold to the size of every mmapped block freed (up to 32 MiB): after the first backward the
# pass's activations (0.3-3 MiB per layer input on SmolLM2) come from the heap, which fragments and does not shrink,
# and resident memory grew 0.5-0.7 GB past the memory model per window (docs/BENCHMARKS.md, "Sensitivity memory").
# A fixed threshold (mallopt, which also stops the adjustment) keeps large tensors in mmap. Not the arithmetic.
MALLOC_MMAP_THRESHOLD = 1 << 20
_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


@functools.cache
def fix_malloc_mmap_threshold() -> bool:
    """Set glibc's mmap threshold to MALLOC_MMAP_THRESHOLD for this process (idempotent); False, changing
    nothing, off glibc or when MALLOC_MMAP_THRESHOLD_ is set in the environment (the user's choice)."""
    if "MALLOC_MMAP_THRESHOLD_" in os.environ or platform.libc_ver()[0] != "glibc":
        return False
    try:
        return bool(ctypes.CDLL(None).mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))
    except (OSError, AttributeError):
        return False


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


def trim_malloc() -> None:
    """Give the free pages of glibc's heap back to the system (malloc_trim; nothing off glibc). Blocks below the
    mmap threshold (the pass's smaller activations and temporaries) come from the heap; after a backward frees
    them, holes between live blocks stay resident: 0.03-0.13 GB more per window of 512 on SmolLM2-135M without
    it (docs/BENCHMARKS.md, "Sensitivity memory"). A few milliseconds per batch; not the arithmetic."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class PassMemory:
    """Predicted resident bytes of `sensitivity_pass`: `fixed + tokens_held * per_token`, where `fixed` is the
    runtime, the weights, the Fisher accumulators (float32, one per quantizable weight) and one chunk of logits
    with its softmax (`LOSS_CHUNK_ELEMENTS`), and `per_token` the activations saved for the backward."""

    runtime: int
    weights: int
    fisher: int
    logits_chunk: int
    per_token: int

    @property
    def fixed(self) -> int:
        return self.runtime + self.weights + self.fisher + self.logits_chunk

    def peak(self, tokens_held: int) -> int:
        return self.fixed + tokens_held * self.per_token

    def tokens(self, max_memory: int) -> int:
        """Tokens whose activations fit `max_memory` besides the fixed part (0 when not even that fits)."""
        return max(0, (max_memory - self.fixed) // self.per_token)


def pass_memory(model: nn.Module) -> PassMemory:
    """The memory model of the sensitivity pass on `model` (float32 compute, as the Ray tasks run it)."""
    layers = [linear_shape(m) for m in quantizable_modules(model).values()]
    storages = {t.untyped_storage().data_ptr() or id(t): t.untyped_storage().nbytes()  # (id: on the meta device)
                for t in itertools.chain(model.parameters(), model.buffers())}  # tied weights counted once
    vocab = getattr(model.get_output_embeddings(), "out_features", 0) if hasattr(model, "get_output_embeddings") else 0
    features = sum(n + k for n, k in layers)
    return PassMemory(runtime=RUNTIME_BYTES, weights=sum(storages.values()), fisher=4 * sum(n * k for n, k in layers),
                      logits_chunk=2 * 4 * vocab * max(1, LOSS_CHUNK_ELEMENTS // max(vocab, 1)),  # logits + softmax
                      per_token=max(1, round(4 * ACT_VALUES_PER_FEATURE * features)))


def default_max_memory(model: nn.Module, workers: int = 1) -> int:
    """The default memory budget of one worker: its fixed part plus DEFAULT_ACT_BYTES of activations, and never
    more than half the machine's memory divided among the workers."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return min(total // (2 * workers), pass_memory(model).fixed + DEFAULT_ACT_BYTES)


def batch_plan(model: nn.Module, seq_len: int, micro_batch: int = 1, max_memory: int | None = None) -> tuple[int, int]:
    """(sequences per forward, batches of the act set held at once) for `max_memory` bytes: the largest batch of
    whole micro-batches (at most `batch_sequences`) whose activations fit, and as many held batches (at most
    ACT_IN_FLIGHT) as fit. Without `max_memory`: `batch_sequences` and ACT_IN_FLIGHT. At least one of each, even
    when the budget holds less (a warning says so)."""
    batch = batch_sequences(seq_len, model_width(model))
    if max_memory is None:
        return batch, ACT_IN_FLIGHT
    memory = pass_memory(model)
    fit = memory.tokens(max_memory) // seq_len  # sequences whose activations fit
    batch = _batch_length(micro_batch, min(batch, max(fit, 1)))
    if fit < batch:
        log.warning("the sensitivity pass needs about %.2f GB for one batch of %d sequences, over the %.2f GB "
                    "budget (--max-memory)", memory.peak(batch * seq_len) / 1e9, batch, max_memory / 1e9)
    return batch, max(1, min(ACT_IN_FLIGHT, fit // batch))


# -- activation statistics (forward only) -----------------------------------------------------------------
@dataclass
class ActStats:
    """Per-layer input statistics: channel max|X| and a histogram of |x| (both merge by max / sum)."""

    channel_absmax: dict[str, torch.Tensor] = field(default_factory=dict)  # [K] float32
    hist: dict[str, torch.Tensor] = field(default_factory=dict)  # [HIST_BINS + 2] float64 counts
    feeders: dict[str, str] = field(default_factory=dict)  # layer -> norm whose output it reads

    def merge(self, other: ActStats) -> ActStats:
        for name, m in other.channel_absmax.items():
            mine = self.channel_absmax.get(name)
            self.channel_absmax[name] = m if mine is None else torch.maximum(mine, m)
            self.hist[name] = other.hist[name] + self.hist.get(name, 0)
        self.feeders.update(other.feeders)
        return self


def _input_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(channel max|x| [K], histogram of log10|x| [HIST_BINS + 2]) of one layer input."""
    a = x.detach().reshape(-1, x.shape[-1]).float().abs()  # a new tensor: the histogram works in place on it
    m = a.amax(0)
    lo, hi = HIST_LOG10
    pos = a.flatten().log10_().sub_(lo).mul_(HIST_BINS / (hi - lo))  # log10(0) = -inf lands in the underflow bin
    idx = pos.floor_().clamp_(-1, HIST_BINS).add_(1).long()  # 0: underflow, HIST_BINS + 1: overflow
    return m, torch.bincount(idx, minlength=HIST_BINS + 2).double()


def _record(stats: ActStats, name: str, m: torch.Tensor, h: torch.Tensor) -> None:
    """Add one input's (channel max|x|, histogram) to layer `name`'s statistics."""
    prev = stats.channel_absmax.get(name)
    stats.channel_absmax[name] = m.clone() if prev is None else torch.maximum(prev, m)  # own tensor per layer
    stats.hist[name] = h + stats.hist.get(name, 0)


def _observe(stats: ActStats, name: str, x: torch.Tensor, seen: dict[int, tuple] | None = None) -> None:
    """Add one input of layer `name`; `seen` (id -> (x, stats)) shares the work between layers reading the
    same tensor (q, k and v; gate and up)."""
    entry = None if seen is None else seen.get(id(x))
    if entry is None:
        entry = (x, *_input_stats(x))
        if seen is not None:
            seen[id(x)] = entry  # holds x, so its id stays unique while `seen` lives
    _record(stats, name, *entry[1:])


@torch.no_grad()
def collect_act_stats(model: nn.Module, tokens: torch.Tensor, *, batch_size: int | None = None,
                      on_windows: Counter | None = None) -> ActStats:
    """Forward passes over `tokens` (batch_size sequences each, default `batch_sequences`) recording every
    quantizable layer's input statistics, through the trunk that holds the layers (the logits are not needed).
    `on_windows(k)` is called with the number of sequences of each batch done."""
    batch_size = _batch_size(model, tokens, batch_size)
    names = list(quantizable_modules(model))
    modules = dict(model.named_modules())
    trunk = model_trunk(model, names)
    stats, seen = ActStats(), {}
    with trace_feeders(model, names) as feeders:
        hooks = [modules[n].register_forward_pre_hook(lambda _m, a, n=n: _observe(stats, n, a[0], seen))
                 for n in names]
        try:
            for batch in tokens.split(batch_size):
                seen.clear()
                trunk(input_ids=batch, use_cache=False)
                _count(on_windows, batch.shape[0])
        finally:
            seen.clear()
            for h in hooks:
                h.remove()
    stats.feeders = dict(feeders)
    return stats


def percentile_from_hist(hist: torch.Tensor, q: float) -> float:
    """The q-th percentile of |x| from a histogram (the bin's upper edge: overestimates by < 3.2%)."""
    cdf = torch.cumsum(hist, 0) / hist.sum().clamp_min(1)
    i = int(torch.searchsorted(cdf, torch.tensor(q / 100, dtype=cdf.dtype)))  # bin i covers edges[i-1..i]
    return float(HIST_EDGES[min(max(i, 0), HIST_BINS)])


# -- activation quantizers used for the cost (the same arithmetic as the fake-quant modules) ---------------
@dataclass(frozen=True)
class StrategyParams:
    """One strategy's parameters for one layer: its equalization s (equalizing strategies) and the tensors its
    handler calibrated (e.g. the static scale `act_scale` of X / s)."""

    s: torch.Tensor | None  # [K]
    params: Mapping[str, torch.Tensor]

    def tensors(self) -> list[torch.Tensor]:
        return ([] if self.s is None else [self.s]) + list(self.params.values())


@dataclass(frozen=True)
class ActQuantParams:
    """What each activation strategy needs for one layer, by strategy."""

    by_scheme: Mapping[ActScheme, StrategyParams]

    def __getitem__(self, scheme: ActScheme) -> StrategyParams:
        return self.by_scheme[scheme]


def act_quant_params(
    channel_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float = 0.5
) -> ActQuantParams:
    """Parameters of every activation strategy from calibration statistics, as apply_plan computes them
    (w_absmax: per input channel, over all layers sharing the input, as apply_plan folds them)."""
    out: dict[ActScheme, StrategyParams] = {}
    for scheme in ACT_SCHEMES:
        handler = act_handler(scheme)
        s = handler.equalization(channel_absmax, w_absmax, alpha) if scheme.equalized else None
        x_eq = channel_absmax if s is None else channel_absmax / s  # max|X / s| per channel
        out[scheme] = StrategyParams(s, handler.calibrate(x_eq) if scheme.needs_calibration else {})
    return ActQuantParams(out)


def act_quant_error(x: torch.Tensor, scheme: ActScheme, p: ActQuantParams) -> torch.Tensor:
    """x - Q_a(x) in the original (un-equalized) space, float32."""
    x = x.float()
    return _dequantized_act(torch.empty_like(x), x, scheme, p).neg_().add_(x)


def act_sq_errors(x: torch.Tensor, p: ActQuantParams) -> torch.Tensor:
    """(x - Q_a(x))^2 for every a in ACT_SCHEMES, [len(ACT_SCHEMES), *x.shape] float32."""
    x = x.float()
    schemes = tuple(ACT_SCHEMES)
    out = torch.empty((len(schemes), *x.shape))
    for e, a in zip(out, schemes, strict=True):
        _dequantized_act(e, x, a, p).sub_(x).square_()
    return out


def _dequantized_act(out: torch.Tensor, x: torch.Tensor, scheme: ActScheme, p: ActQuantParams) -> torch.Tensor:
    """Q_a(x) written into `out`: equalize, the strategy's simulation in place, and undo the equalization."""
    sp, handler = p.by_scheme[scheme], act_handler(scheme)
    if sp.s is None:
        return handler.fake_quantize_into(out, x, sp.params)
    torch.div(x, sp.s, out=out)
    return handler.fake_quantize_into(out, out, sp.params).mul_(sp.s)


# -- Fisher pass (forward + backward) --------------------------------------------------------------------
@dataclass
class FisherSums:
    """Partial sums over micro-batches; merge by addition. Divide `fisher` by `batches` and `act_cost` by
    `act_batches` (the micro-batches of the activation-cost set) for the estimates."""

    fisher: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_b T_b g_b^2, [N, K] float32
    act_cost: dict[str, torch.Tensor] = field(default_factory=dict)  # sum_b dL_x, [len(ACT_SCHEMES)] float64
    batches: int = 0
    act_batches: int = 0
    tokens: int = 0
    loss_sum: float = 0.0  # sum_b L_b, for the report

    def merge(self, other: FisherSums) -> FisherSums:
        for name, f in other.fisher.items():
            self.fisher[name] = f + self.fisher[name] if name in self.fisher else f.clone()
        for name, c in other.act_cost.items():
            self.act_cost[name] = c + self.act_cost.get(name, 0)
        self.batches += other.batches
        self.act_batches += other.act_batches
        self.tokens += other.tokens
        self.loss_sum += other.loss_sum
        return self


@dataclass
class _Input:
    """One layer-input tensor of the batch in flight, its statistics and its squared activation errors,
    computed once for all the layers that read it (q, k and v; gate and up) with the same parameters."""

    x: torch.Tensor
    stats: tuple[torch.Tensor, torch.Tensor] | None = None  # (channel max|x|, histogram) when recording
    sq_errors: dict[str, torch.Tensor] = field(default_factory=dict)  # params key -> [A, numel]
    pending: int = 0  # readers whose activation cost is still to come (their backward)


ParamsSource = Mapping[str, ActQuantParams] | Callable[[], Mapping[str, ActQuantParams]]
Counter = Callable[[int], None]  # on_windows(k): k more sequences done (progress)


@dataclass
class _Batch:
    """One batch between its forward and its backward: `groups` micro-batches of `t_b` predicted tokens each."""

    groups: int
    t_b: int
    sequences: int
    loss: torch.Tensor | None = None  # sum_b L_b, whose backward is to come
    inputs: dict[int, _Input] = field(default_factory=dict)  # id(x) -> _Input (holds x: ids stay unique)


@dataclass
class _State:
    """What the hooks read: the batch going forward, and the activation quantization parameters once known."""

    batch: _Batch | None = None
    params: Mapping[str, ActQuantParams] | None = None
    shared: dict[str, str] = field(default_factory=dict)  # layer -> layer whose activation errors it reuses

    def resolve(self, params: Mapping[str, ActQuantParams]) -> None:
        self.params, self.shared = params, _shared_params(params)


def fisher_sums(
    model: nn.Module,
    tokens: torch.Tensor,
    params: ParamsSource | None = None,
    *,
    micro_batch: int = 1,
    batch_size: int | None = None,
    stats: ActStats | None = None,
    on_windows: Counter | None = None,
    into: FisherSums | None = None,
) -> FisherSums:
    """Forward + backward over `tokens` in micro-batches: Fisher sums of every layer, and with `params` its
    activation costs; with `stats`, every layer input's statistics are added to it on the way (the forward
    of the Fisher pass is the statistics pass). With `into`, the sums are added to it in place (and it is
    returned): one set of Fisher accumulators, where a `merge` of a second set would hold two at once.

    `params` is the layers' activation quantization parameters, or a function returning them. A function is
    called once, after every batch of `tokens` has gone forward (so from statistics those forwards have just
    completed) and before any backward: every batch's activations are held until then, so pass only as many
    tokens as may be held at once.

    Several micro-batches (about `batch_size` sequences, default `batch_sequences`) go through the model
    together: the backward pass differentiates sum_b L_b, and since sequences do not interact, the gradient
    reaching a layer's output on micro-batch b's tokens is dL_b/dY; hooks turn it into g_b = dL_b/dW per
    micro-batch (weights carry no .grad) and read dL_b/dx for the activation costs.

    `on_windows(k)` is called after each batch's backward with its number of sequences (progress)."""
    fix_malloc_mmap_threshold()
    names = list(quantizable_modules(model))
    modules = dict(model.named_modules())
    for p in model.parameters():
        p.requires_grad_(False)
    sums, state, deferred = FisherSums() if into is None else into, _State(), callable(params)
    if params is not None and not deferred:
        state.resolve(params)
    held: list[_Batch] = []
    split = lm_split(model)
    with ExitStack() as tracing:
        traced = tracing.enter_context(trace_feeders(model, names) if stats is not None else nullcontext({}))
        with _fisher_hooks({n: modules[n] for n in names}, sums, state, stats, params is not None):
            for part, size in _batches(tokens, micro_batch, _batch_size(model, tokens, batch_size)):
                batch = state.batch = _Batch(part.shape[0] // size, size * (part.shape[1] - 1), part.shape[0])
                batch.loss = _sum_of_microbatch_losses(model, split, part, batch.groups)
                # the feeders are known after the first forward; the trace would keep every batch's norm outputs
                # (their graph, with the layer inputs its hooks hold) alive into the next batch's forward
                tracing.close()
                held.append(batch)
                if not deferred:
                    _backward(held.pop(), sums, params is not None, on_windows)
            if stats is not None:
                stats.feeders.update(traced)  # before resolving: layer_act_params groups SmoothQuant's layers by norm
            if deferred:
                state.resolve(params())
            for batch in held:  # the deferred batches (none otherwise)
                _backward(batch, sums, True, on_windows)
    return sums


def _backward(batch: _Batch, sums: FisherSums, act: bool, on_windows: Counter | None = None) -> None:
    """Run the batch's backward (its hooks add to `sums`) and count it."""
    assert batch.loss is not None
    batch.loss.backward()
    batch.inputs.clear()
    sums.batches += batch.groups
    sums.act_batches += batch.groups if act else 0
    sums.tokens += batch.groups * batch.t_b
    sums.loss_sum += float(batch.loss.detach())
    batch.loss = None  # the graph and its saved activations are gone
    trim_malloc()
    _count(on_windows, batch.sequences)


def _count(on_windows: Counter | None, k: int) -> None:
    if on_windows is not None:
        on_windows(k)


def _batches(tokens: torch.Tensor, micro_batch: int, batch_size: int) -> Iterator[tuple[torch.Tensor, int]]:
    """(sequences, micro-batch size): runs of whole micro-batches of equal size, about batch_size sequences."""
    full = tokens.shape[0] // micro_batch * micro_batch
    if full:  # (splitting no sequences would give one empty part)
        yield from ((part, micro_batch) for part in tokens[:full].split(_batch_length(micro_batch, batch_size)))
    if full < tokens.shape[0]:
        yield tokens[full:], tokens.shape[0] - full  # the last, smaller micro-batch


def _batch_length(micro_batch: int, batch_size: int) -> int:
    """Sequences per forward: whole micro-batches, about batch_size sequences."""
    return max(1, batch_size // micro_batch) * micro_batch


def _sum_of_microbatch_losses(
    model: nn.Module, split: tuple[nn.Module, nn.Linear] | None, tokens: torch.Tensor, groups: int
) -> torch.Tensor:
    """sum_b L_b over `groups` equal micro-batches (L_b: mean next-token loss of micro-batch b). With `split`
    (`lm_split`: a causal LM whose logits are its head applied to its trunk's last hidden states) the trunk runs
    and the loss over the vocabulary is computed in chunks (`chunked_nll`); else from the model's full logits."""
    targets = tokens[:, 1:].flatten()
    if split is None:
        logits = model(input_ids=tokens, use_cache=False).logits[:, :-1]
        nll = F.cross_entropy(logits.flatten(0, 1).float(), targets, reduction="sum")
    else:
        trunk, head = split
        hidden = trunk(input_ids=tokens, use_cache=False).last_hidden_state[:, :-1]  # [B, L-1, H]
        nll = chunked_nll(hidden.flatten(0, 1), head.weight, head.bias, targets)
    return nll * (groups / (tokens.numel() - tokens.shape[0]))


# -- the LM loss over the vocabulary in chunks --------------------------------------------------------------
LOSS_CHUNK_ELEMENTS = 1 << 22  # positions x vocabulary per chunk of logits: 16 MiB of float32


def lm_split(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(trunk, head) of a causal LM whose logits are `head(trunk(ids).last_hidden_state)` (`workers.lm.split_lm`),
    the head a plain nn.Linear that is not a quantizable layer and the trunk holding every quantizable layer; None
    for anything else (another model, softcapped or scaled logits): the pass then uses the full logits."""
    split = split_lm(model)
    if split is None or type(split.head) is not nn.Linear:
        return None
    inside = set(split.body.modules())
    if split.head in inside or any(m not in inside for m in quantizable_modules(model).values()):
        return None
    return split.body, split.head


def chunked_nll(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor) -> torch.Tensor:
    """sum_t -log softmax(W h_t + b)[y_t] (float32) over positions t of `hidden` [T, H], with at most one chunk of
    LOSS_CHUNK_ELEMENTS logits alive in forward and backward: F.cross_entropy(F.linear(hidden, W, b).float(),
    targets, reduction="sum") without its [T, V] logits, log-probabilities and their gradients."""
    chunk = max(1, LOSS_CHUNK_ELEMENTS // weight.shape[0])
    return _ChunkedNLL.apply(hidden, weight, bias, targets, chunk)


class _ChunkedNLL(torch.autograd.Function):
    """The loss of `chunked_nll`; backward recomputes each chunk's logits for dL/dh = (softmax - onehot) W (and
    dL/dW, dL/db only when they require grad: the sensitivity pass's frozen head does not)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor, chunk: int) -> torch.Tensor:
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.chunk = chunk
        total = hidden.new_zeros((), dtype=torch.float32)
        for h, y in zip(hidden.split(chunk), targets.split(chunk), strict=True):
            total += F.cross_entropy(F.linear(h, weight, bias).float(), y, reduction="sum")
        return total

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        hidden, weight, bias, targets = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dh = torch.empty_like(hidden) if need_h else None
        dw = torch.zeros_like(weight) if need_w else None
        db = torch.zeros_like(bias) if need_b else None
        for i in range(0, hidden.shape[0], ctx.chunk):
            h, y = hidden[i:i + ctx.chunk], targets[i:i + ctx.chunk]
            d = F.linear(h, weight, bias).float().softmax(-1)  # [c, V] dL/dlogits = (p - onehot(y)) grad
            d[torch.arange(len(y)), y] -= 1
            d = d.mul_(grad).to(weight.dtype)
            if dh is not None:
                torch.mm(d, weight, out=dh[i:i + ctx.chunk])
            if dw is not None:
                dw.addmm_(d.t(), h)
            if db is not None:
                db.add_(d.sum(0))
        return dh, dw, db, None, None


@contextmanager
def _fisher_hooks(
    modules: Mapping[str, nn.Module], sums: FisherSums, state: _State, stats: ActStats | None, act: bool
) -> Iterator[None]:
    """On forward, record each layer input's statistics (with `stats`), hand the layer its own view of its
    input (a leaf copy when the input carries no gradient) and hook the gradients of that view (with `act`)
    and of the layer's output. The gradient reaching the view is dL/dx through this layer only (q, k and v
    read one tensor): it gives the activation costs. The output's gradient dL/dY with the input X gives the
    per-micro-batch weight gradients Y_b^T X_b for the Fisher sums."""

    def before(name: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x, batch = args[0], state.batch  # the batch going forward, whose backward may come later
            entry = batch.inputs.get(id(x))
            if entry is None:
                entry = batch.inputs[id(x)] = _Input(x, _input_stats(x) if stats is not None else None)
            if entry.stats is not None:
                _record(stats, name, *entry.stats)
            view = x.view_as(x) if x.requires_grad else x.detach().requires_grad_(True)
            if act:
                entry.pending += 1
                view.register_hook(lambda g: _add_act_cost(sums, name, entry, g, batch, state))
            return (view, *args[1:])

        return hook

    def after(name: str):
        def hook(_m: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
            x, batch = args[0].detach(), state.batch
            out.register_hook(lambda dy: _add_fisher(sums, name, x, dy, batch))

        return hook

    hooks = [h for n, m in modules.items()
             for h in (m.register_forward_pre_hook(before(n)), m.register_forward_hook(after(n)))]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()
        state.batch = None


def _shared_params(params: Mapping[str, ActQuantParams]) -> dict[str, str]:
    """layer -> the first layer with identical quantization parameters (whose activation errors it can reuse)."""
    shared: dict[str, str] = {}
    firsts: dict[tuple, list[str]] = {}
    for name, p in params.items():
        tensors = _tensors(p)
        sig = tuple(float(t) if t.numel() == 1 else tuple(t.shape) for t in tensors)
        same = (o for o in firsts.get(sig, [])
                if all(torch.equal(t, u) for t, u in zip(tensors, _tensors(params[o]), strict=True)))
        shared[name] = next(same, name)
        if shared[name] == name:
            firsts.setdefault(sig, []).append(name)
    return shared


def _tensors(p: ActQuantParams) -> list[torch.Tensor]:
    return [t for sp in p.by_scheme.values() for t in sp.tensors()]


_FISHER_BMM_MAX = 1 << 20  # elements of [B, N, K] up to which per-micro-batch gradients are one bmm


def _add_fisher(sums: FisherSums, name: str, x: torch.Tensor, dy: torch.Tensor, batch: _Batch) -> None:
    """Add T_b g_b^2 for every micro-batch b of the batch: g_b = dL_b/dW = dY_b^T X_b, [N, K]."""
    xb = x.reshape(batch.groups, -1, x.shape[-1])  # [B, T, K]
    dyb = dy.reshape(batch.groups, -1, dy.shape[-1])  # [B, T, N]
    f = sums.fisher.get(name)
    if f is None:  # not setdefault: that would allocate a zero [N, K] tensor on every call
        f = sums.fisher[name] = x.new_zeros(dyb.shape[-1], xb.shape[-1])
    if f.numel() * batch.groups <= _FISHER_BMM_MAX:  # small layers: one batched product, fewer small ops
        g = torch.bmm(dyb.transpose(1, 2), xb)  # [B, N, K]
        f.add_(g.square_().sum(0), alpha=batch.t_b)
        return
    for x_b, dy_b in zip(xb, dyb, strict=True):
        g_b = dy_b.t() @ x_b  # one micro-batch at a time: no [B, N, K] tensor in memory
        f.addcmul_(g_b, g_b, value=batch.t_b)


def _add_act_cost(
    sums: FisherSums, name: str, entry: _Input, g: torch.Tensor, batch: _Batch, state: _State
) -> None:
    """Add T_b/2 sum (dL_b/dx)^2 (x - Q_a(x))^2 for every activation scheme a."""
    assert state.params is not None
    key = state.shared[name]
    sq = entry.sq_errors.get(key)
    if sq is None:
        sq = entry.sq_errors[key] = act_sq_errors(entry.x, state.params[name]).flatten(1)  # [A, numel]
    entry.pending -= 1
    if not entry.pending:
        entry.sq_errors.clear()  # every reader has used them
    costs = torch.mv(sq, g.detach().float().reshape(-1).square())  # [A]
    sums.act_cost[name] = (0.5 * batch.t_b) * costs.double() + sums.act_cost.get(name, 0)


# -- the whole pass in one process ------------------------------------------------------------------------
def act_set_start(tokens: torch.Tensor, micro_batch: int = 1, act_samples: int | None = None) -> int:
    """Index of the first sequence of the activation-cost set: the last `act_samples` sequences (default:
    ACT_TOKENS worth, at least one), widened to whole micro-batches; every sequence when there are fewer."""
    n = tokens.shape[0]
    want = act_samples or max(1, ACT_TOKENS // tokens.shape[1])
    return max(0, n - want) // micro_batch * micro_batch


def sensitivity_pass(
    model: nn.Module,
    tokens: torch.Tensor,
    *,
    micro_batch: int = 1,
    act_samples: int | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    on_windows: Counter | None = None,
) -> tuple[ActStats, FisherSums]:
    """Statistics, Fisher sums and activation costs of `model` on `tokens` in one process, with one forward
    per token wherever the estimator and the memory bound allow.

    The activation costs need every statistic (static scales, equalization vectors) before the first backward
    that measures them, so they are measured on the last sequences only (`act_set_start`). Every sequence
    before them runs the Fisher forward + backward, whose forward records its statistics. Then the act set's
    first ACT_IN_FLIGHT batches go forward, completing the statistics, the parameters are computed, and their
    backwards run. Only an act set longer than that needs a forward of its remaining sequences beforehand.

    `max_memory` (bytes) sizes the batches and how many are held from the memory model (`batch_plan`); an
    explicit `batch_size` overrides the former. Neither changes the results beyond float rounding.

    `on_windows(k)` counts sequences as they complete a pass: `pass_windows` of them in all (progress)."""
    batch_size, start, held = _pass_split(model, tokens, micro_batch, act_samples, batch_size, max_memory)
    n = tokens.shape[0]
    stats, sums, params = ActStats(), FisherSums(), {}  # one set of Fisher accumulators for all three steps
    if start:
        fisher_sums(model, tokens[:start], micro_batch=micro_batch, batch_size=batch_size, stats=stats,
                    on_windows=on_windows, into=sums)
    if held < n:  # the act set is longer than the batches held at once: the rest's statistics first
        stats.merge(collect_act_stats(model, tokens[held:], batch_size=batch_size, on_windows=on_windows))

    def complete_params() -> dict[str, ActQuantParams]:
        params.update(layer_act_params(model, stats))
        return params

    fisher_sums(model, tokens[start:held], complete_params, micro_batch=micro_batch, batch_size=batch_size,
                stats=stats, on_windows=on_windows, into=sums)
    if held < n:
        fisher_sums(model, tokens[held:], params, micro_batch=micro_batch, batch_size=batch_size,
                    on_windows=on_windows, into=sums)
    return stats, sums


def pass_windows(model: nn.Module, tokens: torch.Tensor, *, micro_batch: int = 1, act_samples: int | None = None,
                 batch_size: int | None = None, max_memory: int | None = None) -> int:
    """How many sequence passes `sensitivity_pass` counts through `on_windows`: every sequence once, and the
    act set's sequences beyond the batches held at once twice (a statistics forward, then the Fisher pass)."""
    n, held = tokens.shape[0], _pass_split(model, tokens, micro_batch, act_samples, batch_size, max_memory)[2]
    return n + (n - held)


def _pass_split(model: nn.Module, tokens: torch.Tensor, micro_batch: int, act_samples: int | None,
                batch_size: int | None, max_memory: int | None) -> tuple[int, int, int]:
    """(batch size, start of the act set, end of its batches held at once) of `sensitivity_pass`."""
    planned, in_flight = batch_plan(model, tokens.shape[1], micro_batch, max_memory)
    batch_size = batch_size or planned
    n, start = tokens.shape[0], act_set_start(tokens, micro_batch, act_samples)
    return batch_size, start, min(n, start + in_flight * _batch_length(micro_batch, batch_size))


# -- weight costs (from the reduced Fisher) --------------------------------------------------------------
@dataclass(frozen=True)
class WeightCost:
    """Predicted loss increase of one scheme at its best Fisher-weighted clip ratio, with block scores."""

    cost: float
    clip: float
    blocks: torch.Tensor  # [N, G] per-group predicted loss increase (float16 to stay compact)


def weight_costs(
    w: torch.Tensor, fisher: torch.Tensor, schemes: tuple[WeightScheme, ...] = WEIGHT_SCHEMES
) -> dict[str, WeightCost]:
    """1/2 sum F (W - Q_c(W))^2 for every scheme c that fits K, at the clip ratio minimizing it.

    Schemes with the same group layout (group size, symmetric or not) share the grouped W, F and group ranges;
    all clip ratios of a scheme are evaluated at once by broadcasting."""
    w, f = w.detach().float(), fisher.float()
    k = w.shape[1]
    fitting = [s for s in schemes if s.group_size(k) <= k]
    layouts: dict[tuple[int, bool], list[WeightScheme]] = {}
    for scheme in fitting:
        layouts.setdefault((scheme.group_size(k), scheme.asymmetric), []).append(scheme)
    parts: dict[WeightScheme, list[torch.Tensor]] = {s: [] for s in fitting}
    for (g, asymmetric), family in layouts.items():
        for rows in _row_chunks(w, len(CLIP_GRID)):
            wg, fg = _grouped(w[rows], g), _grouped(f[rows], g)  # [n, G, g]
            ranges = (wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)) if asymmetric else (wg.abs().amax(-1),)
            for scheme in family:
                parts[scheme].append(_clip_sweep(wg, fg, scheme, _clips(scheme), ranges))
    out: dict[str, WeightCost] = {}
    for scheme in fitting:
        blocks = torch.cat(parts.pop(scheme), 1)  # [C, N, G]
        totals = blocks.double().sum((1, 2))  # [C]
        best = int(torch.argmin(totals))
        out[str(scheme)] = WeightCost(float(totals[best]), _clips(scheme)[best], blocks[best].to(torch.float16))
    return out


def _grouped(t: torch.Tensor, g: int) -> torch.Tensor:
    """[N, K] -> [N, G, g], zero-padded to whole groups (padding has F = 0 and costs nothing)."""
    return F.pad(t, (0, -t.shape[1] % g)).reshape(t.shape[0], -1, g)


def _clip_sweep(
    wg: torch.Tensor, fg: torch.Tensor, scheme: WeightScheme, clips: tuple[float, ...], ranges: tuple[torch.Tensor, ...]
) -> torch.Tensor:
    """Block costs 1/2 sum_g F (W - Q(W))^2 for every clip ratio, [C, n, G]: the float operations of
    quantize_weight + dequantize_weight (codes kept in float: they are exact integers), with the clip ratios
    broadcast against the group ranges (`ranges`: (min, max) when asymmetric, else (max|W|,), each [n, G])."""
    c = torch.tensor(clips, dtype=wg.dtype)[:, None, None]  # [C, 1, 1]
    qmax = scheme.qmax
    if scheme.asymmetric:
        lo, hi = ranges[0] * c, ranges[1] * c  # [C, n, G]
        s = round_scale((hi - lo) / qmax, down=True)
        z = torch.round(-lo / s).clamp(0, qmax)[..., None]
        q = torch.div(wg, s[..., None]).round_().add_(z).clamp_(0, qmax).sub_(z)  # [C, n, G, g]
    else:
        s = round_scale(ranges[0] * c / qmax)
        q = torch.div(wg, s[..., None]).round_().clamp_(-qmax - 1, qmax)
    return q.mul_(s[..., None]).sub_(wg).square_().mul_(fg).sum(-1).mul_(0.5)  # 1/2 F (Q(W) - W)^2 per group


def _row_chunks(w: torch.Tensor, copies: int, max_elements: int = 1 << 20) -> list[slice]:
    """Row ranges small enough that `copies` stacked copies stay under max_elements (a few MiB: the chain of
    element-wise operations on a chunk then runs in cache, about 4x faster than on 64 MiB chunks)."""
    step = max(1, max_elements // (copies * w.shape[1]))
    return [slice(i, i + step) for i in range(0, w.shape[0], step)]


def block_costs(
    w: torch.Tensor, f: torch.Tensor, scheme: WeightScheme, clip: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Per-group 1/2 sum F (W - Q(W))^2, [N, G] (K zero-padded to whole groups, as the quantizer does)."""
    g = scheme.group_size(w.shape[1])
    err = 0.5 * f * (w - fake_quantize_weight(w, scheme, clip)) ** 2  # [N, K]
    return F.pad(err, (0, -w.shape[1] % g)).reshape(w.shape[0], -1, g).sum(-1)


def _clips(scheme: WeightScheme) -> tuple[float, ...]:
    return (1.0,) if scheme.bits >= 8 else CLIP_GRID


def spearman(a: list[float] | torch.Tensor, b: list[float] | torch.Tensor) -> float:
    """Spearman rank correlation (average ranks for ties): how well predicted costs order measured ones."""
    ra, rb = _ranks(torch.as_tensor(a, dtype=torch.float64)), _ranks(torch.as_tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-300))


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    ranks = torch.empty_like(x)
    ranks[order] = torch.arange(len(x), dtype=x.dtype)
    for v in torch.unique(x):  # ties share their average rank
        tie = x == v
        if tie.sum() > 1:
            ranks[tie] = ranks[tie].mean()
    return ranks


# -- assembling the table ---------------------------------------------------------------------------------
def layer_act_params(model: nn.Module, stats: ActStats, alpha: float = 0.5) -> dict[str, ActQuantParams]:
    """ActQuantParams per layer; SmoothQuant's max|W_j| spans every layer reading the same norm output,
    exactly as apply_plan folds one shared scale into that norm."""
    modules = quantizable_modules(model)
    w_absmax = {n: linear_layout(m, m.weight).detach().abs().amax(0).float() for n, m in modules.items()}
    groups: dict[str, list[str]] = {}
    for name, norm in stats.feeders.items():
        groups.setdefault(norm, []).append(name)
    shared = {n: torch.stack([w_absmax[x] for x in members]).amax(0) for members in groups.values() for n in members}
    return {n: act_quant_params(stats.channel_absmax[n], shared.get(n, w_absmax[n]), alpha) for n in modules}


def build_table(
    net: nn.Module,
    stats: ActStats,
    sums: FisherSums,
    costs: Mapping[str, Mapping[str, WeightCost]],
    **meta: Any,
) -> SensitivityTable:
    """Reduce partial sums into a SensitivityTable (`meta`: key, model, calibration, estimator)."""
    layers, tensors = [], {}
    for name, module in quantizable_modules(net).items():
        act = sums.act_cost[name] / max(sums.act_batches, 1)
        absmax = stats.channel_absmax[name]
        layers.append(LayerSensitivity(
            name=name,
            shape=tuple(linear_layout(module, module.weight).shape),
            feeder=stats.feeders.get(name),
            weight_cost={"w16": 0.0, **{s: c.cost for s, c in costs[name].items()}},
            clip={s: c.clip for s, c in costs[name].items()},
            act_cost={"a16": 0.0, **{a.name: float(v) for a, v in zip(ACT_SCHEMES, act, strict=True)}},
            act_absmax=float(absmax.max()),
            act_percentiles={f"p{q:g}": percentile_from_hist(stats.hist[name], q) for q in PERCENTILES},
        ))
        tensors[f"channel_absmax/{name}"] = absmax
        tensors |= {f"blocks/{name}/{s}": c.blocks for s, c in costs[name].items()}
    estimator = {**meta.pop("estimator", {}), "batches": sums.batches, "act_batches": sums.act_batches,
                 "tokens": sums.tokens, "loss": sums.loss_sum / max(sums.batches, 1)}
    return SensitivityTable(layers=tuple(layers), tensors=tensors, estimator=estimator, **meta)
