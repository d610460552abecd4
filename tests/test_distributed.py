"""Several processes on CPU: DDP training, FSDP2 (or the exact reason it cannot run here), and the multi-process
reference precompute, each against one process with the same global batch."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import build_model, build_tokenizer
from datasets import Dataset
from helpers import k_response_dataset

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


def test_online_two_processes_give_the_same_first_step_as_one(tmp_path):
    """NCA with each group of 4 split over the 2 processes (labels from the gathered rewards), InfoNCA with one
    group of 2 on each; fixed completions, so that both runs train on the same groups."""
    job = ["tests/distributed_job.py", "online"]
    run([*ACCELERATE, *DDP, *job, str(tmp_path / "two.json"), "2"])
    run([sys.executable, *job, str(tmp_path / "one.json"), "4"])
    two, one = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one"))
    for name, initial in [("nca", 2 * math.log(2)), ("infonca", math.log(2))]:
        assert (two[name]["processes"], one[name]["processes"]) == (2, 1)
        assert abs(one[name]["loss"] - initial) > 1e-3  # the adapter starts away from the reference
        assert two[name]["loss"] == pytest.approx(one[name]["loss"], rel=1e-5), name
        assert two[name]["grad_norm"] == pytest.approx(one[name]["grad_norm"], rel=1e-5), name
