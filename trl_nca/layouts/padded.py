"""The padded layout: a batch of K-response rows -> one padded tensor of sum(K_i) prompt+response sequences."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin
from trl.trainer.utils import pad


@dataclass
class DataCollatorForKResponses(DataCollatorMixin):
    """Flatten the K_i responses of every row into one right-padded batch of prompt+response sequences.

    Each example holds `prompt_ids` (list of ints), `completion_ids` (K_i lists of ints), `rewards` (K_i floats) and,
    when precomputed, `ref_logps` (K_i floats). The sequences come row by row, response by response, so sequence n
    is the n-th True entry of `response_mask` in row-major order: `logps_bk[response_mask] = logps_flat` puts every
    log-probability back at its (prompt, response) slot; `num_tokens` counts the real (not padding) tokens.
    `response_ids` gives, for each completion token, the index
    of its response (-1 elsewhere); the trainer sums per-token log-probabilities by it, so a layout that puts several
    responses in one sequence (`DataCollatorForSharedPrompt`) slots in behind the same trainer code.

    Each prompt+response is truncated to `max_length` before padding, as in TRL's `DataCollatorForPreference`.

    Example:
        >>> collator = DataCollatorForKResponses(pad_token_id=0)
        >>> batch = collator([
        ...     {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5], [6]], "rewards": [1.0, 0.5, 0.0]},
        ...     {"prompt_ids": [7], "completion_ids": [[8, 9], [10]], "rewards": [0.0, 2.0]},
        ... ])
        >>> batch["input_ids"]
        tensor([[ 1,  2,  3,  0],
                [ 1,  2,  4,  5],
                [ 1,  2,  6,  0],
                [ 7,  8,  9,  0],
                [ 7, 10,  0,  0]])
        >>> batch["completion_mask"]
        tensor([[0, 0, 1, 0],
                [0, 0, 1, 1],
                [0, 0, 1, 0],
                [0, 1, 1, 0],
                [0, 1, 0, 0]])
        >>> batch["response_mask"]
        tensor([[ True,  True,  True],
                [ True,  True, False]])
        >>> batch["rewards"]
        tensor([[1.0000, 0.5000, 0.0000],
                [0.0000, 2.0000, 0.0000]])
    """

    pad_token_id: int
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    pad_to_multiple_of: int | None = None
    return_tensors: str = "pt"

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.truncation_mode == "keep_start":
            window = slice(None, self.max_length)
        elif self.truncation_mode == "keep_end":
            window = slice(-self.max_length, None) if self.max_length is not None else slice(None)
        else:
            raise ValueError(
                f"Unsupported truncation mode {self.truncation_mode!r}, expected 'keep_start' or 'keep_end'"
            )

        input_ids, completion_mask = [], []
        for example in examples:
            prompt = example["prompt_ids"]
            for completion in example["completion_ids"]:
                input_ids.append(torch.tensor((prompt + completion)[window]))
                completion_mask.append(torch.tensor(([0] * len(prompt) + [1] * len(completion))[window]))
        attention_mask = [torch.ones_like(ids) for ids in input_ids]

        # Sequence n holds response n: only its completion tokens carry its index
        response_ids = [torch.where(mask.bool(), n, -1) for n, mask in enumerate(completion_mask)]

        def padded(sequences, value):
            return pad(
                sequences, padding_value=value, padding_side="right", pad_to_multiple_of=self.pad_to_multiple_of
            )

        batch = {
            "input_ids": padded(input_ids, self.pad_token_id),
            "attention_mask": padded(attention_mask, 0),
            "completion_mask": padded(completion_mask, 0),
            "response_ids": padded(response_ids, -1),
            "num_tokens": torch.tensor(sum(len(ids) for ids in input_ids)),
        }
        batch.update(per_response_values(examples))
        return batch


def per_response_values(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The per-row tensors of a batch, shared by every layout: `(B, K)` `response_mask` (True = a real response),
    `rewards`, and `ref_logps` when the rows carry precomputed reference log-probabilities (padded slots hold 0); and
    `(B,)` `ordered` (True for rows whose responses are listed best first, see `trl_nca.losses.soft_labels`)."""
    counts = [len(example["completion_ids"]) for example in examples]
    num_responses = torch.tensor(counts)
    response_mask = torch.arange(max(counts))[None, :] < num_responses[:, None]

    def values(key: str) -> torch.Tensor:
        out = torch.zeros(response_mask.shape, dtype=torch.float32)
        out[response_mask] = torch.tensor([v for example in examples for v in example[key]], dtype=torch.float32)
        return out

    batch = {
        "response_mask": response_mask,
        "rewards": values("rewards"),
        "ordered": torch.tensor([bool(example.get("ordered", False)) for example in examples]),
    }
    if "ref_logps" in examples[0]:
        batch["ref_logps"] = values("ref_logps")
    return batch
