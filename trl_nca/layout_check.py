"""The layout check: a safety net for models that the architecture matrix (docs/architectures.md) does not list.

The blockers (`trl_nca.layouts.blockers`) keep a layout away from a model whose architecture it cannot express. For a
model they do not know (remote code, a newer architecture), the trainers compare every layout a run may use with the
model's own forward once, before anything reads a layout (the precomputed reference, an evaluation, the first
training step), and leave out what differs for the rest of the run. This module owns the whole check: when it runs,
on which rows, in which precision, how ranks agree, and what the trainers do with its verdict.

- **Every rank runs the same forwards.** The offline check runs on the first training rows of the dataset (the same
  on every rank); the online check on the first grouped batch of the main process, sent to every rank. Each step's
  verdict is gathered from every rank and merged before anything is decided, so every rank keeps the same layouts.
- **The run's own reference.** The model's own forward on the padded layout's rows, truncated as training truncates
  them, in eval mode (dropout off) and without gradient; offline, one padded row at a time through `logits_to_keep`
  (at most `REFERENCE_TOKENS` scored tokens a row: never the full logits of a batch); online, GRPO's own forward.
- **The model's own logit transform.** Before comparing, the offline check reads the transform between the model's
  head and its logits from the model that runs (`model_logit_transform`: a scale, a softcap, none), which a wrapped
  vision-language model may not apply though its text config names it.
- **Precision.** In float32 wherever the weights are float32 (autocast off for the check, whatever `bf16` says), so a
  wrong context cannot hide in half-precision rounding; per token, 1e-3 nats plus 1e-3 of the value. Weights in half
  precision (or quantized): per token, `HALF_TOLERANCE`.
- **Two questions.** Offline, first the head: the padded layout through the run's head against the model's own
  forward (if it differs, the other head is tried; if both differ, the run keeps TRL's fused head, as DPOTrainer
  computes it, and says that the model's forward does something of its own); then each other layout against the
  padded layout through that head. Online, each sharing layout against GRPO's forward.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from accelerate.utils import broadcast_object_list, extract_model_from_parallel, gather_object, is_peft_model

from .forward import response_token_logps
from .layouts import make_collator, row_unfit_for
from .scoring import LogitTransform, set_logit_transform

logger = logging.getLogger(__name__)

# Per token. Float32: far above float32 rounding of a log-probability (~1e-6 of the value) and far below a wrong
# context (tenths of a nat and more). Half precision: a bf16 logit rounds to 2^-8 of its value, and layouts round the
# body's activations in other orders.
FLOAT32_TOLERANCE = dict(atol=1e-3, rtol=1e-3)
HALF_TOLERANCE = dict(atol=1e-1, rtol=2e-2)
# Completion tokens of a row the offline reference scores (the last ones): bounds its logits to
# REFERENCE_TOKENS x vocabulary, whatever the length of the rows
REFERENCE_TOKENS = 256


def token_mismatch(values: torch.Tensor, expected: torch.Tensor, half: bool = False) -> str | None:
    """Where the per-token log-probabilities `values` differ from `expected` (same shape, flat) beyond the check's
    tolerance, in words; None where they agree."""
    values, expected = values.detach().float().flatten(), expected.detach().float().flatten()
    if values.shape != expected.shape:
        return f"{values.numel()} tokens scored where the reference scores {expected.numel()}"
    tolerance = HALF_TOLERANCE if half else FLOAT32_TOLERANCE
    gap = (values - expected).abs()
    bad = ~(gap <= tolerance["atol"] + tolerance["rtol"] * expected.abs())  # NaN counts as off
    if not bool(bad.any()):
        return None
    worst = int(gap.nan_to_num(float("inf")).argmax())
    return (
        f"{int(bad.sum())} of {bad.numel()} tokens off, the largest by {float(gap[worst]):.3g} nats "
        f"({float(values[worst]):.4g} against {float(expected[worst]):.4g})"
    )


def full_precision(model) -> bool:
    """Whether the check can run in float32: every floating parameter is float32 and nothing is quantized."""
    unwrapped = extract_model_from_parallel(model)
    if getattr(unwrapped, "is_quantized", False) or getattr(unwrapped, "quantization_method", None):
        return False
    return all(p.dtype == torch.float32 for p in unwrapped.parameters() if p.is_floating_point())


@contextlib.contextmanager
def checking(model, autocast):
    """The check's conditions: eval mode (dropout off: two dropout draws would differ for any layout), no gradient,
    and `autocast` (the run's, or none for a float32 check); the model's mode comes back after."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad(), autocast:
            yield
    finally:
        model.train(training)


def precision_of(model, run_autocast) -> tuple[contextlib.AbstractContextManager, bool]:
    """`(autocast, half)`: the check in float32 where the weights allow it, else under the run's autocast with the
    half-precision tolerance."""
    if full_precision(model):
        device = next(extract_model_from_parallel(model).parameters()).device.type
        return torch.autocast(device, enabled=False), False
    return run_autocast, True


def agree(found, accelerator):
    """Every rank's `found` (a dict of verdicts), merged: a verdict any rank reached holds on every rank (the first
    rank's words). Ranks check the same rows, so they agree unless rounding differs; merging makes sure of it."""
    if accelerator is None or accelerator.num_processes == 1:
        return dict(found)
    merged = {}
    for each in gather_object([found]):
        for key, value in each.items():
            merged.setdefault(key, value)
    return merged


# ---------------------------------------------------------------------------------------------------------------------
# The model's own logit transform


def _causal_lm(model):
    """The causal LM module under DDP/DeepSpeed wrappers and PEFT (the one `add_response_head` patched)."""
    model = extract_model_from_parallel(model)
    return model.get_base_model() if is_peft_model(model) else model


def model_logit_transform(model, token_ids: list[int]) -> tuple[LogitTransform | None, str | None]:
    """`(transform, None)`: how the model that runs turns its head's output into logits, found by running its own
    forward on `token_ids` with the head's output replaced by known, large values (so that a softcap binds) and
    matching the result against the scale and softcap its config names; `(None, why)` where the model's forward does
    something else between its body and its logits (math before its head, or after it that no candidate
    reproduces). A vision-language wrapper whose text config names a transform its own forward never applies gets
    the identity."""
    causal = _causal_lm(model)
    head = causal.get_output_embeddings()
    named = LogitTransform.of(causal.config)
    captured = {}

    def before(module, args):
        captured["input"] = args[0]

    def after(module, args, output):
        generator = torch.Generator().manual_seed(0)
        captured["output"] = (torch.randn(output.shape, generator=generator) * 20).to(output)
        return captured["output"]

    ids = torch.tensor([token_ids], device=next(causal.parameters()).device)
    hooks = [head.register_forward_pre_hook(before), head.register_forward_hook(after)]
    try:
        logits = causal(input_ids=ids).logits.float()
    finally:
        for hook in hooks:
            hook.remove()
    hidden = causal.base_model(input_ids=ids).last_hidden_state
    if not torch.allclose(captured["input"].float(), hidden.float(), rtol=1e-3, atol=1e-4):
        return None, (
            f"{type(causal).__name__}.forward changes the hidden states between its body and its LM head, which no "
            "head that starts from the body's output reproduces"
        )
    raw = captured["output"].float()
    candidates = dict.fromkeys([named, LogitTransform(1.0, named.softcap), LogitTransform(named.scale, None),
                                LogitTransform()])  # fmt: skip
    for candidate in candidates:
        if torch.allclose(candidate(raw), logits, rtol=1e-2, atol=1e-2):
            return candidate, None
    return None, (
        f"{type(causal).__name__}.forward turns its LM head's output into logits in a way of its own (not the "
        f"scale {named.scale} and softcap {named.softcap} its config names, nor either alone)"
    )


# ---------------------------------------------------------------------------------------------------------------------
# Offline: the first training rows in every layout


def own_forward_token_logps(model, padded: dict) -> tuple[torch.Tensor, list[int]]:
    """The model's own forward on each padded row (with its padding, so that the row sees what it sees in the padded
    batch), scoring only the last `REFERENCE_TOKENS` completion tokens of the row through `logits_to_keep`: `(values,
    index)`, the per-token log-probabilities and where each sits among the batch's completion tokens (row-major)."""
    causal = _causal_lm(model)
    prompt_learning = (
        is_peft_model(extract_model_from_parallel(model))
        and extract_model_from_parallel(model).active_peft_config.is_prompt_learning
    )
    # prompt-learning PEFT puts virtual tokens before the row, which `logits_to_keep` positions would not count
    takes_keep = "logits_to_keep" in inspect.signature(type(causal).forward).parameters and not prompt_learning
    values, index, first = [], [], 0
    for ids, real, completion in zip(padded["input_ids"], padded["attention_mask"], padded["completion_mask"]):
        positions = completion.nonzero().flatten()  # the completion's tokens, the last real ones of the row
        kept = positions[-REFERENCE_TOKENS:]
        logits = None
        if takes_keep:  # the logits that predict the kept tokens sit one position earlier
            try:
                logits = model(input_ids=ids[None], attention_mask=real[None], logits_to_keep=kept - 1).logits[0]
            except TypeError:  # a forward that takes `logits_to_keep` as a count only
                takes_keep = False
        if logits is None:  # prompt learning: the virtual positions come first; the row's are the last ones
            logits = model(input_ids=ids[None], attention_mask=real[None]).logits[0][-ids.size(0) :][kept - 1]
        scored = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[kept, None]).squeeze(-1)
        values.append(scored)
        index.extend(range(first + len(positions) - len(kept), first + len(positions)))
        first += len(positions)
    return torch.cat(values), index


