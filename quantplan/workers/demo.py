"""quantplan.workers.demo: builds and caches the offline demo model (a tiny Llama trained on pydoc help topics).

The demo must work without network access, so its model, tokenizer and data all come from text that
every Python install carries (``pydoc_data.topics``). The model is built once per recipe and cached under
the user cache directory; later calls return the cached directory immediately.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path

import platformdirs
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from transformers.utils import logging as hf_logging

from quantplan.workers.pipeline import LoadSpec

logger = logging.getLogger(__name__)

# Bump when the recipe changes in a way the constants below do not capture (invalidates old caches).
BUILDER_VERSION = 1
DEFAULT_STEPS = 600
CACHE_ENV = "QUANTPLAN_CACHE_DIR"
TRAIN_LOG = "train_log.json"

SPECIAL_TOKENS = ("<s>", "</s>", "<unk>")  # ids 0, 1, 2 in this order
VOCAB_SIZE = 1024
# Every linear's in_features (128 or 384) is a multiple of 128, so group size 128 quantization applies.
MODEL_SPEC = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention, like Llama-3
    "max_position_embeddings": 512,
    "tie_word_embeddings": False,  # untied, like Llama-2/3 7-8B: lm_head is a separate linear
}
TRAIN_SPEC = {
    "block": 128,
    "batch": 16,
    "lr": 3e-3,
    "min_lr_frac": 0.1,
    "warmup_frac": 0.05,
    "weight_decay": 0.1,
    "grad_clip": 1.0,
}
HELDOUT_FRAC = 0.10
CALIB_SAMPLES = 32  # calibration windows of the demo's scheme table and of its search job


@dataclass(frozen=True)
class DemoModel:
    """A built demo model: the HF model directory plus its training and held-out text files."""

    path: Path
    train_file: Path
    test_file: Path

    @property
    def data_spec(self) -> str:
        """Evaluation data spec: the held-out text."""
        return f"text:{self.test_file}"

    @property
    def calib_spec(self) -> str:
        """Calibration data spec: the training text (calibrating on eval text would leak)."""
        return f"text:{self.train_file}"

    def load_spec(self, *, seq_len: int, samples: int | None = None) -> LoadSpec:
        """What the demo loads: the model, `CALIB_SAMPLES` calibration windows of the training text and at most
        `samples` evaluation windows of the held-out text."""
        return LoadSpec(model=str(self.path), data=self.calib_spec, seq_len=seq_len, calib_samples=CALIB_SAMPLES,
                        windows=True, eval_data=self.data_spec, eval_samples=samples)


def demo_cache_dir() -> Path:
    """Where demo models live: ``$QUANTPLAN_CACHE_DIR/demo`` or the platform user cache dir."""
    root = os.environ.get(CACHE_ENV)
    return Path(root) / "demo" if root else Path(platformdirs.user_cache_dir("quantplan")) / "demo"


def build_demo_model(
    cache_dir: Path | None = None,
    *,
    steps: int = DEFAULT_STEPS,
    force: bool = False,
    progress: bool = True,
    seed: int = 0,
) -> DemoModel:
    """Return the demo model for this recipe, training and caching it first if needed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    cache_dir = Path(cache_dir) if cache_dir is not None else demo_cache_dir()
    train_topics, test_topics = split_corpus()
    final = cache_dir / f"llama-demo-{_recipe_key(train_topics + test_topics, steps, seed)}"
    if final.is_dir() and not force:
        logger.info("demo model cached at %s", final)
        return _demo_at(final)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build next to the destination so the final rename is atomic (same filesystem).
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=cache_dir))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; the published model should read like any cache entry
    try:
        _build_into(tmp, train_topics, test_topics, steps=steps, seed=seed, progress=progress)
        _publish(tmp, final, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op after a successful rename
    return _demo_at(final)


def _demo_at(root: Path) -> DemoModel:
    return DemoModel(path=root / "model", train_file=root / "train.txt", test_file=root / "test.txt")


# --- corpus -------------------------------------------------------------------------------------------


def split_corpus(heldout_frac: float = HELDOUT_FRAC) -> tuple[list[str], list[str]]:
    """Help topics in sorted key order, split at the topic boundary nearest ``1 - heldout_frac``.

    Held-out topics that quote a training topic verbatim (e.g. ``while`` is a section of ``compound``)
    are dropped, so the evaluation text is really unseen.
    """
    from pydoc_data.topics import topics

    texts = list(dict.fromkeys(topics[k] for k in sorted(topics)))  # dedup ("if" == "else")
    ends = list(accumulate(map(len, texts)))  # ends[i]: chars up to and including topic i
    target = (1 - heldout_frac) * ends[-1]
    cut = 1 + min(range(len(ends) - 1), key=lambda i: abs(ends[i] - target))
    train, test = texts[:cut], texts[cut:]
    joined = "\n".join(train)
    test = [t for t in test if not any(p in joined for p in _paragraphs(t))]
    logger.debug("corpus: %d chars, %d train / %d held-out topics", ends[-1], len(train), len(test))
    return train, test


def _paragraphs(text: str, min_len: int = 80) -> list[str]:
    return [p for p in text.split("\n\n") if len(p) >= min_len]


def _recipe_key(texts: list[str], steps: int, seed: int) -> str:
    """Short hash of everything that determines the model; the corpus is included because pydoc
    topics differ between Python versions."""
    corpus = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    recipe = {"version": BUILDER_VERSION, "vocab": VOCAB_SIZE, "model": MODEL_SPEC, "train": TRAIN_SPEC}
    recipe |= {"heldout": HELDOUT_FRAC, "steps": steps, "seed": seed, "corpus": corpus}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


# --- build --------------------------------------------------------------------------------------------


def _build_into(
    root: Path, train_topics: list[str], test_topics: list[str], *, steps: int, seed: int, progress: bool
) -> None:
    """Write data files, tokenizer, trained model and train log into ``root``."""
    demo = _demo_at(root)
    demo.train_file.write_text("\n".join(train_topics), encoding="utf-8")
    demo.test_file.write_text("\n".join(test_topics), encoding="utf-8")
    start = time.perf_counter()
    tokenizer = train_tokenizer(train_topics)
    train_ids, test_ids = _token_stream(tokenizer, train_topics), _token_stream(tokenizer, test_topics)
    model, log = _train_model(train_ids, test_ids, steps=steps, seed=seed, progress=progress)
    log |= {"steps": steps, "seed": seed, "builder_version": BUILDER_VERSION}
    log |= {"seconds": round(time.perf_counter() - start, 1)}
    log |= {"train_tokens": len(train_ids), "test_tokens": len(test_ids)}
    _save(demo.path, model, tokenizer, log)
    logger.info(
        "demo model trained in %.0fs: train loss %.3f, held-out loss %.3f (ppl %.1f)",
        *(log[k] for k in ("seconds", "train_eval_loss", "heldout_loss", "heldout_ppl")),
    )


def _train_model(
    train_ids: torch.Tensor, test_ids: torch.Tensor, *, steps: int, seed: int, progress: bool
) -> tuple[LlamaForCausalLM, dict]:
    """Initialise from ``seed``, train, evaluate; returns the model and its stats."""
    with _threads(), torch.random.fork_rng(devices=[]):  # don't disturb the caller's RNG state
        torch.manual_seed(seed)
        model = LlamaForCausalLM(_model_config()).float()  # float32 even if the default dtype changed
        log = _train(model, train_ids, steps=steps, seed=seed, progress=progress)
        log |= _evaluate_all(model, train_ids, test_ids) | {"threads": torch.get_num_threads()}
    return model, log


def _save(path: Path, model: LlamaForCausalLM, tokenizer: Tokenizer, log: dict) -> None:
    """Save an HF directory that AutoModelForCausalLM / AutoTokenizer load, plus the train log."""
    with _quiet_hf():
        model.save_pretrained(path)
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=MODEL_SPEC["max_position_embeddings"],  # so evaluators chunk within RoPE range
    ).save_pretrained(path)
    (path / TRAIN_LOG).write_text(json.dumps(log, indent=2), encoding="utf-8")


