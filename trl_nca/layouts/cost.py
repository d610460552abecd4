"""The cost model behind `prompt_sharing="auto"`: per batch, the time each layout would take (device work, plus the
host's preparation in the same units) and the activation memory it would keep, from the batch's lengths and the
model's shape. `DataCollatorForAnyLayout` takes the cheapest layout whose memory fits the device's budget.

Constants, and where each was measured (a value not measured on the device it applies to says so):

- `ATTENTION_SLOWDOWN` (3): masked attention's time per multiply-add over the matmuls', 2-core CPU
  (docs/layouts.md). Applied on CUDA too, where it was not measured.
- `CALL_OVERHEAD_TOKENS_BY_DEVICE` (`prompt_cache.py`): a forward call's fixed cost in tokens, 64 on the CPU
  (measured), 2,048 on CUDA (measured with SmolLM2-135M on an H200; a larger model is less launch-bound, so there it
  overstates the cost of a call).
- `HOST_SECONDS_PER_TOKEN`: the collators' time per token they lay out, measured with `benchmarks/host_prep.py` on the
  2-core CPU; collation runs on the host whatever the device, so it holds on a GPU machine up to its CPU's speed.
- `DEVICE_MADDS_PER_SECOND`: the device's multiply-adds per second in a training step, to put host seconds in the
  cost's units: CPU measured (`benchmarks/step_time.py`, SmolLM2, float32, 2 cores); CUDA not measured (an
  assumption: 200 T, a third of an H100's dense bf16 peak).
- `ACTIVATION_BYTES_PER_TOKEN_LAYER`: activations kept for the backward pass per token and layer, in units of the
  hidden size x the parameter's bytes: 17 (Korthikanti et al. 2022 count 34 bytes x hidden in 16-bit, attention
  scores apart); from the literature, not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .blockers import FULL_ATTENTION, WINDOWED, _layer_kinds
from .prompt_cache import CALL_OVERHEAD_TOKENS, call_overhead_tokens, plan_calls

LAYOUT_NAMES = ("padded", "mask", "cache")
ATTENTION_SLOWDOWN = 3
HOST_SECONDS_PER_TOKEN = {"padded": 6.5e-7, "mask": 1.6e-6, "cache": 3.3e-7}
DEVICE_MADDS_PER_SECOND = {"cpu": 3e10, "cuda": 2e14}
ACTIVATION_BYTES_PER_TOKEN_LAYER = 17
# The share of the device's free memory (when the trainer is built) that a batch's activations may take; the rest is
# for gradients, the optimizer's states and the allocator. A guess, not measured
MEMORY_BUDGET_SHARE = 0.5


def device_memory_budget(device: torch.device) -> int | None:
    """The bytes of activations a batch may keep on `device`: `MEMORY_BUDGET_SHARE` of CUDA's free memory now; None
    (no limit) elsewhere."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * MEMORY_BUDGET_SHARE)


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs to know of a model: hidden size, layers, parameters of the body (a token's matmul
    work is about 2 x that), how its attention handles a custom mask (`"dense"`: every masked score is still
    computed, `sdpa`/`eager`; `"blocks"`: fully masked blocks are skipped, `flex_attention`), the device type, the
    attention heads and bytes per activation (for the memory estimate), and the memory budget in bytes that a batch's
    activations may take (None: no limit, as on the CPU)."""

    hidden_size: int
    num_layers: int
    body_params: int
    attention: str = "dense"
    call_overhead_tokens: int = CALL_OVERHEAD_TOKENS
    device_type: str = "cpu"
    num_heads: int = 1
    activation_bytes: int = 4
    memory_budget: int | None = None
    # the layers that attend (all but a hybrid's convolution, state-space and linear-attention layers, whose work is
    # linear in the tokens and counted in `body_params`); None: every layer
    attention_layers: int | None = None

    @classmethod
    def of(cls, model, device_type: str = "cpu", memory_budget: int | None = None) -> ModelShape:
        config = model.config.get_text_config()
        embeddings = _numel(model.get_input_embeddings().weight)
        total = sum(_numel(p) for p in model.parameters())
        head = 0 if getattr(config, "tie_word_embeddings", False) else _numel(model.get_output_embeddings().weight)
        attention = "blocks" if config._attn_implementation == "flex_attention" else "dense"
        body = max(total - embeddings - head, 1)
        dtype = getattr(model, "dtype", None)
        kinds = _layer_kinds(config)
        attending = sum(k in FULL_ATTENTION or any(w in k for w in WINDOWED) for k in kinds) if kinds else None
        return cls(
            config.hidden_size, config.num_hidden_layers, body, attention, call_overhead_tokens(device_type),
            device_type, getattr(config, "num_attention_heads", 1) or 1, getattr(dtype, "itemsize", 4), memory_budget,
            attending,
        )  # fmt: skip

    @property
    def attending_layers(self) -> int:
        return self.num_layers if self.attention_layers is None else self.attention_layers


def _numel(parameter) -> int:
    """A parameter's size, also where DeepSpeed ZeRO-3 has partitioned it (its `numel()` is then 0 on every rank)."""
    return getattr(parameter, "ds_numel", None) or parameter.numel()


