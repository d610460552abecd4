"""The shared-prompt layout against separate forwards, against the padded layout, and its isolation of responses."""

import copy
import logging
import math

import pytest
import torch
from helpers import k_response_dataset, nca_args
from peft import LoraConfig

from trl_nca import DataCollatorForKResponses, InfoNCATrainer, NCATrainer
from trl_nca.layouts.shared_prompt import DataCollatorForSharedPrompt


def separate_logps(model, rows):
    """Each prompt+response in its own forward, scored with a plain float64 log-softmax over full logits."""
    out = []
    with torch.no_grad():
        for row in rows:
            for completion in row["completion_ids"]:
                ids = torch.tensor([row["prompt_ids"] + completion])
                logits = model(input_ids=ids, fused_lm_head=False).logits[0, :-1].double()
                logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                out.append(logps[len(row["prompt_ids"]) - 1 :].sum())
    return torch.stack(out)


def make_trainer(tokenizer, model, tmp_path, attn="sdpa", **overrides):
    model.config._attn_implementation = attn
    return NCATrainer(
        model=model,
        args=nca_args(tmp_path, **overrides),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("pack_rows", [False, True])
def test_shared_layout_gives_the_log_probs_of_separate_forwards(
    attn, pack_rows, tokenizer, model, other_model, tmp_path
):
    other_model.config._attn_implementation = attn
    trainer = NCATrainer(
        model=model,
        ref_model=other_model,
        args=nca_args(tmp_path),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
    )
    model.config._attn_implementation = attn
    assert isinstance(trainer.data_collator, DataCollatorForSharedPrompt)
    rows = [trainer.train_dataset[i] for i in range(5)]  # ragged: K = 4, 2, 3, 4, 3
    collator = DataCollatorForSharedPrompt(pad_token_id=tokenizer.pad_token_id, pack_rows=pack_rows)
    batch = collator(rows)
    assert batch["input_ids"].shape[0] == (1 if pack_rows else 5)
    with torch.no_grad():
        policy, _ = trainer._sequence_logps(trainer.model, batch)
    reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)[batch["response_mask"]]
    torch.testing.assert_close(policy.double(), separate_logps(trainer.model, rows), atol=1e-4, rtol=0)
    torch.testing.assert_close(reference.double(), separate_logps(trainer.ref_model, rows), atol=1e-4, rtol=0)


@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_same_loss_and_gradients_as_the_padded_layout(cls, attn, tokenizer, model, other_model, tmp_path):
    results = {}
    for sharing in ["off", "on"]:
        policy, ref = copy.deepcopy(model), copy.deepcopy(other_model)
        policy.config._attn_implementation = ref.config._attn_implementation = attn
        trainer = cls(
            model=policy,
            ref_model=ref,
            args=nca_args(tmp_path, prompt_sharing=sharing, reward_temperature=0.5),
            train_dataset=k_response_dataset(),
            processing_class=tokenizer,
        )
        expected = DataCollatorForKResponses if sharing == "off" else DataCollatorForSharedPrompt
        assert type(trainer.data_collator) is expected
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[sharing] = (loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()})
    torch.testing.assert_close(results["on"][0], results["off"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results["on"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_response_never_sees_another(tokenizer, model, tmp_path):
    trainer = make_trainer(tokenizer, model, tmp_path)
    row = trainer.train_dataset[0]  # four responses
    changed = {**row, "completion_ids": [row["completion_ids"][0], [5, 6, 7, 8, 9, 10], *row["completion_ids"][2:]]}
    with torch.no_grad():
        before, _ = trainer._sequence_logps(trainer.model, trainer.data_collator([row]))
        after, _ = trainer._sequence_logps(trainer.model, trainer.data_collator([changed]))
    assert not torch.isclose(before[1], after[1])
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]], atol=1e-6, rtol=0)


