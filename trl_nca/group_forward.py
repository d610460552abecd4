"""GRPO's per-token forward, run through the K-response layouts: each prompt of a batch encoded once for its group.

GRPOTrainer computes every log-probability it uses (the policy's in the loss, the old and the reference ones after
generation) with `_get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep, ...)`, on
rows of `[left-padded prompt | right-padded completion]`, one row per completion: a prompt with K completions is
encoded K times in each of these forwards. `PromptSharingMixin` replaces that method: the rows are grouped by prompt
(rows with the same prompt tokens, wherever they sit in the batch), each group becomes a K-response row, and the
offline trainers' layouts encode it (`trl_nca.layouts`: the padded layout, the prompt once with the completions after
it under a 4D mask, or the prompt once and each completion on its keys and values), chosen per batch by the same cost
model, with the response-only LM head (`trl_nca.scoring`, at GRPO's sampling temperature). The per-token
log-probabilities and entropies come back in GRPO's `(rows, logits_to_keep)` shape, so the rest of GRPO (old
log-probabilities, importance sampling, the completions table, metrics) is unchanged. Positions past a completion's
last real token hold 0 (GRPO's hold values that every use masks out).

Batches GRPO's forward passes image inputs to, and the MoE router loss (its load-balancing term reads a 2D mask), go
to GRPO's own forward. `prompt_sharing` has the offline meaning (`auto`, `on`, `off`, `mask`, `cache`); `off` is
GRPO's forward itself.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from accelerate.utils import is_peft_model
from transformers.utils import logging
from trl import GRPOTrainer
from trl.trainer.utils import split_pixel_values_by_grid, split_tensor_dict, unsplit_pixel_values_by_grid

from .forward import response_token_logps
from .layout_check import run_online_check
from .layouts import (
    DataCollatorForAnyLayout,
    ModelShape,
    cache_blocker,
    choose_layout,
    length_dependent_rope,
    make_collator,
    mask_blocker,
    ranks_in_step,
    reach_position,
    sharded_parameters,
    shared_blocker,
)
from .layouts.cost import device_memory_budget
from .online_groups import shuffle_groups
from .scoring import add_response_head, head_choice, scored_positions

logger = logging.get_logger(__name__)


def group_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, logits_to_keep: int):
    """`(examples, members)`: GRPO's rows grouped by prompt. `examples` are K-response rows for the layouts' collators
    (`prompt_ids`, `completion_ids`: the real tokens, at least one, since a completion that GRPO masks whole keeps one
    token here, whose value is masked out downstream; placeholder `rewards`), `members[i]` the batch rows of example
    i in response order. None when a row has no prompt token: its first completion token has no context of its own,
    and GRPO's forward scores it from a padding position, which no layout reproduces (that batch goes to GRPO's
    forward). One read of the device (`group_host_rows` groups rows already on the host)."""
    return group_host_rows(_on_host(input_ids, attention_mask), logits_to_keep)


def _on_host(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    # one read of the device for ids and mask together (each read waits for the device's queue to drain)
    return torch.cat([input_ids, attention_mask.to(input_ids.dtype)], dim=1).cpu()


def group_host_rows(both: torch.Tensor, logits_to_keep: int):
    """`group_rows` of a host tensor `[ids | mask]` `(rows, 2 L)`."""
    width = both.size(1) // 2
    prompt_length = width - logits_to_keep
    rows = both.tolist()
    ids, mask = [row[:width] for row in rows], [[bool(v) for v in row[width:]] for row in rows]
    groups: dict[tuple[int, ...], int] = {}
    examples, members = [], []
    for b, (row, real) in enumerate(zip(ids, mask)):
        prompt = tuple(t for t, keep in zip(row[:prompt_length], real[:prompt_length]) if keep)
        if not prompt:
            return None
        length = max(sum(real[prompt_length:]), 1)
        completion = row[prompt_length : prompt_length + length]
        if prompt not in groups:
            groups[prompt] = len(examples)
            examples.append({"prompt_ids": list(prompt), "completion_ids": [], "rewards": []})
            members.append([])
        example = examples[groups[prompt]]
        example["completion_ids"].append(completion)
        example["rewards"].append(0.0)
        members[groups[prompt]].append(b)
    return examples, members


def fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """A 0-d int64 checksum of a batch's real tokens and their places, computed where the tensors are (the same value
    on the host and on the device; no wrap-around: ids < 2^24, weights < 2^20, under 2^19 tokens)."""
    rows, width = input_ids.shape
    device = input_ids.device
    weights = (torch.arange(1, rows + 1, device=device)[:, None] * 7919 + torch.arange(1, width + 1, device=device)
               * 104729) % 1048573  # fmt: skip
    return (input_ids.long() * attention_mask.long() * weights).sum()


@dataclass
class GroupPlan:
    """One micro-batch's rows on the host, copied once per generation (`plan_micro_batches`): its `[ids | mask]`, the
    shape and `logits_to_keep` it was made for, and its `fingerprint`, which the forward checks on the device against
    the rows it is given (an asynchronous assert: no sync)."""

    host: torch.Tensor
    shape: tuple[int, int]
    logits_to_keep: int
    fingerprint: int


def plan_micro_batches(batches: list[dict]) -> list[GroupPlan]:
    """The `GroupPlan` of every micro-batch of a generation, from one read of the device for all of them."""

    def rows_of(batch):
        return (torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
                torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1))  # fmt: skip

    pairs = [rows_of(batch) for batch in batches]
    host = _on_host(torch.cat([ids for ids, _ in pairs]), torch.cat([mask for _, mask in pairs]))
    plans, start = [], 0
    for (ids, _), batch in zip(pairs, batches, strict=True):
        part = host[start : start + ids.size(0)]
        start += ids.size(0)
        width = ids.size(1)
        plans.append(GroupPlan(part, tuple(ids.shape), batch["completion_ids"].size(1),
                               int(fingerprint(part[:, :width], part[:, width:]))))  # fmt: skip
    return plans


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on `device`; to a GPU from pinned memory without blocking, so that the host goes on preparing
    while the copy runs (the collators' tensors are O(tokens): pinning them is cheap)."""
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def per_token(values: torch.Tensor, owner: torch.Tensor, order: list[int], shape) -> torch.Tensor:
    """Scatter the flat per-token `values` of the layout's responses (`owner`: each value's response, tokens of a
    response in order) into GRPO's `shape` `(rows, logits_to_keep)`; response n is batch row `order[n]`."""
    out = values.new_zeros(shape)
    rows = _to_device(torch.tensor(order), values.device)[owner]
    # each response's token count by a scatter-add, not `bincount` (which reads its input's maximum on the host)
    starts = torch.zeros(len(order) + 1, dtype=torch.long, device=values.device)
    starts[1:] = (
        torch.zeros(len(order), dtype=torch.long, device=values.device)
        .index_add_(0, owner, torch.ones_like(owner))
        .cumsum(0)
    )
    columns = torch.arange(len(owner), device=values.device) - starts[owner]
    return out.index_put((rows, columns), values)


