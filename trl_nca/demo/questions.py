"""A question space split once into train, validation and test, so that no evaluation question is ever trained on.

A task lists every question it can ask, grouped by kind. Each question carries a *fact*: the key under which
equivalent questions meet (`3 * 7` and `7 * 3` are one fact). The side of a fact is fixed by a hash of the fact
alone, not by a seed, so every seed, the demo and the benchmarks agree on it:

- training questions are drawn from the train side (kinds by the task's weights, then uniformly), one set per seed;
- the validation and test sets are fixed: the same questions for every seed, stratified by kind (each kind's share
  follows the task's weights as far as that kind's side has questions), each question string once. A fact may be
  asked both ways within a set (`3 * 7` and `7 * 3`): count facts, not questions, where sets are compared
  (`facts`).

Tuning reads the validation set only; reported numbers come from the test set.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

QUESTION = "What is {expression}? Answer with the number."
# the share of facts on each side, in this order: [0, 0.45) train, [0.45, 0.65) validation, [0.65, 1) test
SPLITS = (("train", 0.45), ("validation", 0.65), ("test", 1.0))


def _unit(text: str) -> float:
    """A number in [0, 1) fixed by `text` (the first 8 bytes of its SHA-256)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def split_of(fact: str) -> str:
    """The side of the split that a fact (and every question asking it) is on."""
    position = _unit(f"split:{fact}")
    return next(name for name, upper in SPLITS if position < upper)


@dataclass(frozen=True)
class Question:
    expression: str
    answer: int
    fact: str
    extra: dict = field(default_factory=dict, compare=False, hash=False)  # more reward columns (e.g. `step`)


def _row(question: Question, kind: str) -> dict:
    prompt = [{"role": "user", "content": QUESTION.format(expression=question.expression)}]
    return {"prompt": prompt, "answer": question.answer, "kind": kind, **question.extra}


def _stratified_counts(available: dict[str, int], weights: dict[str, float], n: int) -> dict[str, int]:
    """How many questions of each kind a set of `n` takes: shares by `weights`, a kind that runs out gives its
    remainder to the others (in proportion to their weights)."""
    if n > sum(available.values()):
        raise ValueError(f"{n} questions asked of a side that has {sum(available.values())}")
    counts = dict.fromkeys(available, 0)
    left = n
    while left:
        open_kinds = [k for k in available if counts[k] < available[k]]
        total = sum(weights[k] for k in open_kinds)
        shares = {k: left * weights[k] / total for k in open_kinds}
        given = 0
        for kind in open_kinds:
            extra = min(int(shares[kind]), available[kind] - counts[kind])
            counts[kind] += extra
            given += extra
        if given == 0:  # fewer than one each: by largest remainder, then kind order
            for kind in sorted(open_kinds, key=lambda k: -(shares[k] - int(shares[k]))):
                if left - given and counts[kind] < available[kind]:
                    counts[kind] += 1
                    given += 1
        left -= given
    return counts


class QuestionSpace:
    """Every question of a task, by kind, with the kind weights that training draws with."""

    def __init__(self, name: str, kinds: dict[str, list[Question]], weights: dict[str, float]):
        self.name, self.weights = name, weights
        self.sides: dict[str, dict[str, list[Question]]] = {side: {} for side, _ in SPLITS}
        for kind, questions in kinds.items():
            for side in self.sides:
                self.sides[side][kind] = []
            for question in questions:
                self.sides[split_of(f"{name}:{question.fact}")][kind].append(question)
            for side in self.sides:  # a fixed order that is not the enumeration's (which runs through a, then b)
                self.sides[side][kind].sort(key=lambda q: _unit(f"order:{q.expression}"))

    def train(self, n: int, seed: int) -> list[dict]:
        """`n` training questions for `seed` (drawn with replacement: a question may come twice)."""
        rng = random.Random(seed)
        kinds = list(self.weights)
        rows = []
        for _ in range(n):
            kind = rng.choices(kinds, weights=[self.weights[k] for k in kinds])[0]
            rows.append(_row(rng.choice(self.sides["train"][kind]), kind))
        return rows

    def fixed(self, side: str, n: int) -> list[dict]:
        """The fixed validation or test set of `n` questions: the same for every seed, stratified by kind, each
        question string once (a fact may come both ways), the kinds interleaved."""
        if side not in ("validation", "test"):
            raise ValueError(f"side must be 'validation' or 'test', got {side!r}")
        pools = self.sides[side]
        counts = _stratified_counts({k: len(v) for k, v in pools.items()}, self.weights, n)
        chosen = [(q, kind) for kind, pool in pools.items() for q in pool[: counts[kind]]]
        chosen.sort(key=lambda item: _unit(f"order:{item[0].expression}"))
        return [_row(q, kind) for q, kind in chosen]

    def facts(self, rows: list[dict]) -> set[str]:
        """The facts that `rows` (made by this space) ask."""
        by_expression = {
            QUESTION.format(expression=q.expression): q.fact
            for side in self.sides.values()
            for pool in side.values()
            for q in pool
        }
        return {by_expression[row["prompt"][0]["content"]] for row in rows}
