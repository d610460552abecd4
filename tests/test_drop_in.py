"""A DPO user's setup switched to the trainers: ties by layout, ranked data without scores, the pad token, MoE."""

import copy
import gc
import math

import pytest
import torch
from conftest import build_tokenizer
from datasets import Dataset
from helpers import assistant, k_response_dataset, nca_args, user
from transformers import MixtralConfig, MixtralForCausalLM

from trl_nca import InfoNCATrainer, NCATrainer, convert_to_k_responses, infonca_loss, nca_loss, soft_labels
from trl_nca.metrics import k_response_metrics

ANSWERS = ["four", "The sky is blue.", "hello world", "green grass"]


def loss_of(trainer, rows=None):
    rows = rows or [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    with torch.no_grad():
        return trainer.compute_loss(trainer.model, trainer.data_collator(rows)).item()


def build(cls, data, model, other_model, tokenizer, tmp_path, **overrides):
    return cls(
        model=copy.deepcopy(model),
        ref_model=copy.deepcopy(other_model),
        args=nca_args(tmp_path, **overrides),
        train_dataset=data,
        processing_class=tokenizer,
    )


def ranked_columns(scores):
    """One row per score list: A0..A{K-1} as whole conversations, best first; a `None` score after a number marks a
    missing response (a shorter row), an all-`None` list a row without score columns."""
    rows = []
    for i, row_scores in enumerate(scores):
        question = user(f"Question {i}: what is two plus two?")
        present = [k for k, score in enumerate(row_scores) if score is not None or row_scores[0] is None]
        row = {f"A{k}": question + assistant(ANSWERS[(i + k) % 4]) if k in present else None for k in range(4)}
        row = {key: value for key, value in row.items() if int(key[1:]) < len(scores[0])}
        if row_scores[0] is not None:
            row.update({f"score_A{k}": row_scores[k] if k < len(row_scores) else None for k in range(len(scores[0]))})
        rows.append(row)
    return Dataset.from_list(rows)


def as_canonical(ranked: Dataset, rewards) -> Dataset:
    """The same responses as canonical rows (no order) with the given rewards."""
    rows = []
    for row, row_rewards in zip(ranked, rewards):
        conversations = [row[f"A{k}"] for k in range(len(row_rewards))]
        assert all(conversations)
        rows.append(
            {"prompt": conversations[0][:1], "completions": [c[1:] for c in conversations], "rewards": row_rewards}
        )
    return Dataset.from_list(rows)


def test_tied_labels_by_layout():
    rewards = torch.tensor([[5.0, 5.0, 1.0], [2.0, 7.0, 7.0]])
    # no order: a tie shares its mass; listed best first: the first listed takes it
    assert soft_labels(rewards, reward_temperature=0).tolist() == [[0.5, 0.5, 0.0], [0.0, 0.5, 0.5]]
    ordered = soft_labels(rewards, reward_temperature=0, ordered=torch.tensor([True, True]))
    assert ordered.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]
    soft = soft_labels(rewards[:1], reward_temperature=2.0, ordered=torch.tensor([True]))
    shared = torch.softmax(rewards[:1] / 2.0, -1)
    torch.testing.assert_close(soft, torch.stack([shared[:, 0] + shared[:, 1], shared[:, 1] * 0, shared[:, 2]], -1))


