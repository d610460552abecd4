"""The pieces of `benchmarks/offline_vs_dpo.py` and `benchmarks/intervals.py` that decide the offline study's numbers:
the t interval beside the bootstrap, the pairs DPO trains on, the best answer whose likelihood is traced (the same
quantity as the trainers' own `logps/best` and DPO's `logps/chosen`), and the likelihood table and band."""

import copy
import math
import statistics
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import assistant, dpo_args, nca_args, user

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
from intervals import t_interval, t_quantile  # noqa: E402
from offline_vs_dpo import (  # noqa: E402
    best_index,
    best_logps,
    best_worst_pairs,
    likelihood_band,
    likelihood_table,
    offline_summary,
    with_signal,
)

from trl_nca import NCATrainer  # noqa: E402
from trl_nca.metrics import best_and_worst  # noqa: E402


@pytest.mark.parametrize(
    "df, quantile",
    # Student's t, two-sided 95% (p = 0.975), from printed tables (e.g. NIST/SEMATECH e-Handbook, table 1.3.6.7.2)
    [(1, 12.706), (2, 4.303), (4, 2.776), (9, 2.262), (19, 2.093), (30, 2.042), (120, 1.980)],
)
def test_t_quantile_matches_printed_tables(df, quantile):
    assert t_quantile(0.975, df) == pytest.approx(quantile, abs=1e-3)


def test_t_quantile_other_levels_and_bad_arguments():
    assert t_quantile(0.95, 9) == pytest.approx(1.833, abs=1e-3)  # the one-sided 95% column
    assert t_quantile(0.5, 5) == pytest.approx(0.0, abs=1e-9)
    assert t_quantile(0.975, 10_000) == pytest.approx(statistics.NormalDist().inv_cdf(0.975), abs=1e-3)
    with pytest.raises(ValueError, match="0.5 <= p < 1"):
        t_quantile(0.3, 4)


def test_t_interval_by_hand():
    # 0.1, 0.2, 0.3: mean 0.2, sd 0.1, 3 seeds: half-width t(0.975, 2) * 0.1 / sqrt(3) = 4.3027 * 0.057735
    mean, low, high = t_interval([0.1, 0.2, 0.3])
    assert mean == pytest.approx(0.2)
    assert (low, high) == pytest.approx((0.2 - 0.248414, 0.2 + 0.248414), abs=1e-5)
    # no spread between seeds: the point itself; one seed: nothing to go on
    assert t_interval([0.05] * 4) == pytest.approx((0.05, 0.05, 0.05))
    assert t_interval([0.3]) == (0.3, -math.inf, math.inf)


def test_t_interval_against_the_online_studys_per_seed_differences():
    # arithmetic NCA - GRPO, the ten seeds recorded in docs/benchmarks.md: the t interval the audit recomputed
    per_seed = [-0.012, 0.105, -0.039, -0.004, 0.051, 0.051, -0.035, 0.004, 0.031, -0.012]
    mean, low, high = t_interval(per_seed)
    sd = statistics.stdev(per_seed)
    assert (low, high) == pytest.approx((mean - 2.262157 * sd / 10**0.5, mean + 2.262157 * sd / 10**0.5), abs=1e-5)
    assert low == pytest.approx(-0.018, abs=1e-3) and high == pytest.approx(0.046, abs=1e-3)


def _row(prompt, answers, rewards):
    return {"prompt": user(prompt), "completions": [assistant(a) for a in answers], "rewards": rewards}


ROWS = [
    _row("What is two plus two?", ["four", "three", "four, I think", "hello world"], [1.1, 0.0, 1.0, 0.0]),
    _row("Name a colour of the sky.", ["blue", "green grass", "The sky is blue.", "red"], [0.0, 0.1, 1.1, 1.1]),
    _row("Hello, who are you?", ["I am an assistant.", "hello", "world", "one"], [0.1, 0.1, 0.1, 0.1]),
]


def test_pairs_and_the_best_answer_follow_the_trainers_rule():
    rows = with_signal(ROWS)
    assert len(rows) == 2  # the row whose four answers score alike has no pair and no signal
    pairs = best_worst_pairs(rows)
    # best: the first of the highest rewards; worst: the first of the lowest
    assert pairs[0]["chosen"] == assistant("four") and pairs[0]["rejected"] == assistant("three")
    assert pairs[1]["chosen"] == assistant("The sky is blue.") and pairs[1]["rejected"] == assistant("blue")
    # the trainers' `logps/best` reads the same answer (metrics.best_and_worst)
    rewards = torch.tensor([row["rewards"] for row in ROWS])
    best, _ = best_and_worst(rewards, torch.ones_like(rewards, dtype=torch.bool))
    assert best.squeeze(-1).tolist() == [best_index(row["rewards"]) for row in ROWS] == [0, 2, 0]


