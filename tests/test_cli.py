"""The `trl-nca` command and recipes/: parsing, 2-step runs on CPU, DDP equivalence, resume, prepare, QLoRA."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_model, build_tokenizer
from datasets import Dataset, DatasetDict, load_from_disk
from helpers import StopAt, k_response_dataset, pairwise_dataset
from transformers import AutoModelForCausalLM, TrainerCallback

from trl_nca import cli
from trl_nca.scripts.prepare import prepare_ultrafeedback
from trl_nca.scripts.train import main, make_parser

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"


def runs_with_trl(recipe: Path) -> bool:
    """A baseline recipe for TRL's own command (`trl dpo`), kept beside the trl-nca recipe it is compared with."""
    return any(line.startswith("#   trl dpo ") for line in recipe.read_text().splitlines()[:6])


ALL_RECIPES = sorted(p for p in RECIPES.rglob("*.yaml") if "accelerate" not in p.parts)
TRL_RECIPES = [p for p in ALL_RECIPES if runs_with_trl(p)]
TRAINING_RECIPES = [p for p in ALL_RECIPES if "online" not in p.parts and p not in TRL_RECIPES]
# The paper's starting model (the authors' released configs); every UltraFeedback recipe starts from it
PAPERS_MODEL = "HuggingFaceH4/mistral-7b-sft-beta"
ACCELERATE_CONFIGS = sorted((RECIPES / "accelerate").glob("*.yaml"))
# The documented overrides that switch a GPU recipe's GPU-only fields off for a CPU run (recipes/README.md)
CPU_OVERRIDES = [
    "--bf16",
    "false",
    "--use_cpu",
    "true",
    "--dtype",
    "float32",
    "--optim",
    "adamw_torch",
    "--gradient_checkpointing",
    "false",
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny Llama (hidden 64, so bitsandbytes can quantize it) and K-response data as JSONL and save_to_disk."""
    root = tmp_path_factory.mktemp("assets")
    tokenizer = build_tokenizer()
    build_model(tokenizer, seed=0, hidden_size=64).save_pretrained(root / "tiny")
    tokenizer.save_pretrained(root / "tiny")
    data = k_response_dataset()
    data.to_json(root / "data.jsonl")
    # Four responses in every row, so that both losses start at log 4 = 2 log 2 whichever rows come first
    k4 = k_response_dataset(counts=(4,) * 8)
    DatasetDict({"train": k4, "test": k4.select(range(4))}).save_to_disk(root / "data_dir")
    Dataset.from_list(list(data)[:4]).to_json(root / "data4.jsonl")
    return root


def parse(args):
    return make_parser().parse_args_and_config(args)[:4]


def tiny_run(assets, output_dir, *extra):
    """Parsed arguments for a CPU float32 run of the tiny model on the K-response JSONL, plus `extra`."""
    return parse(
        [
            "--model_name_or_path",
            str(assets / "tiny"),
            "--dataset_name",
            str(assets / "data.jsonl"),
            "--bf16",
            "false",
            "--use_cpu",
            "true",
            "--gradient_checkpointing",
            "false",
            "--report_to",
            "none",
            "--output_dir",
            str(output_dir),
            *extra,
        ]
    )


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_training_recipe_parses_with_no_unknown_key_and_says_how_to_run(recipe):
    keys = set(yaml.safe_load(recipe.read_text()))
    dests = {action.dest for action in make_parser()._actions}
    assert keys <= dests, f"unknown keys: {keys - dests}"
    script_args, training_args, model_args, _ = parse(["--config", str(recipe), *CPU_OVERRIDES])
    assert model_args.model_name_or_path and script_args.dataset_name
    header = recipe.read_text().splitlines()[:6]
    assert any("trl_nca" in line or "trl-nca" in line for line in header), "the recipe must start with its command"


# What each launch config must set up, read back through accelerate's own parser (which rejects unknown keys)
LAUNCH = {
    "cpu.yaml": ("MULTI_CPU", "no", None),
    "single_gpu.yaml": ("NO", "bf16", None),
    "multi_gpu.yaml": ("MULTI_GPU", "bf16", None),
    "zero2.yaml": ("DEEPSPEED", "bf16", ("zero_stage", 2)),
    "zero3.yaml": ("DEEPSPEED", "bf16", ("zero_stage", 3)),
    "fsdp2.yaml": ("FSDP", "bf16", ("fsdp_version", 2)),
}


@pytest.mark.parametrize("config", ACCELERATE_CONFIGS, ids=lambda p: p.name)
def test_accelerate_config_sets_up_what_its_name_says(config):
    from accelerate.commands.config.config_args import ClusterConfig

    cluster = ClusterConfig.from_yaml_file(str(config))
    distributed_type, precision, extra = LAUNCH[config.name]
    assert str(cluster.distributed_type).split(".")[-1] == distributed_type
    assert str(cluster.mixed_precision).split(".")[-1] == precision
    assert cluster.use_cpu == (config.name == "cpu.yaml")
    if extra is not None:
        key, value = extra
        settings = cluster.deepspeed_config if distributed_type == "DEEPSPEED" else cluster.fsdp_config
        assert int(settings[key]) == value


@pytest.mark.parametrize(
    "name, reward_temperature",
    [
        ("ultrafeedback/nca_qlora.yaml", 1e-4),
        ("ultrafeedback/infonca_qlora.yaml", 1e-4),
        # Pairs: all label mass on `chosen`, as the authors' pairwise NCA (which ignores the scores)
        ("ultrafeedback_binarized/nca_qlora.yaml", 0.0),
    ],
)
def test_qlora_recipes_build_the_papers_setup(name, reward_temperature):
    """Through the real parser and TRL's helpers: the LoRA and 4-bit configs the trainer is handed."""
    from trl.trainer.utils import get_peft_config, get_quantization_config

    script_args, args, model_args, _ = parse(["--config", str(RECIPES / name), *CPU_OVERRIDES])
    assert model_args.model_name_or_path == PAPERS_MODEL and args.reward_temperature == reward_temperature
    settings = (args.beta, args.learning_rate, args.lr_scheduler_type.value, args.warmup_steps, args.max_length)
    assert settings == (0.01, 5e-6, "cosine", 0.1, 1024)
    assert args.per_device_train_batch_size * args.gradient_accumulation_steps == 32 and args.num_train_epochs == 1
    lora = get_peft_config(model_args)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (16, 16, 0.05)
    assert lora.target_modules == "all-linear"
    quantization = get_quantization_config(model_args)
    assert quantization.load_in_4bit and quantization.bnb_4bit_quant_type == "nf4"


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_every_recipe_says_where_its_numbers_come_from(recipe):
    comments = " ".join(line for line in recipe.read_text().splitlines() if line.lstrip().startswith("#"))
    assert "Where the numbers come from" in comments and "our choice" in comments.lower()
    if "ultrafeedback" in recipe.parent.name:
        # The paper's settings are named as the paper's, and the run starts where the paper's runs started
        assert "the paper's" in comments and "thu-ml/Noise-Contrastive-Alignment" in comments
        assert yaml.safe_load(recipe.read_text())["model_name_or_path"] == PAPERS_MODEL


@pytest.fixture(scope="module")
def binarized_pairs(tmp_path_factory):
    """Rows shaped like HuggingFaceH4/ultrafeedback_binarized: a text `prompt` beside whole conversations (user turn
    included) in `chosen`, `rejected` and `messages`, with `prompt_id` and both scores."""
    rows = []
    for i, row in enumerate(pairwise_dataset()):
        turn = row["prompt"]
        chosen, rejected = turn + row["chosen"], turn + row["rejected"]
        rows.append(
            {"prompt": turn[0]["content"], "prompt_id": f"id{i}", "chosen": chosen, "rejected": rejected,
             "messages": chosen, "score_chosen": 8.0, "score_rejected": 8.0 - i % 3}
        )  # fmt: skip
    folder = tmp_path_factory.mktemp("binarized")  # TRL's script loads a folder of files; trl-nca, the file too
    Dataset.from_list(rows).to_json(folder / "train.jsonl")
    return folder


def pairs_run(recipe, assets, output_dir, *data):
    return [
        "--config", str(recipe), *CPU_OVERRIDES, "--model_name_or_path", str(assets / "tiny"), *data,
        "--max_steps", "2", "--output_dir", str(output_dir), "--save_strategy", "no",
        "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", "--logging_steps", "1",
    ]  # fmt: skip


def test_the_dpo_baseline_recipe_is_the_nca_pairs_recipe_but_the_loss(assets, binarized_pairs, tmp_path, monkeypatch):
    """recipes/ultrafeedback_binarized: NCA through trl-nca and DPO through TRL's own `trl dpo` script, as the paper
    compares them. The same settings but the loss, the data keys and the evaluation (TRL's DPOTrainer needs the text
    `prompt` column left out, which only a dataset mixture does); each parses with no unknown key and trains 2 CPU
    steps on binarized-UltraFeedback-shaped rows from the value at initialisation (NCA 2 log 2, DPO log 2)."""
    import trl
    from trl.scripts.dpo import main as dpo_main
    from trl.scripts.dpo import make_parser as dpo_parser

    nca_recipe = RECIPES / "ultrafeedback_binarized" / "nca_qlora.yaml"
    (dpo_recipe,) = [p for p in TRL_RECIPES if p.parent == nca_recipe.parent]
    nca, dpo = yaml.safe_load(nca_recipe.read_text()), yaml.safe_load(dpo_recipe.read_text())
    own = {
        "nca": {"reward_temperature", "dataset_name", "dataset_train_split", "dataset_test_split", "eval_steps"},
        "dpo": {"loss_type", "datasets"},
    }
    differ = {"output_dir", "eval_strategy"}
    assert set(nca) - set(dpo) == own["nca"] and set(dpo) - set(nca) == own["dpo"]
    assert {k: v for k, v in nca.items() if k not in own["nca"] | differ} == {
        k: v for k, v in dpo.items() if k not in own["dpo"] | differ
    }
    assert dpo["loss_type"] == ["sigmoid"] and dpo["eval_strategy"] == "no"
    (mixture,) = dpo["datasets"]
    assert (nca["dataset_name"], nca["dataset_train_split"]) == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
    )
    assert (mixture["path"], mixture["split"]) == (nca["dataset_name"], nca["dataset_train_split"])
    assert "prompt" not in mixture["columns"]
    dests = {action.dest for action in dpo_parser()._actions}
    assert set(dpo) <= dests, f"unknown keys for `trl dpo`: {set(dpo) - dests}"

    local_rows = ["--dataset_name", str(binarized_pairs / "train.jsonl"), "--dataset_train_split", "train"]
    trainer = main(*parse(pairs_run(nca_recipe, assets, tmp_path / "nca", *local_rows, "--eval_strategy", "no")))
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-4)

    # The DPO recipe as written, its mixture pointed at the local rows (same split name, same column selection)
    local = {**mixture, "path": "json", "data_files": {mixture["split"]: str(binarized_pairs / "train.jsonl")}}
    (tmp_path / "dpo.yaml").write_text(yaml.safe_dump({**dpo, "datasets": [local]}))
    trained = []

    class Recorded(trl.DPOTrainer):  # TRL's script returns nothing: keep its trainer to read the log
        def train(self, *args, **kwargs):
            trained.append(self)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(trl, "DPOTrainer", Recorded)
    dpo_main(*dpo_parser().parse_args_and_config(pairs_run(tmp_path / "dpo.yaml", assets, tmp_path / "dpo"))[:4])
    (trainer,) = trained
    assert trainer.state.global_step == 2 and (tmp_path / "dpo" / "adapter_config.json").exists()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)


