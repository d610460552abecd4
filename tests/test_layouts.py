"""The layouts (padded, shared prompt with a mask, prompt cache) against separate forwards and against each other,
the response-only LM head against TRL's fused head, and the choice of layout."""

import copy
import logging
import math

import pytest
import torch
from conftest import build_model
from datasets import Dataset
from helpers import k_response_dataset, nca_args
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import add_fused_lm_head

from trl_nca import InfoNCATrainer, NCATrainer
from trl_nca.layouts import (
    DataCollatorForAnyLayout,
    DataCollatorForKResponses,
    DataCollatorForPromptCache,
    DataCollatorForSharedPrompt,
    ModelShape,
    choose_layout,
    layout_cost,
)

COLLATORS = {
    "padded": lambda pad: DataCollatorForKResponses(pad_token_id=pad),
    "mask": lambda pad: DataCollatorForSharedPrompt(pad_token_id=pad),
    "mask-packed": lambda pad: DataCollatorForSharedPrompt(pad_token_id=pad, pack_rows=True),
    "cache": lambda pad: DataCollatorForPromptCache(pad_token_id=pad),
}


def separate_logps(model, rows):
    """Each prompt+response in its own forward, scored with a plain float64 log-softmax over full logits."""
    out = []
    with torch.no_grad():
        for row in rows:
            for completion in row["completion_ids"]:
                ids = torch.tensor([row["prompt_ids"] + completion])
                logits = model(input_ids=ids).logits[0, :-1].double()
                logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
                out.append(logps[len(row["prompt_ids"]) - 1 :].sum())
    return torch.stack(out)


