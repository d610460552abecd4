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
"""

from __future__ import annotations

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

from ..config import NCAConfig
from ..trainer import InfoNCATrainer, NCATrainer
from .utils import run_training

TRAINERS = {"nca": NCATrainer, "infonca": InfoNCATrainer}
DATACLASSES = (ScriptArguments, NCAConfig, ModelConfig, DatasetMixtureConfig)


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of one training subcommand: `ScriptArguments`, `NCAConfig`, `ModelConfig`, `DatasetMixtureConfig`."""
    return TrlParser(DATACLASSES, prog=prog)


def main(script_args, training_args, model_args, dataset_args, *, algorithm: str = "nca", callbacks=None):
    """Train NCA or InfoNCA from the parsed dataclasses; returns the trainer after saving the model."""
    return run_training(TRAINERS[algorithm], script_args, training_args, model_args, dataset_args, callbacks)
