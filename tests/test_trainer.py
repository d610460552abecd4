"""Trainer behaviour on ragged K-response data: batching, reference log-probs, PEFT, eval, saving, config checks."""

import copy
import logging
import math

import numpy as np
import pytest
import torch
from datasets import Dataset
from helpers import ANSWERS, QUESTIONS, k_response_dataset, nca_args, pairwise_dataset, user
from peft import LoraConfig, PrefixTuningConfig, PromptTuningConfig
from transformers import AutoModelForCausalLM

from trl_nca import InfoNCATrainer, NCAConfig, NCATrainer
from trl_nca.layouts import PROMPT_SHARING
from trl_nca.losses import nca_loss

TRAINERS = [NCATrainer, InfoNCATrainer]


def loss_of(trainer, indices):
    rows = [trainer.train_dataset[i] for i in indices]
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer._prepare_inputs(trainer.data_collator(rows))).item()


@pytest.mark.parametrize("cls", TRAINERS)
def test_row_loss_does_not_change_when_batched_with_longer_rows_or_more_responses(
    cls, tokenizer, model, other_model, tmp_path
):
    data = k_response_dataset(counts=(2, 4, 3))
    trainer = cls(
        model=model,
        ref_model=other_model,
        args=nca_args(tmp_path, reward_temperature=0.7),
        train_dataset=data,
        processing_class=tokenizer,
    )
    lengths = [max(len(c) for c in row["completion_ids"]) + len(row["prompt_ids"]) for row in trainer.train_dataset]
    assert lengths[1] > lengths[0]  # row 1 is longer and has more responses, so row 0 gets padded
    alone = [loss_of(trainer, [i]) for i in range(3)]
    together = loss_of(trainer, [0, 1, 2])
    assert together == pytest.approx(sum(alone) / 3, rel=1e-5)
    assert loss_of(trainer, [0, 1]) == pytest.approx((alone[0] + alone[1]) / 2, rel=1e-5)


@pytest.mark.parametrize("cls", TRAINERS)
@pytest.mark.parametrize("with_ref_model", [True, False])
def test_precomputed_reference_logps_give_the_same_loss(cls, with_ref_model, tokenizer, model, other_model, tmp_path):
    data = k_response_dataset()
    ref = (lambda: copy.deepcopy(other_model)) if with_ref_model else (lambda: None)
    live = cls(
        model=copy.deepcopy(model),
        ref_model=ref(),
        args=nca_args(tmp_path, reward_temperature=0.5),
        train_dataset=data,
        processing_class=tokenizer,
    )
    cached = cls(
        model=copy.deepcopy(model),
        ref_model=ref(),
        args=nca_args(tmp_path, reward_temperature=0.5, precompute_ref_log_probs=True),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert [len(r) for r in cached.train_dataset["ref_logps"]] == [len(c) for c in data["completions"]]
    for indices in ([0, 1, 2, 3], [4, 5, 6, 7]):
        assert loss_of(cached, indices) == pytest.approx(loss_of(live, indices), rel=1e-6)
    if not with_ref_model:  # the reference is the initial policy: the loss at initialisation
        assert loss_of(cached, [0, 1, 2, 3]) == pytest.approx(
            2 * math.log(2) if cls is NCATrainer else sum(math.log(k) for k in (4, 2, 3, 4)) / 4, rel=1e-6
        )


def test_lora_trains_only_the_adapter_against_the_disabled_adapter_reference(tokenizer, model, tmp_path):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = NCATrainer(
        model=model,
        args=nca_args(tmp_path, max_steps=2),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
        peft_config=lora,
    )
    assert trainer.ref_model is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n for n in moved)
    assert any("lora_B" in n for n in moved)
    # the adapter's B starts at zero, so the first step sees policy == reference: NCA's 2 log 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)
    assert trainer.state.log_history[1]["loss"] != pytest.approx(2 * math.log(2), abs=1e-4)


