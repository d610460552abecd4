"""The training script behind `trl-nca online`: online NCA or InfoNCA, importable as `main(...)` like TRL's scripts.

```bash
trl-nca online --config recipes/online/nca_smollm2_arithmetic_cpu.yaml
trl-nca online --model_name_or_path ORG/MODEL --dataset_name prompts.jsonl --reward_funcs my_module:my_reward \\
    --output_dir out --use_peft --num_generations 4
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m trl_nca online --config recipe.yaml
```

Reward functions are given as `module:function` (TRL's GRPO signature) or the folder of a sequence-classification
reward model, as for `trl-nca generate`; several are summed (weighted by `reward_weights`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..online_config import OnlineNCAConfig
from ..online_trainer import OnlineInfoNCATrainer, OnlineNCATrainer
from ..rewards import check_reward_model_folder, resolve_reward
from .utils import run_training

TRAINERS = {"nca": OnlineNCATrainer, "infonca": OnlineInfoNCATrainer}


@dataclass
class OnlineScriptArguments(ScriptArguments):
    """`ScriptArguments` plus the reward functions and the objective of `trl-nca online`."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: 'module:function' (TRL's GRPO signature) or a reward model folder; several are "
            "summed, weighted by reward_weights."
        },
    )
    objective: str = field(
        default="nca",
        metadata={
            "help": "'nca' (OnlineNCATrainer) or 'infonca' (OnlineInfoNCATrainer).",
            "choices": ["nca", "infonca"],
        },
    )


DATACLASSES = (OnlineScriptArguments, OnlineNCAConfig, ModelConfig, DatasetMixtureConfig)


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of `trl-nca online`: `OnlineScriptArguments`, `OnlineNCAConfig`, `ModelConfig`,
    `DatasetMixtureConfig`."""
    return TrlParser(DATACLASSES, prog=prog)


def _reward(spec: str):
    path = Path(spec).expanduser()
    if path.is_dir():
        # A reward model folder goes to GRPOTrainer as a path: it loads and places the model like its own (dtype,
        # sharding); it is checked here, since GRPOTrainer would give a causal LM a freshly initialised score head
        check_reward_model_folder(path)
        return str(path)
    return resolve_reward(spec)


def reward_specs(value) -> list[str]:
    """The reward specs of `--reward_funcs`: a YAML scalar (`reward_funcs: my_module:my_reward`) is one spec, not a
    list of its characters."""
    return [value] if isinstance(value, str) else list(value)


def main(script_args, training_args, model_args, dataset_args, *, callbacks=None):
    """Train online NCA or InfoNCA from the parsed dataclasses; returns the trainer after saving the model."""
    if script_args.objective not in TRAINERS:
        raise ValueError(f"--objective must be one of {sorted(TRAINERS)}, got {script_args.objective!r}")
    if not script_args.reward_funcs:
        raise ValueError("--reward_funcs is required: 'module:function' or a reward model folder (repeatable)")
    reward_funcs = [_reward(spec) for spec in reward_specs(script_args.reward_funcs)]
    build = functools.partial(TRAINERS[script_args.objective], reward_funcs=reward_funcs)
    return run_training(build, script_args, training_args, model_args, dataset_args, callbacks)
