"""Canonical K-response rows -> token ids: the prompt once, then each response after it.

The prompt/completion boundary follows `DPOTrainer._prepare_dataset`: each response is tokenized together with the
prompt, and the response starts where that sequence and the tokenized prompt diverge (see TRL's
`common_prefix_length`), so chat templates that render the prompt differently alone still split correctly.
"""

from __future__ import annotations

import json

from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import common_prefix_length

logger = logging.get_logger(__name__)


def _token_ids(tokenizer: PreTrainedTokenizerBase, text_or_messages, **chat_kwargs) -> list[int]:
    if isinstance(text_or_messages, list):  # conversational: a list of messages
        return list(
            tokenizer.apply_chat_template(text_or_messages, tokenize=True, return_dict=True, **chat_kwargs)[
                "input_ids"
            ]
        )
    return list(tokenizer(text=text_or_messages)["input_ids"])


def tokenize_k_responses(example: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    """Token ids of one canonical row: `prompt_ids` (list of ints) and `completion_ids` (K lists of ints).

    Text responses get the EOS token appended when they lack it, as DPOTrainer does, so the model learns to stop.
    """
    prompt, completions = example["prompt"], example["completions"]
    tools = example.get("tools")
    chat_kwargs = {
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        **(example.get("chat_template_kwargs") or {}),
    }
    if isinstance(prompt, list):
        prompt_ids = _token_ids(tokenizer, prompt, add_generation_prompt=True, **chat_kwargs)
        full_ids = [_token_ids(tokenizer, prompt + completion, **chat_kwargs) for completion in completions]
    else:
        eos = tokenizer.eos_token
        prompt_ids = _token_ids(tokenizer, prompt)
        full_ids = [
            _token_ids(tokenizer, prompt + (completion if completion.endswith(eos) else completion + eos))
            for completion in completions
        ]
    prompt_len = min(common_prefix_length(prompt_ids, ids) for ids in full_ids)
    if prompt_len < len(prompt_ids):
        logger.warning_once(
            "The tokenized prompt is not a prefix of the tokenized prompt+response (the chat template renders the "
            "prompt alone differently, or tokens merge across the boundary). Each response starts where they "
            f"diverge; this end of the prompt is left out of training: {tokenizer.decode(prompt_ids[prompt_len:])!r}"
        )
    return {"prompt_ids": prompt_ids[:prompt_len], "completion_ids": [ids[prompt_len:] for ids in full_ids]}
