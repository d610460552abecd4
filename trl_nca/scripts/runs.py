"""Which run the checkpoints and trainer states in an output folder belong to.

Trainer writes every run's `checkpoint-N` folders into `output_dir`, so a new run in a folder that holds an earlier
run's checkpoints mixes the two, and Trainer's `get_last_checkpoint` (the highest number) can pick the other run's.
The commands record their runs: `trl_nca_run.json` in the output folder names the run that last started there, and
the `TrlNcaRun` callback stamps the same id into every trainer state the run saves (in the `stateful_callbacks` of
`trainer_state.json`, which Trainer writes last, so a checkpoint cut while saving has none). `latest_state` picks the
newest trainer state of the recorded run, for `--resume_from_checkpoint true` and `trl-nca plot`. A folder without a
record (plain TRL) falls back to Trainer's choice, the newest state, after checking that its log history continues
every other one's: where it does not, two runs are mixed, and which one is wanted cannot be told.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import dataclass
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

RECORD = "trl_nca_run.json"
STATE = "trainer_state.json"


class TrlNcaRun(TrainerCallback, ExportableState):
    """Records the run in its output folder when training begins, and stamps its id into every trainer state it
    saves. A resumed run keeps the id of its checkpoint."""

    def __init__(self, run_id: str | None = None):
        self.run_id = run_id or uuid.uuid4().hex[:12]

    def state(self) -> dict:
        return {"args": {"run_id": self.run_id}, "attributes": {}}

    def on_train_begin(self, args, state, control, **kwargs):
        if args.should_save:
            record = read_run_record(args.output_dir)
            if record is None or record.get("run_id") != self.run_id:
                Path(args.output_dir).mkdir(parents=True, exist_ok=True)
                started = datetime.datetime.now().isoformat(timespec="seconds")
                (Path(args.output_dir) / RECORD).write_text(json.dumps({"run_id": self.run_id, "started": started}))


def read_run_record(output_dir: str | Path) -> dict | None:
    try:
        return json.loads((Path(output_dir) / RECORD).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def read_state(path: Path) -> dict | None:
    """A `trainer_state.json`, or None when it is missing or unreadable (Trainer writes it last: a checkpoint without
    a readable one was cut while being written)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run_id_of(state: dict | None) -> str | None:
    """The run id `TrlNcaRun` stamped into a trainer state, or None."""
    stamp = ((state or {}).get("stateful_callbacks") or {}).get(TrlNcaRun.__name__)
    stamp = stamp[0] if isinstance(stamp, list) and stamp else stamp
    return (stamp or {}).get("args", {}).get("run_id") if isinstance(stamp, dict) else None


def step_of(checkpoint: str | Path) -> int:
    return int(Path(checkpoint).name.rsplit("-", 1)[-1])


def numbered_checkpoints(output_dir: str | Path) -> list[Path]:
    """The `checkpoint-N` folders, by N (Trainer's naming; `checkpoint-final` and the like are not Trainer's)."""
    found = (p for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p.name.split("-", 1)[1].isdigit())
    return sorted(found, key=step_of)


def unnumbered_checkpoints(output_dir: str | Path) -> list[str]:
    numbered = set(numbered_checkpoints(output_dir))
    return sorted(p.name for p in Path(output_dir).glob("checkpoint-*") if p.is_dir() and p not in numbered)


@dataclass
class Saved:
    """One trainer state in an output folder: the folder's own `trainer_state.json` or a checkpoint's."""

    path: Path  # the folder that holds `trainer_state.json`
    name: str  # `checkpoint-N`, or `trainer_state.json` for the output folder's own
    step: int
    run_id: str | None
    log: list[dict]

    @property
    def is_checkpoint(self) -> bool:
        return self.name != STATE


@dataclass
class Choice:
    state: Saved  # the newest trainer state of the run that last started in the folder
    other_runs: list[Saved]  # states of other runs, passed over
    incomplete: list[str]  # numbered checkpoints newer than `state` without a readable trainer state


def latest_state(output_dir: str | Path, *, checkpoints_only: bool = False) -> Choice | None:
    """The newest trainer state of the run that last started in `output_dir` (see the module docstring); None when the
    folder holds none. A `ValueError` says why when the folder mixes runs and the record cannot tell them apart."""
    out = Path(output_dir)
    saved = []
    if not checkpoints_only and (state := read_state(out / STATE)) is not None:
        saved.append(Saved(out, STATE, state.get("global_step", 0), run_id_of(state), state.get("log_history", [])))
    checkpoints = numbered_checkpoints(out)
    for checkpoint in checkpoints:
        if (state := read_state(checkpoint / STATE)) is not None:
            saved.append(
                Saved(checkpoint, checkpoint.name, step_of(checkpoint), run_id_of(state), state.get("log_history", []))
            )
    if not saved:
        return None

    def newest(states):  # the output folder's own state (the end of a run) wins a tie with its last checkpoint
        return max(states, key=lambda s: (s.step, not s.is_checkpoint))

    record = read_run_record(out)
    if record is not None:
        mine = [s for s in saved if s.run_id == record.get("run_id")]
        others = [s for s in saved if s.run_id != record.get("run_id")]
        if not mine:
            found = ", ".join(f"{s.name} ({_run(s.run_id)})" for s in others)
            raise ValueError(
                f"none of the trainer states in {out} is from the run that last started there (run "
                f"{record.get('run_id')}, started {record.get('started', '?')}): {found}; give the checkpoint folder "
                "to use"
            )
        chosen = newest(mine)
    else:
        chosen, others = newest(saved), []
        for state in sorted(saved, key=lambda s: s.step):
            step = _divergence(chosen, state)
            if state is not chosen and step is not None:
                raise ValueError(
                    f"{out} holds checkpoints of more than one run: {chosen.name} does not continue {state.name} "
                    f"(their log histories differ at step {step}); give the checkpoint folder to use"
                )
    readable = {s.path for s in saved}
    incomplete = [c.name for c in checkpoints if c not in readable and step_of(c) > chosen.step]
    return Choice(chosen, others, incomplete)


def _run(run_id: str | None) -> str:
    return f"run {run_id}" if run_id else "no run id"


def _divergence(later: Saved, earlier: Saved) -> int | None:
    """None when `later`'s log history starts with `earlier`'s (one run: Trainer keeps the log across a resume), else
    the step of the first entry where they differ."""
    for i, entry in enumerate(earlier.log):
        if i >= len(later.log) or later.log[i] != entry:
            return entry.get("step", earlier.step)
    return None


def describe_others(choice: Choice) -> str:
    """`checkpoint-4 in it is from another run (run 1a2b3c)`, for warnings."""
    names = ", ".join(s.name for s in choice.other_runs)
    runs = ", ".join(dict.fromkeys(_run(s.run_id) for s in choice.other_runs))
    verb = "is from another run" if len(choice.other_runs) == 1 else "are from other runs"
    return f"{names} in it {verb} ({runs})"
