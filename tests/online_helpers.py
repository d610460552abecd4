"""Builders for the online trainer tests: a deterministic rollout (so that two runs see the same completions), a
reward function of the completion text, and CPU float32 configs."""

from __future__ import annotations

from datasets import Dataset
from helpers import CPU, user

from trl_nca import OnlineNCAConfig

ANSWERS = [" four.", " The sky is blue.", " hello world", " green grass", " Paris is the capital of France.", " 4"]
QUESTIONS = [
    "What is two plus two?",
    "Name a colour of the sky.",
    "Write a poem about the sea.",
    "Hello, who are you?",
]


def prompts_dataset(n: int = 4) -> Dataset:
    return Dataset.from_list([{"prompt": user(QUESTIONS[i % len(QUESTIONS)]), "index": i} for i in range(n)])


def deterministic_rollout(prompts, trainer):
    """A GRPO `rollout_func`: the k-th completion of a prompt's group is fixed by the prompt and k, wherever the
    group's completions land across processes (k comes from the completion's global position)."""
    tokenizer = trainer.processing_class
    group_size = trainer.num_generations if trainer.model.training else trainer.num_generations_eval
    first = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)
        prompt_ids.append(list(ids["input_ids"]))
        k = (first + i) % group_size
        text = ANSWERS[(len(prompt[-1]["content"]) + k) % len(ANSWERS)]
        completion_ids.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "logprobs": [[0.0] * len(ids) for ids in completion_ids],
    }


def text_of(completion) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


def length_reward(prompts, completions, **kwargs):
    """Deterministic and varied: the completion's length modulo 4, in halves (ties happen, but not everywhere)."""
    return [(len(text_of(c)) % 4) / 2 for c in completions]


def online_args(tmp_path, **overrides) -> OnlineNCAConfig:
    settings = {
        **CPU,
        "num_generations": 4,
        "max_completion_length": 8,
        "beta": 0.5,
        "reward_temperature": 0.5,
        "disable_tqdm": True,
        **overrides,
    }
    return OnlineNCAConfig(output_dir=str(tmp_path / "online"), **settings)
