"""On preference pairs, InfoNCATrainer is DPOTrainer (sigmoid) and NCATrainer is DPOTrainer (nca_pair).

The policy and the reference differ, so the log-ratios are not zero and the comparison is not trivial.
"""

import copy

import pytest
import torch
from helpers import dpo_and_ours, dpo_args, first_batch_loss_and_grads, pairwise_dataset

from trl_nca import InfoNCATrainer, NCATrainer

CASES = [(InfoNCATrainer, "sigmoid"), (NCATrainer, "nca_pair")]


@pytest.mark.parametrize("tied_scores", [False, True], ids=["no-scores", "tied-scores"])
@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_first_step_loss_and_gradient_match_dpo(
    ours_cls, loss_type, conversational, tied_scores, tokenizer, model, other_model, tmp_path
):
    """Also with `score_chosen == score_rejected`: the row says which response is chosen, and DPO trusts that."""
    data = pairwise_dataset(conversational, tied_scores=tied_scores)
    dpo, ours = dpo_and_ours(ours_cls, loss_type, data, tokenizer, model, other_model, tmp_path)

    dpo_loss, dpo_grads = first_batch_loss_and_grads(dpo)
    our_loss, our_grads = first_batch_loss_and_grads(ours)

    assert dpo_loss.item() > 0.05  # the reference differs from the policy: not the value at initialisation
    # The loss is beta times differences of float32 log-probs of ~50: precise to a few 1e-6 absolute, not 1e-6
    torch.testing.assert_close(our_loss, dpo_loss, rtol=1e-5, atol=1e-5)
    assert our_grads.keys() == dpo_grads.keys()
    for name in dpo_grads:
        torch.testing.assert_close(our_grads[name], dpo_grads[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(
    "prompt_sharing, tied_scores", [("off", False), ("mask", False), ("mask", True)], ids=["padded", "shared", "tied"]
)
@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_one_training_step_logs_dpo_keys_with_dpo_values(
    ours_cls, loss_type, prompt_sharing, tied_scores, tokenizer, model, other_model, tmp_path
):
    data = pairwise_dataset(tied_scores=tied_scores)
    dpo, ours = dpo_and_ours(
        ours_cls, loss_type, data, tokenizer, model, other_model, tmp_path, prompt_sharing=prompt_sharing
    )
    dpo.train()
    ours.train()
    dpo_log, our_log = dpo.state.log_history[0], ours.state.log_history[0]
    # Rewards and margins are differences of float32 log-probs: precise to the log-probs' magnitude, not their own
    logps_scale = abs(dpo_log["logps/chosen"]) + abs(dpo_log["logps/rejected"])
    for key in [
        "loss",
        "grad_norm",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/accuracies",
        "rewards/margins",
        "logps/chosen",
        "logps/rejected",
        "entropy",
        "mean_token_accuracy",
    ]:
        assert our_log[key] == pytest.approx(dpo_log[key], rel=1e-5, abs=1e-6 * logps_scale), key
    # num_tokens counts the tokens fed to the model: DPO's count in the padded layout, fewer with a shared prompt
    if prompt_sharing == "off":
        assert our_log["num_tokens"] == dpo_log["num_tokens"]
    else:
        prompts = sum(len(row["prompt_ids"]) for row in ours.train_dataset)
        assert our_log["num_tokens"] == dpo_log["num_tokens"] - prompts + len(data)  # one copy token per response


def test_dpo_script_with_dpo_config_runs_unchanged(tokenizer, model, tmp_path):
    """Swapping the class in a DPO script: a DPOConfig, no ref_model, a model instance without a hub id."""
    data = pairwise_dataset()
    trainer = NCATrainer(
        model=model, args=dpo_args(tmp_path, max_steps=2), train_dataset=data, processing_class=tokenizer
    )
    assert trainer.args.beta == 0.5 and trainer.args.reward_temperature == 0.01
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    ref_params = dict(trainer.ref_model.named_parameters())
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, initial[n])]
    assert changed, "the policy did not move"
    for name, value in initial.items():  # the reference is the initial policy, and stays it
        assert torch.equal(ref_params[name], value), name
    # at initialisation policy == reference, so NCA's first loss is 2 log 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * torch.log(torch.tensor(2.0)).item(), abs=1e-5)


@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_a_dpo_config_naming_the_trainers_own_loss_type_is_accepted(
    ours_cls, loss_type, tokenizer, model, other_model, tmp_path
):
    """NCATrainer on pairs is `nca_pair` and InfoNCATrainer is `sigmoid`: a DPOConfig that says so is not an error."""
    dpo, _ = dpo_and_ours(ours_cls, loss_type, pairwise_dataset(), tokenizer, model, other_model, tmp_path)
    ours = ours_cls(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(other_model),
        args=dpo_args(tmp_path, loss_type=loss_type),
        train_dataset=pairwise_dataset(),
        processing_class=tokenizer,
    )
    assert ours.args.loss_type == [loss_type]
    torch.testing.assert_close(first_batch_loss_and_grads(ours)[0], first_batch_loss_and_grads(dpo)[0])


@pytest.mark.parametrize(
    "ours_cls, loss_type, message",
    [
        (InfoNCATrainer, "nca_pair", "InfoNCATrainer computes InfoNCA, which on preference pairs is DPO's "),
        (NCATrainer, "ipo", "`loss_type=\\['ipo'\\]` has no meaning for NCA or InfoNCA"),
        (InfoNCATrainer, ["sigmoid", "nca_pair"], "has no meaning for NCA or InfoNCA"),
    ],
)
def test_other_loss_types_still_raise(ours_cls, loss_type, message, tokenizer, model, tmp_path):
    with pytest.raises(ValueError, match=message):
        ours_cls(
            model=model,
            args=dpo_args(tmp_path, loss_type=loss_type),
            train_dataset=pairwise_dataset(),
            processing_class=tokenizer,
        )
