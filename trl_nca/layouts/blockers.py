"""What rules a layout out for a model, whatever the batch: its architecture, attention, checkpointing, sharding and
PEFT. Each reason names the model's feature; docs/architectures.md lists what each architecture gets."""

from __future__ import annotations

import functools
import inspect
import re
from dataclasses import dataclass

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


# Model types whose state layers (convolutions, state-space and linear-attention scans) the prompt-cache layout
# continues from the prompt's final state, each shown equal to the model's own forward, values and gradients, offline
# and online, by the architecture matrix: LFM2's short convolutions, Qwen3-Next's and Qwen3.5's gated DeltaNet, the
# Mamba-2 layers of Bamba, Falcon-H1 and GraniteMoeHybrid. Jamba's Mamba layers give other gradients that way, and
# MiniMax runs a cache of its own
STATES_CONTINUED = ("lfm2", "qwen3_next", "qwen3_5_text", "bamba", "falcon_h1", "granitemoehybrid")


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


@dataclass(frozen=True)
class Windows:
    """How the shared-prompt layout's mask carries a model's attention windows (transformers applies a window only
    to the masks it builds itself, a 4D mask is used as given): `window` in every layer's mask (every layer attends
    to a window), or one mask per layer type (`by_type`: layer type -> its window, None for full attention), for a
    model whose forward takes `attention_mask` as such a dict."""

    window: int | None = None
    by_type: dict | None = None


def _window(config) -> int | None:
    return next((getattr(config, name) for name in ("sliding_window", "window_size")
                 if getattr(config, name, None)), None)  # fmt: skip


@functools.cache
def _forward_source(model_class: type) -> str:
    try:
        return inspect.getsource(model_class.forward)
    except (OSError, TypeError):
        return ""


def _takes_masks_by_layer_type(model) -> bool:
    """Whether the model's forward takes `attention_mask` as a dict of masks by layer type (the transformers 5 text
    models that build one mask per layer type: Gemma 2 and 3, gpt-oss, Cohere 2, Qwen2, ...), through a
    vision-language wrapper that passes it on or takes it the same way."""
    backbone = model.get_base_model() if is_peft_model(model) else model
    outer = backbone.base_model
    text = getattr(outer, "language_model", outer)
    pattern = "causal_mask_mapping := attention_mask"
    source = _forward_source(type(outer))
    passes_on = pattern in source or ("create_causal_mask" not in source and "create_masks" not in source)
    return pattern in _forward_source(type(text)) and (outer is text or passes_on)


def attention_windows(model, longest: int | None = None) -> tuple[Windows | None, str | None]:
    """`(windows, None)`: the attention windows the shared-prompt layout's mask must carry for `model` (None: none
    can apply), or `(None, why)` where they cannot be expressed. `longest`: the longest sequence the run can build
    (None: the model's context); a window at least that long never applies."""
    config = model.config.get_text_config()
    if getattr(config, "attention_chunk_size", None):
        return None, f"it has chunked attention ({config.attention_chunk_size} tokens)"
    window = _window(config)
    kinds = _layer_kinds(config)
    windowed = sorted({kind for kind in kinds if any(w in kind for w in WINDOWED)})
    every_layer = not kinds and window and getattr(config, "use_sliding_window", True)
    if not (windowed or every_layer):
        return None, None
    bound = longest if longest is not None else getattr(config, "max_position_embeddings", None)
    if window and bound is not None and window >= bound:
        return None, None  # the window is as long as any sequence: it never applies
    if every_layer or set(kinds) == set(windowed):
        return Windows(window=window), None
    if window and _takes_masks_by_layer_type(model):
        return Windows(by_type={kind: window if kind in windowed else None for kind in dict.fromkeys(kinds)}), None
    return None, (
        f"its {' and '.join(windowed)} layers attend to a window of {window} tokens and its other layers to every "
        "earlier token, and its forward takes one mask for all of them"
    )


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


def length_dependent_rope(config) -> tuple[str, int] | None:
    """`(rope type, length)` where the model's rotary frequencies depend on the largest position id of a forward
    (`dynamic`: rescaled past `max_position_embeddings`; `longrope`: the long factors past
    `original_max_position_embeddings`), or None. transformers reads that largest position over the whole batch of a
    forward, so what a token gets depends on the longest sequence it is computed with."""
    config = config.get_text_config()
    parameters = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    # one dict, or one per layer type (Gemma 3: full_attention, sliding_attention)
    each = (
        list(parameters.values())
        if parameters and all(isinstance(v, dict) for v in parameters.values())
        else [parameters]
    )
    for rope in each:
        kind = str(rope.get("rope_type") or rope.get("type") or "")
        if "dynamic" in kind:
            return kind, config.max_position_embeddings
        if kind == "longrope":
            return kind, rope.get("original_max_position_embeddings") or config.original_max_position_embeddings
    return None


def rope_blocker(model, longest: int | None) -> str | None:
    """Why the prompt-cache layout cannot give `model` its own frequencies: its rotary frequencies depend on the
    largest position of a forward (`length_dependent_rope`), and this layout runs a row in several forwards (the
    prompt, then its responses), each with its own largest position; None where the run's sequences (`longest`
    tokens at most, None: unbounded) never reach the length where they change."""
    rope = length_dependent_rope(model.config)
    if rope is None or (longest is not None and longest <= rope[1]):
        return None
    kind, length = rope
    bound = "the run's sequences have no length bound" if longest is None else f"sequences of up to {longest} tokens"
    return (
        f"{model.config.get_text_config().model_type}: its {kind} rotary frequencies change with the longest position "
        f"of a forward past {length} tokens ({bound}), and this layout runs the prompt and its responses in "
        "separate forwards"
    )


def cache_blocker(
    model, args, *, sharded: bool, ranks_in_step: bool = False, setting: str = "auto", longest: int | None = None
) -> str | None:
    """Why the prompt-cache layout cannot run on `model` with training arguments `args`, or None (beyond
    `shared_blocker`, which rules out both prompt-sharing layouts). `ranks_in_step`: the engine needs the same
    forwards on every rank, which `auto` (the `setting`) does not promise. `longest`: the longest sequence the run
    can build (None: unbounded), for `rope_blocker`."""
    if why := rope_blocker(model, longest):
        return why
    text = model.config.get_text_config()
    state = stateful_layers(model)
    if state and text.model_type not in STATES_CONTINUED:
        return (
            f"{text.model_type}: {state}, and continuing them from the prompt's final state is not shown to give its "
            "own forward's values (docs/architectures.md)"
        )
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


def mask_blocker(model, longest: int | None = None) -> str | None:
    """Why the shared-prompt layout (one sequence per row, a 4D mask, positions that restart per response) cannot
    run on `model`, or None (beyond `shared_blocker`): windows its mask cannot carry (`attention_windows`; `longest`
    as there), no position ids, ALiBi."""
    config = model.config.get_text_config()
    if state := stateful_layers(model):
        return f"{config.model_type}: {state}, which one sequence per row carries from one response into the next"
    _, why = attention_windows(model, longest)
    if why:
        return f"{config.model_type}: {why}"
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
    return None
