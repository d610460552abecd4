"""Jobs the distributed tests start under `accelerate launch` and as one plain process (not a test module).

    python tests/distributed_job.py probe                 # prints {"distributed_type": ...}
    python tests/distributed_job.py precompute OUT.json ROWS.jsonl
    python tests/distributed_job.py online OUT.json PER_DEVICE_BATCH

`precompute`: reference log-probabilities precomputed for the rows of ROWS.jsonl (the test writes 7 rows of ragged
K: uneven over 2 processes x batch 2), with a reference that differs from the policy, for the rows in memory and
read from the file; the main process writes them to OUT.json.

`online`: one step of OnlineNCATrainer (groups of 4, split across processes when the per-device batch is 2) and of
OnlineInfoNCATrainer (groups of 2), on fixed completions (a deterministic rollout), with the initial reference and
a LoRA adapter that starts away from it; the main process writes the loss and gradient norm of each.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from conftest import build_model, build_tokenizer  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from helpers import nca_args  # noqa: E402

from trl_nca import NCATrainer  # noqa: E402


def probe() -> None:
    """How the trainers' arguments would distribute this launch (what `Trainer` reads), without training."""
    from transformers import TrainingArguments

    state = TrainingArguments(output_dir=tempfile.mkdtemp(), use_cpu=True, report_to=[]).distributed_state
    if state.is_main_process:
        print(json.dumps({"distributed_type": str(state.distributed_type).split(".")[-1]}))
    finish(state)


def precompute(out: str, rows_file: str) -> None:
    tokenizer = build_tokenizer()
    folder = Path(tempfile.mkdtemp())
    from_file = load_dataset("json", data_files=rows_file)["train"]
    record = {}
    for source, data in [("memory", Dataset.from_list(list(from_file))), ("file", from_file)]:
        trainer = NCATrainer(
            model=build_model(tokenizer, seed=0),
            ref_model=build_model(tokenizer, seed=1),
            args=nca_args(folder, precompute_ref_log_probs=True, precompute_ref_batch_size=2),
            train_dataset=data,
            processing_class=tokenizer,
        )
        record[source] = list(trainer.train_dataset["ref_logps"])
    record["processes"] = trainer.accelerator.num_processes
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(record))
    finish(trainer.accelerator)


def online(out: str, per_device: str) -> None:
    from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset
    from peft import LoraConfig

    from trl_nca import OnlineInfoNCATrainer, OnlineNCATrainer

    tokenizer = build_tokenizer()
    record = {}
    for name, cls, group_size in [("nca", OnlineNCATrainer, 4), ("infonca", OnlineInfoNCATrainer, 2)]:
        trainer = cls(
            model=build_model(tokenizer),
            reward_funcs=length_reward,
            args=online_args(
                Path(tempfile.mkdtemp()),
                reference="initial",
                num_generations=group_size,
                per_device_train_batch_size=int(per_device),
                max_steps=1,
            ),
            train_dataset=prompts_dataset(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False),
            rollout_func=deterministic_rollout,
        )
        trainer.train()
        log = [entry for entry in trainer.state.log_history if "loss" in entry][0]
        record[name] = {
            "loss": log["loss"],
            "grad_norm": log["grad_norm"],
            "processes": trainer.accelerator.num_processes,
        }
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(record))
    finish(trainer.accelerator)


def finish(accelerator) -> None:
    """Leave together, and without destructors when there are several processes: with gloo on CPU a process that
    exits first can abort in the process group's teardown ("terminate called without an active exception", seen in
    CI under load), as `trl-nca` itself avoids in `cli.py`."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    {"probe": probe, "precompute": precompute, "online": online}[sys.argv[1]](*sys.argv[2:])
