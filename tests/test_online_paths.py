"""The online trainers on the paths a GRPO script takes beyond plain text: MoE with accumulation, image inputs, vLLM's
importance-sampling correction, checkpoints between two generations, async reward classes, dropout, the completions
table, evaluation settings, and the rows and rewards that must be refused (each test failed before its fix)."""

import logging
import math

import pytest
import torch
from conftest import build_model
from datasets import Dataset
from helpers import StopAt
from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset, text_of
from test_drop_in import tiny_moe
from test_online import build, lora, rewards_of, scored_groups, sequence_logps
from trl import GRPOConfig, GRPOTrainer

from trl_nca import OnlineInfoNCATrainer, OnlineNCAConfig, OnlineNCATrainer, soft_labels
from trl_nca.dropout import has_active_dropout
from trl_nca.losses import nca_terms
from trl_nca.online_trainer import FORWARD_FIELDS


def moe_trainer(tokenizer, tmp_path, **overrides):
    return OnlineNCATrainer(
        model=tiny_moe(tokenizer, 0),
        reward_funcs=length_reward,
        args=online_args(tmp_path, router_aux_loss_coef=0.5, **overrides),
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        rollout_func=deterministic_rollout,
    )


def test_moe_router_loss_is_scaled_for_gradient_accumulation_like_the_policy_loss(tokenizer, tmp_path):
    """GRPO divides the router loss by the accumulation steps with the policy loss; the sum over an accumulation
    window then does not depend on how many micro-batches it has."""
    trainer = moe_trainer(tokenizer, tmp_path)
    assert trainer.aux_loss_enabled
    batch = scored_groups(trainer)
    losses = {}
    for steps in (1, 4):
        trainer.current_gradient_accumulation_steps = steps
        with torch.no_grad():
            losses[steps] = trainer.compute_loss(trainer.model, batch).item()
    aux = float(trainer._metrics["train"]["aux_loss"][-1])
    assert aux > 0.1  # the router loss is a real share of the loss here
    assert losses[4] * 4 == pytest.approx(losses[1], rel=1e-6)
    assert losses[1] == pytest.approx(2 * math.log(2) + 0.5 * aux, rel=1e-6)  # sampler reference: NCA = 2 log 2


def spy_forward(trainer):
    """Replaces the trainer's `_get_per_token_logps_and_entropies` with one that records its arguments and returns
    zeros of the right shape (the image fields of the batch below are placeholders no text model could take)."""
    calls = []

    def record(model, input_ids, attention_mask, logits_to_keep, **kwargs):
        calls.append((input_ids, attention_mask, logits_to_keep, kwargs))
        shape = (input_ids.size(0), logits_to_keep)
        return torch.zeros(shape, requires_grad=True), torch.zeros(shape), None

    trainer._get_per_token_logps_and_entropies = record
    return calls


def test_the_policy_forward_gets_every_field_grpo_gives_it_images_included(tokenizer, tmp_path):
    """Pins our policy forward to GRPOTrainer._compute_loss's: same ids, masks and extra (image) fields, read from
    the batch GRPO builds. Before, `pixel_values` and the other image fields were dropped from the policy forward
    while the old and reference forwards (GRPO's) had them."""
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path)
    trainer.model.eval()
    batch = scored_groups(trainer)
    n = len(batch["prompt_ids"])
    images = {
        "pixel_values": torch.randn(n * 4, 6),
        "image_grid_thw": torch.tensor([[1, 2, 2]] * n),
        "num_images": [1] * n,
        "pixel_attention_mask": torch.ones(n, 4, dtype=torch.long),
        "image_sizes": torch.tensor([[8, 8]] * n),
        "token_type_ids": torch.zeros(n, 3, dtype=torch.long),
    }
    assert set(images) <= set(FORWARD_FIELDS)
    for extra in ({}, images):
        inputs = {**batch, **extra}
        calls = spy_forward(trainer)
        GRPOTrainer._compute_loss(trainer, trainer.model, inputs)
        trainer._compute_loss(trainer.model, inputs)
        (ids, mask, keep, theirs), (our_ids, our_mask, our_keep, ours) = calls
        assert torch.equal(ids, our_ids) and torch.equal(mask, our_mask) and keep == our_keep
        assert set(ours) == set(theirs) and {k for k, v in ours.items() if v is not None} >= set(extra)
        for name, value in theirs.items():
            assert value is ours[name] or (isinstance(value, torch.Tensor) and torch.equal(value, ours[name])), name


