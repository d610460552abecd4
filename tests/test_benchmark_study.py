"""The pieces of `benchmarks/online_vs_grpo.py` that decide its numbers: the tasks' rewards, the two answer checks
and the per-question results, the knob parser and method lists, the curves over seeds (and "completions to reach
GRPO's end"), the paired analysis against GRPO, and the per-token knob."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from online_tasks import partial_reward, score_answers, task  # noqa: E402
from online_vs_grpo import (  # noqa: E402
    compare,
    completions_to_reach,
    length_normalized,
    mean_curve,
    paired_interval,
    parse_method,
    split_methods,
    summarize,
    verdict,
)

from trl_nca import OnlineNCATrainer  # noqa: E402
from trl_nca.losses import nca_loss  # noqa: E402


def test_partial_reward_has_three_levels_and_a_format_bonus():
    # "7 * 6 + 5": first step 42, answer 47
    completions = ["The answer is 47.", "7 * 6 = 42, so 48.", "No idea at all.", "47" + " and more" * 10]
    rewards = partial_reward(None, completions, answer=[47] * 4, step=[42] * 4)
    # right and clear; first step shown (and clear: a number in the last sentence); nothing; right but long
    assert rewards == pytest.approx([1.1, 0.5, 0.0, 1.0])
    # a one-step product has no partial credit
    assert partial_reward(None, ["I think 12"], answer=[20], step=[None]) == pytest.approx([0.1])


def test_partial_and_twodigit_questions_carry_their_reward_columns():
    partial = task("partial").train(30, 1)
    assert partial == task("partial").train(30, 1)
    for problem in partial:
        expression = problem["prompt"][0]["content"].split("What is ")[1].split("?")[0]
        assert eval(expression) == problem["answer"]  # noqa: S307 - the questions' own arithmetic
        first = expression.rsplit(" ", 2)[0] if problem["kind"] != "product" else None
        assert problem["step"] == (None if first is None else eval(first))  # noqa: S307
    for problem in task("twodigit").evaluation("test", 64):
        a, op, b = problem["prompt"][0]["content"].split("What is ")[1].split("?")[0].split()
        assert 10 <= int(a) <= 49 and 10 <= int(b) <= 49 and problem["answer"] > (0 if op == "-" else 19)


def test_strict_and_anywhere_checks_differ_on_trailing_numbers():
    problems = [{"answer": 9, "kind": "sum"}, {"answer": 9, "kind": "sum"}, {"answer": 4, "kind": "product"}]
    scores = score_answers(["4 + 5 = 9", "It is 9, step 2.", "5"], problems)
    assert scores["strict"] == pytest.approx(1 / 3)
    assert scores["anywhere"] == pytest.approx(2 / 3)
    assert scores["by_kind"]["sum"] == {"strict": 0.5, "anywhere": 1.0, "n": 2}
    assert scores["by_kind"]["product"]["anywhere"] == 0.0
    # each question's result, in the questions' order, for the paired tests
    assert scores["each_strict"] == "100" and scores["each_anywhere"] == "110"


def test_parse_method_reads_knobs_and_refuses_unknown_methods():
    assert parse_method("nca") == ("nca", {})
    assert parse_method("nca[reward_temperature=0.5,k=4,reference=initial]") == (
        "nca",
        {"reward_temperature": 0.5, "k": 4, "reference": "initial"},
    )
    with pytest.raises(ValueError, match=r"unknown method 'ppo\[k=4\]'"):
        parse_method("ppo[k=4]")


def test_a_method_list_splits_between_methods_not_between_knobs():
    specs = split_methods("nca,nca[reward_temperature=0.1,k=4],offline-nca,grpo[num_iterations=2]")
    assert specs == ["nca", "nca[reward_temperature=0.1,k=4]", "offline-nca", "grpo[num_iterations=2]"]
    assert parse_method(specs[1]) == ("nca", {"reward_temperature": 0.1, "k": 4})


def _record(points):
    return {"points": [{"completions": c, "strict": s} for c, s in points]}


def test_mean_curve_averages_the_runs_that_have_each_point():
    runs = [_record([(0, 0.2), (64, 0.3), (128, 0.5)]), _record([(0, 0.4), (128, 0.3)])]
    assert mean_curve(runs) == [
        (0, pytest.approx(0.3), 0.2, 0.4, 2),
        (64, pytest.approx(0.3), 0.3, 0.3, 1),
        (128, pytest.approx(0.4), 0.3, 0.5, 2),
    ]
    # an offline run scores every point at its whole sample: its last score counts there
    offline = _record([(256, 0.1), (256, 0.2), (256, 0.35)])
    assert mean_curve([offline]) == [(256, 0.35, 0.35, 0.35, 1)]
    assert completions_to_reach(runs, 0.3) == 64
    assert completions_to_reach(runs, 0.4) == 128
    assert completions_to_reach(runs, 0.41) is None
    assert completions_to_reach(runs, 0.0) == 64  # the start does not count as reaching anything
    # touching the target and falling back below does not count: the curve must stay at or above it
    dip = [_record([(0, 0.1), (64, 0.5), (128, 0.2), (192, 0.45), (256, 0.5)])]
    assert completions_to_reach(dip, 0.45) == 192
    assert completions_to_reach(dip, 0.55) is None


def test_length_normalized_knob_is_nca_on_mean_token_logratios():
    torch.manual_seed(0)
    groups, k, tokens = 2, 3, 5
    mask = torch.ones(groups * k, tokens)
    mask[0, 3:] = 0
    mask[4, 1:] = 0
    per_token = torch.randn(groups * k, tokens, requires_grad=True)
    ref_per_token = torch.randn(groups * k, tokens)
    rewards = torch.tensor([[1.0, 0.4, 0.0], [0.1, 1.1, 0.5]])
    beta, alpha = 0.1, 0.3
    labels = torch.softmax(rewards / alpha, dim=-1).flatten()
    trainer = object.__new__(length_normalized(OnlineNCATrainer))
    trainer.nca_beta = beta
    inputs = {
        "completion_mask": mask,
        "nca_labels": labels,
        "nca_group_size": torch.full((groups * k,), k),
        "nca_valid": torch.ones(groups * k, dtype=torch.bool),
    }
    logps, ref_logps = (per_token * mask).sum(1), (ref_per_token * mask).sum(1)
    loss = trainer._group_loss(logps, ref_logps, inputs, k)
    lengths = mask.sum(1)
    expected = nca_loss(
        (logps / lengths).view(groups, k),
        (ref_logps / lengths).view(groups, k),
        rewards,
        beta=beta,
        reward_temperature=alpha,
    ).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # at the sampler reference (r = 0, one update per generation) each token's gradient is the plain (summed) NCA's
    # divided by its completion's length; padding gets none
    plain = object.__new__(OnlineNCATrainer)
    plain.nca_beta = beta
    logps = (per_token * mask).sum(1)  # a fresh graph for each gradient
    (grad_mean,) = torch.autograd.grad(trainer._group_loss(logps, logps.detach(), inputs, k), per_token)
    logps = (per_token * mask).sum(1)
    (grad_sum,) = torch.autograd.grad(plain._group_loss(logps, logps.detach(), inputs, k), per_token)
    assert grad_mean[4, 1:].abs().max() == 0
    assert torch.allclose(grad_mean, grad_sum / lengths[:, None], rtol=1e-5, atol=1e-9)
    assert not torch.allclose(grad_mean, grad_sum, rtol=1e-2)


def _test_record(method, seed, final, early=None, total=256):
    points = [{"completions": 0, "strict": 0.0, "each_strict": "0" * len(final)}]
    if early is not None:
        points.append({"completions": 192, "strict": early.count("1") / len(early), "each_strict": early})
    points.append({"completions": total, "strict": final.count("1") / len(final), "each_strict": final})
    for point in points:
        point["anywhere"], point["by_kind"] = point["strict"], {}
    return {"task": "t", "seed": seed, "method": method, "split": "test", "points": points, "final": points[-1],
            "completions": total, "train_seconds": 1.0, "grad_norm": [0.5]}  # fmt: skip


def test_paired_interval_resamples_seeds_and_questions():
    import numpy as np

    # every question of every seed one better: the interval is the point
    assert paired_interval(np.ones((4, 10))) == (1.0, 1.0, 1.0)
    # a seed effect: three seeds +0.5, one seed -0.5, the same on every question; the mean is 0.25, and resampling
    # seeds gives an interval that reaches below 0 (four seeds cannot rule the bad seed out)
    diff = np.array([[0.5] * 8, [0.5] * 8, [0.5] * 8, [-0.5] * 8])
    mean, low, high = paired_interval(diff, resamples=4000)
    assert mean == pytest.approx(0.25) and low == pytest.approx(-0.25) and high == pytest.approx(0.5)
    # a question effect alone: one question of 20 differs on every seed; the interval covers 0 and 0.05..0.15
    diff = np.zeros((5, 20))
    diff[:, 0] = 1
    mean, low, high = paired_interval(diff, resamples=4000)
    assert mean == pytest.approx(0.05) and low == 0.0 and 0.1 <= high <= 0.2


def test_verdict_says_tie_only_inside_the_margin():
    assert verdict(-0.02, 0.025, "nca", "grpo") == "tie (the interval lies inside ±0.03)"
    assert verdict(0.01, 0.09, "nca", "grpo") == "nca ahead"
    assert verdict(-0.09, -0.01, "nca", "grpo") == "grpo ahead"
    assert verdict(-0.05, 0.02, "nca", "grpo").startswith("not separated")


def test_compare_pairs_by_seed_and_question_and_checks_both_targets():
    grpo = [_test_record("grpo", s, "1100") for s in range(3)]
    # NCA one question better on every seed, and at 192 completions already level with GRPO's end
    nca = [_test_record("nca", s, "1110", early="1100") for s in range(3)]
    nca.append(_test_record("nca", 9, "0000"))  # a seed GRPO has no run for: left out of the pairing
    text = "\n".join(compare({("t", "grpo"): grpo, ("t", "nca"): nca}))
    # 4 questions, one differs: resampling questions gives 0 to 3 copies of it
    assert "| t | nca vs grpo | 3 | +0.250 [+0.000, +0.750] | not separated" in text
    # the t interval over seeds: every seed +0.25, no spread between seeds, so it is the point (the test set is
    # taken as fixed there, where the bootstrap resamples it)
    assert "reaches past ±0.03) | [+0.250, +0.250] | not met |" in text
    assert "at 192: +0.000 [+0.000, +0.000]" in text
    assert "| not met |" in text  # the interval reaches 0: not "above 0"
    assert "per seed: +0.250, +0.250, +0.250" in text


def test_summarize_prints_na_for_the_spread_of_one_run_and_compares_on_test_records():
    grpo = [_test_record("grpo", 0, "1000")]
    nca = [_test_record("nca", 0, "1111")]
    text = summarize(grpo + nca, None)
    assert "| t | grpo | 1 | 0.000 | 0.250 ± n/a | +0.250 |" in text
    # one seed: only the questions are resampled (3 of 4 differ by 1)
    assert "nca vs grpo | 1 | +0.750 [+0.250, +1.000] | nca ahead | n/a | met | not scored | n/a |" in text


def test_a_records_file_holds_one_evaluation_set(tmp_path):
    """Tuning runs (validation) and study runs (test) never share a records file, so a summary cannot mix them."""
    import json

    from online_vs_grpo import main

    records = tmp_path / "r.jsonl"
    records.write_text(json.dumps({"task": "arithmetic", "seed": 0, "method": "nca", "split": "validation",
                                   "settings": {"eval_prompts": 128}}) + "\n")  # fmt: skip
    with pytest.raises(SystemExit, match=r"holds runs scored on \('validation', 128\), not on \('test', 256\)"):
        main(["--records", str(records), "--split", "test", "--model_dir", str(tmp_path / "none")])
