"""Online NCA against TRL's GRPOTrainer and against one offline round, from the same start, on the demo's task.

Every method starts from SmolLM2-135M-Instruct with a fresh LoRA adapter (r=16, all linear layers, same seed), sees
the same training prompts in the same numbers, K completions per prompt, with the same learning rate, and generates
the same number of completions in all:

  nca-sampler     OnlineNCATrainer, reference="sampler"
  nca-initial     OnlineNCATrainer, reference="initial"
  infonca-sampler OnlineInfoNCATrainer, reference="sampler"
  grpo            TRL's GRPOTrainer with its defaults (loss "dapo", rewards scaled per group, no KL)
  offline-nca     today's demo: K completions per prompt sampled once from the start, then NCATrainer on them

Held-out greedy accuracy (the demo's questions) is measured at the start and every `--eval_every` steps; each
point records the completions generated so far and the wall-clock time spent training and generating (evaluation
excluded). The table and the plot come from one run of this script.

    python benchmarks/online_vs_grpo.py --json runs/online_vs_grpo.json        # CPU defaults: about an hour
    python benchmarks/online_vs_grpo.py --methods nca-sampler,grpo --steps 6    # a quicker comparison
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

METHODS = ("nca-sampler", "nca-initial", "infonca-sampler", "grpo", "offline-nca")


class HeldoutCurve(TrainerCallback):
    """Greedy held-out accuracy every `every` optimizer steps, against completions generated and training time."""

    def __init__(self, evaluate, every: int, completions_per_step: int, completions_before: int = 0):
        self.evaluate, self.every = evaluate, every
        self.per_step, self.before = completions_per_step, completions_before
        self.points, self.started, self.paused = [], None, 0.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.started = time.time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self.record(model, state.global_step)

    def record(self, model, step: int, seconds: float | None = None):
        if seconds is None:
            seconds = time.time() - self.started - self.paused
        paused = time.time()
        accuracy = self.evaluate(model)
        self.paused += time.time() - paused
        self.points.append(
            {
                "step": step,
                "completions": self.before + step * self.per_step,
                "seconds": round(seconds, 1),
                "accuracy": accuracy,
            }
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps (one generation each, online)")
    parser.add_argument("--prompts_per_step", type=int, default=8)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--reward_temperature", type=float, default=0.1)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--heldout_prompts", type=int, default=96)
    parser.add_argument("--eval_every", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/online_vs_grpo")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from trl_nca import NCAConfig, NCATrainer, OnlineInfoNCATrainer, OnlineNCAConfig, OnlineNCATrainer
    from trl_nca.demo import (
        arithmetic_reward,
        heldout_accuracy,
        heldout_problems,
        load_model,
        local_run_args,
        make_problems,
    )
    from trl_nca.generation import build_reward_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, tokenizer = load_model(args.model_dir)
    on_gpu = torch.cuda.is_available()
    prompts = make_problems(args.steps * args.prompts_per_step, seed=args.seed)
    heldout = heldout_problems(args.heldout_prompts, seed=args.seed)
    per_step = args.prompts_per_step * args.k

    def evaluate(model):
        return heldout_accuracy(model, tokenizer, heldout, max_new_tokens=40)[0]

    start_accuracy = evaluate(base)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        disable_tqdm=True,
        **local_run_args(args.seed, on_gpu),
    )
    # One generation per optimizer step: the generation batch is one step's prompts x K, in micro-batches of K x 4
    micro = min(per_step, 4 * args.k)
    online = dict(
        common,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=per_step // micro,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        temperature=args.temperature,
        shuffle_dataset=False,  # every method sees the prompts in the same order
    )
    results = []
    for method in args.methods.split(","):
        model = copy.deepcopy(base)
        curve = HeldoutCurve(evaluate, args.eval_every, per_step)
        started = time.time()
        if method == "offline-nca":
            dataset, _ = build_reward_dataset(
                model,
                tokenizer,
                prompts,
                arithmetic_reward,
                k=args.k,
                temperature=args.temperature,
                max_new_tokens=args.max_new_tokens,
                seed=args.seed,
            )
            curve.before = len(prompts) * args.k
            curve.per_step = 0
            sampling = time.time() - started
            config = NCAConfig(
                output_dir=str(out / method),
                **common,
                per_device_train_batch_size=args.prompts_per_step,
                beta=args.beta,
                reward_temperature=args.reward_temperature,
                max_length=256,
            )
            trainer = NCATrainer(
                model=model,
                args=config,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=copy.deepcopy(lora),
            )
            curve.points.append(
                {"step": 0, "completions": curve.before, "seconds": round(sampling, 1), "accuracy": start_accuracy}
            )
            curve.paused -= sampling  # the sampling time counts
        else:
            train_dataset = Dataset.from_list(prompts)
            if method == "grpo":
                trainer = GRPOTrainer(
                    model=model,
                    reward_funcs=arithmetic_reward,
                    args=GRPOConfig(output_dir=str(out / method), **online),
                    train_dataset=train_dataset,
                    processing_class=tokenizer,
                    peft_config=copy.deepcopy(lora),
                )
            else:
                objective, reference = method.split("-")
                cls = OnlineNCATrainer if objective == "nca" else OnlineInfoNCATrainer
                config = OnlineNCAConfig(
                    output_dir=str(out / method),
                    **online,
                    beta=args.beta,
                    reward_temperature=args.reward_temperature,
                    reference=reference,
                )
                trainer = cls(
                    model=model,
                    reward_funcs=arithmetic_reward,
                    args=config,
                    train_dataset=train_dataset,
                    processing_class=tokenizer,
                    peft_config=copy.deepcopy(lora),
                )
            curve.points.append({"step": 0, "completions": 0, "seconds": 0.0, "accuracy": start_accuracy})
        trainer.add_callback(curve)
        trainer.train()
        rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
        results.append(
            {
                "method": method,
                "points": curve.points,
                "final_accuracy": curve.points[-1]["accuracy"],
                "completions": curve.points[-1]["completions"],
                "train_seconds": curve.points[-1]["seconds"],
                "mean_sample_reward": sum(rewards) / len(rewards) if rewards else None,
            }
        )
        print(json.dumps(results[-1]), flush=True)

    print(
        f"\nSmolLM2-135M-Instruct + LoRA r=16, {args.steps} steps x {args.prompts_per_step} prompts x K={args.k}, "
        f"lr {args.learning_rate}, held-out {len(heldout)} questions, seed {args.seed}\n"
    )
    print("| method | held-out accuracy start | end | change | completions generated | training time (s) |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {start_accuracy:.3f} | {r['final_accuracy']:.3f} | "
            f"{r['final_accuracy'] - start_accuracy:+.3f} | {r['completions']} | {r['train_seconds']:.0f} |"
        )
    plot(results, out / "online_vs_grpo.png")
    if args.json:
        Path(args.json).write_text(
            json.dumps({"settings": vars(args), "start_accuracy": start_accuracy, "results": results}, indent=2)
        )


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for r in results:
        points = r["points"]
        left.plot([p["completions"] for p in points], [p["accuracy"] for p in points], marker="o", label=r["method"])
        right.plot([p["seconds"] for p in points], [p["accuracy"] for p in points], marker="o", label=r["method"])
    left.set_xlabel("completions generated")
    right.set_xlabel("training + generation time (s)")
    for axis in (left, right):
        axis.set_ylabel("held-out greedy accuracy")
        axis.legend(fontsize=7)
    fig.suptitle("Online NCA vs GRPO vs one offline round (SmolLM2-135M, arithmetic)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    main()
