"""Reward datasets from a model's own samples: K responses per prompt, scored by reward functions.

One round of what the online trainers do every step: sample K responses per prompt, score them with reward functions
(resolved and checked by `trl_nca.rewards`), and keep the scored rows as canonical K-response rows for the offline
trainers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import set_seed

from .rewards import RewardFunc, check_reward_columns, resolve_reward, score_completions


def _encode(tokenizer, prompts: Sequence) -> dict:
    if isinstance(prompts[0], list):
        texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    else:
        texts = list(prompts)
    # The chat template already holds any special tokens; left padding keeps every prompt next to its answer
    return tokenizer(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: Sequence,
    *,
    num_return_sequences: int = 1,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    desc: str = "Generating",
) -> list[list[str]]:
    """`num_return_sequences` decoded answers per prompt (text or messages), batched, with a progress bar."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    answers: list[list[str]] = []
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
        batch = _encode(tokenizer, prompts[start : start + batch_size]).to(device)
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            num_return_sequences=num_return_sequences,
            pad_token_id=tokenizer.pad_token_id,
            **sampling,
        )
        texts = tokenizer.batch_decode(output[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
        answers.extend(
            [text.strip() for text in texts[i : i + num_return_sequences]]
            for i in range(0, len(texts), num_return_sequences)
        )
    model.train(was_training)
    return answers


def build_reward_dataset(
    model,
    tokenizer,
    prompts: Dataset | list[dict],
    reward_funcs: RewardFunc | str | Sequence[RewardFunc | str],
    *,
    k: int = 4,
    temperature: float = 0.8,
    top_p: float = 0.95,
    max_new_tokens: int = 64,
    seed: int = 0,
    batch_size: int = 16,
) -> tuple[Dataset, dict]:
    """Sample `k` responses per prompt, score them, and return canonical rows (`prompt`, `completions`, `rewards`,
    plus the prompts' other columns) and stats: `prompts`, `k`, `all_equal` (prompts whose rewards are all equal,
    which carry no learning signal), `mean_reward`. A reward function that fails or returns a wrong count, a
    non-number or a non-finite value raises a `RewardError` naming it and the prompt; nothing is returned then."""
    if k < 2:
        raise ValueError(f"k must be at least 2 (NCA contrasts responses), got {k}")
    rows = list(prompts)
    if not rows:
        raise ValueError("There are no prompts to sample from")
    if "prompt" not in rows[0]:
        raise ValueError(f"The prompts need a 'prompt' column; they have {sorted(rows[0])}")
    check_reward_columns([key for key in rows[0] if key != "prompt"], "prompts")
    funcs = [resolve_reward(f) for f in (reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs])]
    set_seed(seed)
    texts = generate(
        model,
        tokenizer,
        [r["prompt"] for r in rows],
        num_return_sequences=k,
        do_sample=True,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        desc=f"Sampling {k} responses per prompt",
    )
    conversational = isinstance(rows[0]["prompt"], list)
    flat_prompts = [row["prompt"] for row in rows for _ in range(k)]
    flat_completions = [[{"role": "assistant", "content": t}] if conversational else t for ts in texts for t in ts]
    columns = {key: [row[key] for row in rows for _ in range(k)] for key in rows[0] if key != "prompt"}
    totals = score_completions(funcs, flat_prompts, flat_completions, group_size=k, **columns)

    out = []
    for i, row in enumerate(rows):
        out.append(
            {**row, "completions": flat_completions[i * k : (i + 1) * k], "rewards": totals[i * k : (i + 1) * k]}
        )
    stats = {
        "prompts": len(out),
        "k": k,
        "all_equal": sum(len(set(r["rewards"])) == 1 for r in out),
        "mean_reward": sum(totals) / len(totals),
    }
    return Dataset.from_list(out), stats
