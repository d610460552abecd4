"""The online trainers' forward through the K-response layouts (each prompt encoded once per group) against GRPO's
own forward: the same per-token log-probabilities and entropies at every completion token, the same loss and
gradients, in every layout, with LoRA, gradient checkpointing, a sampling temperature, interleaved groups and
completions GRPO masks; and the thin GRPOTrainer subclass."""

import pytest
import torch
from conftest import build_model
from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset
from test_online import lora
from trl import GRPOConfig, GRPOTrainer

from trl_nca import OnlineInfoNCATrainer, OnlineNCATrainer, PromptSharingGRPOTrainer
from trl_nca.group_forward import group_rows

SETTINGS = ["mask", "cache", "auto"]


def build(cls, tokenizer, tmp_path, prompt_sharing, **overrides):
    settings = {"num_generations": 4, "per_device_train_batch_size": 8, "max_completion_length": 8, **overrides}
    return cls(
        model=build_model(tokenizer), reward_funcs=length_reward, train_dataset=prompts_dataset(),
        args=online_args(tmp_path / prompt_sharing, prompt_sharing=prompt_sharing, **settings),
        processing_class=tokenizer, peft_config=lora(), rollout_func=deterministic_rollout,
    )  # fmt: skip


def forward_inputs(batch, order=None):
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    if order is not None:
        ids, mask = ids[order], mask[order]
    return ids, mask, batch["completion_ids"].size(1)


def grads_of(trainer, logps, mask, weights):
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    return torch.autograd.grad((logps * mask * weights).sum(), params)


