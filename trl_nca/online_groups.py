"""Groups of completions in the online trainers: what goes in (checked prompts and reward values), how a generation
batch keeps each prompt's completions together (the sampler, the shuffle by whole groups), and each group's labels.

Pure functions and small classes; `OnlineNCATrainer` and `OnlineInfoNCATrainer` call them from their GRPOTrainer
overrides (`trl_nca.online_trainer`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import pyarrow.compute as pc
import torch
from datasets import Dataset, IterableDataset
from trl.trainer.utils import RepeatSampler, is_async_callable

from .data import RowError
from .data import _check_text_or_messages as check_text_or_messages
from .losses import soft_labels
from .rewards import RewardError, check_reward_columns, check_reward_values, reward_name


def checked_reward(func, group_size: int):
    """A reward function whose values are checked (`trl_nca.rewards.check_reward_values`; `None`, GRPO's "not
    applicable", passes), with the name and the sync/async kind of the original."""
    name = reward_name(func)

    if is_async_callable(func):  # async functions, partials of them, and instances with an async __call__ (as TRL)

        @functools.wraps(func)
        async def checked_async(prompts, completions, **kwargs):
            values = await func(prompts=prompts, completions=completions, **kwargs)
            return check_reward_values(name, values, prompts, group_size, allow_none=True)

        return checked_async

    @functools.wraps(func)
    def checked(prompts, completions, **kwargs):
        values = func(prompts=prompts, completions=completions, **kwargs)
        return check_reward_values(name, values, prompts, group_size, allow_none=True)

    return checked


class EpochSeededRepeatSampler(RepeatSampler):
    """TRL's `RepeatSampler`, with the order of each epoch drawn from `seed + epoch` (`set_epoch`, which Trainer calls
    every epoch) instead of from a generator that only advances: a run resumed from a checkpoint then sees the
    prompts in the order of the uninterrupted run. The first epoch's order is `RepeatSampler`'s."""

    def set_epoch(self, epoch: int) -> None:
        if self.shuffle and self.seed is not None:
            self.generator.manual_seed(self.seed + epoch)


def shuffle_groups(batch: dict, group_size: int) -> dict:
    """Shuffle a generation batch by whole groups of `group_size` consecutive completions (as TRL's
    `shuffle_sequence_dict` shuffles by completion): the completions of a prompt stay together and in order."""
    size = len(next(value for value in batch.values() if value is not None and not _is_scalar(value)))
    order = torch.randperm(size // group_size)
    index = (order[:, None] * group_size + torch.arange(group_size)[None, :]).flatten()

    def permute(value):
        if value is None or _is_scalar(value):
            return value
        return value[index] if isinstance(value, torch.Tensor) else [value[i] for i in index]

    return {key: permute(value) for key, value in batch.items()}


def _is_scalar(value) -> bool:
    return isinstance(value, torch.Tensor) and value.ndim == 0


@dataclass
class GroupLabels:
    """Every completion of a generation batch by group, `(G, K)`: the summed `rewards` (float32), whether some reward
    function `scored` it, whether it is `valid` (scored and kept a token), its soft `labels`, its group's number of
    valid completions (`sizes`), and `(G,)` whether the group is `tied` (fewer than two valid completions, or all
    their rewards equal: no signal)."""

    rewards: torch.Tensor
    scored: torch.Tensor
    valid: torch.Tensor
    labels: torch.Tensor
    sizes: torch.Tensor
    tied: torch.Tensor


def group_labels(rewards_per_func, weights, kept, group_size: int, reward_temperature: float, names) -> GroupLabels:
    """The labels of every group from GRPO's gathered `(completions, functions)` rewards (NaN: the function returned
    None), the reward `weights` and which completions `kept` a token."""
    scored = ~torch.isnan(rewards_per_func).all(dim=1)
    valid = (scored & kept).view(-1, group_size)
    rewards = summed_rewards(rewards_per_func, weights.to(rewards_per_func.device), valid.flatten(), group_size, names)
    rewards = rewards.view(-1, group_size)
    labels = soft_labels(rewards, valid, reward_temperature=reward_temperature)
    masked = rewards.masked_fill(~valid, torch.nan)
    spread = masked.nan_to_num(-torch.inf).amax(1) - masked.nan_to_num(torch.inf).amin(1)
    tied = (valid.sum(1) < 2) | (spread == 0)
    sizes = valid.sum(dim=1, keepdim=True).expand_as(rewards)
    return GroupLabels(rewards, scored.view(-1, group_size), valid, labels, sizes, tied)


def summed_rewards(rewards_per_func, weights, valid, group_size: int, names) -> torch.Tensor:
    """The weighted sum of the reward functions, float32 as GRPO's; a `RewardError` where the sum overflows float32
    or where two different sums of a group become equal there (a silent tie)."""
    exact = (rewards_per_func.double() * weights.double()).nansum(dim=1)
    rewards = exact.float()
    bad = valid & ~torch.isfinite(rewards)
    collapsed = (exact.view(-1, group_size, 1) != exact.view(-1, 1, group_size)) & (
        rewards.view(-1, group_size, 1) == rewards.view(-1, 1, group_size)
    )
    collapsed &= valid.view(-1, group_size, 1) & valid.view(-1, 1, group_size)
    if bool(bad.any()) or bool(collapsed.any()):
        i = int(bad.nonzero()[0]) if bool(bad.any()) else int(collapsed.any(-1).flatten().nonzero()[0])
        problem = "overflows float32" if bool(bad.any()) else "ties with another in float32 though they differ"
        raise RewardError(
            f"The weighted sum of the reward functions {names} for completion {i % group_size} of prompt "
            f"{i // group_size} is {exact[i].item()!r}, which {problem}, the dtype rewards are trained in; rescale "
            "the rewards or `reward_weights`."
        )
    return rewards


def named_datasets(train_dataset, eval_dataset):
    """`(split name, dataset)` of the train dataset and of each eval dataset (one, or a dict of them)."""
    named = [("train", train_dataset)] if train_dataset is not None else []
    if isinstance(eval_dataset, dict):
        named += [(f"eval '{name}'", dataset) for name, dataset in eval_dataset.items()]
    elif eval_dataset is not None:
        named.append(("eval", eval_dataset))
    return named


def check_images(dataset, split: str) -> None:
    """Image prompts (`image` or `images`) are all-or-none: a row without its image among rows with images is
    refused, naming the row (GRPOTrainer fails on it with a TypeError in the middle of a step)."""
    for column in ("image", "images"):
        if column not in dataset.column_names:
            continue
        values = dataset.select_columns([column]).with_format("arrow")[column]  # no image decoded
        empty = values.is_null()
        if column == "images":
            empty = pc.or_(empty, pc.equal(pc.fill_null(pc.list_value_length(values), 0), 0))
        missing = [i for i, none in enumerate(empty.to_pylist()) if none]
        if missing and len(missing) < len(values):
            raise ValueError(
                f"{split.capitalize()} dataset: row {missing[0]}, column {column!r}: no image, where other rows have "
                f"one ({len(missing)} of {len(values)} rows have none). GRPOTrainer takes image prompts or text "
                "prompts in one dataset, not both: split them into two datasets, or drop the rows without images."
            )


def check_prompts(dataset, split: str) -> None:
    """Every row's `prompt` is text or a list of messages with roles (as the offline trainers check it); a
    `ValueError` naming the dataset, the row and the column otherwise, before anything is generated from it. An
    in-memory dataset is checked whole, a list of rows (a generation batch, e.g. from a stream) row by row, and a
    stream as its rows arrive."""
    columns = dataset.column_names if isinstance(dataset, (Dataset, IterableDataset)) else None
    if isinstance(dataset, list) and dataset:
        columns = list(dict.fromkeys(key for row in dataset for key in row))
    check_reward_columns(columns, split)
    if isinstance(dataset, Dataset):
        check_images(dataset, split)
        if "prompt" not in dataset.column_names:
            raise ValueError(
                f"The {split} dataset needs a `prompt` column, as GRPOTrainer's does; it has {dataset.column_names}."
            )
        rows, where = enumerate(dataset["prompt"]), ""
    elif isinstance(dataset, list):
        missing = next((row for row in dataset if "prompt" not in row), None)
        if missing is not None:
            raise ValueError(
                f"A row of the {split} dataset has no `prompt` column, as GRPOTrainer's needs; it has {list(missing)}."
            )
        rows, where = enumerate(row["prompt"] for row in dataset), " (of the generation batch)"
    else:
        return
    for i, prompt in rows:
        try:
            check_text_or_messages(prompt, i, "prompt", prompt=True)
        except RowError as error:
            raise ValueError(f"{split.capitalize()} dataset{where}: {error}") from None