@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
def test_ranked_columns_break_ties_by_their_order_and_canonical_rows_share(
    cls, tokenizer, model, other_model, tmp_path
):
    ranked = ranked_columns([[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 1.0, None]])
    assert convert_to_k_responses(ranked)["ordered"] == [True, True]
    trained = build(cls, ranked, model, other_model, tokenizer, tmp_path)
    # The order-based rule equals strictly ordered rewards on the same responses, and differs from sharing the tie
    strict = build(
        cls, as_canonical(ranked, [[3.0, 2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]), model, other_model, tokenizer, tmp_path
    )
    shared = build(
        cls, as_canonical(ranked, [[3.0, 3.0, 3.0, 3.0], [5.0, 5.0, 1.0]]), model, other_model, tokenizer, tmp_path
    )
    assert loss_of(trained) == pytest.approx(loss_of(strict), rel=1e-6)
    assert abs(loss_of(trained) - loss_of(shared)) > 1e-3


def test_metrics_name_two_different_responses_when_rewards_tie():
    policy = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -5.0, -6.0]])
    rewards = torch.tensor([[3.0, 3.0, 3.0], [1.0, 2.0, 2.0]])
    mask = torch.ones(2, 3, dtype=torch.bool)
    m = k_response_metrics(policy, torch.zeros(2, 3), rewards, mask, beta=1.0)
    # best: the first listed of the highest; worst: the last listed of the lowest
    assert m["logps/best"].tolist() == [-1.0, -5.0] and m["logps/worst"].tolist() == [-3.0, -4.0]
    assert m["rewards/best"].tolist() == [-1.0, -5.0] and m["rewards/worst"].tolist() == [-3.0, -4.0]
    # without order an all-tied row has no accuracy; listed best first it has (first > the others)
    assert math.isnan(m["rewards/accuracies"][0])
    ordered = k_response_metrics(
        policy, torch.zeros(2, 3), rewards, mask, beta=1.0, ordered=torch.tensor([True, True])
    )
    # row 2: the first listed of the tied best (model reward -5) is below response 0 (-4)
    assert ordered["rewards/accuracies"].tolist() == [1.0, 0.0]


@pytest.mark.parametrize("layout", ["list", "columns"])
@pytest.mark.parametrize("cls, loss_fn", [(NCATrainer, nca_loss), (InfoNCATrainer, infonca_loss)])
def test_ranked_data_without_scores_gets_rewards_from_the_rank(
    layout, cls, loss_fn, tokenizer, model, other_model, tmp_path, caplog
):
    if layout == "columns":
        data = ranked_columns([[None] * 4, [None] * 3])
    else:
        data = Dataset.from_list(
            [
                {"prompt": user("What is two plus two?"), "completions": [assistant(a) for a in ANSWERS[:3]]},
                {"prompt": user("Name a colour."), "completions": [assistant(a) for a in ANSWERS]},
            ]
        )
    with caplog.at_level("WARNING", logger="trl_nca"):
        converted = convert_to_k_responses(data)
    said = [r.getMessage() for r in caplog.records if "read as ranked best first" in r.getMessage()]
    assert len(said) == (1 if layout == "list" else 0)
    assert sorted(converted["rewards"], key=len) == [[0.0, -1.0, -2.0], [0.0, -1.0, -2.0, -3.0]]
    trainer = build(cls, data, model, other_model, tokenizer, tmp_path, reward_temperature=1.0)
    # alpha in rank steps: the loss with labels softmax(-rank / alpha), from the trainer's own log-probabilities
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        policy = trainer._per_response(trainer._sequence_logps(trainer.model, batch)[0], batch["response_mask"])
        ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        loss = trainer.compute_loss(trainer.model, batch)
    mask = batch["response_mask"]
    labels = soft_labels(batch["rewards"], mask, reward_temperature=1.0)
    torch.testing.assert_close(labels[mask.sum(-1) == 3][0, :3], torch.softmax(torch.tensor([0.0, -1.0, -2.0]), -1))
    expected = loss_fn(policy, ref, batch["rewards"], mask, beta=0.5, reward_temperature=1.0).mean()
    torch.testing.assert_close(loss, expected)


def test_pad_token_from_the_config_replaces_the_tokenizers(model, tmp_path):
    tokenizer = build_tokenizer()  # its own copy: DPOTrainer sets the pad token on the tokenizer it is given
    assert tokenizer.pad_token == "<|endoftext|>"
    trainer = NCATrainer(
        model=model,
        args=nca_args(tmp_path, pad_token="<|im_start|>", prompt_sharing="off"),
        train_dataset=k_response_dataset(counts=(2, 4)),
        processing_class=tokenizer,
    )
    pad_id = tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert trainer.data_collator.pad_token_id == pad_id and trainer.model.config.pad_token_id == pad_id
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad_id).all()
    with pytest.raises(ValueError, match="The specified `pad_token` \\('<nope>'\\) is not found in the vocabulary"):
        NCATrainer(
            model=model,
            args=nca_args(tmp_path, pad_token="<nope>"),
            train_dataset=k_response_dataset(),
            processing_class=build_tokenizer(),
        )


