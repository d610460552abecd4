"""The architecture matrix: tiny random models of every family the tests cover, and each layout's cell on them.

A cell is one layout (offline: `padded`, `mask`, `cache`; online: the same layouts through the grouped forward) on
one model type: `equal` (the layout's log-probabilities, and offline its gradients, equal the model's own forward)
or `refused: <reason>` (`choose_layout` leaves it out, with the blockers' reason), or `MISMATCH ...` (a silent
difference: the test fails). `python tests/architectures.py` writes the table of docs/architectures.md from these
cells; `tests/test_architectures.py` checks every cell and that the table in the docs is the one they give.

Configs are the model type's defaults, shrunk: 2 layers (one of each kind where the model mixes layer kinds), hidden
size 32, 4 heads, a vocabulary of 400, a sliding window of 4 tokens where the model has one (shorter than the test's
sequences, so a window that is not applied shows), and small experts. Float32 on the CPU, `sdpa` attention where the
model supports it.
"""

from __future__ import annotations

import contextlib
import sys
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

from trl_nca.forward import response_token_logps, sum_by_response
from trl_nca.group_forward import grouped_per_token
from trl_nca.layout_check import model_logit_transform
from trl_nca.layouts import (
    cache_blocker,
    choose_layout,
    length_dependent_rope,
    make_collator,
    mask_blocker,
    shared_blocker,
)
from trl_nca.layouts.blockers import PREFIX_LM
from trl_nca.scoring import add_response_head, set_logit_transform

VOCAB = 400
LAYOUTS = ("padded", "mask", "cache")

# Shrunk sizes, set where the model type's config has the attribute
SMALL = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=8, vocab_size=VOCAB, max_position_embeddings=256, sliding_window=4, num_experts=4, num_local_experts=4,
    num_experts_per_tok=2, moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=1,
    kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
    shared_expert_intermediate_size=32, n_positions=256, n_embd=32, n_layer=2, n_head=4, n_inner=64, num_layers=2,
    ffn_hidden_size=64, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=8,
    linear_value_head_dim=8, mamba_d_state=8, mamba_n_heads=4, mamba_d_head=16, mamba_d_conv=4, mamba_n_groups=1,
    mamba_expand=2, mamba_chunk_size=16, state_size=8, attn_layer_period=2, attn_layer_offset=1,
    expert_layer_period=2, expert_layer_offset=1, rotary_dim=4, conv_L_cache=3, n_group=1, topk_group=1,
    pad_token_id=0, bos_token_id=1, eos_token_id=2,
)  # fmt: skip

