"""The cost model of `prompt_sharing="auto"` (`trl_nca.layouts.cost`): its host term, its memory estimate, and the
choice under a memory budget, against computations written out here."""

import pytest
import torch

from trl_nca.layouts import DataCollatorForAnyLayout, ModelShape, layout_cost, layout_memory, make_collator
from trl_nca.layouts.cost import (
    ACTIVATION_BYTES_PER_TOKEN_LAYER,
    ATTENTION_SLOWDOWN,
    DEVICE_MADDS_PER_SECOND,
    HOST_SECONDS_PER_TOKEN,
    cheapest,
)

SHAPE = ModelShape(hidden_size=64, num_layers=2, body_params=100_000, num_heads=4)
# one row: a prompt of 10 tokens, responses of 4 and 6
ROWS = [(10, [4, 6])]


def test_the_cost_adds_the_hosts_preparation_at_the_devices_rate():
    # padded: 2 sequences of 16 tokens, 2 x 16^2 scores, 1 call
    device = 32 * 2 * 100_000 + 512 * 2 * 64 * 2 * ATTENTION_SLOWDOWN + 64 * 2 * 100_000
    host = 32 * HOST_SECONDS_PER_TOKEN["padded"] * DEVICE_MADDS_PER_SECOND["cpu"]
    assert layout_cost("padded", ROWS, SHAPE) == pytest.approx(device + host)
    # mask: one sequence of 10 + 4 + 6 + 1 = 21 tokens, 21^2 dense scores
    device = 21 * 2 * 100_000 + 441 * 2 * 64 * 2 * ATTENTION_SLOWDOWN + 64 * 2 * 100_000
    host = 21 * HOST_SECONDS_PER_TOKEN["mask"] * DEVICE_MADDS_PER_SECOND["cpu"]
    assert layout_cost("mask", ROWS, SHAPE) == pytest.approx(device + host)


def test_memory_counts_activations_and_where_attention_is_dense_on_the_cpu_its_scores():
    per_token = 2 * ACTIVATION_BYTES_PER_TOKEN_LAYER * 64 * 4  # layers x bytes per token-layer x hidden x float32
    assert layout_memory("padded", ROWS, SHAPE) == pytest.approx(32 * per_token + 512 * 4 * 2 * 4)
    assert layout_memory("mask", ROWS, SHAPE) == pytest.approx(21 * per_token + 441 * 4 * 2 * 4)
    # on CUDA sdpa keeps no scores; the mask layout's boolean mask counts once (one byte a score)
    cuda = ModelShape(64, 2, 100_000, num_heads=4, device_type="cuda", activation_bytes=2)
    assert layout_memory("padded", ROWS, cuda) == pytest.approx(32 * per_token / 2)
    assert layout_memory("mask", ROWS, cuda) == pytest.approx(21 * per_token / 2 + 441)
    # FlexAttention keeps no dense scores anywhere
    flex = ModelShape(64, 2, 100_000, attention="blocks", num_heads=4)
    assert layout_memory("mask", ROWS, flex) == pytest.approx(21 * per_token)


def test_a_layout_over_the_memory_budget_is_passed_over_for_one_that_fits():
    # a long shared prompt and many short responses: the mask layout is the cheapest by time on CUDA (one call), but
    # its one long sequence's mask is the largest
    rows = [(400, [30] * 16)]
    shape = ModelShape(4096, 32, 7_000_000_000, call_overhead_tokens=2048, device_type="cuda", num_heads=32,
                       activation_bytes=2)  # fmt: skip
    costs = {name: layout_cost(name, rows, shape) for name in ("padded", "mask", "cache")}
    memory = {name: layout_memory(name, rows, shape) for name in ("padded", "mask", "cache")}
    assert min(costs, key=costs.get) == "mask"
    assert cheapest(["padded", "mask", "cache"], rows, shape) == "mask"  # no budget: time decides
    budget = (memory["mask"] + min(memory["padded"], memory["cache"])) / 2
    assert memory["mask"] > budget
    fits = [name for name in ("padded", "cache") if memory[name] <= budget]
    tight = ModelShape(**{**shape.__dict__, "memory_budget": budget})
    assert cheapest(["padded", "mask", "cache"], rows, tight) == min(fits, key=costs.get)
    # nothing fits: the layout that needs the least memory
    none = ModelShape(**{**shape.__dict__, "memory_budget": 1})
    assert cheapest(["padded", "mask", "cache"], rows, none) == min(memory, key=memory.get)
    # the collator of `auto` chooses the same way
    collators = {name: make_collator(name, pad_token_id=0, max_length=None, truncation_mode="keep_start",
                                     pad_to_multiple_of=None) for name in ("padded", "mask", "cache")}  # fmt: skip
    example = {"prompt_ids": list(range(1, 401)), "completion_ids": [[5] * 30] * 16, "rewards": [0.0] * 16}
    assert DataCollatorForAnyLayout(collators, tight).choose([example]) == min(fits, key=costs.get)


def test_the_shape_reads_heads_and_bytes_from_the_model(tokenizer):
    from conftest import build_model

    model = build_model(tokenizer).to(torch.bfloat16)
    shape = ModelShape.of(model, "cpu")
    assert shape.num_heads == model.config.num_attention_heads and shape.activation_bytes == 2
    assert shape.memory_budget is None and shape.device_type == "cpu"
