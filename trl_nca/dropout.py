"""Turning dropout off everywhere in a model, the functional kind included."""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel
from trl.trainer.utils import disable_dropout_in_model


def disable_dropout(model: torch.nn.Module) -> None:
    """TRL's `disable_dropout_in_model` (every `nn.Dropout` to p = 0), plus the dropout that models apply
    functionally from a float attribute: transformers' attention modules pass `self.attention_dropout` to the attention
    function while training (Llama, Mistral, Qwen, Mixtral, ...), which no `nn.Dropout` module holds. Every float
    attribute with "dropout" in its name, on each module and on each (sub-)config, is set to 0.

    Why it matters here: the sampler reference and the old log-probabilities are forwards of their own; with dropout on
    they see another mask than the policy forward, so log pi_theta - log pi_ref is noise where it should be 0.

    `model` may come wrapped: under DeepSpeed, TRL hands the reference model over already inside an engine, whose own
    `config` is DeepSpeed's settings (a dict), not a model's; the wrapper is taken off and the model inside changed.
    """
    model = extract_model_from_parallel(model)  # a DeepSpeed engine (or DDP) -> the model it runs
    disable_dropout_in_model(model)
    configs = []
    for module in model.modules():
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float) and value != 0.0:
                setattr(module, name, 0.0)
        config = getattr(module, "config", None)
        if _is_model_config(config) and all(config is not seen for seen in configs):
            configs.append(config)
    while configs:
        config = configs.pop()
        for name, value in list(vars(config).items()):
            if "dropout" in name and isinstance(value, float) and value != 0.0:
                setattr(config, name, 0.0)
            elif _is_model_config(value):  # a sub-config (text_config, ...)
                configs.append(value)


def _is_model_config(value) -> bool:
    """A transformers config (a `PretrainedConfig` or one shaped like it), not any attribute named `config`."""
    return hasattr(value, "to_dict") and hasattr(value, "model_type")


def has_active_dropout(model: torch.nn.Module) -> bool:
    """Whether some dropout of `model` (a module or a functional float attribute) is still above 0."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout) and module.p > 0:
            return True
        if any("dropout" in name and isinstance(value, float) and value > 0 for name, value in vars(module).items()):
            return True
    return False
