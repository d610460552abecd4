"""The architecture matrix (tests/architectures.py): every layout, offline and online, on tiny models of 63 model
types gives the model's own log-probabilities (and gradients) or is refused up front with its reason; the table in
docs/architectures.md is the one these cells give."""

from pathlib import Path

import pytest
from architectures import MODEL_TYPES, cells, table_row

DOC = Path(__file__).parents[1] / "docs" / "architectures.md"


def test_the_matrix_covers_at_least_40_model_types_with_the_families_asked_for():
    asked = {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2", "gemma3_text",
        "phi", "phi3", "granite", "granitemoe", "cohere", "cohere2", "olmo2", "deepseek_v3", "gpt2", "gpt_neox",
        "falcon", "stablelm", "starcoder2", "glm4", "smollm3", "lfm2", "qwen3_next", "jamba", "gpt_oss", "llava",
        "qwen2_vl", "qwen2_5_vl", "gemma3", "idefics3", "smolvlm", "paligemma",
    }  # fmt: skip
    assert asked <= set(MODEL_TYPES) and len(MODEL_TYPES) >= 40


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_layout_gives_the_models_own_log_probs_or_is_refused(model_type):
    offline, online = cells(model_type)
    wrong = {f"{side} {layout}": cell for side, found in (("offline", offline), ("online", online))
             for layout, cell in found.items() if not cell.startswith(("equal", "refused: "))}  # fmt: skip
    assert not wrong, wrong
    # the table in the docs is generated from these cells (`python tests/architectures.py --write ...`)
    assert table_row(model_type, offline, online) in DOC.read_text().splitlines()
