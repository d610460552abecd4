"""Choosing the demo's settings on the validation side: each candidate (a list of `trl-nca demo` options) runs on
validation seeds, scored on the fixed validation set, never on the test set that `make demo` reports.

    python benchmarks/demo_settings.py --records R.jsonl --seeds 100,101,102 \\
        --candidates "now=" "lr1e-3=--learning_rate 0.001" "offline=--mode offline --k 4 --epochs 2"
    python benchmarks/demo_settings.py --records R.jsonl --summarize

Each finished run appends its `summary.json` (with the candidate's name and options) to `--records`; runs already
there are skipped. A run's seconds are only comparable with runs timed alone on the same machine (these runs share
it with whatever else is running): the demo's own time is measured apart (docs/demo.md).
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def run(candidates: list[str], seeds: list[int], records: Path, out: str) -> None:
    from trl_nca.demo.run import run_demo, settings_from_args

    done = set()
    if records.exists():
        done = {(r["candidate"], r["settings"]["seed"]) for r in map(json.loads, records.read_text().splitlines())}
    for seed in seeds:  # seeds outermost: an interrupted search has every candidate on the first seeds
        for candidate in candidates:
            name, _, options = candidate.partition("=")
            if (name, seed) in done:
                continue
            settings = settings_from_args([*options.split(), "--seed", str(seed), "--heldout_split", "validation",
                                           "--output_dir", f"{out}/{name}-{seed}"])  # fmt: skip
            summary = run_demo(settings)
            summary.pop("examples_after")
            with records.open("a") as f:
                f.write(json.dumps({"candidate": name, "options": options, **summary}) + "\n")


def summarize(records: list[dict]) -> str:
    """Per candidate: held-out accuracy before and after (mean over seeds), each seed's gain, the smallest gain (the
    demo's target is on every seed), and the median seconds."""
    lines = ["| candidate | options | seeds | before | after | gain per seed | smallest gain | seconds (median) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    by_name: dict[str, list[dict]] = {}
    for record in records:
        by_name.setdefault(record["candidate"], []).append(record)
    for name, runs in by_name.items():
        runs.sort(key=lambda r: r["settings"]["seed"])
        gains = [r["accuracy_after"] - r["accuracy_before"] for r in runs]
        lines.append(
            f"| {name} | `{runs[0]['options']}` | {len(runs)} | "
            f"{statistics.fmean(r['accuracy_before'] for r in runs):.3f} | "
            f"{statistics.fmean(r['accuracy_after'] for r in runs):.3f} | {', '.join(f'{g:+.3f}' for g in gains)} | "
            f"{min(gains):+.3f} | {statistics.median(r['seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", required=True)
    parser.add_argument("--candidates", nargs="*", default=[], help="NAME=OPTIONS, OPTIONS as `trl-nca demo` takes")
    parser.add_argument("--seeds", default="100,101,102")
    parser.add_argument("--out", default="runs/demo_settings")
    parser.add_argument("--summarize", action="store_true")
    args = parser.parse_args(argv)
    records = Path(args.records)
    if args.summarize:
        print(summarize([json.loads(line) for line in records.read_text().splitlines()]))
        return
    run(args.candidates, [int(s) for s in args.seeds.split(",")], records, args.out)


if __name__ == "__main__":
    main()
