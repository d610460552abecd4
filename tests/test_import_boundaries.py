"""The package's layers, as TRL keeps them: `trl_nca/scripts/` holds the commands and `trl_nca/cli.py` dispatches to
them; the library, the demo and the benchmarks never import a command module (what both need, such as plotting,
lives in the library: `trl_nca.plotting`)."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "trl_nca"
SCRIPTS = PACKAGE / "scripts"
# Only the commands themselves and their dispatcher may import trl_nca.scripts
ALLOWED = {PACKAGE / "cli.py"}


def checked_files() -> list[Path]:
    library = [p for p in PACKAGE.rglob("*.py") if SCRIPTS not in p.parents and p not in ALLOWED]
    return sorted(library) + sorted((ROOT / "benchmarks").glob("*.py"))


def module_name(path: Path) -> list[str]:
    """`trl_nca/demo/run.py` -> ["trl_nca", "demo", "run"]; a package's `__init__.py` is the package."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def imports_of_scripts(path: Path, source: str | None = None) -> list[str]:
    """Each import in the file (at any depth: inside functions too) that reaches trl_nca.scripts, as written.
    `source` stands in for the file's text (relative imports are still resolved from where `path` sits)."""
    tree = ast.parse(path.read_text() if source is None else source, filename=str(path))
    package = module_name(path)
    if path.name != "__init__.py":
        package = package[:-1]  # a relative import is resolved against the module's package
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                base = ".".join([*anchor, *([base] if base else [])])
            # `from trl_nca import scripts` and `from . import scripts` name the module in the alias
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        if any(t == "trl_nca.scripts" or t.startswith("trl_nca.scripts.") for t in targets):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_the_walk_sees_the_library_the_demo_and_the_benchmarks():
    names = {str(p.relative_to(ROOT)) for p in checked_files()}
    assert {"trl_nca/losses.py", "trl_nca/plotting.py", "trl_nca/demo/run.py", "benchmarks/step_time.py"} <= names
    assert not any(name.startswith("trl_nca/scripts/") for name in names) and "trl_nca/cli.py" not in names


@pytest.mark.parametrize(
    "source, file",
    [
        ("from ..scripts.plot import plot_log_history", "trl_nca/demo/run.py"),
        ("from .scripts import train", "trl_nca/trainer.py"),
        ("from . import scripts", "trl_nca/trainer.py"),
        ("import trl_nca.scripts.utils", "benchmarks/step_time.py"),
        ("from trl_nca.scripts.plot import cli", "benchmarks/step_time.py"),
        ("from trl_nca import scripts", "benchmarks/step_time.py"),
        ("def f():\n    from ..scripts import runs", "trl_nca/layouts/__init__.py"),
    ],
)
def test_the_check_catches_each_way_of_writing_the_import(source, file):
    assert imports_of_scripts(ROOT / file, source), f"{source!r} in {file} was not caught"


@pytest.mark.parametrize(
    "source, file",
    [
        ("from ..plotting import plot_log_history", "trl_nca/demo/run.py"),
        ("from .layouts import scripts_free", "trl_nca/trainer.py"),
        ("import trl_nca.scriptsx", "benchmarks/step_time.py"),
        ("from trl_nca.demo import scripts", "benchmarks/step_time.py"),
    ],
)
def test_the_check_lets_other_imports_through(source, file):
    assert not imports_of_scripts(ROOT / file, source)


def test_no_library_module_demo_or_benchmark_imports_a_command_module():
    offending = [line for path in checked_files() for line in imports_of_scripts(path)]
    assert not offending, "import from trl_nca.scripts outside the commands:\n" + "\n".join(offending)
