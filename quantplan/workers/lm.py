"""A causal LM cut at its head, so the loss over the vocabulary can be computed in chunks of positions.

The evaluation (`workers.evaluate`) and the sensitivity pass (`workers.sensitivity`) never hold the
``[tokens, vocab]`` logits of a whole batch: they run the body once and apply the head to a chunk of positions at a
time. That is exact only for models whose forward is ``logits = lm_head(<body>(input_ids).last_hidden_state)``
with nothing after the head, so the cut is made only for the transformers classes listed in `CHUNKED_LMS` (exact
classes, not subclasses), without softcapped or scaled logits and without hooks on the whole model; anything else
gets None and keeps its full logits.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

__all__ = ["AFTER_HEAD", "CHUNKED_LMS", "LMSplit", "split_lm"]

# Transformers causal LM class name -> attribute path of the body its forward calls (the body applies the final
# norm; OPT's decoder also its `project_out`).
CHUNKED_LMS: dict[str, str] = {
    "LlamaForCausalLM": "model",
    "MistralForCausalLM": "model",
    "Qwen2ForCausalLM": "model",
    "Qwen3ForCausalLM": "model",
    "OPTForCausalLM": "model.decoder",
    "GPTNeoXForCausalLM": "gpt_neox",
    "GPT2LMHeadModel": "transformer",
}
# Config entries that change the logits after the head: a model that sets one keeps its full logits.
AFTER_HEAD = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass(frozen=True)
class LMSplit:
    """``logits = head(body(input_ids).last_hidden_state)``; `vocab` is the head's output width."""

    body: nn.Module
    head: nn.Module
    vocab: int


def split_lm(model: nn.Module) -> LMSplit | None:
    """The body and head of a recognised causal LM (`CHUNKED_LMS`), or None: use the model's full logits.

    The head is whatever module sits at `model.lm_head` (a quantized replacement included); callers that need
    its weight check its type themselves.
    """
    cls = type(model)
    path = CHUNKED_LMS.get(cls.__name__)
    if path is None or not cls.__module__.startswith("transformers.models."):
        return None
    config = getattr(model, "config", None)
    if config is None or any(getattr(config, key, None) is not None for key in AFTER_HEAD):
        return None
    if model._forward_hooks or model._forward_pre_hooks or hasattr(model, "_hf_hook"):
        return None  # something wraps the whole forward: only the full forward is faithful
    head = getattr(model, "lm_head", None)
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "out_features", None), int):
        return None
    body: nn.Module = model
    for name in path.split("."):
        body = getattr(body, name, None)  # type: ignore[assignment]
        if not isinstance(body, nn.Module):
            return None
    return LMSplit(body, head, int(head.out_features))