def layout_token_logps(model, batch: dict, head: str, mask_dtype) -> torch.Tensor:
    """Per-token log-probabilities of every response token of a collated batch, response by response, in order."""
    outputs, owner = response_token_logps(model, batch, head=head, mask_dtype=mask_dtype, token_stats=False)
    # every layout gives a response's tokens in order; a stable sort by response puts responses in order too
    return outputs.log_probs.float()[torch.sort(owner, stable=True).indices]


@dataclass
class OfflineVerdict:
    """The check's outcome: the head to use, and the layouts left out with why (`head_note`: what the head step
    found, for the warning)."""

    head: str
    dropped: dict
    head_note: str | None = None


def check_offline(model, rows, collators: dict, padded_collator, *, head: str, heads: tuple, mask_dtype, autocast,
                  half: bool, accelerator=None) -> OfflineVerdict:  # fmt: skip
    """Check `collators` (name -> collator, the run's) on tokenized K-response `rows` against the model's own
    forward (see the module docstring). `padded_collator` builds the reference rows with the run's truncation;
    `heads` are the heads the model carries ("response", "fused"). Rows without a prompt token, which only the
    padded layout takes, are left out where another layout is checked."""
    device = next(_causal_lm(model).parameters()).device

    def on_device(batch):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}

    if any(row_unfit_for(name, row) is not None for name in collators for row in rows):
        rows = [row for row in rows if all(row_unfit_for(name, row) is None for name in collators)] or rows
    padded = on_device(padded_collator(rows))

    def through(name):
        return layout_token_logps(model, padded, name, mask_dtype)

    with autocast:
        expected, index = own_forward_token_logps(model, padded)
        reference = through(head)
        found = agree({head: why} if (why := token_mismatch(reference[index], expected, half)) else {}, accelerator)
        note = None
        if head in found:  # the other head, on every rank (the verdict is shared)
            other = next((name for name in heads if name != head), None)
            values = through(other) if other is not None else None
            why = None if values is None else token_mismatch(values[index], expected, half)
            tried = agree({other: why} if why else {}, accelerator)
            if values is not None and other not in tried:
                note = f"the {_HEAD_NAMES[head]} differs from the model's own forward ({found[head]}); using the " \
                       f"{_HEAD_NAMES[other]}"  # fmt: skip
                head, reference = other, values
            else:  # what DPOTrainer computes: TRL's fused head
                note = f"neither LM head gives the model's own log-probabilities ({found[head]}); using the " \
                       f"{_HEAD_NAMES['fused']}, as DPOTrainer does"  # fmt: skip
                if head != "fused" and values is not None:
                    head, reference = "fused", values
        dropped = {}
        if head != "response":
            dropped["cache"] = "it runs the response-only head, which differs from the model's own forward"
        for name, collator in collators.items():
            if name == "padded" or name in dropped:
                continue
            values = layout_token_logps(model, on_device(collator(rows)), head, mask_dtype)
            if why := token_mismatch(values, reference, half):
                dropped[name] = why
        dropped = agree(dropped, accelerator)
    return OfflineVerdict(head, {name: why for name, why in dropped.items() if name in collators}, note)