def make_trainer(tokenizer, model, tmp_path, attn="sdpa", cls=NCATrainer, ref_model=None, **overrides):
    for m in (model, ref_model):
        if m is not None:
            m.config._attn_implementation = attn
    return cls(
        model=model,
        ref_model=ref_model,
        args=nca_args(tmp_path, **overrides),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
    )


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["padded", "mask", "mask-packed", "cache"])
def test_every_layout_gives_the_log_probs_of_separate_forwards(attn, layout, tokenizer, model, other_model, tmp_path):
    trainer = make_trainer(tokenizer, model, tmp_path, attn=attn, ref_model=other_model)
    rows = [trainer.train_dataset[i] for i in range(5)]  # ragged: K = 4, 2, 3, 4, 3
    batch = COLLATORS[layout](tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        policy, _, _ = trainer._sequence_logps(trainer.model, batch)
    reference = trainer.compute_ref_log_probs(trainer.ref_model, batch)[batch["response_mask"]]
    # Summed log-probs of ~170 computed in float32: equal to a relative 1e-5 (a wrong token or context is off by ~1)
    torch.testing.assert_close(policy.double(), separate_logps(trainer.model, rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.double(), separate_logps(trainer.ref_model, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cls", [NCATrainer, InfoNCATrainer])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("layout", ["mask", "cache"])
def test_same_loss_and_gradients_as_the_padded_layout(cls, attn, layout, tokenizer, model, other_model, tmp_path):
    results = {}
    for sharing in ["off", layout]:
        trainer = make_trainer(
            tokenizer, copy.deepcopy(model), tmp_path, attn, cls, copy.deepcopy(other_model),
            prompt_sharing=sharing, reward_temperature=0.5,
        )  # fmt: skip
        expected = {"off": DataCollatorForKResponses, "mask": DataCollatorForSharedPrompt}.get(
            sharing, DataCollatorForPromptCache
        )
        assert type(trainer.data_collator) is expected
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[sharing] = (loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()})
    torch.testing.assert_close(results[layout][0], results["off"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["off"][1].items():
        torch.testing.assert_close(results[layout][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["off", "mask"])
def test_trls_fused_head_with_a_separate_reference_model(layout, tokenizer, model, other_model, tmp_path, monkeypatch):
    """The head kept on CUDA (TRL's fused one) with a reference model of its own, whose fused head DPOTrainer sets
    to log-probabilities only: the same loss and gradients as the response-only head (this broke on the GPU)."""
    import trl_nca.trainer

    results = {}
    for head in ["response", "fused"]:
        monkeypatch.setattr(trl_nca.trainer, "head_choice", lambda model, device, head=head: (head, "test"))
        trainer = make_trainer(
            tokenizer, copy.deepcopy(model), tmp_path, ref_model=copy.deepcopy(other_model), prompt_sharing=layout
        )
        assert trainer._head == head
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(8)])
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        results[head] = (loss.detach(), {n: p.grad for n, p in trainer.model.named_parameters()})
    torch.testing.assert_close(results["fused"][0], results["response"][0], atol=1e-5, rtol=1e-5)
    for name, grad in results["response"][1].items():
        torch.testing.assert_close(results["fused"][1][name], grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("layout", ["mask", "cache"])
def test_a_response_never_sees_another(layout, tokenizer, model, tmp_path):
    trainer = make_trainer(tokenizer, model, tmp_path, prompt_sharing=layout)
    row = trainer.train_dataset[0]  # four responses
    changed = {**row, "completion_ids": [row["completion_ids"][0], [5, 6, 7, 8, 9, 10], *row["completion_ids"][2:]]}
    with torch.no_grad():
        before, _, _ = trainer._sequence_logps(trainer.model, trainer.data_collator([row]))
        after, _, _ = trainer._sequence_logps(trainer.model, trainer.data_collator([changed]))
    assert not torch.isclose(before[1], after[1])
    # log-probs of ~170: the changed response changes the row's length, and so the kernels' order of summation
    torch.testing.assert_close(after[[0, 2, 3]], before[[0, 2, 3]], atol=1e-5, rtol=1e-5)


def test_tokens_fed_by_each_layout():
    rows = [
        {"prompt_ids": list(range(1, 101)), "completion_ids": [[7] * 30, [8] * 50, [9] * 10], "rewards": [0, 1, 2]}
    ]
    ideal = 100 + 30 + 50 + 10
    shared = DataCollatorForSharedPrompt(pad_token_id=0)(rows)
    one_call_each = DataCollatorForPromptCache(pad_token_id=0, call_overhead_tokens=0)(rows)
    cache = DataCollatorForPromptCache(pad_token_id=0)(rows)
    padded = DataCollatorForKResponses(pad_token_id=0)(rows)
    assert int(shared["num_tokens"]) == ideal + 2  # one copy of the prompt's last token per extra response
    # prompt[:-1], then each response after the prompt's last token: the ideal plus one per response
    assert (
        sorted(one_call_each["response_calls"].tolist()) == [0, 1, 2] and int(one_call_each["num_tokens"]) == ideal + 2
    )
    # with a cost per call, responses share calls where the padding costs less: here all three in one
    assert cache["response_calls"].tolist() == [0, 0, 0] and int(cache["num_tokens"]) == 99 + 3 * 51
    assert int(padded["num_tokens"]) == 3 * 100 + 90 and padded["input_ids"].numel() == 3 * 150
    assert shared["completion_mask"].sum() == padded["completion_mask"].sum() == cache["response_lengths"].sum() == 90


def test_truncation_scores_the_same_tokens_in_every_layout():
    rows = [{"prompt_ids": [1, 2, 3], "completion_ids": [[4, 5, 6, 7], [8]], "rewards": [1.0, 0.0]}]
    shared = DataCollatorForSharedPrompt(pad_token_id=0, max_length=5)(rows)
    padded = DataCollatorForKResponses(pad_token_id=0, max_length=5)(rows)
    cache = DataCollatorForPromptCache(pad_token_id=0, max_length=5)(rows)
    assert shared["input_ids"].tolist() == [[1, 2, 3, 4, 5, 3, 8]]
    assert cache["response_input_ids"].tolist() == [[3, 4, 5], [3, 8, 0]]
    assert shared["completion_mask"].sum() == padded["completion_mask"].sum() == cache["response_lengths"].sum() == 3


def test_response_head_equals_trls_fused_head(tokenizer, model):
    """The response-only head gives TRL's fused head's log-probabilities, entropy and top-1 (float32, 1e-5), and the
    same gradients, also when chunks are recomputed in the backward pass instead of kept."""
    from trl_nca import scoring

    rows = [{"prompt_ids": [1, 5, 9], "completion_ids": [[20, 30, 40, 2], [50, 2]], "rewards": [1.0, 0.0]}] * 3
    batch = DataCollatorForKResponses(pad_token_id=0)(rows)
    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    fused_model, ours_model = copy.deepcopy(model), copy.deepcopy(model)
    add_fused_lm_head(fused_model, outputs=("log_probs", "entropy", "is_top1"))
    scoring.add_response_head(ours_model)
    fused = fused_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                        fused_lm_head=True)  # fmt: skip
    scored = labels[:, 1:] != -100
    fused.log_probs[scored].sum().backward()
    vocab_bytes = 4 * ours_model.config.vocab_size
    # kept whole; 4 tokens a chunk, kept; one token kept and the rest through TRL's chunked function (recomputed)
    for chunk_bytes, keep_bytes in [(scoring.CHUNK_BYTES, scoring.KEEP_BYTES), (4 * vocab_bytes, 1 << 30),
                                    (vocab_bytes, 1)]:  # fmt: skip
        ours_model.zero_grad()
        saved = scoring.CHUNK_BYTES, scoring.KEEP_BYTES
        scoring.CHUNK_BYTES, scoring.KEEP_BYTES = chunk_bytes, keep_bytes
        try:
            ours = ours_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels,
                              response_head=True)  # fmt: skip
            ours.log_probs.sum().backward()
        finally:
            scoring.CHUNK_BYTES, scoring.KEEP_BYTES = saved
        assert torch.equal(ours.labelled, scored)
        torch.testing.assert_close(ours.log_probs, fused.log_probs[scored], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.entropy, fused.entropy[scored], atol=1e-5, rtol=1e-5)
        assert torch.equal(ours.is_top1, fused.is_top1[scored].bool())
        for (name, a), (_, b) in zip(ours_model.named_parameters(), fused_model.named_parameters()):
            torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_a_copy_of_a_patched_model_runs_its_own_weights(tokenizer, model):
    """A reference model deep-copied from a policy a trainer has patched (a copy taken by a user's script or by the
    trainers when no reference is given) runs its own weights: TRL's `add_fused_lm_head` keeps the original forward
    in a closure, which a copy shares, so the copy's plain forward ran the policy; the trainers drop such a forward
    before patching, and ours keeps the original on the model, which a copy rebinds."""
    from trl_nca import scoring

    ids = torch.tensor([[1, 5, 9, 20, 30]])
    add_fused_lm_head(model, outputs=("log_probs",))
    scoring.add_response_head(model)
    before = model(input_ids=ids).logits
    copied = copy.deepcopy(model)
    with torch.no_grad():
        for parameter in copied.parameters():
            parameter.add_(0.5)
    torch.testing.assert_close(copied(input_ids=ids).logits, before)  # TRL's closure: the policy's forward
    scoring.drop_foreign_forward(copied)
    add_fused_lm_head(copied, outputs=("log_probs",))
    scoring.add_response_head(copied)
    assert not torch.allclose(copied(input_ids=ids).logits, before)
    expected = type(copied).forward(copied, input_ids=ids).logits
    torch.testing.assert_close(copied(input_ids=ids).logits, expected)
    torch.testing.assert_close(model(input_ids=ids).logits, before)
    # ours alone: a copy's plain and response-only forwards run the copy
    alone = build_model(tokenizer, seed=2)
    scoring.add_response_head(alone)
    own = copy.deepcopy(alone)
    with torch.no_grad():
        for parameter in own.parameters():
            parameter.add_(0.5)
    torch.testing.assert_close(own(input_ids=ids).logits, type(own).forward(own, input_ids=ids).logits)
    response = own(input_ids=ids, labels=ids, response_head=True).log_probs
    assert (response - alone(input_ids=ids, labels=ids, response_head=True).log_probs).abs().max() > 1e-3


def test_the_chunked_head_keeps_less_than_full_logits(tmp_path):
    """At a vocabulary of 150,000 (1,024 tokens), the response-only head as the trainers run it (chunks of logits, the
    first kept for the backward pass, the rest recomputed by TRL's chunked function) gives the full-logits head's
    log-probabilities and gradients, and raises the process's peak memory by less than half as much. Measured in a
    fresh process (tests/memory_job.py)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "head.json"
    job = Path(__file__).with_name("memory_job.py")
    result = subprocess.run([sys.executable, str(job), "head", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    peaks = json.loads(out.read_text())
    assert peaks["max_gap"] < 1e-4, peaks
    chunked, full = peaks["chunked_gb"] - peaks["start_gb"], peaks["full_gb"] - peaks["start_gb"]
    assert chunked < full / 2 and full > 1.0, peaks


def test_layout_choice_and_its_errors(tokenizer, model, tmp_path, caplog):
    assert choose_layout("auto", "sdpa", "keep_start").allowed == ("cache", "mask", "padded")
    assert choose_layout("on", "flash_attention_2", "keep_start").allowed == ("cache",)
    assert choose_layout("auto", "sdpa", "keep_end").allowed == ("padded",)
    assert choose_layout("auto", "sdpa", "keep_start", cache_blocker="sliding").allowed == ("mask", "padded")
    with pytest.raises(ValueError, match="prompt_sharing='mask' is not possible here \\(mask: attn_implementation="):
        choose_layout("mask", "flash_attention_2", "keep_start")
    with pytest.raises(ValueError, match="prompt_sharing='cache' is not possible here \\(cache: truncation_mode"):
        choose_layout("cache", "sdpa", "keep_end")
    with pytest.raises(ValueError, match="`prompt_sharing` must be one of"):
        choose_layout("sometimes", "sdpa", "keep_start")
    # In a trainer: flash_attention_2 keeps the cache and padded layouts, with one warning that says why
    with caplog.at_level(logging.WARNING, logger="trl_nca"):
        trainer = make_trainer(tokenizer, copy.deepcopy(model), tmp_path, attn="flash_attention_2")
    assert set(trainer.data_collator.collators) == {"cache", "padded"}
    warnings = [r.getMessage() for r in caplog.records if "Layouts for prompt_sharing='auto'" in r.getMessage()]
    assert len(warnings) == 1 and "'mask' is out: attn_implementation='flash_attention_2'" in warnings[0]
    with pytest.raises(ValueError, match="truncation_mode='keep_end'"):
        make_trainer(tokenizer, copy.deepcopy(model), tmp_path, prompt_sharing="cache", truncation_mode="keep_end")
    reentrant = {"use_reentrant": True}
    with pytest.raises(ValueError, match="reentrant gradient checkpointing drops the gradient"):
        make_trainer(tokenizer, copy.deepcopy(model), tmp_path, prompt_sharing="cache", gradient_checkpointing=True,
                     gradient_checkpointing_kwargs=reentrant)  # fmt: skip


def test_auto_builds_each_batch_in_the_cheapest_layout():
    shape = ModelShape(hidden_size=576, num_layers=30, body_params=106_000_000)
    long_prompt = [(120, [290, 250, 330, 300])]  # UltraFeedback-like: the prompt cache wins
    short_equal = [
        (2, [10, 10])
    ]  # a 2-token prompt and equal responses: the cache's extra calls cost more than they save
    costs = {name: layout_cost(name, long_prompt, shape) for name in ["padded", "mask", "cache"]}
    assert min(costs, key=costs.get) == "cache" and costs["padded"] > costs["cache"] * 1.2
    short = {name: layout_cost(name, short_equal, shape) for name in ["padded", "mask", "cache"]}
    assert min(short, key=short.get) == "mask" and short["cache"] > short["padded"]
    collator = DataCollatorForAnyLayout(
        {name: COLLATORS[name](0) for name in ["cache", "mask", "padded"]}, shape, max_length=None
    )
    rows = [{"prompt_ids": list(range(1, 121)), "completion_ids": [[5] * r for r in [290, 250, 330, 300]],
             "rewards": [1.0, 0.0, 2.0, 1.0]}]  # fmt: skip
    assert "prompt_input_ids" in collator(rows) and collator.counts == {"cache": 1}
    tiny = [{"prompt_ids": [1, 2], "completion_ids": [[5] * 10, [6] * 10], "rewards": [1.0, 0.0]}]
    assert collator(tiny)["input_ids"].shape == (1, 23) and collator.counts == {"cache": 1, "mask": 1}


@pytest.mark.parametrize("layout", ["mask", "cache"])
def test_works_with_lora_gradient_checkpointing_and_precomputed_reference(layout, tokenizer, model, tmp_path):
    losses = {}
    for sharing in ["off", layout]:
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
        losses[sharing] = [(e["loss"], e["grad_norm"]) for e in trainer.state.log_history if "loss" in e]
    assert abs(losses[layout][0][0] - 2 * math.log(2)) > 1e-3  # a random adapter: the policy is not the reference
    assert [v for pair in losses[layout] for v in pair] == pytest.approx(
        [v for pair in losses["off"] for v in pair], rel=1e-4
    )


@pytest.mark.parametrize("pack_rows", [False, True])
def test_flex_attention_block_mask_gives_the_log_probs_of_separate_forwards(pack_rows, tokenizer, model, tmp_path):
    """FlexAttention's forward runs on CPU (its backward, i.e. training, needs a GPU in torch 2.13)."""
    trainer = make_trainer(tokenizer, model, tmp_path, attn="flex_attention", prompt_sharing="mask")
    rows = [trainer.train_dataset[i] for i in range(5)]
    batch = DataCollatorForSharedPrompt(pad_token_id=tokenizer.pad_token_id, pack_rows=pack_rows)(rows)
    with torch.no_grad():
        policy, _, _ = trainer._sequence_logps(trainer.model, batch)
    model.config._attn_implementation = "sdpa"  # the independent computation
    torch.testing.assert_close(policy.double(), separate_logps(trainer.model, rows), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("wrap", [None, "lora"])
def test_reentrant_checkpointing_turned_on_on_the_model_itself(wrap, tokenizer, model, tmp_path):
    """Gradient checkpointing enabled on the model (reentrant, as PEFT's `prepare_model_for_kbit_training` does by
    default) with `args.gradient_checkpointing` off: reentrant checkpointing passes no gradient to the prompt's keys
    and values, so every layout `auto` may pick must give the gradients of `off`, and `cache` is refused up front."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    if wrap:
        model.enable_input_require_grads()  # as prepare_model_for_kbit_training does, so that LoRA gets gradients
        model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False))
    with pytest.raises(ValueError, match="cache: reentrant gradient checkpointing drops the gradient"):
        make_trainer(tokenizer, copy.deepcopy(model), tmp_path, prompt_sharing="cache")
    trainer = make_trainer(tokenizer, model, tmp_path, prompt_sharing="auto")
    trainer.model.train()
    rows = [trainer.train_dataset[i] for i in range(8)]
    weights = torch.linspace(-1, 1, 26)  # a loss that weighs every response differently
    grads, collators = {}, {"off": COLLATORS["padded"](tokenizer.pad_token_id), **trainer.data_collator.collators}
    for name, collator in collators.items():
        trainer.model.zero_grad()
        logps, _, _ = trainer._sequence_logps(trainer.model, collator(rows))
        (logps * weights[: len(logps)]).sum().backward()
        grads[name] = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    assert set(grads) == {"off", "mask", "padded"} and len(grads["off"]) > 0
    for name in ["mask", "padded"]:
        for param, grad in grads["off"].items():
            torch.testing.assert_close(grads[name][param], grad, atol=1e-5, rtol=1e-4, msg=f"{name}: {param}")
    # Turned on after the trainer was built: the prompt-cache forward refuses to drop the gradient silently
    cached = make_trainer(tokenizer, build_model(tokenizer), tmp_path, prompt_sharing="cache")
    cached.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    cached.model.train()
    with pytest.raises(ValueError, match="reentrant gradient checkpointing drops the gradient"):
        cached._sequence_logps(cached.model, cached.data_collator(rows))


def test_a_prompt_whose_last_tokens_merge_with_its_responses(tokenizer, model, tmp_path):
    """'Wh' + 'at ...' tokenizes as 'What ...': DPO's prompt/completion boundary (their common prefix) leaves the
    prompt no token of its own. The padded layout takes such a row; the prompt-sharing layouts cannot, so `auto` builds
    any batch holding one padded, and a layout that shares the prompt is refused up front, naming the row."""
    data = Dataset.from_list([
        {"prompt": "Write a poem about the sea. ", "completions": ["The sea and the stars.", "four", "hello"],
         "rewards": [1.0, 0.0, 0.5]},
        {"prompt": "Wh", "completions": ["at is two plus two?", "at is it?"], "rewards": [1.0, 0.0]},
    ])  # fmt: skip
    for sharing in ["on", "mask", "cache"]:
        with pytest.raises(ValueError, match=rf"Row 1, column 'prompt': .*no token of its own.*'{sharing}'"):
            NCATrainer(model=model, args=nca_args(tmp_path, prompt_sharing=sharing), train_dataset=data,
                       processing_class=tokenizer)  # fmt: skip
    trainer = NCATrainer(model=model, args=nca_args(tmp_path), train_dataset=data, processing_class=tokenizer)
    rows = [trainer.train_dataset[i] for i in range(2)]
    assert rows[1]["prompt_ids"] == [] and tokenizer.decode(rows[1]["completion_ids"][1]) == "What is it?<|im_end|>"
    with_a_prompt_token = {**rows[1], "prompt_ids": rows[1]["completion_ids"][0][:1]}
    assert trainer.data_collator.choose([rows[0], with_a_prompt_token]) != "padded"  # the cost model alone would share
    assert trainer.data_collator.choose(rows) == "padded"
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), rel=1e-5)  # policy == reference


def test_scored_positions_pick_what_the_boolean_mask_picks_also_after_virtual_positions():
    """`scoring.scored_positions` (made on the host) and `at_positions` give the entries a boolean mask of the shifted
    labels gives, in the same order, also on a grid that prompt-learning PEFT widened with virtual positions on the
    left; and the prompt-cache owner of each token, sized from the host's plan, is the one without the size."""
    from trl_nca.layouts import DataCollatorForPromptCache
    from trl_nca.layouts.prompt_cache import response_owner
    from trl_nca.scoring import at_positions, scored_positions

    completion_mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 1, 1], [0, 0, 0, 0, 0]])
    grid = torch.randn(3, 4, 6)  # (S, L-1, hidden): one value per shifted label position
    positions = scored_positions(completion_mask)
    expected = grid[completion_mask[:, 1:].bool()]
    torch.testing.assert_close(at_positions(grid, positions), expected, rtol=0, atol=0)
    widened = torch.cat([torch.randn(3, 7, 6), grid], dim=1)  # 7 virtual positions in front
    torch.testing.assert_close(at_positions(widened, positions), expected, rtol=0, atol=0)
    batch = DataCollatorForPromptCache(pad_token_id=0)(
        [{"prompt_ids": [1, 2], "completion_ids": [[3, 4, 5], [6]], "rewards": [1.0, 0.0]}]
    )
    unsized = dict(batch, cache_plan=None)
    assert response_owner(batch).tolist() == response_owner(unsized).tolist() == [0, 0, 0, 1]
