"""Layouts: how a batch of K-response rows (token ids) becomes model inputs, and which one to use.

- `padded` (`DataCollatorForKResponses`): sum(K_i) prompt+response sequences, right-padded. Works everywhere.
- `mask` (`DataCollatorForSharedPrompt`): each row's prompt once and its responses after it, in one sequence with a
  4D mask that keeps the responses apart. Needs an attention implementation that takes a custom mask.
- `cache` (`DataCollatorForPromptCache`): each row's prompt run once, each response on top of its keys and values.
  Any attention implementation; one forward per prompt and per response.

Every layout returns the same per-row tensors (`response_mask`, `rewards`, `ordered`, `ref_logps`) and `num_tokens`,
so the trainer's loss and metrics do not depend on the layout. `choose_layout` says which layouts a setting allows,
the cost model (`cost.py`: `layout_cost`, `layout_memory`) estimates each one's time and memory for a batch, and
`DataCollatorForAnyLayout` builds every batch in the cheapest allowed layout that fits the memory budget and can
take its rows (`prompt_sharing="auto"`). `sequences_per_response` turns a batch of
any layout into the padded layout's sequences (what `compute_metrics` sees). The cost model and its check against
measurements are in `docs/layouts.md`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from . import prompt_cache, shared_prompt
from .blockers import (
    Windows,
    attention_windows,
    cache_blocker,
    length_dependent_rope,
    mask_blocker,
    ranks_in_step,
    sharded_parameters,
    shared_blocker,
)
from .cost import LAYOUT_NAMES, ModelShape, cheapest, layout_cost, layout_memory
from .images import IMAGE_FIELDS, PER_TOKEN_FIELDS, DataCollatorForImageRows, has_images, images_blocker
from .padded import DataCollatorForKResponses, per_response_values
from .prompt_cache import (
    CALL_OVERHEAD_TOKENS,
    DataCollatorForPromptCache,
    response_owner,
)
from .shared_prompt import (
    NO_PROMPT_TOKEN,
    SUPPORTED_ATTENTION,
    DataCollatorForSharedPrompt,
    attention_mask_for,
    block_mask_for,
    dense_mask,
    reach_position,
)

# The layouts each `prompt_sharing` setting may use, in order of preference on equal cost. "auto": the cheapest
# allowed layout per batch; "on": the cheapest allowed layout that shares the prompt; "off", "mask", "cache": that
# layout (an error where it cannot work)
LAYOUTS_OF_SETTING = {
    "auto": ("cache", "mask", "padded"),
    "on": ("cache", "mask"),
    "off": ("padded",),
    "mask": ("mask",),
    "cache": ("cache",),
}
PROMPT_SHARING = tuple(LAYOUTS_OF_SETTING)

# Keys of a collated batch that go into the model's forward, by layout; the rest are for the loss and the metrics
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
CACHE_INPUTS = (
    "prompt_input_ids",
    "prompt_lengths",
    "response_input_ids",
    "response_lengths",
    "response_rows",
    "response_calls",
    "cache_plan",
)


@dataclass(frozen=True)
class LayoutChoice:
    """The layouts a setting allows (in order of preference on equal cost), and why the others are out."""

    allowed: tuple[str, ...]
    reasons: dict = field(default_factory=dict)


def choose_layout(
    prompt_sharing: str,
    attn_implementation: str,
    truncation_mode: str,
    router_loss: bool = False,
    cache_blocker: str | None = None,
    shared_blocker: str | None = None,
    mask_blocker: str | None = None,
    image_blockers: dict[str, str] | None = None,
) -> LayoutChoice:
    """The layouts a `prompt_sharing` setting allows on a model with `attn_implementation`.

    `mask` needs an attention implementation in `SUPPORTED_ATTENTION`; both prompt-sharing layouts need `keep_start`
    truncation and no MoE router loss (its load-balancing term reads a 2D attention mask), and are out for the reason
    `shared_blocker` gives, if any (prompt-learning PEFT, layers that are not attention, a prefix-LM); `cache` is also
    out for the reason `cache_blocker` gives, if any (reentrant gradient checkpointing, sharded parameters), and `mask`
    for the reason `mask_blocker` gives (windowed attention, no position ids, ALiBi); `image_blockers` rules out
    the layouts a vision-language model cannot take image rows in (`images_blocker`). A setting that names a layout
    which cannot work raises a `ValueError` with the reason.
    """
    if prompt_sharing not in PROMPT_SHARING:
        raise ValueError(f"`prompt_sharing` must be one of {PROMPT_SHARING}, got {prompt_sharing!r}.")
    reasons = {}
    if truncation_mode != "keep_start":
        shared_blocker = f"truncation_mode={truncation_mode!r} (prompt sharing supports 'keep_start')"
    elif router_loss:
        shared_blocker = "the model's MoE router loss is on, and its load-balancing term needs a 2D attention mask"
    if shared_blocker:
        reasons = {"mask": shared_blocker, "cache": shared_blocker}
    else:
        if attn_implementation not in SUPPORTED_ATTENTION:
            reasons["mask"] = (
                f"attn_implementation={attn_implementation!r} cannot take its custom 4D mask (supported: "
                f"{SUPPORTED_ATTENTION})"
            )
        elif mask_blocker:
            reasons["mask"] = mask_blocker
        if cache_blocker:
            reasons["cache"] = cache_blocker
    for name, reason in (image_blockers or {}).items():
        reasons.setdefault(name, f"rows with images: {reason}")
    wanted = LAYOUTS_OF_SETTING[prompt_sharing]
    allowed = tuple(name for name in wanted if name not in reasons)
    if not allowed:
        why = "; ".join(f"{name}: {reasons[name]}" for name in wanted)
        raise ValueError(f"prompt_sharing={prompt_sharing!r} is not possible here ({why}). Use 'auto' or 'off'.")
    return LayoutChoice(allowed, {name: reason for name, reason in reasons.items() if name in wanted})


def row_unfit_for(layout: str, example: dict[str, Any]) -> str | None:
    """Why `layout` cannot take this tokenized row, or None: the prompt-sharing layouts need a prompt token of the
    row's own (see `NO_PROMPT_TOKEN`); the padded layout takes every row."""
    if layout != "padded" and not example["prompt_ids"]:
        return NO_PROMPT_TOKEN
    return None


