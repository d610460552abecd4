"""Several processes on CPU: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (every trainer, layout and setting, and the ZeRO-3
recipe as recipes/README.md documents it), FSDP2 (or the exact reason it cannot run here), and the multi-process
reference precompute, each against one process with the same global batch."""

import json
import math
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer
from datasets import Dataset
from distributed_job import OFFLINE_STEPS, ONLINE_STEPS
from helpers import deepspeed_or_skip, k_response_dataset

ROOT = Path(__file__).resolve().parents[1]
ACCELERATE = [str(Path(sys.executable).with_name("accelerate")), "launch"]
# `--multi_gpu` starts torchrun-style workers; on a machine without a GPU they run on the CPU with gloo
DDP = [
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
]


# What a DeepSpeed launch config of recipes/accelerate needs on a CPU (recipes/README.md, "DeepSpeed on CPU"): the
# number of processes, and no bf16 mixed precision
ZERO_ON_CPU = ["--num_processes", "2", "--mixed_precision", "no"]


def zero(stage: int) -> list[str]:
    """`accelerate launch` with recipes/accelerate/zeroN.yaml as it is, and the CPU flags."""
    return [*ACCELERATE, "--config_file", f"recipes/accelerate/zero{stage}.yaml", *ZERO_ON_CPU]


def run(command, env=None, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("distributed")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, hidden_size=64).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    Dataset.from_list(list(k_response_dataset())[:4]).to_json(root / "data4.jsonl")
    return root


def train_twice(assets, tmp_path, launcher, *extra):
    """Two steps of `trl-nca nca` under `launcher` (2 processes x batch 2) and as one process (batch 4); the loss and
    gradient norm of each step, from each run's checkpoint."""
    common = ["-m", "trl_nca", "nca", "--model_name_or_path", str(assets / "tiny"), "--dataset_name",
              str(assets / "data4.jsonl"), "--max_steps", "2", "--report_to", "none", "--save_strategy", "steps",
              "--save_steps", "2", "--logging_steps", "1", "--learning_rate", "1e-2", "--beta", "0.5",
              "--disable_tqdm", "true", *extra]  # fmt: skip
    two = run([*launcher, *common, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "two")])
    run([sys.executable, *common, "--per_device_train_batch_size", "4", "--output_dir", str(tmp_path / "one")])

    def history(name):
        state = json.loads((tmp_path / name / "checkpoint-2" / "trainer_state.json").read_text())
        return [value for e in state["log_history"] if "loss" in e for value in (e["loss"], e["grad_norm"])]

    return history("two"), history("one"), two.stdout


def test_two_ddp_processes_give_the_same_steps_as_one_with_the_same_global_batch(assets, tmp_path):
    two, one, stdout = train_twice(assets, tmp_path, [*ACCELERATE, *DDP])
    # step 1's loss is NCA's 2 log 2 at initialisation; its gradient norm and step 2 show the batches agree
    assert two == pytest.approx(one, rel=1e-5)
    assert "NCA training finished" in stdout and "processes:          2 (MULTI_CPU)" in stdout


def fsdp2_cpu_config(folder) -> Path:
    """recipes/accelerate/fsdp2.yaml with only what a CPU run changes: CPU, no mixed precision, 2 processes."""
    config = yaml.safe_load((ROOT / "recipes" / "accelerate" / "fsdp2.yaml").read_text())
    config.update(use_cpu=True, mixed_precision="no", num_processes=2)
    path = folder / "fsdp2_cpu.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def fsdp2_launch(tmp_path_factory):
    """The test-only FSDP2 launch config, and how accelerate distributes it here (probed once)."""
    config = fsdp2_cpu_config(tmp_path_factory.mktemp("fsdp2"))
    probe = run([*ACCELERATE, "--config_file", str(config), "tests/distributed_job.py", "probe"])
    return config, json.loads(probe.stdout.strip().splitlines()[-1])["distributed_type"]


