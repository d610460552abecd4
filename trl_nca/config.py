"""`NCAConfig`: `DPOConfig` plus the few fields NCA and InfoNCA add (declared in `config_fields.NCAFields`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from trl import DPOConfig

from .config_fields import PROMPT_SHARING, ULTRAFEEDBACK_REWARDS, NCAFields

# The DPO loss types the trainers compute on preference pairs: InfoNCATrainer is "sigmoid", NCATrainer "nca_pair".
# "sigmoid" is DPOConfig's default, so it is accepted by both (it is what an unset `loss_type` reads as).
PAIR_LOSS_TYPES = ("sigmoid", "nca_pair")

# DPOConfig fields whose values only mean something to DPO's own loss variants, with the value that leaves them off.
# Setting any of them on an NCA/InfoNCA run is an error rather than a silent no-op.
_DPO_ONLY_FIELDS = {
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0,
    "use_weighting": False,
}


@dataclass
class NCAConfig(NCAFields, DPOConfig):
    r"""
    Configuration for [`NCATrainer`] and [`InfoNCATrainer`]: every [`~trl.DPOConfig`] field, plus the fields below.

    `beta` keeps its DPOConfig meaning: r_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)); the paper used 0.01.
    It must be a finite number > 0 (with beta <= 0 the objective rewards moving away from the labels). `loss_type`
    may name the DPO loss the trainer computes on pairs (`"nca_pair"` for NCATrainer, `"sigmoid"` for
    InfoNCATrainer); other DPO-only fields (`loss_weights`, `ld_alpha`, `f_divergence_type`, `label_smoothing`,
    `use_weighting`) raise a `ValueError` when set. `bf16` left unset is True only where the device trains in bf16
    (DPOConfig's default is True unless `fp16`, which fails on a machine without a GPU): float32 on a CPU.

    Parameters:
        reward_temperature (`float`, *optional*, defaults to `0.01`):
            The paper's alpha: the soft labels over a prompt's responses are softmax(rewards / reward_temperature),
            in the units of the dataset's rewards. `0` means a hard argmax on the best response. Ties share the label
            mass, except in rows listed best first (preference pairs, ranked columns), where the first listed of a
            tie takes it. For ranked rows without scores, rewards are minus the rank (0, -1, -2, ...), so alpha is in
            rank steps.
        ultrafeedback_reward (`str`, *optional*, defaults to `"overall_score"`):
            Which score of raw UltraFeedback rows (`instruction`, `completions` as dicts) becomes the reward:
            `"overall_score"`, `"fine-grained_score"`, or `"mean_rating"` (the mean of the annotations' ratings).
        prompt_sharing (`str`, *optional*, defaults to `"auto"`):
            How a batch of K-response rows becomes model inputs (`docs/layouts.md`). `"off"`: the padded layout, K
            prompt+response sequences per row; works everywhere. `"mask"`: each row's prompt once and its responses
            after it in one sequence with a 4D attention mask (`sdpa`, `eager`, `flex_attention`). `"cache"`: each
            row's prompt run once and each response on top of its keys and values (any attention implementation).
            `"on"`: the cheaper of `"mask"` and `"cache"` for each batch. `"auto"`: the cheapest of the three for each
            batch by a cost model, among those the model and settings allow (the others named in one warning).
            Where a layout cannot work (`keep_end` truncation, an MoE router loss, prompt-learning PEFT, reentrant
            gradient checkpointing for `"cache"`, what the model's architecture cannot express: windowed attention
            for `"mask"`, convolution or state-space layers for both, see docs/architectures.md; a prompt left without
            a token of its own), `"auto"` leaves it out and naming it raises a `ValueError` with the reason.
    """

    def __post_init__(self):
        resolve_bf16(self)
        super().__post_init__()
        if not set(self.loss_type) <= set(PAIR_LOSS_TYPES) or len(self.loss_type) != 1:
            raise ValueError(
                f"`loss_type={self.loss_type!r}` has no meaning for NCA or InfoNCA, whose loss is fixed by the "
                "trainer class: NCATrainer on pairs is TRL's 'nca_pair' loss, InfoNCATrainer on pairs is DPO's "
                "'sigmoid' loss. Leave it at its default or name the loss of the trainer you use."
            )
        refuse_changed(
            self,
            _DPO_ONLY_FIELDS,
            "has no meaning for NCA or InfoNCA, whose loss is fixed by the trainer class",
            "NCATrainer on pairs is TRL's 'nca_pair' loss, InfoNCATrainer on pairs is DPO's 'sigmoid' loss.",
        )
        check_beta_and_temperature(self.beta, self.reward_temperature)
        if self.prompt_sharing not in PROMPT_SHARING:
            raise ValueError(f"`prompt_sharing` must be one of {PROMPT_SHARING}, got {self.prompt_sharing!r}.")
        if self.ultrafeedback_reward not in ULTRAFEEDBACK_REWARDS:
            raise ValueError(
                f"`ultrafeedback_reward` must be one of {ULTRAFEEDBACK_REWARDS}, got {self.ultrafeedback_reward!r}."
            )

    @classmethod
    def from_dpo_config(cls, args: DPOConfig, **overrides) -> NCAConfig:
        """An `NCAConfig` with the values of an existing `DPOConfig` (for scripts written for DPOTrainer)."""
        values = {f.name: getattr(args, f.name) for f in fields(DPOConfig) if f.init}
        values.update(overrides)
        return cls(**values)


def resolve_bf16(config) -> None:
    """`bf16=None` (unset) becomes True only where the device trains in bf16 (a CUDA, XPU, NPU or HPU device that
    supports it, and not `use_cpu`), else False: float32. DPOConfig and GRPOConfig default to True unless `fp16`,
    which on a machine without a GPU stops at the config ("Your setup doesn't support bf16/gpu"), and on CPU trains
    about 12 times slower than float32 (docs/layouts.md). An explicit `bf16=True` or `False` is kept."""
    if config.bf16 is None:
        from transformers.utils import is_torch_bf16_gpu_available

        config.bf16 = not config.fp16 and not config.use_cpu and is_torch_bf16_gpu_available()


def check_beta_and_temperature(beta: float, reward_temperature: float) -> None:
    """The settings under which the objective means something: beta > 0 and alpha >= 0, both finite."""
    if not math.isfinite(beta) or beta <= 0:
        raise ValueError(
            f"`beta` must be a finite number > 0, got {beta}: r_k = beta * logratio_k, so beta <= 0 turns the "
            "objective around (the best response's likelihood would fall while the reward metrics look right)."
        )
    if not math.isfinite(reward_temperature) or reward_temperature < 0:
        raise ValueError(
            f"`reward_temperature` must be a finite number >= 0 (0 = hard argmax on the best response), got "
            f"{reward_temperature}."
        )


def refuse_changed(config, defaults: dict, meaning: str, hint: str) -> None:
    """A `ValueError` for the first field of `defaults` (name -> the value that leaves it off) that `config` sets
    otherwise: a setting the trainer would silently ignore."""
    for name, off in defaults.items():
        if getattr(config, name) != off:
            raise ValueError(
                f"`{name}={getattr(config, name)!r}` {meaning}; leave it at its default ({off!r}). {hint}"
            )