def make_collator(
    layout: str,
    *,
    pad_token_id: int,
    max_length: int | None,
    truncation_mode: str,
    pad_to_multiple_of,
    call_overhead: int = CALL_OVERHEAD_TOKENS,
    match_padded_positions: bool = False,
):
    """The collator of one layout name (`call_overhead`: a forward call's fixed cost in tokens, for the prompt-cache
    layout's grouping of responses into calls; `match_padded_positions`: see `DataCollatorForSharedPrompt`)."""
    if layout == "mask":
        return DataCollatorForSharedPrompt(
            pad_token_id=pad_token_id, max_length=max_length, pad_to_multiple_of=pad_to_multiple_of,
            match_padded_positions=match_padded_positions,
        )  # fmt: skip
    if layout == "cache":
        return DataCollatorForPromptCache(
            pad_token_id=pad_token_id,
            max_length=max_length,
            pad_to_multiple_of=pad_to_multiple_of,
            call_overhead_tokens=call_overhead,
        )
    return DataCollatorForKResponses(
        pad_token_id=pad_token_id,
        max_length=max_length,
        truncation_mode=truncation_mode,
        pad_to_multiple_of=pad_to_multiple_of,
    )


@dataclass
class DataCollatorForAnyLayout(DataCollatorMixin):
    """Build each batch in the cheapest of `collators` by `layout_cost` for its own lengths (ties: the first listed)
    among those that can take every row of it (`row_unfit_for`). `counts` records how many batches went to each
    layout."""

    collators: dict[str, Any]
    shape: ModelShape
    max_length: int | None = None
    return_tensors: str = "pt"
    counts: dict[str, int] = field(default_factory=dict)

    def choose(self, examples: list[dict[str, Any]]) -> str:
        budget = self.max_length

        def truncated(prompt, response):
            return response if budget is None else min(response, max(budget - prompt, 0))

        unfit = {}  # layout -> why it cannot take this batch (None: it can)
        for name in self.collators:
            unfit[name] = next(
                (f"row {i} of the batch: {why}" for i, e in enumerate(examples) if (why := row_unfit_for(name, e))),
                None,
            )
        if all(unfit.values()):
            raise ValueError(f"No layout of {tuple(unfit)} can take this batch ({'; '.join(unfit.values())}).")
        rows = [
            (len(e["prompt_ids"]), [truncated(len(e["prompt_ids"]), len(c)) for c in e["completion_ids"]])
            for e in examples
        ]
        fit = [name for name, why in unfit.items() if why is None]
        return cheapest(fit, rows, self.shape)

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        layout = self.choose(examples)
        self.counts[layout] = self.counts.get(layout, 0) + 1
        return self.collators[layout](examples)


