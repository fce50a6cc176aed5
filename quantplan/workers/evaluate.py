"""Perplexity and KL divergence of a causal LM on token windows.

`evaluate(model, windows)` runs `model` over ``[n, L]`` windows (from `workers.data.eval_windows`)
in batches. Each window predicts its tokens 1..L-1 from the tokens before them:

* ``nll``: the mean next-token cross-entropy (nats) over all predicted positions of all windows;
* ``perplexity``: ``exp(nll)``;
* ``tokens``: the number of predicted positions, ``n * (L - 1)``;
* ``kl`` (with ``reference=``, usually the unquantized model): the mean over the same positions of
  ``KL(p_reference || p_model)`` in nats.

The two models run in lockstep on the same batch, so nothing is kept between batches. For the causal LMs
whose logits are exactly ``lm_head(body(ids).last_hidden_state)`` (`CHUNKED_LMS`: no softcapping or scaling
after the head) only the body runs over the whole batch; the head (whatever module sits at ``lm_head``:
``nn.Linear``, a fake-quantized or packed layer) is applied to chunks of positions, so at most one chunk of
``[positions, vocab]`` logits exists at a time. Any other model (another architecture, a plain module returning
logits) gives its full ``[batch, seq, vocab]`` logits, which are then read in the same chunks. Either way
log-softmax, cross-entropy and KL are computed in float64 per chunk and summed in float64, in the same order,
so the two paths agree to floating-point reassociation inside the head's matrix product.

Memory (`eval_memory`): weights of both models + ``batch_size`` windows of activations + one logits chunk.
`max_memory=` sizes the batch from that model. Everything runs under `torch.inference_mode`. Modules in
training mode are switched to eval mode for the call and switched back afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from quantplan.progress import Progress, reporting
from quantplan.quant.modules import FakeQuantLinear
from quantplan.quant.qlinear import QuantLinear
from quantplan.workers.lm import CHUNKED_LMS, LMSplit, split_lm

__all__ = ["CHUNKED_LMS", "EvalMemory", "EvalResult", "eval_memory", "evaluate", "evaluate_many", "increments",
           "merge_results"]

log = logging.getLogger(__name__)

# Elements (positions x vocabulary) per chunk of logits: 2**22 * 8 bytes = 32 MiB per float64 temporary
# (85 positions of a 49,152-entry vocabulary).
_CHUNK_ELEMENTS = 1 << 22
# float64 temporaries alive at once per chunk element: the model's log-softmax and its input, the reference's,
# and the KL's elementwise terms (measured peak, see docs/BENCHMARKS.md "Evaluation memory").
_CHUNK_FLOAT64_COPIES = 5
DEFAULT_BATCH_SIZE = 8

_HEAD_TYPES = (nn.Linear, FakeQuantLinear, QuantLinear)


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token NLL (nats), its perplexity, the predicted-token count and, optionally, the mean KL."""

    perplexity: float
    nll: float
    tokens: int
    kl: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _split_lm(model: nn.Module) -> LMSplit | None:
    """The body and head of a recognised causal LM (`workers.lm.split_lm`) whose head acts on every position
    independently, or None: use the full logits."""
    split = split_lm(model)
    return split if split is not None and isinstance(split.head, _HEAD_TYPES) else None