def test_a_run_resumed_between_two_generations_ends_with_the_weights_of_an_uninterrupted_one(tokenizer, tmp_path):
    """steps_per_generation=2 with one micro-batch per step: checkpoint-1 lies inside a generation batch. Real
    sampling (no fixed rollout): a regenerated batch would differ."""

    def run(name, callbacks=(), resume=None):
        args = online_args(
            tmp_path / name,
            max_steps=4,
            num_generations=2,
            per_device_train_batch_size=2,
            steps_per_generation=2,
            save_strategy="steps",
            save_steps=1,
            temperature=1.0,
        )
        trainer = OnlineNCATrainer(
            model=build_model(tokenizer), reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
            processing_class=tokenizer, peft_config=lora(random_init=False), callbacks=list(callbacks),
        )  # fmt: skip
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    run("cut", [StopAt(1)])
    resumed = run("cut", resume=str(tmp_path / "cut" / "online" / "checkpoint-1"))
    assert resumed.state.global_step == 4
    moved = 0
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=name)
        moved += "lora_B" in name and bool(a.abs().sum() > 0)
    assert moved  # the adapter trained (lora_B starts at 0)


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
def test_vllm_importance_sampling_ratio_weights_each_completions_gradient(cls, tokenizer, tmp_path):
    """With vLLM's correction on, GRPO hands the loss a detached sampler/trainer ratio (per completion in its sequence
    modes, per token in the token modes). Each completion's log-probability gradient is weighted by it; the loss
    value is unchanged. Checked without vLLM: the flags are set on the trainer and the ratio put in the batch."""
    trainer = build(cls, tokenizer, tmp_path, reference="initial")
    trainer.model.eval()
    batch = scored_groups(trainer)
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    def loss_and_grads(ratio):
        trainer.use_vllm = trainer.vllm_importance_sampling_correction = ratio is not None
        loss = trainer.compute_loss(trainer.model, {**batch, "importance_sampling_ratio": ratio})
        return loss.detach(), torch.autograd.grad(loss, params)

    ratio = torch.tensor([0.5, 1.0, 2.0, 0.0, 1.5, 0.25, 1.0, 3.0])[:, None]  # sequence modes: (B, 1); 0 = masked
    plain, _ = loss_and_grads(None)
    corrected, grads = loss_and_grads(ratio)
    assert corrected.item() == pytest.approx(plain.item(), rel=1e-6)
    # Independently: the same loss on log-probs whose gradient is scaled by the ratio, from a plain forward
    logps = sequence_logps(trainer.model, batch)
    scaled = (logps * ratio[:, 0] + logps.detach() * (1 - ratio[:, 0])).float()
    with trainer.model.disable_adapter(), torch.no_grad():
        ref = sequence_logps(trainer.model, batch).float()
    expected = trainer._group_loss(scaled, ref, batch, 4)
    for got, want in zip(grads, torch.autograd.grad(expected, params)):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4)
    # Token modes: a per-token ratio equal to the completion's everywhere is the same correction
    tokens = ratio.expand_as(batch["completion_mask"]).clone()
    _, token_grads = loss_and_grads(tokens)
    for got, want in zip(token_grads, grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


class AsyncLength:
    """A reward class with an async `__call__`, which GRPO runs on its event loop."""

    __name__ = "AsyncLength"

    async def __call__(self, prompts, completions, **kwargs):
        return length_reward(prompts, completions)


def test_a_reward_class_with_an_async_call_is_awaited(tokenizer, tmp_path):
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=AsyncLength())
    batch = scored_groups(trainer)
    torch.testing.assert_close(
        batch["nca_labels"].double(),
        soft_labels(rewards_of(trainer, batch).view(2, 4), reward_temperature=0.5).flatten(),
    )


def dropout_model(tokenizer):
    model = build_model(tokenizer)
    model.config.attention_dropout = 0.5
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.5
    return model


def test_functional_attention_dropout_is_disabled_so_the_first_update_has_r_zero(tokenizer, tmp_path):
    """num_iterations=2 makes GRPO compute old log-probs in a forward of their own; with the attention dropout that
    models apply functionally (no nn.Dropout module), that forward saw another mask: r != 0 before any update."""
    args = online_args(tmp_path, num_iterations=2, max_steps=1, per_device_train_batch_size=8)
    trainer = OnlineNCATrainer(
        model=dropout_model(tokenizer), reward_funcs=length_reward, args=args, train_dataset=prompts_dataset(),
        processing_class=tokenizer, rollout_func=deterministic_rollout,
    )  # fmt: skip
    assert not has_active_dropout(trainer.model)
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert abs(log["logratio/mean"]) < 1e-5
    assert log["loss"] == pytest.approx(2 * math.log(2), rel=1e-5)


