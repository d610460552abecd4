"""The training half of one online step, OnlineNCATrainer (each prompt encoded once per group) against GRPOTrainer.

The generated batch is fixed (a `rollout_func` returns random prompt and completion tokens of the cell's lengths, so
generation does not blur the measurement): `prompts` prompts x K completions, every prompt `P` tokens, every
completion `C` tokens. A step is what the trainer does with that batch in a training step with GRPO's defaults (one
update per generation, so no old-log-prob forward; no reference forward: GRPO's beta is 0 and NCA's reference is the
sampler): the loss (`compute_loss`) and its backward, LoRA r=16 on all linear layers of SmolLM2-135M-Instruct. Time
is the median of `--steps` steps after one warm-up step; peak memory is CUDA's peak allocation, or on CPU the peak
resident set size above the one before the first step (sampled every 5 ms). Each (cell, method) runs in a fresh
process, the methods of a cell back to back.

    ideal token ratio = (P + K C) / (K (P + C))   the tokens one encoding of each prompt computes, over GRPO's

`--whole` adds one cell timed as a whole step with real sampling (generation included), for each method.

`--steps_per_generation N` times GRPO's default schedule instead: the generation batch (`--prompts` x K rows) is
shuffled and split into N micro-batches by the trainer's own `_prepare_inputs` (GRPO: by completion; trl-nca's
trainers: by whole group), then N x (loss + backward); the old-log-prob forward that GRPO adds when N > 1 is part of
the step (the rollout's random tokens make generation itself nearly free). Methods: `grpo` (GRPOTrainer), `nca`
(OnlineNCATrainer) and `psgrpo` (PromptSharingGRPOTrainer, GRPO's loss with each prompt encoded once per group).
`--sync_debug` (CUDA) counts the host synchronisations of a timed step with `torch.cuda.set_sync_debug_mode("warn")`.

    python benchmarks/online_step.py --cells 8x256x256,8x64x128          # K x P x C
    python benchmarks/online_step.py --json benchmarks/results/online_step_cpu.json
    python benchmarks/online_step.py --cells 8x256x256 --prompts 4 --steps_per_generation 4 --methods grpo,psgrpo
    python benchmarks/online_step.py --cells 8x32x32 --prompts 4           # the demo's settings: memory beside time
    python benchmarks/online_step.py --cells 8x32x32 --prompts 4 --tiny_vocab 150000   # at a 150k vocabulary
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from step_time import peak_memory  # noqa: E402

METHODS = ("grpo", "nca")
GRID = [f"{k}x{p}x{c}" for k in (8, 16) for p in (64, 256, 1024) for c in (128, 512)]


def random_rollout(prompt_length: int, completion_length: int, vocab: int, seed: int):
    """A GRPO `rollout_func` whose prompts and completions are random tokens of fixed lengths (no EOS)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(100, vocab, (n,), generator=generator).tolist()

    def rollout(prompts, trainer):
        group = trainer.num_generations
        prompt_ids = {}
        out = {"prompt_ids": [], "completion_ids": [], "logprobs": []}
        for i, _ in enumerate(prompts):
            key = i // group
            prompt_ids.setdefault(key, tokens(prompt_length))
            out["prompt_ids"].append(prompt_ids[key])
            out["completion_ids"].append(tokens(completion_length))
            out["logprobs"].append([0.0] * completion_length)
        return out

    return rollout


def constant_spread(prompts, completions, **kwargs):
    return [float(i % 3) for i in range(len(completions))]


def build(method, model, tokenizer, k, prompts, p, c, rollout, device, whole=False, steps_per_generation=1):
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from trl_nca import OnlineNCAConfig, OnlineNCATrainer, PromptSharingGRPOTrainer
    from trl_nca.demo import local_run_args

    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"question {i}"}]} for i in range(prompts)])
    settings = dict(
        output_dir="/tmp/online_step",
        per_device_train_batch_size=k * prompts // steps_per_generation,
        steps_per_generation=steps_per_generation,
        num_generations=k,
        max_completion_length=c,
        disable_tqdm=True,
        max_steps=1,
        **local_run_args(0, device.type == "cuda"),
    )
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    kwargs = dict(model=model, reward_funcs=constant_spread, train_dataset=data, processing_class=tokenizer,
                  peft_config=lora, rollout_func=None if whole else rollout)  # fmt: skip
    if method == "grpo":
        return GRPOTrainer(args=GRPOConfig(**settings), **kwargs)
    if method == "psgrpo":
        return PromptSharingGRPOTrainer(args=GRPOConfig(**settings), **kwargs)
    return OnlineNCATrainer(args=OnlineNCAConfig(**settings), **kwargs)


