"""What rules a layout out for a model, whatever the batch: its attention, checkpointing, sharding and PEFT."""

from __future__ import annotations

from accelerate.utils import is_peft_model

from ..scoring import REENTRANT_CHECKPOINTING, reentrant_checkpointing


def sharded_parameters(trainer) -> bool:
    """Whether a trainer's parameters are sharded and gathered per forward (FSDP, DeepSpeed ZeRO-3)."""
    return bool(
        trainer.is_fsdp_enabled
        or (trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3)
    )


def cache_blocker(model, args, *, sharded: bool) -> str | None:
    """Why the prompt-cache layout cannot run on `model` with training arguments `args`, or None."""
    config = model.config.get_text_config()
    layer_types = getattr(config, "layer_types", None) or []
    if (
        getattr(config, "sliding_window", None)
        and getattr(config, "use_sliding_window", True)
        or any("sliding" in str(kind) for kind in layer_types)
    ):
        return "the model has sliding-window attention layers"
    # Trainer.train turns checkpointing on as `args` say, over the model's own setting; without it, the model's own
    # setting (e.g. from PEFT's prepare_model_for_kbit_training) is what runs
    if args.gradient_checkpointing:
        reentrant = (args.gradient_checkpointing_kwargs or {}).get("use_reentrant")
    else:
        reentrant = reentrant_checkpointing(model)
    if reentrant:
        return REENTRANT_CHECKPOINTING
    if sharded:
        return "sharded parameters are gathered per forward, and this layout's number of forwards varies by batch"
    return None


def shared_blocker(model) -> str | None:
    """Why neither prompt-sharing layout can run on `model`, or None."""
    if is_peft_model(model) and model.peft_config[model.active_adapter].is_prompt_learning:
        return (
            "prompt-learning PEFT puts virtual tokens (or their keys and values) and a 2D attention mask before each "
            "sequence of a forward, where these layouts have a prompt to share or a 4D mask"
        )
    return None