@pytest.mark.parametrize("prompt_sharing", SETTINGS)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "checkpointing"])
def test_per_token_logps_entropies_and_gradients_are_grpos(prompt_sharing, checkpointing, tokenizer, tmp_path):
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, prompt_sharing, temperature=0.7,
                    gradient_checkpointing=checkpointing)  # fmt: skip
    if checkpointing:
        trainer.model.gradient_checkpointing_enable({"use_reentrant": False})
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 1) for _ in range(4)])
    order = torch.tensor([5, 0, 3, 6, 1, 7, 2, 4])  # the groups interleaved, as NCA's one-by-one shuffle leaves them
    ids, mask, keep = forward_inputs(batch, order)
    completion_mask = batch["completion_mask"][order].float()
    ours, our_entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                      compute_entropy=True)  # fmt: skip
    theirs, their_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep,
                                                                             compute_entropy=True)  # fmt: skip
    real = completion_mask.bool()
    assert real.sum() > 20 and ours.shape == theirs.shape
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_entropy[real], their_entropy[real], rtol=1e-5, atol=1e-5)
    weights = torch.linspace(-1, 1, ours.numel()).view_as(ours)
    for got, want in zip(grads_of(trainer, ours, completion_mask, weights),
                         grads_of(trainer, theirs, completion_mask, weights)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    if prompt_sharing == "auto":
        assert trainer._group_collator.counts  # it chose a layout per batch
    # each prompt once: the forward saw 2 prompts, not 8 copies
    examples, members = group_rows(ids, mask, keep)
    assert [len(m) for m in members] == [4, 4] and sorted(sum(members, [])) == list(range(8))


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
@pytest.mark.parametrize("prompt_sharing", ["mask", "cache"])
def test_the_loss_and_a_training_step_are_those_of_grpos_forward(cls, prompt_sharing, tokenizer, tmp_path):
    """One SGD step with `reference="initial"` and a masked truncated completion: the same weights after it as with
    GRPO's forward (`prompt_sharing="off"`)."""
    after = {}
    for setting in ("off", prompt_sharing):
        trainer = build(cls, tokenizer, tmp_path, setting, reference="initial", optim="sgd", max_steps=1,
                        mask_truncated_completions=True, max_completion_length=4)  # fmt: skip
        trainer.train()
        after[setting] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        log = next(e for e in trainer.state.log_history if "loss" in e)
        after[setting]["loss"] = torch.tensor(log["loss"])
        if setting != "off":
            assert trainer._group_collator is not None
    for name, value in after["off"].items():
        torch.testing.assert_close(after[prompt_sharing][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_the_grpo_subclass_trains_as_grpo(tokenizer, tmp_path):
    """PromptSharingGRPOTrainer: GRPO's loss and step, its forwards through the shared-prompt layouts."""
    after = {}
    for cls, kwargs in ((GRPOTrainer, {}), (PromptSharingGRPOTrainer, {"prompt_sharing": "mask"})):
        args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, bf16=False, report_to=[],
                          num_generations=4, per_device_train_batch_size=8, max_completion_length=8, max_steps=1,
                          optim="sgd", learning_rate=0.5, gradient_checkpointing=False, beta=0.1, seed=0,
                          logging_steps=1)  # fmt: skip
        trainer = cls(model=build_model(tokenizer), reward_funcs=length_reward, args=args,
                      train_dataset=prompts_dataset(), processing_class=tokenizer, peft_config=lora(),
                      rollout_func=deterministic_rollout, **kwargs)  # fmt: skip
        trainer.train()
        after[cls] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        after[cls]["loss"] = torch.tensor(next(e for e in trainer.state.log_history if "loss" in e)["loss"])
    moved = 0
    for name, value in after[GRPOTrainer].items():
        torch.testing.assert_close(after[PromptSharingGRPOTrainer][name], value, rtol=1e-5, atol=1e-6, msg=name)
        moved += "lora_B" in name and bool(value.abs().sum() > 0)
    assert moved


def test_the_grpo_subclass_keeps_groups_whole_under_grpos_default_order(tokenizer, tmp_path, monkeypatch):
    """steps_per_generation = 4 (gradient accumulation 4), K = 4: GRPO's per-completion shuffle splits groups over the
    micro-batches; the subclass shuffles whole groups, so each micro-batch holds one prompt's 4 completions, and its
    step equals GRPOTrainer's given the same (group) order."""
    import trl.trainer.grpo_trainer as grpo_module

    from trl_nca.online_groups import shuffle_groups

    def run(cls, **kwargs):
        args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), use_cpu=True, bf16=False, report_to=[],
                          num_generations=4, per_device_train_batch_size=4, gradient_accumulation_steps=4,
                          max_completion_length=8, max_steps=1, optim="sgd", learning_rate=0.5,
                          gradient_checkpointing=False, beta=0.1, seed=0, logging_steps=1)  # fmt: skip
        trainer = cls(model=build_model(tokenizer), reward_funcs=length_reward, args=args,
                      train_dataset=prompts_dataset(), processing_class=tokenizer, peft_config=lora(),
                      rollout_func=deterministic_rollout, **kwargs)  # fmt: skip
        seen = []
        forward = trainer._get_per_token_logps_and_entropies

        def counting(model, input_ids, *args, **kwargs):  # prompts per policy forward of a micro-batch
            if torch.is_grad_enabled():
                seen.append(len({tuple(row) for row in input_ids[:, : input_ids.size(1) - args[1]].tolist()}))
            return forward(model, input_ids, *args, **kwargs)

        trainer._get_per_token_logps_and_entropies = counting
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}, seen

    ours, prompts_per_forward = run(PromptSharingGRPOTrainer)
    assert prompts_per_forward == [1, 1, 1, 1]  # every micro-batch: one prompt, its 4 completions
    monkeypatch.setattr(grpo_module, "shuffle_sequence_dict", lambda batch: shuffle_groups(batch, 4))
    theirs, _ = run(GRPOTrainer)
    for name, value in theirs.items():
        torch.testing.assert_close(ours[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_where_auto_picks_padded_the_batch_goes_to_grpos_own_forward(tokenizer, tmp_path, monkeypatch):
    """`auto`'s padded layout computes what GRPO's forward computes: GRPO's forward runs it (no grouping into our
    collator, TRL's head), counted as `grpo`."""
    from trl_nca.layouts import DataCollatorForAnyLayout

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, "auto")
    collator = trainer._group_collator
    assert isinstance(collator, DataCollatorForAnyLayout) and "padded" in collator.collators
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 1) for _ in range(4)])
    ids, mask, keep = forward_inputs(batch)
    monkeypatch.setattr(DataCollatorForAnyLayout, "choose", lambda self, examples: "padded")
    ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep)
    assert torch.equal(ours, theirs) and collator.counts == {"grpo": 1}
    monkeypatch.setattr(DataCollatorForAnyLayout, "choose", lambda self, examples: "mask")
    trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    assert collator.counts == {"grpo": 1, "mask": 1}