@pytest.mark.parametrize(
    "peft_config",
    [PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3),
     PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)],
    ids=["prompt_tuning", "prefix_tuning"],
)  # fmt: skip
def test_prompt_learning_peft_trains_in_the_padded_layout(peft_config, tokenizer, model, tmp_path):
    """Prompt tuning prepends virtual tokens to each sequence, prefix tuning keys and values to each layer. The padded
    layout scores the real tokens against the adapter-disabled reference (the loss of an independent computation);
    the prompt-sharing layouts cannot take the virtual tokens: `auto` leaves them out, naming them is refused."""
    for sharing in ["mask", "cache", "on"]:
        with pytest.raises(ValueError, match=f"prompt_sharing='{sharing}' is not possible here .*prompt-learning"):
            NCATrainer(model=copy.deepcopy(model), args=nca_args(tmp_path, prompt_sharing=sharing),
                       train_dataset=k_response_dataset(), processing_class=tokenizer,
                       peft_config=peft_config)  # fmt: skip
    trainer = NCATrainer(
        model=model,
        args=nca_args(tmp_path, reward_temperature=0.5),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    assert type(trainer.data_collator).__name__ == "DataCollatorForKResponses"
    rows = [trainer.train_dataset[i] for i in range(4)]
    loss = trainer.compute_loss(trainer.model, trainer.data_collator(rows))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.model.parameters() if p.requires_grad)

    def logps_of(peft_model):  # each prompt+response alone, float64 log-softmax of the real positions' logits
        out = []
        with torch.no_grad():
            for row in rows:
                for completion in row["completion_ids"]:
                    ids = torch.tensor([row["prompt_ids"] + completion])
                    logits = peft_model(input_ids=ids).logits[0, -ids.size(1) : -1].double()
                    logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                    out.append(logps[len(row["prompt_ids"]) - 1 :].sum())
        return torch.stack(out)

    policy = logps_of(trainer.model)
    with trainer.model.disable_adapter():
        reference = logps_of(trainer.model)
    assert (policy - reference).abs().max() > 1e-3  # the adapter changes the policy
    batch = trainer.data_collator(rows)
    mask = batch["response_mask"]
    expected = nca_loss(mask.double().masked_scatter(mask, policy), mask.double().masked_scatter(mask, reference),
                        batch["rewards"].double(), mask, beta=0.5, reward_temperature=0.5).mean()  # fmt: skip
    # NCA of float32 log-probs of ~100 (beta 0.5): 1e-4 relative; a token out of place would move it by ~0.1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)


@pytest.mark.parametrize("cls", TRAINERS)
def test_evaluate_logs_the_loss_and_k_response_metrics(cls, tokenizer, model, tmp_path):
    counts = (4, 2, 3, 4, 3, 2, 4, 4)
    data = k_response_dataset(counts)
    trainer = cls(
        model=model, args=nca_args(tmp_path), train_dataset=data, eval_dataset=data, processing_class=tokenizer
    )
    metrics = trainer.evaluate()
    # policy == reference before training: NCA gives 2 log 2 per prompt, InfoNCA log K_i
    expected = 2 * math.log(2) if cls is NCATrainer else sum(math.log(k) for k in counts) / len(counts)
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-6)
    assert metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["eval_rewards/accuracies"] == 0.0  # ties between model rewards are not counted as correct
    # a raw dataset handed to evaluate() later is converted and tokenized the same way
    again = trainer.evaluate(eval_dataset=pairwise_dataset())
    assert again["eval_loss"] == pytest.approx(2 * math.log(2) if cls is NCATrainer else math.log(2), rel=1e-6)
    assert "eval_rewards/chosen" in again and "eval_logps/rejected" in again


def test_training_logs_k_response_metrics(tokenizer, model, other_model, tmp_path):
    trainer = NCATrainer(
        model=model,
        ref_model=other_model,
        args=nca_args(tmp_path, max_steps=2),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
    )
    trainer.train()
    log = trainer.state.log_history[0]
    for key in [
        "loss",
        "rewards/accuracies",
        "rewards/margins",
        "rewards/best",
        "rewards/worst",
        "logps/best",
        "logps/worst",
        "rewards/spearman",
        "entropy",
        "num_tokens",
        "mean_token_accuracy",
    ]:
        assert math.isfinite(log[key]), key
    assert -1.0 <= log["rewards/spearman"] <= 1.0
    assert log["logps/best"] < 0 and log["logps/worst"] < 0
    # the two rows with K = 2 fall in one of the two steps (8 rows, batches of 4), and carry DPO's keys there
    assert any("rewards/chosen" in entry for entry in trainer.state.log_history[:2])


