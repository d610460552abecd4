"""On preference pairs, InfoNCATrainer is DPOTrainer (sigmoid) and NCATrainer is DPOTrainer (nca_pair).

The policy and the reference differ, so the log-ratios are not zero and the comparison is not trivial.
"""

import copy

import pytest
import torch
from helpers import dpo_args, nca_args, pairwise_dataset
from trl import DPOTrainer

from trl_nca import InfoNCATrainer, NCATrainer

CASES = [(InfoNCATrainer, "sigmoid"), (NCATrainer, "nca_pair")]


def dpo_and_ours(ours_cls, loss_type, data, tokenizer, model, other_model, tmp_path, **overrides):
    """DPOTrainer and one of ours on the same data, each with its own copy of the same policy and reference."""

    def build(cls, args):
        return cls(
            model=copy.deepcopy(model),
            ref_model=copy.deepcopy(other_model),
            args=args,
            train_dataset=data,
            processing_class=tokenizer,
        )

    return build(DPOTrainer, dpo_args(tmp_path, loss_type=loss_type)), build(ours_cls, nca_args(tmp_path, **overrides))


def first_batch_loss_and_grads(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("conversational", [True, False])
@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_first_step_loss_and_gradient_match_dpo(
    ours_cls, loss_type, conversational, tokenizer, model, other_model, tmp_path
):
    dpo, ours = dpo_and_ours(
        ours_cls, loss_type, pairwise_dataset(conversational), tokenizer, model, other_model, tmp_path
    )

    dpo_loss, dpo_grads = first_batch_loss_and_grads(dpo)
    our_loss, our_grads = first_batch_loss_and_grads(ours)

    assert dpo_loss.item() > 0.05  # the reference differs from the policy: not the value at initialisation
    torch.testing.assert_close(our_loss, dpo_loss, rtol=1e-6, atol=1e-6)
    assert our_grads.keys() == dpo_grads.keys()
    for name in dpo_grads:
        torch.testing.assert_close(our_grads[name], dpo_grads[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("prompt_sharing", ["off", "on"])
@pytest.mark.parametrize("ours_cls, loss_type", CASES)
def test_one_training_step_logs_dpo_keys_with_dpo_values(
    ours_cls, loss_type, prompt_sharing, tokenizer, model, other_model, tmp_path
):
    data = pairwise_dataset()
    dpo, ours = dpo_and_ours(
        ours_cls, loss_type, data, tokenizer, model, other_model, tmp_path, prompt_sharing=prompt_sharing
    )
    dpo.train()
    ours.train()
    dpo_log, our_log = dpo.state.log_history[0], ours.state.log_history[0]
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
        assert our_log[key] == pytest.approx(dpo_log[key], rel=1e-5, abs=1e-6), key
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