_HEAD_NAMES = {"response": "response-only LM head", "fused": "TRL fused LM head"}


def run_offline_check(trainer, model) -> None:
    """The offline trainers' layout check, once per trainer (`_KResponseTrainer`): called before the reference
    precompute, an evaluation and training, with the model about to be used (a DeepSpeed engine, the policy). Updates
    the trainer's head and its collators (the dict its batch collator chooses from) from the verdict."""
    if trainer._layout == "user" or trainer._images or trainer._layouts_checked:
        return
    trainer._layouts_checked = True
    args = trainer.args
    padded_collator = trainer._collators.get("padded") or make_collator(
        "padded", pad_token_id=trainer._tokenizer.pad_token_id, max_length=args.max_length,
        truncation_mode=args.truncation_mode, pad_to_multiple_of=args.pad_to_multiple_of,
    )  # fmt: skip
    dataset = trainer.train_dataset
    if dataset is None:  # an evaluation without a training set: its rows
        dataset = trainer.eval_dataset
        dataset = next(iter(dataset.values())) if isinstance(dataset, dict) else dataset
    rows = []
    for row in dataset:
        rows.append({key: row[key] for key in ("prompt_ids", "completion_ids", "rewards")})
        if len(rows) >= args.per_device_train_batch_size:
            break
    autocast, half = precision_of(model, trainer.accelerator.autocast())
    with checking(model, contextlib.nullcontext()):
        transform, why_not = model_logit_transform(model, _probe_tokens(rows))
        if transform is not None:
            for each in (trainer.model, trainer.ref_model):
                if each is not None:
                    set_logit_transform(_causal_lm(each), transform)
        verdict = check_offline(
            model, rows, trainer._collators, padded_collator, head=trainer._head,
            heads=("response", "fused"), mask_dtype=trainer._mask_dtype(), autocast=autocast, half=half,
            accelerator=trainer.accelerator,
        )  # fmt: skip
    if verdict.head_note:
        said = f" ({why_not})" if why_not else ""
        logger.warning(f"Layout check: {verdict.head_note}{said}; it is used for the rest of the run.")
    trainer._head = verdict.head
    if not verdict.dropped:
        return
    kept = [name for name in trainer._collators if name not in verdict.dropped]
    said = "; ".join(f"'{name}': {why}" for name, why in verdict.dropped.items())
    if not kept:
        raise ValueError(
            f"Layout check: prompt_sharing={args.prompt_sharing!r} gives other log-probabilities than the padded "
            f"layout (the model's own forward) on the first training rows ({said}). Use prompt_sharing='auto' or "
            "'off'."
        )
    logger.warning(f"Layout check: {said}. Left out for the rest of the run; training with {', '.join(kept)}.")
    for name in verdict.dropped:
        del trainer._collators[name]  # the same dict the batch collator chooses from


