"""Reward functions: resolving them from a spec, and checking what they return.

A reward function has the signature of TRL's GRPO reward functions: `fn(prompts, completions, **columns)` returns
one number per completion, where `columns` are the dataset's other columns. A spec is a callable,
`"module:function"`, or the folder of a sequence-classification reward model (its first logit is the reward).
`trl-nca generate` and the online trainers resolve specs the same way, and both check every value a function
returns: a wrong count, a value that is not a number, or a non-finite one stops the run with the function's name and
the prompt it was scoring, rather than training on it.
"""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

RewardFunc = Callable[..., list[float]]


class RewardError(ValueError):
    """A reward function that cannot be found, fails, or returns what cannot be trained on."""


def reward_name(func) -> str:
    """The name errors and metrics use for a reward function."""
    return getattr(func, "__name__", None) or type(func).__name__


def reward_model_function(path: str | Path, batch_size: int = 16) -> RewardFunc:
    """A reward function from a sequence-classification model folder: its first logit for prompt + completion."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    @torch.no_grad()
    def score(prompts, completions, **kwargs):
        texts = []
        for prompt, completion in zip(prompts, completions, strict=True):
            if isinstance(prompt, list):
                texts.append(tokenizer.apply_chat_template(prompt + completion, tokenize=False))
            else:
                texts.append(prompt + completion)
        scores = []
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
            scores.extend(model(**batch).logits[:, 0].float().tolist())
        return scores

    score.__name__ = Path(path).name
    return score


def resolve_reward(spec: str | RewardFunc) -> RewardFunc:
    """A reward function from a callable, `"module:function"`, or a reward model folder; a `RewardError` that says
    what is missing otherwise."""
    if callable(spec):
        return spec
    if Path(spec).is_dir():
        return reward_model_function(spec)
    if ":" not in spec:
        raise RewardError(
            f"Unknown reward {spec!r}: give 'module:function' (a TRL GRPO-style reward function) or the folder of a "
            "sequence-classification reward model"
        )
    module_name, name = spec.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise RewardError(f"Reward {spec!r}: cannot import module {module_name!r} ({error})") from None
    func = getattr(module, name, None)
    if not callable(func):
        raise RewardError(f"Reward {spec!r}: module {module_name!r} has no function {name!r}")
    return func


def check_reward_values(
    name: str, values, prompts: Sequence, group_size: int = 1, *, allow_none: bool = False
) -> list[float | None]:
    """The values a reward function returned, as floats; a `RewardError` naming the function and the prompt when the
    count is wrong or a value is not a finite number. Completion i belongs to prompt i // `group_size`. `None`
    (GRPO's "not applicable") is kept where `allow_none`."""
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"Reward function '{name}' returned {type(values).__name__}, expected a list of {len(prompts)} numbers"
        ) from None
    if len(values) != len(prompts):
        raise RewardError(
            f"Reward function '{name}' returned {len(values)} values for {len(prompts)} completions; it must return "
            "one number per completion"
        )
    out = []
    for i, value in enumerate(values):
        if value is None and allow_none:
            out.append(None)
            continue
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if not isinstance(value, numbers.Real) or isinstance(value, bool) or not math.isfinite(value):
            raise RewardError(
                f"Reward function '{name}' returned {value!r} for completion {i % group_size} of prompt "
                f"{i // group_size} ({_prompt_text(prompts[i])!r}); rewards must be finite numbers"
            )
        out.append(float(value))
    _check_float32(name, out, prompts, group_size)
    return out


def _check_float32(name: str, values: list[float | None], prompts: Sequence, group_size: int) -> None:
    """Rewards are trained on in float32 (GRPO stores them so, the offline trainers cast them): each value must stay
    finite there, and two different values of one prompt's group must stay different, else they silently tie."""
    for i, value in enumerate(values):
        if value is not None and not math.isfinite(_float32(value)):
            raise RewardError(
                f"Reward function '{name}' returned {value!r} for completion {i % group_size} of prompt "
                f"{i // group_size} ({_prompt_text(prompts[i])!r}), which overflows float32, the dtype rewards are "
                "trained in; rescale the rewards"
            )
    for start in range(0, len(values), group_size):
        seen = {}
        for k, value in enumerate(values[start : start + group_size]):
            if value is None:
                continue
            other = seen.setdefault(_float32(value), (k, value))
            if other[1] != value:
                raise RewardError(
                    f"Reward function '{name}' returned {other[1]!r} and {value!r} for completions {other[0]} and "
                    f"{k} of prompt {start // group_size} ({_prompt_text(prompts[start])!r}): they differ but are "
                    "equal in float32, the dtype rewards are trained in, so they would become a tie; rescale or "
                    "shift the rewards"
                )


def _float32(value: float) -> float:
    return float(torch.tensor(value, dtype=torch.float64).float())


def _prompt_text(prompt) -> str:
    text = prompt[-1].get("content", "") if isinstance(prompt, list) and prompt else str(prompt)
    return str(text)[:60]


def call_reward(func: RewardFunc, prompts: Sequence, completions: Sequence, **columns):
    """Call a reward function; an exception inside it is re-raised naming the function."""
    try:
        return func(prompts=prompts, completions=completions, **columns)
    except Exception as error:
        raise RewardError(f"Reward function '{reward_name(func)}' raised {type(error).__name__}: {error}") from error


def score_completions(
    funcs: Sequence[RewardFunc], prompts: Sequence, completions: Sequence, group_size: int = 1, **columns
) -> list[float]:
    """The sum of the reward functions' checked values for each completion."""
    totals = [0.0] * len(completions)
    for func in funcs:
        values = check_reward_values(
            reward_name(func), call_reward(func, prompts, completions, **columns), prompts, group_size
        )
        totals = [total + value for total, value in zip(totals, values)]
    return totals