def test_shared_layout_feeds_fewer_tokens():
    rows = [
        {"prompt_ids": list(range(1, 101)), "completion_ids": [[7] * 30, [8] * 50, [9] * 10], "rewards": [0, 1, 2]}
    ]
    shared = DataCollatorForSharedPrompt(pad_token_id=0)(rows)
    padded = DataCollatorForKResponses(pad_token_id=0)(rows)
    assert int(shared["padding_mask"].sum()) == 100 + 30 + 50 + 10 + 2  # the ideal plus one copy per extra response
    assert padded["input_ids"].numel() == 3 * 150
    assert shared["completion_mask"].sum() == padded["completion_mask"].sum() == 90


def test_truncation_scores_the_same_tokens_in_both_layouts():
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5, 6, 7], [8]], "rewards": [1.0, 0.0]}]
    shared = DataCollatorForSharedPrompt(pad_token_id=0, max_length=5)(rows)
    padded = DataCollatorForKResponses(pad_token_id=0, max_length=5)(rows)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 8]]
    assert shared["completion_mask"].sum() == padded["completion_mask"].sum() == 3


def test_fallback_with_one_warning_and_error_when_forced(tokenizer, model, tmp_path, caplog):
    # flash_attention_2 needs the flash-attn package and a GPU to run, but the layout choice only reads the name
    with caplog.at_level(logging.WARNING, logger="trl_nca"):
        trainer = make_trainer(tokenizer, copy.deepcopy(model), tmp_path, attn="flash_attention_2")
    assert type(trainer.data_collator) is DataCollatorForKResponses
    warnings = [r.getMessage() for r in caplog.records if "shared-prompt layout is off" in r.getMessage()]
    assert len(warnings) == 1 and "flash_attention_2" in warnings[0]
    with pytest.raises(ValueError, match="prompt_sharing='on' is not possible here: attn_implementation='flash_atte"):
        make_trainer(tokenizer, copy.deepcopy(model), tmp_path, attn="flash_attention_2", prompt_sharing="on")
    with pytest.raises(ValueError, match="truncation_mode='keep_end'"):
        make_trainer(tokenizer, copy.deepcopy(model), tmp_path, prompt_sharing="on", truncation_mode="keep_end")


def test_works_with_lora_gradient_checkpointing_and_precomputed_reference(tokenizer, model, tmp_path):
    losses = {}
    for sharing in ["off", "on"]:
        lora = LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM", init_lora_weights=False
        )
        trainer = NCATrainer(
            model=copy.deepcopy(model),
            args=nca_args(
                tmp_path,
                prompt_sharing=sharing,
                gradient_checkpointing=True,
                precompute_ref_log_probs=True,
                max_steps=2,
            ),
            train_dataset=k_response_dataset(),
            processing_class=tokenizer,
            peft_config=lora,
        )
        trainer.train()
        losses[sharing] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert abs(losses["on"][0] - 2 * math.log(2)) > 1e-3  # a random adapter: the policy differs from the reference
    assert losses["on"] == pytest.approx(losses["off"], rel=1e-4)


@pytest.mark.parametrize("pack_rows", [False, True])
def test_flex_attention_block_mask_gives_the_log_probs_of_separate_forwards(pack_rows, tokenizer, model, tmp_path):
    """FlexAttention's forward runs on CPU (its backward, i.e. training, needs a GPU in torch 2.13)."""
    trainer = make_trainer(tokenizer, model, tmp_path, attn="flex_attention", prompt_sharing="on")
    rows = [trainer.train_dataset[i] for i in range(5)]
    batch = DataCollatorForSharedPrompt(pad_token_id=tokenizer.pad_token_id, pack_rows=pack_rows)(rows)
    with torch.no_grad():
        policy, _ = trainer._sequence_logps(trainer.model, batch)
    model.config._attn_implementation = "sdpa"  # the independent computation
    torch.testing.assert_close(policy.double(), separate_logps(trainer.model, rows), atol=1e-4, rtol=0)
