"""The architecture matrix (tests/architectures.py): every layout, offline and online, on tiny models of every model
type listed (rope variants and wrapped VLMs among them) gives the model's own log-probabilities (and gradients) or is
refused up front with its reason; the table in docs/architectures.md is the one these cells give; the matrix fails
what it should (a dropped softcap, padding positions that move a rope); bf16 passes the check's tolerance."""

from pathlib import Path

import pytest
import torch
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


def test_the_matrix_fails_a_head_that_drops_the_softcap(monkeypatch):
    """The matrix's logits are large enough (`LOGIT_GAIN`) that a model's softcap binds: a head that skips it fails
    Gemma 2's cells (with the test models' small default weights it did not)."""
    from architectures import build, offline_cells

    from trl_nca.scoring import LogitTransform

    monkeypatch.setattr(LogitTransform, "__call__", lambda self, logits: logits * self.scale)
    cells_of = offline_cells(build("gemma2"))
    assert cells_of["padded"].startswith("MISMATCH") and cells_of["cache"].startswith("MISMATCH"), cells_of


def test_the_matrix_fails_padding_positions_that_move_a_dynamic_rope(monkeypatch):
    """The rows of the matrix hold one long row (six responses after its prompt): padding the shorter rows up to its
    length with growing positions (as the shared-prompt layout once did) moves their dynamic rope: the cell fails."""
    from architectures import build, offline_cells

    from trl_nca.layouts import shared_prompt

    collate = shared_prompt.DataCollatorForSharedPrompt.torch_call

    def growing_padding(self, examples):
        batch = collate(self, examples)
        for positions, real in zip(batch["position_ids"], batch["padding_mask"]):
            positions[real == 0] = torch.arange(int((real == 0).sum()))
        return batch

    monkeypatch.setattr(shared_prompt.DataCollatorForSharedPrompt, "torch_call", growing_padding)
    assert offline_cells(build("llama (rope dynamic)"))["mask"].startswith("MISMATCH")


BF16_MODELS = ["llama", "gemma2", "phi3", "gpt_oss", "llama (rope dynamic)"]


@pytest.mark.parametrize("model_type", BF16_MODELS)
def test_every_allowed_layout_passes_the_half_precision_check_in_bf16(model_type):
    """bfloat16 weights: every layout a model is allowed is within the check's per-token half-precision tolerance
    of the model's own forward (the largest gap is 0.65 of the tolerance, phi3)."""
    from architectures import bf16_cells

    found = bf16_cells(model_type)
    assert found and all(why is None for why in found.values()), found


def test_a_wrong_context_fails_the_half_precision_check(monkeypatch):
    """A windowed Mistral whose shared-prompt mask is built without its window (a wrong context) is caught per token
    in bfloat16 (by nats: the tolerance is tenths of a nat)."""
    from architectures import bf16_cells

    import trl_nca.forward

    monkeypatch.setattr(trl_nca.forward, "attention_windows", lambda model, *args: (None, None))
    assert "tokens off" in bf16_cells("mistral")["mask"]


def test_the_window_goes_in_the_mask_the_model_takes():
    """One mask where every layer has the window, a mask per layer type where the forward takes a dict of them, none
    where the window is as long as the longest sequence; refused where the layers differ and take one mask."""
    from architectures import build

    from trl_nca.layouts import Windows, attention_windows

    assert attention_windows(build("mistral")) == (Windows(window=4), None)
    assert attention_windows(build("mistral"), longest=5) == (Windows(window=4), None)
    assert attention_windows(build("mistral"), longest=4) == (None, None)  # never more than 4 tokens: no window
    assert attention_windows(build("phi3 (window 262144)")) == (None, None)
    windows, _ = attention_windows(build("gemma2"))
    assert windows.by_type == {"sliding_attention": 4, "full_attention": None}
    windows, why = attention_windows(build("gpt_neo"))
    assert windows is None and "its forward takes one mask for all of them" in why


def test_the_matrix_fails_a_prompt_cache_that_drops_a_hybrids_state(monkeypatch):
    """The hybrid rows' prompts (3 to 11 tokens) are longer than their convolutions (3-4 tokens): a response call that
    starts from a fresh state instead of the prompt's fails the cell (LFM2's short convolutions)."""
    from architectures import build, offline_cells

    from trl_nca import scoring

    monkeypatch.setattr(scoring, "_continue", lambda layer, prompt, batch: None)
    assert offline_cells(build("lfm2"))["cache"].startswith("MISMATCH")


@pytest.mark.parametrize("model_type", ["qwen3_next"])  # its convolution and its recurrent state
def test_a_hybrid_keeps_the_prompt_cache_under_gradient_checkpointing(model_type):
    """Gradient checkpointing (non-reentrant, TRL's default) replays the prompt's forward in the backward pass: its
    state layers read no state and write none there, so the prompt-cache layout's values and gradients equal the
    padded layout's (a replay that read the state the first pass wrote failed Qwen3-Next's recomputation)."""
    from architectures import _layout, build, k_response_rows

    from trl_nca.dropout import disable_dropout
    from trl_nca.scoring import add_response_head

    model = build(model_type).train()
    disable_dropout(model)
    add_response_head(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    rows = k_response_rows()
    weights = torch.linspace(-1, 1, sum(len(r["completion_ids"]) for r in rows))
    (padded, padded_grad), (cache, cache_grad) = (_layout(model, rows, name, weights) for name in ("padded", "cache"))
    torch.testing.assert_close(cache, padded, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cache_grad, padded_grad, rtol=0, atol=1e-4 * float(padded_grad.abs().max()))
