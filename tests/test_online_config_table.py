"""docs/online.md says, for every field of the installed TRL's GRPOConfig, what it does in the online trainers; the
fields it says are refused are refused."""

import re
from dataclasses import fields
from pathlib import Path

import pytest
from transformers import TrainingArguments
from trl import GRPOConfig

from trl_nca import OnlineNCAConfig
from trl_nca.online_config import _GRPO_ONLY_FIELDS

DOC = (Path(__file__).parent.parent / "docs" / "online.md").read_text()
GRPO_FIELDS = [f.name for f in fields(GRPOConfig) if f.name not in {t.name for t in fields(TrainingArguments)}]


def test_the_docs_table_names_every_grpo_config_field():
    named = set(re.findall(r"`([a-z0-9_]+)`", DOC))
    missing = [name for name in GRPO_FIELDS if name not in named]
    assert not missing, f"docs/online.md does not say what these GRPOConfig fields do: {missing}"


def test_every_field_the_table_calls_refused_is_refused(tmp_path):
    row = next(line for line in DOC.splitlines() if "**refused** when set" in line)
    refused = re.findall(r"`([a-z0-9_]+)`", row.split("|")[1])
    assert sorted(refused) == sorted(_GRPO_ONLY_FIELDS)
    for name in refused:
        default = _GRPO_ONLY_FIELDS[name]
        other = {str: "bnpo" if name == "loss_type" else "sequence", bool: True}.get(type(default), 0.5)
        if name == "scale_rewards":
            other = "batch"
        if name == "multi_objective_aggregation":
            other = "normalize_then_sum"
        with pytest.raises(ValueError, match=f"`{name}="):
            OnlineNCAConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **{name: other})
