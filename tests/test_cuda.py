"""The CUDA paths, where a GPU is present (skipped elsewhere, CI included): every layout against the padded one with
`sdpa` and FlexAttention (forward and backward), TRL's fused head (the one kept on CUDA) against ours, bf16 training
from the values at initialisation, QLoRA through the command's `load_in_4bit` as the QLoRA recipe sets it up, and the
online trainer with real sampling.

`TRL_NCA_TEST_DEVICE=cpu` runs the tests that are not about a CUDA kernel on the CPU (to check this file itself)."""

import copy
import math
import os

import pytest
import torch
from conftest import build_model
from helpers import k_response_dataset, nca_args
from online_helpers import length_reward, online_args, prompts_dataset
from peft import LoraConfig
from test_layouts import make_trainer
from transformers import TrainerCallback
from trl.trainer.utils import add_fused_lm_head

from trl_nca import InfoNCATrainer, NCATrainer, OnlineInfoNCATrainer, OnlineNCATrainer
from trl_nca.layouts import DataCollatorForKResponses

DEVICE = os.environ.get("TRL_NCA_TEST_DEVICE", "cuda")
ON_CPU = DEVICE == "cpu"
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="a CUDA kernel")
PLACE = dict(use_cpu=ON_CPU)
INIT_LOSS = {NCATrainer: 2 * math.log(2), InfoNCATrainer: math.log(4)}  # policy = reference, K = 4 in every row


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")


def loss_and_grads(trainer):
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(8)]))
    trainer.model.zero_grad()
    loss = trainer.compute_loss(trainer.model, batch)
    loss.backward()
    return loss.detach().cpu(), {n: p.grad.cpu() for n, p in trainer.model.named_parameters()}


@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
@pytest.mark.parametrize(
    "attn, layout",
    [
        ("sdpa", "mask"),
        ("sdpa", "cache"),
        ("sdpa", "auto"),
        pytest.param("flex_attention", "mask", marks=needs_cuda),
        pytest.param("flex_attention", "cache", marks=needs_cuda),
    ],
)
def test_layouts_give_the_padded_loss_and_gradients(cls, attn, layout, tokenizer, model, other_model, tmp_path):
    """float32, ragged K: the loss and every gradient of the shared layouts equal the padded layout's (1e-4)."""
    results = {}
    for sharing in ["off", layout]:
        trainer = make_trainer(
            tokenizer, copy.deepcopy(model), tmp_path, attn, cls, copy.deepcopy(other_model),
            prompt_sharing=sharing, reward_temperature=0.5, **PLACE,
        )  # fmt: skip
        assert trainer.model.device.type == DEVICE
        results[sharing] = loss_and_grads(trainer)
    torch.testing.assert_close(results[layout][0], results["off"][0], atol=1e-4, rtol=1e-4)
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results[layout][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@needs_cuda
def test_trls_fused_head_is_the_one_on_cuda_and_gives_our_heads_log_probs(tokenizer, model):
    from trl_nca import scoring

    assert scoring.head_choice(model, torch.device("cuda"))[0] == "fused"
    rows = [{"prompt_ids": [1, 5, 9], "completion_ids": [[20, 30, 40, 2], [50, 2]], "rewards": [1.0, 0.0]}] * 3
    batch = {k: v.cuda() for k, v in DataCollatorForKResponses(pad_token_id=0)(rows).items()}
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    fused_model, ours_model = copy.deepcopy(model).cuda(), copy.deepcopy(model).cuda()
    add_fused_lm_head(fused_model, outputs=("log_probs", "entropy", "is_top1"))
    scoring.add_response_head(ours_model)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    fused = fused_model(**inputs, fused_lm_head=True)
    ours = ours_model(**inputs, response_head=True)
    scored = labels[:, 1:] != -100
    fused.log_probs[scored].sum().backward()
    ours.log_probs.sum().backward()
    torch.testing.assert_close(ours.log_probs, fused.log_probs[scored], atol=1e-4, rtol=0)
    torch.testing.assert_close(ours.entropy, fused.entropy[scored], atol=1e-4, rtol=0)
    for (name, a), (_, b) in zip(ours_model.named_parameters(), fused_model.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-4, rtol=1e-3, msg=name)


class Snapshot(TrainerCallback):
    def __init__(self):
        self.before, self.model = None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}
        self.model = model

    def moved(self):
        return {n for n, p in self.model.named_parameters() if not torch.equal(p, self.before[n])}


