"""Shared builders for trainer tests: CPU float32 configs and small datasets."""

from __future__ import annotations

from datasets import Dataset
from trl import DPOConfig

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


def pairwise_dataset(conversational: bool = True) -> Dataset:
    rows = []
    for i, question in enumerate(QUESTIONS):
        chosen, rejected = ANSWERS[i], ANSWERS[-1 - i]
        if conversational:
            rows.append({"prompt": user(question), "chosen": assistant(chosen), "rejected": assistant(rejected)})
        else:
            rows.append({"prompt": question + " ", "chosen": chosen, "rejected": rejected})
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
