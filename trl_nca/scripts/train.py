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

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_dataset
from trl.trainer.utils import get_peft_config, get_quantization_config

from ..config import NCAConfig
from ..trainer import InfoNCATrainer, NCATrainer
from .utils import (
    check_model,
    load_any_dataset,
    model_init_kwargs,
    model_not_found_as_one_line,
    resolve_checkpoint,
    run_summary,
)

TRAINERS = {"nca": NCATrainer, "infonca": InfoNCATrainer}
DATACLASSES = (ScriptArguments, NCAConfig, ModelConfig, DatasetMixtureConfig)


def make_parser(prog: str | None = None) -> TrlParser:
    """The parser of one training subcommand: `ScriptArguments`, `NCAConfig`, `ModelConfig`, `DatasetMixtureConfig`."""
    return TrlParser(DATACLASSES, prog=prog)


def _datasets(script_args, training_args, dataset_args):
    if dataset_args.datasets:
        dataset = get_dataset(dataset_args)
    elif script_args.dataset_name:
        dataset = load_any_dataset(
            script_args.dataset_name, script_args.dataset_config, streaming=script_args.dataset_streaming
        )
    else:
        raise ValueError("No dataset: set `dataset_name` (a hub id or a local path) or `datasets`.")
    splits = list(dataset)
    if script_args.dataset_train_split not in dataset:
        raise ValueError(f"No split '{script_args.dataset_train_split}' in the dataset; it has {splits}.")
    train = dataset[script_args.dataset_train_split]
    evaluate = None
    if training_args.eval_strategy != "no":
        if script_args.dataset_test_split not in dataset:
            raise ValueError(
                f"eval_strategy={training_args.eval_strategy} needs the split '{script_args.dataset_test_split}', "
                f"but the dataset has {splits}; set --dataset_test_split or --eval_strategy no."
            )
        evaluate = dataset[script_args.dataset_test_split]
    return train, evaluate


def main(script_args, training_args, model_args, dataset_args, *, algorithm: str = "nca", callbacks=None):
    """Train NCA or InfoNCA from the parsed dataclasses; returns the trainer after saving the model."""
    trainer_cls = TRAINERS[algorithm]
    model = check_model(model_args.model_name_or_path)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = _datasets(script_args, training_args, dataset_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)

    with model_not_found_as_one_line(model):
        trainer = trainer_cls(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    trainer.save_model(training_args.output_dir)
    if trainer.accelerator.is_main_process:
        print(run_summary(trainer, result.metrics, resumed_from=checkpoint))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers and the process group
        trainer.end()
    return trainer
