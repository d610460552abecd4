"""`trl-nca` (also `python -m trl_nca`): dispatches each subcommand to its script in `trl_nca.scripts` (or the demo).

Errors a newcomer hits (missing file or dataset, unknown subcommand or recipe field, a recipe that is not valid YAML,
a GPU recipe on a machine without one) end as one line on stderr and exit code 2, not a traceback; `TRL_NCA_DEBUG=1`
shows the traceback. DeepSpeed's settings mismatch keeps its lines: the first says only that there is one.
"""

from __future__ import annotations

import os
import sys

import yaml

USAGE = """usage: trl-nca {nca,infonca,online} --config RECIPE.yaml [--field value ...]
       trl-nca prepare {ultrafeedback SOURCE,vlfeedback SOURCE,smollm2} --output_dir DIR [options]
       trl-nca generate --model DIR --output_dir DIR [--task arithmetic | --prompts FILE] [--reward SPEC] [--k 4]
       trl-nca demo [--quick] [--output_dir runs/demo]
       trl-nca plot OUTPUT_DIR
       trl-nca COMMAND --help   (nca, infonca, online: --help-all lists every DPOConfig/GRPOConfig field)

  nca        train with NCA (Noise Contrastive Alignment) on scored responses
  infonca    train with InfoNCA on scored responses
  online     online NCA (or --objective infonca): sample K completions per prompt, score them, learn, repeat
  prepare    write a canonical K-response dataset (prompt, completions, rewards) with save_to_disk
  generate   sample K responses per prompt from a model, score them, and save the reward dataset
  demo       the main job: SmolLM2 learns arithmetic from its own scored samples (CPU is fine)
  plot       plot the likelihood trend and reward accuracy of a finished run
"""


# How transformers' DeepSpeed integration starts its error when the launch config and TrainingArguments disagree; the
# settings in question follow on the next lines
DEEPSPEED_MISMATCH = "Please correct the following DeepSpeed config values that mismatch"


def _accelerator_available() -> bool:
    import torch

    return torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available())


def _train(command: str, argv: list[str]) -> int:
    from functools import partial

    from .scripts.help import HELP, HELP_ALL, quiet_bitsandbytes

    if command == "online":
        from .scripts.online import main, make_help_parser, make_parser
    else:
        from .scripts.train import main, make_help_parser, make_parser

        main, make_parser, make_help_parser = (
            partial(f, algorithm=command) for f in (main, make_parser, make_help_parser)
        )

    prog = f"trl-nca {command}"
    # The help comes before anything that imports torch or prints: the short one from dataclasses that import
    # neither torch nor transformers, the whole one from the parser that parses a run
    if HELP_ALL in argv:
        with quiet_bitsandbytes():
            make_parser(prog=prog).print_help()
        return 0
    if any(flag in argv for flag in HELP):
        make_help_parser(prog=prog).print_help()
        return 0

    from .launcher import deepspeed_left_out

    dropped = deepspeed_left_out()
    if dropped:
        print(f"trl-nca: warning: {dropped}", file=sys.stderr)
    parser = make_parser(prog=prog)
    on_cpu = not _accelerator_available()
    if on_cpu:
        # DPOConfig's bf16=True default is ~12x slower on CPU (and refused without use_cpu): choose float32 here.
        # A recipe or flag that sets these explicitly still wins.
        parser.set_defaults(bf16=False, use_cpu=True, gradient_checkpointing=False)
    try:
        script_args, training_args, model_args, dataset_args = parser.parse_args_and_config()[:4]
    except yaml.YAMLError as error:
        raise ValueError(_yaml_problem(error)) from None
    if on_cpu and (training_args.bf16 or training_args.fp16):
        print(_one_line("this recipe needs a GPU (it sets bf16 or fp16); on CPU add --bf16 false"), file=sys.stderr)
        return 2
    if on_cpu:
        print(
            "trl-nca: no GPU found: training on CPU in float32 "
            f"(bf16=False, gradient_checkpointing={training_args.gradient_checkpointing})."
        )
    trainer = main(script_args, training_args, model_args, dataset_args)
    if trainer.accelerator.num_processes > 1:
        # Seen with gloo on CPU: the DDP reducer outlives `destroy_process_group`, and the group's destructor then
        # waits forever on a peer that has already exited. The run is finished and saved: leave without destructors.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def _yaml_problem(error) -> str:
    """`Recipe FILE is not valid YAML: PROBLEM (line L, column C)` from PyYAML's multi-line report."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
    name = mark.name if mark is not None else "the --config file"
    return f"Recipe {name} is not valid YAML: {problem}{where}"


def _one_line(message: str) -> str:
    return f"trl-nca: error: {message}"


def _error_text(error: Exception) -> str:
    """What the command prints of `error`: its first line, or all of DeepSpeed's settings mismatch (with what to do
    on a machine without a GPU, where the launch configs' bf16 is what mismatches)."""
    text = (error.args[0] if isinstance(error, KeyError) and error.args else str(error)).strip()
    lines = text.splitlines()
    if not lines:
        return type(error).__name__
    if not lines[0].startswith(DEEPSPEED_MISMATCH):
        return lines[0]
    if "bf16" in text and not _accelerator_available():
        lines.append(
            "On CPU: launch with `accelerate launch --mixed_precision no ...` (the launch configs set bf16) and train "
            "with --bf16 false (recipes/README.md, DeepSpeed on CPU)."
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(USAGE)
        return 0
    command, rest = argv[0], argv[1:]
    # TrlParser reads sys.argv; give it the arguments that follow the subcommand
    sys.argv = [f"trl-nca {command}", *rest]
    try:
        if command in {"nca", "infonca", "online"}:
            return _train(command, rest)
        if command == "prepare":
            from .scripts.prepare import cli as prepare_cli

            return prepare_cli(rest)
        if command == "generate":
            from .scripts.generate import cli as generate_cli

            return generate_cli(rest)
        if command == "demo":
            from .demo.run import cli as demo_cli

            return demo_cli(rest)
        if command == "plot":
            from .scripts.plot import cli as plot_cli

            return plot_cli(rest)
        print(
            _one_line(f"unknown command {command!r}; choose from nca, infonca, online, prepare, generate, demo, plot"),
            file=sys.stderr,
        )
        return 2
    except (FileNotFoundError, ValueError, KeyError, ImportError) as error:
        if os.environ.get("TRL_NCA_DEBUG"):
            raise
        print(_one_line(_error_text(error)), file=sys.stderr)
        return 2
    except OSError as error:  # e.g. a model id that is neither a local folder nor reachable
        print(_one_line(str(error).splitlines()[0]), file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
