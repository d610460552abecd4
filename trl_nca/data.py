"""Rows of every accepted layout -> canonical K-response rows (`prompt`, `completions`, `rewards`, `ordered`).

The trainers call `convert_to_k_responses` from `_prepare_dataset`; users may call it themselves to inspect or save
the converted data. Each converter checks the values it reads, and a bad value raises a `ValueError` that names the
row index and the source column. `ordered` is True for layouts whose responses are listed best first (preference
pairs, ranked lists and columns): there the listed order breaks ties between equal rewards (see `docs/math.md`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
from datasets import Dataset, IterableDataset
from transformers.utils import logging

from .config_fields import ULTRAFEEDBACK_REWARDS

logger = logging.get_logger(__name__)

# The layouts the trainers accept, by the columns that identify them (also used in error messages)
LAYOUTS = {
    "k_responses": "`prompt`, `completions` (list of K >= 2 responses), `rewards` (list of K numbers)",
    "ranked_list": "`prompt`, `completions` (list of K >= 2 responses, best first) and no `rewards`",
    "preference": "`prompt`, `chosen`, `rejected` (or `chosen`, `rejected` conversations with an implicit prompt), "
    "optional `score_chosen`, `score_rejected`",
    "ultrafeedback": "`instruction`, `completions` (list of dicts with `response` and `overall_score`, "
    "`fine-grained_score` or `annotations`)",
    "ranked_columns": "`A0`, `A1`, ... `A{K-1}` (best first), optional `score_A0` ... `score_A{K-1}`",
}

# Layouts whose responses are listed best first: their order breaks ties between equal rewards
ORDERED_LAYOUTS = ("ranked_list", "preference", "ranked_columns")


class RowError(ValueError):
    """A bad value in one row: the message names the row and the column. `reason` is the message without the row
    and the values, so that `trl-nca prepare` can count dropped rows by their real reason."""

    @property
    def reason(self) -> str:
        text = re.sub(r"^Row [^,]*, ", "", str(self)).split(", got ")[0].split("; ")[0]
        return re.sub(r"\d+", "N", text).rstrip(".")


_RANKED_COLUMN = re.compile(r"^A(\d+)$")


def _layouts_text() -> str:
    return "; ".join(f"{name}: {columns}" for name, columns in LAYOUTS.items())


def detect_layout(column_names: Sequence[str]) -> str:
    """Name of the layout (a key of `LAYOUTS`) that `column_names` follow; `ValueError` when none fits."""
    columns = set(column_names)
    if {"instruction", "completions"} <= columns and "rewards" not in columns:
        return "ultrafeedback"
    if "completions" in columns:
        if "prompt" not in columns:
            raise ValueError(
                "Column 'prompt' is missing: rows with `completions` need a `prompt`. Accepted layouts: "
                + _layouts_text()
            )
        return "k_responses" if "rewards" in columns else "ranked_list"
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
    if isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            number = None
    if number is None or not math.isfinite(number):
        raise RowError(f"Row {row}, column '{column}': expected a finite number as reward, got {value!r}.")
    return number


def _check_training_dtype(rewards: list[float], row: int | None, column: str) -> None:
    """Rewards reach the loss as float32: each must stay finite there, and different rewards must stay different."""
    with np.errstate(over="ignore"):  # an overflow is what is checked for below
        cast = np.asarray(rewards, dtype=np.float64).astype(np.float32)
    for k, (value, low) in enumerate(zip(rewards, cast)):
        if not np.isfinite(low):
            raise RowError(
                f"Row {row}, column '{column}[{k}]': reward {value!r} overflows float32, the dtype rewards are "
                "trained in; rescale the rewards."
            )
    for j in range(len(rewards)):
        for k in range(j + 1, len(rewards)):
            if rewards[j] != rewards[k] and cast[j] == cast[k]:
                raise RowError(
                    f"Row {row}, column '{column}': rewards {rewards[j]!r} and {rewards[k]!r} differ but are equal "
                    "in float32, the dtype rewards are trained in, so they would become a tie; rescale or shift "
                    "the rewards."
                )


def _message_list(value: Any, row: int | None, column: str) -> None:
    if not value:
        raise RowError(f"Row {row}, column '{column}': empty message list; a conversation needs at least one message.")
    for i, message in enumerate(value):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise RowError(
                f"Row {row}, column '{column}', message {i}: expected a dict with a 'role' and a 'content', got "
                f"{message!r}."
            )
        if not isinstance(message.get("content"), (str, list)):  # a missing key reads as None after Arrow
            raise RowError(f"Row {row}, column '{column}', message {i}: the message has no 'content'.")


def _check_text_or_messages(value: Any, row: int | None, column: str, *, prompt: bool) -> str:
    """`"text"` or `"messages"` for a valid prompt or response; a `ValueError` naming the row and column otherwise."""
    if isinstance(value, str):
        if prompt and not value.strip():
            raise RowError(f"Row {row}, column '{column}': empty prompt.")
        return "text"
    if isinstance(value, (list, tuple)):
        _message_list(value, row, column)
        return "messages"
    hint = " (a CSV column whose values all parse as numbers is read as numbers)" if isinstance(value, int) else ""
    raise RowError(
        f"Row {row}, column '{column}': expected text or a list of messages, got {type(value).__name__} "
        f"{value!r}{hint}."
    )


def _check_row(
    prompt: Any,
    completions: list,
    rewards: list[float],
    row: int | None,
    column: str | list[str],
    reward_column: str = "rewards",
) -> None:
    """Every check a canonical row passes, wherever it came from. `column` names the responses' source: one list
    column (its items are `column[k]`) or one column per response."""
    name = column if isinstance(column, str) else ", ".join(column)
    if not isinstance(completions, (list, tuple)):
        raise RowError(f"Row {row}, column '{name}': expected a list of responses, got {type(completions).__name__}.")
    if len(completions) < 2:
        raise RowError(
            f"Row {row}, column '{name}': expected at least 2 responses, got {len(completions)}. NCA and InfoNCA "
            "contrast responses of the same prompt."
        )
    if len(rewards) != len(completions):
        raise RowError(
            f"Row {row}, columns '{name}' and 'rewards': {len(completions)} completions but {len(rewards)} rewards; "
            "they must have the same length."
        )
    kind = _check_text_or_messages(prompt, row, "prompt", prompt=True)
    for k, completion in enumerate(completions):
        source = f"{column}[{k}]" if isinstance(column, str) else column[k]
        if _check_text_or_messages(completion, row, source, prompt=False) != kind:
            raise RowError(
                f"Row {row}, column '{source}': the prompt is {'text' if kind == 'text' else 'a message list'} "
                f"but this response is {'a message list' if kind == 'text' else 'text'}; use the same format for both."
            )
    _check_training_dtype(rewards, row, reward_column)


def _canonical(example: dict, row: int | None) -> dict:
    rewards = example["rewards"]
    if not isinstance(rewards, (list, tuple)):
        raise RowError(f"Row {row}, column 'rewards': expected a list of numbers, got {rewards!r}.")
    rewards = [_reward(value, row, f"rewards[{k}]") for k, value in enumerate(rewards)]
    _check_row(example["prompt"], example["completions"], rewards, row, "completions")
    return {"prompt": example["prompt"], "completions": list(example["completions"]), "rewards": rewards}


def rank_rewards(num_responses: int) -> list[float]:
    """Rewards of a list ranked best first and given without scores: minus the rank, `[0, -1, -2, ...]`."""
    return [-float(k) for k in range(num_responses)]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, (bool, np.bool_))


def _check_no_unread_scores(example: dict, count: int, columns: list[str], row: int | None) -> None:
    """The `count` responses of `columns` have no scores and are read as ranked best first. A list of `count`
    numbers in another column (`scores`, `reward`, `ratings`, ...) would then be ignored, and its order may be the
    reverse of the listed one: a `ValueError` naming the row and the column instead of training on the listed order."""
    for column, value in example.items():
        if column in columns or column in ("prompt", "ordered") or not isinstance(value, (list, tuple)):
            continue
        if len(value) == count and all(v is None or _is_number(v) for v in value) and any(map(_is_number, value)):
            raise RowError(
                f"Row {row}, column '{column}': {count} numbers beside the {count} "
                f"{', '.join(f'`{name}`' for name in columns)}, which without a `rewards` column are read as ranked "
                f"best first (rewards 0, -1, -2, ...), so this column would be ignored; if it holds the rewards, "
                f"rename '{column}' to `rewards` (ranked columns: `score_A0`, `score_A1`, ...), otherwise remove it."
            )


def _ranked_list(example: dict, row: int | None) -> dict:
    completions = example["completions"]
    rewards = rank_rewards(len(completions)) if isinstance(completions, (list, tuple)) else []
    _check_row(example["prompt"], completions, rewards, row, "completions")
    _check_no_unread_scores(example, len(completions), ["completions"], row)
    return {"prompt": example["prompt"], "completions": list(completions), "rewards": rewards}


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


def _implicit_prompt(answers: list, row: int | None, columns: list[str]) -> tuple[list[dict], list[list[dict]]]:
    """The implicit prompt of whole conversations (the common first messages) and the responses after it."""
    for answer, column in zip(answers, columns):
        if not isinstance(answer, list):
            raise RowError(
                f"Row {row}, column '{column}': without a `prompt` column the responses must be whole conversations "
                f"(user turn included), got {type(answer).__name__}."
            )
        _message_list(answer, row, column)
    prompt, completions = _split_prompt(answers)
    if not prompt:
        raise RowError(
            f"Row {row}, column '{columns[0]}': the conversations share no first message, so there is no prompt; add "
            "a `prompt` column."
        )
    return prompt, completions


def _preference(example: dict, row: int | None) -> dict:
    chosen, rejected = example["chosen"], example["rejected"]
    if _has_explicit_prompt(example, [chosen, rejected]):
        prompt = example["prompt"]
    elif isinstance(chosen, list) and isinstance(rejected, list):
        prompt, (chosen, rejected) = _implicit_prompt([chosen, rejected], row, ["chosen", "rejected"])
    else:
        raise RowError(
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
    _check_row(prompt, [chosen, rejected], rewards, row, ["chosen", "rejected"], "score_chosen, score_rejected")
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
        raise RowError(f"Row {row}, column '{column}': no numeric `Rating` in the annotations, got {annotations!r}.")
    return sum(ratings) / len(ratings)


def ultrafeedback_score(completion: Any, reward_field: str, row: int | None, column: str) -> float:
    """The reward of one raw UltraFeedback completion (a dict), by `reward_field`; a `ValueError` naming the row and
    column when the completion has no response or no usable score."""
    if not isinstance(completion, dict) or not isinstance(completion.get("response"), str):
        raise RowError(f"Row {row}, column '{column}': expected a dict with a 'response' text, got {completion!r}.")
    if reward_field == "mean_rating":
        return _mean_rating(completion.get("annotations"), row, f"{column}.annotations")
    return _reward(completion.get(reward_field), row, f"{column}.{reward_field}")


def _ultrafeedback(example: dict, row: int | None, reward_field: str) -> dict:
    completions = example["completions"]
    if not isinstance(completions, (list, tuple)):
        raise RowError(f"Row {row}, column 'completions': expected a list of dicts, got {completions!r}.")
    rewards = [ultrafeedback_score(c, reward_field, row, f"completions[{k}]") for k, c in enumerate(completions)]
    if not isinstance(example["instruction"], str) or not example["instruction"].strip():
        raise RowError(f"Row {row}, column 'instruction': expected the prompt text, got {example['instruction']!r}.")
    prompt = [{"role": "user", "content": example["instruction"]}]
    responses = [[{"role": "assistant", "content": completion["response"]}] for completion in completions]
    _check_row(prompt, responses, rewards, row, "completions", f"completions[].{reward_field}")
    return {"prompt": prompt, "completions": responses, "rewards": rewards}


def _ranked_columns(example: dict, row: int | None) -> dict:
    numbered = sorted((int(m.group(1)), key) for key in example if (m := _RANKED_COLUMN.match(key)))
    names = [name for _, name in numbered]
    scored = any(f"score_{name}" in example for name in names)
    answers, rewards, present = [], [], []
    for name in names:
        if example[name] is None and example.get(f"score_{name}") is None:
            continue  # this row has fewer responses than the widest one
        if example[name] is None:
            raise RowError(f"Row {row}, column '{name}': missing response while `score_{name}` is set.")
        answers.append(example[name])
        present.append(name)
        if scored:
            rewards.append(_reward(example.get(f"score_{name}"), row, f"score_{name}"))
    if not scored:
        rewards = rank_rewards(len(answers))
    if _has_explicit_prompt(example, answers):
        prompt, completions = example["prompt"], answers
    else:
        prompt, completions = _implicit_prompt(answers, row, present)
    _check_row(prompt, completions, rewards, row, present, "score_A0..")
    if not scored:
        _check_no_unread_scores(example, len(present), present, row)
    return {"prompt": prompt, "completions": completions, "rewards": rewards}


_CONVERTERS = {
    "k_responses": lambda example, row, _: _canonical(example, row),
    "ranked_list": lambda example, row, _: _ranked_list(example, row),
    "preference": lambda example, row, _: _preference(example, row),
    "ultrafeedback": _ultrafeedback,
    "ranked_columns": lambda example, row, _: _ranked_columns(example, row),
}


def to_k_responses(
    example: dict, layout: str | None = None, *, ultrafeedback_reward: str = "overall_score", row: int | None = None
) -> dict:
    """Convert one row of any accepted layout to the canonical `{"prompt", "completions", "rewards", "ordered"}`.

    Args:
        example: the row.
        layout: a key of `LAYOUTS`; detected from the row's keys when `None`.
        ultrafeedback_reward: which score of raw UltraFeedback becomes the reward: `"overall_score"`,
            `"fine-grained_score"`, or `"mean_rating"` (the mean of the annotation ratings, "N/A" left out).
        row: the row index, used in error messages.

    Example:
        >>> to_k_responses({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"})
        {'prompt': '2+2=', 'completions': [' 4', ' 5'], 'rewards': [1.0, 0.0], 'ordered': True}
    """
    if ultrafeedback_reward not in ULTRAFEEDBACK_REWARDS:
        raise ValueError(f"ultrafeedback_reward must be one of {ULTRAFEEDBACK_REWARDS}, got {ultrafeedback_reward!r}")
    layout = layout or detect_layout(list(example))
    if layout not in _CONVERTERS:
        raise ValueError(f"Unknown layout {layout!r}; accepted layouts: {_layouts_text()}")
    return {**_CONVERTERS[layout](example, row, ultrafeedback_reward), "ordered": layout in ORDERED_LAYOUTS}


def _source_columns(layout: str, column_names: Sequence[str]) -> list[str]:
    fixed = {
        "k_responses": ["prompt", "completions", "rewards"],
        "ranked_list": ["prompt", "completions"],
        "preference": ["prompt", "chosen", "rejected", "score_chosen", "score_rejected"],
        "ultrafeedback": ["instruction", "completions", "source", "models", "correct_answers", "incorrect_answers"],
    }.get(layout, [])
    ranked = [c for c in column_names if _RANKED_COLUMN.match(c) or _RANKED_COLUMN.match(c.removeprefix("score_"))]
    return [c for c in column_names if c in fixed or c in ranked or c == "ordered"]


def convert_to_k_responses(
    dataset: Dataset | IterableDataset,
    *,
    ultrafeedback_reward: str = "overall_score",
    num_proc: int | None = None,
) -> Dataset | IterableDataset:
    """Convert a whole dataset of any accepted layout to canonical rows, checking every row.

    The layout's own columns are replaced by `prompt`, `completions`, `rewards` and `ordered`; other columns (e.g.
    `tools`) are kept.
    """
    column_names = dataset.column_names
    if column_names is None:  # an IterableDataset without features
        column_names = list(next(iter(dataset)))
    layout = detect_layout(column_names)
    if layout == "ranked_list":
        logger.warning(
            "The dataset has `completions` but no `rewards`: each row's completions are read as ranked best first, "
            "with rewards 0, -1, -2, ... (reward_temperature is then in rank steps)."
        )

    def convert(example, index):
        return to_k_responses(example, layout, ultrafeedback_reward=ultrafeedback_reward, row=index)

    kwargs = {"num_proc": num_proc, "desc": "Converting to K-response rows"} if isinstance(dataset, Dataset) else {}
    return dataset.map(convert, with_indices=True, remove_columns=_source_columns(layout, column_names), **kwargs)
