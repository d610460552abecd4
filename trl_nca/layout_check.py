"""The layout check: a safety net for models that the architecture matrix (docs/architectures.md) does not list.

The blockers (`trl_nca.layouts.blockers`) keep a layout away from a model whose architecture it cannot express
(windowed attention, convolution or recurrent layers, ...). For a model they do not know (remote code, a newer
architecture), the first time a run would use a layout other than the model's own forward, the trainers compare it
with the model's own forward on the same rows, once: the offline trainers on their first training rows, every allowed
layout against the model's plain forward and full logits (`check_layouts`); the online trainers on their first
grouped forward, against GRPO's own forward. A layout that differs beyond tolerance is reported and left out for the
rest of the run. It costs one more forward per allowed layout, with no gradient, when training starts.
"""

from __future__ import annotations

import torch

from .forward import response_token_logps, sum_by_response
from .layouts import row_unfit_for

# Tolerances of the check. Float32: per token, far above float32 rounding of a log-probability (~1e-6 relative) and
# far below a wrong context (tenths of a nat and more). Half precision: per sequence, relative to its summed
# log-probability, as layouts differ by bf16 rounding of every activation.
FLOAT32_TOLERANCE = dict(atol=1e-3, rtol=1e-3)
HALF_TOLERANCE = dict(atol=0.1, rtol=2e-2)


def layout_mismatch(values, expected, completion_mask=None, low_precision: bool = False) -> str | None:
    """Where `values` differ from `expected` (log-probabilities: per token `(rows, T)` with `completion_mask`, or
    per sequence `(N,)`) beyond the check's tolerance, in words; None where they agree."""
    values, expected = values.detach().float(), expected.detach().float()
    if completion_mask is not None:
        mask = completion_mask.bool().to(values.device)
        if low_precision:  # compare whole sequences
            values, expected = (values * mask).sum(-1), (expected * mask).sum(-1)
        else:
            values, expected = values[mask], expected[mask]
    tolerance = HALF_TOLERANCE if low_precision else FLOAT32_TOLERANCE
    gap = (values - expected).abs()
    bad = gap > tolerance["atol"] + tolerance["rtol"] * expected.abs()
    if not bool(bad.any()):
        return None
    worst = int(gap.argmax())
    return (
        f"{int(bad.sum())} of {bad.numel()} values off, the largest by {float(gap[worst]):.3g} nats "
        f"({float(values[worst]):.4g} against {float(expected[worst]):.4g})"
    )


def own_forward_logps(model, padded_batch: dict) -> torch.Tensor:
    """Each response's summed log-probability `(N,)` from the model's plain forward and full logits, on a batch of
    the padded layout: the reference every layout must give."""
    logits = model(input_ids=padded_batch["input_ids"], attention_mask=padded_batch["attention_mask"]).logits
    log_probs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    labels = padded_batch["input_ids"][:, 1:]
    per_token = log_probs.gather(-1, labels[..., None]).squeeze(-1)
    return (per_token * padded_batch["completion_mask"][:, 1:]).sum(-1)


def check_layouts(model, rows, collators: dict, *, head: str, mask_dtype, low_precision: bool) -> dict[str, str]:
    """`{layout: why}` for each layout of `collators` (name -> collator, `"padded"` among them) whose log-probabilities
    of `rows` (tokenized K-response rows) differ from the model's own forward; `head` is the head the layouts run
    with (the prompt-cache layout always runs the response-only head). Rows without a prompt token, which only the
    padded layout takes, are left out where another layout is checked."""
    if any(row_unfit_for(name, row) is not None for name in collators for row in rows):
        shareable = [row for row in rows if all(row_unfit_for(name, row) is None for name in collators)]
        rows, collators = (shareable, collators) if shareable else (rows, {"padded": collators["padded"]})
    padded = collators["padded"](rows)
    device = next(model.parameters()).device
    on_device = {name: _to(collator(rows), device) for name, collator in collators.items()}
    with torch.no_grad():
        expected = own_forward_logps(model, _to(padded, device))
        found = {}
        for name, batch in on_device.items():
            outputs, owner = response_token_logps(model, batch, head=head, mask_dtype=mask_dtype, token_stats=False)
            values = sum_by_response(outputs.log_probs.float(), owner, int(batch["response_mask"].sum()))
            if mismatch := layout_mismatch(values, expected, low_precision=low_precision):
                found[name] = mismatch
    return found


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
