"""Host preparation of one micro-batch per layout: what the host does before the forward can start (collation, the
reads and the bytes it hands to the device), at the shapes where `auto` on a GPU picks a prompt-sharing layout.

For each shape and layout: the collator's time (median of `--repeats`), the bytes of the tensors it returns (what is
copied to the device), the largest tensor's elements, and for the shared-prompt layout the time to build its 4D mask
from the segment and row ids where the ids are (`dense_mask`; on a GPU that is device work, here it runs on the CPU
and is printed apart: it is not host preparation when a GPU runs it). `auto` is the layout the cost model picks for
the batch on CUDA with the dims of an 8B and a 1.5B model. Online, the grouped forward adds the grouping of GRPO's
rows (`group_rows`: one read of the ids) before the collator and, for the padded and shared-prompt layouts, the scored
positions as indices after it (`scored_positions`), both timed apart.

    python benchmarks/host_prep.py                       # the default shapes
    python benchmarks/host_prep.py --json benchmarks/results/host_prep_cpu.json
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from trl_nca.group_forward import group_rows
from trl_nca.layouts import DataCollatorForAnyLayout, ModelShape, dense_mask, layout_cost, make_collator
from trl_nca.layouts.prompt_cache import call_overhead_tokens
from trl_nca.scoring import scored_positions

# (name, prompts, K, prompt length range, response length range)
SHAPES = [
    ("K16 x 4 prompts, P 130-160, R 256-1024", 4, 16, (130, 160), (256, 1024)),
    ("K16 x 8 prompts, P ~2048, R 256-1024", 8, 16, (1980, 2100), (256, 1024)),
    ("K4 x 1 prompt, UltraFeedback (P ~120, R ~290)", 1, 4, (90, 150), (190, 390)),
]
# (name, hidden, layers, body parameters, heads): the cost model's view of two model sizes
DIMS = [("8B", 4096, 32, 6_980_000_000, 32), ("1.5B", 1536, 28, 1_310_000_000, 12)]


def examples_of(prompts: int, k: int, prompt_range, response_range, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(prompts):
        prompt = [rng.randrange(3, 30000) for _ in range(rng.randint(*prompt_range))]
        completions = [[rng.randrange(3, 30000) for _ in range(rng.randint(*response_range))] for _ in range(k)]
        rows.append({"prompt_ids": prompt, "completion_ids": completions, "rewards": [0.0] * k})
    return rows


def timed(function, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def tensor_bytes(batch: dict) -> tuple[int, int]:
    tensors = [v for v in batch.values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in tensors), max(t.numel() for t in tensors)


def grpo_rows(examples: list[dict], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The same groups as GRPO holds them: `[left-padded prompt | right-padded completion]` per completion."""
    prompt_length = max(len(e["prompt_ids"]) for e in examples)
    completion_length = max(len(c) for e in examples for c in e["completion_ids"])
    ids, mask = [], []
    for e in examples:
        for c in e["completion_ids"]:
            left = prompt_length - len(e["prompt_ids"])
            right = completion_length - len(c)
            ids.append([pad] * left + e["prompt_ids"] + c + [pad] * right)
            mask.append([0] * left + [1] * (len(e["prompt_ids"]) + len(c)) + [0] * right)
    return torch.tensor(ids), torch.tensor(mask), completion_length


def measure(repeats: int) -> list[dict]:
    results = []
    for name, prompts, k, prompt_range, response_range in SHAPES:
        examples = examples_of(prompts, k, prompt_range, response_range)
        rows = [(len(e["prompt_ids"]), [len(c) for c in e["completion_ids"]]) for e in examples]
        choice = {}
        for dims, hidden, layers, body, heads in DIMS:
            shape = ModelShape(hidden, layers, body, "dense", call_overhead_tokens("cuda"), "cuda", heads, 2)
            costs = {layout: layout_cost(layout, rows, shape) for layout in ("padded", "mask", "cache")}
            choice[dims] = min(costs, key=costs.get)
        ids, mask, keep = grpo_rows(examples)
        grouping, _ = timed(lambda: group_rows(ids, mask, keep), repeats)
        for layout in ("padded", "mask", "cache"):
            collator = make_collator(layout, pad_token_id=0, max_length=None, truncation_mode="keep_start",
                                     pad_to_multiple_of=None, call_overhead=call_overhead_tokens("cuda"))  # fmt: skip
            seconds, batch = timed(lambda: collator(examples), repeats)
            copied, largest = tensor_bytes(batch)
            row = {"shape": name, "layout": layout, "collate_s": round(seconds, 4), "copied_MB": round(copied / 1e6, 2),
                   "largest_tensor": largest, "online_grouping_s": round(grouping, 4),
                   "auto_on_cuda": choice}  # fmt: skip
            if "completion_mask" in batch:  # online: the scored positions, made on the host
                positions, _ = timed(lambda: scored_positions(batch["completion_mask"]), repeats)
                row["online_positions_s"] = round(positions, 4)
            if layout == "mask":
                # device work where a GPU runs it; timed once here (on this CPU it is slow, and not host preparation)
                build, built = timed(lambda: dense_mask(batch["segment_ids"], batch["row_ids"]), 1)
                row["mask_build_s_where_the_ids_are"] = round(build, 4)
                row["mask_elements"] = built.numel()
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def table(results: list[dict]) -> str:
    lines = ["| shape | layout | collate (s) | / padded | copied to the device (MB) | largest tensor "
             "| online grouping (s) | online scored positions (s) | mask built from the ids (s, device work) | auto on CUDA (8B / 1.5B) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    padded = {r["shape"]: r["collate_s"] for r in results if r["layout"] == "padded"}
    for r in results:
        build = r.get("mask_build_s_where_the_ids_are", "")
        lines.append(
            f"| {r['shape']} | {r['layout']} | {r['collate_s']:.4f} | {r['collate_s'] / padded[r['shape']]:.2f} "
            f"| {r['copied_MB']:.2f} | {r['largest_tensor']:,} | {r['online_grouping_s']:.4f} "
            f"| {r.get('online_positions_s', '')} | {build} "
            f"| {r['auto_on_cuda']['8B']} / {r['auto_on_cuda']['1.5B']} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.repeats)
    print(table(results))
    if args.json:
        Path(args.json).write_text(
            json.dumps({"results": results, "threads": 1, "torch": torch.__version__}, indent=1)
        )


if __name__ == "__main__":
    sys.exit(main())
