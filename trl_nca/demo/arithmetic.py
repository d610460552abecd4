"""The demo's task: small arithmetic questions with a verifiable answer, and a reward function.

The questions come from one fixed split of the whole question space (`questions.py`): training questions from the
train side, one set per seed; held-out accuracy on the fixed test set, which no training question shares a fact
with (`3 * 7` and `7 * 3` are one fact, on one side).

The reward function has the signature of TRL's GRPO reward functions, so it plugs into `build_reward_dataset`, the
online trainers and TRL's own trainers alike.
"""

from __future__ import annotations

import re
from functools import cache

from .questions import QUESTION, Question, QuestionSpace

__all__ = ["QUESTION", "arithmetic_reward", "extract_answer", "make_problems", "space", "fixed_test_set"]

_INTEGER = re.compile(r"-?\d+")


@cache
def space() -> QuestionSpace:
    """Sums and differences of numbers from 2 to 20, one-digit products, and two-step "a + b - c" (weights
    3 : 3 : 3 : 1)."""
    span, digits = range(2, 21), range(2, 10)
    kinds = {
        "sum": [Question(f"{a} + {b}", a + b, f"sum:{min(a, b)},{max(a, b)}") for a in span for b in span],
        "difference": [Question(f"{a} - {b}", a - b, f"difference:{a},{b}") for a in span for b in span if a >= b],
        "product": [Question(f"{a} * {b}", a * b, f"product:{min(a, b)},{max(a, b)}") for a in digits for b in digits],
        "two_step": [
            Question(f"{a} + {b} - {c}", a + b - c, f"two_step:{min(a, b)},{max(a, b)},{c}")
            for a in range(2, 13)
            for b in range(2, 13)
            for c in range(1, 10)
        ],
    }
    return QuestionSpace("arithmetic", kinds, {"sum": 3, "difference": 3, "product": 3, "two_step": 1})


def make_problems(n: int, seed: int) -> list[dict]:
    """`n` training questions, the same for the same seed, from the train side of the split. Each is
    `{"prompt": [user message], "answer": int, "kind": str}` (conversational, for the chat template)."""
    return space().train(n, seed)


def fixed_test_set(n: int) -> list[dict]:
    """The fixed test set of `n` questions (the same for every seed; no training question asks any of its facts)."""
    return space().fixed("test", n)


def _text(completion) -> str:
    if isinstance(completion, list):  # conversational: a list of messages
        return "".join(message.get("content", "") for message in completion)
    return completion


def extract_answer(text: str) -> int | None:
    """The last integer in the text (the model's final number), or None."""
    numbers = _INTEGER.findall(text.replace(",", ""))
    return int(numbers[-1]) if numbers else None


def is_clear(text: str) -> bool:
    """A clearly stated answer: short (at most 12 words), with its number in the last sentence."""
    words = text.split()
    last_sentence = re.split(r"(?<=[.!?])\s+", text.strip())[-1] if text.strip() else ""
    return 0 < len(words) <= 12 and _INTEGER.search(last_sentence) is not None


def arithmetic_reward(prompts, completions, answer, **kwargs) -> list[float]:
    """1 for the right final number, plus 0.1 for stating it clearly (a TRL GRPO-style reward function)."""
    rewards = []
    for completion, expected in zip(completions, answer, strict=True):
        text = _text(completion)
        correct = extract_answer(text) == int(expected)
        rewards.append(float(correct) + (0.1 if is_clear(text) else 0.0))
    return rewards
