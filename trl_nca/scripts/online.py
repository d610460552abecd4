"""The training script behind `trl-nca online`: online NCA or InfoNCA, importable as `main(...)` like TRL's scripts.

```bash
trl-nca online --config recipes/online/nca_smollm2_arithmetic_cpu.yaml
trl-nca online --model_name_or_path ORG/MODEL --dataset_name prompts.jsonl --reward_funcs my_module:my_reward \\
    --output_dir out --use_peft --num_generations 4
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m trl_nca online --config recipe.yaml
```

Reward functions are given as `module:function` or `module.function` (TRL's GRPO signature; the module is looked for
in the current folder first, then on the import path) or the folder of a sequence-classification reward model, as
for `trl-nca generate`; several are summed (weighted by `reward_weights`). torch, transformers and the trainers are
imported by `make_parser` and `main`, not by this module, so that `make_help_parser` (`--help`) prints at once.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..config_fields import OnlineNCAFields
from .help import USAGE, common_options, refuse_in_help, short_help_parser

OBJECTIVES = ("nca", "infonca")
# The GRPOConfig fields most runs set, named by the short help (`--help-all` describes them)
TRAINING_FIELDS = (
    "--output_dir", "--num_generations", "--max_completion_length", "--temperature", "--learning_rate",
    "--max_steps", "--per_device_train_batch_size", "--gradient_accumulation_steps", "--reward_weights",
    "--use_vllm", "--bf16", "--gradient_checkpointing", "--save_strategy", "--resume_from_checkpoint", "--report_to",
)  # fmt: skip


@dataclass
class RewardArguments:
    """The reward functions and the objective: what `trl-nca online` adds to TRL's `ScriptArguments`."""

    reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Reward functions: 'module:function' or 'module.function' (TRL's GRPO signature; the module is "
            "looked for in the current folder first, then on the import path) or a reward model folder; several "
            "are summed, weighted by reward_weights."
        },
    )
    objective: str = field(
        default="nca",
        metadata={
            "help": "'nca' (OnlineNCATrainer) or 'infonca' (OnlineInfoNCATrainer).",
            "choices": list(OBJECTIVES),
        },
    )


@dataclass
class OnlineScriptArguments(RewardArguments, ScriptArguments):
    """`ScriptArguments` plus the reward functions and the objective of `trl-nca online`."""


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of `trl-nca online`: `OnlineScriptArguments`, `OnlineNCAConfig`, `ModelConfig`,
    `DatasetMixtureConfig`. Its help marks the GRPO-only fields OnlineNCAConfig refuses."""
    from ..online_config import _GRPO_ONLY_FIELDS, OnlineNCAConfig

    parser = TrlParser(
        (OnlineScriptArguments, OnlineNCAConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        usage=USAGE,
        parents=[common_options()],
    )
    refuse_in_help(parser, _GRPO_ONLY_FIELDS, "GRPO only, refused by online NCA (it computes neither GRPO's loss "
                   "nor its advantages)")  # fmt: skip
    return parser


def make_help_parser(prog: str | None = None) -> TrlParser:
    """The parser whose help `trl-nca online --help` prints: the reward functions, online NCA's fields, `--config`,
    the data and model fields; it imports neither torch nor transformers."""
    return short_help_parser(
        prog,
        "Online NCA (or InfoNCA): sample K completions per prompt, score them with the reward functions, take an "
        "NCA step on each group, repeat. Every field of TRL's `trl grpo` is accepted, except those of GRPO's own "
        "loss and advantages.",
        [
            ("rewards and objective", RewardArguments),
            ("online NCA (OnlineNCAConfig: what it adds to or changes in GRPOConfig)", OnlineNCAFields),
        ],
        "training (GRPOConfig, TrainingArguments included): every field, e.g. "
        f"{', '.join(TRAINING_FIELDS)}; --help-all lists them all with their help.",
    )


def _reward(spec: str):
    from ..rewards import check_reward_model_folder, resolve_reward

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
    from ..online_trainer import OnlineInfoNCATrainer, OnlineNCATrainer
    from .utils import run_training

    trainers = {"nca": OnlineNCATrainer, "infonca": OnlineInfoNCATrainer}
    if script_args.objective not in trainers:
        raise ValueError(f"--objective must be one of {sorted(trainers)}, got {script_args.objective!r}")
    if not script_args.reward_funcs:
        raise ValueError(
            "--reward_funcs is required: 'module:function', 'module.function' or a reward model folder (repeatable)"
        )
    reward_funcs = [_reward(spec) for spec in reward_specs(script_args.reward_funcs)]
    build = functools.partial(trainers[script_args.objective], reward_funcs=reward_funcs)
    return run_training(build, script_args, training_args, model_args, dataset_args, callbacks)
