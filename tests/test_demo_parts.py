"""The built-in task, the reward function, the reward-dataset builder and the plot command."""

import json

import pytest
from datasets import Dataset

from trl_nca import cli
from trl_nca.demo import DemoSettings
from trl_nca.demo.arithmetic import arithmetic_reward, extract_answer, is_clear, make_problems
from trl_nca.generation import build_reward_dataset
from trl_nca.rewards import resolve_reward


def test_problems_are_deterministic_per_seed_and_their_answers_are_right():
    assert make_problems(50, seed=3) == make_problems(50, seed=3)
    assert make_problems(50, seed=3) != make_problems(50, seed=4)
    for problem in make_problems(200, seed=0):
        expression = problem["prompt"][0]["content"].removeprefix("What is ").split("?")[0]
        assert eval(expression) == problem["answer"]  # noqa: S307 - our own generated arithmetic
    kinds = {"sum": [], "difference": [], "product": [], "two_step": []}
    for problem in make_problems(400, seed=0):
        expression = problem["prompt"][0]["content"].removeprefix("What is ").split("?")[0]
        numbers = [int(n) for n in expression.replace("+", " ").replace("-", " ").replace("*", " ").split()]
        if "*" in expression:
            kinds["product"].append(numbers)
        elif "+" in expression and "-" in expression:
            kinds["two_step"].append(numbers)
        else:
            kinds["sum" if "+" in expression else "difference"].append(numbers)
    # drawn with weights 3:3:3:1
    shares = {kind: len(found) / 400 for kind, found in kinds.items()}
    assert (
        all(0.22 < shares[kind] < 0.38 for kind in ["sum", "difference", "product"])
        and 0.05 < shares["two_step"] < 0.16
    )
    assert all(2 <= a <= 9 and 2 <= b <= 9 for a, b in kinds["product"])  # one-digit products
    assert all(a >= b for a, b in kinds["difference"])  # no negative answers
    assert all(2 <= n <= 20 for pair in kinds["sum"] for n in pair)


@pytest.mark.parametrize(
    "text, answer, reward",
    [
        ("7", 7, 1.1),
        ("3 + 4 = 7.", 7, 1.1),
        ("The answer is 12.", 12, 1.1),
        ("The answer is 13.", 12, 0.1),
        ("Let me think step by step about this addition: 3 plus 4 makes a total of 7 in the end.", 7, 1.0),
        ("I cannot answer that.", 7, 0.0),
        ("1,200", 1200, 1.1),
        ("-3", -3, 1.1),
    ],
)
def test_reward_scores_known_strings(text, answer, reward):
    conversational = [[{"role": "assistant", "content": text}]]
    assert arithmetic_reward(prompts=["q"], completions=[text], answer=[answer]) == [pytest.approx(reward)]
    assert arithmetic_reward(prompts=["q"], completions=conversational, answer=[answer]) == [pytest.approx(reward)]


def test_answer_extraction_and_clarity():
    assert extract_answer("First 3, then 4, so 7") == 7 and extract_answer("none") is None
    assert is_clear("It is 9.") and not is_clear("It is nine.") and not is_clear("")


def test_reward_dataset_builder_with_a_tiny_model_and_a_toy_reward(tokenizer, model):
    prompts = Dataset.from_list(
        [{"prompt": [{"role": "user", "content": q}], "target": i} for i, q in enumerate(["Hello?", "Sky?", "Sea?"])]
    )

    def length_reward(prompts, completions, target, **kwargs):
        return [float(len(c[0]["content"]) % 5 + t) for c, t in zip(completions, target, strict=True)]

    data, stats = build_reward_dataset(model, tokenizer, prompts, length_reward, k=3, max_new_tokens=8, seed=1)
    again, _ = build_reward_dataset(model, tokenizer, prompts, length_reward, k=3, max_new_tokens=8, seed=1)
    assert data.to_list() == again.to_list()  # seeded sampling
    assert len(data) == 3 and stats["prompts"] == 3 and stats["k"] == 3
    for row in data:
        assert len(row["completions"]) == 3 and len(row["rewards"]) == 3
        assert row["prompt"][0]["role"] == "user" and row["completions"][0][0]["role"] == "assistant"
        assert row["rewards"] == [len(c[0]["content"]) % 5 + row["target"] for c in row["completions"]]
    assert stats["all_equal"] == sum(len(set(r)) == 1 for r in data["rewards"])
    with pytest.raises(ValueError, match="k must be at least 2"):
        build_reward_dataset(model, tokenizer, prompts, length_reward, k=1)


