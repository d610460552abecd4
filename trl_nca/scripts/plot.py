"""`trl-nca plot OUTPUT_DIR`: the likelihood trend and reward accuracy of a finished run, from its log history."""

from __future__ import annotations

from pathlib import Path

# The drawing lives in the library (the demo draws the same plot); this module finds the run's log history.
from ..plotting import plot_log_history

__all__ = ["cli", "load_log_history", "plot_log_history"]


def load_log_history(output_dir: str | Path) -> list[dict]:
    """The Trainer's log history of a run: from the newest trainer state of the run that last started in the folder
    (its own `trainer_state.json`, written at the end of a run, or its newest numbered checkpoint's; see
    `trl_nca.scripts.runs`). States of other runs are named in a warning."""
    from transformers.utils import logging

    from .runs import describe_others, latest_state, unnumbered_checkpoints

    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Run folder not found: {output_dir} (no such folder)")
    try:
        choice = latest_state(output_dir)
    except ValueError as error:
        raise ValueError(f"Cannot plot {output_dir}: {error}") from None
    if choice is None:
        ignored = unnumbered_checkpoints(output_dir)
        raise FileNotFoundError(
            f"No trainer state in {output_dir}: no trainer_state.json and no complete numbered checkpoint "
            f"(checkpoint-N) in it" + (f" (ignored: {', '.join(ignored)})" if ignored else "")
        )
    if choice.other_runs:
        logging.get_logger(__name__).warning(
            f"Plotting {choice.state.name}, the newest trainer state of the run that last started in {output_dir}; "
            f"{describe_others(choice)}, and is not plotted."
        )
    return choice.state.log


def cli(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="trl-nca plot",
        description=(
            "Plot a finished run's log history to a PNG: offline runs (nca, infonca) the likelihood of the best and "
            "worst response and the reward accuracy; online runs the sample reward, the groups without signal and "
            "the completion length."
        ),
    )
    parser.add_argument("output_dir", help="the run's output folder (with trainer_state.json or checkpoints)")
    parser.add_argument("--out", default=None, help="PNG path (default OUTPUT_DIR/plot.png)")
    args = parser.parse_args(argv)
    out = plot_log_history(
        load_log_history(args.output_dir),
        args.out or Path(args.output_dir) / "plot.png",
        title=Path(args.output_dir).name,
    )
    print(f"Wrote {out}")
    return 0
