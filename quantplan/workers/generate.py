"""Greedy generation with a KV cache, timed by phase: the prefill (the prompt in one forward) and the decode (one
token per forward). What `quantplan generate` and `bench/decode.py` run on a float or an applied model."""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from dataclasses import dataclass, is_dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Generation:
    """Generated ids and the time of each phase."""

    tokens: torch.Tensor  # [batch, new] generated ids (after the prompt)
    prompt_tokens: int  # batch x prompt length
    prefill_s: float  # the prompt's forward, up to the first generated token
    decode_s: float  # the forwards of the following tokens

    @property
    def new_tokens(self) -> int:
        return self.tokens.numel()

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else float("inf")

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens per second after the first one (each costs one decode forward per row)."""
        steps = self.tokens.numel() - self.tokens.shape[0]
        return steps / self.decode_s if self.decode_s > 0 else float("inf")

    def timings(self) -> dict[str, Any]:
        return {"prompt_tokens": self.prompt_tokens, "new_tokens": self.new_tokens, "prefill_s": self.prefill_s,
                "decode_s": self.decode_s, "prefill_tokens_per_s": self.prefill_tokens_per_s,
                "decode_tokens_per_s": self.decode_tokens_per_s}


@torch.inference_mode()
def generate(net: nn.Module, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None,
             on_token: Callable[[torch.Tensor], None] | None = None) -> Generation:
    """Greedy decoding of `max_new_tokens` tokens after the `[batch, length]` prompt `input_ids` (a Hugging Face
    causal LM with a KV cache). With `eos_token_id`, a batch of one stops after that token. `on_token(ids)` gets
    each step's `[batch]` new ids (streaming)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"the prompt must be [batch, length] ids with length >= 1, got {tuple(input_ids.shape)}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    net.eval()
    device = next(net.parameters()).device
    ids = input_ids.to(device)
    params = inspect.signature(net.forward).parameters
    cache_arg = "cache" if "cache" in params else "past_key_values"  # transformers renamed it in 5.x
    last_only = {"logits_to_keep": 1} if "logits_to_keep" in params else {}  # no [length, vocab] logits
    start = time.perf_counter()
    out = net(input_ids=ids, use_cache=True, **last_only)
    token = out.logits[:, -1].argmax(-1)
    prefill = time.perf_counter() - start
    steps = [token]
    if on_token is not None:
        on_token(token)
    start = time.perf_counter()
    for _ in range(max_new_tokens - 1):
        if eos_token_id is not None and token.numel() == 1 and int(token) == eos_token_id:
            break
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        out = net(input_ids=token[:, None], use_cache=True, **{cache_arg: cache}, **last_only)
        token = out.logits[:, -1].argmax(-1)
        steps.append(token)
        if on_token is not None:
            on_token(token)
    decode = time.perf_counter() - start
    return Generation(torch.stack(steps, 1).cpu(), ids.numel(), prefill, decode)


def model_bytes(net: nn.Module) -> int:
    """Bytes of the model's parameters and buffers (each storage once), plus what quantized layers keep
    prepared for their kernels (`QuantLinear`'s cached layouts)."""
    seen: set[int] = set()
    total = 0
    tensors = [*net.parameters(), *net.buffers()]
    for module in net.modules():
        for _, made in getattr(module, "_prepared", {}).values():
            tensors.extend(v for v in (vars(made).values() if is_dataclass(made) else (made,))
                           if isinstance(v, torch.Tensor))
    for t in tensors:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total