def layout_of(batch: dict) -> str:
    """The layout a collated batch is in."""
    if "prompt_input_ids" in batch:
        return "cache"
    return "mask" if "segment_ids" in batch else "padded"


def sequences_per_response(batch: dict, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """A batch of any layout as the padded layout's `input_ids` and `attention_mask`: one prompt+response sequence per
    response, in row-major order of `response_mask`, right-padded. This is what `compute_metrics` sees, whatever the
    layout (as DPOTrainer shows it its chosen and rejected sequences)."""
    layout = layout_of(batch)
    if layout == "cache":
        sequences = prompt_cache.response_sequences(batch)
    elif layout == "mask":
        sequences = shared_prompt.response_sequences(batch)
    else:
        sequences = [ids[real.bool()] for ids, real in zip(batch["input_ids"], batch["attention_mask"])]
    real = [torch.ones_like(ids) for ids in sequences]
    return {
        "input_ids": pad(sequences, padding_value=pad_token_id, pad_to_multiple_of=pad_to_multiple_of),
        "attention_mask": pad(real, padding_value=0, pad_to_multiple_of=pad_to_multiple_of),
    }


def model_inputs(
    batch: dict, attn_implementation: str, mask_dtype: torch.dtype, windows: Windows | None = None
) -> dict:
    """The forward's keyword arguments for a collated batch: the prompt-cache layout's tensors, or the sequences
    with the shared-prompt layout's 4D mask in the form the attention implementation takes (boolean for `sdpa`,
    additive in `mask_dtype` for `eager`, a block mask for `flex_attention`), carrying the model's attention
    `windows` (`attention_windows`): in the one mask, or one mask per layer type."""
    if "prompt_input_ids" in batch:
        return {key: batch[key] for key in (*CACHE_INPUTS, "prompt_images") if key in batch}
    kwargs = {key: batch[key] for key in (*MODEL_INPUTS, *IMAGE_FIELDS, *PER_TOKEN_FIELDS) if key in batch}
    if "segment_ids" in batch:  # the shared-prompt layout: its mask is built here, where the ids are (the device)
        ids = batch["segment_ids"], batch["row_ids"], batch["position_ids"]

        def mask_of(window):
            if attn_implementation == "flex_attention":
                return block_mask_for(*ids, window=window)
            return attention_mask_for(dense_mask(*ids, window=window), attn_implementation, mask_dtype)

        if windows is not None and windows.by_type:
            masks = {window: mask_of(window) for window in set(windows.by_type.values())}  # one per distinct window
            kwargs["attention_mask"] = {kind: masks[window] for kind, window in windows.by_type.items()}
        else:
            kwargs["attention_mask"] = mask_of(None if windows is None else windows.window)
    return kwargs


__all__ = [
    "LAYOUTS_OF_SETTING",
    "LAYOUT_NAMES",
    "PROMPT_SHARING",
    "SUPPORTED_ATTENTION",
    "DataCollatorForAnyLayout",
    "DataCollatorForImageRows",
    "DataCollatorForKResponses",
    "DataCollatorForPromptCache",
    "DataCollatorForSharedPrompt",
    "LayoutChoice",
    "Windows",
    "attention_windows",
    "ModelShape",
    "cache_blocker",
    "choose_layout",
    "has_images",
    "images_blocker",
    "cheapest",
    "layout_cost",
    "layout_memory",
    "layout_of",
    "length_dependent_rope",
    "make_collator",
    "mask_blocker",
    "model_inputs",
    "ranks_in_step",
    "per_response_values",
    "reach_position",
    "response_owner",
    "row_unfit_for",
    "sequences_per_response",
    "shared_blocker",
    "sharded_parameters",
]
