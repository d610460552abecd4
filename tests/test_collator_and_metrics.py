"""The K-response collator's layout and truncation, and the per-prompt metrics against hand-computed values."""

import doctest
import math

import pytest
import torch

import trl_nca.data
import trl_nca.layouts.padded
from trl_nca import DataCollatorForKResponses
from trl_nca.metrics import k_response_metrics, spearman


@pytest.mark.parametrize("module", [trl_nca.layouts.padded, trl_nca.layouts.shared_prompt, trl_nca.data])
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_flattened_order_matches_response_mask_and_carries_ref_logps():
    examples = [
        {"prompt_ids": [1, 2], "completion_ids": [[3], [4, 5]], "rewards": [0.5, 1.5], "ref_logps": [-1.0, -2.0]},
        {"prompt_ids": [6], "completion_ids": [[7], [8], [9, 9, 9]], "rewards": [1, 2, 3], "ref_logps": [-3, -4, -5]},
    ]
    batch = DataCollatorForKResponses(pad_token_id=0)(examples)
    assert batch["input_ids"].shape == (5, 4)
    slots = batch["response_mask"].nonzero().tolist()
    assert slots == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 2]]
    # sequence n belongs to slot n: its last real token is that response's last token
    last = [row[mask.bool()][-1].item() for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert last == [3, 5, 7, 8, 9]
    assert batch["ref_logps"].tolist() == [[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]
    assert batch["completion_mask"].sum(1).tolist() == [1, 2, 1, 1, 3]


def test_truncation_keeps_the_start_of_each_sequence():
    examples = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5, 6], [7]], "rewards": [1.0, 0.0]}]
    batch = DataCollatorForKResponses(pad_token_id=0, max_length=4)(examples)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4], [1, 2, 3, 7]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 0, 0, 1]]
    padded = DataCollatorForKResponses(pad_token_id=0, pad_to_multiple_of=8)(examples)
    assert padded["input_ids"].shape == (2, 8)


def test_metrics_against_hand_computed_values():
    beta = 0.5
    rewards = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    ref = torch.zeros(2, 3)
    policy = torch.tensor([[-2.0, -6.0, -4.0], [-1.0, -3.0, 0.0]])  # model rewards: [-1, -3, -2], [-0.5, -1.5]
    m = k_response_metrics(policy, ref, rewards, mask, beta=beta)
    assert m["rewards/accuracies"].tolist() == [1.0, 0.0]
    torch.testing.assert_close(m["rewards/margins"], torch.tensor([-1.0 - (-3.0 - 2.0) / 2, -1.5 - -0.5]))
    torch.testing.assert_close(m["rewards/best"], torch.tensor([-1.0, -1.5]))
    torch.testing.assert_close(m["rewards/worst"], torch.tensor([-3.0, -0.5]))
    torch.testing.assert_close(m["logps/best"], torch.tensor([-2.0, -3.0]))
    torch.testing.assert_close(m["logps/worst"], torch.tensor([-6.0, -1.0]))
    torch.testing.assert_close(m["rewards/spearman"], torch.tensor([1.0, -1.0]))
    # DPO's keys exist only for the prompt with two responses
    assert math.isnan(m["rewards/chosen"][0]) and m["rewards/chosen"][1].item() == -1.5
    assert m["rewards/rejected"][1].item() == -0.5 and m["logps/rejected"][1].item() == -1.0


def test_accuracy_is_undefined_when_all_data_rewards_tie_and_spearman_handles_ties():
    m = k_response_metrics(
        torch.tensor([[1.0, 2.0]]),
        torch.zeros(1, 2),
        torch.tensor([[4.0, 4.0]]),
        torch.tensor([[True, True]]),
        beta=1.0,
    )
    assert math.isnan(m["rewards/accuracies"].item()) and math.isnan(m["rewards/spearman"].item())
    a = torch.tensor([[1.0, 2.0, 2.0, 4.0, 0.0]])
    b = torch.tensor([[10.0, 30.0, 20.0, 40.0, 99.0]])
    mask = torch.tensor([[True, True, True, True, False]])
    # ranks of a: 1, 2.5, 2.5, 4; of b: 1, 3, 2, 4 -> Pearson of the ranks
    ra, rb = torch.tensor([1, 2.5, 2.5, 4]), torch.tensor([1.0, 3, 2, 4])
    expected = torch.corrcoef(torch.stack([ra, rb]))[0, 1]
    torch.testing.assert_close(spearman(a, b, mask)[0], expected)
