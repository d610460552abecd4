"""The layout check at the sizes, settings and models users run it with (the fourth adversarial review): it runs
before anything reads a layout, compares the run's own rows (truncation, eval mode, prompt-learning PEFT), reads the
model's own logit transform, checks in float32 wherever the weights allow, checks every layout `auto` may use online,
and stays within the training step's memory. Each test failed before its fix; the two-process cases are in
tests/test_distributed.py, the matrix's new shapes (rope types, binding softcaps, wrapped VLMs, bf16) in
tests/test_architectures.py."""

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from architectures import build, grpo_rows, k_response_rows
from datasets import Dataset
from helpers import QUESTIONS, k_response_dataset, nca_args, user
from peft import PromptTuningConfig
from test_architecture_cases import grpo, windowed_model_unknown_to_the_blockers
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import trl_nca.group_forward
import trl_nca.trainer
from trl_nca import NCATrainer, PromptSharingGRPOTrainer
from trl_nca.layout_check import model_logit_transform
from trl_nca.layouts import choose_layout, images_blocker, make_collator, mask_blocker

ROOT = Path(__file__).resolve().parents[1]


def long_answers_dataset(n_rows: int = 4, words: int = 20) -> Dataset:
    """Conversational rows whose responses run to 40-60 tokens, ten times the windowed test model's window."""
    return Dataset.from_list([
        {"prompt": user(QUESTIONS[i % len(QUESTIONS)]),
         "completions": [[{"role": "assistant", "content": " ".join(["the sea and the wind"] * (words // 5 + k))}]
                         for k in range(3)],
         "rewards": [float(k) for k in range(3)]}
        for i in range(n_rows)
    ])  # fmt: skip


@pytest.mark.parametrize("prompt_sharing", ["mask", "cache"])
def test_max_length_shorter_than_the_rows_trains(prompt_sharing, tokenizer, model, tmp_path):
    """The check's reference is truncated as training truncates: a conversational dataset with `max_length` shorter
    than its rows trains with the named layout (it stopped at train start, 74-206 nats "off", against an untruncated
    reference)."""
    data = k_response_dataset()
    trainer = NCATrainer(model=model, args=nca_args(tmp_path, prompt_sharing=prompt_sharing, max_length=24),
                         train_dataset=data, processing_class=tokenizer)  # fmt: skip
    longest = max(len(r["prompt_ids"]) + max(map(len, r["completion_ids"])) for r in trainer.train_dataset)
    assert longest > 24  # rows are truncated
    trainer.train()
    assert list(trainer._collators) == [prompt_sharing]


def test_precomputed_reference_is_built_after_the_check(tokenizer, monkeypatch, tmp_path):
    """The reference column is computed with the layouts the check keeps: with a layout that differs (the shared
    prompt on a windowed model the blockers do not know) and `precompute_ref_log_probs=True`, the first step's loss is
    NCA's 2 log 2 (policy = reference; it was 1.5148 with the column computed in the wrong layout)."""
    model = windowed_model_unknown_to_the_blockers(monkeypatch, trl_nca.trainer)
    trainer = NCATrainer(model=model, args=nca_args(tmp_path, precompute_ref_log_probs=True, learning_rate=0.0),
                         train_dataset=long_answers_dataset(), processing_class=tokenizer)  # fmt: skip
    assert "mask" not in trainer._collators  # left out before the precompute, in the constructor
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_bf16_autocast_is_checked_in_float32(tokenizer, monkeypatch, tmp_path, caplog):
    """With float32 weights and `bf16=True`, the check runs in float32, per token: the windowed model's shared-prompt
    layout (nats off on 40-60-token responses) is left out (the half-precision tolerance per sequence let it pass)."""
    model = windowed_model_unknown_to_the_blockers(monkeypatch, trl_nca.trainer)
    trainer = NCATrainer(model=model, args=nca_args(tmp_path, bf16=True, prompt_sharing="auto"),
                         train_dataset=long_answers_dataset(), processing_class=tokenizer)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_nca.layout_check"):
        trainer.train()
    assert "mask" not in trainer._collators and "'mask': " in caplog.text


def test_prompt_tuning_trains(tokenizer, model, tmp_path):
    """Prompt-tuning PEFT trains again (a ValueError at train start: the check's reference did not count the virtual
    tokens the model's own forward puts before its logits), with the response-only head, which the check finds equal
    to the model's own forward."""
    trainer = NCATrainer(model=model, args=nca_args(tmp_path, max_steps=2), train_dataset=k_response_dataset(),
                         processing_class=tokenizer,
                         peft_config=PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3))  # fmt: skip
    trainer.train()
    assert trainer._head == "response" and len([e for e in trainer.state.log_history if "loss" in e]) == 2


@pytest.mark.parametrize("model_type", ["cohere2_vision", "llava_next", "gemma3"])
def test_wrapped_vlms_apply_the_transform_their_own_forward_applies(model_type, tokenizer, tmp_path):
    """Cohere2Vision (text `logit_scale`), LLaVA-NeXT with a Granite text model (`logits_scaling`) and Gemma 3 (text
    softcap): the wrapper's forward applies none of them, and the check reads that from the model (it raised for every
    setting, `off` included)."""
    model = build(model_type)
    transform, why = model_logit_transform(model, [3, 4, 5, 6])
    assert (transform.scale, transform.softcap, why) == (1.0, None, None)
    if model_type == "cohere2_vision":  # in a trainer, `off` and `auto` train (the text rows of the matrix)
        for setting in ("off", "auto"):
            trainer = NCATrainer(model=build(model_type), args=nca_args(tmp_path / setting, prompt_sharing=setting),
                                 train_dataset=_token_rows(), processing_class=tokenizer)  # fmt: skip
            trainer.train()
            assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)


def _token_rows() -> Dataset:
    """The matrix's tokenized rows as a prepared dataset (ids inside the tiny models' vocabulary)."""
    return Dataset.from_list(k_response_rows())


class DoublesBeforeItsHead(LlamaForCausalLM):
    """A model whose forward does math of its own between its body and its head."""

    def forward(self, input_ids=None, attention_mask=None, logits_to_keep=0, **kwargs):
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state * 2.0
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return CausalLMOutputWithPast(logits=self.lm_head(hidden[:, keep]))


def test_a_forward_that_differs_from_both_heads_trains_as_dpo_does(tokenizer, tmp_path, caplog):
    """Neither head reproduces a forward with math before its head: training goes on with TRL's fused head (what
    DPOTrainer computes), the warning names the model's forward, and the prompt-cache layout (ours alone) is out; the
    shared prompt, equal to the padded layout through that head, stays (it raised for every setting before)."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    trainer = NCATrainer(model=DoublesBeforeItsHead(config), args=nca_args(tmp_path, prompt_sharing="auto"),
                         train_dataset=k_response_dataset(), processing_class=tokenizer)  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="trl_nca.layout_check"):
        trainer.train()
    assert trainer._head == "fused" and set(trainer._collators) == {"mask", "padded"}
    assert "neither LM head gives the model's own log-probabilities" in caplog.text
    assert "DoublesBeforeItsHead.forward changes the hidden states between its body and its LM head" in caplog.text


def test_the_online_check_runs_in_eval_mode(tokenizer, tmp_path, caplog):
    """GPT-2 with dropout 0.1 and GRPO's `disable_dropout=False`: the check compares without dropout and keeps an
    explicit `mask` (it compared two dropout draws and blamed the layout)."""
    model = build("gpt2").train()
    assert model.config.resid_pdrop > 0
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path, model=model, disable_dropout=False)
    ids, mask, keep = grpo_rows(k_response_rows(), pad=0)
    with caplog.at_level(logging.WARNING, logger="trl_nca"):
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    assert trainer._group_collator is not None and "differs" not in caplog.text
    assert trainer.model.training  # its mode comes back


def test_the_online_check_covers_every_layout_auto_may_use(tokenizer, monkeypatch, tmp_path, caplog):
    """Under `auto` the first grouped batch picks one layout; the check compares every layout `auto` may use, so the
    windowed model's shared prompt is left out before any batch uses it (only the first batch's layout was checked)."""
    model = windowed_model_unknown_to_the_blockers(monkeypatch, trl_nca.group_forward)
    trainer = grpo(PromptSharingGRPOTrainer, tokenizer, tmp_path, model=model)
    trainer._install_prompt_sharing("auto")
    assert set(trainer._group_collator.collators) == {"cache", "mask", "padded"}
    ids, mask, keep = grpo_rows(k_response_rows(), pad=0)
    with caplog.at_level(logging.WARNING, logger="trl_nca.layout_check"), torch.no_grad():
        trainer._get_per_token_logps_and_entropies(trainer.model, ids, mask, keep)
    assert set(trainer._group_collator.collators) == {"cache", "padded"} and "'mask': " in caplog.text


@pytest.mark.parametrize("rope", ["dynamic", "longrope"])
def test_padding_cannot_move_a_length_dependent_rope(rope):
    """Dynamic and longrope frequencies follow a forward's largest position id: the shared-prompt layout's padding
    keeps position 0 and the batch gets the padded layout's largest position, so a batch with one long row gives
    every row the padded layout's values (padding positions up to the long row's length moved the short rows onto
    scaled frequencies: 0.59 nats with dynamic, 5.78 with longrope); the prompt-cache layout is refused."""
    model = build(f"llama (rope {rope})")
    rows = k_response_rows()  # the first row, its six responses after its prompt, is 49 tokens long
    from architectures import _collator

    from trl_nca.forward import response_token_logps
    from trl_nca.scoring import add_response_head

    add_response_head(model)
    values = {}
    with torch.no_grad():
        for layout in ("padded", "mask"):
            batch = _collator(model, layout)(rows)
            outputs, owner = response_token_logps(model, batch, head="response", mask_dtype=torch.float32)
            values[layout] = outputs.log_probs[torch.sort(owner, stable=True).indices]
    torch.testing.assert_close(values["mask"], values["padded"], rtol=1e-4, atol=1e-4)
    mask_layout = make_collator("mask", pad_token_id=0, max_length=None, truncation_mode="keep_start",
                                pad_to_multiple_of=None)(rows)  # fmt: skip
    assert mask_layout["position_ids"][2][mask_layout["padding_mask"][2] == 0].max() == 0


def test_gemma3_image_rows_never_go_to_a_layout_that_refuses_them():
    """Gemma 3 marks image tokens with `token_type_ids` (an image's tokens attend both ways), which the prompt-cache
    layout's prompt forward is not given and the shared prompt's causal mask does not express: image rows are refused
    there up front (`auto` picked the prompt cache, then stopped mid-run advising `mask`)."""
    model = build("gemma3")
    assert set(images_blocker(model)) == {"cache", "mask"}
    choice = choose_layout("auto", "sdpa", "keep_start", mask_blocker=mask_blocker(model),
                           image_blockers=images_blocker(model))  # fmt: skip
    assert choice.allowed == ("padded",)
    assert images_blocker(build("llava")) == {}


def test_the_check_stays_within_the_training_steps_memory(tmp_path):
    """Vocabulary 150,000, batch 8, K = 8, 48-token sequences: the offline check's peak resident memory stays within
    a training step's (it built full float32 logits for all 64 sequences at once: 5.9 GB against 3.7 GB for the
    step). Measured in a fresh process: a step first, then the check, which must not raise the high-water mark."""
    out = tmp_path / "memory.json"
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("memory_job.py")), "check", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(out.read_text())
    assert peaks["check_gb"] <= peaks["step_gb"] * 1.02 + 0.05, peaks
    assert peaks["step_gb"] - peaks["start_gb"] > 0.3, peaks  # the step itself needs memory: the bound means something