@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
@pytest.mark.parametrize("prompt_sharing", ["off", "mask", "cache", "auto"])
def test_bf16_lora_training_starts_at_the_loss_at_initialisation(cls, prompt_sharing, tokenizer, tmp_path):
    """bf16 mixed precision with LoRA (the reference is the adapter switched off): the first loss is NCA's 2 log 2 or
    InfoNCA's log K, and three steps move the adapter only."""
    snapshot = Snapshot()
    trainer = cls(
        model=build_model(tokenizer, hidden_size=64),
        args=nca_args(
            tmp_path, **PLACE, bf16=not ON_CPU, max_steps=3, learning_rate=1e-2, prompt_sharing=prompt_sharing
        ),
        train_dataset=k_response_dataset(counts=(4,) * 8),
        processing_class=tokenizer,
        peft_config=lora(),
        callbacks=[snapshot],
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(INIT_LOSS[cls], abs=1e-2)
    assert all(math.isfinite(x) for x in losses) and len(losses) == 3
    moved = snapshot.moved()
    assert moved and all("lora_" in n for n in moved)


@needs_cuda
@pytest.mark.parametrize("algorithm", ["nca", "infonca"])
def test_qlora_command_as_the_recipe_sets_it_up(algorithm, tokenizer, tmp_path):
    """`load_in_4bit`, nf4, nested quantisation, bf16, gradient checkpointing and LoRA on all linear layers, as in
    recipes/ultrafeedback/*_qlora.yaml: the base layers are 4-bit, only LoRA weights move, the first loss is the
    value at initialisation."""
    import bitsandbytes as bnb

    from trl_nca.scripts.train import main, make_parser

    build_model(tokenizer, seed=0, hidden_size=64).save_pretrained(tmp_path / "tiny")
    tokenizer.save_pretrained(tmp_path / "tiny")
    k_response_dataset(counts=(4,) * 8).to_json(tmp_path / "data.jsonl")
    args = [
        "--model_name_or_path", str(tmp_path / "tiny"), "--dataset_name", str(tmp_path / "data.jsonl"),
        "--output_dir", str(tmp_path / "out"), "--report_to", "none", "--bf16", "true", "--dtype", "bfloat16",
        "--load_in_4bit", "true", "--bnb_4bit_quant_type", "nf4", "--use_bnb_nested_quant", "true",
        "--use_peft", "true", "--lora_r", "4", "--lora_target_modules", "all-linear",
        "--gradient_checkpointing", "true", "--max_steps", "3", "--learning_rate", "1e-2", "--logging_steps", "1",
        "--per_device_train_batch_size", "4",
    ]  # fmt: skip
    snapshot = Snapshot()
    trainer = main(*make_parser().parse_args_and_config(args)[:4], algorithm=algorithm, callbacks=[snapshot])
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules()) >= 14  # 7 per layer, 2 layers
    moved = snapshot.moved()
    assert moved and all("lora_" in n for n in moved)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[0] == pytest.approx(INIT_LOSS[{"nca": NCATrainer, "infonca": InfoNCATrainer}[algorithm]], abs=1e-2)
    assert all(math.isfinite(x) for x in losses)


@pytest.mark.parametrize("cls, init", [(OnlineNCATrainer, 2 * math.log(2)), (OnlineInfoNCATrainer, math.log(4))])
def test_online_samples_on_the_device_and_starts_at_the_loss_at_init(cls, init, tokenizer, tmp_path):
    """Real sampling (transformers `generate`), bf16, LoRA, sampler reference: at the update the policy is the
    sampler, so the first loss is the value at initialisation; two steps move the adapter only."""
    snapshot = Snapshot()
    trainer = cls(
        model=build_model(tokenizer, hidden_size=64),
        reward_funcs=length_reward,
        args=online_args(
            tmp_path,
            **PLACE,
            bf16=not ON_CPU,
            max_steps=2,
            learning_rate=1e-2,
            reference="sampler",
            per_device_train_batch_size=8,
            max_completion_length=8,
        ),  # fmt: skip
        train_dataset=prompts_dataset(8),
        processing_class=tokenizer,
        peft_config=lora(),
        callbacks=[snapshot],
    )
    assert trainer.args.num_generations == 4
    trainer.train()
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert logs[0]["loss"] == pytest.approx(init, abs=1e-2)
    assert logs[0]["completions/mean_length"] > 0
    moved = snapshot.moved()
    assert moved and all("lora_" in n for n in moved)