def test_a_grpo_config_keeps_dropout_off_with_a_warning_unless_asked(caplog):
    grpo = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, num_generations=2, report_to=[])
    with caplog.at_level(logging.WARNING):
        assert OnlineNCAConfig.from_grpo_config(grpo).disable_dropout is True
    assert "`disable_dropout` is set to True (GRPOConfig's default is False)" in caplog.text
    assert OnlineNCAConfig.from_grpo_config(grpo, disable_dropout=False).disable_dropout is False


@pytest.mark.parametrize("cls", [OnlineNCATrainer, OnlineInfoNCATrainer])
@pytest.mark.parametrize("reference", ["sampler", "initial"])
def test_the_completions_table_shows_the_weight_each_completion_gets(cls, reference, tokenizer, tmp_path):
    """-dL/dr_k at generation time: NCA p_k (1 - s_k) - s_k / K with s = sigmoid(r), InfoNCA p_k - softmax(r)_k;
    with the sampler reference r = 0, so (p_k - 1/K) / 2 and p_k - 1/K. The initial reference needs the policy's
    log-probs at generation: num_iterations=2 makes GRPO compute them."""
    trainer = build(cls, tokenizer, tmp_path, reference=reference, num_iterations=2)
    trainer.model.eval()
    batch = scored_groups(trainer)
    labels = soft_labels(rewards_of(trainer, batch).view(2, 4), reward_temperature=0.5)
    r = torch.zeros(2, 4, dtype=torch.float64)
    if reference == "initial":
        with torch.no_grad():
            policy = sequence_logps(trainer.model, batch)
            with trainer.model.disable_adapter():
                r = (0.5 * (policy - sequence_logps(trainer.model, batch))).view(2, 4)
        assert r.abs().min() > 1e-3
    if cls is OnlineNCATrainer:
        expected = labels * (1 - torch.sigmoid(r)) - torch.sigmoid(r) / 4
    else:
        expected = labels - torch.softmax(r, -1)
    got = torch.tensor(list(trainer._logs["advantages"]), dtype=torch.float64)  # the table keeps the last 4
    assert len(got) == 4
    torch.testing.assert_close(got, expected.flatten()[-4:], atol=1e-6, rtol=1e-4)


def test_infonca_checks_the_eval_batch_only_where_an_evaluation_happens(tokenizer, tmp_path):
    trainer = build(
        OnlineInfoNCATrainer, tokenizer, tmp_path, per_device_train_batch_size=4, per_device_eval_batch_size=6
    )
    with pytest.raises(
        ValueError, match=r"per_device_eval_batch_size \(6\) must be a multiple of the group size \(4\)"
    ):
        trainer.evaluate(prompts_dataset())
    # where an evaluation is planned, the settings are refused up front (by GRPOConfig's own check, here)
    with pytest.raises(ValueError, match=r"\(6 \* 1\) must be divisible by the number of generations"):
        build(OnlineInfoNCATrainer, tokenizer, tmp_path, per_device_eval_batch_size=6, eval_strategy="steps")


def test_the_prompt_column_is_not_required_where_an_environment_supplies_the_prompts(tokenizer, tmp_path):
    """GRPO accepts a dataset without `prompt` when `environment_factory` is given; it then goes on to its own checks
    (here: our test tokenizer's chat template cannot call tools), instead of stopping at ours."""

    class Environment:
        def reset(self, **kwargs):
            return "Start."

        def move(self, step: int) -> str:
            """Move.

            Args:
                step: how far.
            """
            return "moved"

    with pytest.raises(ValueError, match="does not support tool calling"):
        OnlineNCATrainer(
            model=build_model(tokenizer), args=online_args(tmp_path), train_dataset=Dataset.from_dict({"x": [1, 2]}),
            processing_class=tokenizer, environment_factory=Environment,
        )  # fmt: skip


# --- rows and rewards that cannot be trained on (issue 19) -----------------------------------------------------------


def huge(prompts, completions, **kwargs):
    return [1e39 if i == 5 else 0.0 for i in range(len(completions))]


def large(prompts, completions, **kwargs):
    return [3e38] * len(completions)


def near(prompts, completions, **kwargs):
    return [1e8 + (i % 2) for i in range(len(completions))]


