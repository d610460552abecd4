"""Online NCA and InfoNCA on GRPOTrainer's loop: the loss against trl_nca.losses on the same groups, the policy
gradient identity of the sampler reference, micro-batching, ties, LoRA, resume, and bad input."""

import math

import pytest
import torch
from conftest import build_model
from datasets import Dataset
from helpers import CPU, StopAt
from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset
from peft import LoraConfig
from transformers import TrainerCallback
from trl import GRPOConfig

from trl_nca import OnlineInfoNCATrainer, OnlineNCAConfig, OnlineNCATrainer, infonca_loss, nca_loss, soft_labels

CASES = [(OnlineNCATrainer, nca_loss), (OnlineInfoNCATrainer, infonca_loss)]


def lora(random_init: bool = True) -> LoraConfig:
    """A LoRA adapter; with `random_init`, B is not zero, so the policy differs from the base model at step 0."""
    return LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=not random_init
    )


def build(cls, tokenizer, tmp_path, reward=length_reward, **overrides):
    return cls(
        model=build_model(tokenizer),
        reward_funcs=reward,
        args=online_args(tmp_path, **overrides),
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        peft_config=lora(),
        rollout_func=deterministic_rollout,
    )


def scored_groups(trainer, prompts=(0, 1)):
    """One generation batch (the rows as GRPO's sampler repeats them) through generation and scoring."""
    k = trainer.num_generations
    return trainer._generate_and_score_completions([trainer.train_dataset[i] for i in prompts for _ in range(k)])


def sequence_logps(model, batch):
    """Summed completion log-probabilities from a plain forward and a float64 log-softmax over the full logits."""
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], dim=1)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].double()
    per_token = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    return (per_token[:, -batch["completion_ids"].size(1) :] * batch["completion_mask"]).sum(-1)


def rewards_of(trainer, batch):
    texts = trainer.processing_class.batch_decode(batch["completion_ids"], skip_special_tokens=True)
    return torch.tensor(
        length_reward(None, [[{"role": "assistant", "content": t}] for t in texts]), dtype=torch.float64
    )


@pytest.mark.parametrize("cls, loss_fn", CASES)
def test_initial_reference_loss_is_the_offline_loss_on_each_group(cls, loss_fn, tokenizer, tmp_path):
    trainer = build(cls, tokenizer, tmp_path, reference="initial")
    trainer.model.eval()  # evaluation mode: no gradient accumulation normaliser
    batch = scored_groups(trainer)
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        policy = sequence_logps(trainer.model, batch)
        with trainer.model.disable_adapter():
            reference = sequence_logps(trainer.model, batch)
    rewards = rewards_of(trainer, batch)
    assert len(set(rewards.tolist())) > 1 and (policy - reference).abs().min() > 1e-3  # not the trivial case
    expected = loss_fn(
        policy.view(2, 4), reference.view(2, 4), rewards.view(2, 4), beta=0.5, reward_temperature=0.5
    ).mean()
    torch.testing.assert_close(loss.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        batch["nca_labels"].double(), soft_labels(rewards.view(2, 4), reward_temperature=0.5).flatten()
    )


@pytest.mark.parametrize("cls, weight", [(OnlineNCATrainer, 0.5), (OnlineInfoNCATrainer, 1.0)])
def test_sampler_reference_is_a_policy_gradient_with_advantage_label_minus_uniform(cls, weight, tokenizer, tmp_path):
    """With reference="sampler" and one update per generation, r_k = 0 at the update, the loss is its value at
    initialisation, and -grad L = sum_k beta * w * (p_k - 1/K) * grad log pi(y_k) (per group, averaged over groups),
    with w = 1/2 for NCA (sigmoid'(0)) and 1 for InfoNCA."""
    trainer = build(cls, tokenizer, tmp_path, reference="sampler")
    trainer.model.eval()
    batch = scored_groups(trainer)
    params = [p for n, p in trainer.model.named_parameters() if p.requires_grad]
    loss = trainer.compute_loss(trainer.model, batch)
    grads = torch.autograd.grad(loss, params)
    assert loss.item() == pytest.approx(2 * math.log(2) if cls is OnlineNCATrainer else math.log(4), abs=1e-6)

    labels = soft_labels(rewards_of(trainer, batch).view(2, 4), reward_temperature=0.5)
    advantage = (labels - 0.25).flatten()
    assert advantage.abs().max() > 0.05
    surrogate = -(0.5 * weight * advantage * sequence_logps(trainer.model, batch)).sum() / 2  # 2 groups
    expected = torch.autograd.grad(surrogate, params)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got.double(), want.double(), atol=1e-6, rtol=1e-4)


class Snapshot(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}


def one_sgd_step(cls, tokenizer, tmp_path, name, **overrides):
    """One optimizer step with plain SGD (whose update is proportional to the gradient, so a mis-scaled loss shows)."""
    trainer = build(cls, tokenizer, tmp_path / name, reference="initial", optim="sgd", max_steps=1, **overrides)
    snapshot = Snapshot()
    trainer.add_callback(snapshot)
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    return trainer, snapshot.before, after


GA = "gradient_accumulation_steps"
SPLITS = [  # (trainer, one micro-batch, the same generation batch in several micro-batches)
    (OnlineNCATrainer, {"per_device_train_batch_size": 4}, {"per_device_train_batch_size": 2, GA: 2}),
    (OnlineNCATrainer, {"per_device_train_batch_size": 8}, {"per_device_train_batch_size": 2, GA: 4}),
    (OnlineInfoNCATrainer, {"per_device_train_batch_size": 4, "num_generations": 2},
     {"per_device_train_batch_size": 2, "num_generations": 2, GA: 2}),
]  # fmt: skip