def timed_steps(step, steps: int, device, sync_debug: bool) -> tuple[list[float], list[int]]:
    """Seconds of each step after one warm-up, and (with `sync_debug` on CUDA) the host synchronisations of each."""
    import warnings

    times, syncs = [], []
    for index in range(steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if sync_debug and device.type == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            started = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode(0)
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - started
        if index:
            times.append(elapsed)
            syncs.append(sum("synchroniz" in str(w.message) for w in caught))
    return times, syncs


def scheduled_step(trainer, rows, steps_per_generation: int) -> list[dict]:
    """One generation's worth of training under GRPO's schedule: `steps_per_generation` micro-batches, each from the
    trainer's own `_prepare_inputs` (which generates on the first and hands out the buffered rest), loss and backward;
    the micro-batches, for the tests."""
    micro_batches = []
    for _ in range(steps_per_generation):
        inputs = trainer._prepare_inputs(rows)
        trainer.compute_loss(trainer.model, inputs).backward()
        micro_batches.append(inputs)
        trainer._step += 1  # what `training_step` counts, and `_prepare_inputs` reads
    trainer.model.zero_grad()
    return micro_batches


def worker(method, cell, args):
    from trl_nca.demo import load_model

    k, p, c = (int(x) for x in cell.split("x"))
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model_dir)
    if args.tiny_vocab:  # a tiny model whose LM head is as wide as a large vocabulary's (the tokens: SmolLM2's)
        from transformers import AutoModelForCausalLM, LlamaConfig

        config = LlamaConfig(vocab_size=args.tiny_vocab, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)  # fmt: skip
        model = AutoModelForCausalLM.from_config(config).to(next(model.parameters()).device)
    device = next(model.parameters()).device
    rollout = random_rollout(p, c, len(tokenizer), seed=1)
    trainer = build(method, model, tokenizer, k, args.prompts, p, c, rollout, device, whole=args.whole_worker,
                    steps_per_generation=args.steps_per_generation)  # fmt: skip
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # Trainer sets it in its training loop
    rows = [trainer.train_dataset[i // k] for i in range(k * args.prompts)]
    layout, syncs = None, []
    if args.whole_worker:  # a whole step: generation (real sampling), scoring, loss and backward

        def step():
            batch = trainer._generate_and_score_completions(rows)
            trainer.compute_loss(trainer.model, batch).backward()
            trainer.model.zero_grad()

        with peak_memory(device) as memory:
            times, syncs = timed_steps(step, args.steps, device, args.sync_debug)
    else:
        if args.steps_per_generation == 1:
            batch = trainer._generate_and_score_completions(rows)
            assert batch["completion_ids"].shape == (k * args.prompts, c), batch["completion_ids"].shape

            def step():
                trainer.compute_loss(trainer.model, batch).backward()
                trainer.model.zero_grad()

        else:  # GRPO's schedule: the trainer shuffles and splits the generation batch itself

            def step():
                scheduled_step(trainer, rows, args.steps_per_generation)

        with peak_memory(device) as memory:
            times, syncs = timed_steps(step, args.steps, device, args.sync_debug)
        counts = getattr(getattr(trainer, "_group_collator", None), "counts", None)
        layout = max(counts, key=counts.get) if counts else ("padded" if method == "grpo" else None)
    record = {"method": method, "cell": cell, "k": k, "p": p, "c": c, "prompts": args.prompts,
              "step_s": statistics.median(times), "peak_mem_mb": round(memory["peak_mb"], 1), "layout": layout,
              "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "whole": args.whole_worker, "steps_per_generation": args.steps_per_generation,
              "syncs_per_step": syncs if args.sync_debug and device.type == "cuda" else None}  # fmt: skip
    print("RECORD " + json.dumps(record), flush=True)


def run_cell(cell, whole, args):
    records = {}
    for method in args.methods.split(","):
        command = [sys.executable, __file__, "--worker", method, cell, "--steps", str(args.steps),
                   "--prompts", str(args.prompts), "--model_dir", args.model_dir,
                   "--steps_per_generation", str(args.steps_per_generation)]  # fmt: skip
        command += ["--sync_debug"] if args.sync_debug else []
        command += ["--tiny_vocab", str(args.tiny_vocab)] if args.tiny_vocab else []
        command += ["--whole_worker"] if whole else []
        run = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in run.stdout.splitlines() if line.startswith("RECORD ")]
        if run.returncode != 0 or not lines:  # e.g. killed for memory (-9): recorded, and the run goes on
            why = f"exit {run.returncode}" + (" (killed: out of memory?)" if run.returncode == -9 else "")
            print(f"{cell} {method} failed, {why}:\n{run.stderr[-1500:]}", flush=True)
            records[method] = {"method": method, "cell": cell, "failed": why}
            continue
        records[method] = json.loads(lines[-1].removeprefix("RECORD "))
        print(records[method], flush=True)
    return records


def records_cell(records) -> str:
    k, p, c = next(iter(records.values()))["cell"].split("x")
    return f"{k} | {p} | {c}"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", default=",".join(GRID), help="K x P x C, comma-separated")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per step (groups of K)")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--whole", default=None, help="a cell to time as a whole step with generation too")
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--json", default=None)
    parser.add_argument("--methods", default=",".join(METHODS), help="of grpo, nca, psgrpo; the first is the baseline")
    parser.add_argument("--steps_per_generation", type=int, default=1,
                        help="micro-batches per generation, split by the trainer (GRPO's schedule)")
    parser.add_argument("--sync_debug", action="store_true", help="count host syncs per step (CUDA)")
    parser.add_argument("--tiny_vocab", type=int, default=None,
                        help="a tiny random Llama (hidden 256, 4 layers) with this many tokens in its vocabulary, "
                        "instead of SmolLM2: the LM head's memory at a large vocabulary")  # fmt: skip
    parser.add_argument("--worker", nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--whole_worker", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker:
        worker(*args.worker, args)
        return
    rows = []
    for cell in args.cells.split(","):
        records = run_cell(cell, False, args)
        rows.append(records)
    whole = run_cell(args.whole, True, args) if args.whole else None
    base, others = args.methods.split(",")[0], args.methods.split(",")[1:]
    device = next((r[m]["device"] for r in rows for m in r if "device" in r[m]), "?")
    model = f"tiny Llama, vocabulary {args.tiny_vocab}," if args.tiny_vocab else "SmolLM2-135M-Instruct"
    print(f"\n{model} + LoRA r=16, {device}, {args.prompts} prompt(s) x K per generation, "
          f"{args.steps_per_generation} micro-batch(es) per generation, median of {args.steps} steps "
          f"(loss + backward of the fixed batch)\n")  # fmt: skip
    print("| K | prompt | completion | method | layout | baseline (s) | method (s) | time ratio | ideal token ratio | "
          "baseline mem (MB) | method mem (MB) | memory ratio | syncs per step |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for records in rows:
        g = records[base]
        for method in others:
            n = records[method]
            if "failed" in g or "failed" in n:
                print(f"| {records_cell(records)} | {method} | {base}: {g.get('failed', 'ok')}; "
                      f"{method}: {n.get('failed', 'ok')} |")  # fmt: skip
                continue
            ideal = (n["p"] + n["k"] * n["c"]) / (n["k"] * (n["p"] + n["c"]))
            memory = n["peak_mem_mb"] / g["peak_mem_mb"] if g["peak_mem_mb"] else float("nan")
            print(f"| {n['k']} | {n['p']} | {n['c']} | {method} vs {base} | {n['layout']} | {g['step_s']:.2f} | "
                  f"{n['step_s']:.2f} | {n['step_s'] / g['step_s']:.2f} | {ideal:.2f} | {g['peak_mem_mb']:.0f} | "
                  f"{n['peak_mem_mb']:.0f} | {memory:.2f} | {n.get('syncs_per_step')} vs {g.get('syncs_per_step')} |")
    if whole:
        g = whole[base]
        for method in others:
            n = whole[method]
            print(f"\nWhole step with generation, {args.whole}: {base} {g['step_s']:.1f} s, {method} "
                  f"{n['step_s']:.1f} s (ratio {n['step_s'] / g['step_s']:.2f})")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps({"cells": rows, "whole": whole, "settings": vars(args)}, indent=2))


if __name__ == "__main__":
    main()
