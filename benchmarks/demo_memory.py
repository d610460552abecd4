"""Where the demo's memory goes: resident memory (RSS) sampled every 50 ms while `trl-nca demo` runs, by phase.

The phases are the demo's own steps (model load, held-out scoring before, then each forward and backward pass,
with the generation and scoring of completions inside the pass it feeds; held-out scoring after), marked by
wrapping the functions that run them. For each phase: the peak RSS while it ran and the RSS when it ended (both in
GB, of the whole process); the last line is the run's peak, which `/usr/bin/time -v` reports as "Maximum resident
set size". `--trim` returns freed heap memory to the system after each phase (glibc's `malloc_trim(0)`), to show how
much of the RSS after a phase is memory the process no longer uses (docs/layouts.md).

    python benchmarks/demo_memory.py                    # the demo's settings (any `trl-nca demo` option passes on)
    python benchmarks/demo_memory.py --quick --trim
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import sys
import threading
import time

PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE / 2**30


class Trace:
    """RSS sampled every `interval` seconds in a thread; `phase(name)` records the peak while a block runs."""

    def __init__(self, interval: float = 0.05, trim: bool = False):
        self.interval, self.trim = interval, trim
        self.phases: list[dict] = []
        self.peak = self.current = rss_gb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self):
        while not self._stop.is_set():
            value = rss_gb()
            self.current, self.peak = max(self.current, value), max(self.peak, value)
            time.sleep(self.interval)

    @contextlib.contextmanager
    def phase(self, name: str):
        outer = self.current  # an enclosing phase's peak so far (phases nest: a generation inside its pass)
        self.current = start = rss_gb()
        try:
            yield
        finally:
            peak = max(self.current, rss_gb())
            self.current = max(outer, peak)
            record = {"phase": name, "start_gb": round(start, 2), "peak_gb": round(peak, 2)}
            if self.trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
            record["end_gb"] = round(rss_gb(), 2)
            self.phases.append(record)

    def wrap(self, owner, name: str, label):
        """Run `owner.name` inside a phase named `label(...)` (a string, or a function of the call's arguments)."""
        original = getattr(owner, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            with self.phase(label if isinstance(label, str) else label(*args, **kwargs)):
                return original(*args, **kwargs)

        setattr(owner, name, wrapped)

    def close(self):
        self._stop.set()
        self._thread.join()


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    trim = "--trim" in argv
    argv = [a for a in argv if a != "--trim"]
    trace = Trace(trim=trim)

    from transformers import Trainer
    from trl import GRPOTrainer

    import trl_nca.demo.run as run
    import trl_nca.generation as generation

    calls = {"scoring": 0}

    def scoring(*args, **kwargs):
        calls["scoring"] += 1
        return "held-out scoring " + ("before" if calls["scoring"] == 1 else "after")

    trace.wrap(run, "load_model", "model load")
    trace.wrap(run, "heldout_accuracy", scoring)
    trace.wrap(generation, "build_reward_dataset", "offline: sampling the reward dataset")
    passes, generations = {"n": 0}, {"n": 0}

    def training_pass(self, *args, **kwargs):  # one forward and backward pass (with a generation where one is due)
        passes["n"] += 1
        return f"pass {passes['n']}: forward and backward"

    def generation(self, *args, **kwargs):  # runs inside the pass it feeds
        generations["n"] += 1
        return f"pass {passes['n']}: generation {generations['n']} and its rewards"

    trace.wrap(GRPOTrainer, "_generate_and_score_completions", generation)
    trace.wrap(Trainer, "training_step", training_pass)
    with trace.phase("the whole demo"):
        summary = run.run_demo(_settings(run, argv))
    trace.close()
    record = {"phases": trace.phases, "peak_gb": round(trace.peak, 2), "trim": trim,
              "accuracy_before": summary["accuracy_before"], "accuracy_after": summary["accuracy_after"],
              "seconds": summary["seconds"]}  # fmt: skip
    print("\n| phase | RSS at start (GB) | peak while it ran (GB) | RSS after (GB) |")
    print("|---|---|---|---|")
    for p in trace.phases:
        print(f"| {p['phase']} | {p['start_gb']:.2f} | {p['peak_gb']:.2f} | {p['end_gb']:.2f} |")
    print(f"\npeak resident memory {record['peak_gb']:.2f} GB; accuracy {summary['accuracy_before']:.3f} -> "
          f"{summary['accuracy_after']:.3f}; {summary['seconds']} s")  # fmt: skip
    print("RECORD " + json.dumps(record))
    return record


def _settings(run, argv):
    args = vars(run.make_parser().parse_args(argv))
    quick = args.pop("quick")
    overrides = {k: v for k, v in args.items() if v is not None}
    return run.DemoSettings.quick(**overrides) if quick else run.DemoSettings(**overrides)


if __name__ == "__main__":
    main()
