"""The tasks of `benchmarks/online_vs_grpo.py`: question spaces (split once into train, validation and test, see
`trl_nca/demo/questions.py`), reward functions and two answer checks.

- `arithmetic`: the demo's task (`trl_nca.demo.arithmetic`): sums, differences, one-digit products and a few two-step
  sums; reward 1 for the right final number, plus 0.1 for stating it clearly.
- `twodigit`: sums and differences of two numbers from 10 to 49, the same reward. SmolLM2-135M starts lower here
  than on `arithmetic` (about 0.25 on sums), and every question is one step, so the task has room above its start
  that both methods can reach.
- `partial`: two-step problems with partial credit, a graded reward: "A + B - C" and "A * B + C" (and one-step
  products). Reward 1 for the right final number; else 0.4 when the answer shows the first step's result (A + B, or
  A * B); plus 0.1 for stating it clearly. (Kept for the earlier study's records: at 135M parameters no method learned
  its second step, so it could not separate the methods.)

Two answer checks are reported side by side, so that learning the answer's format is told apart from learning the
arithmetic: `strict` (the last integer of the answer is the right one: what the reward pays for) and `anywhere`
(the right number appears anywhere in the answer, whatever comes after it).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

from trl_nca.demo import arithmetic
from trl_nca.demo.arithmetic import arithmetic_reward, extract_answer, is_clear
from trl_nca.demo.questions import Question, QuestionSpace

_INTEGER = re.compile(r"-?\d+")
TASKS = ("arithmetic", "twodigit", "partial")


def _text(completion) -> str:
    if isinstance(completion, list):
        return "".join(message.get("content", "") for message in completion)
    return completion


def twodigit_space() -> QuestionSpace:
    span = range(10, 50)
    kinds = {
        "sum": [Question(f"{a} + {b}", a + b, f"sum:{min(a, b)},{max(a, b)}") for a in span for b in span],
        "difference": [Question(f"{a} - {b}", a - b, f"difference:{a},{b}") for a in span for b in span if a > b],
    }
    return QuestionSpace("twodigit", kinds, {"sum": 1, "difference": 1})


def partial_space() -> QuestionSpace:
    digits, small, c_range = range(2, 10), range(2, 13), range(1, 10)

    def q(expression, answer, fact, step):
        return Question(expression, answer, fact, {"step": step})

    kinds = {
        "sum_minus": [q(f"{a} + {b} - {c}", a + b - c, f"sum_minus:{min(a, b)},{max(a, b)},{c}", a + b)
                      for a in small for b in small for c in c_range],
        "product_plus": [q(f"{a} * {b} + {c}", a * b + c, f"product_plus:{min(a, b)},{max(a, b)},{c}", a * b)
                         for a in digits for b in digits for c in c_range],
        "product": [q(f"{a} * {b}", a * b, f"product:{min(a, b)},{max(a, b)}", None) for a in digits for b in digits],
    }  # fmt: skip
    return QuestionSpace("partial", kinds, {"sum_minus": 1, "product_plus": 1, "product": 1})


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


@dataclass(frozen=True)
class Task:
    name: str
    space: QuestionSpace
    reward: Callable

    def train(self, n: int, seed: int) -> list[dict]:
        return self.space.train(n, seed)

    def evaluation(self, split: str, n: int) -> list[dict]:
        """The fixed validation or test set (the same for every seed)."""
        return self.space.fixed(split, n)


def task(name: str) -> Task:
    if name == "arithmetic":
        return Task(name, arithmetic.space(), arithmetic_reward)
    if name == "twodigit":
        return Task(name, twodigit_space(), arithmetic_reward)
    if name == "partial":
        return Task(name, partial_space(), partial_reward)
    raise ValueError(f"unknown task {name!r}: one of {TASKS}")


def score_answers(texts: list[str], problems: list[dict]) -> dict:
    """Accuracy under both checks, in all and per kind of problem, and each question's result (in `problems`'
    order) as a string of 0 and 1 per check, for paired tests."""
    by_kind: dict[str, list[tuple[bool, bool]]] = {}
    each = []
    for text, problem in zip(texts, problems, strict=True):
        numbers = [int(n) for n in _INTEGER.findall(text.replace(",", ""))]
        strict = extract_answer(text) == problem["answer"]
        anywhere = problem["answer"] in numbers
        by_kind.setdefault(problem["kind"], []).append((strict, anywhere))
        each.append((strict, anywhere))

    def rates(pairs):
        return {"strict": sum(s for s, _ in pairs) / len(pairs), "anywhere": sum(a for _, a in pairs) / len(pairs)}

    return {
        **rates(each),
        "by_kind": {kind: {**rates(p), "n": len(p)} for kind, p in sorted(by_kind.items())},
        "each_strict": "".join("01"[s] for s, _ in each),
        "each_anywhere": "".join("01"[a] for _, a in each),
    }
