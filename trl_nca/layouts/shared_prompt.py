"""The shared-prompt layout: each row's prompt is encoded once for all of its K responses.

A row becomes one segment of a sequence:

    prompt[:-1] | prompt[-1] r1_0 .. r1_n | prompt[-1] r2_0 .. r2_m | ...

Every response segment starts with a copy of the prompt's last token at the prompt's last position, so the ordinary
shifted labels of TRL's fused LM head score each response's first token from the same context as separate forwards.
Position ids restart at that position for every response. The attention mask lets each response see the prompt and,
causally, its own tokens, never another response. The collator sends no mask: it sends per-token segment and row ids
(O(tokens)), and the forward builds the mask from them on the batch's device (`dense_mask`, or a FlexAttention block
mask), so the host neither builds nor copies an O(tokens^2) tensor per forward. Rows are one per sequence by
default: dense-mask backends (`sdpa`, `eager`) pay for every masked score, so packing rows into one sequence makes
attention quadratic in the packed length (measured slower than padding, see `docs/layouts.md`). `pack_rows=True`
puts all rows into one sequence, block-diagonal: an option for users who build their own batches with a kernel that
skips masked blocks; the trainers keep one row per sequence.

Compared with the padded layout, a row costs `len(prompt) + sum(len(r_k) + 1) - 1` tokens instead of
`K * (len(prompt) + max_k len(r_k))`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
from transformers.data.data_collator import DataCollatorMixin

from .padded import per_response_values

# Attention implementations checked against separate forwards in the tests: `sdpa` and `eager` take a dense 4D mask
# (`eager` adds it to the scores, so it gets the additive form, see `attention_mask_for`); `flex_attention` takes a
# block mask built from the segment ids (`block_mask_for`), which skips fully masked blocks, so packing rows pays off.
SUPPORTED_ATTENTION = ("sdpa", "eager", "flex_attention")

# Why a row without prompt tokens cannot share its prompt. DPO's prompt/completion boundary is where the tokenized
# prompt and prompt+response diverge; when the prompt's last tokens merge with the responses' first ones (BPE), the
# prompt can be left with none, and these layouts have no prompt token to start each response from
NO_PROMPT_TOKEN = (
    "the prompt keeps no token of its own (its last tokens merge with the first tokens of its responses), and the "
    "prompt-sharing layouts start each response from the prompt's last token; the padded layout takes such rows"
)


@dataclass
class DataCollatorForSharedPrompt(DataCollatorMixin):
    """Collate K-response rows in the shared-prompt layout (same inputs as `DataCollatorForKResponses`).

    Returns `input_ids` and `position_ids` `(S, L)`, `completion_mask`, `padding_mask` (1 = a real token),
    `response_ids` (for each response token, the index of its response in row-major order of `response_mask`, -1
    elsewhere), `segment_ids` (0 = prompt, k + 1 = response k, -1 = padding) and `row_ids` (the row within the
    sequence, -1 = padding), from which the forward builds the attention mask (`dense_mask`, `block_mask_for`), and
    the `(B, K)`
    `response_mask`, `rewards` and (when precomputed) `ref_logps`. Each prompt+response is truncated to `max_length`
    from the end (`keep_start`), as in the padded layout, so both layouts score the same tokens.

    Example:
        >>> collator = DataCollatorForSharedPrompt(pad_token_id=0)
        >>> batch = collator([{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5], [6]], "rewards": [1.0, 0.0]}])
        >>> batch["input_ids"], batch["position_ids"]
        (tensor([[1, 2, 3, 4, 5, 3, 6]]), tensor([[0, 1, 2, 3, 4, 2, 3]]))
        >>> batch["response_ids"]
        tensor([[-1, -1, -1,  0,  0, -1,  1]])
        >>> dense_mask(batch["segment_ids"], batch["row_ids"])[0, 0].int()
        tensor([[1, 0, 0, 0, 0, 0, 0],
                [1, 1, 0, 0, 0, 0, 0],
                [1, 1, 1, 0, 0, 0, 0],
                [1, 1, 1, 1, 0, 0, 0],
                [1, 1, 1, 1, 1, 0, 0],
                [1, 1, 0, 0, 0, 1, 0],
                [1, 1, 0, 0, 0, 1, 1]], dtype=torch.int32)
    """

    pad_token_id: int
    max_length: int | None = None
    pad_to_multiple_of: int | None = None
    pack_rows: bool = False
    # For rotary embeddings whose frequencies follow a forward's largest position (`length_dependent_rope`): give
    # the batch the largest position of the padded layout's batch of the same rows, as a padding token's position
    match_padded_positions: bool = False
    return_tensors: str = "pt"

    def _row(self, example: dict, first_response: int, index: int) -> dict[str, torch.Tensor]:
        prompt = example["prompt_ids"]
        if not prompt:
            raise ValueError(f"The shared-prompt layout cannot take row {index} of the batch: {NO_PROMPT_TOKEN}.")
        shared = len(prompt) - 1
        budget = None if self.max_length is None else max(self.max_length - len(prompt), 0)
        answers = [answer[:budget] for answer in example["completion_ids"]]
        # Per-token values by tensor ops over the segments (the host's time per token is what collation costs): a
        # segment is the prompt's last token and one answer
        lengths = torch.tensor([len(answer) + 1 for answer in answers], dtype=torch.long)
        total = sum(len(answer) + 1 for answer in answers)
        segment = torch.repeat_interleave(torch.arange(1, len(answers) + 1), lengths, output_size=total)
        starts = torch.cumsum(lengths, 0) - lengths
        offset = torch.arange(total) - torch.repeat_interleave(starts, lengths, output_size=total)
        first = offset == 0  # a segment's copy of the prompt's last token: not a response token
        response = (first_response + segment - 1).masked_fill(first, -1)
        zeros = torch.zeros(shared, dtype=torch.long)
        return {
            "tokens": torch.tensor(
                list(itertools.chain(prompt[:-1], *([prompt[-1], *a] for a in answers))), dtype=torch.long
            ),  # fmt: skip
            "positions": torch.cat([torch.arange(shared), shared + offset]),
            "segments": torch.cat([zeros, segment]),
            "completion": torch.cat([zeros, (~first).long()]),
            "response": torch.cat([zeros - 1, response]),
        }

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        rows, first = [], 0
        for index, example in enumerate(examples):
            rows.append(self._row(example, first, index))
            first += len(example["completion_ids"])
        groups = [rows] if self.pack_rows else [[row] for row in rows]

        lengths = [sum(len(row["tokens"]) for row in group) for group in groups]
        length = max(lengths)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        shape = (len(groups), length)
        input_ids = torch.full(shape, self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros(shape, dtype=torch.long)
        completion_mask = torch.zeros(shape, dtype=torch.long)
        padding_mask = torch.zeros(shape, dtype=torch.long)
        response_ids = torch.full(shape, -1, dtype=torch.long)
        segment_ids = torch.full(shape, -1, dtype=torch.long)
        row_ids = torch.full(shape, -1, dtype=torch.long)
        for s, group in enumerate(groups):
            start = 0
            for r, row in enumerate(group):
                n = len(row["tokens"])
                span = slice(start, start + n)
                input_ids[s, span] = row["tokens"]
                position_ids[s, span] = row["positions"]
                completion_mask[s, span] = row["completion"]
                response_ids[s, span] = row["response"]
                padding_mask[s, span] = 1
                segment_ids[s, span] = row["segments"]
                row_ids[s, span] = r
                start += n
            # padding keeps position 0: a position there could raise the batch's largest position id, which
            # length-dependent rotary embeddings (dynamic, longrope) read to choose their frequencies for every row

        batch = {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "completion_mask": completion_mask,
            "padding_mask": padding_mask,
            "response_ids": response_ids,
            "segment_ids": segment_ids,
            "row_ids": row_ids,
            "num_tokens": padding_mask.sum(),
        }
        batch.update(per_response_values(examples))
        if self.match_padded_positions:  # the padded layout's width, its positions running 0 .. width - 1
            width = max(len(e["prompt_ids"]) + len(c) for e in examples for c in e["completion_ids"])
            width = width if self.max_length is None else min(width, self.max_length)
            if self.pad_to_multiple_of:
                width = -(-width // self.pad_to_multiple_of) * self.pad_to_multiple_of
            batch = reach_position(batch, width - 1, self.pad_token_id)
        return batch


def reach_position(batch: dict, position: int, pad_token_id: int) -> dict:
    """A shared-prompt batch whose largest position id is at least `position`: where it is smaller, one padding
    column whose first token has that position (a padding token attends only to itself, and nothing attends to it).
    For rotary embeddings whose frequencies follow a forward's largest position id (`length_dependent_rope`)."""
    if int(batch["position_ids"].max()) >= position:
        return batch
    column = {"input_ids": pad_token_id, "position_ids": 0, "completion_mask": 0, "padding_mask": 0,
              "response_ids": -1, "segment_ids": -1, "row_ids": -1}  # fmt: skip
    out = dict(batch)
    for key, value in column.items():
        tensor = batch[key]
        out[key] = torch.cat([tensor, tensor.new_full((tensor.size(0), 1), value)], dim=1)
    out["position_ids"][0, -1] = position
    return out


