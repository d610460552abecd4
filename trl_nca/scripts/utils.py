"""What the `trl-nca` commands share: loading datasets by hub id or local path, checking a model path, finding the
checkpoint to resume from, and the end-of-run summary."""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from transformers.utils import logging

from .runs import (
    STATE,
    TrlNcaRun,
    describe_others,
    latest_state,
    numbered_checkpoints,
    read_state,
    run_id_of,
    step_of,
)

logger = logging.get_logger(__name__)

# File suffixes -> the `datasets` builder that reads them
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# A hub repo id: `name` or `owner/name`, letters, digits, `-`, `_`, `.`
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)?$")


def looks_local(name: str) -> bool:
    """Whether `name` is meant as a local path rather than a hub id: it exists, starts like a path (`.`, `/`, `~`),
    has a data-file suffix, has more than one `/`, or its first part is an existing local folder (`data/mine` when
    `data/` exists)."""
    path = Path(name).expanduser()
    return (
        path.exists()
        or name.startswith((".", "/", "~"))
        or path.suffix.lower() in FILE_BUILDERS
        or not _HUB_ID.match(name)
        or (len(path.parts) > 1 and Path(path.parts[0]).is_dir())
    )


def _first_bad_json_line(path: Path) -> tuple[int, str] | None:
    """`(line number, reason)` of the first line of a JSON Lines file that is not a JSON object, or None (also when
    the file is one valid JSON document)."""
    try:
        json.loads(path.read_text(encoding="utf-8"))
        return None
    except json.JSONDecodeError:
        pass
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                if not isinstance(json.loads(line), dict):
                    return number, "not a JSON object"
            except json.JSONDecodeError as error:
                return number, error.msg
    return None


def _load_file(path: Path, streaming: bool) -> DatasetDict:
    builder = FILE_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"Cannot read {path}: expected one of {sorted(FILE_BUILDERS)} or a save_to_disk folder")
    try:
        return load_dataset(builder, data_files={"train": str(path)}, streaming=streaming)
    except Exception:
        # `datasets` reports a broken JSON line deep inside its builder; find the line and say where it is
        bad = _first_bad_json_line(path) if builder == "json" else None
        if bad is None:
            raise
        raise ValueError(f"{path}, line {bad[0]}: not valid JSON ({bad[1]})") from None


def load_any_dataset(name: str, config: str | None = None, streaming: bool = False) -> DatasetDict:
    """A `DatasetDict` from a `save_to_disk` folder, a JSON/JSONL/Parquet/CSV file or folder of them, or a hub id.

    A single file or a folder of files becomes the `train` split. A path that is clearly local and missing raises
    `FileNotFoundError` at once (no hub lookup); a malformed JSON line raises a `ValueError` naming file and line.
    """
    path = Path(name).expanduser()
    if not looks_local(name):
        return load_dataset(name, name=config, streaming=streaming)
    if not path.exists():
        raise FileNotFoundError(f"Dataset not found: {name} (no such file or folder)")
    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        loaded = load_from_disk(str(path))
        return loaded if isinstance(loaded, DatasetDict) else DatasetDict({"train": loaded})
    if path.is_file():
        return _load_file(path, streaming)
    return load_dataset(str(path), name=config, streaming=streaming)


def load_splits(script_args, training_args, dataset_args):
    """The train split and, when evaluating, the test split of `--dataset_name` (or `--datasets`)."""
    if dataset_args.datasets:
        from trl import get_dataset

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


def first_split(dataset: DatasetDict | Dataset) -> Dataset:
    return dataset if isinstance(dataset, Dataset) else dataset[next(iter(dataset))]


def check_model(name: str | None, flag: str = "--model_name_or_path") -> str:
    """The model argument of a command, checked: given, and an existing folder when it is clearly a local path."""
    if not name:
        raise ValueError(f"{flag} is required: a model folder or a hub id")
    if looks_local(name) and not Path(name).expanduser().is_dir():
        raise FileNotFoundError(f"Model not found: {name} (no such folder)")
    return name


@contextmanager
def model_not_found_as_one_line(model: str):
    """A model name that is no local folder and fails as a hub id is reported as not found, whatever the hub says."""
    try:
        yield
    except OSError as error:
        if Path(model).expanduser().exists():
            raise
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FileNotFoundError(
            f"Model not found: {model} is no local folder, and loading it as a hub id failed ({reason})"
        ) from error


def model_init_kwargs(model_args, training_args) -> dict:
    """`from_pretrained` keyword arguments from TRL's `ModelConfig`, under those the config already has."""
    return {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
        **(training_args.model_init_kwargs or {}),
    }