def test_save_load_and_model_card(tokenizer, model, tmp_path):
    trainer = InfoNCATrainer(
        model=model, args=nca_args(tmp_path), train_dataset=k_response_dataset(), processing_class=tokenizer
    )
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    trainer.create_model_card(model_name="tiny")
    reloaded = AutoModelForCausalLM.from_pretrained(str(out))
    for (name, a), (_, b) in zip(reloaded.named_parameters(), trainer.model.named_parameters()):
        assert torch.equal(a, b), name
    card = (tmp_path / "out" / "README.md").read_text()
    assert "InfoNCA" in card and "chen2024noise" in card and "2402.05369" in card
    assert "trl-nca" in card


def test_sync_ref_model_copies_the_policy_into_the_reference(tokenizer, model, tmp_path):
    args = nca_args(tmp_path, max_steps=1, sync_ref_model=True, ref_model_sync_steps=1, ref_model_mixup_alpha=1.0)
    trainer = NCATrainer(model=model, args=args, train_dataset=k_response_dataset(), processing_class=tokenizer)
    start = {n: p.detach().clone() for n, p in trainer.ref_model.named_parameters()}
    trainer.train()
    ref = dict(trainer.ref_model.named_parameters())
    assert any(not torch.equal(ref[n], start[n]) for n in start)
    for name, param in trainer.model.named_parameters():
        torch.testing.assert_close(ref[name], param, msg=name)


def test_rows_whose_prompt_fills_max_length_are_dropped_with_one_warning(tokenizer, model, tmp_path, caplog):
    data = k_response_dataset(counts=(2, 2, 3))
    data = Dataset.from_list(
        [
            data[0],
            {**data[1], "prompt": user("What is two plus two? " * 40)},
            {**data[2], "prompt": user("hi " * 50)},
        ]
    )
    with caplog.at_level(logging.WARNING, logger="trl_nca"):
        trainer = NCATrainer(
            model=model, args=nca_args(tmp_path, max_length=48), train_dataset=data, processing_class=tokenizer
        )
    assert len(trainer.train_dataset) == 1
    warnings = [r.getMessage() for r in caplog.records if "Dropped" in r.getMessage()]
    assert len(warnings) == 1 and "Dropped 2 of 3 rows of the train dataset" in warnings[0]
    batch = trainer.data_collator([trainer.train_dataset[0]])
    assert batch["input_ids"].shape[1] <= 48


@pytest.mark.parametrize(
    "field, value",
    [
        ("loss_type", "ipo"),
        ("loss_weights", [1.0]),
        ("ld_alpha", 0.5),
        ("f_divergence_type", "js_divergence"),
        ("label_smoothing", 0.1),
        ("use_weighting", True),
    ],
)
def test_dpo_only_options_raise_instead_of_being_ignored(field, value, tmp_path):
    with pytest.raises(ValueError, match=f"`{field}=.*has no meaning for NCA or InfoNCA"):
        nca_args(tmp_path, **{field: value})


def test_negative_reward_temperature_and_unknown_ultrafeedback_reward_raise(tmp_path):
    with pytest.raises(ValueError, match="reward_temperature"):
        nca_args(tmp_path, reward_temperature=-0.1)
    with pytest.raises(ValueError, match="ultrafeedback_reward"):
        NCAConfig(output_dir=str(tmp_path), use_cpu=True, ultrafeedback_reward="helpfulness")


def test_trainer_reports_bad_rows_and_unknown_layouts(tokenizer, model, tmp_path):
    bad = Dataset.from_dict(
        {"prompt": ["a", "b"], "completions": [["x", "y"], ["x", "y", "z"]], "rewards": [[1.0, 0.0], [1.0, 0.0]]}
    )
    with pytest.raises(ValueError, match=r"Row 1, columns 'completions' and 'rewards': 3 completions but 2 rewards"):
        NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=bad, processing_class=tokenizer)
    with pytest.raises(ValueError, match=r"Cannot tell the layout.*Accepted layouts"):
        NCATrainer(
            model=model,
            args=nca_args(tmp_path),
            train_dataset=Dataset.from_dict({"text": ["x"]}),
            processing_class=tokenizer,
        )


