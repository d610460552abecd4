"""The TRL-private contracts the trainers rely on, pinned against the installed TRL.

The trainers override or call private DPOTrainer methods (written against TRL 1.16.0). When a TRL upgrade changes
one, a test here fails with a message that names the contract, instead of a user's run failing somewhere inside
training. Each contract is a signature and, where the trainers depend on it, a behaviour.
"""

import inspect

import pytest
import torch
import trl
from helpers import k_response_dataset, nca_args
from trl import DPOTrainer, GRPOTrainer
from trl.trainer import utils as trl_utils

from trl_nca import NCATrainer, OnlineNCATrainer

# (owner, name, parameter names) of every TRL callable the trainers override or call
SIGNATURES = [
    (DPOTrainer, "__init__", ["self", "model", "ref_model", "args", "data_collator", "train_dataset", "eval_dataset",
                              "processing_class", "compute_metrics", "callbacks", "optimizers", "quantization_config",
                              "peft_config"]),
    (DPOTrainer, "_prepare_dataset", ["self", "dataset", "processing_class", "args", "dataset_name"]),
    (DPOTrainer, "_precompute_ref_logps", ["self", "dataset", "name", "batch_size"]),
    (DPOTrainer, "compute_ref_log_probs", ["self", "model", "inputs"]),
    (DPOTrainer, "_set_signature_columns_if_needed", ["self"]),
    (DPOTrainer, "compute_loss", ["self", "model", "inputs", "return_outputs", "num_items_in_batch"]),
    (trl_utils, "add_fused_lm_head", ["model", "temperature", "cast_lm_head_to_fp32", "outputs"]),
    (trl_utils, "use_adapter", ["model", "adapter_name"]),
    (trl_utils, "global_then_local_main_first", []),
    (trl_utils, "get_config_model_id", ["config"]),
    (trl.models.utils, "disable_gradient_checkpointing", ["model", "gradient_checkpointing_kwargs"]),
    (trl.data_utils, "common_prefix_length", ["ids", "other_ids"]),
    # The online trainers (GRPOTrainer)
    (GRPOTrainer, "__init__", ["self", "model", "reward_funcs", "args", "train_dataset", "eval_dataset",
                               "processing_class", "reward_processing_classes", "callbacks", "optimizers",
                               "quantization_config", "peft_config", "tools", "rollout_func", "environment_factory"]),
    (GRPOTrainer, "_calculate_rewards", ["self", "inputs", "prompts", "completions", "completion_ids_list"]),
    (GRPOTrainer, "_generate_and_score_completions", ["self", "inputs"]),
    (GRPOTrainer, "_prepare_inputs", ["self", "generation_batch"]),
    (GRPOTrainer, "_compute_loss", ["self", "model", "inputs"]),
    (GRPOTrainer, "_get_train_sampler", ["self", "dataset"]),
    (GRPOTrainer, "_get_per_token_logps_and_entropies",
     ["self", "model", "input_ids", "attention_mask", "logits_to_keep", "batch_size", "compute_entropy",
      "compute_aux_loss", "pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask", "spatial_shapes",
      "num_tiles", "image_sizes", "token_type_ids", "mm_token_type_ids", "image_position_ids"]),
    (GRPOTrainer, "_save_checkpoint", ["self", "model", "trial"]),
    (GRPOTrainer, "_load_optimizer_and_scheduler", ["self", "checkpoint"]),
    (trl_utils.RepeatSampler, "__init__", ["self", "data_source", "mini_repeat_count", "batch_size", "repeat_count",
                                           "shuffle", "seed"]),
    (trl_utils, "split_tensor_dict", ["tensor_dict", "num_chunks"]),
    (trl_utils, "split_pixel_values_by_grid", ["batch"]),
    (trl_utils, "unsplit_pixel_values_by_grid", ["batch"]),
    (trl_utils, "disable_dropout_in_model", ["model"]),
]  # fmt: skip


@pytest.mark.parametrize("owner, name, expected", SIGNATURES, ids=lambda x: x if isinstance(x, str) else "")
def test_signature(owner, name, expected):
    where = f"{getattr(owner, '__name__', owner)}.{name}"
    assert hasattr(owner, name), f"TRL contract broken: {where} is gone (trl {trl.__version__}; written for 1.16.0)"
    found = list(inspect.signature(getattr(owner, name)).parameters)
    assert found == expected, (
        f"TRL contract broken: the signature of {where} changed from {expected} to {found} (trl {trl.__version__}; "
        "trl_nca mirrors 1.16.0)"
    )