def tiny_moe(tokenizer, seed):
    torch.manual_seed(seed)
    config = MixtralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        router_aux_loss_coef=0.05,
    )
    return MixtralForCausalLM(config).float()


@pytest.fixture
def moe_trainer(tokenizer, tmp_path):
    trainer = NCATrainer(
        model=tiny_moe(tokenizer, 0),
        ref_model=tiny_moe(tokenizer, 1),
        args=nca_args(tmp_path, prompt_sharing="off"),
        train_dataset=k_response_dataset(counts=(3, 2, 4, 2)),
        processing_class=tokenizer,
    )
    router_requests = []
    for model in (trainer.model, trainer.ref_model):
        model.model.register_forward_pre_hook(
            lambda module, args, kwargs, name=("policy" if model is trainer.model else "reference"): (
                router_requests.append((name, kwargs.get("output_router_logits")))
            ),
            with_kwargs=True,
        )
    trainer.router_requests = router_requests
    return trainer


def expected_moe_loss(trainer, batch):
    """NCA on the trainer's log-probabilities plus coef x the model's own load-balancing loss (a plain forward)."""
    with torch.no_grad():
        policy = trainer._per_response(trainer._sequence_logps(trainer.model, batch)[0], batch["response_mask"])
        ref = trainer.compute_ref_log_probs(trainer.ref_model, batch)
        aux = trainer.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_router_logits=True
        ).aux_loss
    nca = nca_loss(policy, ref, batch["rewards"], batch["response_mask"], beta=0.5, reward_temperature=0.0).mean()
    return nca + 0.05 * aux


def test_moe_router_loss_comes_from_the_policy_forward_only(moe_trainer):
    trainer = moe_trainer
    assert trainer.aux_loss_enabled and trainer.router_aux_loss_coef == 0.05
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    expected = expected_moe_loss(trainer, batch)
    trainer.router_requests.clear()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    torch.testing.assert_close(loss, expected)
    assert trainer.router_requests == [("policy", True), ("reference", False)]
    assert trainer._metrics["train"]["aux_loss"]


