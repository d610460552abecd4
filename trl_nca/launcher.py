"""What `accelerate launch` did with its launch config, seen from the process it started.

`accelerate launch --cpu` with a DeepSpeed config (`recipes/accelerate/zero3.yaml`) starts one plain process: it skips
its DeepSpeed launcher, and nothing in the started process's environment says a DeepSpeed config was given. The run
then trains without DeepSpeed (and on one process) without a word. Only the launcher's own command line tells, so it
is read from the parent process (Linux `/proc`) and parsed with accelerate's own parser.
"""

from __future__ import annotations

import os
from pathlib import Path


def parent_command_line() -> list[str]:
    """The command line of the process that started this one; empty where `/proc` cannot tell."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def launch_arguments(command_line: list[str]) -> list[str] | None:
    """The arguments of `accelerate launch ...` (or `python -m accelerate.commands.launch ...`), or None when
    `command_line` is no accelerate launch."""
    for i, part in enumerate(command_line):
        if part == "accelerate.commands.launch" or (
            part == "launch" and i > 0 and Path(command_line[i - 1]).name == "accelerate"
        ):
            return command_line[i + 1 :]
    return None


def dropped_deepspeed_config(command_line: list[str]) -> str | None:
    """A warning when `command_line` is an `accelerate launch --cpu` whose launch config (`--config_file`, or
    accelerate's default config) sets up DeepSpeed, which accelerate then leaves out; otherwise None."""
    arguments = launch_arguments(command_line)
    if arguments is None:
        return None
    from accelerate.commands.config.config_args import default_config_file, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    try:
        launch = launch_command_parser().parse_args(arguments)
    except SystemExit:  # not a command line accelerate would run: nothing to say about it
        return None
    if not launch.cpu:
        return None
    config_file = launch.config_file or (default_config_file if os.path.isfile(default_config_file) else None)
    config = load_config_from_file(config_file) if config_file else None
    if not (launch.use_deepspeed or (config and str(config.distributed_type).endswith("DEEPSPEED"))):
        return None
    stage = (getattr(config, "deepspeed_config", None) or {}).get("zero_stage")
    what = f"DeepSpeed ZeRO-{stage}" if stage is not None else "DeepSpeed"
    where = f" of {config_file}" if config_file else ""
    return (
        f"`accelerate launch --cpu` runs one plain process without DeepSpeed: the {what} settings{where} are not "
        "applied. DeepSpeed runs on a machine without a GPU when --cpu is left out; pass --mixed_precision no "
        "instead (recipes/README.md, DeepSpeed on CPU)."
    )


def deepspeed_left_out() -> str | None:
    """`dropped_deepspeed_config` of the launcher that started this process, when accelerate said "CPU" to it."""
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() not in {"true", "1", "yes"}:
        return None
    return dropped_deepspeed_config(parent_command_line())
