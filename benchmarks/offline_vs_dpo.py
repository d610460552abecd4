"""Offline NCA against DPO from the same K scored answers, over seeds and tasks: tuned on validation, tested on the
fixed test set, with the likelihood of the best answer over training (the paper's Figure 2).

For each (task, seed), K answers to each of `--train_prompts` training questions (the train side of the task's split,
one set per seed) are sampled once from the starting model (SmolLM2-135M-Instruct), scored by the task's reward, and
cached; every method of that seed then trains from the same rows, from the same start (a fresh LoRA adapter, r=16,
all linear layers, initialised from the seed), with the same steps, prompts per step and row order:

  nca       NCATrainer on the K-answer rows
  infonca   InfoNCATrainer on the same rows
  dpo       TRL's DPOTrainer (loss "sigmoid") on the best-against-worst pair of each row
  nca_pair  TRL's DPOTrainer with loss_type="nca_pair" on the same pairs

Rows whose K rewards are all equal are left out for every method: they give DPO no pair, and NCA and InfoNCA no
signal at the start (uniform labels). A knob is written after the method: `nca[learning_rate=0.001,beta=0.01]`.

Each run scores the fixed `--split` set (validation for tuning, test for the study) with greedy answers at the end
(the start is the same model for every seed: scored once per task), per question, as `online_vs_grpo.py` does; and
every `--trend_every` steps the policy's log-likelihood of the best answer of fixed held-out rows (K answers sampled
once per task from the starting model to the first `--trend_prompts` questions of the scored set).

    python benchmarks/offline_vs_dpo.py --records TUNING.jsonl --split validation --seeds 100,101 \\
        --methods "nca[learning_rate=0.00025],nca,..."                                 # tuning
    python benchmarks/offline_vs_dpo.py --records R.jsonl --methods "nca[...],infonca[...],dpo[...],nca_pair[...]"
    python benchmarks/offline_vs_dpo.py --records R.jsonl --summarize --plot PLOT.png  # tables, intervals, Figure 2

The commands behind each recorded table: docs/benchmarks.md#offline-nca-against-dpo-benchmarksoffline_vs_dpopy.
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).parent))
from intervals import t_interval  # noqa: E402
from online_tasks import task  # noqa: E402
from online_vs_grpo import (  # noqa: E402
    best_settings,
    cached_json,
    compare,
    evaluator,
    parse_method,
    parse_study_args,
    read_records,
    run_study,
    study_parser,
    summarize,
)

METHODS = ("nca", "infonca", "dpo", "nca_pair")
RESOLVED = ("learning_rate", "beta", "reward_temperature", "loss_type", "max_steps", "per_device_train_batch_size")
TREND_SEED = 12345  # the held-out trend rows: one sample per task, the same for every seed and method


def best_index(rewards: list[float]) -> int:
    """The best answer of a row: the first listed among the highest rewards (as the trainers' `logps/best`)."""
    return rewards.index(max(rewards))


def with_signal(rows: list[dict]) -> list[dict]:
    """The rows whose answers do not all score the same."""
    return [row for row in rows if max(row["rewards"]) > min(row["rewards"])]


def best_worst_pairs(rows: list[dict]) -> list[dict]:
    """DPO's pairs from K-answer rows with a signal: the best (first of the highest reward) against the worst (first
    of the lowest)."""
    pairs = []
    for row in rows:
        worst = row["rewards"].index(min(row["rewards"]))
        pairs.append({"prompt": row["prompt"], "chosen": row["completions"][best_index(row["rewards"])],
                      "rejected": row["completions"][worst]})  # fmt: skip
    return pairs


def sample_rows(base, tokenizer, questions: list[dict], the_task, args, seed: int) -> list[dict]:
    from trl_nca.generation import build_reward_dataset

    dataset, _ = build_reward_dataset(base, tokenizer, questions, the_task.reward, k=args.k,
                                      temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=seed,
                                      batch_size=64)  # fmt: skip
    return dataset.to_list()


@torch.no_grad()
def best_logps(model, tokenizer, rows: list[dict], batch_size: int = 16) -> float:
    """The policy's log-likelihood of each row's best answer given its prompt (summed over the answer's tokens,
    chat template as the trainers apply it), averaged over the rows: the quantity of the paper's Figure 2, computed
    the same way for every method."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    values = []
    for start in range(0, len(rows), batch_size):
        sequences = []
        for row in rows[start : start + batch_size]:
            prompt = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, tokenize=False)
            best = row["completions"][best_index(row["rewards"])]
            whole = tokenizer.apply_chat_template(row["prompt"] + best, tokenize=False)
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            answer_ids = tokenizer(whole[len(prompt) :], add_special_tokens=False)["input_ids"]
            sequences.append((prompt_ids, answer_ids))
        length = max(len(p) + len(a) for p, a in sequences)
        ids = torch.full((len(sequences), length), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        scored = torch.zeros_like(ids, dtype=torch.bool)
        for i, (p, a) in enumerate(sequences):
            ids[i, : len(p) + len(a)] = torch.tensor(p + a)
            attention[i, : len(p) + len(a)] = 1
            scored[i, len(p) : len(p) + len(a)] = True
        logits = model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits[:, :-1].float()
        token_logps = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None].to(device)).squeeze(-1)
        values += (token_logps * scored[:, 1:].to(device)).sum(-1).tolist()
    model.train(was_training)
    return statistics.fmean(values)


class BestLikelihood(TrainerCallback):
    """`best_logps` on the trend rows before training, every `every` optimizer steps, and at the end."""

    def __init__(self, tokenizer, rows: list[dict], every: int):
        self.tokenizer, self.rows, self.every = tokenizer, rows, every
        self.points: list[dict] = []
        self.seconds = 0.0  # spent measuring: not training time

    def _measure(self, step, model):
        started = time.time()
        self.points.append({"step": step, "logps_best": round(best_logps(model, self.tokenizer, self.rows), 4)})
        self.seconds += time.time() - started

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._measure(0, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            self._measure(state.global_step, model)


def make_trainer(method: str, knobs: dict, model, tokenizer, rows: list[dict], args, seed: int, out: Path):
    """The method's trainer on `rows` (K-answer rows) or their best-against-worst pairs, everything else equal."""
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from trl_nca import InfoNCATrainer, NCAConfig, NCATrainer
    from trl_nca.demo import local_run_args

    common = dict(output_dir=str(out), max_steps=args.steps, per_device_train_batch_size=args.prompts_per_step,
                  max_length=256, disable_tqdm=True, learning_rate=args.learning_rate, beta=args.beta,
                  **local_run_args(seed, torch.cuda.is_available()))  # fmt: skip
    lora = LoraConfig(r=16, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM")
    if method in ("nca", "infonca"):
        config = NCAConfig(**{**common, "reward_temperature": args.reward_temperature, **knobs})
        cls = NCATrainer if method == "nca" else InfoNCATrainer
        data = Dataset.from_list([{k: row[k] for k in ("prompt", "completions", "rewards")} for row in rows])
    else:
        config = DPOConfig(**{**common, "loss_type": "sigmoid" if method == "dpo" else "nca_pair", **knobs})
        cls, data = DPOTrainer, Dataset.from_list(best_worst_pairs(rows))
    # the same number of rows for every method, so the same seed gives the same order of prompts
    trainer = cls(model=model, args=config, train_dataset=data, processing_class=tokenizer, peft_config=lora)
    return trainer, config


_ROWS: dict[tuple[str, int], tuple[list[dict], list[dict], float]] = {}


def training_rows(task_name: str, seed: int, args, base, tokenizer) -> tuple[list[dict], list[dict], float]:
    """`(questions, rows, seconds)`: the seed's training questions and their K scored answers, sampled once per
    (task, seed) and kept in `--out` (every method of the seed, and a resumed study, reads the same rows)."""
    if (task_name, seed) not in _ROWS:
        the_task = task(task_name)
        questions = the_task.train(args.train_prompts, seed)
        cache = Path(args.out) / "rows" / f"{task_name}-{seed}-n{args.train_prompts}-k{args.k}.json"
        if cache.exists():
            saved = json.loads(cache.read_text())
        else:
            started = time.time()
            saved = {"rows": sample_rows(base, tokenizer, questions, the_task, args, seed),
                     "seconds": round(time.time() - started, 1)}  # fmt: skip
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(saved))
        _ROWS[(task_name, seed)] = (questions, saved["rows"], saved["seconds"])
    return _ROWS[(task_name, seed)]


def trend_rows(task_name: str, args, base, tokenizer, evaluation: list[dict]) -> list[dict]:
    """Held-out rows for the likelihood trend: K answers sampled once from the start to the first `--trend_prompts`
    questions of the scored set, those with a signal; kept beside the records (`PATH.trend.json`)."""
    key = f"{task_name}/{args.split}/{args.trend_prompts}/{args.k}/{args.model_dir}"

    def sample():
        questions = evaluation[: args.trend_prompts]
        return with_signal(sample_rows(base, tokenizer, questions, task(task_name), args, TREND_SEED))

    return cached_json(Path(f"{args.records}.trend.json"), key, sample)


def run(method_spec: str, task_name: str, seed: int, args, base, tokenizer, evaluation, start_scores) -> dict:
    wall = time.time()
    method, knobs = parse_method(method_spec, METHODS)
    questions, rows, sampling_seconds = training_rows(task_name, seed, args, base, tokenizer)
    signal = with_signal(rows)
    trend = BestLikelihood(tokenizer, trend_rows(task_name, args, base, tokenizer, evaluation), args.trend_every)
    out = Path(args.out) / f"{task_name}-{seed}-{method_spec}"
    trainer, config = make_trainer(method, knobs, copy.deepcopy(base), tokenizer, signal, args, seed, out)
    trainer.add_callback(trend)
    started = time.time()
    trainer.train()
    train_seconds = time.time() - started
    end = evaluator(tokenizer, evaluation)(trainer.model)
    history = trainer.state.log_history
    start_point = {"step": 0, "completions": len(rows) * args.k, **start_scores}
    end_point = {"step": trainer.state.global_step, "completions": len(rows) * args.k, **end}
    return {
        "task": task_name,
        "seed": seed,
        "method": method_spec,
        "split": args.split,
        "points": [start_point, end_point],
        "final": {key: end[key] for key in ("strict", "anywhere", "by_kind")},
        "completions": len(rows) * args.k,
        "rows": {"sampled": len(rows), "with_signal": len(signal),
                 "mean_reward": statistics.fmean(r for row in rows for r in row["rewards"])},  # fmt: skip
        "likelihood": trend.points,
        "trend_rows": len(trend.rows),
        "sampling_seconds": sampling_seconds,  # once per (task, seed), shared by its methods
        "train_seconds": round(train_seconds - trend.seconds, 1),
        "wall_seconds": round(time.time() - wall, 1),
        "loss": [e["loss"] for e in history if "loss" in e],
        "grad_norm": [e["grad_norm"] for e in history if "grad_norm" in e],
        "train_questions": [q["prompt"][0]["content"] for q in questions],
        "config": {
            key: json.loads(json.dumps(getattr(config, key), default=str)) for key in RESOLVED if hasattr(config, key)
        },
        "training_args": json.loads(json.dumps(config.to_dict(), default=str)),
    }


def likelihood_table(groups: dict[tuple[str, str], list[dict]]) -> list[str]:
    """Per (task, method): the mean over seeds of the best answer's log-likelihood at the start and the end, its
    change with a 95% t interval over seeds, and how many seeds ended below their start."""
    lines = ["The best answer's log-likelihood on the held-out trend rows (mean over seeds; change with its 95% t "
             "interval over seeds):", "",
             "| task | method | seeds | start | end | change [95% t interval] | seeds that fell |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for (task_name, method), runs in sorted(groups.items()):
        first = [r["likelihood"][0]["logps_best"] for r in runs]
        last = [r["likelihood"][-1]["logps_best"] for r in runs]
        change, low, high = t_interval([b - a for a, b in zip(first, last)])
        fell = sum(b < a for a, b in zip(first, last))
        lines.append(f"| {task_name} | {method} | {len(runs)} | {statistics.fmean(first):.2f} | "
                     f"{statistics.fmean(last):.2f} | {change:+.2f} [{low:+.2f}, {high:+.2f}] "
                     f"| {fell} of {len(runs)} |")  # fmt: skip
    return lines


def likelihood_band(runs: list[dict]) -> list[tuple[int, float, float, float]]:
    """`(step, mean, low, high)`: the mean over seeds of the best answer's log-likelihood at each step that every
    run measured, with its 95% t interval."""
    steps = sorted(set.intersection(*({p["step"] for p in r["likelihood"]} for r in runs)))
    band = []
    for step in steps:
        values = [next(p["logps_best"] for p in r["likelihood"] if p["step"] == step) for r in runs]
        band.append((step, *t_interval(values)))
    return band


def plot_likelihood(groups: dict[tuple[str, str], list[dict]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({t for t, _ in groups})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for axis, task_name in zip(axes[0], tasks):
        for method, runs in sorted((m, r) for (t, m), r in groups.items() if t == task_name):
            band = likelihood_band(runs)
            steps, means = [b[0] for b in band], [b[1] for b in band]
            finite = len(runs) > 1
            line = axis.plot(steps, means, marker="o", linewidth=2, label=f"{method} ({len(runs)} seeds)")[0]
            if finite:
                axis.fill_between(steps, [b[2] for b in band], [b[3] for b in band], color=line.get_color(), alpha=0.2)
        axis.set_title(task_name)
        axis.set_xlabel("optimizer step")
        axis.set_ylabel("log-likelihood of the best answer (held-out rows)")
        axis.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M + LoRA, offline from K = 4 scored answers: mean over seeds, 95% t band")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def offline_summary(records: list[dict], plot_path: str | None) -> str:
    """`online_vs_grpo.summarize`'s tables with DPO as the baseline, NCA against InfoNCA, and the likelihood trend."""
    lines = [summarize(records, None, known=METHODS, baseline="dpo")]
    groups: dict[tuple[str, str], list[dict]] = {}
    for record in records:
        groups.setdefault((record["task"], record["method"]), []).append(record)
    if any(r["split"] == "test" for r in records):
        infonca = {key: runs for key, runs in groups.items() if parse_method(key[1], METHODS)[0] in ("nca", "infonca")}
        lines += ["", *compare(infonca, "infonca", METHODS)]
    lines += ["", *likelihood_table(groups)]
    if plot_path:
        plot_likelihood(groups, plot_path)
    return "\n".join(lines)


def main(argv=None):
    parser = study_parser(__doc__.splitlines()[0], "nca,infonca,dpo,nca_pair", steps=16, k=4,
                          out="runs/offline_vs_dpo")  # fmt: skip
    parser.add_argument("--train_prompts", type=int, default=64, help="training questions per seed (K answers each)")
    parser.add_argument("--beta", type=float, default=0.1, help="unless the method sets beta=")
    parser.add_argument("--reward_temperature", type=float, default=0.1,
                        help="NCA and InfoNCA's alpha (rewards 0, 0.1, 1, 1.1): unless the method sets it")
    parser.add_argument("--trend_every", type=int, default=4, help="the likelihood trend every this many steps")
    parser.add_argument("--trend_prompts", type=int, default=32, help="questions of the scored set for the trend")
    parser.add_argument("--best", action="store_true",
                        help="print the setting chosen per method for each of --tasks (from tuning records) and stop")
    args = parse_study_args(parser, argv)
    if args.summarize:
        print(offline_summary(read_records(args), args.plot))
        return
    if args.best:  # one line per task: the methods, comma-separated, as --methods takes them
        chosen = best_settings(read_records(args), METHODS)
        for task_name in args.tasks.split(","):
            print(task_name, ",".join(chosen[(task_name, m)][1] for m in METHODS if (task_name, m) in chosen))
        return
    run_study(args, run)


if __name__ == "__main__":
    main()
