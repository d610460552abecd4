"""Online NCA against TRL's GRPOTrainer and one offline round, over seeds and tasks, at equal completions generated.

Every run starts from SmolLM2-135M-Instruct with a fresh LoRA adapter (r=16, all linear layers, the run's seed),
sees the task's training questions in the same order, K completions per question, with the same learning rate, and
generates the same number of completions in all. Methods (each with its class's defaults unless a knob is given):

  nca          OnlineNCATrainer (OnlineNCAConfig's defaults: sampler reference, beta 0.1, reward temperature 1.0)
  infonca      OnlineInfoNCATrainer (the same defaults)
  grpo         TRL's GRPOTrainer with GRPOConfig's defaults (loss "dapo", rewards scaled per group, no KL)
  offline-nca  K completions per question sampled once from the start, then NCATrainer on them (the demo's offline
               mode), with as many completions as the online runs generate

A knob is written after the method: `nca[reward_temperature=0.5]`, `nca[reference=initial]`, `nca[num_iterations=2]`
(each generation used for 2 optimizer steps; the run takes twice the steps, so it generates as many completions),
`nca[k=4]` (K changes the questions per step so that the completions per step stay equal), `nca[logratio=mean]`
(r_k from the mean of the completion's token log-ratios instead of their sum: per-token normalisation).

Tasks (`benchmarks/online_tasks.py`): `arithmetic` (the demo's) and `partial` (two-step problems with partial credit).
Held-out greedy answers are scored at the start, every `--eval_every` generations and at the end, with two checks:
`strict` (the last integer is right: what the reward pays for) and `anywhere` (the right number appears in the
answer), in all and per kind.

Each finished run appends one JSON line to `--records` (runs already there are skipped, so the script resumes);
`--summarize` prints the table (mean and spread over seeds) and draws the plot from the records.

    python benchmarks/online_vs_grpo.py --records R.jsonl                                   # hours on CPU
    python benchmarks/online_vs_grpo.py --records KNOBS.jsonl --tasks partial \
        --methods "nca[reward_temperature=0.3],nca[reward_temperature=0.1,k=4],..."
    python benchmarks/online_vs_grpo.py --records R.jsonl,KNOBS.jsonl --summarize --plot PLOT.png

The commands behind each recorded table: docs/benchmarks.md#online-nca-against-grpo-benchmarksonline_vs_grpopy.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from online_tasks import score_answers, task  # noqa: E402

METHODS = ("nca", "grpo", "offline-nca", "infonca")
# the settings that name a method's objective; each record keeps their values
RESOLVED = ("reward_temperature", "beta", "reference", "loss_type", "scale_rewards", "num_iterations", "epsilon",
            "num_generations")  # fmt: skip


def split_methods(text: str) -> list[str]:
    """`"nca,nca[reward_temperature=0.1,k=4],grpo"` -> the three specs: commas inside brackets separate knobs."""
    return [spec for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if spec.strip()]


def parse_method(spec: str) -> tuple[str, dict]:
    """`"nca[reward_temperature=0.5,k=4]"` -> `("nca", {"reward_temperature": 0.5, "k": 4})`."""
    match = re.fullmatch(r"([a-z-]+)(?:\[(.*)\])?", spec)
    if match is None or match.group(1) not in METHODS:
        raise ValueError(f"unknown method {spec!r}: one of {METHODS}, optionally with [knob=value,...]")
    knobs = {}
    for item in filter(None, (match.group(2) or "").split(",")):
        key, value = item.split("=")
        try:
            knobs[key] = json.loads(value)
        except json.JSONDecodeError:
            knobs[key] = value
    return match.group(1), knobs


class HeldoutCurve(TrainerCallback):
    """Held-out scores at the given optimizer steps, against completions generated and time spent (evaluation
    excluded)."""

    def __init__(self, evaluate, at_steps, completions_per_step: int, before: int = 0, start=None):
        self.evaluate, self.at_steps = evaluate, set(at_steps)
        self.per_step, self.before = completions_per_step, before
        self.points = [] if start is None else [start]
        self.started, self.paused = None, 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at_steps or state.global_step == state.max_steps:
            seconds = time.time() - self.started - self.paused
            paused = time.time()
            scores = self.evaluate(model)
            self.paused += time.time() - paused
            completions = round(self.before + state.global_step * self.per_step)
            self.points.append({"step": state.global_step, "completions": completions, "seconds": round(seconds, 1),
                                **scores})  # fmt: skip


def run(method_spec: str, task_name: str, seed: int, args, base, tokenizer, start_scores) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    from trl_nca import NCAConfig, NCATrainer, OnlineInfoNCATrainer, OnlineNCAConfig, OnlineNCATrainer
    from trl_nca.demo import local_run_args
    from trl_nca.generation import build_reward_dataset

    method, knobs = parse_method(method_spec)
    k = int(knobs.pop("k", args.k))
    per_step = args.prompts_per_step * args.k  # completions per generation, equal for every method and knob
    prompts_per_step = per_step // k
    # num_iterations > 1 reuses each generation for that many optimizer steps: the run takes that many times the
    # steps, so that it generates as many completions as the others
    iterations = int(knobs.get("num_iterations", 1))
    steps = args.steps * iterations
    make, heldout_of, reward = task(task_name)
    prompts = make(args.steps * prompts_per_step, seed)
    heldout = heldout_of(args.heldout_prompts, seed)
    evaluate = evaluator(tokenizer, heldout)
    out = Path(args.out) / f"{task_name}-{seed}-{method_spec}"
    torch.manual_seed(seed)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(learning_rate=args.learning_rate, max_steps=steps, disable_tqdm=True,
                  **local_run_args(seed, torch.cuda.is_available()))  # fmt: skip
    micro = min(per_step, 32)
    online = dict(common, per_device_train_batch_size=micro, gradient_accumulation_steps=per_step // micro,
                  num_generations=k, max_completion_length=args.max_new_tokens, temperature=args.temperature,
                  shuffle_dataset=False)  # fmt: skip
    model = copy.deepcopy(base)
    at_steps = [s * iterations for s in range(args.eval_every, args.steps, args.eval_every)]
    start_point = {"step": 0, "completions": 0, "seconds": 0.0, **start_scores}
    started = time.time()
    if method == "offline-nca":
        dataset, _ = build_reward_dataset(model, tokenizer, prompts, reward, k=k, temperature=args.temperature,
                                          max_new_tokens=args.max_new_tokens, seed=seed)  # fmt: skip
        sampling = time.time() - started
        curve = HeldoutCurve(evaluate, at_steps, 0, before=len(prompts) * k, start={**start_point})
        curve.points[0]["completions"] = len(prompts) * k
        curve.points[0]["seconds"] = round(sampling, 1)
        curve.paused -= sampling  # the sampling time counts
        config = NCAConfig(output_dir=str(out), **common, per_device_train_batch_size=prompts_per_step,
                           beta=0.1, reward_temperature=0.1, max_length=256, **knobs)  # fmt: skip
        trainer = NCATrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)  # fmt: skip
    else:
        curve = HeldoutCurve(evaluate, at_steps, per_step / iterations, start=start_point)
        train = Dataset.from_list(prompts)
        if method == "grpo":
            config = GRPOConfig(output_dir=str(out), **online, **knobs)
            trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=train,
                                  processing_class=tokenizer, peft_config=lora)  # fmt: skip
        else:
            cls = OnlineNCATrainer if method == "nca" else OnlineInfoNCATrainer
            if knobs.pop("logratio", "sum") == "mean":
                cls = length_normalized(cls)
            config = OnlineNCAConfig(output_dir=str(out), **online, **knobs)
            trainer = cls(model=model, reward_funcs=reward, args=config, train_dataset=train,
                          processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.add_callback(curve)
    trainer.train()
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {
        "task": task_name,
        "seed": seed,
        "method": method_spec,
        "points": curve.points,
        "final": {key: curve.points[-1][key] for key in ("strict", "anywhere", "by_kind")},
        "completions": curve.points[-1]["completions"],
        "train_seconds": curve.points[-1]["seconds"],
        "sample_reward_first_last": [rewards[0], rewards[-1]] if rewards else None,
        # what the method's name resolved to, so that a record still says what ran after a default changes
        "config": {
            key: json.loads(json.dumps(getattr(config, key), default=str)) for key in RESOLVED if hasattr(config, key)
        },
    }


def length_normalized(cls):
    """The knob `logratio=mean`: r_k = beta * the mean over the completion's tokens of its log-ratio, instead of the
    sum (the paper's), so that each token's gradient is divided by its completion's length, as in GRPO's
    `loss_type="grpo"`. (The sum already weighs every token of a batch alike, as DAPO's per-token loss does, up to
    DAPO's 1 / tokens-in-the-batch factor, a scale that Adam mostly ignores.)"""

    class LengthNormalized(cls):
        def _group_loss(self, logps, ref_logps, inputs, group_size):
            lengths = inputs["completion_mask"].sum(1).clamp(min=1)
            return super()._group_loss(logps / lengths, ref_logps / lengths, inputs, group_size)

    return LengthNormalized


def evaluator(tokenizer, heldout):
    from trl_nca.generation import generate

    def evaluate(model):
        answers = generate(model, tokenizer, [p["prompt"] for p in heldout], max_new_tokens=40, batch_size=32,
                           desc="held-out")  # fmt: skip
        return score_answers([a[0] for a in answers], heldout)

    return evaluate


def mean_curve(runs: list[dict], key: str = "strict") -> list[tuple[int, float, float, float, int]]:
    """`(completions, mean, min, max, runs)` at each number of completions generated that some run scored at; a
    point's statistics are over the runs that have it (offline runs score every point at their full sample)."""
    by_completions: dict[int, list[float]] = {}
    for record in runs:
        last = {}
        for point in record["points"]:
            last[point["completions"]] = point[key]  # offline: the last score at its completions count
        for completions, value in last.items():
            by_completions.setdefault(completions, []).append(value)
    return [(c, statistics.mean(v), min(v), max(v), len(v)) for c, v in sorted(by_completions.items())]


def completions_to_reach(runs: list[dict], target: float) -> int | None:
    """The fewest completions from which on the mean over seeds stays at or above `target` (a curve that touches it
    and falls back below has not reached it), or None."""
    reached = None
    for completions, mean, _, _, _ in mean_curve(runs):
        if completions == 0:
            continue
        if mean < target - 1e-9:
            reached = None
        elif reached is None:
            reached = completions
    return reached


def summarize(records: list[dict], plot_path: str | None) -> str:
    lines = ["| task | method | seeds | start strict | end strict (mean ± sd) | change | end anywhere | completions "
             "| train s (median) | completions until at GRPO's end for good |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["method"]), []).append(record)
    for (task_name, method), runs in sorted(groups.items()):
        start = [r["points"][0]["strict"] for r in runs]
        end = [r["final"]["strict"] for r in runs]
        anywhere = [r["final"]["anywhere"] for r in runs]
        change = [e - s for s, e in zip(start, end)]
        sd = statistics.stdev(end) if len(end) > 1 else 0.0
        grpo = groups.get((task_name, "grpo"))
        reach = "-"
        if grpo and method != "grpo":
            needed = completions_to_reach(runs, statistics.mean(r["final"]["strict"] for r in grpo))
            reach = "not reached" if needed is None else f"{needed} ({needed / grpo[0]['completions']:.0%})"
        lines.append(
            f"| {task_name} | {method} | {len(runs)} | {statistics.mean(start):.3f} | {statistics.mean(end):.3f} ± "
            f"{sd:.3f} | {statistics.mean(change):+.3f} | {statistics.mean(anywhere):.3f} | {runs[0]['completions']} "
            f"| {statistics.median(r['train_seconds'] for r in runs):.0f} | {reach} |"
        )
    lines += ["", "Per kind (start strict -> end strict / end anywhere, mean over seeds):", ""]
    for (task_name, method), runs in sorted(groups.items()):
        kinds = sorted(runs[0]["final"]["by_kind"])
        cells = []
        for kind in kinds:
            strict = statistics.mean(r["final"]["by_kind"][kind]["strict"] for r in runs)
            anywhere = statistics.mean(r["final"]["by_kind"][kind]["anywhere"] for r in runs)
            start = statistics.mean(r["points"][0]["by_kind"][kind]["strict"] for r in runs)
            cells.append(f"{kind} {start:.2f}->{strict:.2f}/{anywhere:.2f}")
        lines.append(f"- {task_name} {method}: " + ", ".join(cells))
    if plot_path:
        plot(groups, plot_path)
    return "\n".join(lines)


def plot(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        panel = [(method, runs) for (t, method), runs in sorted(groups.items()) if t == task_name]
        panel.sort(key=lambda item: item[0].startswith("infonca"))  # drawn last, dashed, over NCA's identical line
        # the knob study draws up to 11 lines a panel: tab20 then, tab10's stronger colours otherwise
        axis.set_prop_cycle(color=(plt.cm.tab10 if len(panel) <= 10 else plt.cm.tab20).colors)
        for method, runs in panel:
            x, means, lows, highs, _ = zip(*mean_curve(runs))
            # InfoNCA dashed: with the sampler reference it takes NCA's steps, and lines on top of each other
            style = "--" if method.startswith("infonca") else "-"
            line = axis.plot(x, means, marker="o", linestyle=style, label=f"{method} ({len(runs)} seeds)")[0]
            axis.fill_between(x, lows, highs, alpha=0.12, color=line.get_color())
        axis.set_title(task_name)
        axis.set_xlabel("completions generated")
        axis.set_ylabel("held-out greedy accuracy (strict)")
        axis.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M + LoRA: mean over seeds, band = min..max")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated; knobs in brackets")
    parser.add_argument("--tasks", default="arithmetic,partial")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--steps", type=int, default=8, help="optimizer steps (one generation each, online)")
    parser.add_argument("--prompts_per_step", type=int, default=4)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--heldout_prompts", type=int, default=64)
    parser.add_argument("--eval_every", type=int, default=2, help="held-out scores every this many generations")
    parser.add_argument("--out", default="runs/online_vs_grpo")
    parser.add_argument(
        "--records",
        required=True,
        help="JSON lines, one per finished run (appended); comma-separated files with --summarize",
    )
    parser.add_argument(
        "--summarize", action="store_true", help="print the table of the --tasks and --methods in --records and stop"
    )
    parser.add_argument("--plot", default=None)
    args = parser.parse_args(argv)

    if args.summarize:  # several record files may be summarized together (the study and its knobs)
        records = [json.loads(line) for p in args.records.split(",") for line in Path(p).read_text().splitlines()]
        tasks, methods = args.tasks.split(","), split_methods(args.methods)
        records = [r for r in records if r["task"] in tasks and r["method"] in methods]
        print(summarize(records, args.plot))
        return
    path = Path(args.records)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    from trl_nca.demo import load_model

    base, tokenizer = load_model(args.model_dir)
    done = {(r["task"], r["seed"], r["method"]) for r in records}
    methods = split_methods(args.methods)
    # seeds outermost, so that an interrupted study has every method on the first seeds
    for seed in [int(s) for s in args.seeds.split(",")]:
        for task_name in args.tasks.split(","):
            todo = [m for m in methods if (task_name, seed, m) not in done]
            if not todo:
                continue
            _, heldout_of, _ = task(task_name)
            start = evaluator(tokenizer, heldout_of(args.heldout_prompts, seed))(base)
            for method in todo:
                record = run(method, task_name, seed, args, base, tokenizer, start)
                record["settings"] = {k: v for k, v in vars(args).items() if k not in ("records", "summarize")}
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps({k: record[k] for k in ("task", "seed", "method", "final", "train_seconds")}),
                      flush=True)  # fmt: skip
    print(summarize([json.loads(line) for line in path.read_text().splitlines()], args.plot))


if __name__ == "__main__":
    main()