REWARD_CASES = [
    ([huge], "Reward function 'huge' returned 1e\\+39 for completion 1 of prompt 1 .* overflows float32"),
    ([large, large], r"The weighted sum of the reward functions \['large', 'large'\] for completion 0 of prompt 0 is "
                     r"6\.0+\d*e\+38, which overflows float32"),
    ([near], "'near' returned 100000000.0 and 100000001.0 for completions 0 and 1 of prompt 0 .* equal in float32"),
]  # fmt: skip


@pytest.mark.parametrize("funcs, message", REWARD_CASES)
def test_rewards_beyond_float32_stop_the_run_naming_the_function_and_completion(funcs, message, tokenizer, tmp_path):
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=funcs)
    with pytest.raises(ValueError, match=message):
        scored_groups(trainer)


def test_groups_without_a_valid_completion_count_as_tied_and_warn(tokenizer, tmp_path, caplog):
    def none(prompts, completions, **kwargs):
        return [None] * len(completions)

    trainer = build(OnlineNCATrainer, tokenizer, tmp_path, reward=none)
    with caplog.at_level(logging.WARNING):
        batch = scored_groups(trainer)
    assert "No completion of this train generation batch can be trained on (8 of 8 unscored" in caplog.text
    assert trainer._metrics["train"]["frac_tied_groups"][-1] == 1.0 and not batch["nca_valid"].any()


BAD_PROMPTS = [  # (the dataset's prompts, the error); Arrow needs one type per column
    (["What is two plus two?", ""], "Row 1, column 'prompt': empty prompt"),
    (["What is two plus two?", None], "Row 1, column 'prompt': expected text or a list of messages, got NoneType"),
    ([3, 7], "Row 0, column 'prompt': expected text or a list of messages, got int"),
    ([[{"role": "user", "content": "hi"}], [{"content": "hi"}]], "Row 1, column 'prompt', message 0: expected a dict"),
]


@pytest.mark.parametrize("prompts, message", BAD_PROMPTS)
def test_online_prompts_that_cannot_be_sampled_from_are_refused_before_training(prompts, message, tokenizer, tmp_path):
    rows = Dataset.from_dict({"prompt": prompts})
    for train, evaluation, where in [(rows, None, "Train"), (prompts_dataset(), {"held": rows}, "Eval 'held'")]:
        with pytest.raises(ValueError, match=f"{where} dataset: {message}"):
            OnlineNCATrainer(
                model=build_model(tokenizer), reward_funcs=length_reward, args=online_args(tmp_path),
                train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
            )  # fmt: skip


def test_an_eval_dataset_without_prompt_is_refused_before_training(tokenizer, tmp_path):
    with pytest.raises(ValueError, match=r"The eval dataset needs a `prompt` column, .* it has \['question'\]"):
        OnlineNCATrainer(
            model=build_model(tokenizer), reward_funcs=length_reward, args=online_args(tmp_path),
            train_dataset=prompts_dataset(), eval_dataset=Dataset.from_dict({"question": ["a"]}),
            processing_class=tokenizer,
        )  # fmt: skip


def test_streamed_rows_are_checked_as_they_arrive(tokenizer, tmp_path):
    trainer = build(OnlineNCATrainer, tokenizer, tmp_path)
    with pytest.raises(ValueError, match=r"Train dataset \(of the generation batch\): Row 2, column 'prompt': empty"):
        trainer._generate_and_score_completions([{"prompt": "Hi"}, {"prompt": "Hi"}, {"prompt": " "}, {"prompt": "x"}])


def test_nca_terms_weights_match_the_closed_form():
    """The table's weights come from autograd through the loss; the closed form, independently."""
    r = torch.tensor([[0.3, -0.2, 1.0]], dtype=torch.float64, requires_grad=True)
    p = torch.tensor([[0.5, 0.2, 0.3]], dtype=torch.float64)
    (grad,) = torch.autograd.grad(nca_terms(r, p, torch.tensor(3.0)).sum(), r)
    s = torch.sigmoid(r.detach())
    torch.testing.assert_close(-grad, p * (1 - s) - s / 3)


def test_reward_weights_that_are_not_finite_are_refused_and_a_dropped_grpo_beta_warns(tmp_path, caplog):
    with pytest.raises(ValueError, match=r"`reward_weights` must be finite numbers, got \[1.0, nan\]"):
        online_args(tmp_path, reward_weights=[1.0, float("nan")])
    grpo = GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, num_generations=2, report_to=[], beta=0.04)
    with caplog.at_level(logging.WARNING):
        assert OnlineNCAConfig.from_grpo_config(grpo).beta == 0.1
    assert "GRPO's `beta=0.04` (a KL coefficient) is not carried over" in caplog.text


