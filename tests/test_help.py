"""`--help` of the commands. The training commands' `--help` lists what NCA adds first, then `--config`, the data and
model fields, prints the usage first and nothing else, and imports neither torch nor transformers (nor peft and
bitsandbytes, whose kernel warnings would follow); `--help-all` lists every field, offers only the `loss_type` values
the trainer accepts and marks the refused fields; every option of `generate` and `demo` says what it does."""

import importlib
import json
import logging
import subprocess
import sys
from dataclasses import fields

import pytest
from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments

from trl_nca import cli
from trl_nca.config_fields import NCAFields, OnlineNCAFields
from trl_nca.scripts.online import RewardArguments

# Modules the short help must not import: they take seconds, and bitsandbytes logs kernel warnings when imported
HEAVY = ("torch", "transformers", "peft", "bitsandbytes", "datasets", "accelerate")
# What each training command adds to TRL's dataclasses, in the order its help lists them
OWN_FIELDS = {
    "nca": [NCAFields],
    "infonca": [NCAFields],
    "online": [RewardArguments, OnlineNCAFields],
}
LIGHT = (ScriptArguments, DatasetMixtureConfig, ModelConfig)


def option_lines(text: str) -> list[str]:
    """The first option string of each option the help lists (`--name`), in order."""
    return [line.split()[0].rstrip(",") for line in text.splitlines() if line.startswith("  -")]


