"""The prompt-cache layout: each row's prompt is run once, and each of its responses runs on top of the prompt's keys
and values (reused, never recomputed), so no custom attention mask is needed and every attention implementation
works, `flash_attention_2` included.

A row becomes:

    prompt[:-1]                                  one forward, its keys and values kept (with their gradient)
    prompt[-1] r_k_0 .. r_k_n   for each k       one forward each, positions continuing the prompt's

Each response starts with a copy of the prompt's last token, so its own first hidden state predicts its first token
(as in the shared-prompt layout). Responses run in as few calls as pays (`plan_calls`): equal short ones as one
padded batch on the prompt's expanded keys and values, very unequal long ones on their own. With one call per
response the model computes `(P - 1) + sum_k (R_k + 1)` tokens for a row, the ideal plus one per response, and
attention costs about `sum_k R_k (P + R_k)` scores, against `K (P + R_max)` tokens and `K (P + R_max)^2` scores
padded. `trl_nca.scoring.add_response_head` runs the forwards, all inside one call of the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad

from .padded import per_response_values
from .shared_prompt import NO_PROMPT_TOKEN

# A forward call's fixed cost (Python, kernel launches, the LoRA adapters' small matmuls), in tokens of work: measured
# at about 64 on the 2-core CPU with SmolLM2 + LoRA; on a GPU a small model's forward is bound by kernel launches up
# to thousands of tokens (on an H200, the prompt-cache layout's second call cost as much as a whole 1,150-token padded
# step of SmolLM2), so there a call is worth 2,048 tokens (docs/layouts.md)
CALL_OVERHEAD_TOKENS = 64
CALL_OVERHEAD_TOKENS_BY_DEVICE = {"cpu": CALL_OVERHEAD_TOKENS, "cuda": 2048}


def call_overhead_tokens(device_type: str) -> int:
    """A forward call's fixed cost in tokens of work on this kind of device (the GPU's value off the CPU)."""
    return CALL_OVERHEAD_TOKENS_BY_DEVICE.get(device_type, CALL_OVERHEAD_TOKENS_BY_DEVICE["cuda"])


def plan_calls(lengths: list[int], overhead: int = CALL_OVERHEAD_TOKENS) -> list[int]:
    """Group a row's responses into forward calls on its prompt cache: each call runs its responses as one padded
    batch, costing `responses x (longest + 1)` tokens plus `overhead`. Returns the call of each response (numbered
    from 0), the grouping of the responses sorted by length that costs least (dynamic programming over the K + 1
    cut points): equal short responses share one call, very unequal long ones get their own.

    Example:
        >>> plan_calls([20, 22, 21, 20])
        [0, 0, 0, 0]
        >>> plan_calls([300, 120, 310, 30])
        [2, 1, 2, 0]
    """
    order = sorted(range(len(lengths)), key=lambda k: lengths[k])
    best = [0.0] + [float("inf")] * len(order)  # best[j]: cost of the j shortest responses
    cut = [0] * (len(order) + 1)
    for j in range(1, len(order) + 1):
        for i in range(j):  # responses i .. j-1 (sorted) in one call
            cost = best[i] + (j - i) * (lengths[order[j - 1]] + 1) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    calls, j, groups = [0] * len(lengths), len(order), []
    while j > 0:
        groups.append(order[cut[j] : j])
        j = cut[j]
    for call, group in enumerate(reversed(groups)):
        for k in group:
            calls[k] = call
    return calls


@dataclass(frozen=True)
class CachePlan:
    """The prompt-cache layout's plan on the host, as Python lists (`prompt_lengths` per row; `response_lengths`,
    `rows`, `calls` per response): the forward reads it instead of the device tensors of the same values, so that
    running the plan reads nothing back from the device."""

    prompt_lengths: list[int]
    response_lengths: list[int]
    rows: list[int]
    calls: list[int]


@dataclass
class DataCollatorForPromptCache(DataCollatorMixin):
    """Collate K-response rows in the prompt-cache layout (same inputs as `DataCollatorForKResponses`).

    Returns `prompt_input_ids` `(B, P_max)` and `prompt_lengths` `(B,)`; `response_input_ids` `(N, R_max + 1)`,
    each the prompt's last token then the response, `response_lengths` `(N,)` (response tokens, without the copy),
    `response_rows` `(N,)` (the row of each response) and `response_calls` `(N,)` (the forward call that runs it,
    from `plan_calls`, numbered across the batch), responses in row-major order of `response_mask`; the same plan on
    the host as `cache_plan` (a `CachePlan`, which the forward runs without reading the device); `num_tokens`,
    the tokens the model computes, padding of a call included; and the per-row `response_mask`, `rewards`,
    `ordered`, `ref_logps`. Each prompt+response is truncated to `max_length` from the end (`keep_start`), as in
    the other layouts.

    Example:
        >>> collator = DataCollatorForPromptCache(pad_token_id=0)
        >>> batch = collator([{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5], [6]], "rewards": [1.0, 0.0]}])
        >>> batch["prompt_input_ids"], batch["response_input_ids"]
        (tensor([[1, 2, 3]]), tensor([[3, 4, 5],
                [3, 6, 0]]))
        >>> batch["response_lengths"], batch["response_rows"], batch["response_calls"], batch["num_tokens"]
        (tensor([2, 1]), tensor([0, 0]), tensor([0, 0]), tensor(8))
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    call_overhead_tokens: int = CALL_OVERHEAD_TOKENS
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        prompts, responses, lengths, rows, calls = [], [], [], [], []
        num_tokens = 0
        for row, example in enumerate(examples):
            prompt = example["prompt_ids"]
            if not prompt:
                raise ValueError(f"The prompt-cache layout cannot take row {row} of the batch: {NO_PROMPT_TOKEN}.")
            budget = None if self.max_length is None else max(self.max_length - len(prompt), 0)
            prompts.append(torch.tensor(prompt))
            row_lengths = [len(completion[:budget]) for completion in example["completion_ids"]]
            row_calls = plan_calls(row_lengths, self.call_overhead_tokens)
            first_call = max(calls, default=-1) + 1
            for completion, call in zip(example["completion_ids"], row_calls):
                completion = completion[:budget]
                responses.append(torch.tensor([prompt[-1], *completion]))
                lengths.append(len(completion))
                rows.append(row)
                calls.append(first_call + call)
            num_tokens += (
                len(prompt)
                - 1
                + sum(
                    row_calls.count(call) * (max(n for n, c in zip(row_lengths, row_calls) if c == call) + 1)
                    for call in set(row_calls)
                )
            )

        def padded(sequences):
            return pad(sequences, padding_value=self.pad_token_id, pad_to_multiple_of=self.pad_to_multiple_of)

        batch = {
            "prompt_input_ids": padded(prompts),
            "prompt_lengths": torch.tensor([len(p) for p in prompts]),
            "response_input_ids": padded(responses),
            "response_lengths": torch.tensor(lengths),
            "response_rows": torch.tensor(rows),
            "response_calls": torch.tensor(calls),
            "cache_plan": CachePlan([len(p) for p in prompts], lengths, rows, calls),
            "num_tokens": torch.tensor(num_tokens),
        }
        batch.update(per_response_values(examples))
        return batch


def response_owner(batch: dict) -> torch.Tensor:
    """`(sum R_k,)`: the response index of each scored token, in the order the prompt-cache forward scores them."""
    lengths = batch["response_lengths"]
    plan = batch.get("cache_plan")
    # the total from the host's plan: without `output_size`, repeat_interleave reads it from the device
    total = None if plan is None else sum(plan.response_lengths)
    return torch.repeat_interleave(torch.arange(len(lengths), device=lengths.device), lengths, output_size=total)


def response_sequences(batch: dict) -> list[torch.Tensor]:
    """The prompt+response token ids of each response of a batch in this layout, in row-major order of
    `response_mask` (`layouts.sequences_per_response` pads them into the padded layout's sequences)."""
    sequences = []
    for n, row in enumerate(batch["response_rows"].tolist()):
        prompt = batch["prompt_input_ids"][row, : int(batch["prompt_lengths"][row]) - 1]
        sequences.append(torch.cat([prompt, batch["response_input_ids"][n, : int(batch["response_lengths"][n]) + 1]]))
    return sequences
