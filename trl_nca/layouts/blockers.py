"""What rules a layout out for a model, whatever the batch: its architecture, attention, checkpointing, sharding and
PEFT. Each reason names the model's feature; docs/architectures.md lists what each architecture gets."""

from __future__ import annotations

import inspect
import re

from accelerate.utils import is_peft_model

from ..scoring import REENTRANT_CHECKPOINTING, reentrant_checkpointing

# Layer kinds (`layer_types` and its older names) that attend to every earlier token, and those that attend to a
# window of them
FULL_ATTENTION = ("full_attention", "attention", "global", "full", "global_attention")
WINDOWED = ("sliding", "chunked", "local")
# Class names of sequence-mixing modules that carry a state along the sequence (convolutions, state-space and
# linear-attention scans, recurrences), for models whose config does not list its layer kinds
_STATEFUL_MODULES = re.compile(
    r"Mamba|Mixer|ShortConv|DeltaNet|LinearAttention|Lightning|Rwkv|RWKV|Recurrent|SSM|xLSTM"
)
# Vision-language models whose prompt attends both ways (prefix-LM, `token_type_ids`), where these layouts encode the
# prompt causally once
PREFIX_LM = ("paligemma",)


def sharded_parameters(trainer) -> bool:
    """Whether a trainer's parameters are sharded and gathered per forward (FSDP, DeepSpeed ZeRO-3)."""
    return bool(
        trainer.is_fsdp_enabled
        or (trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    )


# Why `auto` leaves the prompt-cache layout out under DeepSpeed ZeRO-1/2
RANKS_REDUCE_IN_STEP = (
    "DeepSpeed ZeRO-1/2 reduce gradients bucket by bucket in the order they become ready, which must be the same on "
    "every rank; 'auto' picks a layout per batch on each rank, and this layout's forwards (one per prompt and per "
    "call) ready them in another order than the one-forward layouts (set prompt_sharing='cache' to run it on every "
    "rank)"
)


def ranks_in_step(trainer) -> bool:
    """Whether the trainer's engine needs every rank to ready its gradients in the same order (DeepSpeed ZeRO-1/2,
    whose gradient buckets are reduced as they fill; DDP reduces its buckets in a fixed order, ZeRO-3 and FSDP rule
    the layout out anyway)."""
    return bool(trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage in (1, 2))


def _layer_kinds(config) -> list[str]:
    for name in ("layer_types", "layers_block_type", "attention_layers"):
        kinds = getattr(config, name, None)
        if isinstance(kinds, (list, tuple)) and kinds:
            return [str(kind) for kind in kinds]
    return []


def windowed_attention(config) -> str | None:
    """The model's attention windows in words (sliding, chunked or local layers), or None. transformers applies a
    window only to the masks it builds itself: a custom 4D mask is used as given. (On top of a cache it builds the
    mask itself, so the prompt-cache layout keeps the window.)"""
    config = config.get_text_config()
    kinds = _layer_kinds(config)
    window = next(
        (getattr(config, name) for name in ("sliding_window", "window_size", "attention_chunk_size")
         if getattr(config, name, None)),
        None,
    )  # fmt: skip
    windowed = sorted({kind for kind in kinds if any(w in kind for w in WINDOWED)})
    if windowed:
        return f"its {' and '.join(windowed)} layers attend to a window of {window} tokens"
    if not kinds and getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return f"it has sliding-window attention ({config.sliding_window} tokens)"
    if getattr(config, "attention_chunk_size", None):
        return f"it has chunked attention ({config.attention_chunk_size} tokens)"
    return None


def stateful_layers(model) -> str | None:
    """The model's layers that are not attention (convolutions, state-space, linear-attention or recurrent layers)
    in words, or None. Such a layer carries a state along the sequence that neither a 4D mask nor a cache of the
    prompt's keys and values keeps apart per response."""
    kinds = _layer_kinds(model.config.get_text_config())
    other = sorted({kind for kind in kinds if kind not in FULL_ATTENTION and not any(w in kind for w in WINDOWED)})
    if other:
        return f"its {' and '.join(other)} layers carry a state along the sequence"
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    modules = sorted({
        type(m).__name__ for m in decoder.modules()
        if type(m).__module__.startswith("transformers.models.") and _STATEFUL_MODULES.search(type(m).__name__)
    })  # fmt: skip
    if modules:
        return f"its {', '.join(modules)} modules carry a state along the sequence"
    return None


def cache_blocker(model, args, *, sharded: bool, ranks_in_step: bool = False, setting: str = "auto") -> str | None:
    """Why the prompt-cache layout cannot run on `model` with training arguments `args`, or None (beyond
    `shared_blocker`, which rules out both prompt-sharing layouts). `ranks_in_step`: the engine needs the same
    forwards on every rank, which `auto` (the `setting`) does not promise."""
    # Trainer.train turns checkpointing on as `args` say, over the model's own setting; without it, the model's own
    # setting (e.g. from PEFT's prepare_model_for_kbit_training) is what runs
    if args.gradient_checkpointing:
        reentrant = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    else:
        reentrant = reentrant_checkpointing(model)
    if reentrant:
        return REENTRANT_CHECKPOINTING
    if sharded:
        return (
            "DeepSpeed ZeRO-3 and FSDP gather sharded parameters in every forward, in step on all ranks, and this "
            "layout's number of forwards varies by batch"
        )
    if ranks_in_step and setting == "auto":
        return RANKS_REDUCE_IN_STEP
    return None


def mask_blocker(model) -> str | None:
    """Why the shared-prompt layout (one sequence per row, a 4D mask, positions that restart per response) cannot
    run on `model`, or None (beyond `shared_blocker`): windowed attention, no position ids, ALiBi."""
    config = model.config.get_text_config()
    if window := windowed_attention(config):
        return f"{config.model_type}: {window}, which a custom 4D mask does not apply"
    backbone = model.get_base_model() if is_peft_model(model) else model
    if "position_ids" not in inspect.signature(backbone.base_model.forward).parameters:
        return f"{config.model_type} takes no position ids (its position biases come from a 2D attention mask)"
    if getattr(config, "alibi", False):
        return f"{config.model_type} builds its ALiBi position biases from a 2D attention mask"
    return None


def shared_blocker(model) -> str | None:
    """Why neither prompt-sharing layout can run on `model`, or None."""
    if is_peft_model(model) and model.peft_config[model.active_adapter].is_prompt_learning:
        return (
            "prompt-learning PEFT puts virtual tokens (or their keys and values) and a 2D attention mask before each "
            "sequence of a forward, where these layouts have a prompt to share or a 4D mask"
        )
    config = model.config
    if config.model_type in PREFIX_LM:
        return f"{config.model_type} is a prefix-LM: its prompt attends both ways, these layouts encode it causally"
    text = config.get_text_config()
    if state := stateful_layers(model):
        return f"{text.model_type}: {state}, which these layouts do not keep apart per response"
    return None