# --- image prompts (tiny vision-language models built offline, tests/vlm_helpers.py) ------------------------------


@pytest.fixture
def one_thread():
    """Tiny models: two threads only contend (several times slower on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_image_prompts_the_policy_sees_the_images_its_reference_saw(kind, tmp_path, one_thread):
    """GRPO computes the reference log-probs with the images; before, the policy forward dropped them, so at
    initialisation (LoRA's B = 0: policy = reference) log pi - log pi_ref was far from 0. Now it is 0, the loss is
    NCA's value at initialisation, and the policy's per-token log-probs are GRPO's own forward's on the same batch."""
    from vlm_helpers import build_vlm, build_vlm_processor, small_images

    processor = build_vlm_processor(kind)
    images = small_images(2)
    rows = [{"prompt": [{"role": "user", "content": "Describe the image."}], "image": image} for image in images]
    trainer = OnlineNCATrainer(
        model=build_vlm(processor, kind), reward_funcs=length_reward, processing_class=processor,
        args=online_args(tmp_path, reference="initial", num_generations=2, max_completion_length=4,
                         per_device_train_batch_size=4),
        train_dataset=Dataset.from_list(rows), peft_config=lora(random_init=False),
    )  # fmt: skip
    trainer.model.eval()
    batch = trainer._generate_and_score_completions([rows[0], rows[0], rows[1], rows[1]])
    assert batch.get("pixel_values") is not None
    recorded = []
    forward = trainer._get_per_token_logps_and_entropies

    def record(*args, **kwargs):
        recorded.append(forward(*args, **kwargs)[0].detach())
        return forward(*args, **kwargs)

    trainer._get_per_token_logps_and_entropies = record
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        GRPOTrainer._compute_loss(trainer, trainer.model, batch)
    ours, grpos = recorded
    mask = batch["completion_mask"].bool()
    torch.testing.assert_close(ours[mask], grpos[mask], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[mask], batch["ref_per_token_logps"][mask], atol=1e-5, rtol=1e-5)
    assert loss.item() == pytest.approx(2 * math.log(2), rel=1e-5)
    # and without the images, the same completions score differently: the test could fail
    text_only = {k: v for k, v in batch.items() if k not in FORWARD_FIELDS or k == "token_type_ids"}
    with torch.no_grad():
        blind = trainer._policy_forward(trainer.model, {**text_only, "pixel_values": None})[0]
    assert (blind[mask] - ours[mask]).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["qwen2_vl", "llava"])
def test_online_nca_trains_on_image_prompts_with_a_reward_of_the_image(kind, tmp_path, one_thread):
    """A GRPO-style image dataset (`prompt` + `image`): the reward function gets each completion's image, the labels
    come from its rewards, the sampler reference gives r = 0 at the update, and the adapter moves."""
    from vlm_helpers import build_vlm, build_vlm_processor, small_images

    processor = build_vlm_processor(kind)
    images = small_images(2, seed=7)
    seen = []

    def brightness_and_length(prompts, completions, image, **kwargs):
        seen.append(list(image))
        return [
            float(sum(im.convert("L").getdata()) % 3) + sum(map(ord, text_of(c))) % 5
            for im, c in zip(image, completions)
        ]

    rows = [{"prompt": [{"role": "user", "content": "Describe the image."}], "image": image} for image in images]
    trainer = OnlineNCATrainer(
        model=build_vlm(processor, kind), reward_funcs=brightness_and_length, processing_class=processor,
        args=online_args(tmp_path, num_generations=2, max_completion_length=4, per_device_train_batch_size=4,
                         max_steps=1, optim="sgd", learning_rate=0.5),
        train_dataset=Dataset.from_list(rows), peft_config=lora(random_init=True),
    )  # fmt: skip
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    log = next(e for e in trainer.state.log_history if "loss" in e)
    assert len(seen) == 1 and len(seen[0]) == 4 and seen[0][0].tobytes() == seen[0][1].tobytes()
    assert log["logratio/mean"] == pytest.approx(0.0, abs=1e-5) and log["loss"] == pytest.approx(2 * math.log(2))
    moved = {n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert (
        moved
        and any("visual" in n or "vision_tower" in n or "multi_modal_projector" in n for n in moved)
        or (log["frac_tied_groups"] == 1.0 and not moved)
    )
