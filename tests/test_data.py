"""Layout detection, conversion to canonical rows, and the errors bad rows raise (row index and column named)."""

import math

import pytest
from datasets import Dataset

from trl_nca import convert_to_k_responses, detect_layout, to_k_responses

USER = [{"role": "user", "content": "Name a colour."}]


def answer(text):
    return [{"role": "assistant", "content": text}]


def ultrafeedback_completion(response, overall, fine, ratings):
    aspects = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
    return {
        "response": response,
        "overall_score": overall,
        "fine-grained_score": fine,
        "annotations": {a: {"Rating": r, "Rationale": "..."} for a, r in zip(aspects, ratings)},
    }


def test_canonical_rows_pass_through_with_float_rewards():
    row = {"prompt": "Q", "completions": ["a", "b", "c"], "rewards": [1, 2.5, "3"]}
    assert to_k_responses(row) == {
        "prompt": "Q",
        "completions": ["a", "b", "c"],
        "rewards": [1.0, 2.5, 3.0],
        "ordered": False,
    }


def test_pairwise_rows_with_and_without_scores():
    assert to_k_responses({"prompt": "Q", "chosen": "a", "rejected": "b"})["rewards"] == [1.0, 0.0]
    scored = to_k_responses(
        {"prompt": USER, "chosen": answer("red"), "rejected": answer("car"), "score_chosen": 8.5, "score_rejected": 3}
    )
    assert scored == {
        "prompt": USER,
        "completions": [answer("red"), answer("car")],
        "rewards": [8.5, 3.0],
        "ordered": True,
    }


def test_pairwise_implicit_prompt_is_the_common_prefix():
    row = {"chosen": USER + answer("red"), "rejected": USER + answer("car")}
    assert to_k_responses(row) == {
        "prompt": USER,
        "completions": [answer("red"), answer("car")],
        "rewards": [1.0, 0.0],
        "ordered": True,
    }


@pytest.mark.parametrize(
    "field, expected",
    [("overall_score", [9.0, 4.0, 6.5]), ("fine-grained_score", [4.75, 2.0, 3.5]), ("mean_rating", [4.5, 2.0, 3.0])],
)
def test_raw_ultrafeedback_rows_and_reward_choice(field, expected):
    row = {
        "source": "evol_instruct",
        "instruction": "Name a colour.",
        "models": ["m1", "m2", "m3"],
        "completions": [
            ultrafeedback_completion("Red.", 9, 4.75, ["5", "4", "5", "4"]),
            ultrafeedback_completion("Car.", 4, 2.0, ["2", "2", "N/A", "2"]),
            ultrafeedback_completion("Blue?", 6.5, 3.5, ["3", "3", "3", "3"]),
        ],
    }
    out = to_k_responses(row, ultrafeedback_reward=field)
    assert out["prompt"] == USER
    assert out["completions"] == [answer("Red."), answer("Car."), answer("Blue?")]
    assert out["rewards"] == expected


def test_ranked_columns_layout_with_ragged_rows():
    ds = Dataset.from_list(
        [
            {
                "A0": USER + answer("red"),
                "A1": USER + answer("blue?"),
                "A2": USER + answer("car"),
                "score_A0": 9.0,
                "score_A1": 5.0,
                "score_A2": 1.0,
            },
            {
                "A0": USER + answer("green"),
                "A1": USER + answer("tree"),
                "A2": None,
                "score_A0": 7.0,
                "score_A1": 2.0,
                "score_A2": None,
            },
        ]
    )
    out = convert_to_k_responses(ds)
    assert sorted(out.column_names) == ["completions", "ordered", "prompt", "rewards"]
    assert out[0]["prompt"] == USER and out[0]["rewards"] == [9.0, 5.0, 1.0]
    assert out[0]["completions"] == [answer("red"), answer("blue?"), answer("car")]
    assert out[1]["completions"] == [answer("green"), answer("tree")] and out[1]["rewards"] == [7.0, 2.0]


def test_dataset_conversion_keeps_extra_columns():
    ds = Dataset.from_dict({"prompt": ["Q"], "chosen": ["a"], "rejected": ["b"], "id": [7]})
    out = convert_to_k_responses(ds)
    assert out[0] == {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, 0.0], "ordered": True, "id": 7}


def test_detect_layout_names():
    assert detect_layout(["prompt", "completions", "rewards"]) == "k_responses"
    assert detect_layout(["prompt", "chosen", "rejected"]) == "preference"
    assert detect_layout(["instruction", "completions", "source"]) == "ultrafeedback"
    assert detect_layout(["A0", "A1", "A2", "score_A0", "score_A1", "score_A2"]) == "ranked_columns"


def rows(*examples):
    return Dataset.from_list(list(examples))