def _publish(tmp: Path, final: Path, *, replace: bool) -> None:
    """Atomically move a finished build into place; a builder that loses the race keeps the winner's."""
    if replace and final.is_dir():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old / "x")
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        logger.info("another builder finished %s first; using its model", final)


@contextmanager
def _threads() -> Iterator[None]:
    """Train on the idle cores (2 on an idle 2-core box), then restore the caller's setting.

    On busy cores OpenMP threads spin-wait on each other: measured on 2 cores with other work running,
    a 2-thread step took 1-2.4 s against 0.27 s with 1 thread (0.15 s with 2 threads when idle).
    """
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    busy = round(os.getloadavg()[0]) if hasattr(os, "getloadavg") else 0
    torch.set_num_threads(max(1, cores - busy))
    logger.debug("training with %d threads (%d cores, load %d)", torch.get_num_threads(), cores, busy)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _quiet_hf() -> Iterator[None]:
    """Hide transformers' own tqdm bar while saving, so only our rich bar shows."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def train_tokenizer(texts: list[str]) -> Tokenizer:
    """Byte-level BPE (no unknown bytes) with ``<s>`` prepended to every encoding."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return tok


def _token_stream(tokenizer: Tokenizer, texts: list[str]) -> torch.Tensor:
    """One long id stream; each topic starts with BOS, as evaluators' encodings will."""
    ids = [i for enc in tokenizer.encode_batch(texts) for i in enc.ids]
    return torch.tensor(ids, dtype=torch.long)