def _device_of(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(*modules: nn.Module | None) -> Iterator[None]:
    training = [(m, m.training) for m in modules if m is not None]
    for m, _ in training:
        m.eval()
    try:
        yield
    finally:
        for m, was in training:
            m.train(was)


def _call(module: nn.Module, input_ids: torch.Tensor) -> object:
    try:
        return module(input_ids=input_ids, use_cache=False)
    except TypeError as e:  # a plain nn.Module: forward(input_ids) without use_cache
        if "unexpected keyword argument" not in str(e):
            raise
        return module(input_ids)


def _first(out: object, name: str) -> object:
    return getattr(out, name) if hasattr(out, name) else out[0] if isinstance(out, tuple) else out


def _logits(module: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` logits of a Hugging Face causal LM or of a plain module returning logits."""
    logits = _first(_call(module, input_ids), "logits")
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return [batch, seq, vocab] logits for {tuple(input_ids.shape)} ids, got {got}")
    return logits


# logits(row, start, stop) -> [stop - start, vocab] logits of positions start..stop-1 of one row of the batch.
RowLogits = Callable[[int, int, int], torch.Tensor]


def _row_logits(module: nn.Module, split: LMSplit | None, input_ids: torch.Tensor) -> tuple[RowLogits, int]:
    """Logits of one batch by (row, positions), and the vocabulary size: from the head or from the full logits."""
    if split is None:
        logits = _logits(module, input_ids)
        return (lambda row, start, stop: logits[row, start:stop]), logits.shape[-1]
    hidden = _first(_call(split.body, input_ids), "last_hidden_state")  # [B, L, H], final norm applied
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or hidden.shape[:2] != input_ids.shape:
        raise ValueError(f"{type(split.body).__name__} did not return [batch, seq, hidden] states")
    hidden = hidden.to(_device_of(split.head))
    return (lambda row, start, stop: split.head(hidden[row, start:stop])), split.vocab


def _batch_sums(
    logits: RowLogits, targets: torch.Tensor, ref_logits: RowLogits | None, vocab: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL, sum of KL) over the predicted positions of one batch, as float64 scalars.

    Row by row and in chunks of positions, so the float64 temporaries stay small and no logits are copied
    as a whole; the reference's chunk moves to the model's device.
    """
    rows, length = targets.shape
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    nll = kl = None
    for row in range(rows):
        for start in range(0, length - 1, chunk):
            stop = min(start + chunk, length - 1)
            logp = F.log_softmax(logits(row, start, stop).double(), dim=-1)
            if nll is None:
                nll = torch.zeros((), dtype=torch.float64, device=logp.device)
                kl = torch.zeros((), dtype=torch.float64, device=logp.device)
            nll += F.nll_loss(logp, targets[row, start + 1 : stop + 1].to(logp.device), reduction="sum")
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits(row, start, stop).to(logp.device).double(), dim=-1)
                kl += F.kl_div(logp, ref_logp, reduction="sum", log_target=True)
                del ref_logp
            del logp
    assert nll is not None and kl is not None  # length >= 2: at least one chunk
    return nll, kl


@dataclass(frozen=True)
class EvalMemory:
    """Predicted bytes of an evaluation's tensors: ``weights + batch_size * per_window + logits_chunk``.

    * ``weights``: parameters and buffers of the model and the reference (shared storage counted once);
    * ``per_window``: one window through the body (the larger of the two models' activations) plus what is kept
      for the chunks (the final hidden states, or the full logits on the full-logits path);
    * ``logits_chunk``: one chunk of logits in the models' dtype plus its float64 temporaries.

    The interpreter and libraries (about 0.35 GB for torch and transformers on the CPU) are not included.
    """

    weights: int
    per_window: int
    logits_chunk: int

    def peak(self, batch_size: int) -> int:
        return self.weights + batch_size * self.per_window + self.logits_chunk

    def batch_size(self, max_memory: int, windows: int) -> int:
        """The largest batch (1..windows) whose `peak` fits `max_memory`; 1 if none does."""
        free = max_memory - self.weights - self.logits_chunk
        return max(1, min(windows, free // self.per_window))


def _config_dims(model: nn.Module) -> tuple[int, int, int, int] | None:
    """(hidden, layers, MLP width, attention heads) from a transformers config, or None."""
    c = getattr(model, "config", None)
    hidden = getattr(c, "hidden_size", None) or getattr(c, "n_embd", None)
    layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    heads = getattr(c, "num_attention_heads", None) or getattr(c, "n_head", None)
    if not (hidden and layers and heads):
        return None
    mlp = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or getattr(c, "n_inner", None)
    return int(hidden), int(layers), int(mlp or 4 * hidden), int(heads)


def _float_bytes(model: nn.Module) -> int:
    for p in model.parameters():
        if p.is_floating_point():
            return p.element_size()
    return 4


def _activation_bytes(model: nn.Module, seq_len: int) -> int | None:
    """Bound on one window's activations through the body: per token, a residual stream per layer
    (hidden x layers: covers implementations that keep every layer's output alive), the MLP's temporaries
    (4 x MLP width) and one row of attention scores with its softmax (2 x heads x seq_len)."""
    dims = _config_dims(model)
    if dims is None:
        return None
    hidden, layers, mlp, heads = dims
    return _float_bytes(model) * seq_len * (hidden * layers + 4 * mlp + 2 * heads * seq_len)


def _vocab(model: nn.Module) -> int | None:
    split = _split_lm(model)
    if split is not None:
        return split.vocab
    head = getattr(model, "lm_head", None)
    return getattr(head, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None)


def _weight_bytes(*modules: nn.Module | None) -> int:
    seen: set[tuple[torch.device, int]] = set()
    total = 0
    for m in modules:
        if m is None:
            continue
        for t in [*m.parameters(), *m.buffers()]:
            key = (t.device, t.untyped_storage().data_ptr())
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
    return total


def eval_memory(
    model: nn.Module, seq_len: int, *, reference: nn.Module | None = None, chunked: bool = True
) -> EvalMemory | None:
    """The memory model of `evaluate` on windows of `seq_len` tokens; None when a model has no transformers
    config to read its sizes from (hidden size, layers, MLP width, heads, vocabulary)."""
    models = [m for m in (model, reference) if m is not None]
    acts = [_activation_bytes(m, seq_len) for m in models]
    vocabs = [_vocab(m) for m in models]
    if any(a is None for a in acts) or any(v is None for v in vocabs):
        return None
    vocab = int(vocabs[0])  # type: ignore[arg-type]
    kept = 0
    for m in models:
        split = _split_lm(m) if chunked else None
        width = _config_dims(m)[0] if split is not None else vocab  # type: ignore[index]
        kept += _float_bytes(m) * seq_len * width
    chunk = max(1, _CHUNK_ELEMENTS // vocab) * vocab
    logits_chunk = chunk * (sum(_float_bytes(m) for m in models) + 8 * _CHUNK_FLOAT64_COPIES)
    return EvalMemory(_weight_bytes(*models), max(acts) + kept, logits_chunk)  # type: ignore[type-var]


def _batch_size(
    model: nn.Module, reference: nn.Module | None, windows: torch.Tensor, max_memory: int | None, chunked: bool
) -> int:
    if max_memory is None:
        return DEFAULT_BATCH_SIZE
    n, seq_len = windows.shape
    memory = eval_memory(model, seq_len, reference=reference, chunked=chunked)
    if memory is None:
        log.info("no memory model for %s: evaluating one window at a time", type(model).__name__)
        return 1
    size = memory.batch_size(max_memory, n)
    if memory.peak(size) > max_memory:
        log.warning(
            "evaluation needs about %.2f GB at one window per batch, over max_memory=%.2f GB",
            memory.peak(1) / 1e9,
            max_memory / 1e9,
        )
    return size


def _check_args(windows: torch.Tensor, batch_size: int | None, max_memory: int | None) -> None:
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError(f"windows must be a [n, seq_len] tensor, got {getattr(windows, 'shape', type(windows))}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    n, seq_len = windows.shape
    if n == 0 or seq_len < 2:
        raise ValueError(f"windows must have at least one row of at least 2 tokens, got shape {tuple(windows.shape)}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if max_memory is not None and (isinstance(max_memory, bool) or not isinstance(max_memory, int) or max_memory < 1):
        raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory!r}")


def evaluate(
    model: nn.Module,
    windows: torch.Tensor,
    *,
    reference: nn.Module | None = None,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool | Progress = False,
    on_progress: Callable[[int, int], None] | None = None,
    chunked: bool = True,
    step: str = "evaluation",
) -> EvalResult:
    """Perplexity of `model` on ``[n, L]`` token `windows` and, with `reference`, KL(reference || model).

    See the module docstring for the definitions. `batch_size` (windows per forward) changes speed and memory,
    not results (up to floating-point reassociation inside the models); when it is not given, `max_memory`
    (bytes for the weights of both models, the activations and a logits chunk: `eval_memory`) sizes it, and
    without either it is 8. `progress` (True: a rich bar on stderr; a `quantplan.progress.Progress`: its
    listeners) reports the windows done as the step named `step`; `on_progress(done, total)` is called with
    windows done and the total, once before the first batch and after every batch (an exception it raises
    stops the evaluation). `chunked=False` materializes every batch's full logits even for a model
    `CHUNKED_LMS` recognises (the path every other model takes; for comparisons).
    """
    _check_args(windows, batch_size, max_memory)
    windows = windows.long()
    n, seq_len = windows.shape
    if batch_size is None:
        batch_size = _batch_size(model, reference, windows, max_memory, chunked)
    split = _split_lm(model) if chunked else None
    ref_split = _split_lm(reference) if chunked and reference is not None else None
    device = _device_of(model)
    ref_device = _device_of(reference) if reference is not None else None

    nll_sum = torch.zeros((), dtype=torch.float64)
    kl_sum = torch.zeros((), dtype=torch.float64)
    with _eval_mode(model, reference), torch.inference_mode(), _progress(progress, step, n, on_progress) as advance:
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size]
            logits, vocab = _row_logits(model, split, batch.to(device))
            ref_logits = None
            if reference is not None:
                ref_logits, ref_vocab = _row_logits(reference, ref_split, batch.to(ref_device))
                if ref_vocab != vocab:
                    raise ValueError(f"reference vocabulary ({ref_vocab}) does not match the model's ({vocab})")
            batch_nll, batch_kl = _batch_sums(logits, batch, ref_logits, vocab)
            del logits, ref_logits
            nll_sum += batch_nll.cpu()
            kl_sum += batch_kl.cpu()
            advance(len(batch))

    tokens = n * (seq_len - 1)
    return _result(float(nll_sum) / tokens, tokens, float(kl_sum) / tokens if reference is not None else None)


def evaluate_many(
    reference: nn.Module | None,
    models: Sequence[nn.Module],
    windows: torch.Tensor,
    *,
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_progress: Callable[[int, int], None] | None = None,
) -> tuple[EvalResult | None, list[EvalResult]]:
    """The reference's result and each model's perplexity and KL(reference || model) on `windows`, in one pass.

    Each batch goes through the reference once and each chunk of its log-softmax serves every model, where
    `evaluate(model, reference=...)` per model would run the reference once per model: P models cost P + 1
    forwards per window instead of 2P. The numbers are `evaluate`'s (the same chunks, summed in the same order).
    `on_progress(done, total)` counts windows (each through every model). Without a `reference` (None), each
    model's perplexity only (no KL), and None for the reference's result."""
    _check_args(windows, batch_size, None)
    windows = windows.long()
    n, seq_len = windows.shape
    ref_split = _split_lm(reference) if reference is not None else None
    splits = [_split_lm(m) for m in models]
    sums = torch.zeros(len(models) + 1, 2, dtype=torch.float64)  # [reference, *models] x (nll, kl)
    with _eval_mode(reference, *models), torch.inference_mode(), _progress(False, "", n, on_progress) as advance:
        for start in range(0, n, batch_size):
            batch = windows[start : start + batch_size]
            ref_logits, vocab = None, None
            if reference is not None:
                ref_logits, vocab = _row_logits(reference, ref_split, batch.to(_device_of(reference)))
            logits = []
            for m, split in zip(models, splits, strict=True):
                row_logits, model_vocab = _row_logits(m, split, batch.to(_device_of(m)))
                if model_vocab != (vocab := vocab or model_vocab):
                    raise ValueError(f"reference vocabulary ({vocab}) does not match a model's ({model_vocab})")
                logits.append(row_logits)
            assert vocab is not None
            sums += _many_sums(ref_logits, logits, batch, vocab)
            del ref_logits, logits
            advance(len(batch))
    tokens = n * (seq_len - 1)
    with_kl = reference is not None
    results = [_result(float(nll) / tokens, tokens, float(kl) / tokens if with_kl else None) for nll, kl in sums[1:]]
    return (_result(float(sums[0, 0]) / tokens, tokens, None) if with_kl else None), results


def _many_sums(ref_logits: RowLogits | None, logits: Sequence[RowLogits], targets: torch.Tensor,
               vocab: int) -> torch.Tensor:
    """[1 + models, 2] sums of (NLL, KL) over one batch: `_batch_sums`' chunks, the reference's log-softmax
    computed once per chunk for every model (no reference: NLL only, the KL column and row 0 stay 0)."""
    rows, length = targets.shape
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    out = torch.zeros(len(logits) + 1, 2, dtype=torch.float64)
    for row in range(rows):
        for start in range(0, length - 1, chunk):
            stop = min(start + chunk, length - 1)
            target = targets[row, start + 1 : stop + 1]
            ref_logp = None
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits(row, start, stop).double(), dim=-1)
                out[0, 0] += F.nll_loss(ref_logp, target.to(ref_logp.device), reduction="sum").cpu()
            for i, model_logits in enumerate(logits, 1):
                logp = F.log_softmax(model_logits(row, start, stop).double(), dim=-1)
                out[i, 0] += F.nll_loss(logp, target.to(logp.device), reduction="sum").cpu()
                if ref_logp is not None:
                    out[i, 1] += F.kl_div(logp, ref_logp.to(logp.device), reduction="sum", log_target=True).cpu()
                del logp
            del ref_logp
    return out


def _result(nll: float, tokens: int, kl: float | None) -> EvalResult:
    return EvalResult(perplexity=math.exp(nll) if nll < 709.0 else math.inf, nll=nll, tokens=tokens, kl=kl)


def merge_results(parts: Sequence[EvalResult]) -> EvalResult:
    """One result from results on disjoint windows (token-weighted means of NLL and KL)."""
    tokens = sum(p.tokens for p in parts)
    nll = sum(p.nll * p.tokens for p in parts) / tokens
    kls = [p.kl for p in parts]
    kl = None if any(k is None for k in kls) else sum(k * p.tokens for k, p in zip(kls, parts, strict=True)) / tokens
    return _result(nll, tokens, kl)


@contextmanager
def _progress(
    progress: bool | Progress, step: str, total: int, callback: Callable[[int, int], None] | None
) -> Iterator[Callable[[int], None]]:
    """advance(windows): reports `total` windows as `step` of `progress` and/or to `callback(done, total)`."""
    done = 0
    if callback is not None:
        callback(0, total)
    with reporting(progress) as reporter:
        counted = reporter.step(step, total, "windows") if reporter.enabled else None

        def advance(advanced: int) -> None:
            nonlocal done
            done += advanced
            if counted is not None:
                counted.update(done)
            if callback is not None:
                callback(done, total)

        yield advance

def increments(count: Callable[[int], None] | None) -> Callable[[int, int], None] | None:
    """`on_progress(done, total)` for `evaluate` that passes each batch's windows on as `count(k)`."""
    if count is None:
        return None
    last = 0

    def report(done: int, _total: int) -> None:
        nonlocal last
        if done > last:
            count(done - last)
            last = done

    return report