class PromptSharingMixin:
    """Put in front of `GRPOTrainer` (or a subclass) to encode each prompt once per group in all its forwards; call
    `_install_prompt_sharing(prompt_sharing)` at the end of `__init__`."""

    def _install_prompt_sharing(self, prompt_sharing: str) -> None:
        self.prompt_sharing = prompt_sharing
        self._group_collator = None
        if prompt_sharing == "off":
            return
        unwrapped = self.accelerator.unwrap_model(self.model)
        choice = choose_layout(
            prompt_sharing,
            unwrapped.config._attn_implementation,
            "keep_start",
            router_loss=False,  # batches with the router loss go to GRPO's forward
            cache_blocker=cache_blocker(
                unwrapped,
                self.args,
                sharded=sharded_parameters(self),
                ranks_in_step=ranks_in_step(self),
                setting=prompt_sharing,
            ),
            shared_blocker=shared_blocker(unwrapped),
            mask_blocker=mask_blocker(unwrapped),
        )
        if prompt_sharing == "auto" and choice.reasons:
            said = "; ".join(f"'{name}' is out: {reason}" for name, reason in choice.reasons.items())
            logger.warning(f"Layouts for prompt_sharing='auto': {', '.join(choice.allowed)} ({said}).")
        pad = self.processing_class.pad_token_id if hasattr(self.processing_class, "pad_token_id") else None
        pad = pad if pad is not None else self._tokenizer.pad_token_id
        shape = ModelShape.of(
            unwrapped, self.accelerator.device.type, memory_budget=device_memory_budget(self.accelerator.device)
        )
        collators = {
            name: make_collator(name, pad_token_id=pad, max_length=None, truncation_mode="keep_start",
                                pad_to_multiple_of=None, call_overhead=shape.call_overhead_tokens)
            for name in choice.allowed
        }  # fmt: skip
        self._group_collator = (
            DataCollatorForAnyLayout(collators, shape) if len(collators) > 1 else next(iter(collators.values()))
        )
        self._group_layouts = choice.allowed
        self._group_positions = length_dependent_rope(unwrapped.config) is not None
        # The LM head as the offline trainers choose it: TRL's fused head on CUDA (GRPOTrainer puts it on the policy
        # and the reference; it keeps less memory there), ours elsewhere, where TRL's scores every position
        self._group_head, why = head_choice(unwrapped, self.accelerator.device)
        named = "trl-nca response-only" if self._group_head == "response" else "TRL fused"
        logger.info(f"Grouped forward's LM head: {named} ({why}).")
        for model in (self.model, getattr(self, "ref_model", None)):
            if model is not None:
                model = self.accelerator.unwrap_model(model)
                add_response_head(
                    model.get_base_model() if is_peft_model(model) else model,
                    self.temperature,
                    cast_lm_head_to_fp32=self.args.cast_lm_head_to_fp32,
                )
        self._group_checked = False

    # Replaces GRPOTrainer._prepare_inputs (TRL 1.16.0): the generation batch shuffled by whole groups instead of by
    # completion (`_shuffles_groups`), so that each micro-batch holds whole groups and a prompt is encoded once in it;
    # the rest is GRPO's buffering
    def _prepare_inputs(self, generation_batch):
        if not (self.model.training and self._shuffles_groups()):
            return super()._prepare_inputs(generation_batch)
        generate_every = self.args.steps_per_generation * self.num_iterations
        if self._step % generate_every == 0 or self._buffered_inputs is None:
            batch = self._generate_and_score_completions(generation_batch)
            batch = shuffle_groups(split_pixel_values_by_grid(batch), self._shuffle_unit(len(generation_batch)))
            batches = split_tensor_dict(batch, self.args.steps_per_generation)
            self._buffered_inputs = [unsplit_pixel_values_by_grid(b) for b in batches]
            # Group once per generation: every micro-batch's plan from one read, for its policy forward(s) in every
            # iteration (a plan belongs to these buffered inputs only: a resumed buffer is grouped per forward)
            self._buffered_plans = (self._buffered_inputs, self._plans_for(self._buffered_inputs))
        index = self._step % self.args.steps_per_generation
        plans_for, plans = getattr(self, "_buffered_plans", (None, None))
        self._next_plan = plans[index] if plans is not None and plans_for is self._buffered_inputs else None
        return self._buffered_inputs[index]

    def _plans_for(self, batches: list[dict]) -> list[GroupPlan] | None:
        text_only = all(b.get(name) is None for b in batches for name in ("pixel_values", "image_grid_thw"))
        if self._group_collator is None or not text_only or "prompt_ids" not in batches[0]:
            return None
        return plan_micro_batches(batches)

    def _shuffles_groups(self) -> bool:
        """Whether micro-batches hold whole groups: where prompts are shared (GRPO's per-completion shuffle leaves
        1-3 completions of a prompt per micro-batch at steps_per_generation=4, K=8, and little to share)."""
        return self.prompt_sharing != "off"

    def _shuffle_unit(self, size: int) -> int:
        # Whole groups where a process holds whole groups; where a group spans processes, its completions are
        # shuffled one by one, as GRPO does
        return self.num_generations if size % self.num_generations == 0 else 1

    # Replaces GRPOTrainer._get_per_token_logps_and_entropies (TRL 1.16.0) for text batches
    def _get_per_token_logps_and_entropies(
        self, model, input_ids, attention_mask, logits_to_keep, batch_size=None, compute_entropy=False,
        compute_aux_loss=False, **multimodal,
    ):  # fmt: skip
        def grpo():
            return super(PromptSharingMixin, self)._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal,
            )  # fmt: skip

        # The plan `_prepare_inputs` made for this micro-batch, for its policy forward (the one with gradients)
        plan, self._next_plan = (getattr(self, "_next_plan", None) if torch.is_grad_enabled() else None), None
        if self._group_collator is None or compute_aux_loss or any(v is not None for v in multimodal.values()):
            return grpo()
        batch_size = batch_size or input_ids.size(0)
        if plan is not None and (plan.shape != tuple(input_ids.shape) or plan.logits_to_keep != logits_to_keep
                                 or batch_size < input_ids.size(0)):  # fmt: skip
            plan = None  # not the micro-batch it was made for, or not in one piece
        # the rows on the host: the plan's copy, or one read for every chunk of this call (old and reference
        # forwards get the whole generation batch, in chunks of `batch_size`)
        host = plan.host if plan is not None else _on_host(input_ids, attention_mask)
        if not self._group_checked:  # the layout check, once, before any layout is read (every rank is here now)
            run_online_check(self, model, host[:batch_size], logits_to_keep)
            if self._group_collator is None:
                return grpo()
        logps, entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            chunk = slice(start, start + batch_size)
            with self.accelerator.autocast():
                grouped = grouped_per_token(
                    model, self._group_collator, input_ids[chunk], attention_mask[chunk], logits_to_keep,
                    head=self._group_head, token_stats=compute_entropy,
                    entropy_grad=compute_entropy and torch.is_grad_enabled(), host=host[chunk],
                    expect=None if plan is None else plan.fingerprint, match_positions=self._group_positions,
                )  # fmt: skip
            if grouped is None:  # a row without prompt tokens, or nothing to share (the cost model picked padded):
                # GRPO's forward for this chunk alone (one forward per chunk either way, as on every other rank)
                grouped = super()._get_per_token_logps_and_entropies(
                    model, input_ids[chunk], attention_mask[chunk], logits_to_keep, None, compute_entropy, False,
                )  # fmt: skip
            logps.append(grouped[0])
            entropies.append(grouped[1])
        logps, entropies = torch.cat(logps), (torch.cat(entropies) if compute_entropy else None)
        return logps, (entropies if compute_entropy else None), None