GOOD = {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, 0.0]}


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            {"prompt": "Q", "completions": ["a", "b", "c"], "rewards": [1.0, 0.0]},
            r"Row 1, columns 'completions' and 'rewards': 3 completions but 2 rewards",
        ),
        (
            {"prompt": "Q", "completions": ["a"], "rewards": [1.0]},
            r"Row 1, column 'completions': expected at least 2 responses, got 1",
        ),
        (
            {"prompt": "Q", "completions": ["a", "b"], "rewards": [1.0, math.nan]},
            r"Row 1, column 'rewards\[1\]': expected a finite number as reward, got nan",
        ),
        (
            {"prompt": "Q", "completions": ["a", "b"], "rewards": [math.inf, 0.0]},
            r"Row 1, column 'rewards\[0\]': expected a finite number",
        ),
    ],
)
def test_bad_canonical_rows_name_row_and_column(bad, message):
    with pytest.raises(ValueError, match=message):
        convert_to_k_responses(rows(GOOD, bad))


def test_non_numeric_reward_names_row_and_column():
    ds = Dataset.from_dict(
        {"prompt": ["Q", "Q"], "completions": [["a", "b"]] * 2, "rewards": [["1", "2"], ["1", "good"]]}
    )
    with pytest.raises(
        ValueError, match=r"Row 1, column 'rewards\[1\]': expected a finite number as reward, got 'good'"
    ):
        convert_to_k_responses(ds)


def test_bad_source_layout_values_name_their_own_columns():
    pairs = Dataset.from_dict(
        {
            "prompt": ["Q"] * 3,
            "chosen": ["a"] * 3,
            "rejected": ["b"] * 3,
            "score_chosen": [1.0, None, 2.0],
            "score_rejected": [0.0, 0.0, 1.0],
        }
    )
    with pytest.raises(ValueError, match=r"Row 1, column 'score_chosen': expected a finite number"):
        convert_to_k_responses(pairs)
    ranked = Dataset.from_dict(
        {
            "A0": [USER + answer("a")] * 2,
            "A1": [USER + answer("b")] * 2,
            "score_A0": ["1", "2"],
            "score_A1": ["0", "x"],
        }
    )
    with pytest.raises(ValueError, match=r"Row 1, column 'score_A1'"):
        convert_to_k_responses(ranked)
    uf = {
        "instruction": "Q",
        "completions": [
            ultrafeedback_completion("a", 1, 1, ["1"] * 4),
            ultrafeedback_completion("b", None, 1, ["N/A"] * 4),
        ],
    }
    with pytest.raises(ValueError, match=r"Row 3, column 'completions\[1\].overall_score'"):
        to_k_responses(uf, row=3)
    with pytest.raises(ValueError, match=r"Row 3, column 'completions\[1\].annotations': no numeric `Rating`"):
        to_k_responses(uf, row=3, ultrafeedback_reward="mean_rating")


@pytest.mark.parametrize("column", ["scores", "score", "reward", "ratings", "preference_scores"])
def test_scores_beside_completions_under_another_name_are_never_replaced_by_the_list_order(column):
    """Without `rewards` the completions read as ranked best first; a list of numbers, one per completion, under
    another name would be silently ignored (and its order may be the reverse of the scores'): an error instead."""
    scored = {"prompt": "Q", "completions": ["a", "b", "c"], column: [0.0, 2, 1.5]}
    with pytest.raises(ValueError, match=rf"Row 1, column '{column}': 3 numbers beside the 3 `completions`.*rename "
                       rf"'{column}' to `rewards`"):  # fmt: skip
        convert_to_k_responses(rows({"prompt": "Q", "completions": ["x", "y"], column: [1.0, 2, 3]}, scored))
    pairs = {"A0": USER + answer("a"), "A1": USER + answer("b")}
    with pytest.raises(ValueError, match=rf"Row 0, column '{column}': 2 numbers beside the 2 `A0`, `A1`"):
        convert_to_k_responses(rows({**pairs, column: [1, 3]}))
    # Other columns (text, numbers of another length, one number per row) leave the listed order in charge
    ranked = to_k_responses({"prompt": "Q", "completions": ["a", "b"], "tags": ["x", "y"], "lengths": [1, 2, 3],
                             "id": 4})  # fmt: skip
    assert ranked["rewards"] == [0.0, -1.0] and ranked["ordered"]


def test_unknown_or_incomplete_layout_lists_the_accepted_ones():
    with pytest.raises(
        ValueError,
        match=r"Cannot tell the layout .*\['question', 'text'\].*k_responses: `prompt`, "
        r"`completions`.*preference: .*ultrafeedback: .*ranked_columns: ",
    ):
        convert_to_k_responses(Dataset.from_dict({"question": ["Q"], "text": ["a"]}))
    with pytest.raises(ValueError, match=r"Column 'prompt' is missing"):
        convert_to_k_responses(Dataset.from_dict({"completions": [["a", "b"]], "rewards": [[1.0, 0.0]]}))


def test_binarized_rows_with_a_text_prompt_copy_take_the_prompt_from_the_conversations():
    row = {
        "prompt": "Name a colour.",
        "chosen": USER + answer("red"),
        "rejected": USER + answer("car"),
        "score_chosen": 9.0,
        "score_rejected": 2.0,
    }
    assert to_k_responses(row) == {
        "prompt": USER,
        "completions": [answer("red"), answer("car")],
        "rewards": [9.0, 2.0],
        "ordered": True,
    }