def test_resolve_reward_specs():
    # a function named by a spec comes wrapped, so that its errors name the spec; its name (GRPO's metric key) stays
    resolved = resolve_reward("trl_nca.demo.arithmetic:arithmetic_reward")
    assert resolved.__wrapped__ is arithmetic_reward and resolved.__name__ == "arithmetic_reward"
    assert resolved(prompts=["q"], completions=["7"], answer=[7]) == arithmetic_reward(["q"], ["7"], [7])
    assert resolve_reward(arithmetic_reward) is arithmetic_reward
    # the library knows no task by name: the demo's reward is a module:function like any other
    with pytest.raises(ValueError, match="Unknown reward 'arithmetic': give 'module:function'"):
        resolve_reward("arithmetic")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        resolve_reward("no_such_module:reward")
    with pytest.raises(ValueError, match="module 'trl_nca.demo.arithmetic' has no function 'missing'"):
        resolve_reward("trl_nca.demo.arithmetic:missing")


def test_plot_command_writes_a_png_from_a_saved_log_history(tmp_path, capsys):
    history = [
        {
            "loss": 1.39 - 0.01 * s,
            "logps/best": -10.0 + 0.1 * s,
            "logps/worst": -12.0 - 0.3 * s,
            "rewards/accuracies": min(1.0, 0.1 * s),
            "step": s,
        }
        for s in range(1, 11)
    ] + [{"train_runtime": 1.0, "step": 10}]
    run = tmp_path / "run"
    (run / "checkpoint-10").mkdir(parents=True)
    (run / "checkpoint-10" / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    assert cli.main(["plot", str(run)]) == 0
    png = (run / "plot.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "Wrote" in capsys.readouterr().out
    assert cli.main(["plot", str(tmp_path / "empty")]) == 2


def test_the_demo_scores_the_test_set_or_while_choosing_settings_the_validation_set():
    from trl_nca.demo.arithmetic import fixed_test_set, space
    from trl_nca.demo.run import heldout_set

    test = heldout_set(DemoSettings())
    validation = heldout_set(DemoSettings(heldout_split="validation"))
    assert test == fixed_test_set(96) and len(validation) == 96
    train = space().facts(make_problems(96, seed=0))
    assert not space().facts(validation) & space().facts(test)
    assert not train & space().facts(validation) and not train & space().facts(test)
    with pytest.raises(ValueError, match="--heldout_split must be one of"):
        heldout_set(DemoSettings(heldout_split="train"))


def test_the_demo_learns_a_step_in_passes_of_whole_questions():
    """`--micro_batch` splits a step's questions into passes of whole groups (gradients accumulated): K rows per
    question online, one K-answer row per question offline; a size that does not divide the step is refused."""
    from trl_nca.demo.run import _micro_batches

    settings = DemoSettings(k=8, batch_size=4, micro_batch=1)
    assert _micro_batches(settings, rows_per_question=8) == {"per_device_train_batch_size": 8,
                                                             "gradient_accumulation_steps": 4}  # fmt: skip
    assert _micro_batches(DemoSettings(batch_size=4, micro_batch=2), rows_per_question=1) == {
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}  # fmt: skip
    with pytest.raises(ValueError, match="--micro_batch 3 must divide --batch_size 4"):
        _micro_batches(DemoSettings(batch_size=4, micro_batch=3), rows_per_question=8)
