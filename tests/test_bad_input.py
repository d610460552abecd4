"""Bad input, meaningless settings and interrupted runs: a clear error that says what and where, or a safe recovery.

One section per class of failure; every message names what is wrong and where (row and column, file and line,
function and prompt, checkpoint).
"""

import json
import math
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import build_model, build_tokenizer
from datasets import Dataset, IterableDataset
from helpers import CPU, assistant, dpo_args, k_response_dataset, nca_args, user
from transformers import AutoModelForCausalLM

from trl_nca import NCAConfig, NCATrainer
from trl_nca.generation import build_reward_dataset
from trl_nca.scripts.prepare import prepare_rows

GOOD = {
    "prompt": user("What is two plus two?"),
    "completions": [assistant("four"), assistant("five")],
    "rewards": [1, 0],
}


def trainer_on(rows, tokenizer, model, tmp_path, **overrides):
    data = rows if isinstance(rows, (Dataset, IterableDataset)) else Dataset.from_list(rows)
    return NCATrainer(
        model=model, args=nca_args(tmp_path, **overrides), train_dataset=data, processing_class=tokenizer
    )


# --- Silent wrong training: settings and values under which the objective means nothing -------------------------


@pytest.mark.parametrize(
    "field, value",
    [("beta", 0.0), ("beta", -0.1), ("beta", math.nan), ("beta", math.inf), ("reward_temperature", math.nan),
     ("reward_temperature", math.inf), ("reward_temperature", -1.0)],
)  # fmt: skip
def test_meaningless_beta_or_temperature_is_refused(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        NCAConfig(output_dir=str(tmp_path), **{**CPU, field: value})


def test_a_dpo_config_with_a_negative_beta_is_refused_by_the_trainer(tokenizer, model, tmp_path):
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0, got -0.5"):
        NCATrainer(model=model, args=dpo_args(tmp_path, beta=-0.5), train_dataset=Dataset.from_list([GOOD]))


@pytest.mark.parametrize(
    "rewards, message",
    [
        ([1e39, 0.0], r"Row 1, column 'rewards\[0\]': reward 1e\+39 overflows float32"),
        (
            [1e8 + 1, 1e8],
            r"Row 1, column 'rewards': rewards 100000001.0 and 100000000.0 differ but are equal in float32",
        ),
    ],
)
def test_rewards_that_do_not_survive_the_cast_to_float32_name_the_row(rewards, message, tokenizer, model, tmp_path):
    with pytest.raises(ValueError, match=message):
        trainer_on([GOOD, {**GOOD, "rewards": rewards}], tokenizer, model, tmp_path)


MALFORMED_MESSAGES = [
    ([[{"content": "four"}], assistant("five")], r"'completions\[0\]', message 0: expected a dict with a 'role'"),
    ([assistant("four"), []], r"'completions\[1\]': empty message list"),
    ([assistant("four"), [{"role": "assistant"}]], r"'completions\[1\]', message 0: the message has no 'content'"),
]


@pytest.mark.parametrize("completions, message", MALFORMED_MESSAGES)
def test_malformed_messages_name_the_row_and_column(completions, message, tokenizer, model, tmp_path):
    with pytest.raises(ValueError, match="Row 0, column " + message):
        trainer_on([{**GOOD, "completions": completions}], tokenizer, model, tmp_path)


# --- Tracebacks instead of a row: values of the wrong type --------------------------------------------------------


NOT_TEXT = "expected text or a list of messages, got"
WRONG_TYPES = [
    ({"completions": [4, 5]}, rf"'completions\[0\]': {NOT_TEXT} int 4", "'chosen'"),
    ({"completions": [{"a": 1}, {"a": 2}]}, rf"'completions\[0\]': {NOT_TEXT} dict", "'chosen'"),
    ({"completions": ["four", None]}, rf"'completions\[1\]': {NOT_TEXT} NoneType", "'rejected'"),
    ({"prompt": 7}, rf"'prompt': {NOT_TEXT} int", "'prompt'"),
    ({"prompt": "   "}, r"'prompt': empty prompt", "'prompt'"),
    ({"completions": [assistant("4"), assistant("5")]}, r"'completions\[0\]': the prompt is text but this", None),
]


@pytest.mark.parametrize("change, message, pair_column", WRONG_TYPES)
def test_wrong_types_raise_a_row_error_at_construction(change, message, pair_column, tokenizer, model, tmp_path):
    row = {"prompt": "Q?", "completions": ["four", "five"], "rewards": [1, 0], **change}
    with pytest.raises(ValueError, match="Row 0, column " + message):
        trainer_on([row], tokenizer, model, tmp_path)
    if pair_column:  # the same values as a preference pair: the error names the pair's own column
        pair = {"prompt": row["prompt"], "chosen": row["completions"][0], "rejected": row["completions"][1]}
        with pytest.raises(ValueError, match=f"Row 0, column {pair_column}"):
            trainer_on([pair], tokenizer, model, tmp_path)


def test_a_csv_file_whose_answers_parse_as_numbers(tmp_path, tokenizer, model):
    from trl_nca.scripts.utils import load_any_dataset

    path = tmp_path / "pairs.csv"
    path.write_text("prompt,chosen,rejected\nWhat is 2+2?,4,5\nWhat is 3+3?,6,7\n")
    data = load_any_dataset(str(path))["train"]
    with pytest.raises(ValueError, match=r"Row 0, column 'chosen': expected text .* got int 4 \(a CSV column"):
        trainer_on(data, tokenizer, model, tmp_path)


# --- Datasets with nothing to train on ----------------------------------------------------------------------------


def test_empty_datasets_are_refused_before_training(tokenizer, model, tmp_path):
    empty = Dataset.from_dict({"prompt": [], "completions": [], "rewards": []})
    with pytest.raises(ValueError, match="The train dataset is empty: there is nothing to train on"):
        trainer_on(empty, tokenizer, model, tmp_path)

    def no_rows():
        yield from ()

    with pytest.raises(ValueError, match="The train dataset is empty \\(the stream has no row\\)"):
        trainer_on(IterableDataset.from_generator(no_rows), tokenizer, model, tmp_path, max_steps=1)
    with pytest.raises(ValueError, match="The eval dataset is empty"):
        NCATrainer(
            model=model,
            args=nca_args(tmp_path),
            train_dataset=k_response_dataset(),
            eval_dataset=empty,
            processing_class=tokenizer,
        )


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("max_length", [2, 8])
def test_a_max_length_that_empties_the_dataset_says_so(max_length, stream, tokenizer, model, tmp_path):
    """In memory or streamed (where it would otherwise train 0 steps and save the untrained model), before training."""
    data = k_response_dataset()
    prompts = [tokenizer.apply_chat_template(p, add_generation_prompt=True)["input_ids"] for p in data["prompt"]]
    shortest = min(map(len, prompts))
    with pytest.raises(
        ValueError,
        match=f"max_length={max_length} leaves the train dataset empty: each of its 8 rows has a prompt of "
        f"{max_length} tokens or more \\(the shortest has {shortest}\\)",
    ):
        trainer_on(data.to_iterable_dataset() if stream else data, tokenizer, model, tmp_path, max_length=max_length)


# --- The command ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root


def one_line_error(capsys, argv):
    from trl_nca import cli

    code = cli.main(argv)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("trl-nca: error: ")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    return errors[0].removeprefix("trl-nca: error: ")


def test_command_errors_name_the_file_line_and_path(tiny_dir, tmp_path, capsys, monkeypatch):
    import datasets

    bad = tmp_path / "rows.jsonl"
    lines = [json.dumps(dict(GOOD, prompt=f"Q{i}")) for i in range(3)]
    bad.write_text(
        "\n".join([lines[0], lines[1], '{"prompt": "Q", "completions": ["a", "b"], "rewards": [1, 0]', lines[2]])
    )
    good = tmp_path / "good.jsonl"
    good.write_text("\n".join(lines))

    def nca(model, dataset):
        model = [] if model is None else ["--model_name_or_path", str(model)]
        return ["nca", *model, "--dataset_name", str(dataset), "--output_dir", str(tmp_path / "out")]

    assert one_line_error(capsys, nca(tiny_dir, bad)).startswith(f"{bad}, line 3: not valid JSON (")
    assert (
        one_line_error(capsys, nca(tmp_path / "nope", good))
        == f"Model not found: {tmp_path / 'nope'} (no such folder)"
    )
    assert one_line_error(capsys, nca(None, good)) == "--model_name_or_path is required: a model folder or a hub id"
    # a path under an existing local folder is local: "not found" at once, without asking the hub
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("the hub was asked"))
    assert (
        one_line_error(capsys, nca(tiny_dir, "data/mine")) == "Dataset not found: data/mine (no such file or folder)"
    )