@pytest.mark.parametrize("cls, whole, split", SPLITS)
def test_a_groups_loss_does_not_depend_on_how_the_batch_is_split(cls, whole, split, tokenizer, tmp_path):
    one, before, after_one = one_sgd_step(cls, tokenizer, tmp_path, "whole", **whole)
    two, _, after_two = one_sgd_step(cls, tokenizer, tmp_path, "split", **split)
    moved = {n for n in after_one if not torch.equal(after_one[n], before[n])}
    assert moved and all("lora_" in n for n in moved)  # LoRA: only the adapter trains
    for name in after_one:
        torch.testing.assert_close(after_two[name], after_one[name], atol=1e-6, rtol=1e-5, msg=name)
    first = [e for e in one.state.log_history if "loss" in e][0]
    second = [e for e in two.state.log_history if "loss" in e][0]
    assert second["loss"] == pytest.approx(first["loss"], rel=1e-5) and first["loss"] != pytest.approx(2 * math.log(2))


def test_infonca_refuses_settings_that_would_split_a_group(tokenizer, tmp_path):
    with pytest.raises(
        ValueError, match=r"per_device_train_batch_size \(2\) must be a multiple of the group size \(4\)"
    ):
        build(OnlineInfoNCATrainer, tokenizer, tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)


def test_groups_whose_rewards_all_tie_are_counted_and_give_no_gradient_with_the_sampler(tokenizer, tmp_path):
    def constant(prompts, completions, **kwargs):
        return [1.0] * len(completions)

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=constant, optim="sgd", max_steps=1)
    snapshot = Snapshot()
    trainer.add_callback(snapshot)
    trainer.train()
    log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert log["frac_tied_groups"] == 1.0 and log["grad_norm"] == 0.0
    for name, param in trainer.model.named_parameters():
        assert torch.equal(param, snapshot.before[name]), name


def test_a_grpo_script_runs_with_the_class_and_config_swapped(tokenizer, tmp_path):
    """GRPOConfig as a GRPO script writes it, handed to the online trainer: converted, GRPO's beta (0) not carried."""
    settings = {**CPU, "num_generations": 2, "max_completion_length": 6, "max_steps": 1}
    args = GRPOConfig(output_dir=str(tmp_path / "g"), **settings)
    trainer = OnlineNCATrainer(
        model=build_model(tokenizer), reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
        processing_class=tokenizer,
    )  # fmt: skip
    assert isinstance(trainer.args, OnlineNCAConfig) and trainer.args.beta == 0.1 and trainer.args.num_generations == 2
    trainer.train()
    log = [e for e in trainer.state.log_history if "loss" in e][0]
    assert log["loss"] == pytest.approx(2 * math.log(2), abs=1e-6)  # sampler reference: r = 0 at the update
    assert log["completions/mean_length"] > 0 and "rewards/length_reward/mean" in log


def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tokenizer, tmp_path):
    """Real sampling (no fixed rollout): Trainer restores the RNG state with the checkpoint, so the resumed run
    samples the same completions and ends with the same weights."""

    def run(name, callbacks=(), resume=None):
        trainer = OnlineNCATrainer(
            model=build_model(tokenizer),
            reward_funcs=length_reward,
            args=online_args(
                tmp_path / name,
                max_steps=4,
                num_generations=2,
                per_device_train_batch_size=4,
                save_strategy="steps",
                save_steps=2,
                temperature=1.0,
            ),  # fmt: skip
            train_dataset=prompts_dataset(),
            processing_class=tokenizer,
            peft_config=lora(random_init=False),
            callbacks=list(callbacks),
        )
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    run("cut", [StopAt(2)])
    resumed = run("cut", resume=str(tmp_path / "cut" / "online" / "checkpoint-2"))
    assert resumed.state.global_step == 4
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)


# --- bad input -----------------------------------------------------------------------------------------------------


def test_bad_online_settings_and_data_are_refused_before_training(tokenizer, tmp_path):
    with pytest.raises(ValueError, match="`num_generations` \\(and `num_generations_eval`\\) must be at least 2"):
        online_args(tmp_path, num_generations=1)
    with pytest.raises(ValueError, match="`loss_type='grpo'` shapes GRPO's loss or advantages"):
        online_args(tmp_path, loss_type="grpo")
    with pytest.raises(ValueError, match="`beta` must be a finite number > 0"):
        online_args(tmp_path, beta=0.0)
    with pytest.raises(ValueError, match="`sync_ref_model=True` needs `reference='initial'`"):
        online_args(tmp_path, sync_ref_model=True)
    with pytest.raises(ValueError, match="The train dataset needs a `prompt` column, .* it has \\['question'\\]"):
        OnlineNCATrainer(model=build_model(tokenizer), reward_funcs=length_reward, args=online_args(tmp_path),
                         train_dataset=Dataset.from_dict({"question": ["a"]}), processing_class=tokenizer)  # fmt: skip


BAD_VALUES = [
    (lambda n: [1.0] * (n - 1), "Reward function 'bad' returned 7 values for 8 completions"),
    (lambda n: [math.inf if i == 6 else 0.0 for i in range(n)], "'bad' returned inf for completion 2 of prompt 1"),
    (lambda n: ["ok"] * n, "Reward function 'bad' returned 'ok' for completion 0 of prompt 0"),
]


@pytest.mark.parametrize("values, message", BAD_VALUES)
def test_a_reward_function_that_returns_what_cannot_be_trained_on_stops_the_run(values, message, tokenizer, tmp_path):
    def bad(prompts, completions, **kwargs):
        return values(len(completions))

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=bad, per_device_train_batch_size=8)
    with pytest.raises(ValueError, match=message):
        trainer.train()