def test_moe_router_loss_when_the_policy_comes_wrapped(moe_trainer, tmp_path):
    """DDP (or DeepSpeed) hands `compute_loss` a wrapper, not `self.model`: the router loss must still be added."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    trainer = moe_trainer
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    expected = expected_moe_loss(trainer, batch)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/group", rank=0, world_size=1)
    try:
        wrapped = DistributedDataParallel(trainer.model)
        trainer.router_requests.clear()
        loss = trainer.compute_loss(wrapped, batch)
        loss.backward()
    finally:
        # The wrapper's reducer holds the process group: freed after the group is destroyed, its gloo destructor can
        # wait forever on its worker thread (seen in 2 of 6 full runs), so it goes first
        wrapped = None
        gc.collect()
        dist.destroy_process_group()
    torch.testing.assert_close(loss.detach(), expected)
    assert ("policy", True) in trainer.router_requests
    router = trainer.model.model.layers[0].mlp.gate.weight
    assert router.grad is not None and router.grad.abs().sum() > 0


def test_moe_models_keep_the_padded_layout_with_auto(tokenizer, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="trl_nca"):
        trainer = NCATrainer(
            model=tiny_moe(tokenizer, 0),
            args=nca_args(tmp_path),
            train_dataset=k_response_dataset(counts=(3, 2)),
            processing_class=tokenizer,
        )
    assert trainer._layout == "padded"
    assert any("router loss" in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="prompt_sharing='on' is not possible here .*router loss"):
        NCATrainer(
            model=tiny_moe(tokenizer, 0),
            args=nca_args(tmp_path, prompt_sharing="on"),
            train_dataset=k_response_dataset(counts=(3, 2)),
            processing_class=tokenizer,
        )


def test_dpo_config_fields_that_keep_their_dpo_meaning(tokenizer, tmp_path):
    """disable_dropout, padding_free (off in TRL 1.16, with a warning), pad_to_multiple_of in both layouts,
    dataset_num_proc, and the divergence/DiscoPOP coefficients that only DPO's other losses read."""
    from conftest import build_model

    model = build_model(tokenizer)
    data = k_response_dataset(counts=(2, 3, 4))
    plain = NCATrainer(
        model=copy.deepcopy(model), args=nca_args(tmp_path), train_dataset=data, processing_class=tokenizer
    )
    trainer = NCATrainer(
        model=copy.deepcopy(model),
        args=nca_args(
            tmp_path,
            padding_free=True,
            pad_to_multiple_of=16,
            dataset_num_proc=2,
            f_alpha_divergence_coef=0.9,
            discopop_tau=0.5,
        ),
        train_dataset=data,
        processing_class=tokenizer,
    )
    assert trainer.padding_free is False
    assert trainer.train_dataset["completion_ids"] == plain.train_dataset["completion_ids"]  # num_proc=2 maps
    rows = [trainer.train_dataset[i] for i in range(3)]
    for layout in ["padded", "shared_prompt"]:
        from trl_nca.layouts import make_collator

        batch = make_collator(
            layout, pad_token_id=0, max_length=None, truncation_mode="keep_start", pad_to_multiple_of=16
        )(rows)
        assert batch["input_ids"].shape[1] % 16 == 0, layout
    assert loss_of(trainer, rows) == pytest.approx(loss_of(plain, rows), rel=1e-6)


def test_disable_dropout_as_in_dpo(tokenizer, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256, resid_pdrop=0.3)
    dropouts = {}
    for disable in [True, False]:
        trainer = NCATrainer(
            model=GPT2LMHeadModel(config),
            args=nca_args(tmp_path, disable_dropout=disable),
            train_dataset=k_response_dataset(counts=(2, 3)),
            processing_class=tokenizer,
        )
        dropouts[disable] = {m.p for m in trainer.model.modules() if isinstance(m, torch.nn.Dropout)}
    assert dropouts == {True: {0.0}, False: {0.1, 0.3}}


def test_disable_dropout_reaches_the_attention_dropout_models_apply_functionally(tokenizer, tmp_path):
    """DPOConfig's `disable_dropout=True` (TRL's `disable_dropout_in_model`) sets nn.Dropout modules to 0, but
    Llama-style attention applies `self.attention_dropout` functionally: the policy and reference forwards then saw
    different dropout masks, so the loss at initialisation was not NCA's 2 log 2."""
    from conftest import build_model

    from trl_nca.dropout import has_active_dropout

    model = build_model(tokenizer)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    trainer = NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=k_response_dataset(counts=(3, 4)),
                         processing_class=tokenizer)  # fmt: skip
    assert not has_active_dropout(trainer.model) and not has_active_dropout(trainer.ref_model)
    trainer.model.train()
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-6)


def test_precomputed_reference_log_probs_see_no_functional_attention_dropout(tokenizer, tmp_path):
    """A policy built in memory is in training mode: with Llama's attention dropout on, the precompute (policy as the
    reference) must still give the log-probabilities of the model without dropout."""
    from conftest import build_model

    def precomputed(dropout):
        model = build_model(tokenizer)
        model.config.attention_dropout = dropout
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = dropout
        trainer = NCATrainer(model=model, args=nca_args(tmp_path, precompute_ref_log_probs=True),
                             train_dataset=k_response_dataset(counts=(3, 4)), processing_class=tokenizer)  # fmt: skip
        return [value for row in trainer.train_dataset["ref_logps"] for value in row]

    assert precomputed(0.5) == pytest.approx(precomputed(0.0), rel=1e-6)