def grouped_per_token(
    model,
    collator,
    input_ids,
    attention_mask,
    logits_to_keep,
    *,
    head="response",
    token_stats=True,
    entropy_grad=False,
    host: torch.Tensor | None = None,
    expect: int | None = None,
    match_positions: bool = False,
):
    """GRPO's per-token log-probabilities and entropies `(rows, logits_to_keep)` of a batch of GRPO rows
    (`[left-padded prompt | right-padded completion]`), with each prompt encoded once per group in the layout
    `collator` builds; None (GRPO's forward takes the batch) when a row has no prompt token (`group_rows`), or when
    `auto`'s cost model picks the padded layout, which is GRPO's forward. `model` carries `add_response_head`.
    `token_stats=False`: no entropies (None), for the old and reference forwards. `head`: `"response"` (ours) or
    `"fused"` (the fused head GRPOTrainer puts on its policy and reference: its entropies are GRPO's own); the
    prompt-cache layout always runs ours. `host`: the rows already on the host (`[ids | mask]`), so that this forward
    reads nothing from the device; `expect`: their `fingerprint`, checked on the device without a sync.
    `match_positions`: give the shared-prompt layout GRPO's largest position id (`length_dependent_rope`)."""
    grouped = group_host_rows(_on_host(input_ids, attention_mask) if host is None else host, logits_to_keep)
    if expect is not None:
        torch._assert_async(
            fingerprint(input_ids, attention_mask) == expect,
            "trl-nca: the grouped forward was given other rows than the micro-batch its plan was made for",
        )
    if grouped is None:
        return None
    examples, members = grouped
    if isinstance(collator, DataCollatorForAnyLayout) and collator.choose(examples) == "padded":
        # nothing to share: GRPO's own forward computes the same tokens, without collation and with TRL's head
        collator.counts["grpo"] = collator.counts.get("grpo", 0) + 1
        return None
    batch = collator(examples)
    if match_positions and "segment_ids" in batch:  # GRPO's forward's largest position: its rows' width - 1
        batch = reach_position(batch, input_ids.size(1) - 1, collator.pad_token_id)
    if "completion_mask" in batch:  # the scored positions as indices, from the host (no size read on the device)
        batch["label_positions"] = scored_positions(batch["completion_mask"])
    batch = {k: _to_device(v, input_ids.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    outputs, owner = response_token_logps(
        model, batch, head=head, mask_dtype=torch.float32, token_stats=token_stats, entropy_grad=entropy_grad
    )
    order = [b for group in members for b in group]
    shape = (input_ids.size(0), logits_to_keep)
    entropy = None if outputs.entropy is None else per_token(outputs.entropy, owner, order, shape)
    return per_token(outputs.log_probs, owner, order, shape), entropy


class PromptSharingGRPOTrainer(PromptSharingMixin, GRPOTrainer):
    """TRL's `GRPOTrainer`, with each prompt encoded once per group in its policy, old and reference forwards
    (`prompt_sharing`, default `"auto"`; see `trl_nca.group_forward`). The loss, the advantages, generation and every
    `GRPOConfig` field are GRPO's: how the per-token log-probabilities are computed changes, equal to GRPO's within
    float tolerance, and the generation batch is shuffled by whole groups rather than by completion, so that each
    micro-batch holds whole groups (the same completions train, in another split over the micro-batches; with
    `prompt_sharing="off"` GRPO's order is kept)."""

    def __init__(self, *args, prompt_sharing: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self._install_prompt_sharing(prompt_sharing)
