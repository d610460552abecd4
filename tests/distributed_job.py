"""Jobs the distributed tests start under `accelerate launch` and as one plain process (not a test module).

    python tests/distributed_job.py probe                 # prints {"distributed_type": ...}
    python tests/distributed_job.py precompute OUT.json ROWS.jsonl
    python tests/distributed_job.py engines OUT_FOLDER PER_DEVICE_BATCH

`probe`: the engine a trainer gets from this launch, without training.

`precompute`: reference log-probabilities precomputed for the rows of ROWS.jsonl (the test writes 7 rows of ragged
K: uneven over 2 processes x batch 2), with a reference that differs from the policy, for the rows in memory and
read from the file; the main process writes them to OUT.json.

`engines`: every trainer under the engine the launch sets up (DeepSpeed ZeRO-2 or ZeRO-3, DDP, or one process), in
one process group. NCATrainer and InfoNCATrainer take 2 SGD steps on 8 rows of ragged K (PER_DEVICE_BATCH rows per
process a step) in each layout, with a reference model that differs from the policy; then with precomputed reference
log-probabilities, with LoRA, and with gradient checkpointing. OnlineNCATrainer (groups of 4, split across 2
processes) and OnlineInfoNCATrainer (groups of 2) take one step on fixed completions (a deterministic rollout), with
a LoRA adapter that starts away from its base, and OnlineNCATrainer also as a full model with a copied reference.
The models carry Llama's attention dropout, which the trainers' `disable_dropout=True` default must switch off (in
the reference too, which TRL hands over inside a DeepSpeed engine). The main process writes OUT_FOLDER/record.json
(per case: the engine that ran, the losses and gradient norms of each step, whether dropout is left anywhere; or
the error that refused the case) and OUT_FOLDER/CASE.pt (how far each trainable parameter moved, gathered whole).

The engine is the one that actually ran: `trainer.accelerator.state.distributed_type`, with DeepSpeed's ZeRO stage.
`TrainingArguments(use_cpu=True).distributed_state` says MULTI_CPU under a DeepSpeed launch.
"""

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import build_model, build_tokenizer  # noqa: E402
from datasets import Dataset, load_dataset  # noqa: E402
from helpers import k_response_dataset, nca_args  # noqa: E402

from trl_nca import InfoNCATrainer, NCATrainer  # noqa: E402
from trl_nca.dropout import has_active_dropout  # noqa: E402


def engine(accelerator) -> str:
    """The engine a trainer ran under: accelerate's distributed type, with DeepSpeed's ZeRO stage (`DEEPSPEED-3`)."""
    state = accelerator.state
    kind = str(state.distributed_type).split(".")[-1]
    return f"{kind}-{state.deepspeed_plugin.zero_stage}" if kind == "DEEPSPEED" else kind


def probe() -> None:
    tokenizer = build_tokenizer()
    trainer = NCATrainer(
        model=build_model(tokenizer),
        args=nca_args(Path(tempfile.mkdtemp())),
        train_dataset=k_response_dataset(counts=(2, 2)),
        processing_class=tokenizer,
    )
    if trainer.accelerator.is_main_process:
        print(json.dumps({"distributed_type": engine(trainer.accelerator)}))
    finish(trainer.accelerator)


def precompute(out: str, rows_file: str) -> None:
    tokenizer = build_tokenizer()
    folder = Path(tempfile.mkdtemp())
    from_file = load_dataset("json", data_files=rows_file)["train"]
    record = {}
    for source, data in [("memory", Dataset.from_list(list(from_file))), ("file", from_file)]:
        trainer = NCATrainer(
            model=build_model(tokenizer, seed=0),
            ref_model=build_model(tokenizer, seed=1),
            args=nca_args(folder, precompute_ref_log_probs=True, precompute_ref_batch_size=2),
            train_dataset=data,
            processing_class=tokenizer,
        )
        record[source] = list(trainer.train_dataset["ref_logps"])
    record["processes"] = trainer.accelerator.num_processes
    if trainer.accelerator.is_main_process:
        Path(out).write_text(json.dumps(record))
    finish(trainer.accelerator)


def with_dropout(model):
    """`model` with Llama's attention dropout at 0.1 (applied functionally while training, no `nn.Dropout`)."""
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    return model


# (trainer, prompt_sharing, variant) of `engines`; "reference": a reference model that differs from the policy;
# "precompute": reference log-probabilities precomputed from the initial policy; "lora": a LoRA adapter that starts
# away from its base (the reference); "checkpointing": gradient checkpointing, with a reference model
OFFLINE = [
    *[(name, layout, "reference") for name in ("nca", "infonca") for layout in ("off", "mask", "cache", "auto")],
    *[(name, "auto", variant) for variant in ("precompute", "lora", "checkpointing") for name in ("nca", "infonca")],
]
# (trainer, group size, variant)
ONLINE = [("online_nca", 4, "lora"), ("online_infonca", 2, "lora"), ("online_nca", 4, "reference")]
OFFLINE_STEPS, ONLINE_STEPS = 2, 1


def lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False)