def response_sequences(batch: dict) -> list[torch.Tensor]:
    """The prompt+response token ids of each response of a batch in this layout, in row-major order of
    `response_mask` (`layouts.sequences_per_response` pads them into the padded layout's sequences)."""
    ids, segments, rows = batch["input_ids"], batch["segment_ids"], batch["row_ids"]
    sequences = []
    for s in range(ids.size(0)):
        for row in rows[s][rows[s] >= 0].unique().tolist():
            in_row = rows[s] == row
            prompt = ids[s][in_row & (segments[s] == 0)]  # all but its last token, which starts each segment
            for segment in range(1, int(segments[s][in_row].max()) + 1):
                sequences.append(torch.cat([prompt, ids[s][in_row & (segments[s] == segment)]]))
    return sequences


def dense_mask(
    segment_ids: torch.Tensor,
    row_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """The shared-prompt layout's boolean 4D mask `(S, 1, L, L)` (True = may attend), built where the ids are (on the
    GPU in training): a token sees, causally, the tokens of its own row that are in the prompt (segment 0) or in its
    own response; padding sees itself only, so that no attention row is empty (an empty row gives NaN in sdpa).
    `window`: a sliding window as transformers applies it, counted in positions (a token sees the keys less than
    `window` positions before it): a response token sees the end of the prompt, as in its own sequence."""
    length = segment_ids.size(1)
    query_row, key_row = row_ids[:, :, None], row_ids[:, None, :]
    query_segment, key_segment = segment_ids[:, :, None], segment_ids[:, None, :]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    visible = (key_segment == 0) | (key_segment == query_segment)
    real = (query_row >= 0) & (query_row == key_row) & causal & visible
    if window is not None:
        real &= position_ids[:, None, :] > position_ids[:, :, None] - window
    padding = (query_row < 0) & torch.eye(length, dtype=torch.bool, device=segment_ids.device)
    return (real | padding)[:, None]


def attention_mask_for(mask: torch.Tensor, attn_implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """The 4D mask in the form an attention implementation takes: boolean for `sdpa`, additive (0 where attending,
    the dtype's minimum elsewhere) for `eager`, which adds the mask to the scores and is silently wrong with a
    boolean one."""
    if mask.dtype != torch.bool or attn_implementation != "eager":
        return mask
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def block_mask_for(
    segment_ids: torch.Tensor,
    row_ids: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
):
    """The FlexAttention block mask of the shared-prompt layout: same row, causal, and the key in the prompt or in the
    query's own response (and within `window` positions, as `dense_mask`); padding attends to itself. Fully masked
    blocks (other rows, other responses, keys past the window) are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q_idx, kv_idx):
        query_row, key_row = row_ids[b, q_idx], row_ids[b, kv_idx]
        key_segment = segment_ids[b, kv_idx]
        visible = (key_segment == 0) | (key_segment == segment_ids[b, q_idx])
        real = (query_row >= 0) & (query_row == key_row) & (kv_idx <= q_idx) & visible
        return real | ((query_row < 0) & (q_idx == kv_idx))

    def windowed_mask_mod(b, h, q_idx, kv_idx):
        in_window = (position_ids[b, kv_idx] > position_ids[b, q_idx] - window) | (row_ids[b, q_idx] < 0)
        return mask_mod(b, h, q_idx, kv_idx) & in_window

    sequences, length = segment_ids.shape
    function = mask_mod if window is None else windowed_mask_mod
    return create_block_mask(function, sequences, None, length, length, device=segment_ids.device)
