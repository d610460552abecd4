"""The split of every task's question space: no evaluation question shares a fact with a training question, for any
seed, in the demo and in the benchmarks; the evaluation sets are fixed and stratified."""

import sys
from collections import Counter
from pathlib import Path

import pytest

from trl_nca.demo.arithmetic import fixed_test_set, make_problems, space
from trl_nca.demo.questions import Question, QuestionSpace, _stratified_counts, split_of

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from online_tasks import TASKS, task  # noqa: E402


def _expression(row):
    return row["prompt"][0]["content"].removeprefix("What is ").split("?")[0]


@pytest.mark.parametrize("name", TASKS)
def test_training_never_asks_a_fact_of_the_validation_or_test_set(name):
    the_task = task(name)
    test = the_task.evaluation("test", 256)
    validation = the_task.evaluation("validation", 128)
    test_facts, validation_facts = the_task.space.facts(test), the_task.space.facts(validation)
    assert len(test) == 256 and len(validation) == 128
    assert not test_facts & validation_facts
    for seed in range(12):
        train_facts = the_task.space.facts(the_task.train(64, seed))
        assert not train_facts & test_facts and not train_facts & validation_facts
    # each question string once; the same set whatever the seed (a fixed set, not drawn)
    assert len({_expression(r) for r in test}) == 256 and the_task.evaluation("test", 256) == test
    # in facts, fewer (`3 * 7` and `7 * 3` may both be asked): the counts the docs quote
    assert len(test_facts) == {"arithmetic": 190, "twodigit": 240, "partial": len(test_facts)}[name]
    for row in test + the_task.train(50, 3):
        assert eval(_expression(row)) == row["answer"]  # noqa: S307 - our own generated arithmetic


def test_a_fact_asked_both_ways_is_on_one_side():
    sides = {}
    for side, kinds in space().sides.items():
        for questions in kinds.values():
            for q in questions:
                sides.setdefault(q.fact, set()).add(side)
    assert all(len(found) == 1 for found in sides.values())
    # 3 * 7 and 7 * 3 are one fact; the two-step "a + b - c" and "b + a - c" too
    facts = {q.expression: q.fact for kinds in space().sides.values() for qs in kinds.values() for q in qs}
    assert facts["3 * 7"] == facts["7 * 3"] and facts["4 + 9 - 2"] == facts["9 + 4 - 2"]
    assert facts["3 + 7"] != facts["3 * 7"] and facts["9 - 4"] != facts["9 + 4"]
    # the side depends on the fact only: a fixed hash, not a seed
    assert split_of("arithmetic:product:3,7") == split_of("arithmetic:product:3,7")
    shares = Counter(split_of(f"x:{i}") for i in range(20000))
    assert shares["train"] / 20000 == pytest.approx(0.45, abs=0.02)
    assert shares["validation"] / 20000 == pytest.approx(0.20, abs=0.02)


def test_sets_are_stratified_by_kind_and_a_kind_that_runs_out_gives_its_share_away():
    assert _stratified_counts({"a": 100, "b": 100}, {"a": 1, "b": 1}, 50) == {"a": 25, "b": 25}
    assert _stratified_counts({"a": 100, "b": 100, "c": 100}, {"a": 3, "b": 3, "c": 1}, 70) == {
        "a": 30,
        "b": 30,
        "c": 10,
    }
    # "b" has only 5: the other kinds take its remainder in proportion to their weights
    assert _stratified_counts({"a": 100, "b": 5, "c": 100}, {"a": 1, "b": 1, "c": 1}, 45) == {"a": 20, "b": 5, "c": 20}
    assert sum(_stratified_counts({"a": 7, "b": 9, "c": 4}, {"a": 3, "b": 1, "c": 2}, 19).values()) == 19
    with pytest.raises(ValueError, match="30 questions asked of a side that has 20"):
        _stratified_counts({"a": 10, "b": 10}, {"a": 1, "b": 1}, 30)
    assert len(space().facts(fixed_test_set(96))) == 82  # the demo's 96 test questions ask 82 facts
    counts = Counter(r["kind"] for r in fixed_test_set(256))
    assert counts["product"] == len(space().sides["test"]["product"])  # every test product, and no more exist
    assert counts["sum"] >= 64 and counts["difference"] >= 60 and counts["two_step"] >= 25


def test_training_questions_follow_the_kind_weights_of_the_train_side():
    rows = make_problems(2000, seed=0)
    shares = Counter(r["kind"] for r in rows)
    assert shares["two_step"] / 2000 == pytest.approx(0.1, abs=0.025)
    assert all(shares[k] / 2000 == pytest.approx(0.3, abs=0.04) for k in ("sum", "difference", "product"))
    assert make_problems(20, seed=5) == make_problems(20, seed=5) != make_problems(20, seed=6)


def test_a_tiny_space_splits_by_fact():
    questions = [Question(f"{a} + {b}", a + b, f"{min(a, b)},{max(a, b)}") for a in range(30) for b in range(30)]
    small = QuestionSpace("tiny", {"sum": questions}, {"sum": 1})
    by_fact = {}
    for side, kinds in small.sides.items():
        for q in kinds["sum"]:
            by_fact.setdefault(q.fact, set()).add(side)
    assert all(len(s) == 1 for s in by_fact.values()) and len(by_fact) == 30 * 31 // 2
    with pytest.raises(ValueError, match="'train'"):
        small.fixed("train", 3)


def test_the_online_recipe_trains_on_the_train_side_only():
    import json

    recipe_prompts = Path(__file__).parents[1] / "recipes/online/arithmetic_prompts.jsonl"
    rows = [json.loads(line) for line in recipe_prompts.open()]
    assert len(rows) == 64
    assert {split_of(f"arithmetic:{fact}") for fact in space().facts(rows)} == {"train"}
    assert rows == [{"prompt": p["prompt"], "answer": p["answer"]} for p in make_problems(64, seed=0)]


STUDIES = (
    ("online_vs_grpo_test.jsonl", "test", 256, 40),
    ("online_vs_grpo_tuning.jsonl", "validation", 128, 14),
    ("offline_vs_dpo_test.jsonl", "test", 256, 40),
    ("offline_vs_dpo_tuning.jsonl", "validation", 128, 25),
)


@pytest.mark.parametrize("name, split, size, runs", STUDIES)
def test_the_recorded_studies_trained_on_no_fact_they_were_scored_on(name, split, size, runs):
    """The records of the reported studies and their tuning (benchmarks/results), online and offline: every run's
    training questions (kept in its record) share no fact with the set it was scored on, every run of a file was
    scored on the same set, and none of the recorded runs is missing."""
    import json

    results = Path(__file__).parents[1] / "benchmarks" / "results"
    checked = 0
    if (results / name).exists():
        for line in (results / name).read_text().splitlines():
            record = json.loads(line)
            assert (record["split"], record["settings"]["eval_prompts"]) == (split, size)
            the_task = task(record["task"])
            trained = the_task.space.facts([{"prompt": [{"content": q}]} for q in record["train_questions"]])
            scored = the_task.space.facts(the_task.evaluation(split, size))
            assert trained and not trained & scored, (name, record["task"], record["seed"], record["method"])
            assert len(record["points"][-1]["each_strict"]) == size
            checked += 1
    assert checked >= runs
