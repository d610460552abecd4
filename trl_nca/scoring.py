"""Log-probabilities of response tokens only: a chunked LM head on the labelled positions, and the forward of each
layout through it.

TRL's fused LM head scores only labelled positions on Triton devices, but every position elsewhere (CPU included),
and below its 32,768-token chunk it builds the full (positions x vocab) logits. A trainer needs only the response
tokens: `add_response_head` patches a model so that `model(..., labels=labels, response_head=True)` runs the
backbone, keeps the hidden states whose next-token label is not -100, and scores just those, a chunk at a time. The
same patched forward runs the prompt-cache layout (`prompt_input_ids`, `response_input_ids`, ...): the prompt once,
then each response on top of the prompt's keys and values, all inside one call of the model, so that DDP, FSDP and
PEFT wrappers see one forward.

`head_choice` decides per model and device which head a trainer uses; the choice is logged once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, LinearAttentionCacheLayerMixin
from transformers.utils import ModelOutput, logging

logger = logging.get_logger(__name__)


@dataclass(frozen=True)
class LogitTransform:
    """How a model turns its head's output into logits: `scale` multiplies them (Cohere's `logit_scale`, Granite's
    1 / `logits_scaling`, Falcon-H1's `lm_head_multiplier`), then `softcap` caps them as `softcap * tanh(x / softcap)`
    (Gemma 2 and 3's `final_logit_softcapping`). Read from the config as TRL's fused head reads it
    (`trl.trainer.utils.add_fused_lm_head`), so both heads score the same logits; a model that transforms its logits
    some other way is caught by the layout check (`trl_nca.layout_check`)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def of(cls, config) -> LogitTransform:
        config = config.get_text_config()
        scale = getattr(config, "logit_scale", None)
        for name in ("output_multiplier", "lm_head_multiplier"):
            scale = getattr(config, name, None) if scale is None else scale
        if scale is None and getattr(config, "logits_scaling", None) is not None:
            # Granite and MiniCPM3 divide by `logits_scaling`; HyperCLOVA X multiplies by it
            scale = config.logits_scaling if config.model_type == "hyperclovax" else 1 / config.logits_scaling
        return cls(1.0 if scale is None else float(scale), getattr(config, "final_logit_softcapping", None) or None)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if self.scale != 1.0:
            logits = logits * self.scale
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


# Bytes of (tokens x vocab) float32 logits built at a time: a chunk holds this many bytes' worth of tokens (about 340
# tokens at SmolLM2's vocabulary of 49,152, 110 at 150,000), so a chunk's logits, log-softmax and their temporaries
# stay small whatever the vocabulary
CHUNK_BYTES = 64 << 20
# The log-softmax of the first chunks is kept for the backward pass while the kept ones stay under this size (no
# recomputation: the fastest on a CPU); the tokens past it go through TRL's chunked log-probability function, which
# keeps only a few numbers per token and recomputes its logits in the backward pass
KEEP_BYTES = 256 << 20


def chunk_tokens(vocab: int) -> int:
    """Tokens per chunk of logits at this vocabulary size (`CHUNK_BYTES`)."""
    return max(1, CHUNK_BYTES // (4 * vocab))


@dataclass
class ResponseHeadOutput(ModelOutput):
    """`log_probs`, `entropy` and `is_top1` of each labelled position, flat `(N,)` in row-major order of the
    positions (`labelled`, `(S, L-1)` bool, says which; the prompt-cache layout has no `(S, L)` shape and leaves it
    `None`), and the MoE `aux_loss` when requested."""

    log_probs: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None
    labelled: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None


def head_choice(model, device: torch.device) -> tuple[str, str]:
    """`("response", why)` for this module's head, or `("fused", why)` for TRL's: TRL's scores only labelled
    positions on Triton devices (CUDA) with its Triton kernels, so it is kept there; ours everywhere else (TRL's
    scores every position there), unless the layout check finds that ours does not give the model's own
    log-probabilities and TRL's does (`trl_nca.layout_check`)."""
    if device.type == "cuda":
        return "fused", "on CUDA, TRL's fused head scores only labelled positions with its Triton kernels"
    return "response", f"on {device.type}, TRL's fused head would score every position"


def _sharded_weight(lm_head: torch.nn.Module) -> bool:
    """Whether the head's weight is sharded and gathered per use: DeepSpeed ZeRO-3 (`ds_id`) or FSDP2 (a DTensor).
    Such a head is gathered once per forward (and once per backward), never per chunk: the number of gathers must
    not depend on a rank's batch, or ranks with different token counts would wait on each other forever."""
    weight = lm_head.weight
    return hasattr(weight, "ds_id") or hasattr(weight, "full_tensor")


def _plain_linear(lm_head: torch.nn.Module) -> bool:
    """A head whose output is `hidden @ weight.T (+ bias)`: TRL's chunked function can read its weight directly. A
    head wrapped by PEFT (an adapter on the head, `modules_to_save`) or quantized runs through its own forward."""
    return type(lm_head) is torch.nn.Linear


def _log_probs_of_chunk(hidden, lm_head, labels, temperature, transform, fp32, token_stats, entropy_grad):
    # GRPO's cast_lm_head_to_fp32: the head in float32 outside autocast (its own forward casts the weight)
    cast = torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    with cast:
        logits = transform(lm_head(hidden.float() if fp32 else hidden)).float()
    if temperature != 1.0:  # GRPO scores completions at its sampling temperature
        logits = logits / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    chosen = log_probs.gather(-1, labels[:, None]).squeeze(-1)
    if not token_stats:  # a reference or old-policy forward: log-probabilities only
        return chosen, None, None
    # The entropy carries a gradient only when a loss uses it (GRPO's entropy_coef): it keeps (N x vocab) alive
    with contextlib.nullcontext() if entropy_grad else torch.no_grad():
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    with torch.no_grad():
        is_top1 = log_probs.argmax(-1) == labels
    return chosen, entropy, is_top1


def _log_probs_recomputed(hidden, lm_head, labels, temperature, transform, fp32, token_stats, entropy_grad):
    """`_log_probs_of_chunk` for many tokens through TRL's chunked log-probability function
    (`trl.kernels.ChunkedLogProbFunction`): tiles of logits never kept, recomputed in the backward pass, the head's
    weight read directly (gathered once per call under ZeRO-3, whole under FSDP2, as TRL's fused head does)."""
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE
    from trl.trainer.utils import maybe_gather_lm_head_ctx

    weight, bias = lm_head.weight, lm_head.bias
    if hasattr(weight, "full_tensor"):  # FSDP2: gathered once, as TRL's fused head does
        weight, bias = weight.full_tensor(), None if bias is None else bias.full_tensor()
    cast = torch.autocast(hidden.device.type, enabled=False) if fp32 else contextlib.nullcontext()
    outputs = ("entropy", "is_top1") if token_stats else ()
    # TRL's tiles are (up to 4,096 tokens) x `vocab_chunk`: sized to CHUNK_BYTES
    vocab_chunk = max(1, CHUNK_BYTES // (4 * max(1, min(hidden.size(0), TOKEN_CHUNK_SIZE))))
    with cast, maybe_gather_lm_head_ctx(weight, bias):
        log_probs, entropy, _, _, is_top1 = ChunkedLogProbFunction.apply(
            hidden.float() if fp32 else hidden, weight, bias, labels, temperature, vocab_chunk, transform.softcap,
            transform.scale, outputs,
        )  # fmt: skip
    if not token_stats:
        return log_probs, None, None
    return log_probs, entropy if entropy_grad else entropy.detach(), is_top1


def response_log_probs(
    hidden: torch.Tensor,
    lm_head: torch.nn.Module,
    labels: torch.Tensor,
    temperature=1.0,
    *,
    transform: LogitTransform = LogitTransform(),
    fp32: bool = False,
    token_stats: bool = True,
    entropy_grad: bool = False,
):
    """`(log_probs, entropy, is_top1)` of `labels` `(N,)` under the head applied to `hidden` `(N, H)`: the model's
    logit `transform`, then division by `temperature`; float32. Memory stays bounded whatever N and the vocabulary:
    logits are built `chunk_tokens(vocab)` rows at a time; with a gradient, the log-softmax of the first chunks is
    kept up to `KEEP_BYTES` and the rest goes through TRL's chunked function, which recomputes its logits in the
    backward pass (a head wrapped by PEFT: its chunks are recomputed by activation checkpointing). A sharded head
    (ZeRO-3, FSDP2) always goes through TRL's function, gathered once per call. `fp32` runs the head in float32
    outside autocast (GRPO's `cast_lm_head_to_fp32`); `token_stats=False` computes the log-probabilities only
    (entropy and is_top1 come back None: a reference forward needs neither); `entropy_grad` keeps the entropy's
    gradient."""
    device = lm_head.weight.device
    hidden, labels = hidden.to(device), labels.to(device)
    vocab = lm_head.out_features if hasattr(lm_head, "out_features") else lm_head.weight.size(0)
    settings = (temperature, transform, fp32, token_stats, entropy_grad)
    plain = _plain_linear(lm_head)
    if plain and _sharded_weight(lm_head):  # one gather per call, whatever the rank's number of tokens
        return _log_probs_recomputed(hidden, lm_head, labels, *settings)
    rows = chunk_tokens(vocab)
    keep = hidden.size(0) if not torch.is_grad_enabled() else max(KEEP_BYTES // (4 * vocab), rows)
    if any(hasattr(p, "ds_id") for p in lm_head.parameters()):
        # a head wrapped by PEFT under ZeRO-3 gathers its weight in every call of its module: one call per forward
        rows = keep = max(hidden.size(0), 1)

    def chunk(start, end, recompute=False):
        part = (hidden[start:end], lm_head, labels[start:end], *settings)
        if recompute:
            return torch.utils.checkpoint.checkpoint(_log_probs_of_chunk, *part, use_reentrant=False)
        return _log_probs_of_chunk(*part)

    kept = min(keep, hidden.size(0))
    pieces = [chunk(start, min(start + rows, kept)) for start in range(0, kept, rows)]
    if kept < hidden.size(0):  # past the kept budget: logits recomputed in the backward pass
        if plain:
            pieces.append(_log_probs_recomputed(hidden[kept:], lm_head, labels[kept:], *settings))
        else:
            pieces += [chunk(start, start + rows, recompute=True) for start in range(kept, hidden.size(0), rows)]
    if not pieces:
        empty = hidden.new_zeros(0, dtype=torch.float32) + hidden.sum() * 0  # keeps the graph connected
        if not token_stats:
            return empty, None, None
        return empty, empty.detach(), torch.zeros(0, dtype=torch.bool, device=hidden.device)
    return tuple(None if parts[0] is None else torch.cat(parts) for parts in zip(*pieces))


class _PrefixCache(DynamicCache):
    """A cache holding a prompt's keys and values that every layer reads and none writes: `update` returns the
    prompt's states (expanded, not copied, to the batch of responses) followed by the new ones, without storing them.
    Several calls can share the prompt's states, and a gradient-checkpointing replay sees the same states again.

    A hybrid model's layers that carry a state (convolutions, state-space and linear-attention scans: transformers'
    `LinearAttentionCacheLayerMixin` layers) get the prompt's final states instead, a copy for each response of the
    call, which their forward continues over the response's tokens as it continues a generation (`of`)."""

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        batch = key_states.size(0)
        keys = layer.keys.expand(batch, *layer.keys.shape[1:])
        values = layer.values.expand(batch, *layer.values.shape[1:])
        return torch.cat([keys, key_states], dim=-2), torch.cat([values, value_states], dim=-2)

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, **kwargs):
        # the prompt's state, then the new inputs, as a state layer continues; nothing written (as `update`)
        return torch.cat([self.layers[layer_idx].conv_states[state_idx], conv_states], dim=-1)

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        # the layer's final state after this call's tokens, not written over the prompt's (which its backward needs)
        return _final_state(recurrent_states)

    @classmethod
    def of(cls, recording: _RecordingCache, batch: int) -> _PrefixCache:
        """The cache a call of `batch` responses runs on, from the prompt's `recording`."""
        if not recording.states:
            return cls(ddp_cache_data=[recording.recorded[layer] for layer in sorted(recording.recorded)])
        cache = cls(config=recording.config)
        for index, layer in enumerate(cache.layers):
            if index in recording.recorded:  # attention: the prompt's keys and values
                if not isinstance(layer, LinearAttentionCacheLayerMixin):
                    layer = cache.layers[index] = DynamicLayer()
                DynamicLayer.update(layer, *recording.recorded[index])
            if index in recording.states:  # a state: the prompt's, one copy per response (updated in place)
                _continue(layer, recording.states[index], batch)
        return cache


def _final_state(recurrent_states):
    """A state layer's state after its last token: the tensor, or the last of the per-step states it passes."""
    return recurrent_states if isinstance(recurrent_states, torch.Tensor) else recurrent_states[-1]


def _continue(layer, prompt, batch: int) -> None:
    """Give a state layer of a response call the prompt's final states (copies for `batch` responses, keeping their
    gradient), as if it had just run the prompt."""
    layer.device, layer.dtype = prompt.device, prompt.dtype
    layer.cumulative_length_linear = prompt.cumulative_length_linear.clone()
    for i in range(prompt.number_of_states):
        layer.conv_kernel_size[i] = prompt.conv_kernel_size[i]
        layer.has_previous_state[i] = prompt.has_previous_state[i]
        for kind in ("conv_states", "recurrent_states"):
            state = getattr(prompt, kind)[i]
            if getattr(prompt, f"is_{kind}_initialized")[i]:
                getattr(layer, kind)[i] = state.expand(batch, *state.shape[1:]).clone()
                getattr(layer, f"is_{kind}_initialized")[i] = True


class _RecordingCache(DynamicCache):
    """A cache that records the keys and values of the first pass through each attention layer (the prompt's) and
    returns every pass's own states, so that a gradient-checkpointing replay does not append them a second time.
    With a hybrid model's `config`, its state layers keep the prompt's final states (`states`: index -> layer)."""

    def __init__(self, config=None):
        super().__init__(config=config)
        self.config = config
        self.recorded: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def states(self) -> dict:
        return {i: layer for i, layer in enumerate(self.layers) if isinstance(layer, LinearAttentionCacheLayerMixin)}

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.recorded.setdefault(layer_idx, (key_states, value_states))
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # the prompt forward starts at position 0, whatever was recorded

    # A state layer runs the prompt from no state, also when gradient checkpointing replays it: it reads none, its
    # first pass writes the prompt's final states, and a replay gets what the first pass got and writes nothing
    def get_conv_state(self, layer_idx, state_idx=0):
        return None

    def get_recurrent_state(self, layer_idx, state_idx=0):
        return None

    def update_conv_state(self, conv_states, layer_idx, state_idx=0, conv_kernel_size=None, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.has_previous_state[state_idx]:
            return super().update_conv_state(conv_states, layer_idx, state_idx, conv_kernel_size=conv_kernel_size)
        missing = layer.conv_kernel_size[state_idx] - conv_states.shape[-1]  # the first pass's left padding
        return torch.nn.functional.pad(conv_states, (missing, 0)) if missing > 0 else conv_states

    def update_recurrent_state(self, recurrent_states, layer_idx, state_idx=0, **kwargs):
        if not self.layers[layer_idx].is_recurrent_states_initialized[state_idx]:
            return super().update_recurrent_state(recurrent_states, layer_idx, state_idx)
        return _final_state(recurrent_states)


def has_state_layers(config) -> bool:
    """Whether the model's cache holds layers with a state (transformers' `LinearAttentionCacheLayerMixin`): its
    convolution, state-space or linear-attention layers."""
    try:
        return any(isinstance(layer, LinearAttentionCacheLayerMixin) for layer in DynamicCache(config=config).layers)
    except Exception:  # a config the cache cannot read: no state layers transformers knows of
        return False


REENTRANT_CHECKPOINTING = "reentrant gradient checkpointing drops the gradient of the prompt's keys and values"


def reentrant_checkpointing(model) -> bool:
    """Whether a layer of `model` (a PEFT wrapper included) is set to reentrant gradient checkpointing:
    `use_reentrant=True`, or a checkpoint function that does not say (torch's default is reentrant). Reentrant
    checkpointing passes gradients through a layer's tensor arguments only, so the prompt's keys and values, which
    reach a response's layers inside a cache, would get none (`REENTRANT_CHECKPOINTING`). Read from the modules, so
    that checkpointing turned on on the model itself counts (PEFT's `prepare_model_for_kbit_training` turns it on,
    reentrant by default), not only `args.gradient_checkpointing`."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True:
            keywords = getattr(getattr(module, "_gradient_checkpointing_func", None), "keywords", None) or {}
            if keywords.get("use_reentrant", True) is not False:
                return True
    return False


@contextmanager
def _caches_survive_checkpointing(backbone):
    """Under gradient checkpointing, transformers drops a layer's cache unless the layer says that replaying it
    leaves the cache as it was (`_can_checkpoint_with_cache`). `_PrefixCache` and `_RecordingCache` are built so that
    a replay changes nothing, so the layers may keep them for the duration of the prompt-cache forward. Reentrant
    checkpointing would drop the prompt's gradient instead: the trainers keep this layout out where the model is set
    to it, and a model switched to it afterwards stops here rather than train on wrong gradients."""
    if torch.is_grad_enabled() and backbone.training and reentrant_checkpointing(backbone):
        raise ValueError(
            f"The prompt-cache layout cannot run under reentrant gradient checkpointing: {REENTRANT_CHECKPOINTING}. "
            "Turn it on with gradient_checkpointing_kwargs={'use_reentrant': False}, or before building the trainer, "
            "whose prompt_sharing='auto' then leaves this layout out."
        )
    layers = [m for m in backbone.modules() if hasattr(m, "_can_checkpoint_with_cache")]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class's value


def _cache_argument(backbone) -> str:
    """The name under which the backbone's forward takes a cache (`cache` since transformers 5.2x, before it
    `past_key_values`)."""
    return "cache" if "cache" in inspect.signature(backbone.forward).parameters else "past_key_values"


def _prompt_cache_hidden(backbone, prompt_input_ids, response_input_ids, plan, prompt_images=None):
    """Hidden states of every response token's prediction and the tokens, for the prompt-cache layout: each row's
    prompt (all but its last token) once, then each call's responses (each starting with the prompt's last token) as
    one right-padded batch on top of the prompt's keys and values. Responses come back in their batch order. `plan`
    (`CachePlan`) is on the host: the loop reads nothing from the device, and takes rows by slicing (no index tensor
    to copy)."""
    cache_argument = _cache_argument(backbone)
    device = response_input_ids.device
    hidden, labels = [None] * len(plan.response_lengths), [None] * len(plan.response_lengths)
    hybrid = has_state_layers(backbone.config)
    for row, prompt_length in enumerate(plan.prompt_lengths):
        shared = prompt_length - 1
        recording = None
        if shared > 0:
            recording = _RecordingCache(backbone.config if hybrid else None)
            images = prompt_images[row] if prompt_images is not None else {}  # the prompt's image inputs, once
            backbone(
                input_ids=prompt_input_ids[row : row + 1, :shared],
                use_cache=True,
                **{cache_argument: recording},
                **images,
            )
        members_of_row = [n for n, owner in enumerate(plan.rows) if owner == row]
        for call in sorted({plan.calls[n] for n in members_of_row}):
            members = [n for n in members_of_row if plan.calls[n] == call]
            lengths = [plan.response_lengths[n] for n in members]  # after the copy of the prompt's last token
            width = max(lengths) + 1
            ids = torch.cat([response_input_ids[n : n + 1, :width] for n in members])
            positions = torch.arange(shared, shared + width, device=device).expand(len(members), -1)
            attention_mask = None
            if len(members) > 1:  # right padding among the call's responses; the prompt's keys are all real
                real = torch.stack([torch.arange(width, device=device) <= length for length in lengths])
                attention_mask = torch.cat([real.new_ones(len(members), shared), real], dim=1).long()
            cache = _PrefixCache.of(recording, len(members)) if recording is not None else None
            out = backbone(
                input_ids=ids,
                attention_mask=attention_mask,
                position_ids=positions,
                use_cache=cache is not None,
                **{cache_argument: cache},
            )
            for j, (n, length) in enumerate(zip(members, lengths)):
                hidden[n], labels[n] = out.last_hidden_state[j, :length], ids[j, 1 : length + 1]
    return torch.cat(hidden), torch.cat(labels)


def cache_plan_of(kwargs: dict):
    """The batch's `CachePlan`, or for a batch made without one, the same plan read from its tensors (one read)."""
    if kwargs.get("cache_plan") is not None:
        return kwargs["cache_plan"]
    from .layouts.prompt_cache import CachePlan

    counts = [kwargs["prompt_lengths"].numel()] + [kwargs["response_lengths"].numel()] * 3
    flat = torch.cat([kwargs[k] for k in ("prompt_lengths", "response_lengths", "response_rows", "response_calls")])
    values, start = flat.tolist(), 0
    parts = []
    for count in counts:
        parts.append(values[start : start + count])
        start += count
    return CachePlan(*parts)


def scored_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """`(2, N)` long, made on the host: the row of each scored next-token position of a batch (a position whose label,
    the token after it, is a completion token) and its column counted from the right end of the `(S, L-1)` grid of
    shifted labels, in row-major order (the order of a boolean mask). Counted from the right, the columns stay right
    when prompt-learning PEFT prepends virtual positions on the left."""
    rows, columns = (completion_mask[:, 1:] != 0).nonzero(as_tuple=True)
    return torch.stack([rows, completion_mask.size(1) - 1 - columns])


def at_positions(values: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The entries of `values` `(S, W, ...)` (a grid of shifted labels, maybe with virtual positions on the left) at
    `scored_positions`, flat `(N, ...)`: an index gather, which the device runs without telling the host a size."""
    rows, from_end = positions
    return values[rows, values.size(1) - from_end]


def set_logit_transform(model, transform: LogitTransform) -> None:
    """Make the response-only head of `model` (patched by `add_response_head`) apply `transform`."""
    model._trl_nca_head["transform"] = transform


def drop_foreign_forward(model) -> None:
    """A model deep-copied from one that TRL's `add_fused_lm_head` patched keeps that patch's closure, whose original
    forward is bound to the model it was copied from: its plain forward would run the other model's weights (a
    reference built by copying a policy a trainer has seen runs the policy). Where any forward of the chain of
    patches on `model` is bound to another model, the patches are dropped, the class's forward being the model's
    own, so that the trainer patches the copy afresh. `model` may be a name, a PEFT model or a model."""
    if not isinstance(model, torch.nn.Module):
        return
    model = model.get_base_model() if hasattr(model, "get_base_model") else model
    chain = [model.__dict__.get("forward"), model.__dict__.get("_trl_nca_original_forward")]
    seen = set()
    while chain:
        method = chain.pop()
        if method is None or id(method) in seen:
            continue
        seen.add(id(method))
        owner = getattr(method, "__self__", None)
        if isinstance(owner, torch.nn.Module) and owner is not model and type(owner) is type(model):
            model.__dict__.pop("forward", None)
            model.__dict__.pop("_trl_nca_original_forward", None)
            return
        for cell in getattr(getattr(method, "__func__", method), "__closure__", None) or ():
            try:
                chain.append(cell.cell_contents)
            except ValueError:  # an empty cell
                continue


def add_response_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False) -> None:
    """Patch `model` (a causal LM, before PEFT wraps it or its base model after) so that `response_head=True` runs
    the backbone and scores only the labelled positions: `labels` (as for a causal LM, shifted inside) for the padded
    and shared-prompt layouts, or the prompt-cache layout's `prompt_input_ids`, `prompt_lengths`,
    `response_input_ids`, `response_lengths`, `response_rows`, `response_calls`. Without `response_head` the forward
    is unchanged. The logits are the model's own (`LogitTransform`), divided by `temperature` (GRPO's sampling
    temperature; 1 for the offline trainers); `cast_lm_head_to_fp32` runs the head in float32 (GRPO's setting).
    `token_stats=False` in a call skips the entropy and top-1 flags (a reference forward), `entropy_grad=True` keeps
    the entropy's gradient (GRPO's entropy regularisation)."""
    # Kept on the model, not in this closure: `copy.deepcopy(model)` (a reference model made from a patched policy)
    # rebinds a bound method held in the model's __dict__ to the copy, but shares a closure's, which would run the
    # original model's forward from the copy. A model patched before is patched again from its own original forward.
    if "_trl_nca_original_forward" not in model.__dict__:
        model._trl_nca_original_forward = model.forward
    head = dict(temperature=temperature, transform=LogitTransform.of(model.config), fp32=cast_lm_head_to_fp32)
    # the layout check replaces the transform by the one the model that runs applies (`set_logit_transform`)
    model._trl_nca_head = head

    @functools.wraps(type(model).forward)
    def forward(
        self,
        *args,
        response_head=False,
        labels=None,
        token_stats=True,
        entropy_grad=False,
        label_positions=None,
        **kwargs,
    ):
        if not response_head:
            original_forward = self._trl_nca_original_forward
            return (
                original_forward(*args, labels=labels, **kwargs)
                if labels is not None
                else original_forward(*args, **kwargs)
            )
        backbone = self.base_model
        lm_head = self.get_output_embeddings()
        if "prompt_input_ids" in kwargs:
            with _caches_survive_checkpointing(backbone):
                hidden, targets = _prompt_cache_hidden(
                    backbone,
                    kwargs["prompt_input_ids"],
                    kwargs["response_input_ids"],
                    cache_plan_of(kwargs),
                    kwargs.get("prompt_images"),
                )
            scored = response_log_probs(
                hidden, lm_head, targets, **head, token_stats=token_stats, entropy_grad=entropy_grad
            )
            log_probs, entropy, is_top1 = scored
            return ResponseHeadOutput(log_probs=log_probs, entropy=entropy, is_top1=is_top1)
        kwargs["use_cache"] = False
        outputs = backbone(*args, **kwargs)
        labels = labels[:, 1:]
        # Prompt-learning PEFT prepends virtual tokens: keep the positions of the real ones
        states = outputs.last_hidden_state[:, -labels.size(1) - 1 : -1]
        if label_positions is None:
            labelled = labels != -100
            states, targets = states[labelled], labels[labelled]
        else:  # the host's indices of the same positions (`scored_positions`): no size read from the device
            labelled = None
            states, targets = at_positions(states, label_positions), at_positions(labels, label_positions)
        log_probs, entropy, is_top1 = response_log_probs(
            states, lm_head, targets, **head, token_stats=token_stats, entropy_grad=entropy_grad
        )
        aux_loss = None
        if kwargs.get("output_router_logits"):
            from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

            config = self.config.get_text_config()
            experts = getattr(config, "num_experts", None) or config.num_local_experts
            aux_loss = load_balancing_loss_func(
                outputs.router_logits, experts, config.num_experts_per_tok, kwargs.get("attention_mask")
            )
        return ResponseHeadOutput(
            log_probs=log_probs, entropy=entropy, is_top1=is_top1, labelled=labelled, aux_loss=aux_loss
        )

    model.forward = types.MethodType(forward, model)