def _probe_tokens(rows) -> list[int]:
    """A few real token ids to run the transform probe on."""
    tokens = [t for row in rows for t in row["prompt_ids"] + [t for c in row["completion_ids"] for t in c]]
    return tokens[:4] or [0]


# ---------------------------------------------------------------------------------------------------------------------
# Online: every sharing layout against GRPO's own forward, on the same rows on every rank


class _InCheck:
    """The trainer as GRPO's forward sees it during the online check: its accelerator's autocast is the check's
    (already entered: float32 where the weights allow it), everything else the trainer's."""

    def __init__(self, trainer):
        self._trainer = trainer
        self.accelerator = SimpleNamespace(autocast=contextlib.nullcontext)

    def __getattr__(self, name):
        return getattr(self._trainer, name)


def grpo_forward(trainer, model, ids, mask, logits_to_keep) -> torch.Tensor:
    """GRPOTrainer's own per-token log-probabilities of GRPO rows, in the check's precision."""
    from trl import GRPOTrainer

    method = GRPOTrainer._get_per_token_logps_and_entropies
    method = getattr(method, "__wrapped__", method)  # TRL's profiling decorator
    return method(_InCheck(trainer), model, ids, mask, logits_to_keep)[0]


def run_online_check(trainer, model, host: torch.Tensor, logits_to_keep: int) -> None:
    """The online layout check (`PromptSharingMixin`), at the first grouped forward of the run, which every rank
    reaches at the same call: the main process's first rows (`host`, `[ids | mask]`, one micro-batch's worth) go to
    every rank, each allowed layout groups them and is compared with GRPO's own forward, in eval mode and without
    gradient; a layout that differs on any rank is left out on every rank (all of them: GRPO's forward for the rest
    of the run)."""
    from .group_forward import DataCollatorForAnyLayout, grouped_per_token

    trainer._group_checked = True
    accelerator = trainer.accelerator
    shared = [host, logits_to_keep]
    if accelerator.num_processes > 1:
        broadcast_object_list(shared, from_process=0)
    host, logits_to_keep = shared
    device = next(_causal_lm(model).parameters()).device
    width = host.size(1) // 2
    host = host[host[:, width : 2 * width - logits_to_keep].bool().any(1)]  # rows with a prompt token
    ids, mask = host[:, :width].to(device), host[:, width:].to(device)
    collator = trainer._group_collator
    collators = (
        collator.collators if isinstance(collator, DataCollatorForAnyLayout) else {trainer._group_layouts[0]: collator}
    )
    autocast, half = precision_of(model, accelerator.autocast())
    found, checked = {}, False
    with checking(model, autocast):
        expected = grpo_forward(trainer, model, ids, mask, logits_to_keep)
        # rows whose prompt has no left padding: there GRPO's positions are generation's for every model (GRPO
        # counts left pads into the positions of absolute-position models, docs/architectures.md)
        compared = (mask[:, -logits_to_keep:] * mask[:, :1]).bool()
        for name, each in collators.items():
            if name == "padded":  # `auto`'s padded layout is GRPO's own forward
                continue
            grouped = grouped_per_token(
                model, each, ids, mask, logits_to_keep, head=trainer._group_head, token_stats=False, host=host,
                match_positions=trainer._group_positions,
            )  # fmt: skip
            if grouped is None:  # a row without a prompt token: nothing this layout can be checked on
                continue
            checked = True
            if why := token_mismatch(grouped[0][compared], expected[compared], half):
                found[name] = why
    found = agree(found, accelerator)
    if not checked:  # the same on every rank (the same rows): checked at the next grouped forward instead
        trainer._group_checked = False
        return
    if not found:
        return
    kept = {name: each for name, each in collators.items() if name not in found}
    said = "; ".join(f"'{name}': {why}" for name, why in found.items())
    if set(kept) - {"padded"}:
        logger.warning(f"Layout check: {said}; left out for the rest of the run, keeping {', '.join(kept)}.")
        for name in found:
            del collators[name]
        return
    logger.warning(
        f"prompt_sharing={trainer.prompt_sharing!r}: the grouped forward differs from GRPO's on the first batch "
        f"({said}); this model is trained with GRPO's forward for the rest of the run."
    )
    trainer._group_collator = None
