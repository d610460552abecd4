"""The training script behind `trl-nca nca` and `trl-nca infonca`, importable as `main(...)` like TRL's scripts.

```bash
trl-nca nca --config recipes/ultrafeedback/nca_qlora.yaml
accelerate launch --config_file recipes/accelerate/multi_gpu.yaml -m trl_nca infonca --config recipe.yaml
```

```python
from trl_nca.scripts.train import main, make_parser
script_args, training_args, model_args, dataset_args = make_parser().parse_args_and_config(["--config", "r.yaml"])
trainer = main(script_args, training_args, model_args, dataset_args, algorithm="nca")
```

torch, transformers and the trainers are imported by `make_parser` and `main`, not by this module, so that
`make_help_parser` (the command's `--help`) prints at once.
"""

from __future__ import annotations

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..config_fields import NCAFields
from .help import USAGE, common_options, refuse_in_help, short_help_parser

NAMES = {"nca": "NCA", "infonca": "InfoNCA"}
# The DPOConfig fields most runs set, named by the short help (`--help-all` describes them)
TRAINING_FIELDS = (
    "--output_dir", "--beta", "--learning_rate", "--num_train_epochs", "--max_steps", "--per_device_train_batch_size",
    "--gradient_accumulation_steps", "--max_length", "--bf16", "--gradient_checkpointing", "--eval_strategy",
    "--save_strategy", "--resume_from_checkpoint", "--report_to", "--push_to_hub",
)  # fmt: skip


def _trainers() -> dict:
    from ..trainer import InfoNCATrainer, NCATrainer

    return {"nca": NCATrainer, "infonca": InfoNCATrainer}


def make_parser(prog: str | None = None, algorithm: str | None = None) -> TrlParser:
    """The parser of one training subcommand: `ScriptArguments`, `NCAConfig`, `ModelConfig`, `DatasetMixtureConfig`.
    Its help offers only the `loss_type` values the trainer of `algorithm` accepts (both trainers' when None) and
    marks the DPO-only fields NCAConfig refuses."""
    from ..config import _DPO_ONLY_FIELDS, PAIR_LOSS_TYPES, NCAConfig

    parser = TrlParser(
        (ScriptArguments, NCAConfig, ModelConfig, DatasetMixtureConfig),
        prog=prog,
        usage=USAGE,
        parents=[common_options()],
    )
    accepted = PAIR_LOSS_TYPES if algorithm is None else ("sigmoid", _trainers()[algorithm].pair_loss_type)
    loss_type = next(action for action in parser._actions if action.dest == "loss_type")
    loss_type.choices = list(dict.fromkeys(accepted))
    loss_type.help = (
        "The DPO loss the trainer computes on preference pairs, fixed by the trainer class: NCATrainer's is "
        "'nca_pair', InfoNCATrainer's 'sigmoid'; 'sigmoid', DPOConfig's default, is accepted by both."
    )
    refuse_in_help(parser, _DPO_ONLY_FIELDS, "DPO only, refused by NCA and InfoNCA (their loss is fixed)")
    return parser


def make_help_parser(prog: str | None = None, algorithm: str = "nca") -> TrlParser:
    """The parser whose help `trl-nca nca --help` prints: NCA's fields, `--config`, the data and model fields; it
    imports neither torch nor transformers."""
    name = NAMES[algorithm]
    return short_help_parser(
        prog,
        f"Train with {name} (Noise Contrastive Alignment) on K scored responses per prompt (prompt, completions, "
        "rewards; preference pairs and the other layouts of docs/offline.md are converted). Every field of TRL's "
        "`trl dpo` is accepted.",
        [(f"{name} fields (NCAConfig: what it adds to DPOConfig)", NCAFields)],
        "training (DPOConfig, TrainingArguments included): every field, e.g. "
        f"{', '.join(TRAINING_FIELDS)}; --help-all lists them all with their help.",
    )


def main(script_args, training_args, model_args, dataset_args, *, algorithm: str = "nca", callbacks=None):
    """Train NCA or InfoNCA from the parsed dataclasses; returns the trainer after saving the model."""
    from .utils import run_training

    return run_training(_trainers()[algorithm], script_args, training_args, model_args, dataset_args, callbacks)