@pytest.mark.parametrize("prompt_sharing", ["off", "on"])
def test_fsdp2_two_processes_give_the_same_steps_as_one(prompt_sharing, fsdp2_launch, assets, tmp_path):
    config, kind = fsdp2_launch
    if kind != "FSDP":
        import accelerate
        import torch

        pytest.skip(
            f"FSDP2 cannot shard on CPU here: accelerate {accelerate.__version__} (torch {torch.__version__}) runs "
            f"recipes/accelerate/fsdp2.yaml with use_cpu as {kind}, not FSDP (it enables FSDP only for GPU-like "
            "devices), so nothing would be sharded; the FSDP2 recipe is exercised on GPUs only"
        )
    two, one, _ = train_twice(
        assets, tmp_path, [*ACCELERATE, "--config_file", str(config)], "--prompt_sharing", prompt_sharing
    )
    assert two == pytest.approx(one, rel=1e-5)


def test_multi_process_precompute_equals_one_process(tmp_path):
    """Ragged K, 7 rows over 2 processes x batch 2 (an uneven last batch), in memory and from a file."""
    k_response_dataset(counts=(4, 2, 3, 4, 3, 2, 4)).to_json(tmp_path / "rows.jsonl")
    job = ["tests/distributed_job.py", "precompute"]
    # separate datasets caches, so that the second run cannot read the first one's precomputed values
    two, one = (str(tmp_path / name) for name in ("two.json", "one.json"))
    run([*ACCELERATE, *DDP, *job, two, str(tmp_path / "rows.jsonl")], env={"HF_DATASETS_CACHE": str(tmp_path / "c2")})
    run([sys.executable, *job, one, str(tmp_path / "rows.jsonl")], env={"HF_DATASETS_CACHE": str(tmp_path / "c1")})
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    assert (two["processes"], one["processes"]) == (2, 1)
    for source in ["memory", "file"]:
        assert [len(row) for row in one[source]] == [4, 2, 3, 4, 3, 2, 4]
        assert [len(row) for row in two[source]] == [4, 2, 3, 4, 3, 2, 4], source
        flat = [[value for row in run[source] for value in row] for run in (two, one)]
        assert flat[0] == pytest.approx(flat[1], rel=1e-5), source
        assert len({value for row in one[source] for value in row}) > 20  # real, distinct log-probabilities


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The `engines` job of tests/distributed_job.py as one plain process, 4 rows a step."""
    folder = tmp_path_factory.mktemp("one_process")
    run([sys.executable, "tests/distributed_job.py", "engines", str(folder), "4"])
    return folder, json.loads((folder / "record.json").read_text())


def test_the_engine_cases_are_not_trivial(one_process):
    """What the engine comparisons below rest on, in one process: a reference that differs from the policy and a
    LoRA adapter that starts away from its base move the first loss away from its value at initialisation (that of
    the precompute cases, where the reference is the initial policy; online: NCA's 2 log 2 and InfoNCA's log 2 for
    groups of 2); every case moves every trainable parameter."""
    folder, one = one_process
    first = {case: record["loss"][0] for case, record in one.items()}
    for name in ["nca", "infonca"]:
        for variant in ["reference", "lora"]:
            assert abs(first[f"{name}-auto-{variant}"] - first[f"{name}-auto-precompute"]) > 1e-3, (name, variant)
    assert first["online_nca-reference"] == pytest.approx(2 * math.log(2), abs=1e-6)
    for name, initial in [("online_nca", 2 * math.log(2)), ("online_infonca", math.log(2))]:
        assert abs(first[f"{name}-lora"] - initial) > 1e-3, name
    for case, record in one.items():
        assert (record["engine"], record["processes"], record["dropout"]) == ("NO", 1, False), case
        moved = torch.load(folder / f"{case}.pt")
        assert moved and all(delta.norm() > 0 for delta in moved.values()), case


ENGINES = {
    "DDP": ([*ACCELERATE, *DDP], "MULTI_CPU"),
    "ZeRO-2": (zero(2), "DEEPSPEED-2"),
    "ZeRO-3": (zero(3), "DEEPSPEED-3"),
}


@pytest.mark.parametrize("name", list(ENGINES))
def test_every_trainer_under_the_engine_equals_one_process(name, one_process, tmp_path):
    """NCATrainer and InfoNCATrainer (2 SGD steps) in every layout with a reference model, with precomputed reference
    log-probabilities, with LoRA and with gradient checkpointing, and the online trainers (one step), on 2 processes x
    2 rows under DDP, ZeRO-2 and ZeRO-3 (recipes/accelerate/zero*.yaml as documented for CPU): the engine that ran is
    the one launched, every loss and gradient norm and every parameter's update equal one process with 4 rows (to
    1e-5 of the update's norm: float32, summed in another order), and dropout is off in the policy and in the
    reference (a DeepSpeed engine's, too: building the trainers crashed on it). ZeRO-3 refuses the prompt-cache layout,
    whose number of forwards differs between ranks while every forward gathers the parameters; under ZeRO-2 `auto`
    leaves it out (ranks that picked different layouts readied their gradients in different orders, which ZeRO-2's
    buckets reduce as they fill: the auto cases differed by 2e-3 after one step before)."""
    launcher, expected = ENGINES[name]
    if name.startswith("ZeRO"):
        deepspeed_or_skip()
    folder, one = one_process
    run([*launcher, "tests/distributed_job.py", "engines", str(tmp_path), "2"])
    two = json.loads((tmp_path / "record.json").read_text())
    assert two.keys() == one.keys()
    for case, single in one.items():
        if name == "ZeRO-3" and "-cache-" in case:
            assert "prompt_sharing='cache'" in two[case].get("refused", ""), case
            assert "DeepSpeed ZeRO-3" in two[case]["refused"], case
            continue
        got = two[case]
        assert (got["engine"], got["processes"], got["dropout"]) == (expected, 2, False), case
        if "-auto-" in case:  # ZeRO-2 reduces gradients in the order they are ready: auto may not mix in the cache
            assert ("cache" in str(got["layouts"])) == (name == "DDP"), (case, got["layouts"])
        steps = ONLINE_STEPS if case.startswith("online") else OFFLINE_STEPS
        assert len(got["loss"]) == len(single["loss"]) == steps, case
        assert got["loss"] + got["grad_norm"] == pytest.approx(single["loss"] + single["grad_norm"], rel=1e-5), case
        moved, expected_moves = torch.load(tmp_path / f"{case}.pt"), torch.load(folder / f"{case}.pt")
        assert moved.keys() == expected_moves.keys(), case
        error = sum((moved[n] - expected_moves[n]).square().sum() for n in moved).sqrt()
        assert error <= 1e-5 * sum(delta.square().sum() for delta in expected_moves.values()).sqrt(), case


@pytest.fixture(scope="module")
def diverge_one_process(tmp_path_factory):
    """The `diverge` job of tests/distributed_job.py as one plain process, with both ranks' rows in each batch."""
    folder = tmp_path_factory.mktemp("diverge_one")
    run([sys.executable, "tests/distributed_job.py", "diverge", str(folder), "8"])
    return json.loads((folder / "record.json").read_text())


@pytest.mark.parametrize("name", ["DDP", "ZeRO-3"])
def test_ranks_whose_batches_take_different_paths_finish_together(name, diverge_one_process, tmp_path):
    """Under `auto`, rank 0's prompts are long and rank 1's one token (online: PromptSharingGRPOTrainer and
    OnlineNCATrainer, the first grouped forward being the policy's; OnlineNCATrainer with the initial reference, whose
    forward falls back to GRPO's in its second chunk on one rank; offline: NCATrainer). The ranks take different
    paths (the layout each rank's batches went to), every rank runs the same forwards (before, only the rank that
    shared its prompts ran the layout check's extra forward, and DDP's buffer broadcast or ZeRO-3's gathers waited
    forever: killed at 300 s), and the steps equal one process with the same global batch."""
    if name == "ZeRO-3":
        deepspeed_or_skip()
    launcher = {"DDP": [*ACCELERATE, *DDP], "ZeRO-3": zero(3)}[name]
    run([*launcher, "tests/distributed_job.py", "diverge", str(tmp_path), "4"], timeout=240)
    two, one = json.loads((tmp_path / "record.json").read_text()), diverge_one_process
    for case in ("grpo", "nca"):
        shared, alone = two[case]["counts"]
        assert set(shared) <= {"mask", "cache"} and shared and alone == {"grpo": 2}, (case, two[case]["counts"])
        assert two[case]["loss"] + two[case]["grad_norm"] == pytest.approx(one[case]["loss"] + one[case]["grad_norm"],
                                                                           rel=1e-5), case  # fmt: skip
    assert two["nca-initial"]["loss"][0] == pytest.approx(2 * math.log(2), abs=1e-6)  # reference = policy
    assert "grpo" in two["nca-initial"]["counts"][0]  # rank 0's second chunk, one token, went to GRPO's forward
    shared, alone = two["offline"]["counts"]
    assert set(shared) <= {"mask", "cache"} and shared and alone == {"padded": 2}, two["offline"]["counts"]
    offline = two["offline"]["loss"] + two["offline"]["grad_norm"]
    assert offline == pytest.approx(one["offline"]["loss"] + one["offline"]["grad_norm"], rel=1e-5)


def documented_deepspeed_cpu_command() -> list[str]:
    """The command of recipes/README.md's "DeepSpeed on CPU" section, as its words."""
    text = (ROOT / "recipes" / "README.md").read_text()
    section = text[text.index("## DeepSpeed on CPU") :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_the_zero3_recipe_runs_on_cpu_as_documented(assets, tmp_path):
    """recipes/README.md's DeepSpeed-on-CPU command (the ZeRO-3 launch config and recipe as written, with the CPU
    flags it gives), on the tiny model and rows (no test split: no evaluation; one accumulation step, a larger
    learning rate): 2 steps on 2 processes under ZeRO-3, with the recipe's gradient checkpointing and AdamW, give
    the losses and gradient norms of one process with the same global batch, and checkpoint-2 is saved."""
    deepspeed_or_skip()
    command = documented_deepspeed_cpu_command()
    split = command.index("-m")
    launcher, (module, algorithm, *arguments) = command[:split], command[split + 1 :]
    assert launcher[:2] == ["accelerate", "launch"] and (module, algorithm) == ("trl_nca", "nca")
    assert "recipes/accelerate/zero3.yaml" in launcher and "--config" in arguments
    substitutions = ["--eval_strategy", "no", "--gradient_accumulation_steps", "1"]
    two, one, stdout = train_twice(assets, tmp_path, [*ACCELERATE, *launcher[2:]], *arguments, *substitutions)
    assert two == pytest.approx(one, rel=1e-5)
    assert "processes:          2 (DEEPSPEED ZeRO-3)" in stdout


def test_a_deepspeed_config_launched_with_cpu_is_named_in_a_warning(assets, tmp_path):
    """`accelerate launch --cpu` runs one plain process whatever the config: trl-nca says the DeepSpeed config is not
    applied (read from the launcher's command line; the run then stops on a missing dataset)."""
    data = ["--model_name_or_path", str(assets / "tiny"), "--dataset_name", str(tmp_path / "missing.jsonl")]
    command = [*ACCELERATE, "--config_file", "recipes/accelerate/zero3.yaml", "--cpu", "-m", "trl_nca", "nca", *data]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    warning = [line for line in result.stderr.splitlines() if line.startswith("trl-nca: warning:")]
    assert len(warning) == 1 and "DeepSpeed ZeRO-3 settings of recipes/accelerate/zero3.yaml" in warning[0]
    assert "trl-nca: error: Dataset not found" in result.stderr  # one process got as far as the data


@pytest.mark.parametrize(
    "launch, warns",
    [
        (["accelerate", "launch", "--config_file", "recipes/accelerate/zero2.yaml", "--cpu", "-m", "trl_nca"], True),
        (["python", "-m", "accelerate.commands.launch", "--cpu", "--use_deepspeed", "train.py"], True),
        (["accelerate", "launch", "--config_file", "recipes/accelerate/zero2.yaml", "-m", "trl_nca"], False),
        (["accelerate", "launch", "--config_file", "recipes/accelerate/cpu.yaml", "--cpu", "-m", "trl_nca"], False),
        (["python", "-m", "trl_nca", "nca", "--cpu"], False),
    ],
)
def test_which_launch_command_lines_drop_a_deepspeed_config(launch, warns, monkeypatch):
    from trl_nca.launcher import dropped_deepspeed_config

    monkeypatch.chdir(ROOT)
    assert (dropped_deepspeed_config([*launch, "nca", "--config", "r.yaml"]) is not None) == warns
