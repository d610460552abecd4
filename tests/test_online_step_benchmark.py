"""benchmarks/online_step.py's GRPO-schedule step (`--steps_per_generation N`): one generation per N micro-batches,
each micro-batch a different part of it, whole groups for trl-nca's trainers and GRPO's own split for GRPOTrainer."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import build_model

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
import online_step  # noqa: E402


@pytest.mark.parametrize("method", ["grpo", "psgrpo"])
def test_a_scheduled_step_generates_once_and_hands_out_every_row(method, tokenizer, monkeypatch):
    k, prompts, n = 4, 2, 4
    rollout = online_step.random_rollout(6, 5, len(tokenizer), seed=1)
    trainer = online_step.build(method, build_model(tokenizer), tokenizer, k, prompts, 6, 5, rollout,
                                torch.device("cpu"), steps_per_generation=n)  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    generations = []
    original = trainer._generate_and_score_completions
    monkeypatch.setattr(trainer, "_generate_and_score_completions",
                        lambda rows: generations.append(1) or original(rows))  # fmt: skip
    rows = [trainer.train_dataset[i // k] for i in range(k * prompts)]
    for _ in range(2):  # two generations' worth
        micro_batches = online_step.scheduled_step(trainer, rows, n)
        seen = [tuple(r) for batch in micro_batches for r in batch["completion_ids"].tolist()]
        assert len(micro_batches) == n and len(set(seen)) == k * prompts  # every completion once
    assert len(generations) == 2
    prompts_per_batch = [len({tuple(r) for r in b["prompt_ids"].tolist()}) for b in micro_batches]
    if method == "psgrpo":
        assert prompts_per_batch == [1] * n  # K / (rows per micro-batch) = 2 micro-batches per group, one prompt each
