"""Layouts: how a batch of K-response rows (token ids) becomes model inputs.

- `padded` (`DataCollatorForKResponses`): sum(K_i) prompt+response sequences, right-padded. Works everywhere.
- `shared_prompt` (`DataCollatorForSharedPrompt`): each row's prompt once, its responses after it, a 4D mask that
  keeps responses apart. Needs an attention implementation that takes a custom mask.

Every layout returns the same per-row tensors (`response_mask`, `rewards`, `ordered`, `ref_logps`) and a
`response_ids` map from token positions to responses, so the trainer sums per-token log-probabilities the same way
whatever the layout. `choose_layout` decides which one a trainer uses; `model_inputs` turns a batch into the keyword
arguments of the model's forward. Their costs are measured in `docs/layouts.md`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .padded import DataCollatorForKResponses, per_response_values
from .shared_prompt import SUPPORTED_ATTENTION, DataCollatorForSharedPrompt, attention_mask_for, block_mask_for

PROMPT_SHARING = ("auto", "on", "off")

# Keys of a collated batch that go into the model's forward; the rest are for the loss and the metrics
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


@dataclass(frozen=True)
class LayoutChoice:
    """The layout a trainer uses (`"padded"` or `"shared_prompt"`), and why the shared prompt is off, if it is."""

    name: str
    fallback_reason: str | None = None


def choose_layout(
    prompt_sharing: str, attn_implementation: str, truncation_mode: str, router_loss: bool = False
) -> LayoutChoice:
    """The layout for a `prompt_sharing` setting on a model with `attn_implementation`.

    `"off"` is the padded layout. `"auto"` is the shared-prompt layout where it can work (an attention implementation
    in `SUPPORTED_ATTENTION`, `keep_start` truncation, and no MoE `router_loss`, whose load-balancing term reads a
    2D attention mask), else the padded one with the reason. `"on"` raises a `ValueError` with the reason where the
    shared prompt cannot work.
    """
    if prompt_sharing not in PROMPT_SHARING:
        raise ValueError(f"`prompt_sharing` must be one of {PROMPT_SHARING}, got {prompt_sharing!r}.")
    if prompt_sharing == "off":
        return LayoutChoice("padded")
    reason = None
    if attn_implementation not in SUPPORTED_ATTENTION:
        reason = (
            f"attn_implementation={attn_implementation!r} cannot take its custom 4D mask (supported: "
            f"{SUPPORTED_ATTENTION})"
        )
    elif truncation_mode != "keep_start":
        reason = f"truncation_mode={truncation_mode!r} (it supports 'keep_start')"
    elif router_loss:
        reason = "the model's MoE router loss is on, and its load-balancing term needs a 2D attention mask"
    if reason is None:
        return LayoutChoice("shared_prompt")
    if prompt_sharing == "on":
        raise ValueError(f"prompt_sharing='on' is not possible here: {reason}. Use 'auto' or 'off'.")
    return LayoutChoice("padded", reason)


def make_collator(layout: str, *, pad_token_id: int, max_length: int | None, truncation_mode: str, pad_to_multiple_of):
    """The collator of a layout name returned by `choose_layout`."""
    if layout == "shared_prompt":
        return DataCollatorForSharedPrompt(
            pad_token_id=pad_token_id, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of
        )
    return DataCollatorForKResponses(
        pad_token_id=pad_token_id,
        max_length=max_length,
        truncation_mode=truncation_mode,
        pad_to_multiple_of=pad_to_multiple_of,
    )


def model_inputs(batch: dict, attn_implementation: str, mask_dtype: torch.dtype) -> dict:
    """The forward's keyword arguments for a collated batch: the shared-prompt layout's 4D mask in the form the
    attention implementation takes (boolean for `sdpa`, additive in `mask_dtype` for `eager`, a block mask for
    `flex_attention`)."""
    kwargs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if kwargs["attention_mask"].dim() == 4:
        if attn_implementation == "flex_attention":
            kwargs["attention_mask"] = block_mask_for(batch["segment_ids"], batch["row_ids"])
        else:
            kwargs["attention_mask"] = attention_mask_for(kwargs["attention_mask"], attn_implementation, mask_dtype)
    return kwargs


__all__ = [
    "PROMPT_SHARING",
    "SUPPORTED_ATTENTION",
    "DataCollatorForKResponses",
    "DataCollatorForSharedPrompt",
    "LayoutChoice",
    "choose_layout",
    "make_collator",
    "model_inputs",
    "per_response_values",
]
