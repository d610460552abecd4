"""One forward of a collated K-response batch, in any layout, to the log-probabilities of its response tokens.

Shared by the offline trainers (`_KResponseTrainer._sequence_logps`), the layout check (`trl_nca.layout_check`) and
the architecture matrix of the tests, so that what is checked is what trains.
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel

from .layouts import attention_windows, layout_of, model_inputs, response_owner
from .scoring import ResponseHeadOutput, at_positions


def response_token_logps(model, inputs: dict, *, head: str, mask_dtype: torch.dtype, **forward_kwargs):
    """`(outputs, owner)`: the head's per-token outputs (`ResponseHeadOutput`, flat over the scored tokens) of a
    collated batch and each scored token's response (row-major order of `response_mask`). `head` is `"response"`
    (`trl_nca.scoring`'s head, which `model` must carry: `add_response_head`) or `"fused"` (TRL's, which `model` must
    carry: `add_fused_lm_head`); the prompt-cache layout always runs ours. `forward_kwargs` go to the forward
    (`output_router_logits`, `token_stats`, `entropy_grad`). A batch with `label_positions` (`scored_positions`,
    made on the host) picks its scored tokens by those indices, not by a boolean mask, whose size a GPU would have to
    send back to the host first."""
    unwrapped = extract_model_from_parallel(model)
    windows = attention_windows(unwrapped)[0] if "segment_ids" in inputs else None
    kwargs = model_inputs(inputs, unwrapped.config._attn_implementation, mask_dtype, windows) | forward_kwargs
    if layout_of(inputs) == "cache":
        return model(**kwargs, response_head=True), response_owner(inputs)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    owners = inputs["response_ids"][:, 1:]  # the response each next-token label belongs to
    positions = inputs.get("label_positions")
    if head == "response":
        if positions is not None:
            outputs = model(**kwargs, labels=labels, response_head=True, label_positions=positions)
            return outputs, at_positions(owners, positions)
        outputs = model(**kwargs, labels=labels, response_head=True)
        # prompt tuning prepends virtual positions (never labelled) to `labelled`: keep the real ones
        return outputs, owners[outputs.labelled[:, -owners.size(1) :]]
    kwargs.pop("entropy_grad", None)  # TRL's head: its own outputs (entropy and is_top1 for the policy)
    kwargs.pop("token_stats", None)
    fused = model(**kwargs, labels=labels, use_cache=False, fused_lm_head=True)
    scored = owners >= 0

    def flat(values):  # prompt-learning PEFT prepends virtual tokens: keep the real positions
        # None: a reference model's fused head computes log-probabilities only (DPOTrainer)
        if values is None:
            return None
        return values[:, -owners.size(1) :][scored] if positions is None else at_positions(values, positions)

    outputs = ResponseHeadOutput(
        log_probs=flat(fused.log_probs), entropy=flat(fused.entropy), is_top1=flat(fused.is_top1),
        aux_loss=fused.aux_loss,
    )  # fmt: skip
    return outputs, flat(owners)


def sum_by_response(values: torch.Tensor, owner: torch.Tensor, num_responses: int) -> torch.Tensor:
    """Per-token `values` summed by response, `(num_responses,)`."""
    return values.new_zeros(num_responses).index_add(0, owner, values)