def _model_config() -> LlamaConfig:
    bos, eos = SPECIAL_TOKENS.index("<s>"), SPECIAL_TOKENS.index("</s>")
    return LlamaConfig(vocab_size=VOCAB_SIZE, bos_token_id=bos, eos_token_id=eos, **MODEL_SPEC)


# --- training -----------------------------------------------------------------------------------------


def _train(model: LlamaForCausalLM, ids: torch.Tensor, *, steps: int, seed: int, progress: bool) -> dict:
    """AdamW with linear warmup and cosine decay on random 128-token blocks; returns loss stats."""
    spec, gen = TRAIN_SPEC, torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]  # no decay on norms
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec["weight_decay"]}, {"params": rest, "weight_decay": 0.0}],
        lr=spec["lr"],
        betas=(0.9, 0.95),
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(steps))
    model.train()
    losses: list[float] = []
    with _progress_bar(progress) as bar:
        task = bar.add_task("training demo model", total=steps, loss=float("nan"))
        for _ in range(steps):
            loss = _train_step(model, opt, _random_blocks(ids, gen), spec["grad_clip"])
            sched.step()
            losses.append(loss)
            bar.update(task, advance=1, loss=loss)
    model.eval()
    tail = losses[-min(10, steps) :]  # a single step's loss is noisy
    return {"initial_loss": losses[0], "final_loss": sum(tail) / len(tail), "losses": losses}


def _lr_lambda(steps: int) -> Callable[[int], float]:
    warmup = max(1, int(TRAIN_SPEC["warmup_frac"] * steps))
    floor = TRAIN_SPEC["min_lr_frac"]

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _random_blocks(ids: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    block, batch = TRAIN_SPEC["block"], TRAIN_SPEC["batch"]
    starts = torch.randint(0, len(ids) - block, (batch,), generator=gen)
    return torch.stack([ids[s : s + block] for s in starts.tolist()])


def _train_step(model: LlamaForCausalLM, opt: torch.optim.Optimizer, x: torch.Tensor, clip: float) -> float:
    loss = model(input_ids=x, labels=x, use_cache=False).loss
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    opt.step()
    return loss.item()


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
        console=Console(stderr=True),  # stdout carries results (--json)
        disable=not enabled,
    )


# --- evaluation ---------------------------------------------------------------------------------------


def _evaluate_all(model: LlamaForCausalLM, train_ids: torch.Tensor, test_ids: torch.Tensor) -> dict:
    """Mean next-token loss / perplexity on held-out text and on a same-sized slice of training text."""
    test_loss = evaluate_loss(model, test_ids)
    train_loss = evaluate_loss(model, train_ids[: len(test_ids)])
    return {
        "train_eval_loss": train_loss,
        "train_ppl": math.exp(train_loss),
        "heldout_loss": test_loss,
        "heldout_ppl": math.exp(test_loss),
    }


@torch.no_grad()
def evaluate_loss(model: LlamaForCausalLM, ids: torch.Tensor, block: int | None = None) -> float:
    """Token-weighted mean loss over consecutive non-overlapping blocks of ``ids``."""
    block = block or TRAIN_SPEC["block"]
    whole = len(ids) // block * block
    batches = list(torch.split(ids[:whole].view(-1, block), TRAIN_SPEC["batch"]))
    if len(ids) - whole >= 2:
        batches.append(ids[whole:][None])
    total, count = 0.0, 0
    for x in batches:
        n = x.shape[0] * (x.shape[1] - 1)  # HF shifts labels: each row predicts all but its first token
        total += model(input_ids=x, labels=x, use_cache=False).loss.item() * n
        count += n
    return total / count
