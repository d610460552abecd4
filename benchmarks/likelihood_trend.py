"""The paper's Figure 2, checked: does NCA keep the likelihood of the best response from falling, where InfoNCA and
DPO let it fall?

NCA, InfoNCA and DPO (TRL's DPOTrainer on best-against-worst pairs of the same rows) train from the same start
(SmolLM2-135M-Instruct + a fresh LoRA adapter, same seed), on the same reward rows (the model's own sampled answers to
arithmetic questions, scored by `arithmetic_reward`), with the same steps, batch size and learning rate. For each we
report the change of `logps/best` (the policy log-likelihood of the highest-reward response) on held-out reward rows
from start to end, and held-out greedy accuracy, and plot the three curves.

    python benchmarks/likelihood_trend.py                  # CPU defaults, about 15 minutes on 2 cores
    python benchmarks/likelihood_trend.py --steps 40 --train_prompts 96 --json runs/trend.json
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import torch
from datasets import Dataset


def best_worst_pairs(rows: Dataset) -> Dataset:
    """DPO's pairs from K-response rows: the highest- against the lowest-reward response (rows with ties only are
    left out: they have no preference)."""
    pairs = []
    for row in rows:
        rewards = row["rewards"]
        if max(rewards) == min(rewards):
            continue
        best, worst = rewards.index(max(rewards)), rewards.index(min(rewards))
        pairs.append(
            {"prompt": row["prompt"], "chosen": row["completions"][best], "rejected": row["completions"][worst]}
        )
    return Dataset.from_list(pairs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--out", default="runs/likelihood_trend")
    parser.add_argument("--train_prompts", type=int, default=64)
    parser.add_argument("--heldout_prompts", type=int, default=32)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--learning_rate", type=float, default=2e-4)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--reward_temperature", type=float, default=0.1)
    parser.add_argument("--eval_every", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)

    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from trl_nca import InfoNCATrainer, NCAConfig, NCATrainer
    from trl_nca.demo import (
        arithmetic_reward,
        heldout_accuracy,
        load_model,
        local_run_args,
        make_problems,
        fixed_test_set,
    )
    from trl_nca.generation import build_reward_dataset

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    base, tokenizer = load_model(args.model_dir)

    train_problems = make_problems(args.train_prompts, seed=args.seed)
    heldout = fixed_test_set(args.heldout_prompts)
    train_rows, _ = build_reward_dataset(
        base, tokenizer, train_problems, arithmetic_reward, k=args.k, seed=args.seed, max_new_tokens=40
    )
    heldout_rows, _ = build_reward_dataset(
        base, tokenizer, heldout, arithmetic_reward, k=args.k, seed=args.seed + 1, max_new_tokens=40
    )
    # The same held-out rows for every method: those with a unique preference between best and worst
    heldout_rows = heldout_rows.filter(lambda row: max(row["rewards"]) > min(row["rewards"]))
    accuracy_start, _ = heldout_accuracy(base, tokenizer, heldout, max_new_tokens=40)

    common = dict(
        output_dir=str(out / "tmp"),
        learning_rate=args.learning_rate,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=8,
        beta=args.beta,
        eval_strategy="steps",
        eval_steps=args.eval_every,
        max_length=256,
        **local_run_args(args.seed, on_gpu),
    )
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    results = []
    curves = {}
    for method in ["NCA", "InfoNCA", "DPO"]:
        started = time.time()
        model = copy.deepcopy(base)
        if method == "DPO":
            trainer = DPOTrainer(
                model=model,
                args=DPOConfig(**common),
                train_dataset=best_worst_pairs(train_rows),
                eval_dataset=best_worst_pairs(heldout_rows),
                processing_class=tokenizer,
                peft_config=copy.deepcopy(lora),
            )
            best_key = "eval_logps/chosen"  # chosen = the best response of the row
        else:
            cls = NCATrainer if method == "NCA" else InfoNCATrainer
            config = NCAConfig(**common, reward_temperature=args.reward_temperature)
            trainer = cls(
                model=model,
                args=config,
                train_dataset=train_rows,
                eval_dataset=heldout_rows,
                processing_class=tokenizer,
                peft_config=copy.deepcopy(lora),
            )
            best_key = "eval_logps/best"
        first = trainer.evaluate()
        trainer.train()
        last = trainer.evaluate()
        accuracy_end, _ = heldout_accuracy(trainer.model, tokenizer, heldout, max_new_tokens=40)
        evals = [(0, first[best_key])] + [(e["step"], e[best_key]) for e in trainer.state.log_history if best_key in e]
        curves[method] = sorted(set(evals))
        results.append(
            {
                "method": method,
                "logps_best_start": first[best_key],
                "logps_best_end": last[best_key],
                "delta_logps_best": last[best_key] - first[best_key],
                "heldout_accuracy_start": accuracy_start,
                "heldout_accuracy_end": accuracy_end,
                "train_rows": len(trainer.train_dataset),
                "heldout_rows": len(heldout_rows),
                "steps": trainer.state.global_step,
                "seconds": round(time.time() - started, 1),
                "device": "cuda" if on_gpu else "cpu",
            }
        )
        print(results[-1])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, points in curves.items():
        ax.plot([s for s, _ in points], [v for _, v in points], marker="o", label=method)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out log-likelihood of the best response")
    ax.set_title(f"Likelihood trend (SmolLM2-135M, arithmetic, K={args.k})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "likelihood_trend.png", dpi=80)

    print("\n| method | logps/best start | end | change | held-out accuracy start | end |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['method']} | {r['logps_best_start']:.2f} | {r['logps_best_end']:.2f} | "
            f"{r['delta_logps_best']:+.2f} | {r['heldout_accuracy_start']:.3f} | {r['heldout_accuracy_end']:.3f} |"
        )
    print(
        f"\n{len(heldout_rows)} held-out rows, {args.steps} steps of {args.batch_size} prompts, lr "
        f"{args.learning_rate}, beta {args.beta}, on {'cuda' if on_gpu else 'cpu'}; "
        f"plot: {out / 'likelihood_trend.png'}"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