@pytest.mark.parametrize("recipe", TRAINING_RECIPES, ids=lambda p: str(p.relative_to(RECIPES)))
def test_training_recipe_runs_two_steps_on_cpu(recipe, assets, tmp_path):
    algorithm = "infonca" if "infonca" in recipe.name else "nca"
    parsed = parse(
        [
            "--config",
            str(recipe),
            *CPU_OVERRIDES,
            "--model_name_or_path",
            str(assets / "tiny"),
            "--dataset_name",
            str(assets / "data_dir"),
            "--dataset_train_split",
            "train",
            "--dataset_test_split",
            "test",
            "--max_steps",
            "2",
            "--output_dir",
            str(tmp_path),
            "--eval_steps",
            "2",
            "--save_strategy",
            "no",
            "--per_device_train_batch_size",
            "2",
            "--gradient_accumulation_steps",
            "1",
            "--logging_steps",
            "1",
        ]
    )
    trainer = main(*parsed, algorithm=algorithm)
    assert trainer.state.global_step == 2
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-4)
    assert (tmp_path / ("adapter_config.json" if parsed[2].use_peft else "config.json")).exists()


def test_qlora_on_cpu_trains_only_the_lora_weights(assets, tmp_path):
    parsed = tiny_run(
        assets,
        tmp_path,
        "--load_in_4bit",
        "true",
        "--dtype",
        "float32",
        "--use_peft",
        "true",
        "--lora_r",
        "4",
        "--lora_target_modules",
        "all-linear",
        "--max_steps",
        "2",
        "--learning_rate",
        "1e-2",
        "--logging_steps",
        "1",
    )
    captured = {}

    class Snapshot(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            captured["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            captured["model"] = model

    trainer = main(*parsed, algorithm="nca", callbacks=[Snapshot()])
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in trainer.model.modules())
    moved = {n for n, p in captured["model"].named_parameters() if not torch.equal(p, captured["before"][n])}
    assert moved and all("lora_" in n for n in moved)
    assert trainer.state.log_history[0]["loss"] == pytest.approx(2 * math.log(2), abs=1e-3)


@pytest.mark.parametrize("precompute", [False, True])
def test_resumed_run_ends_like_an_uninterrupted_one(precompute, assets, tmp_path):
    def args(output_dir, *extra):
        return tiny_run(
            assets,
            output_dir,
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "2",
            "--learning_rate",
            "1e-2",
            "--save_strategy",
            "steps",
            "--save_steps",
            "2",
            "--logging_steps",
            "1",
            "--beta",
            "0.5",
            "--precompute_ref_log_probs",
            str(precompute).lower(),
            *extra,
        )

    full = main(*args(tmp_path / "full"), algorithm="infonca")
    main(*args(tmp_path / "cut"), algorithm="infonca", callbacks=[StopAt(2)])
    assert (tmp_path / "cut" / "checkpoint-2").is_dir() and not (tmp_path / "cut" / "checkpoint-4").exists()
    resumed = main(*args(tmp_path / "cut", "--resume_from_checkpoint", "true"), algorithm="infonca")

    def losses(trainer):
        return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]

    assert len(losses(full)) == 4 and losses(resumed) == pytest.approx(losses(full), rel=1e-6)
    for (name, a), (_, b) in zip(full.model.named_parameters(), resumed.model.named_parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def raw_ultrafeedback_rows():
    def completion(text, score, ratings=("4", "4", "4", "4")):
        aspects = ["helpfulness", "honesty", "instruction_following", "truthfulness"]
        return {
            "response": text,
            "overall_score": score,
            "fine-grained_score": 3.5,
            "annotations": {a: {"Rating": r, "Rationale": ""} for a, r in zip(aspects, ratings)},
        }

    return [
        {
            "source": "s",
            "instruction": "Q0",
            "models": ["a"] * 4,
            "completions": [completion("a", 8.0), completion("b", 6.5), completion("c", 3.0), completion("d", 1.0)],
        },
        {
            "source": "s",
            "instruction": "Q1",
            "models": ["a"] * 4,
            "completions": [completion("a", 7.0), completion("b", None), completion("c", 5.0), completion("d", 2.0)],
        },
        {
            "source": "s",
            "instruction": "Q2",
            "models": ["a"] * 2,
            "completions": [completion("a", 7.0), completion("b", "N/A")],
        },
        {
            "source": "s",
            "instruction": "Q3",
            "models": ["a"] * 4,
            "completions": [completion("a", 9.0), completion("b", 2.0), completion("c", 4.0), completion("d", 6.0)],
        },
    ]


def test_prepare_raw_ultrafeedback_reports_drops(tmp_path, capsys):
    source = write_jsonl(tmp_path / "uf.jsonl", raw_ultrafeedback_rows())
    assert (
        cli.main(["prepare", "ultrafeedback", str(source), "--output_dir", str(tmp_path / "out"), "--min_k", "3"]) == 0
    )
    out = load_from_disk(str(tmp_path / "out"))
    assert list(out) == ["train"] and out["train"]["rewards"] == [
        [8.0, 6.5, 3.0, 1.0],
        [7.0, 5.0, 2.0],
        [9.0, 2.0, 4.0, 6.0],
    ]
    assert out["train"][1]["prompt"] == [{"role": "user", "content": "Q1"}]
    printed = capsys.readouterr().out
    reason = "column 'completions[N].overall_score': expected a finite number as reward"
    assert f"dropped 2 completions ({reason})" in printed
    assert "dropped 1 rows with fewer than 3 scored responses" in printed


def test_prepare_binarized_with_test_split(tmp_path):
    rows = [
        {
            "prompt": f"Q{i}",
            "prompt_id": str(i),
            "chosen": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "good"}],
            "rejected": [{"role": "user", "content": f"Q{i}"}, {"role": "assistant", "content": "bad"}],
            "messages": [{"role": "user", "content": f"Q{i}"}],
            "score_chosen": 8.0,
            "score_rejected": 3.0 if i != 7 else None,
        }
        for i in range(10)
    ]
    source = tmp_path / "bin.parquet"
    Dataset.from_list(rows).to_parquet(source)
    prepared, drops = prepare_ultrafeedback(str(source), str(tmp_path / "out"), test_size=0.2)
    assert len(prepared["train"]) + len(prepared["test"]) == 9 and len(prepared["test"]) == 2
    assert drops == {"rows (column 'score_rejected': expected a finite number as reward)": 1}
    row = load_from_disk(str(tmp_path / "out"))["train"][0]
    assert row["rewards"] == [8.0, 3.0] and [c[0]["content"] for c in row["completions"]] == ["good", "bad"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train"], "unknown command 'train'"),
        (
            ["nca", "--model_name_or_path", "x", "--dataset_name", "missing/file.jsonl", "--output_dir", "o"],
            "Dataset not found: missing/file.jsonl",
        ),
        (["prepare", "ultrafeedback", "nowhere.jsonl", "--output_dir", "o"], "Dataset not found: nowhere.jsonl"),
    ],
)
def test_errors_are_one_line(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("trl-nca: error:") and message in err[0]


def test_unknown_recipe_field_and_gpu_recipe_on_cpu_are_one_line(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: x\ndataset_name: y\nbeta_typo: 0.1\n")
    assert cli.main(["nca", "--config", str(recipe)]) == 2
    assert "Unknown arguments from config file: ['--beta_typo'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        gpu = RECIPES / "ultrafeedback" / "nca_qlora.yaml"
        assert cli.main(["nca", "--config", str(gpu)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == ["trl-nca: error: this recipe needs a GPU (it sets bf16 or fp16); on CPU add --bf16 false"]


def test_saved_model_reloads(assets, tmp_path):
    trainer = main(*tiny_run(assets, tmp_path, "--max_steps", "1"), algorithm="nca")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(reloaded.lm_head.weight, trainer.model.lm_head.weight)


def test_generate_command_writes_a_scored_dataset(assets, tmp_path, capsys):
    out = tmp_path / "generated"
    argv = [
        "generate",
        "--model",
        str(assets / "tiny"),
        "--task",
        "arithmetic",
        "--num_prompts",
        "3",
        "--k",
        "2",
        "--max_new_tokens",
        "4",
        "--output_dir",
        str(out),
    ]
    assert cli.main(argv) == 0
    data = load_from_disk(str(out))
    assert len(data) == 3 and all(len(c) == 2 and len(r) == 2 for c, r in zip(data["completions"], data["rewards"]))
    assert set(data.column_names) >= {"prompt", "completions", "rewards", "answer"}
    assert "3 prompts x 2 responses" in capsys.readouterr().out


def test_generate_finds_a_reward_module_in_the_current_folder_in_both_spellings(assets, tmp_path, monkeypatch):
    """`--reward my_module.fn` and `--reward my_module:fn` with `my_module.py` where the command runs (not on the
    console script's import path), as `trl grpo` finds its reward modules; the rewards are their sum."""
    (tmp_path / "cwd_rewards_generate.py").write_text(
        "def length(prompts, completions, **kwargs):\n"
        "    return [float(len(c[0]['content'])) for c in completions]\n\n\n"
        "def ten(prompts, completions, **kwargs):\n"
        "    return [10.0] * len(completions)\n"
    )
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(Path.cwd()))])
    monkeypatch.chdir(tmp_path)
    argv = ["generate", "--model", str(assets / "tiny"), "--task", "arithmetic", "--num_prompts", "2", "--k", "2",
            "--max_new_tokens", "4", "--reward", "cwd_rewards_generate.length", "--reward", "cwd_rewards_generate:ten",
            "--output_dir", "generated"]  # fmt: skip
    assert cli.main(argv) == 0
    for row in load_from_disk(str(tmp_path / "generated")):
        assert row["rewards"] == [len(c[0]["content"]) + 10.0 for c in row["completions"]]
