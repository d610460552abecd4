"""`trl-nca generate`: sample K responses per prompt, score them, and save the canonical reward dataset."""

from __future__ import annotations

import argparse

# The demo task's reward, the default of `--task arithmetic`
ARITHMETIC_REWARD = "trl_nca.demo.arithmetic:arithmetic_reward"


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="trl-nca generate", description=__doc__)
    parser.add_argument("--model", required=True, help="model folder or hub id to sample from")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--task", choices=["arithmetic"], help="built-in prompts (with their `answer` column)")
    source.add_argument("--prompts", help="dataset (file or folder) with a `prompt` column")
    parser.add_argument(
        "--num_prompts", type=int, default=96, help="with --task: how many prompts (default %(default)s)"
    )
    parser.add_argument(
        "--reward",
        action="append",
        default=None,
        help="'module:function' or 'module.function' (TRL's GRPO signature; the module is looked for in the current "
        "folder first, then on the import path) or a reward model folder; repeat to sum several (default with "
        f"--task arithmetic: {ARITHMETIC_REWARD})",
    )
    parser.add_argument(
        "--k", type=int, default=4, help="responses sampled per prompt, at least 2 (default %(default)s)"
    )
    parser.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default %(default)s)")
    parser.add_argument(
        "--top_p",
        type=float,
        default=0.95,
        help="nucleus sampling: the probability mass sampled from (default %(default)s)",
    )
    parser.add_argument(
        "--max_new_tokens", type=int, default=64, help="the longest response, in tokens (default %(default)s)"
    )
    parser.add_argument("--batch_size", type=int, default=16, help="prompts sampled together (default %(default)s)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the sampling and of the --task prompts (default %(default)s)"
    )
    parser.add_argument(
        "--output_dir",
        required=True,
        help="folder the dataset is saved to (save_to_disk); train on it with --dataset_name",
    )
    return parser


def cli(argv: list[str]) -> int:
    parser = make_parser()
    args = parser.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    if args.prompts and not args.reward:
        parser.error("--prompts needs --reward (a 'module:function', 'module.function' or a reward model folder)")
    from ..generation import build_reward_dataset
    from ..rewards import resolve_reward
    from .utils import check_model, model_not_found_as_one_line

    # What can be checked without loading anything comes first: the model path, then the reward specs
    check_model(args.model, "--model")
    rewards = [resolve_reward(spec) for spec in args.reward or [ARITHMETIC_REWARD]]
    if args.task:
        from ..demo.arithmetic import make_problems

        prompts = make_problems(args.num_prompts, seed=args.seed)
    else:
        from .utils import first_split, load_any_dataset

        prompts = first_split(load_any_dataset(args.prompts))
    with model_not_found_as_one_line(args.model):
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset, stats = build_reward_dataset(
        model,
        tokenizer,
        prompts,
        rewards,
        k=args.k,
        temperature=args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    dataset.save_to_disk(args.output_dir)
    print(
        f"Wrote {args.output_dir}: {stats['prompts']} prompts x {stats['k']} responses, mean reward "
        f"{stats['mean_reward']:.3f}; {stats['all_equal']} prompts have all-equal rewards (no learning signal)"
    )
    return 0
