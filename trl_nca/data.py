"""Rows of every accepted layout -> canonical K-response rows (`prompt`, `completions`, `rewards`).

The trainers call `convert_to_k_responses` from `_prepare_dataset`; users may call it themselves to inspect or save
the converted data. Each converter checks the values it reads, and a bad value raises a `ValueError` that names the
row index and the source column.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, IterableDataset

# The layouts the trainers accept, by the columns that identify them (also used in error messages)
LAYOUTS = {
    "k_responses": "`prompt`, `completions` (list of K >= 2 responses), `rewards` (list of K numbers)",
    "preference": "`prompt`, `chosen`, `rejected` (or `chosen`, `rejected` conversations with an implicit prompt), "
    "optional `score_chosen`, `score_rejected`",
    "ultrafeedback": "`instruction`, `completions` (list of dicts with `response` and `overall_score`, "
    "`fine-grained_score` or `annotations`)",
    "ranked_columns": "`A0`, `A1`, ... `A{K-1}` (conversations, best first) with `score_A0` ... `score_A{K-1}`",
}

ULTRAFEEDBACK_REWARDS = ("overall_score", "fine-grained_score", "mean_rating")

_RANKED_COLUMN = re.compile(r"^A(\d+)$")


def _layouts_text() -> str:
    return "; ".join(f"{name}: {columns}" for name, columns in LAYOUTS.items())


def detect_layout(column_names: Sequence[str]) -> str:
    """Name of the layout (a key of `LAYOUTS`) that `column_names` follow; `ValueError` when none fits."""
    columns = set(column_names)
    if {"completions", "rewards"} <= columns:
        if "prompt" not in columns:
            raise ValueError(
                "Column 'prompt' is missing: rows with `completions` and `rewards` need a `prompt`. Accepted layouts: "
                + _layouts_text()
            )
        return "k_responses"
    if {"instruction", "completions"} <= columns:
        return "ultrafeedback"
    if {"chosen", "rejected"} <= columns:
        return "preference"
    if {"A0", "A1"} <= columns:
        return "ranked_columns"
    raise ValueError(
        f"Cannot tell the layout of a dataset with columns {sorted(columns)}. Accepted layouts: {_layouts_text()}"
    )


def _reward(value: Any, row: int | None, column: str) -> float:
    """The reward as a float; `ValueError` naming the row and column when it is not a finite number."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise ValueError(f"Row {row}, column '{column}': expected a finite number as reward, got {value!r}.")
    return number


def _check_responses(completions: Any, rewards: list[float], row: int | None, column: str) -> None:
    if not isinstance(completions, (list, tuple)):
        raise ValueError(
            f"Row {row}, column '{column}': expected a list of responses, got {type(completions).__name__}."
        )
    if len(completions) < 2:
        raise ValueError(
            f"Row {row}, column '{column}': expected at least 2 responses, got {len(completions)}. NCA and InfoNCA "
            "contrast responses of the same prompt."
        )
    if len(rewards) != len(completions):
        raise ValueError(
            f"Row {row}, columns '{column}' and 'rewards': {len(completions)} completions but {len(rewards)} rewards; "
            "they must have the same length."
        )


def _canonical(example: dict, row: int | None) -> dict:
    rewards = example["rewards"]
    if not isinstance(rewards, (list, tuple)):
        raise ValueError(f"Row {row}, column 'rewards': expected a list of numbers, got {rewards!r}.")
    rewards = [_reward(value, row, f"rewards[{k}]") for k, value in enumerate(rewards)]
    _check_responses(example["completions"], rewards, row, "completions")
    return {"prompt": example["prompt"], "completions": list(example["completions"]), "rewards": rewards}


def _split_prompt(conversations: list[list[dict]]) -> tuple[list[dict], list[list[dict]]]:
    """The longest common prefix of message lists (the implicit prompt) and what follows it in each."""
    prefix = 0
    shortest = min(len(messages) for messages in conversations)
    while prefix < shortest - 1 and all(m[prefix] == conversations[0][prefix] for m in conversations):
        prefix += 1
    return conversations[0][:prefix], [messages[prefix:] for messages in conversations]


def _has_explicit_prompt(example: dict, answers: list) -> bool:
    """Whether the row's `prompt` column is the prompt of its answers.

    UltraFeedback-binarized keeps a text `prompt` next to whole conversations (user turn included) in `chosen` and
    `rejected`; there the conversations carry the prompt, and the text column is only a copy of it.
    """
    prompt = example.get("prompt")
    if prompt is None:
        return False
    return not (isinstance(prompt, str) and answers and all(isinstance(a, list) for a in answers))


def _preference(example: dict, row: int | None) -> dict:
    chosen, rejected = example["chosen"], example["rejected"]
    if _has_explicit_prompt(example, [chosen, rejected]):
        prompt = example["prompt"]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, (chosen, rejected) = _split_prompt([chosen, rejected])
    else:
        raise ValueError(
            f"Row {row}, column 'prompt': text preference rows need a `prompt`; only conversational rows can carry "
            "an implicit prompt."
        )
    if "score_chosen" in example or "score_rejected" in example:
        rewards = [
            _reward(example.get("score_chosen"), row, "score_chosen"),
            _reward(example.get("score_rejected"), row, "score_rejected"),
        ]
    else:
        # DPO semantics without scores: the chosen response is the better one
        rewards = [1.0, 0.0]
    return {"prompt": prompt, "completions": [chosen, rejected], "rewards": rewards}