def test_dpo_init_calls_prepare_dataset_and_precompute_with_the_arguments_we_override(tokenizer, model, tmp_path):
    """DPOTrainer.__init__ prepares each dataset through `_prepare_dataset(dataset, processing_class, args, name)`,
    then, with `precompute_ref_log_probs`, calls `_precompute_ref_logps(dataset, name, batch_size)` once the pad token
    and the models are set."""
    calls = []

    class Recording(NCATrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            calls.append(("prepare", dataset_name, processing_class is tokenizer))
            return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

        def _precompute_ref_logps(self, dataset, name, batch_size):
            calls.append(("precompute", name, batch_size, self._tokenizer.pad_token_id is not None))
            return super()._precompute_ref_logps(dataset, name, batch_size)

    data = k_response_dataset(counts=(2, 3))
    trainer = Recording(
        model=model,
        args=nca_args(tmp_path, precompute_ref_log_probs=True, precompute_ref_batch_size=3),
        train_dataset=data,
        eval_dataset=data,
        processing_class=tokenizer,
    )
    assert calls == [
        ("prepare", "train", True),
        ("prepare", "eval", True),
        ("precompute", "train", 3, True),
        ("precompute", "eval", 3, True),
    ], "TRL contract broken: DPOTrainer.__init__ no longer prepares and precomputes as trl_nca expects"
    # The attributes of DPOTrainer that the overrides read
    read = ["_tokenizer", "aux_loss_enabled", "router_aux_loss_coef", "precompute_ref_logps", "beta"]
    read += ["_precompute_model_hash", "_precompute_engine", "_metrics", "_total_train_tokens", "_tp_size"]
    for name in read:
        assert hasattr(trainer, name), f"TRL contract broken: DPOTrainer no longer sets `self.{name}`"


def test_fused_lm_head_returns_per_token_log_probs_entropy_and_top1(tokenizer, model):
    """`model(..., labels, fused_lm_head=True)` after `add_fused_lm_head` returns the log-probability of each
    next-token label `(B, L-1)`, zero where the label is -100, and `entropy` and `is_top1` of the same shape."""
    ids = torch.tensor([[5, 9, 14, 20, 7], [3, 11, 12, 0, 0]])
    labels = ids.masked_fill(torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 0, 0]]) == 0, -100)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
        trl_utils.add_fused_lm_head(model, outputs=("log_probs", "entropy", "is_top1"))
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    expected = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    expected = expected.masked_fill(labels[:, 1:] == -100, 0.0)
    message = "TRL contract broken: the fused LM head's outputs changed"
    assert out.log_probs.shape == (2, 4) and out.entropy.shape == (2, 4) and out.is_top1.shape == (2, 4), message
    torch.testing.assert_close(out.log_probs.double(), expected, atol=1e-5, rtol=0, msg=message)
    top1 = logits[:, :-1].argmax(-1) == ids[:, 1:]
    assert torch.equal(out.is_top1.bool(), top1 & (labels[:, 1:] != -100)), message


def test_grpo_scoring_returns_what_the_online_trainers_read(tokenizer, tmp_path):
    """`_generate_and_score_completions` returns the padded prompt and completion ids and masks, the reference
    per-token log-probabilities when `beta` is not 0; `_calculate_rewards` returns the gathered (completions,
    functions) rewards; `_get_per_token_logps_and_entropies` returns `(logps, entropies, aux_loss)` per completion
    token; the completions table's advantages are one per completion."""
    from conftest import build_model
    from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset

    trainer = OnlineNCATrainer(
        model=build_model(tokenizer),
        reward_funcs=length_reward,
        args=online_args(tmp_path, reference="initial", num_generations=2),
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        rollout_func=deterministic_rollout,
    )
    message = "TRL contract broken: GRPOTrainer's scoring output changed"
    batch = trainer._generate_and_score_completions([trainer.train_dataset[i] for i in (0, 0, 1, 1)])
    for key in ["prompt_ids", "prompt_mask", "completion_ids", "completion_mask", "ref_per_token_logps"]:
        assert isinstance(batch.get(key), torch.Tensor) and batch[key].size(0) == 4, (message, key)
    assert batch["ref_per_token_logps"].shape == batch["completion_ids"].shape, message
    assert trainer._rewards_per_func.shape == (4, 1), message
    assert len(trainer._logs["advantages"]) == 4, message
    logps, entropies, aux = trainer._get_per_token_logps_and_entropies(
        trainer.model,
        torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1),
        torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1),
        batch["completion_ids"].size(1),
        compute_entropy=True,
    )
    assert logps.shape == entropies.shape == batch["completion_ids"].shape and aux is None, message


def test_transformers_cache_hooks_the_prompt_cache_layout_relies_on(tokenizer, model):
    """The prompt-cache layout passes its own caches to the decoder (as `cache`, or `past_key_values` before) and
    marks the layers `_can_checkpoint_with_cache` so that gradient checkpointing keeps them."""
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.llama.modeling_llama import LlamaModel

    assert hasattr(GradientCheckpointingLayer, "_can_checkpoint_with_cache"), (
        "transformers contract broken: GradientCheckpointingLayer._can_checkpoint_with_cache is gone"
    )
    parameters = inspect.signature(LlamaModel.forward).parameters
    assert "cache" in parameters or "past_key_values" in parameters, "transformers contract broken: no cache argument"