def offline_trainer(name, layout, variant, per_device, tokenizer):
    settings = dict(optim="sgd", learning_rate=0.1, max_steps=OFFLINE_STEPS, per_device_train_batch_size=per_device)
    settings.update(prompt_sharing=layout)
    policy, extra = with_dropout(build_model(tokenizer, seed=0)), {}
    if variant in ("reference", "checkpointing"):
        extra["ref_model"] = with_dropout(build_model(tokenizer, seed=1))
    if variant == "checkpointing":
        settings.update(gradient_checkpointing=True)
    if variant == "lora":
        extra["peft_config"] = lora()
    if variant == "precompute":
        settings.update(precompute_ref_log_probs=True, precompute_ref_batch_size=2)
        # Without dropout: in one process the precompute runs inside DPOTrainer's constructor on the policy in
        # training mode, before the trainers switch functional attention dropout off (tests/test_drop_in.py)
        policy = build_model(tokenizer, seed=0)
    cls = {"nca": NCATrainer, "infonca": InfoNCATrainer}[name]
    return cls(
        model=policy,
        args=nca_args(Path(tempfile.mkdtemp()), **settings),
        train_dataset=k_response_dataset(),
        processing_class=tokenizer,
        **extra,
    )


def online_trainer(name, group_size, variant, per_device, tokenizer):
    from online_helpers import deterministic_rollout, length_reward, online_args, prompts_dataset

    from trl_nca import OnlineInfoNCATrainer, OnlineNCATrainer

    cls = {"online_nca": OnlineNCATrainer, "online_infonca": OnlineInfoNCATrainer}[name]
    settings = dict(optim="sgd", learning_rate=0.1, max_steps=ONLINE_STEPS, per_device_train_batch_size=per_device)
    return cls(
        model=with_dropout(build_model(tokenizer)),
        reward_funcs=length_reward,
        args=online_args(Path(tempfile.mkdtemp()), reference="initial", num_generations=group_size, **settings),
        train_dataset=prompts_dataset(),
        processing_class=tokenizer,
        peft_config=lora() if variant == "lora" else None,
        rollout_func=deterministic_rollout,
    )


def trainable(trainer) -> dict:
    """Name -> value of every trainable parameter, whole on every process (gathered where ZeRO-3 partitions them)."""
    named = {name: p for name, p in trainer.model.named_parameters() if p.requires_grad}
    gathered = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in named.values()):
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(list(named.values()))
    with gathered:
        return {name: p.detach().double().clone() for name, p in named.items()}


def engines(out: str, per_device: str) -> None:
    folder, tokenizer = Path(out), build_tokenizer()
    cases = [(f"{n}-{layout}-{variant}", offline_trainer, (n, layout, variant)) for n, layout, variant in OFFLINE]
    cases += [(f"{n}-{variant}", online_trainer, (n, size, variant)) for n, size, variant in ONLINE]
    record = {}
    for case, build, spec in cases:
        try:
            trainer = build(*spec, int(per_device), tokenizer)
        except ValueError as error:  # a layout this engine does not allow: the test says which, and why
            record[case] = {"refused": str(error)}
            continue
        before = trainable(trainer)
        trainer.train()
        after = trainable(trainer)
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        models = [trainer.model, trainer.model_wrapped, trainer.ref_model]
        record[case] = {
            "engine": engine(trainer.accelerator),
            "processes": trainer.accelerator.num_processes,
            "loss": [entry["loss"] for entry in logs],
            "grad_norm": [entry["grad_norm"] for entry in logs],
            "dropout": any(has_active_dropout(model) for model in models if model is not None),
            # the layouts the trainer may use (offline `_layout`, online `_group_layouts`)
            "layouts": list(getattr(trainer, "_group_layouts", None) or [getattr(trainer, "_layout", "")]),
        }
        if trainer.accelerator.is_main_process:
            torch.save({name: after[name] - before[name] for name in after}, folder / f"{case}.pt")
    if trainer.accelerator.is_main_process:
        (folder / "record.json").write_text(json.dumps(record))
    finish(trainer.accelerator)


# `diverge`: the ranks get batches that take different paths, the case that hung before every rank checked the same
# rows: under `auto`, rank 0's prompts are long (the grouped forward shares them) and rank 1's are one token (the
# padded layout, GRPO's own forward) or have no token at all (GRPO's forward, in the second chunk of a reference
# forward); offline, rank 0's rows share a long prompt and rank 1's have one-token prompts
LONG_PROMPT = "Write a long poem about the sea and the wind and the stars. " * 4


def divergent_rollout(prompts, trainer):
    """A `rollout_func`: the long prompt through the chat template; "one" as one token; "none" with no token."""
    tokenizer = trainer.processing_class
    group_size = trainer.num_generations
    first = trainer.accelerator.process_index * len(prompts)
    prompt_ids, completion_ids = [], []
    for i, prompt in enumerate(prompts):
        text = prompt[-1]["content"]
        if text == "one":
            ids = [tokenizer.eos_token_id]
        elif text == "none":
            ids = []
        else:
            ids = list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True,
                                                     return_dict=True)["input_ids"])  # fmt: skip
        prompt_ids.append(ids)
        k = (first + i) % group_size  # the completion's place in its group, wherever the group lands
        answer = " hello world" * (1 + len(ids) % 3) + "!" * k  # rewards (by length) that differ in a group
        completion_ids.append(tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids,
            "logprobs": [[0.0] * len(ids) for ids in completion_ids]}  # fmt: skip