def resolve_checkpoint(value, output_dir: str):
    """The checkpoint `--resume_from_checkpoint` means: `true`/`last` is the newest *complete* checkpoint in
    `output_dir` of the run that last started there (`runs.latest_state`: checkpoints of other runs, and newer
    incomplete ones from a run killed while saving, are named in a warning; a folder that mixes runs without telling
    which is the last is refused); a path must be a complete checkpoint. `None`/`false` means no resume."""
    if value is None or value is False or (isinstance(value, str) and value.lower() in {"false", "none", ""}):
        return None
    if value is True or (isinstance(value, str) and value.lower() in {"true", "last"}):
        try:
            choice = latest_state(output_dir, checkpoints_only=True)
        except ValueError as error:
            raise ValueError(f"--resume_from_checkpoint true: {error}") from None
        if choice is None:
            raise ValueError(f"--resume_from_checkpoint true: no complete checkpoint in {output_dir}")
        name = choice.state.name
        if choice.other_runs:
            logger.warning(
                f"Resuming from {name}, the newest checkpoint of the run that last started in {output_dir}; "
                f"{describe_others(choice)}, and is not resumed from."
            )
        if choice.incomplete:
            logger.warning(
                f"Resuming from {name}: {', '.join(choice.incomplete)} in {output_dir} has no trainer state "
                "(the run was stopped while saving it), so it is skipped."
            )
        return str(choice.state.path)
    path = Path(value)
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint not found: {value} (no such folder)")
    if read_state(path / STATE) is None:
        raise ValueError(f"Checkpoint {value} is incomplete (no readable trainer_state.json): it was cut while saving")
    return str(path)


def run_summary(trainer, train_metrics: dict, resumed_from: str | None = None) -> str:
    """A short end-of-run report: steps, processes, runtime, final loss and reward accuracy, where the model is."""
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    last = logs[-1] if logs else {}

    def fmt(value):
        return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.4f}"

    loss_line = f"  final loss:         {fmt(last.get('loss'))}"
    if not logs:  # no step was logged (logging_steps above the step count): the run's mean loss is what there is
        loss_line = f"  train loss (mean):  {fmt(train_metrics.get('train_loss'))}"
    engine = str(trainer.accelerator.distributed_type).split(".")[-1]
    if trainer.is_deepspeed_enabled:
        engine += f" ZeRO-{trainer.accelerator.state.deepspeed_plugin.zero_stage}"
    lines = [
        f"{trainer._name} training finished",
        f"  steps:              {trainer.state.global_step}",
        f"  processes:          {trainer.accelerator.num_processes} ({engine})",
        f"  runtime:            {train_metrics.get('train_runtime', float('nan')):.1f} s",
        loss_line,
    ]
    if "rewards/accuracies" in last:
        lines.append(f"  reward accuracy:    {fmt(last.get('rewards/accuracies'))}")
    if resumed_from is not None:
        start, end = step_of(resumed_from), trainer.state.global_step
        lines.append(
            f"  resumed from:       {Path(resumed_from).name}; train_loss covers the {end - start} resumed steps "
            f"only ({start + 1}-{end})"
        )
    lines.append(f"  model saved to:     {trainer.args.output_dir}")
    return "\n".join(lines)


def _no_step(trainer, args) -> str:
    if isinstance(trainer.train_dataset, IterableDataset):
        max_length = getattr(args, "max_length", None)
        hint = f", e.g. a prompt longer than max_length={max_length}" if max_length else ""
        why = f"the streaming train dataset gave no batch (does a filter drop every row{hint}?)"
    else:
        why = f"max_steps={args.max_steps} and num_train_epochs={args.num_train_epochs} leave no step to take"
    return f"Training took no step: {why}; nothing was saved to {args.output_dir}"


def earlier_run_warning(output_dir, earlier: list[str]) -> str:
    """What a new run says when its output folder holds checkpoints of an earlier one."""
    return (
        f"{output_dir} already holds {', '.join(earlier)} of an earlier run: this new run saves its checkpoints under "
        "the same names, so one of the same step (checkpoint-N) overwrites the earlier run's, and Trainer's "
        "save_total_limit rotation, which deletes by number, may remove this run's and keep the others. "
        "`--resume_from_checkpoint true` and `trl-nca plot` use this run's only; to keep the runs apart, give "
        "another --output_dir."
    )


def run_training(build, script_args, training_args, model_args, dataset_args, callbacks=None):
    """What every training command does around its trainer: check the model argument, load the splits, find the
    checkpoint to resume from, build the trainer with `build(model=..., args=..., ...)` (TRL's `ModelConfig`
    quantization and PEFT configs), train, save, print the summary, push if asked; returns the trainer."""
    from trl.trainer.utils import get_peft_config, get_quantization_config

    model = check_model(model_args.model_name_or_path)
    training_args.model_init_kwargs = model_init_kwargs(model_args, training_args)
    train_dataset, eval_dataset = load_splits(script_args, training_args, dataset_args)
    checkpoint = resolve_checkpoint(training_args.resume_from_checkpoint, training_args.output_dir)
    earlier = [c.name for c in numbered_checkpoints(training_args.output_dir)]
    if checkpoint is None and earlier:
        logger.warning(earlier_run_warning(training_args.output_dir, earlier))
    # The run's id goes into its record and every trainer state it saves; a resumed run keeps its checkpoint's
    run = TrlNcaRun(run_id_of(read_state(Path(checkpoint) / STATE)) if checkpoint else None)
    callbacks = [*(callbacks or []), run]
    with model_not_found_as_one_line(model):
        trainer = build(
            model=model,
            args=training_args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            quantization_config=get_quantization_config(model_args),
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
    result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.state.global_step == 0:  # Trainer ends such a run as if it had trained: say so, save nothing
        raise ValueError(_no_step(trainer, training_args))
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # the log history `trl-nca plot` reads, also for a run saved with --save_strategy no
    if trainer.accelerator.is_main_process:
        print(run_summary(trainer, result.metrics, resumed_from=checkpoint))
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers and the process group
        trainer.end()
    return trainer