# --- behaviour pins of what the online trainers still copy from GRPOTrainer (TRL 1.16.0) --------------------------


def _online_trainer(tokenizer, tmp_path, **overrides):
    from conftest import build_model
    from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset

    return OnlineNCATrainer(
        model=build_model(tokenizer),
        reward_funcs=length_reward,
        args=online_args(tmp_path, **overrides),
        train_dataset=prompts_dataset(8),
        processing_class=tokenizer,
        rollout_func=deterministic_rollout,
    )


def test_our_prepare_inputs_with_the_group_shuffle_off_gives_grpos_buffers(tokenizer, tmp_path, monkeypatch):
    """Our `_prepare_inputs` is GRPO's with one change, the shuffle by whole groups: with a shuffle unit of one
    completion it must buffer exactly what GRPO's buffers (same RNG draws), slice for slice."""
    trainer = _online_trainer(tokenizer, tmp_path, num_generations=2, per_device_train_batch_size=2,
                              steps_per_generation=2)  # fmt: skip
    rows = [trainer.train_dataset[i] for i in (0, 0, 1, 1)]
    scored = trainer._generate_and_score_completions(rows)
    monkeypatch.setattr(trainer, "_generate_and_score_completions", lambda inputs: dict(scored))
    monkeypatch.setattr(trainer, "_shuffle_unit", lambda size: 1)
    buffers = {}
    for name, prepare in [("grpo", GRPOTrainer._prepare_inputs), ("ours", type(trainer)._prepare_inputs)]:
        torch.manual_seed(3)
        trainer._step, trainer._buffered_inputs = 0, None
        first = prepare(trainer, rows)
        trainer._step = 1
        buffers[name] = [first, prepare(trainer, rows)]
    message = "TRL contract broken: GRPOTrainer._prepare_inputs buffers differently from trl_nca's copy"
    for theirs, ours in zip(buffers["grpo"], buffers["ours"]):
        assert set(theirs) == set(ours), message
        for key, value in theirs.items():
            same = torch.equal(value, ours[key]) if isinstance(value, torch.Tensor) else value == ours[key]
            assert same, (message, key)
    assert not torch.equal(buffers["ours"][0]["completion_ids"], buffers["ours"][1]["completion_ids"])


def test_our_train_sampler_is_grpos_for_the_first_epoch(tokenizer, tmp_path):
    """The epoch-seeded sampler must draw GRPO's order in the first epoch (later epochs are reseeded)."""
    trainer = _online_trainer(tokenizer, tmp_path, num_generations=2, per_device_train_batch_size=4)
    ours = list(trainer._get_train_sampler())
    theirs = list(GRPOTrainer._get_train_sampler(trainer))
    assert ours == theirs and len(set(ours)) == 8, "TRL contract broken: GRPOTrainer's train sampler changed"


def test_our_reference_copy_is_set_up_as_grpos_reference(tokenizer, tmp_path):
    """`_prepare_reference` mirrors what GRPOTrainer.__init__ does to its own reference model: the fused head (log-
    probs of the completion tokens), no dropout, evaluation mode, no gradient. Compared on one batch with GRPO's
    reference built from the same weights (GRPO reloads it from a folder)."""
    from conftest import build_model
    from online_helpers import deterministic_rollout, length_reward, prompts_dataset
    from trl import GRPOConfig

    from trl_nca.online_trainer import _OnlineKResponseTrainer

    folder = tmp_path / "policy"
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = dict(use_cpu=True, bf16=False, report_to=[], num_generations=2, max_completion_length=6,
                    per_device_train_batch_size=4, beta=0.5)  # fmt: skip
    grpo = GRPOTrainer(
        model=str(folder),
        reward_funcs=length_reward,
        args=GRPOConfig(str(tmp_path / "g"), **settings),
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        rollout_func=deterministic_rollout,
    )
    ours = _OnlineKResponseTrainer._prepare_reference(grpo, build_model(tokenizer))  # the same weights (seed 0)
    batch = grpo._generate_and_score_completions([grpo.train_dataset[i] for i in (0, 0, 1, 1)])
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    keep = batch["completion_ids"].size(1)
    with torch.no_grad():
        theirs, _, _ = grpo._get_per_token_logps_and_entropies(grpo.ref_model, ids, mask, keep)
        mine, _, _ = grpo._get_per_token_logps_and_entropies(ours, ids, mask, keep)
    message = "TRL contract broken: GRPOTrainer sets up its reference model differently from trl_nca's copy"
    torch.testing.assert_close(mine, theirs, atol=1e-5, rtol=1e-5, msg=message)
    assert ours.training == grpo.ref_model.training, message