@pytest.mark.parametrize("command", sorted(OWN_FIELDS))
def test_short_help_lists_what_nca_adds_first_then_config_data_and_model(command, capsys):
    assert cli.main([command, "--help"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: trl-nca {command} [--config RECIPE.yaml] [--field value ...]\n")
    assert captured.err == ""
    listed = option_lines(captured.out)
    own = [f"--{f.name}" for dataclass_type in OWN_FIELDS[command] for f in fields(dataclass_type)]
    rest = [f"--{f.name}" for dataclass_type in LIGHT for f in fields(dataclass_type)]
    # -h, --config and --help-all, then NCA's fields, then the data and model fields; no DPOConfig/GRPOConfig field
    assert listed[:3] == ["-h", "--config", "--help-all"]
    assert [name for name in listed[3:] if not name.startswith("--no_")] == own + rest
    assert "--loss_type" not in listed and "--learning_rate" not in listed
    # the training fields are named, and where to find them all
    text = " ".join(captured.out.split())
    assert "--output_dir, --beta" in text or "--output_dir, --num_generations" in text
    assert "--help-all lists them all with their help" in text


@pytest.mark.parametrize(
    "command, flag",
    [("nca", "--help"), ("infonca", "-h"), ("online", "--help"), ("demo", "--help"), ("generate", "-h")],
)
def test_help_prints_the_usage_first_nothing_else_and_imports_no_torch(command, flag, tmp_path):
    """In a fresh process, as the `trl-nca` script runs it: no "training on CPU" line before the usage, no warning,
    and none of the modules that take seconds to import or log kernel warnings."""
    report = tmp_path / "modules.json"
    script = (
        "import json, sys\n"
        "from trl_nca.cli import main\n"
        "try:\n"
        "    code = main(sys.argv[1:])\n"
        "except SystemExit as stop:  # argparse's own --help (generate, demo)\n"
        "    code = stop.code\n"
        f"json.dump([m for m in {HEAVY!r} if m in sys.modules], open({str(report)!r}, 'w'))\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script, command, flag], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: trl-nca {command} ")
    assert done.stderr == ""
    assert json.loads(report.read_text()) == []


@pytest.mark.parametrize(
    "command, loss_types",
    [("nca", "{sigmoid,nca_pair}"), ("infonca", "{sigmoid}")],
)
def test_help_all_lists_every_field_and_only_the_loss_types_the_trainer_accepts(command, loss_types, capsys):
    from trl_nca.config import _DPO_ONLY_FIELDS
    from trl_nca.scripts.train import make_parser

    assert cli.main([command, "--help-all"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(f"usage: trl-nca {command} [--config RECIPE.yaml]") and captured.err == ""
    listed = option_lines(captured.out)
    assert listed[:3] == ["-h", "--config", "--help-all"]
    assert set(listed) == {action.option_strings[0] for action in make_parser()._actions}
    text = " ".join(captured.out.split())
    loss_type = text.split("--loss_type ", 1)[1].split(" --", 1)[0]
    assert loss_type.startswith(f"{loss_types} [{loss_types} ...]")
    assert "hinge" not in loss_type and "ipo" not in loss_type  # DPO's other losses, which NCAConfig refuses
    for name, off in _DPO_ONLY_FIELDS.items():
        assert f"refused by NCA and InfoNCA (their loss is fixed): any value but {off!r} is refused" in text, name


def test_online_help_all_marks_the_grpo_only_fields_refused(capsys):
    from trl_nca.online_config import _GRPO_ONLY_FIELDS

    assert cli.main(["online", "--help-all"]) == 0
    blocks = capsys.readouterr().out.split("\n  --")
    for name, off in _GRPO_ONLY_FIELDS.items():
        block = " ".join(next(b for b in blocks if b.startswith(f"{name} ")).split())
        assert "GRPO only, refused by online NCA" in block and f"any value but {off!r} is refused" in block, name


def test_help_all_keeps_bitsandbytes_import_warnings_out(monkeypatch, caplog, capsys):
    """`--help-all` imports TrainingArguments, hence peft and bitsandbytes, which on some machines logs warnings about
    its kernels as it is imported (its logger `bitsandbytes.backends.cpu.ops`): stand in for that import."""
    from trl_nca.scripts import train

    make_parser = train.make_parser

    def importing_bitsandbytes(*args, **kwargs):
        logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
        return make_parser(*args, **kwargs)

    monkeypatch.setattr(train, "make_parser", importing_bitsandbytes)
    with caplog.at_level(logging.WARNING):
        assert cli.main(["nca", "--help-all"]) == 0
    assert not [record for record in caplog.records if record.name.startswith("bitsandbytes")]
    assert capsys.readouterr().err == ""
    # only while the help is built: the same warning on a training run is shown
    logging.getLogger("bitsandbytes.backends.cpu.ops").warning("shown")
    assert [r.getMessage() for r in caplog.records if r.name.startswith("bitsandbytes")] == ["shown"]


def test_every_option_of_generate_and_demo_says_what_it_does():
    from trl_nca.demo.run import make_parser as demo_parser
    from trl_nca.scripts.generate import make_parser as generate_parser

    for parser in (generate_parser(), demo_parser()):
        for action in parser._actions:
            text = (action.help or "").split(" (default")[0]
            assert len(text.split()) >= 2, f"{parser.prog} {action.option_strings[0]} has no help text"
    demo = " ".join(demo_parser().format_help().split())
    assert "(default 96; --quick: 8)" in demo  # train_prompts: the value each mode uses


def test_the_help_fields_are_the_configs_fields():
    """The configs take their added fields from `trl_nca.config_fields` (light, for the help): same choices as the
    layouts module, and the online config's redefinitions of GRPOConfig fields win over GRPOConfig's defaults."""
    from trl import GRPOConfig

    from trl_nca import NCAConfig, OnlineNCAConfig
    from trl_nca.config_fields import PROMPT_SHARING
    from trl_nca.layouts import LAYOUTS_OF_SETTING

    assert PROMPT_SHARING == tuple(LAYOUTS_OF_SETTING)
    for config, added in ((NCAConfig, NCAFields), (OnlineNCAConfig, OnlineNCAFields)):
        by_name = {f.name: f for f in fields(config)}
        for f in fields(added):
            assert by_name[f.name].default == f.default and by_name[f.name].metadata == f.metadata, f.name
    grpo = {f.name: f.default for f in fields(GRPOConfig)}
    assert (grpo["beta"], grpo["disable_dropout"]) == (0.0, False)
    online = {f.name: f.default for f in fields(OnlineNCAConfig)}
    assert (online["beta"], online["disable_dropout"]) == (0.1, True)


def test_the_package_imports_its_names_on_first_use(tmp_path):
    import trl_nca

    assert sorted(trl_nca.__all__) == sorted(trl_nca._EXPORTS)
    for name, module in trl_nca._EXPORTS.items():
        assert getattr(trl_nca, name) is getattr(importlib.import_module(f"trl_nca.{module}"), name)
    done = subprocess.run(
        [sys.executable, "-c", f"import sys, trl_nca; print(sorted(m for m in sys.modules if m in {HEAVY!r}))"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.strip() == "[]", done.stderr
