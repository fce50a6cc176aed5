"""Perplexity and KL divergence of a causal LM on token windows.

`evaluate(model, windows)` runs `model` over ``[n, L]`` windows (from `workers.data.eval_windows`)
in batches. Each window predicts its tokens 1..L-1 from the tokens before them:

* ``nll``: the mean next-token cross-entropy (nats) over all predicted positions of all windows;
* ``perplexity``: ``exp(nll)``;
* ``tokens``: the number of predicted positions, ``n * (L - 1)``;
* ``kl`` (with ``reference=``, usually the unquantized model): the mean over the same positions of
  ``KL(p_reference || p_model)`` in nats.

The two models run in lockstep on the same batch, so no logits are kept between batches. Log-softmax,
cross-entropy and KL are computed in float64, in chunks of positions to bound memory, and summed in
float64. Everything runs under `torch.inference_mode`. Modules in training mode are switched to
eval mode for the call and switched back afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["EvalResult", "evaluate"]

# Elements (positions x vocabulary) per float64 chunk: 2**24 * 8 bytes = 128 MiB per temporary.
_CHUNK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class EvalResult:
    """Mean next-token NLL (nats), its perplexity, the predicted-token count and, optionally, the mean KL."""

    perplexity: float
    nll: float
    tokens: int
    kl: float | None = None

    def to_dict(self) -> dict[str, float | int | None]:
        return asdict(self)


def _device_of(module: torch.nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


@contextmanager
def _eval_mode(*modules: torch.nn.Module | None) -> Iterator[None]:
    training = [(m, m.training) for m in modules if m is not None]
    for m, _ in training:
        m.eval()
    try:
        yield
    finally:
        for m, was in training:
            m.train(was)


def _batch_sums(
    logits: torch.Tensor, targets: torch.Tensor, ref_logits: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of NLL, sum of KL) over the predicted positions of one batch, as float64 scalars.

    Works row by row and in chunks of positions, so the float64 temporaries stay small and the
    (possibly huge) logits are never copied as a whole.
    """
    rows, length, vocab = logits.shape
    targets = targets.to(logits.device)
    if ref_logits is not None:
        ref_logits = ref_logits.to(logits.device)
    chunk = max(1, _CHUNK_ELEMENTS // vocab)
    nll = torch.zeros((), dtype=torch.float64, device=logits.device)
    kl = torch.zeros((), dtype=torch.float64, device=logits.device)
    for row in range(rows):
        for start in range(0, length - 1, chunk):
            stop = min(start + chunk, length - 1)
            logp = F.log_softmax(logits[row, start:stop].double(), dim=-1)
            nll += F.nll_loss(logp, targets[row, start + 1 : stop + 1], reduction="sum")
            if ref_logits is not None:
                ref_logp = F.log_softmax(ref_logits[row, start:stop].double(), dim=-1)
                kl += F.kl_div(logp, ref_logp, reduction="sum", log_target=True)
    return nll, kl


def _logits(module: torch.nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    """``[B, L, V]`` logits of a Hugging Face causal LM or of a plain module returning logits."""
    try:
        out = module(input_ids=input_ids, use_cache=False)
    except TypeError as e:  # a plain nn.Module: forward(input_ids) without use_cache
        if "unexpected keyword argument" not in str(e):
            raise
        out = module(input_ids)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != input_ids.shape:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"model must return [batch, seq, vocab] logits for {tuple(input_ids.shape)} ids, got {got}")
    return logits


def evaluate(
    model: torch.nn.Module,
    windows: torch.Tensor,
    *,
    reference: torch.nn.Module | None = None,
    batch_size: int = 8,
    progress: bool = False,
) -> EvalResult:
    """Perplexity of `model` on ``[n, L]`` token `windows` and, with `reference`, KL(reference || model).

    See the module docstring for the definitions. `batch_size` changes speed and memory, not results
    (up to floating-point reassociation inside the models).
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError(f"windows must be a [n, seq_len] tensor, got {getattr(windows, 'shape', type(windows))}")
    if windows.dtype.is_floating_point or windows.dtype.is_complex or windows.dtype == torch.bool:
        raise ValueError(f"windows must hold integer token ids, got {windows.dtype}")
    n, seq_len = windows.shape
    if n == 0 or seq_len < 2:
        raise ValueError(f"windows must have at least one row of at least 2 tokens, got shape {tuple(windows.shape)}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    windows = windows.long()
    device = _device_of(model)
    ref_device = _device_of(reference) if reference is not None else None
    batches = range(0, n, batch_size)

    nll_sum = torch.zeros((), dtype=torch.float64)
    kl_sum = torch.zeros((), dtype=torch.float64)
    with _eval_mode(model, reference), torch.inference_mode(), _progress(progress, len(batches)) as advance:
        for start in batches:
            batch = windows[start : start + batch_size]
            logits = _logits(model, batch.to(device))
            ref_logits = _logits(reference, batch.to(ref_device)) if reference is not None else None
            if ref_logits is not None and ref_logits.shape != logits.shape:
                raise ValueError(
                    f"reference logits {tuple(ref_logits.shape)} do not match model logits {tuple(logits.shape)}"
                )
            batch_nll, batch_kl = _batch_sums(logits, batch, ref_logits)
            del logits, ref_logits
            nll_sum += batch_nll.cpu()
            kl_sum += batch_kl.cpu()
            advance()

    tokens = n * (seq_len - 1)
    nll = float(nll_sum) / tokens
    return EvalResult(
        perplexity=math.exp(nll) if nll < 709.0 else math.inf,
        nll=nll,
        tokens=tokens,
        kl=float(kl_sum) / tokens if reference is not None else None,
    )


@contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr over `total` batches, or a no-op."""
    if not enabled:
        yield lambda: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(
        TextColumn("evaluating"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("evaluate", total=total)
        yield lambda: bar.advance(task)
