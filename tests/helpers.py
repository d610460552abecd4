"""Shared builders for trainer tests: CPU float32 configs and small datasets."""

from __future__ import annotations

import copy

import pytest
from datasets import Dataset
from transformers import TrainerCallback
from trl import DPOConfig, DPOTrainer

from trl_nca import NCAConfig

# CPU runs must be float32: DPOConfig's bf16 default trains ~12x slower on this kind of CPU (docs/layouts.md)
CPU = dict(
    use_cpu=True,
    bf16=False,
    gradient_checkpointing=False,
    report_to=[],
    save_strategy="no",
    logging_steps=1,
    disable_tqdm=True,
    seed=0,
    per_device_train_batch_size=4,
    per_device_eval_batch_size=4,
    learning_rate=1e-2,
    max_steps=1,
)


def nca_args(tmp_path, **overrides) -> NCAConfig:
    return NCAConfig(output_dir=str(tmp_path / "out"), **{**CPU, "beta": 0.5, "reward_temperature": 0.0, **overrides})


def dpo_args(tmp_path, **overrides) -> DPOConfig:
    return DPOConfig(output_dir=str(tmp_path / "dpo"), **{**CPU, "beta": 0.5, **overrides})


def user(text):
    return [{"role": "user", "content": text}]


def assistant(text):
    return [{"role": "assistant", "content": text}]


QUESTIONS = [
    "What is two plus two?",
    "Name a colour of the sky.",
    "Write a poem about the sea.",
    "Hello, who are you?",
]
ANSWERS = [
    "four",
    "The sky is blue.",
    "The sea and the wind and the stars.",
    "I am an assistant.",
    "three",
    "green grass",
    "hello world",
    "Paris is the capital of France.",
]


def pairwise_dataset(conversational: bool = True, tied_scores: bool = False) -> Dataset:
    """DPO pairs; `tied_scores` gives every row `score_chosen == score_rejected`, as some binarized rows have."""
    rows = []
    for i, question in enumerate(QUESTIONS):
        chosen, rejected = ANSWERS[i], ANSWERS[-1 - i]
        if conversational:
            row = {"prompt": user(question), "chosen": assistant(chosen), "rejected": assistant(rejected)}
        else:
            row = {"prompt": question + " ", "chosen": chosen, "rejected": rejected}
        if tied_scores:
            row.update(score_chosen=5.0 + i, score_rejected=5.0 + i)
        rows.append(row)
    return Dataset.from_list(rows)


def k_response_dataset(counts=(4, 2, 3, 4, 3, 2, 4, 4)) -> Dataset:
    """Conversational rows with a different number of responses each (ragged K) and distinct rewards."""
    rows = []
    for i, k in enumerate(counts):
        answers = [ANSWERS[(i + j) % len(ANSWERS)] * (1 + (i + j) % 3) for j in range(k)]
        rows.append(
            {
                "prompt": user(QUESTIONS[i % len(QUESTIONS)] * (1 + i % 2)),
                "completions": [assistant(a) for a in answers],
                "rewards": [float((3 * i + 5 * j) % 7) for j in range(k)],
            }
        )
    return Dataset.from_list(rows)


def dpo_and_ours(ours_cls, loss_type, data, tokenizer, model, other_model, tmp_path, **overrides):
    """DPOTrainer and one of ours on the same data, each with its own copy of the same policy and reference."""

    def build(cls, args):
        return cls(
            model=copy.deepcopy(model),
            ref_model=copy.deepcopy(other_model),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )

    return build(DPOTrainer, dpo_args(tmp_path, loss_type=loss_type)), build(ours_cls, nca_args(tmp_path, **overrides))


def first_batch_loss_and_grads(trainer):
    """The loss of one batch of all training rows, and the gradient of every parameter."""
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    # parameters outside the loss (e.g. a LLaVA tower's last layers) have no gradient
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


class StopAt(TrainerCallback):
    """Stops training after optimizer step `step` (a run cut short, to resume from its checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def deepspeed_or_skip() -> None:
    """The DeepSpeed tests are skipped only where DeepSpeed cannot be imported (`make install` builds it)."""
    try:
        import deepspeed  # noqa: F401
    except Exception as error:  # an ImportError, or whatever a broken build raises on import
        pytest.skip(
            f"DeepSpeed cannot be imported ({type(error).__name__}: {error}); `make install` builds it from its "
            "source archive against the installed torch (DS_BUILD_OPS=0, no build isolation)"
        )
