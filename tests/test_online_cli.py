"""`trl-nca online` and the recipes in recipes/online/: parsing, 2 CPU steps on a tiny model, errors."""

import json
import math
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_model, build_tokenizer
from online_helpers import prompts_dataset

from trl_nca import cli
from trl_nca.scripts.online import main, make_parser

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "online"
ONLINE_RECIPES = sorted(RECIPES.glob("*.yaml"))
# What a GPU recipe changes to run on CPU (recipes/README.md), and a tiny model, data and reward
CPU = ["--bf16", "false", "--use_cpu", "true", "--dtype", "float32", "--gradient_checkpointing", "false"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("online_cli")
    tokenizer = build_tokenizer()
    build_model(tokenizer, hidden_size=64).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    prompts_dataset(8).to_json(root / "prompts.jsonl")
    return root


def tiny_run(tiny, output_dir, *extra):
    return [*CPU, "--model_name_or_path", str(tiny / "tiny"), "--dataset_name", str(tiny / "prompts.jsonl"),
            "--reward_funcs", "online_helpers:length_reward", "--max_steps", "2", "--per_device_train_batch_size", "4",
            "--num_generations", "2", "--max_completion_length", "6", "--logging_steps", "1", "--save_strategy", "no",
            "--report_to", "none", "--output_dir", str(output_dir), *extra]  # fmt: skip


@pytest.mark.parametrize("recipe", ONLINE_RECIPES, ids=lambda p: p.name)
def test_online_recipe_parses_runs_two_cpu_steps_and_says_how_to_run(recipe, tiny, tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    keys = set(yaml.safe_load(recipe.read_text()))
    assert keys <= {action.dest for action in make_parser()._actions}, "unknown keys"
    assert any("trl-nca online" in line or "-m trl_nca online" in line for line in recipe.read_text().splitlines()[:6])
    script_args, args, model_args, dataset_args = make_parser().parse_args_and_config(
        ["--config", str(recipe), *tiny_run(tiny, tmp_path), "--lora_target_modules", "q_proj", "v_proj"]
    )[:4]
    assert args.reference in {"sampler", "initial"} and args.beta > 0 and args.num_generations == 2
    trainer = main(script_args, args, model_args, dataset_args)
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and logs[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert (tmp_path / "adapter_config.json").exists()


def test_online_command_end_to_end_and_its_errors(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    assert cli.main(["online", *tiny_run(tiny, tmp_path / "a", "--objective", "infonca")]) == 0
    out = capsys.readouterr().out
    assert "OnlineInfoNCA training finished" in out and "steps:              2" in out
    assert (tmp_path / "a" / "config.json").exists()

    def error(*argv):
        assert cli.main(["online", *argv]) == 2
        return [line for line in capsys.readouterr().err.splitlines() if line.startswith("trl-nca: error:")]

    without_reward = [a for a in tiny_run(tiny, tmp_path / "b") if a != "online_helpers:length_reward"]
    without_reward.remove("--reward_funcs")
    assert error(*without_reward) == [
        "trl-nca: error: --reward_funcs is required: 'module:function', 'module.function' or a reward model folder "
        "(repeatable)"
    ]
    assert error(*tiny_run(tiny, tmp_path / "c", "--reward_funcs", "nowhere:reward")) == [
        "trl-nca: error: Reward 'nowhere:reward': cannot import module 'nowhere' (No module named 'nowhere'): a "
        f"reward module is looked for in the current folder ({Path.cwd()}), then on the import path"
    ]
    assert error(*tiny_run(tiny, tmp_path / "d", "--num_generations", "1")) == [
        "trl-nca: error: `num_generations` (and `num_generations_eval`) must be at least 2: NCA and InfoNCA contrast "
        "the completions of a prompt; got num_generations=1, num_generations_eval=None."
    ]


CWD_REWARDS = """
def length_score(prompts, completions, **kwargs):
    return [len(c[0]["content"] if isinstance(c, list) else c) / 10 for c in completions]


def first_letter(prompts, completions, **kwargs):
    return [float((c[0]["content"] if isinstance(c, list) else c)[:1] in "aeiou") for c in completions]
"""


def test_online_finds_a_reward_module_in_the_current_folder_in_both_spellings(tiny, tmp_path, monkeypatch, capsys):
    """As `trl grpo`: `my_module.py` where the command runs is found (the console script's import path has its own
    folder first, not the current one), named `module:function` or TRL's `module.function`."""
    (tmp_path / "cwd_rewards_online.py").write_text(CWD_REWARDS)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(Path.cwd()))])
    monkeypatch.chdir(tmp_path)
    argv = tiny_run(tiny, tmp_path / "out", "--reward_funcs", "cwd_rewards_online:length_score",
                    "cwd_rewards_online.first_letter")  # fmt: skip
    assert cli.main(["online", *argv]) == 0
    logs = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert {"rewards/length_score/mean", "rewards/first_letter/mean"} <= set(logs[0])
    capsys.readouterr()
    # a missing module is one line naming the spec, in either spelling
    for spec in ("cwd_missing:score", "cwd_missing.score"):
        assert cli.main(["online", *tiny_run(tiny, tmp_path / "x", "--reward_funcs", spec)]) == 2
        assert capsys.readouterr().err.splitlines() == [
            f"trl-nca: error: Reward '{spec}': cannot import module 'cwd_missing' (No module named 'cwd_missing'): a "
            f"reward module is looked for in the current folder ({tmp_path}), then on the import path"
        ]
