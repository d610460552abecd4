"""Canonical K-response rows -> token ids: the prompt once, then each response after it.

The prompt/completion boundary follows `DPOTrainer._prepare_dataset`: each response is tokenized together with the
prompt, and the response starts where that sequence and the tokenized prompt diverge (see TRL's
`common_prefix_length`), so chat templates that render the prompt differently alone still split correctly.
`prepare_k_response_dataset` is the whole dataset step of the trainers: convert, tokenize, drop the rows that
`max_length` leaves without a response token (logged with their count).
"""

from __future__ import annotations

import json

from datasets import Dataset, IterableDataset
from transformers import PreTrainedTokenizerBase
from transformers.utils import logging
from trl.data_utils import common_prefix_length

from .data import RowError, convert_to_k_responses

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


def _tokenize_row(example: dict, index: int, tokenizer, prompt_token_needed_by: str | None) -> dict:
    tokens = tokenize_k_responses(example, tokenizer)
    if prompt_token_needed_by and not tokens["prompt_ids"]:
        raise RowError(
            f"Row {index}, column 'prompt': the prompt keeps no token of its own: its last tokens merge with the "
            "first tokens of every response (BPE), and each response starts where the tokenized prompt and "
            f"prompt+response diverge (DPO's boundary). {prompt_token_needed_by} shares a prompt token among the "
            "responses and needs one; use prompt_sharing='auto' or 'off' (which build such rows padded), or end the "
            "prompt where the tokenizer splits (a space or a newline)."
        )
    return tokens


def _too_long_message(name: str, max_length: int, rows: int, shortest: int) -> str:
    return (
        f"max_length={max_length} leaves the {name} dataset empty: each of its {rows} rows has a prompt of "
        f"{max_length} tokens or more (the shortest has {shortest}), so no response token would remain. Raise "
        f"max_length above {shortest}."
    )


def prepare_k_response_dataset(
    dataset: Dataset | IterableDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    name: str,
    ultrafeedback_reward: str = "overall_score",
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
    prompt_token_needed_by: str | None = None,
) -> Dataset | IterableDataset:
    """Rows of any accepted layout -> `prompt_ids`, `completion_ids`, `rewards` (and `ordered`).

    With `keep_start` truncation, a row whose prompt alone has `max_length` tokens or more would keep no response
    token: such rows are dropped and counted in one warning. A dataset left without rows raises a `ValueError` that
    says why, before any training step (a stream is read up to its first row that stays). `prompt_token_needed_by`
    names a setting that needs a prompt token per row: a row whose prompt keeps none then raises a `ValueError` that
    names it (as the map reaches it: before training in memory, as it streams otherwise).
    """
    map_kwargs = {"num_proc": num_proc} if isinstance(dataset, Dataset) else {}
    if isinstance(dataset, Dataset) and len(dataset) == 0:
        raise ValueError(f"The {name} dataset is empty: there is nothing to train on.")
    dataset = convert_to_k_responses(dataset, ultrafeedback_reward=ultrafeedback_reward, num_proc=num_proc)
    if isinstance(dataset, Dataset):
        map_kwargs["desc"] = f"Tokenizing {name} dataset"
    dataset = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "prompt_token_needed_by": prompt_token_needed_by},
        **map_kwargs,
    )
    if max_length is None or truncation_mode != "keep_start":
        return dataset

    def keeps_a_response_token(row):
        return len(row["prompt_ids"]) < max_length

    if not isinstance(dataset, Dataset):
        # A stream that keeps no row would train 0 steps: read it up to its first row that stays
        dropped, shortest = 0, None
        for row in dataset:
            if keeps_a_response_token(row):
                break
            dropped += 1
            shortest = len(row["prompt_ids"]) if shortest is None else min(shortest, len(row["prompt_ids"]))
        else:
            if not dropped:
                raise ValueError(f"The {name} dataset is empty (the stream has no row): there is nothing to train on.")
            raise ValueError(_too_long_message(name, max_length, dropped, shortest))
        logger.warning(
            f"Rows of the {name} dataset whose prompt has max_length={max_length} tokens or more are dropped as they "
            "stream: they would keep no response token."
        )
        return dataset.filter(keeps_a_response_token)
    tokenized, before = dataset, len(dataset)
    map_kwargs["desc"] = f"Dropping {name} rows whose prompt fills max_length"
    dataset = dataset.filter(keeps_a_response_token, **map_kwargs)
    if len(dataset) == 0:
        shortest = min(len(ids) for ids in tokenized["prompt_ids"])
        raise ValueError(_too_long_message(name, max_length, before, shortest))
    if len(dataset) < before:
        logger.warning(
            f"Dropped {before - len(dataset)} of {before} rows of the {name} dataset: their prompt alone has "
            f"max_length={max_length} tokens or more, so no response token would remain."
        )
    return dataset
