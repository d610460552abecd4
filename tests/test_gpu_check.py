"""`benchmarks/gpu_check.sh`, the script for the first GPU lent: what runs on this CPU of it. Its commands (printed
by a dry run) name files that exist and options that the benchmarks' own parsers accept, and its parts' time limits
fit the 8 minutes it is allowed."""

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _module(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_commands_parse_and_fit_the_time():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    run = subprocess.run(["bash", str(script)], env={"GPU_CHECK_DRY": "1", "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    assert run.returncode == 0, run.stderr
    commands = [shlex.split(line[2:]) for line in run.stdout.splitlines() if line.startswith("+ ")]
    assert len(commands) == 4
    pytest_command, *benchmarks = commands
    assert pytest_command[1:3] == ["-m", "pytest"] and (ROOT / pytest_command[4]).is_file()
    seen = set()
    for command in benchmarks:
        path = ROOT / command[1]
        parsed = _module(path).build_parser().parse_args(command[2:])  # exits (fails) on an unknown option
        assert parsed.json.startswith("benchmarks/results/gpu_check/")
        seen.add(path.name)
        if path.name == "online_step.py":
            assert parsed.sync_debug and parsed.cells == "8x256x256"
        else:
            assert set(parsed.ways.split(",")) == {"reference", "padded", "mask", "cache", "auto"}
            assert parsed.ks == "4,8" and parsed.random_init and parsed.dims == "1.5b"
    assert seen == {"step_time.py", "online_step.py"}
    limits = [int(n) for n in re.findall(r"^part (\d+) ", script.read_text(), flags=re.M)]
    assert len(limits) == 4 and sum(limits) <= 8 * 60 - 20


def test_the_compute_bound_size_is_a_1_5b_model(smollm2_folder):
    """`step_time.py --dims 1.5b`: SmolLM2's config with a 1.5B model's widths and depth (built on the meta device
    here: shapes only)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dims = _module(ROOT / "benchmarks" / "step_time.py").DIMS
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(smollm2_folder, **dims["1.5b"]))
    body = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    assert 1.2e9 < body < 1.4e9 and model.config.num_hidden_layers == 28