@dataclass(frozen=True)
class LayoutWork:
    """What a layout computes for a batch: tokens through the model, attention scores, forward calls, the tokens the
    host lays out, and the largest number of scores one attention call holds at once (sequences x length^2 of its
    biggest call)."""

    tokens: float
    scores: float
    calls: int
    host_tokens: float
    widest_scores: float


def layout_work(layout: str, rows: list[tuple[int, list[int]]], shape: ModelShape) -> LayoutWork:
    """The work of a batch of `rows`, each `(prompt length, [response lengths])`, in `layout` (table in
    docs/layouts.md)."""
    if layout == "padded":
        length = max(p + r for p, responses in rows for r in responses)
        sequences = sum(len(responses) for _, responses in rows)
        scores = sequences * length * length
        return LayoutWork(sequences * length, scores, 1, sequences * length, scores)
    if layout == "mask":
        length = max(p + sum(responses) + len(responses) - 1 for p, responses in rows)
        if shape.attention == "blocks":  # only the prompt and each response's own causal block
            scores = sum(p * p / 2 + sum(r * (p + r / 2) for r in responses) for p, responses in rows)
        else:
            scores = len(rows) * length * length
        return LayoutWork(len(rows) * length, scores, 1, len(rows) * length, scores)
    if layout == "cache":
        tokens = scores = widest = 0
        calls = 0
        for p, responses in rows:
            planned = plan_calls(responses, shape.call_overhead_tokens)
            tokens += p - 1
            scores += (p - 1) * (p - 1)
            widest = max(widest, (p - 1) * (p - 1))
            calls += 1 + len(set(planned))
            for call in set(planned):
                width = max(r for r, c in zip(responses, planned) if c == call) + 1
                count = planned.count(call)
                tokens += count * width
                scores += count * width * (p - 1 + width)
                widest = max(widest, count * width * (p - 1 + width))
        return LayoutWork(tokens, scores, calls, tokens, widest)
    raise ValueError(f"Unknown layout {layout!r}; layouts: {LAYOUT_NAMES}")


def layout_cost(layout: str, rows: list[tuple[int, list[int]]], shape: ModelShape) -> float:
    """Estimated time of a batch of `rows` in `layout`, in multiply-adds of the device: the matmul work of every token
    computed, the attention scores computed, a fixed cost per forward call, and the host's preparation of the batch
    (converted at the device's rate). The LM head is left out: every layout scores the same response tokens."""
    work = layout_work(layout, rows, shape)
    per_token = 2 * shape.body_params
    # q.k and attention x v; masked attention runs at about a third of the matmuls' rate (softmax, masking, memory
    # traffic), which ATTENTION_SLOWDOWN carries
    per_score = 2 * shape.hidden_size * shape.attending_layers * ATTENTION_SLOWDOWN
    device = work.tokens * per_token + work.scores * per_score + work.calls * shape.call_overhead_tokens * per_token
    rate = DEVICE_MADDS_PER_SECOND.get(shape.device_type, DEVICE_MADDS_PER_SECOND["cuda"])
    return device + work.host_tokens * HOST_SECONDS_PER_TOKEN[layout] * rate


def layout_memory(layout: str, rows: list[tuple[int, list[int]]], shape: ModelShape) -> float:
    """Estimated bytes of activations a batch of `rows` keeps for the backward pass in `layout`: every token's, per
    layer, and where attention is dense on the CPU (no fused kernel), the attention probabilities of every layer;
    on CUDA `sdpa` does not keep them, and its boolean mask (built on the device) counts once."""
    work = layout_work(layout, rows, shape)
    tokens = work.tokens * shape.num_layers * ACTIVATION_BYTES_PER_TOKEN_LAYER * shape.hidden_size
    tokens *= shape.activation_bytes
    if shape.attention == "blocks":
        scores = 0.0
    elif shape.device_type == "cpu":
        scores = work.scores * shape.num_heads * shape.attending_layers * shape.activation_bytes
    else:
        scores = work.widest_scores if layout == "mask" else 0.0  # the boolean mask, one byte a score
    return tokens + scores


def cheapest(layouts: list[str], rows: list[tuple[int, list[int]]], shape: ModelShape) -> str:
    """The layout of `layouts` with the least `layout_cost` among those whose `layout_memory` fits the shape's
    budget (ties: the first listed); if none fits, the one that needs the least memory."""
    if shape.memory_budget is not None:
        fits = [name for name in layouts if layout_memory(name, rows, shape) <= shape.memory_budget]
        if not fits:
            return min(layouts, key=lambda name: layout_memory(name, rows, shape))
        layouts = fits
    return min(layouts, key=lambda name: layout_cost(name, rows, shape))