def test_best_logps_is_the_trainers_logps_best_and_dpos_logps_chosen(tokenizer, model, tmp_path):
    """The likelihood the study traces is, before any step, the number NCATrainer logs as `logps/best` on the rows
    and DPOTrainer as `logps/chosen` on their pairs: one quantity for all four methods."""
    from trl import DPOTrainer

    rows = with_signal(ROWS)
    ours = best_logps(model, tokenizer, rows, batch_size=1)
    # padding changes nothing
    assert best_logps(model, tokenizer, rows, batch_size=16) == pytest.approx(ours, abs=1e-4)
    nca = NCATrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=nca_args(tmp_path),
                     train_dataset=Dataset.from_list(rows), processing_class=tokenizer)  # fmt: skip
    assert nca.evaluate(Dataset.from_list(rows))["eval_logps/best"] == pytest.approx(ours, abs=1e-3)
    dpo = DPOTrainer(model=copy.deepcopy(model), ref_model=copy.deepcopy(model), args=dpo_args(tmp_path),
                     train_dataset=Dataset.from_list(best_worst_pairs(rows)), processing_class=tokenizer)  # fmt: skip
    pairs = Dataset.from_list(best_worst_pairs(rows))
    assert dpo.evaluate(pairs)["eval_logps/chosen"] == pytest.approx(ours, abs=1e-3)


def _record(method, seed, trend, final="1100"):
    point = {"completions": 256, "strict": final.count("1") / len(final), "anywhere": 0.5, "by_kind": {},
             "each_strict": final}  # fmt: skip
    start = {**point, "strict": 0.25, "each_strict": "1000"}
    return {"task": "t", "seed": seed, "method": method, "split": "test", "points": [start, point],
            "final": point, "completions": 256, "train_seconds": 1.0, "grad_norm": [0.5],
            "likelihood": [{"step": s, "logps_best": v} for s, v in trend]}  # fmt: skip


def test_likelihood_table_and_band_over_seeds():
    runs = [_record("nca", 0, [(0, -7.0), (4, -6.5), (8, -6.0)]), _record("nca", 1, [(0, -7.0), (4, -7.5), (8, -6.8)])]
    dpo = [_record("dpo", 0, [(0, -7.0), (8, -9.0)]), _record("dpo", 1, [(0, -7.0), (8, -10.0)])]
    # the band keeps the steps every run measured; each point is the mean over seeds with its t interval
    band = likelihood_band(runs)
    assert [b[0] for b in band] == [0, 4, 8]
    # at step 4: -6.5 and -7.5, mean -7.0, sd 0.707, half-width t(0.975, 1) * 0.707 / sqrt(2)
    assert band[1][1] == pytest.approx(-7.0) and band[1][2] == pytest.approx(-7.0 - 12.706 * 0.5, abs=1e-3)
    assert [b[0] for b in likelihood_band(runs + dpo)] == [0, 8]
    text = "\n".join(likelihood_table({("t", "nca"): runs, ("t", "dpo"): dpo}))
    # nca: changes +1.0 and +0.2 (mean +0.6, sd 0.566); dpo: -2.0 and -3.0, both seeds fell
    assert "| t | nca | 2 | -7.00 | -6.40 | +0.60 [-4.48, +5.68] | 0 of 2 |" in text
    assert "| t | dpo | 2 | -7.00 | -9.50 | -2.50 [-8.85, +3.85] | 2 of 2 |" in text


def test_offline_summary_pairs_every_method_with_dpo_and_nca_with_infonca(tmp_path):
    runs = [_record(m, s, [(0, -7.0), (8, -7.0)], final=f) for s in range(3)
            for m, f in (("nca", "1110"), ("infonca", "1100"), ("dpo", "1000"), ("nca_pair", "1100"))]  # fmt: skip
    text = offline_summary(runs, str(tmp_path / "trend.png"))
    assert "Paired against dpo" in text and "Paired against infonca" in text
    assert "| t | nca vs dpo | 3 | +0.500 [" in text and "| t | nca_pair vs dpo | 3 | +0.250 [" in text
    assert "| t | nca vs infonca | 3 | +0.250 [" in text
    assert "dpo vs infonca" not in text  # the InfoNCA comparison is NCA's only
    assert (tmp_path / "trend.png").read_bytes()[:4] == b"\x89PNG"
