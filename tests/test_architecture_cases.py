"""The cases of the architecture review that the matrix (tests/test_architectures.py) does not hold: GRPO's entropy
regularisation and `cast_lm_head_to_fp32` through the grouped forward, online rows without a prompt token, the
layout check on a model the blockers do not know, and the cost model's parameter count under ZeRO-3."""

import logging

import pytest
import torch
from architectures import build, grpo_rows, k_response_rows
from conftest import build_model
from helpers import k_response_dataset, nca_args
from online_helpers import deterministic_rollout, length_reward, prompts_dataset
from trl import GRPOConfig, GRPOTrainer

import trl_nca.group_forward
import trl_nca.trainer
from trl_nca import NCATrainer, PromptSharingGRPOTrainer
from trl_nca.layouts import ModelShape


def grpo(cls, tokenizer, tmp_path, model=None, **overrides):
    settings = dict(use_cpu=True, bf16=False, report_to=[], num_generations=4, per_device_train_batch_size=8,
                    max_completion_length=8, max_steps=1, optim="sgd", learning_rate=0.5, gradient_checkpointing=False,
                    beta=0.0, seed=0, logging_steps=1)  # fmt: skip
    args = GRPOConfig(output_dir=str(tmp_path / cls.__name__), **{**settings, **overrides})
    extra = {"prompt_sharing": "mask"} if cls is PromptSharingGRPOTrainer else {}
    return cls(model=model or build_model(tokenizer), reward_funcs=length_reward, args=args,
               train_dataset=prompts_dataset(), processing_class=tokenizer, rollout_func=deterministic_rollout,
               **extra)  # fmt: skip


def test_entropy_regularisation_trains_as_in_grpo(tokenizer, tmp_path):
    """`entropy_coef=1`: the entropy's gradient reaches the weights (it came back detached before: 8.4e-4 apart)."""
    after = {}
    for cls in (GRPOTrainer, PromptSharingGRPOTrainer):
        trainer = grpo(cls, tokenizer, tmp_path, entropy_coef=1.0)
        trainer.train()
        after[cls] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    without = grpo(GRPOTrainer, tokenizer, tmp_path / "without")
    without.train()
    moved = max(float((p - after[GRPOTrainer][n]).abs().max()) for n, p in without.model.named_parameters())
    assert moved > 1e-4  # the entropy term moves the weights (about 6e-4 here)
    for name, value in after[GRPOTrainer].items():
        torch.testing.assert_close(after[PromptSharingGRPOTrainer][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_cast_lm_head_to_fp32_runs_the_head_in_float32_under_autocast(tokenizer, tmp_path):
    """GRPO's `cast_lm_head_to_fp32` under bf16 autocast: the grouped forward's values are GRPO's (the head ran in bf16
    before, 6e-2 nats per token off), and a bf16 model with `bf16=False` runs (a dtype mismatch before)."""
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path, cast_lm_head_to_fp32=True)
    ids, mask, keep = grpo_rows(k_response_rows(), pad=tokenizer.pad_token_id)
    ids = ids.clamp(max=len(tokenizer) - 1)
    real = mask[:, -keep:].bool()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep)
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=2e-2)  # bf16 body: layouts round apart
    half = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path / "half", model=build_model(tokenizer).bfloat16(),
                cast_lm_head_to_fp32=True)  # fmt: skip
    with torch.no_grad():
        ours, _, _ = half._get_per_token_logps_and_entropies(half.model, ids, mask, keep)
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(half, half.model, ids, mask, keep)
    torch.testing.assert_close(ours[real], theirs[real], rtol=0, atol=5e-2)


def test_online_rows_without_a_prompt_token_go_to_grpos_forward(tokenizer, tmp_path):
    """A row with an empty prompt: GRPO's values (before: shifted one column under `auto`, or an unrelated error)."""
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path)
    rows = k_response_rows()
    rows[1]["prompt_ids"] = []
    ids, mask, keep = grpo_rows(rows, pad=tokenizer.pad_token_id)
    ids = ids.clamp(max=len(tokenizer) - 1)
    for setting in ("mask", "cache", "auto"):
        trainer._install_prompt_sharing(setting)
        with torch.no_grad():
            ours, ours_h, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep, None, True)
            theirs, theirs_h, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask,
                                                                                 keep, None, True)  # fmt: skip
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(ours_h, theirs_h)