def test_model_given_as_a_local_path_and_as_a_peft_model(tokenizer, model, tmp_path):
    from peft import get_peft_model

    path = tmp_path / "tiny"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    by_path = NCATrainer(model=str(path), args=nca_args(tmp_path), train_dataset=k_response_dataset())
    assert by_path.ref_model is not None and by_path.ref_model is not by_path.model
    by_path.train()
    assert by_path.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)

    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM", init_lora_weights=False
    )
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(path), lora)  # a non-zero adapter
    trainer = NCATrainer(
        model=peft_model, args=nca_args(tmp_path), train_dataset=k_response_dataset(), processing_class=tokenizer
    )
    assert "ref" in trainer.model.peft_config  # DPOTrainer's frozen copy of the adapter serves as the reference
    trainer.train()
    # the reference is the adapter as given (not the bare base model), so the first loss is NCA's 2 log 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_streaming_dataset_and_text_rows_with_eos(tokenizer, model, tmp_path):
    rows = [{"prompt": "The sky is", "completions": [" blue.", " green", " a tree."], "rewards": [2.0, 0.0, 1.0]}] * 4
    text = Dataset.from_list(rows)
    trainer = NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=text, processing_class=tokenizer)
    row = trainer.train_dataset[0]
    assert all(ids[-1] == tokenizer.eos_token_id for ids in row["completion_ids"])
    assert tokenizer.decode(row["prompt_ids"] + row["completion_ids"][0]) == "The sky is blue.<|im_end|>"

    streamed = NCATrainer(
        model=copy.deepcopy(model),
        args=nca_args(tmp_path, max_steps=1),
        train_dataset=text.to_iterable_dataset(),
        processing_class=tokenizer,
    )
    streamed.train()
    assert streamed.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-5)


def test_prompt_sharing_help_and_docstring_describe_every_mode():
    help_text = NCAConfig.__dataclass_fields__["prompt_sharing"].metadata["help"]
    doc = NCAConfig.__doc__.split("prompt_sharing (")[1]
    for mode in PROMPT_SHARING:
        assert f"'{mode}'" in help_text and f'`"{mode}"`' in doc, mode


def test_compute_metrics_gets_the_same_logits_and_labels_whatever_the_layout(tokenizer, model, tmp_path):
    """As DPOTrainer hands `compute_metrics` the logits of its chosen and rejected sequences (their `input_ids` as
    `label_ids`), every layout hands over one prompt+response sequence per response, row by row and response by
    response: the same arrays under every `prompt_sharing`, `auto` included, which builds these three rows in three
    different layouts."""
    data = Dataset.from_list([
        {"prompt": "Q", "completions": [" one", " two"], "rewards": [1.0, 0.0]},  # a 1-token prompt: padded
        {"prompt": " ".join(QUESTIONS) * 2, "completions": [" ".join(ANSWERS[i:] + ANSWERS[:i]) for i in range(3)],
         "rewards": [1.0, 0.0, 2.0]},  # a long prompt and long responses: the prompt cache
        {"prompt": QUESTIONS[2], "completions": ANSWERS[:4], "rewards": [1.0, 0.0, 2.0, 3.0]},  # mask
    ])  # fmt: skip
    seen = {}
    for sharing in PROMPT_SHARING:
        trainer = NCATrainer(
            model=copy.deepcopy(model),
            args=nca_args(tmp_path, prompt_sharing=sharing, per_device_eval_batch_size=1),
            train_dataset=data,
            eval_dataset=data,
            processing_class=tokenizer,
            compute_metrics=lambda prediction, sharing=sharing: seen.setdefault(sharing, prediction) and {},
        )
        metrics = trainer.evaluate()
        assert metrics["eval_loss"] == pytest.approx(2 * math.log(2), rel=1e-6)
        if sharing == "auto":
            assert trainer.data_collator.counts == {"padded": 1, "cache": 1, "mask": 1}
    # The expectation, computed independently: each prompt+response on its own through the plain model
    sequences = [row["prompt_ids"] + ids for row in trainer.eval_dataset for ids in row["completion_ids"]]
    logits, labels = seen["off"].predictions, seen["off"].label_ids
    assert logits.shape == (len(sequences), max(map(len, sequences)), len(tokenizer))
    assert labels.shape == logits.shape[:2]
    with torch.no_grad():
        for n, ids in enumerate(sequences):
            assert labels[n, : len(ids)].tolist() == ids
            expected = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(torch.from_numpy(logits[n, : len(ids)]), expected, rtol=1e-5, atol=1e-5)
    for sharing, prediction in seen.items():
        np.testing.assert_array_equal(prediction.label_ids, labels, err_msg=sharing)
        np.testing.assert_allclose(prediction.predictions, logits, rtol=1e-5, atol=1e-5, err_msg=sharing)