# Decoder-only model types and what their config needs beyond `SMALL` (both layer kinds of a hybrid, a window)
TEXT_MODELS = {
    "llama": {}, "mistral": {}, "mixtral": {},
    "qwen2": {
        "use_sliding_window": True, "max_window_layers": 1, "layer_types": ["full_attention", "sliding_attention"]
    },
    "qwen2_moe": {}, "qwen3": {}, "qwen3_moe": {}, "gemma": {}, "gemma2": {}, "gemma3_text": {}, "phi": {},
    "phi3": {}, "granite": {"logits_scaling": 8.0}, "granitemoe": {"logits_scaling": 8.0},
    "cohere": {"logit_scale": 0.5}, "cohere2": {}, "olmo": {}, "olmo2": {}, "olmoe": {},
    "deepseek_v2": {"num_key_value_heads": 4},
    "deepseek_v3": {"head_dim": 4, "num_key_value_heads": 4}, "gpt2": {}, "gpt_neox": {}, "gpt_neo": {
        "attention_types": [[["global", "local"], 1]], "window_size": 4}, "gptj": {}, "falcon": {}, "stablelm": {},
    "starcoder2": {}, "glm": {}, "glm4": {}, "smollm3": {}, "lfm2": {"layer_types": ["conv", "full_attention"]},
    "qwen3_next": {}, "qwen3_5_text": {}, "jamba": {}, "bamba": {"attn_layer_indices": [1]},
    "falcon_h1": {"mamba_d_ssm": 64}, "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "minimax": {}, "gpt_oss": {}, "exaone4": {}, "ministral": {}, "helium": {}, "seed_oss": {}, "bloom": {},
    "opt": {}, "persimmon": {}, "nemotron": {}, "phimoe": {}, "arcee": {}, "vaultgemma": {}, "bitnet": {},
    "hunyuan_v1_dense": {}, "ernie4_5": {}, "internlm3": {}, "apertus": {},
}  # fmt: skip
# Image-text-to-text model types, on text rows (image rows: tests/test_images.py); overrides of the text config
# (`model_type`: another text model inside the wrapper). Cohere2Vision, LLaVA-NeXT with a Granite text model and
# Gemma 3 carry a logit transform in their text config that the wrapper's own forward never applies
VLM_MODELS = {
    "llava": {}, "qwen2_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
    "qwen2_5_vl": {"rope_parameters": {"rope_type": "default", "mrope_section": [2, 1, 1]}},
    "gemma3": {"final_logit_softcapping": 2.0}, "idefics3": {}, "smolvlm": {}, "paligemma": {},
    "cohere2_vision": {"logit_scale": 0.5}, "llava_next": {"model_type": "granite", "logits_scaling": 8.0},
}  # fmt: skip
# Rotary embeddings of every kind transformers has, on Llama, with sequences (up to 20 tokens) past the length where
# the scaled ones change (12); `dynamic` and `longrope` change with a forward's largest position
ROPE_MODELS = {
    f"llama (rope {kind})": {"rope_parameters": {"rope_type": kind, "rope_theta": 10000.0, **extra},
                             "max_position_embeddings": 12 if kind == "dynamic" else 48}
    for kind, extra in [
        ("default", {}), ("linear", {"factor": 2.0}), ("dynamic", {"factor": 2.0}),
        ("longrope", {"short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [2.0, 2.5, 3.0, 3.5],
                      "original_max_position_embeddings": 12}),
        ("yarn", {"factor": 2.0, "original_max_position_embeddings": 12}),
        ("llama3", {"factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 12}),
    ]
}  # fmt: skip
# Other variants of a model type: Phi-3 with a window as long as its context (Phi-3.5-mini, Phi-4-mini), which never
# applies
VARIANTS = {
    **{name: ("llama", overrides) for name, overrides in ROPE_MODELS.items()},
    "phi3 (window 262144)": ("phi3", {"sliding_window": 262144}),
}
MODEL_TYPES = (*TEXT_MODELS, *VLM_MODELS, *VARIANTS)
# The LM head's weights are multiplied by this, so that logits are large (a standard deviation of about 10) and a
# softcap or a scale of the logits changes them: a head that drops a model's transform fails its cells
LOGIT_GAIN = 100.0


def _small(config: dict, overrides: dict) -> dict:
    small = {key: value for key, value in SMALL.items() if key in config}
    kinds_key = next((k for k in ("layer_types", "layers_block_type") if config.get(k)), None)
    if kinds_key:  # one layer of each kind the model mixes
        kinds = list(dict.fromkeys(config[kinds_key]))
        small["num_hidden_layers"] = max(2, len(kinds))
        small[kinds_key] = [kinds[i % len(kinds)] for i in range(small["num_hidden_layers"])]
    return {**small, **overrides}


def build(model_type: str, seed: int = 0):
    """A tiny random float32 model of `model_type` (a key of `MODEL_TYPES`; eval mode, `sdpa` where supported), its
    LM head multiplied by `LOGIT_GAIN`."""
    torch.manual_seed(seed)
    if model_type in VLM_MODELS:
        default = AutoConfig.for_model(model_type)
        parts = {}
        for name in ("text_config", "vision_config"):
            part = getattr(default, name)
            overrides = dict(VLM_MODELS[model_type]) if name == "text_config" else {}
            kind = overrides.pop("model_type", part.model_type)
            base = part.to_dict() if kind == part.model_type else AutoConfig.for_model(kind).to_dict()
            parts[name] = {**_small(base, overrides), "model_type": kind}
        config = AutoConfig.for_model(model_type, **parts)
        model = AutoModelForImageTextToText.from_config(config)
    else:
        kind, overrides = VARIANTS.get(model_type, (model_type, TEXT_MODELS.get(model_type)))
        config = AutoConfig.for_model(kind, **_small(AutoConfig.for_model(kind).to_dict(), overrides))
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(LOGIT_GAIN)
    return model.float().eval()


def k_response_rows(seed: int = 0) -> list[dict]:
    """Three tokenized rows: prompts of 7, 11 and 3 tokens, K = 6, 2, 3 responses of 2 to 9 tokens (the first row,
    with its responses after its prompt, is more than twice as long as any prompt+response)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(3, VOCAB, (n,), generator=generator).tolist()

    shapes = [(7, [5, 2, 9, 8, 7, 6]), (11, [4, 8]), (3, [6, 3, 2])]
    return [
        {"prompt_ids": tokens(p), "completion_ids": [tokens(r) for r in rs], "rewards": [0.0] * len(rs)}
        for p, rs in shapes
    ]


def reasons(model, setting: str = "auto") -> dict[str, str]:
    """Why `choose_layout` leaves each layout out for `model` (as the trainers call it), by layout."""
    args = SimpleNamespace(gradient_checkpointing=False, gradient_checkpointing_kwargs=None)
    choice = choose_layout(
        setting, model.config._attn_implementation, "keep_start", router_loss=False,
        cache_blocker=cache_blocker(model, args, sharded=False), shared_blocker=shared_blocker(model),
        mask_blocker=mask_blocker(model),
    )  # fmt: skip
    return choice.reasons


def _separate(model, rows, weights):
    """The model's own forward, one prompt+response at a time: summed response log-probabilities (float64 log-softmax
    of the full logits) and the gradient of their `weights`-weighted sum."""
    model.zero_grad()
    values = []
    for row in rows:
        for completion in row["completion_ids"]:
            ids = torch.tensor([row["prompt_ids"] + completion])
            logits = model(input_ids=ids).logits[0, :-1].double()
            logps = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None]).squeeze(-1)
            values.append(logps[len(row["prompt_ids"]) - 1 :].sum())
    values = torch.stack(values)
    (values * weights).sum().backward()
    return values.detach(), _gradient(model)


def _padded_forward(model, rows, weights):
    """The model's plain forward and full logits on the padded layout's batch (what DPOTrainer runs)."""
    model.zero_grad()
    batch = make_collator("padded", pad_token_id=0, max_length=None, truncation_mode="keep_start",
                          pad_to_multiple_of=None)(rows)  # fmt: skip
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    labels = batch["input_ids"][:, 1:]
    per_token = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    values = (per_token * batch["completion_mask"][:, 1:]).sum(-1)
    (values * weights).sum().backward()
    return values.detach(), _gradient(model)


def _gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]).double()


def _collator(model, layout):
    """The layout's collator as the trainers make it for `model`."""
    return make_collator(layout, pad_token_id=0, max_length=None, truncation_mode="keep_start",
                         pad_to_multiple_of=None,
                         match_padded_positions=length_dependent_rope(model.config) is not None)  # fmt: skip


def _layout(model, rows, layout, weights):
    model.zero_grad()
    batch = _collator(model, layout)(rows)
    outputs, owner = response_token_logps(model, batch, head="response", mask_dtype=torch.float32)
    values = sum_by_response(outputs.log_probs, owner, int(batch["response_mask"].sum()))
    (values * weights).sum().backward()
    return values.detach().double(), _gradient(model)


def _differs(found, expected, atol, rtol) -> float | None:
    """The largest difference beyond `atol + rtol * |expected|`, or None."""
    gap = (found - expected).abs()
    return float(gap.max()) if bool((gap > atol + rtol * expected.abs()).any()) else None


def batch_reference(model) -> str | None:
    """Why one sequence alone is not what trains (the reference is then the model's forward on the padded batch), or
    None: a prefix-LM's forward attends both ways over a whole input given without token_type_ids (as DPOTrainer
    gives text rows); dynamic and longrope rotary frequencies follow the longest position of the batch."""
    if model.config.model_type in PREFIX_LM:
        return "prefix-LM"
    rope = length_dependent_rope(model.config)
    return None if rope is None else "longrope" if rope[0] == "longrope" else f"{rope[0]} rope"


def offline_cells(model) -> dict[str, str]:
    """Each offline layout on `model`, with the logit transform the trainers read from it (`model_logit_transform`):
    `equal` (per-response log-probabilities to 1e-4 relative, gradients to 1e-4 of the largest), `refused: ...`, or
    `MISMATCH ...`."""
    add_response_head(model)
    rows = k_response_rows()
    transform, _ = model_logit_transform(model, rows[0]["prompt_ids"][:4])
    if transform is not None:  # else the config's, which the cells then show wrong
        set_logit_transform(model, transform)
    weights = torch.linspace(-1, 1, sum(len(r["completion_ids"]) for r in rows), dtype=torch.float64)
    batch = batch_reference(model)
    expected, expected_grad = (_padded_forward if batch else _separate)(model, rows, weights)
    out = {}
    for layout, reason in reasons(model).items():
        out[layout] = f"refused: {reason}"
    for layout in LAYOUTS:
        if layout in out:
            continue
        try:
            found, grad = _layout(model, rows, layout, weights.float())
        except Exception as error:  # a crash is a cell the blockers should have refused
            out[layout] = f"MISMATCH: {type(error).__name__}: {str(error)[:200]}"
            continue
        value_gap = _differs(found, expected, atol=1e-4, rtol=1e-4)
        grad_gap = _differs(grad, expected_grad, atol=1e-4 * float(expected_grad.abs().max()) + 1e-7, rtol=0)
        if value_gap is not None or grad_gap is not None:
            out[layout] = f"MISMATCH: log-probs off by {value_gap}, gradients by {grad_gap}"
        else:
            out[layout] = f"equal (padded forward: {batch})" if batch else "equal"
    return out


def grpo_rows(rows, pad: int = 0):
    """GRPO's rows of `rows`: `[left-padded prompt | right-padded completion]` per completion, its attention mask and
    `logits_to_keep`."""
    prompts = [row["prompt_ids"] for row in rows for _ in row["completion_ids"]]
    completions = [c for row in rows for c in row["completion_ids"]]
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    ids = torch.full((len(prompts), width_p + width_c), pad)
    mask = torch.zeros_like(ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        ids[i, width_p - len(p) : width_p] = torch.tensor(p)
        ids[i, width_p : width_p + len(c)] = torch.tensor(c)
        mask[i, width_p - len(p) : width_p + len(c)] = 1
    return ids, mask, width_c


def _grpo_forward(model, ids, mask, logits_to_keep):
    """GRPOTrainer's own `_get_per_token_logps_and_entropies` (TRL's code; it reads only `accelerator.autocast`)."""
    method = GRPOTrainer._get_per_token_logps_and_entropies
    method = getattr(method, "__wrapped__", method)  # TRL's profiling decorator
    stub = SimpleNamespace(accelerator=SimpleNamespace(autocast=contextlib.nullcontext))
    logps, entropies, _ = method(stub, model, ids, mask, logits_to_keep, compute_entropy=True)
    return logps, entropies


def absolute_positions(model, ids, mask, logits_to_keep) -> bool:
    """Whether the model's values depend on where a row's left padding puts its tokens (absolute position
    embeddings): GRPO's forward counts the pads, generation and the layouts take positions from the mask."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        counted = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    return not torch.allclose(plain[real], counted[real], atol=1e-4, rtol=1e-4)


def online_cells(model) -> dict[str, str]:
    """Each layout through the online grouped forward on `model`: per-token log-probabilities and entropies against
    GRPOTrainer's forward (`equal`), or against the model's forward at generation's positions where the model has
    absolute positions (`equal (positions from the mask)`), `refused: ...`, or `MISMATCH ...`."""
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    add_response_head(model)
    rows = k_response_rows(seed=1)
    ids, mask, keep = grpo_rows(rows)
    completion = mask[:, -keep:].bool()
    absolute = absolute_positions(model, ids, mask, keep)
    with torch.no_grad():
        if absolute:  # GRPO's forward with the positions generation used
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            labels = ids.masked_fill(mask == 0, -100)
            labels[:, :-keep] = -100
            out = model(input_ids=ids, attention_mask=mask, position_ids=positions, labels=labels, fused_lm_head=True)
            expected = out.log_probs[:, -keep:], out.entropy[:, -keep:]
        else:
            expected = _grpo_forward(model, ids, mask, keep)
    out = {layout: f"refused: {reason}" for layout, reason in reasons(model).items()}
    for layout in LAYOUTS:
        if layout in out:
            continue
        collator = _collator(model, layout)
        try:
            with torch.no_grad():
                found = grouped_per_token(model, collator, ids, mask, keep, token_stats=True,
                                          match_positions=length_dependent_rope(model.config) is not None)  # fmt: skip
        except Exception as error:
            out[layout] = f"MISMATCH: {type(error).__name__}: {str(error)[:200]}"
            continue
        gaps = [_differs(f[completion].double(), e[completion].double(), atol=1e-4, rtol=1e-4)
                for f, e in zip(found, expected)]  # fmt: skip
        if any(gap is not None for gap in gaps):
            out[layout] = f"MISMATCH: log-probs off by {gaps[0]}, entropies by {gaps[1]}"
        else:
            out[layout] = "equal (positions from the mask)" if absolute else "equal"
    return out


COLUMNS = [f"offline {layout}" for layout in LAYOUTS] + [f"online {layout}" for layout in LAYOUTS]


def cells(model_type: str) -> tuple[dict[str, str], dict[str, str]]:
    """The offline and online cells of `model_type` (each on a fresh model)."""
    return offline_cells(build(model_type)), online_cells(build(model_type))


def table_row(model_type: str, offline: dict[str, str], online: dict[str, str]) -> str:
    """The row of docs/architectures.md for these cells: each cell's verdict, and the refusals' reasons once."""
    verdicts, reasons_given = [], []
    for found in (offline, online):
        for layout in LAYOUTS:
            cell = found[layout]
            if cell.startswith("refused: "):
                verdicts.append("refused")
                reasons_given.append(cell.removeprefix("refused: "))
            else:
                verdicts.append({"equal": "equal"}.get(cell, cell.replace("equal (", "equal<br>(")))
    why = "; ".join(dict.fromkeys(reasons_given))
    return f"| {model_type} | " + " | ".join(verdicts) + f" | {why} |"


HEADER = "| model type | " + " | ".join(COLUMNS) + " | why refused |\n" + "|---" * (len(COLUMNS) + 2) + "|"


def write_table(path: str) -> None:
    """Rewrite the table between the markers of `path` from the cells computed now."""
    rows = [table_row(model_type, *cells(model_type)) for model_type in MODEL_TYPES]
    text = open(path).read()
    start, end = "<!-- matrix start -->", "<!-- matrix end -->"
    head, rest = text.split(start)
    _, tail = rest.split(end)
    with open(path, "w") as f:
        f.write(head + start + "\n" + HEADER + "\n" + "\n".join(rows) + "\n" + end + tail)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"]:
        write_table(sys.argv[2])
        sys.exit(0)
    for model_type in sys.argv[1:] or MODEL_TYPES:
        try:
            print(table_row(model_type, *cells(model_type)), flush=True)
        except Exception as error:
            print(model_type, "FAILED", type(error).__name__, str(error)[:300], flush=True)


def bf16_cells(model_type: str, force: str | None = None) -> dict[str, str | None]:
    """Each layout the model is allowed (and `force`, allowed or not) on a bfloat16 copy of it, as the layout check
    compares it: per token against the model's own forward on the padded rows, at the check's half-precision
    tolerance. `{layout: None}` where it passes, the mismatch in words where it does not."""
    from trl_nca.layout_check import layout_token_logps, own_forward_token_logps, token_mismatch

    model = build(model_type).to(torch.bfloat16)
    add_response_head(model)
    rows = k_response_rows()
    padded = _collator(model, "padded")(rows)
    out = {}
    with torch.no_grad():
        expected, index = own_forward_token_logps(model, padded)
        for layout in [name for name in LAYOUTS if name not in reasons(model)] + ([force] if force else []):
            values = layout_token_logps(model, _collator(model, layout)(rows), "response", torch.bfloat16)
            out[layout] = token_mismatch(values[index], expected, half=True)
    return out