def windowed_model_unknown_to_the_blockers(monkeypatch, module):
    """A Mistral with a 4-token window, and the layouts told it has none: a model they do not know. The shared-prompt
    layout's 4D mask then carries no window (transformers applies one only to masks it builds); the prompt-cache
    layout keeps it (on top of a cache transformers builds the mask)."""
    import trl_nca.forward

    monkeypatch.setattr(module, "mask_blocker", lambda model, *args: None)
    monkeypatch.setattr(trl_nca.forward, "attention_windows", lambda model, *args: (None, None))
    return build("mistral")


def test_the_offline_layout_check_leaves_out_a_layout_that_differs(tokenizer, monkeypatch, tmp_path, caplog):
    model = windowed_model_unknown_to_the_blockers(monkeypatch, trl_nca.trainer)
    trainer = NCATrainer(model=model, args=nca_args(tmp_path, max_steps=1), train_dataset=k_response_dataset(),
                         processing_class=tokenizer)  # fmt: skip
    assert set(trainer._collators) == {"cache", "mask", "padded"}
    with caplog.at_level(logging.WARNING, logger="trl_nca.trainer"):
        trainer.train()
    assert set(trainer._collators) == {"cache", "padded"}
    assert "Layout check: 'mask': " in caplog.text and "training with cache, padded" in caplog.text
    assert "mask" not in trainer.data_collator.counts and trainer.data_collator.counts  # batches built after it
    forced = NCATrainer(model=build("mistral"), args=nca_args(tmp_path, prompt_sharing="mask"),
                        train_dataset=k_response_dataset(), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ValueError, match="Layout check: prompt_sharing='mask' gives other log-probabilities"):
        forced.train()


def test_the_online_layout_check_falls_back_to_grpos_forward(tokenizer, monkeypatch, tmp_path, caplog):
    model = windowed_model_unknown_to_the_blockers(monkeypatch, trl_nca.group_forward)
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path, model=model)
    assert trainer._group_collator is not None  # the shared-prompt layout, as `prompt_sharing="mask"` asks
    ids, mask, keep = grpo_rows(k_response_rows(), pad=0)
    with caplog.at_level(logging.WARNING, logger="trl_nca.group_forward"), torch.no_grad():
        ours, _, _ = trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
        theirs, _, _ = GRPOTrainer._get_per_token_logps_and_entropies(trainer, trainer.model, ids, mask, keep)
    assert "differs from GRPO's on the first batch" in caplog.text
    assert trainer._group_collator is None
    torch.testing.assert_close(ours, theirs)


def test_the_cost_model_counts_parameters_partitioned_by_zero3(tokenizer):
    """ZeRO-3 leaves every parameter with `numel() == 0` on each rank and its size in `ds_numel`."""
    model = build_model(tokenizer)
    whole = ModelShape.of(model)
    for p in model.parameters():
        p.ds_numel = p.numel()
        p.data = p.data.new_empty(0)
    assert ModelShape.of(model) == whole and whole.body_params > 10_000


def test_the_online_check_keeps_the_layouts_of_an_absolute_position_model(tokenizer, tmp_path, caplog):
    """GPT-2 counts left pads into positions in GRPO's forward; the check compares rows without left padding, where
    both take generation's positions, so the layouts stay (docs/architectures.md)."""
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path, model=build("gpt2"))
    ids, mask, keep = grpo_rows(k_response_rows(), pad=0)
    assert bool((mask[:, 0] == 0).any())  # some rows are left-padded
    with caplog.at_level(logging.WARNING, logger="trl_nca.group_forward"), torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    assert trainer._group_collator is not None and "differs from GRPO's" not in caplog.text
