"""The demo's task: small arithmetic questions made from a seed, with a verifiable answer and a reward function.

The reward function has the signature of TRL's GRPO reward functions, so it plugs into `build_reward_dataset`, the
online trainers and TRL's own trainers alike.
"""

from __future__ import annotations

import random
import re

QUESTION = "What is {expression}? Answer with the number."
_INTEGER = re.compile(r"-?\d+")


def make_problems(n: int, seed: int) -> list[dict]:
    """`n` questions, the same for the same seed: sums and differences of numbers up to 20, one-digit products, and a
    few two-step sums. Each is `{"prompt": [user message], "answer": int}` (conversational, for the chat template)."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        kind = rng.choices(["sum", "difference", "product", "two_step"], weights=[3, 3, 3, 1])[0]
        if kind == "sum":
            a, b = rng.randint(2, 20), rng.randint(2, 20)
            expression, answer = f"{a} + {b}", a + b
        elif kind == "difference":
            a, b = sorted((rng.randint(2, 20), rng.randint(2, 20)), reverse=True)
            expression, answer = f"{a} - {b}", a - b
        elif kind == "product":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            expression, answer = f"{a} * {b}", a * b
        else:
            a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 9)
            expression, answer = f"{a} + {b} - {c}", a + b - c
        problems.append(
            {"prompt": [{"role": "user", "content": QUESTION.format(expression=expression)}], "answer": answer}
        )
    return problems


# Held-out questions come from this offset of the training seed, so that the two sets differ
HELDOUT_SEED_OFFSET = 1_000_003


def heldout_problems(n: int, seed: int) -> list[dict]:
    """`n` held-out questions for the training seed `seed` (made from another seed, so they differ from training)."""
    return make_problems(n, seed=seed + HELDOUT_SEED_OFFSET)


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