def _mean_rating(annotations: Any, row: int | None, column: str) -> float:
    ratings = []
    aspects = annotations.values() if isinstance(annotations, dict) else []
    for aspect in aspects:
        entries = aspect if isinstance(aspect, list) else [aspect]
        for entry in entries:
            rating = entry.get("Rating") if isinstance(entry, dict) else None
            try:
                value = float(rating)
            except (TypeError, ValueError):
                continue  # "N/A" and missing ratings do not count
            if math.isfinite(value):
                ratings.append(value)
    if not ratings:
        raise ValueError(f"Row {row}, column '{column}': no numeric `Rating` in the annotations, got {annotations!r}.")
    return sum(ratings) / len(ratings)


def _ultrafeedback(example: dict, row: int | None, reward_field: str) -> dict:
    completions = example["completions"]
    if not isinstance(completions, (list, tuple)):
        raise ValueError(f"Row {row}, column 'completions': expected a list of dicts, got {completions!r}.")
    responses, rewards = [], []
    for k, completion in enumerate(completions):
        column = f"completions[{k}]"
        if not isinstance(completion, dict) or "response" not in completion:
            raise ValueError(f"Row {row}, column '{column}': expected a dict with a 'response', got {completion!r}.")
        if reward_field == "mean_rating":
            reward = _mean_rating(completion.get("annotations"), row, f"{column}.annotations")
        else:
            reward = _reward(completion.get(reward_field), row, f"{column}.{reward_field}")
        responses.append([{"role": "assistant", "content": completion["response"]}])
        rewards.append(reward)
    _check_responses(responses, rewards, row, "completions")
    return {
        "prompt": [{"role": "user", "content": example["instruction"]}],
        "completions": responses,
        "rewards": rewards,
    }


def _ranked_columns(example: dict, row: int | None) -> dict:
    names = sorted((int(m.group(1)), key) for key in example if (m := _RANKED_COLUMN.match(key)))
    answers, rewards = [], []
    for _, name in names:
        if example[name] is None and example.get(f"score_{name}") is None:
            continue  # this row has fewer responses than the widest one
        if example[name] is None:
            raise ValueError(f"Row {row}, column '{name}': missing response while `score_{name}` is set.")
        answers.append(example[name])
        rewards.append(_reward(example.get(f"score_{name}"), row, f"score_{name}"))
    if _has_explicit_prompt(example, answers):
        prompt, completions = example["prompt"], answers
    elif answers and all(isinstance(a, list) for a in answers):
        prompt, completions = _split_prompt(answers)
    else:
        raise ValueError(
            f"Row {row}, column 'A0': the responses must be conversations that include the user turn, or the row "
            "needs a `prompt` column."
        )
    _check_responses(completions, rewards, row, "A0..A{K-1}")
    return {"prompt": prompt, "completions": completions, "rewards": rewards}


def to_k_responses(
    example: dict, layout: str | None = None, *, ultrafeedback_reward: str = "overall_score", row: int | None = None
) -> dict:
    """Convert one row of any accepted layout to the canonical `{"prompt", "completions", "rewards"}`.

    Args:
        example: the row.
        layout: a key of `LAYOUTS`; detected from the row's keys when `None`.
        ultrafeedback_reward: which score of raw UltraFeedback becomes the reward: `"overall_score"`,
            `"fine-grained_score"`, or `"mean_rating"` (the mean of the annotation ratings, "N/A" left out).
        row: the row index, used in error messages.

    Example:
        >>> to_k_responses({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"})
        {'prompt': '2+2=', 'completions': [' 4', ' 5'], 'rewards': [1.0, 0.0]}
    """
    if ultrafeedback_reward not in ULTRAFEEDBACK_REWARDS:
        raise ValueError(f"ultrafeedback_reward must be one of {ULTRAFEEDBACK_REWARDS}, got {ultrafeedback_reward!r}")
    layout = layout or detect_layout(list(example))
    if layout == "k_responses":
        return _canonical(example, row)
    if layout == "preference":
        return _preference(example, row)
    if layout == "ultrafeedback":
        return _ultrafeedback(example, row, ultrafeedback_reward)
    if layout == "ranked_columns":
        return _ranked_columns(example, row)
    raise ValueError(f"Unknown layout {layout!r}; accepted layouts: {_layouts_text()}")


def _source_columns(layout: str, column_names: Sequence[str]) -> list[str]:
    fixed = {
        "k_responses": ["prompt", "completions", "rewards"],
        "preference": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"],
        "ultrafeedback": ["instruction", "completions", "source", "models", "correct_answers", "incorrect_answers"],
    }.get(layout, [])
    ranked = [c for c in column_names if _RANKED_COLUMN.match(c) or _RANKED_COLUMN.match(c.removeprefix("score_"))]
    return [c for c in column_names if c in fixed or c in ranked]


def convert_to_k_responses(
    dataset: Dataset | IterableDataset,
    *,
    ultrafeedback_reward: str = "overall_score",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Convert a whole dataset of any accepted layout to canonical rows, checking every row.

    The layout's own columns are replaced by `prompt`, `completions` and `rewards`; other columns (e.g. `tools`) are
    kept.
    """
    column_names = dataset.column_names
    if column_names is None:  # an IterableDataset without features
        column_names = list(next(iter(dataset)))
    layout = detect_layout(column_names)

    def convert(example, index):
        return to_k_responses(example, layout, ultrafeedback_reward=ultrafeedback_reward, row=index)

    kwargs = {"num_proc": num_proc, "desc": "Converting to K-response rows"} if isinstance(dataset, Dataset) else {}
    return dataset.map(convert, with_indices=True, remove_columns=_source_columns(layout, column_names), **kwargs)
