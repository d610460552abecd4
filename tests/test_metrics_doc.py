"""docs/metrics.md names every key the trainers log: a short offline run (ragged K, so every K-response metric is
defined) and a short online run."""

import re
from pathlib import Path

from helpers import k_response_dataset, nca_args
from test_online import build

from trl_nca import NCATrainer, OnlineNCATrainer

DOC = (Path(__file__).parents[1] / "docs" / "metrics.md").read_text()
DOCUMENTED = set(re.findall(r"`([a-z_/<>]+)`", DOC))


def documented(key: str) -> bool:
    generic = re.sub(r"^rewards/[^/]+/(mean|std)$", r"rewards/<function>/\1", key)
    return key in DOCUMENTED or generic in DOCUMENTED


def logged_keys(trainer) -> set[str]:
    trainer.train()
    return {key for entry in trainer.state.log_history for key in entry}


def test_every_offline_key_is_documented(tokenizer, model, tmp_path):
    keys = logged_keys(NCATrainer(model=model, args=nca_args(tmp_path, max_steps=2), processing_class=tokenizer,
                                  train_dataset=k_response_dataset()))  # fmt: skip
    assert {"rewards/spearman", "logps/best", "rewards/chosen"} <= keys
    assert not [key for key in keys if not documented(key)]


def test_every_online_key_is_documented(tokenizer, tmp_path):
    keys = logged_keys(build(OnlineNCATrainer, tokenizer, tmp_path, per_device_train_batch_size=8, max_steps=1))
    assert {"frac_tied_groups", "logratio/mean", "reward"} <= keys
    assert not [key for key in keys if not documented(key)]