@pytest.mark.parametrize("setting", ["mask", "padded"])
def test_trls_fused_head_in_the_grouped_forward_gives_grpos_values(setting, tokenizer, tmp_path, monkeypatch):
    """On CUDA the grouped forward runs the fused head that GRPOTrainer puts on the policy (`head_choice`, as the
    offline trainers; ours on the CPU): forced here, the same per-token log-probabilities, entropies and gradients
    (of both, as with GRPO's entropy bonus) as GRPO's forward, at a sampling temperature."""
    import trl_nca.group_forward as group_forward
    from trl_nca.layouts import DataCollatorForKResponses

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, "mask", temperature=0.7)
    assert trainer._group_head == "response"  # the CPU's choice
    trainer._group_head = "fused"
    if setting == "padded":  # the padded layout through the grouped forward (auto hands that one to GRPO's)
        trainer._group_collator = DataCollatorForKResponses(pad_token_id=tokenizer.pad_token_id)
    heads = []
    original = group_forward.response_token_logps
    monkeypatch.setattr(group_forward, "response_token_logps",
                        lambda *a, head, **kw: heads.append(head) or original(*a, head=head, **kw))  # fmt: skip
    trainer.model.train()
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 1) for _ in range(4)])
    ids, mask, keep = forward_inputs(batch, torch.tensor([5, 0, 3, 6, 1, 7, 2, 4]))
    real = mask[:, -keep:].bool()
    trainer._group_checked = True  # the values themselves are compared here
    ours, our_entropy, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep,
                                                                      compute_entropy=True)  # fmt: skip
    theirs, their_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep,
                                                                             compute_entropy=True)  # fmt: skip
    assert heads == ["fused"] and real.sum() > 20
    torch.testing.assert_close(ours[real], theirs[real], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(our_entropy[real], their_entropy[real], rtol=1e-5, atol=1e-5)
    weights = torch.linspace(-1, 1, ours.numel()).view_as(ours)
    for got, want in zip(grads_of(trainer, ours + our_entropy, real, weights),
                         grads_of(trainer, theirs + their_entropy, real, weights)):  # fmt: skip
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_micro_batches_of_whole_groups_make_the_same_update(tokenizer, tmp_path):
    """The demo's schedule: 4 prompts x K = 4 generated per optimizer step and learned from one group per pass
    (gradient accumulation 4) makes the update of one pass over all 16 completions (SGD, so the step is the
    gradient): each group's NCA loss is the same, and the accumulated gradient their mean."""

    def run(per_device, accumulation):
        args = online_args(tmp_path / f"{per_device}", per_device_train_batch_size=per_device,
                           gradient_accumulation_steps=accumulation, max_steps=1, optim="sgd", learning_rate=0.5,
                           logging_steps=1, seed=0)  # fmt: skip
        trainer = OnlineNCATrainer(model=build_model(tokenizer), reward_funcs=length_reward, args=args,
                                   train_dataset=prompts_dataset(), processing_class=tokenizer, peft_config=lora(),
                                   rollout_func=deterministic_rollout)  # fmt: skip
        trainer.train()
        return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora" in n}

    whole, micro = run(16, 1), run(4, 4)
    assert any(value.abs().sum() > 0 for name, value in whole.items() if "lora_B" in name)
    for name, value in whole.items():
        torch.testing.assert_close(micro[name], value, rtol=1e-4, atol=1e-6, msg=name)