def test_prepare_counts_every_drop_by_its_real_reason():
    rows = [
        GOOD,
        {**GOOD, "completions": GOOD["completions"][:1], "rewards": [1]},
        {**GOOD, "rewards": [1, 0, 2]},
        {**GOOD, "rewards": [1, "good"]},
        {**GOOD, "rewards": [1, "good"]},
        GOOD,
    ]
    kept, drops = prepare_rows(rows)
    assert len(kept) == 2
    assert drops == {
        "rows (column 'completions': expected at least N responses)": 1,
        "rows (columns 'completions' and 'rewards': N completions but N rewards)": 1,
        "rows (column 'rewards[N]': expected a finite number as reward)": 2,
    }


# --- generate with a broken reward function ------------------------------------------------------------------------

REWARDS = """
import math

def fails(prompts, completions, **kwargs):
    raise KeyError("answer")

def too_few(prompts, completions, **kwargs):
    return [1.0] * (len(completions) - 1)

def not_finite(prompts, completions, **kwargs):
    return [math.nan if i == 5 else 1.0 for i in range(len(completions))]

def not_a_number(prompts, completions, **kwargs):
    return ["high" if i == 2 else 0.0 for i in range(len(completions))]
"""


@pytest.mark.parametrize(
    "spec, message",
    [
        ("no_such_module:f", "Reward 'no_such_module:f': cannot import module 'no_such_module'"),
        (
            "broken_rewards:missing",
            "Reward 'broken_rewards:missing': module 'broken_rewards' has no function 'missing'",
        ),
        ("broken_rewards:fails", "Reward function 'fails' raised KeyError: 'answer'"),
        ("broken_rewards:too_few", "Reward function 'too_few' returned 5 values for 6 completions"),
        (
            "broken_rewards:not_finite",
            "Reward function 'not_finite' returned nan for completion 1 of prompt 2 ('Sea?')",
        ),
        ("broken_rewards:not_a_number", "Reward function 'not_a_number' returned 'high' for completion 0 of prompt 1"),
    ],
)
def test_generate_stops_on_a_broken_reward_function_and_saves_nothing(
    spec, message, tiny_dir, tmp_path, capsys, monkeypatch
):
    (tmp_path / "broken_rewards.py").write_text(REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": q}) + "\n" for q in ["Hello?", "Sky?", "Sea?"]))
    out = tmp_path / "generated"
    argv = ["generate", "--model", str(tiny_dir), "--prompts", str(prompts), "--reward", spec, "--k", "2"]
    assert one_line_error(capsys, [*argv, "--max_new_tokens", "3", "--output_dir", str(out)]).startswith(message)
    assert not out.exists()


def test_generate_returns_checked_rewards_from_every_function(tokenizer, model):
    def length(prompts, completions, **kwargs):
        return [len(c) % 3 for c in completions]

    def bonus(prompts, completions, **kwargs):
        return [0.5] * len(completions)

    data, _ = build_reward_dataset(
        model, tokenizer, [{"prompt": "Hi"}, {"prompt": "Sky"}], [length, bonus], k=2, max_new_tokens=3
    )
    for row in data:
        assert row["rewards"] == [len(c) % 3 + 0.5 for c in row["completions"]]


# --- Interrupted runs ----------------------------------------------------------------------------------------------

KILL_WHILE_SAVING = textwrap.dedent(
    """
    import os, signal, sys
    from transformers import Trainer

    save_rng_state = Trainer._save_rng_state

    def killed_at_step_4(self, output_dir):  # model and optimizer are written, the trainer state not yet
        if self.state.global_step == 4:
            os.kill(os.getpid(), signal.SIGKILL)
        return save_rng_state(self, output_dir)

    Trainer._save_rng_state = killed_at_step_4
    from trl_nca.scripts.train import main, make_parser

    main(*make_parser().parse_args_and_config(sys.argv[1:])[:4], algorithm="infonca")
    """
)


def test_a_run_killed_while_saving_resumes_from_the_last_complete_checkpoint(tiny_dir, tmp_path, caplog, capsys):
    from trl_nca.scripts.train import main, make_parser

    data = tmp_path / "rows.jsonl"
    k_response_dataset().to_json(data)

    def argv(output_dir, *extra):
        return ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir", str(output_dir),
                "--max_steps", "6", "--per_device_train_batch_size", "2", "--learning_rate", "1e-2", "--beta", "0.5",
                "--save_strategy", "steps", "--save_steps", "2", "--logging_steps", "1", "--report_to", "none",
                "--bf16", "false", "--use_cpu", "true", "--gradient_checkpointing", "false", *extra]  # fmt: skip

    full = main(*make_parser().parse_args_and_config(argv(tmp_path / "full"))[:4], algorithm="infonca")
    cut = subprocess.run([sys.executable, "-c", KILL_WHILE_SAVING, *argv(tmp_path / "cut")], capture_output=True)
    assert cut.returncode == -9  # SIGKILL
    assert (tmp_path / "cut" / "checkpoint-4").is_dir() and not (
        tmp_path / "cut" / "checkpoint-4" / "trainer_state.json"
    ).exists()

    incomplete = str(tmp_path / "cut" / "checkpoint-4")
    assert one_line_error(capsys, ["infonca", *argv(tmp_path / "cut", "--resume_from_checkpoint", incomplete)]) == (
        f"Checkpoint {incomplete} is incomplete (no readable trainer_state.json): it was cut while saving"
    )
    with caplog.at_level("WARNING"):
        resumed = main(
            *make_parser().parse_args_and_config(argv(tmp_path / "cut", "--resume_from_checkpoint", "true"))[:4],
            algorithm="infonca",
        )
    assert any("Resuming from checkpoint-2: checkpoint-4" in r.getMessage() for r in caplog.records)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    printed = capsys.readouterr().out
    assert "resumed from:       checkpoint-2; train_loss covers the 4 resumed steps only (3-6)" in printed
    assert "final loss:         n/a" not in printed


def test_the_summary_reports_the_mean_loss_when_no_step_was_logged(tiny_dir, tmp_path, capsys):
    from trl_nca.scripts.train import main, make_parser

    data = tmp_path / "rows.jsonl"
    k_response_dataset().to_json(data)
    argv = ["--model_name_or_path", str(tiny_dir), "--dataset_name", str(data), "--output_dir", str(tmp_path / "o"),
            "--max_steps", "1", "--logging_steps", "50", "--report_to", "none", "--bf16", "false", "--use_cpu", "true",
            "--gradient_checkpointing", "false", "--save_strategy", "no"]  # fmt: skip
    main(*make_parser().parse_args_and_config(argv)[:4], algorithm="nca")
    printed = capsys.readouterr().out
    assert f"train loss (mean):  {2 * math.log(2):.4f}" in printed and "n/a" not in printed
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "o") is not None