def divergent_online(name, per_device, tokenizer):
    """2 steps of an online trainer under `auto`, groups of 4 on prompts [long, one, long2, one] in this order.
    `steps_per_generation=1` (the first grouped forward is the policy's, through DDP): on 2 processes, rank 0 takes
    the long prompts and rank 1 the one-token ones, a step each; one process takes [long, one] then [long2, one].
    `nca-initial`: `steps_per_generation=2` with the initial reference, whose forward runs in chunks of a micro-batch:
    on 2 processes rank 0's are [long], [one] and rank 1's [long2], [none] (GRPO's forward in its second chunk)."""
    from online_helpers import length_reward, online_args

    from trl_nca import OnlineNCATrainer, PromptSharingGRPOTrainer

    # (a rank whose generation batch has no prompt token at all stops GRPO itself: its padded prompts are float)
    prompts = [LONG_PROMPT, "one", LONG_PROMPT + "Again.", "none" if name == "nca-initial" else "one"]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": text}]} for text in prompts])
    settings = dict(optim="sgd", learning_rate=0.1, max_steps=2, per_device_train_batch_size=per_device,
                    shuffle_dataset=False, num_generations=4, logging_steps=1)  # fmt: skip
    if name == "nca-initial":  # one generation of 2 micro-batches; its reference forward in 2 chunks of a group each
        settings.update(reference="initial", steps_per_generation=2)
    args = online_args(Path(tempfile.mkdtemp()), prompt_sharing="auto", **settings)
    common = dict(model=build_model(tokenizer), reward_funcs=length_reward, train_dataset=dataset,
                  processing_class=tokenizer, rollout_func=divergent_rollout)  # fmt: skip
    if name == "grpo":
        from helpers import CPU
        from trl import GRPOConfig

        grpo_args = GRPOConfig(output_dir=args.output_dir, **{**CPU, **settings, "max_completion_length": 8})
        return PromptSharingGRPOTrainer(args=grpo_args, prompt_sharing="auto", **common)
    return OnlineNCATrainer(args=args, **common)


def divergent_offline(name, per_device, tokenizer):
    """2 steps of NCATrainer under `auto`: rank 0's rows share a long prompt among 4 responses, rank 1's have
    one-token prompts (the cost model picks another layout on each rank)."""
    long = LONG_PROMPT * 2
    rows = [{"prompt": long, "completions": [f" answer {j} " * (1 + j) for j in range(4)],
             "rewards": [float(j) for j in range(4)]} for _ in range(2)]  # fmt: skip
    rows += [{"prompt": "a", "completions": [" b c" * 20, " c d" * 20], "rewards": [1.0, 0.0]} for _ in range(2)]
    # half the online batch: rank 0 takes rows 0-1, rank 1 rows 2-3 (no shuffle); one process takes all 4
    args = nca_args(Path(tempfile.mkdtemp()), optim="sgd", learning_rate=0.1, max_steps=2, prompt_sharing="auto",
                    per_device_train_batch_size=per_device // 2)  # fmt: skip
    trainer = NCATrainer(model=build_model(tokenizer), args=args, train_dataset=Dataset.from_list(rows * 2),
                         processing_class=tokenizer)  # fmt: skip
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


DIVERGE = {"grpo": divergent_online, "nca": divergent_online, "nca-initial": divergent_online,
           "offline": divergent_offline}  # fmt: skip


def diverge(out: str, per_device: str) -> None:
    folder, tokenizer = Path(out), build_tokenizer()
    record = {}
    for case, build in DIVERGE.items():
        trainer = build(case, int(per_device), tokenizer)
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        collator = getattr(trainer, "_group_collator", None) or trainer.data_collator
        record[case] = {
            "engine": engine(trainer.accelerator),
            "loss": [entry["loss"] for entry in logs],
            "grad_norm": [entry["grad_norm"] for entry in logs],
            # the layouts this rank's batches went to ("grpo": GRPO's own forward)
            "counts": gather_counts(trainer, getattr(collator, "counts", {})),
        }
    if trainer.accelerator.is_main_process:
        (folder / "record.json").write_text(json.dumps(record))
    finish(trainer.accelerator)


def gather_counts(trainer, counts: dict) -> list[dict]:
    from accelerate.utils import gather_object

    return gather_object([dict(counts)])


def finish(accelerator) -> None:
    """Leave together, and without destructors when there are several processes: with gloo on CPU a process that
    exits first can abort in the process group's teardown ("terminate called without an active exception", seen in
    CI under load), as `trl-nca` itself avoids in `cli.py`."""
    accelerator.wait_for_everyone()
    if accelerator.num_processes > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    {"probe": probe, "precompute": precompute, "engines": engines, "diverge": diverge}[sys.argv[1]](*sys.argv[2:])
