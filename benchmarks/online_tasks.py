"""The tasks of `benchmarks/online_vs_grpo.py`: question makers, reward functions and two answer checks.

- `arithmetic`: the demo's task (`trl_nca.demo.arithmetic`): sums, differences, one-digit products and a few two-step
  sums; reward 1 for the right final number, plus 0.1 for stating it clearly.
- `partial`: two-step problems with partial credit, a graded reward: "A + B - C" and "A * B + C" (and one-step
  products, so that the model has something it can already get right). Reward 1 for the right final number; else 0.4
  when the answer shows the first step's result (A + B, or A * B); plus 0.1 for stating it clearly. Groups then hold
  three or four reward levels instead of two.

Two answer checks are reported side by side, so that learning the answer's format is told apart from learning the
arithmetic: `strict` (the last integer of the answer is the right one: what the reward pays for) and `anywhere`
(the right number appears anywhere in the answer, whatever comes after it).
"""

from __future__ import annotations

import random
import re

from trl_nca.demo.arithmetic import QUESTION, extract_answer, heldout_problems, is_clear, make_problems

_INTEGER = re.compile(r"-?\d+")


def _text(completion) -> str:
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion)
    return completion


def make_partial_problems(n: int, seed: int) -> list[dict]:
    """`n` questions of the `partial` task, the same for the same seed; each row has `answer`, `step` (the first
    step's result, or None) and `kind`."""
    rng = random.Random(seed)
    problems = []
    for _ in range(n):
        kind = rng.choice(["sum_minus", "product_plus", "product"])
        if kind == "sum_minus":
            a, b, c = rng.randint(2, 12), rng.randint(2, 12), rng.randint(1, 9)
            expression, step, answer = f"{a} + {b} - {c}", a + b, a + b - c
        elif kind == "product_plus":
            a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(1, 9)
            expression, step, answer = f"{a} * {b} + {c}", a * b, a * b + c
        else:
            a, b = rng.randint(2, 9), rng.randint(2, 9)
            expression, step, answer = f"{a} * {b}", None, a * b
        problems.append(
            {
                "prompt": [{"role": "user", "content": QUESTION.format(expression=expression)}],
                "answer": answer,
                "step": step,
                "kind": kind,
            }
        )
    return problems


def partial_reward(prompts, completions, answer, step, **kwargs) -> list[float]:
    """1 for the right final number, else 0.4 for showing the first step's result; plus 0.1 for a clear answer."""
    rewards = []
    for completion, expected, first in zip(completions, answer, step, strict=True):
        text = _text(completion)
        numbers = [int(n) for n in _INTEGER.findall(text.replace(",", ""))]
        if extract_answer(text) == int(expected):
            value = 1.0
        elif first is not None and int(first) in numbers:
            value = 0.4
        else:
            value = 0.0
        rewards.append(value + (0.1 if is_clear(text) else 0.0))
    return rewards


def _arithmetic_kind(problem: dict) -> str:
    expression = problem["prompt"][0]["content"].split("What is ")[1].split("?")[0]
    if expression.count(" ") > 2:
        return "two_step"
    return {"+": "sum", "-": "difference", "*": "product"}[expression.split(" ")[1]]


def task(name: str):
    """`(make(n, seed), heldout(n, seed), reward function)` of a task; every row gets a `kind`."""
    from trl_nca.demo.arithmetic import arithmetic_reward

    if name == "arithmetic":

        def make(n, seed):
            return [{**p, "kind": _arithmetic_kind(p)} for p in make_problems(n, seed)]

        def heldout(n, seed):
            return [{**p, "kind": _arithmetic_kind(p)} for p in heldout_problems(n, seed)]

        return make, heldout, arithmetic_reward
    if name == "partial":
        return make_partial_problems, lambda n, seed: make_partial_problems(n, seed + 1_000_003), partial_reward
    raise ValueError(f"unknown task {name!r}: arithmetic or partial")


def score_answers(texts: list[str], problems: list[dict]) -> dict:
    """Accuracy under both checks, in all and per kind of problem."""
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    for text, problem in zip(texts, problems, strict=True):
        numbers = [int(n) for n in _INTEGER.findall(text.replace(",", ""))]
        strict = extract_answer(text) == problem["answer"]
        anywhere = problem["answer"] in numbers
        by_kind.setdefault(problem["kind"], []).append((strict, anywhere))
    every = [pair for pairs in by_kind.values() for pair in pairs]

    def rates(pairs):
        return {"strict": sum(s for s, _ in pairs) / len(pairs), "anywhere": sum(a for _, a in pairs) / len(pairs)}

    return {**rates(every), "by_kind": {kind: {**rates(p), "n": len(p)} for kind, p in sorted(by_kind.items())}}
