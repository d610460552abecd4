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

Tasks (`benchmarks/online_tasks.py`): `arithmetic` (the demo's) and `twodigit` (two-digit sums and differences);
`partial` (partial credit) is kept for the earlier study's records. Each task's question space is split once into
train, validation and test sides (by a hash of each fact); training questions come from the train side, and the
fixed `--split` set (validation for tuning, test for the study) is scored with greedy answers at the start, every
`--eval_every` generations and at the end, with two checks: `strict` (the last integer is right: what the reward
pays for) and `anywhere` (the right number appears in the answer), in all, per kind and per question.

Each finished run appends one JSON line to `--records` (runs already there are skipped, so the script resumes);
`--summarize` prints the table (mean and spread over seeds) and draws the plot from the records.

    python benchmarks/online_vs_grpo.py --records TUNING.jsonl --split validation --seeds 100,101 \
        --methods "nca[learning_rate=0.00025],nca,..."                                    # tuning
    python benchmarks/online_vs_grpo.py --records R.jsonl                                   # the study: hours on CPU
    python benchmarks/online_vs_grpo.py --records R.jsonl --summarize --plot PLOT.png       # tables, paired intervals
    benchmarks/run_study.sh R.jsonl test "0 1 2" "arithmetic twodigit" "grpo,nca"          # one process a run

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
from intervals import paired_interval, t_interval  # noqa: E402,F401 - paired_interval: the tests import it here
from online_tasks import score_answers, task  # noqa: E402

METHODS = ("nca", "grpo", "offline-nca", "infonca")
# the settings that name a method's objective; each record keeps their values
RESOLVED = ("learning_rate", "reward_temperature", "beta", "reference", "loss_type", "scale_rewards", "num_iterations", "epsilon",
            "num_generations")  # fmt: skip


def split_methods(text: str) -> list[str]:
    """`"nca,nca[reward_temperature=0.1,k=4],grpo"` -> the three specs: commas inside brackets separate knobs."""
    return [spec for spec in re.findall(r"[^,\[]+(?:\[[^\]]*\])?", text) if spec.strip()]


def parse_method(spec: str, known: tuple[str, ...] = METHODS) -> tuple[str, dict]:
    """`"nca[reward_temperature=0.5,k=4]"` -> `("nca", {"reward_temperature": 0.5, "k": 4})`; `known`: the study's
    methods (the offline study has its own)."""
    match = re.fullmatch(r"([a-z_-]+)(?:\[(.*)\])?", spec)
    if match is None or match.group(1) not in known:
        raise ValueError(f"unknown method {spec!r}: one of {known}, optionally with [knob=value,...]")
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


def run(method_spec: str, task_name: str, seed: int, args, base, tokenizer, evaluation, start_scores) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from trl import GRPOConfig

    from trl_nca import (NCAConfig, NCATrainer, OnlineInfoNCATrainer, OnlineNCAConfig, OnlineNCATrainer,
                         PromptSharingGRPOTrainer)  # fmt: skip
    from trl_nca.demo import local_run_args
    from trl_nca.generation import build_reward_dataset

    wall = time.time()
    method, knobs = parse_method(method_spec)
    k = int(knobs.pop("k", args.k))
    learning_rate = float(knobs.pop("learning_rate", args.learning_rate))
    per_step = args.prompts_per_step * args.k  # completions per generation, equal for every method and knob
    prompts_per_step = per_step // k
    # num_iterations > 1 reuses each generation for that many optimizer steps: the run takes that many times the
    # steps, so that it generates as many completions as the others
    iterations = int(knobs.get("num_iterations", 1))
    steps = args.steps * iterations
    the_task = task(task_name)
    prompts = the_task.train(args.steps * prompts_per_step, seed)  # the train side only
    evaluate = evaluator(tokenizer, evaluation)
    out = Path(args.out) / f"{task_name}-{seed}-{method_spec}"
    torch.manual_seed(seed)
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    common = dict(learning_rate=learning_rate, max_steps=steps, disable_tqdm=True,
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
        dataset, _ = build_reward_dataset(model, tokenizer, prompts, the_task.reward, k=k,
                                          temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                                          seed=seed)  # fmt: skip
        sampling = time.time() - started
        curve = HeldoutCurve(evaluate, at_steps, 0, before=len(prompts) * k, start={**start_point})
        curve.points[0]["completions"] = len(prompts) * k
        curve.points[0]["seconds"] = round(sampling, 1)
        curve.paused -= sampling  # the sampling time counts
        config = NCAConfig(output_dir=str(out), **common, per_device_train_batch_size=prompts_per_step,
                           beta=0.1, max_length=256, **knobs)  # fmt: skip
        trainer = NCATrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora)  # fmt: skip
    else:
        curve = HeldoutCurve(evaluate, at_steps, per_step / iterations, start=start_point)
        train = Dataset.from_list(prompts)
        if method == "grpo":
            # TRL's GRPO objective and GRPOConfig's defaults; PromptSharingGRPOTrainer computes the same log-probs
            # in less time (docs/online.md); here a generation is one micro-batch, so the sampling order is GRPO's
            config = GRPOConfig(output_dir=str(out), **online, **knobs)
            trainer = PromptSharingGRPOTrainer(model=model, reward_funcs=the_task.reward, args=config,
                                               train_dataset=train, processing_class=tokenizer,
                                               peft_config=lora)  # fmt: skip
        else:
            cls = OnlineNCATrainer if method == "nca" else OnlineInfoNCATrainer
            if knobs.pop("logratio", "sum") == "mean":
                cls = length_normalized(cls)
            config = OnlineNCAConfig(output_dir=str(out), **online, **knobs)
            trainer = cls(model=model, reward_funcs=the_task.reward, args=config, train_dataset=train,
                          processing_class=tokenizer, peft_config=lora)  # fmt: skip
    trainer.add_callback(curve)
    trainer.train()
    history = trainer.state.log_history
    rewards = [e["reward"] for e in history if "reward" in e]
    return {
        "task": task_name,
        "seed": seed,
        "method": method_spec,
        "split": args.split,
        "points": curve.points,
        "final": {key: curve.points[-1][key] for key in ("strict", "anywhere", "by_kind")},
        "completions": curve.points[-1]["completions"],
        "train_seconds": curve.points[-1]["seconds"],
        "wall_seconds": round(time.time() - wall, 1),
        "grad_norm": [e["grad_norm"] for e in history if "grad_norm" in e],
        "sample_reward_first_last": [rewards[0], rewards[-1]] if rewards else None,
        "train_questions": [p["prompt"][0]["content"] for p in prompts],
        # what ran, resolved: the method's settings, then the whole training config
        "config": {
            key: json.loads(json.dumps(getattr(config, key), default=str)) for key in RESOLVED if hasattr(config, key)
        },
        "training_args": json.loads(json.dumps(config.to_dict(), default=str)),
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


def evaluator(tokenizer, questions):
    from trl_nca.generation import generate

    def evaluate(model):
        answers = generate(model, tokenizer, [p["prompt"] for p in questions], max_new_tokens=40, batch_size=64,
                           desc="evaluation")  # fmt: skip
        return score_answers([a[0] for a in answers], questions)

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


def _spread(values: list[float]) -> str:
    return f"{statistics.stdev(values):.3f}" if len(values) > 1 else "n/a"


def summarize(records: list[dict], plot_path: str | None, known: tuple[str, ...] = METHODS,
              baseline: str = "grpo") -> str:
    """The table per (task, method), the best setting per method on validation records, and on test records the
    paired comparison of every method with the task's `baseline` run (the primary endpoint)."""
    split = {r.get("split", "heldout") for r in records}
    lines = [f"Records: {len(records)} runs, evaluated on: {', '.join(sorted(split))}", "",
             "| task | method | seeds | start strict | end strict (mean ± sd) | change | end anywhere | completions "
             "| train s (median) | grad norm (median) |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["method"]), []).append(record)
    for (task_name, method), runs in sorted(groups.items()):
        start = [r["points"][0]["strict"] for r in runs]
        end = [r["final"]["strict"] for r in runs]
        anywhere = [r["final"]["anywhere"] for r in runs]
        norms = [n for r in runs for n in r.get("grad_norm", [])]
        lines.append(
            f"| {task_name} | {method} | {len(runs)} | {statistics.mean(start):.3f} | {statistics.mean(end):.3f} ± "
            f"{_spread(end)} | {statistics.mean(end) - statistics.mean(start):+.3f} | {statistics.mean(anywhere):.3f} "
            f"| {runs[0]['completions']} | {statistics.median(r['train_seconds'] for r in runs):.0f} "
            f"| {statistics.median(norms) if norms else float('nan'):.3f} |"
        )
    lines += ["", "Per kind (start strict -> end strict / end anywhere, mean over seeds):", ""]
    for (task_name, method), runs in sorted(groups.items()):
        kinds = sorted(runs[0]["final"]["by_kind"])
        cells = []
        for kind in kinds:
            strict = statistics.mean(r["final"]["by_kind"][kind]["strict"] for r in runs)
            anywhere = statistics.mean(r["final"]["by_kind"][kind]["anywhere"] for r in runs)
            first = statistics.mean(r["points"][0]["by_kind"][kind]["strict"] for r in runs)
            n = runs[0]["final"]["by_kind"][kind].get("n", "?")
            cells.append(f"{kind} (n={n}) {first:.2f}->{strict:.2f}/{anywhere:.2f}")
        lines.append(f"- {task_name} {method}: " + ", ".join(cells))
    if split == {"validation"}:
        lines += ["", "Best setting per method and task on the validation set (mean end strict over the tuning seeds):",
                  ""]  # fmt: skip
        best = best_settings(records, known)
        lines += [f"- {t} {m}: {spec} ({score:.3f})" for (t, m), (score, spec) in sorted(best.items())]
    elif any(r.get("split") == "test" for r in records):
        lines += ["", *compare(groups, baseline, known)]
    if plot_path:
        plot(groups, plot_path)
    return "\n".join(lines)


def best_settings(records: list[dict], known: tuple[str, ...] = METHODS) -> dict[tuple[str, str], tuple[float, str]]:
    """`{(task, method): (score, setting)}`: per task and method, the setting with the highest mean end strict
    accuracy over the tuning seeds, among the settings run on as many seeds as the method's most (a setting with
    fewer seeds done is not compared); a tie goes to the setting listed first in the records."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["method"]), []).append(record)
    most: dict[tuple[str, str], int] = {}
    for (task_name, method), runs in groups.items():
        key = (task_name, parse_method(method, known)[0])
        most[key] = max(most.get(key, 0), len(runs))
    best: dict[tuple[str, str], tuple[float, str]] = {}
    for (task_name, method), runs in groups.items():
        key = (task_name, parse_method(method, known)[0])
        score = statistics.mean(r["final"]["strict"] for r in runs)
        if len(runs) == most[key] and (key not in best or score > best[key][0]):
            best[key] = (score, method)
    return best


def _matrix(runs: list[dict], seeds: list[int], at: int | None = None, key: str = "each_strict"):
    """Seeds x questions, 0/1: each run's per-question results at `at` completions (its last point if None)."""
    import numpy as np

    by_seed = {r["seed"]: r for r in runs}
    rows = []
    for seed in seeds:
        points = by_seed[seed]["points"]
        point = points[-1] if at is None else [p for p in points if p["completions"] <= at][-1]
        rows.append([int(c) for c in point[key]])
    return np.array(rows, dtype=float)


def verdict(low: float, high: float, first: str, second: str, margin: float = 0.03) -> str:
    if -margin <= low and high <= margin:
        return f"tie (the interval lies inside ±{margin})"
    if low > 0:
        return f"{first} ahead"
    if high < 0:
        return f"{second} ahead"
    return "not separated (the interval holds 0 and reaches past ±0.03)"


def compare(groups: dict[tuple[str, str], list[dict]], baseline: str = "grpo",
            known: tuple[str, ...] = METHODS) -> list[str]:
    """Every method against its task's `baseline` run, paired by seed (same training questions, same start) and by
    test question. Primary endpoint: final strict accuracy on the test set at equal completions; beside the
    bootstrap interval (which the verdict reads), Student's t interval over the per-seed differences
    (`intervals.py` says why both). Second target: the method's accuracy at <= 75% of the completions against the
    baseline's final accuracy."""
    import numpy as np

    lines = [f"Paired against {baseline} (difference = method - {baseline}; 95% bootstrap interval over seeds and "
             "questions, and 95% t interval over seeds):", "",
             "| task | method | paired seeds | final difference [95% bootstrap] | verdict | [95% t interval] "
             f"| >= +0.03 with CI above 0 | at <= 75% of completions - {baseline} final [95% CI] "
             "| smallest effect detectable (80% power) |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for task_name in sorted({t for t, _ in groups}):
        baselines = [m for t, m in groups if t == task_name and parse_method(m, known)[0] == baseline]
        if len(baselines) != 1:
            continue
        base_runs = groups[(task_name, baselines[0])]
        for (t, method), runs in sorted(groups.items()):
            if t != task_name or method == baselines[0]:
                continue
            seeds = sorted({r["seed"] for r in runs} & {r["seed"] for r in base_runs})
            if not seeds:
                continue
            diff = _matrix(runs, seeds) - _matrix(base_runs, seeds)
            mean, low, high = paired_interval(diff)
            target = "met" if mean >= 0.03 and low > 0 else "not met"
            total = runs[0]["completions"]
            early = [p["completions"] for p in runs[0]["points"] if 0 < p["completions"] <= 0.75 * total]
            if early:
                e_mean, e_low, e_high = paired_interval(_matrix(runs, seeds, at=early[-1]) - _matrix(base_runs, seeds))
                early_text = f"at {early[-1]}: {e_mean:+.3f} [{e_low:+.3f}, {e_high:+.3f}]"
            else:
                early_text = "not scored"
            per_seed = diff.mean(axis=1)
            detectable = (
                f"{2.8 * float(np.std(per_seed, ddof=1)) / len(seeds) ** 0.5:.3f}" if len(seeds) > 1 else "n/a"
            )
            _, t_low, t_high = t_interval(list(per_seed))
            t_text = f"[{t_low:+.3f}, {t_high:+.3f}]" if len(seeds) > 1 else "n/a"
            lines.append(
                f"| {task_name} | {method} vs {baselines[0]} | {len(seeds)} | {mean:+.3f} [{low:+.3f}, {high:+.3f}] "
                f"| {verdict(low, high, method, baselines[0])} | {t_text} | {target} "
                f"| {early_text} | {detectable} |"
            )
            lines.append(
                f"|  | per seed: {', '.join(f'{d:+.3f}' for d in per_seed)} |  |  |  |  |  |  |  |"
            )
    return lines


def plot(groups, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        panel = [(method, runs) for (t, method), runs in sorted(groups.items()) if t == task_name]
        axis.set_prop_cycle(color=(plt.cm.tab10 if len(panel) <= 10 else plt.cm.tab20).colors)
        for method, runs in panel:
            x, means, _, _, _ = zip(*mean_curve(runs))
            line = axis.plot(x, means, marker="o", linewidth=2, label=f"{method} (mean of {len(runs)} seeds)")[0]
            for record in runs:  # one thin line per seed
                points = [(p["completions"], p["strict"]) for p in record["points"]]
                axis.plot(*zip(*points), color=line.get_color(), alpha=0.25, linewidth=0.8)
        axis.set_title(task_name)
        axis.set_xlabel("completions generated")
        axis.set_ylabel(f"{next(iter(groups.values()))[0].get('split', 'held-out')} accuracy (strict, greedy)")
        axis.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M + LoRA: mean over seeds (thick), each seed (thin)")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def study_parser(description: str, methods: str, steps: int, k: int, out: str) -> argparse.ArgumentParser:
    """The options both studies share (the offline study adds its own): what runs, where it is scored, the records."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--methods", default=methods, help="comma-separated; knobs in brackets")
    parser.add_argument("--tasks", default="arithmetic,twodigit")
    parser.add_argument("--seeds", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--split", default="test", choices=("validation", "test"),
                        help="where the runs are scored: validation for tuning, test for the reported study")
    parser.add_argument("--eval_prompts", type=int, default=None,
                        help="size of the fixed evaluation set (default: 256 test, 128 validation)")
    parser.add_argument("--model_dir", default="runs/smollm2")
    parser.add_argument("--steps", type=int, default=steps, help="optimizer steps")
    parser.add_argument("--prompts_per_step", type=int, default=4)
    parser.add_argument("--k", type=int, default=k)
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="unless the method sets learning_rate=")
    parser.add_argument("--max_new_tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--out", default=out)
    parser.add_argument(
        "--records",
        required=True,
        help="JSON lines, one per finished run (appended); comma-separated files with --summarize",
    )
    parser.add_argument(
        "--summarize", action="store_true", help="print the table of the --tasks and --methods in --records and stop"
    )
    parser.add_argument("--plot", default=None)
    return parser


def parse_study_args(parser: argparse.ArgumentParser, argv) -> argparse.Namespace:
    args = parser.parse_args(argv)
    if args.eval_prompts is None:
        args.eval_prompts = 256 if args.split == "test" else 128
    return args


def read_records(args) -> list[dict]:
    """The records of `--records` (several files, comma-separated) of the `--tasks` and `--methods` asked for."""
    records = [json.loads(line) for p in args.records.split(",") for line in Path(p).read_text().splitlines()]
    tasks, methods = args.tasks.split(","), split_methods(args.methods)
    return [r for r in records if r["task"] in tasks and r["method"] in methods]


def run_study(args, run_one) -> None:
    """Every (seed, task, method) of `args` not yet in `--records`: `run_one(method, task, seed, args, base,
    tokenizer, evaluation, start)` returns a run's record, appended as one JSON line as soon as it ends."""
    path = Path(args.records)
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    for record in records:  # one file, one evaluation set: a tuning run is never summarized as a test run
        scored = (record.get("split"), record["settings"].get("eval_prompts"))
        if scored != (args.split, args.eval_prompts):
            raise SystemExit(f"{path} holds runs scored on {scored}, not on {(args.split, args.eval_prompts)}")
    from trl_nca.demo import load_model

    base, tokenizer = load_model(args.model_dir)
    done = {(r["task"], r["seed"], r["method"]) for r in records}
    methods = split_methods(args.methods)
    starts: dict[str, dict] = {}
    # seeds outermost, so that an interrupted study has every method on the first seeds
    for seed in [int(s) for s in args.seeds.split(",")]:
        for task_name in args.tasks.split(","):
            todo = [m for m in methods if (task_name, seed, m) not in done]
            if not todo:
                continue
            evaluation = task(task_name).evaluation(args.split, args.eval_prompts)
            if task_name not in starts:  # the start is the same model and set for every seed: scored once
                starts[task_name] = start_scores(path, task_name, args, lambda: evaluator(tokenizer, evaluation)(base))
            for method in todo:
                record = run_one(method, task_name, seed, args, base, tokenizer, evaluation, starts[task_name])
                record["settings"] = {k: v for k, v in vars(args).items() if k not in ("records", "summarize")}
                with path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
                print(json.dumps({k: record[k] for k in ("task", "seed", "method", "final", "train_seconds")}),
                      flush=True)  # fmt: skip


def main(argv=None):
    parser = study_parser(__doc__.splitlines()[0], "nca,grpo", steps=8, k=8, out="runs/online_vs_grpo")
    parser.add_argument("--eval_every", type=int, default=8, help="scores every this many generations (and at the end)")
    args = parse_study_args(parser, argv)
    if args.summarize:  # several record files may be summarized together
        print(summarize(read_records(args), args.plot))
        return
    run_study(args, run)


def start_scores(path: Path, task_name: str, args, score) -> dict:
    """The starting model's scores on the evaluation set, kept beside the records (`PATH.start.json`) so that
    parallel and resumed runs score it once."""
    key = f"{task_name}/{args.split}/{args.eval_prompts}/{args.model_dir}"
    return cached_json(Path(f"{path}.start.json"), key, score)


def cached_json(cache: Path, key: str, compute):
    """`compute()`'s value under `key` in the JSON file `cache`, computed once: what a study needs once per task
    (the start's scores, fixed rows), shared by its parallel and resumed runs."""
    known = json.loads(cache.read_text()) if cache.exists() else {}
    if key not in known:
        known[key] = compute()
        latest = json.loads(cache.read_text()) if cache.exists() else {}
        cache.write_text(json.dumps({**latest, **known}))
    return known[key]


if __name__ == "__main__":
    main()
