"""The help of the training commands: `--help` short, `--help-all` every field.

`trl-nca nca --help` lists what NCA adds first, then `--config`, the data and the model fields, and names the training
fields most runs set. It is built from dataclasses that import neither torch nor transformers
(`trl_nca.config_fields`, TRL's `ScriptArguments`, `ModelConfig` and `DatasetMixtureConfig`), so it prints in a
fraction of a second. `--help-all` prints the help of the parser that parses a run, every DPOConfig or GRPOConfig
field included: several seconds, since `TrainingArguments` imports torch, accelerate and peft.
"""

from __future__ import annotations

import argparse
import logging
from contextlib import contextmanager

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

HELP = ("-h", "--help")
HELP_ALL = "--help-all"
USAGE = "%(prog)s [--config RECIPE.yaml] [--field value ...]"


def common_options() -> argparse.ArgumentParser:
    """`--config` and `--help-all` as a parent parser, so that both helps list them first. TrlParser takes `--config`
    out of the arguments before argparse parses them, and `trl-nca` answers `--help` and `--help-all` before parsing;
    `--help-all` also works on a parser used directly (`make_parser().parse_args_and_config(["--help-all"])`)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        default=argparse.SUPPRESS,
        help="A YAML recipe (recipes/): its keys are any of the fields that --help-all lists, flags given on the "
        "command line override them, and an `env:` mapping sets environment variables.",
    )
    parser.add_argument(
        HELP_ALL,
        action="help",
        help="Show every field, DPOConfig's or GRPOConfig's (TrainingArguments) included, and exit. Takes several "
        "seconds: it imports torch and transformers.",
    )
    return parser


def _titled(dataclass_type: type, title: str) -> type:
    """`dataclass_type` with its fields under `title` (HfArgumentParser's `_argument_group_name`). For the short help
    only: the subclass is never instantiated."""
    return type(dataclass_type.__name__, (dataclass_type,), {"_argument_group_name": title})


def short_help_parser(prog: str | None, description: str, own: list[tuple[str, type]], training: str) -> TrlParser:
    """The parser whose help `--help` prints: the groups of `own` (title, dataclass) after `--config`, then the data
    and model fields, then `training`, a paragraph on the fields of the training config that `--help-all` lists."""
    groups = [
        *own,
        ("data (ScriptArguments)", ScriptArguments),
        ("dataset mixtures (DatasetMixtureConfig)", DatasetMixtureConfig),
        ("model, LoRA and quantization (ModelConfig)", ModelConfig),
    ]
    return TrlParser(
        [_titled(dataclass_type, title) for title, dataclass_type in groups],
        prog=prog,
        usage=USAGE,
        description=description,
        epilog=training,
        parents=[common_options()],
    )


def refuse_in_help(parser: argparse.ArgumentParser, refused: dict, why: str) -> None:
    """Say in the help of each field of `refused` (name -> the value that leaves it off) that only that value is
    accepted."""
    for action in parser._actions:
        if action.dest in refused:
            action.help = f"{why}: any value but {refused[action.dest]!r} is refused."


@contextmanager
def quiet_bitsandbytes():
    """Keep bitsandbytes' import-time warnings about its kernels (logged on some machines, e.g. a CPU with AVX512-BF16
    and no `kernels` package; transformers imports it through peft) out of `--help-all`."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
