"""Every Python snippet of README.md and docs/ runs as written on a CPU machine. The only change the test makes is the
model: a hub id in `model="..."` becomes a tiny model saved to a folder (nothing is downloaded). Each snippet runs in
a fresh interpreter, as a user would paste it."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import build_model, build_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SNIPPET = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
HUB_MODEL = re.compile(r'model="[\w.-]+/[\w.-]+"')


def snippets():
    for path in FILES:
        text = path.read_text()
        for match in SNIPPET.finditer(text):
            line = text[: match.start()].count("\n") + 1
            yield pytest.param(match.group(1), id=f"{path.relative_to(ROOT)}:{line}")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("snippets") / "tiny"
    tokenizer = build_tokenizer()
    build_model(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_the_readme_has_both_quickstarts_as_snippets():
    ids = [param.id for param in snippets()]
    assert sum(i.startswith("README.md:") for i in ids) == 2 and len(ids) >= 3


@pytest.mark.parametrize("code", snippets())
def test_the_snippet_runs_as_written(code, tiny, tmp_path):
    code = HUB_MODEL.sub(f'model="{tiny}"', code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
