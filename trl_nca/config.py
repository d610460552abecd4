"""`NCAConfig`: `DPOConfig` plus the few fields NCA and InfoNCA add."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from trl import DPOConfig

from .data import ULTRAFEEDBACK_REWARDS

# DPOConfig fields whose values only mean something to DPO's own loss variants, with the value that leaves them off.
# Setting any of them on an NCA/InfoNCA run is an error rather than a silent no-op.
_DPO_ONLY_FIELDS = {
    "loss_type": ["sigmoid"],
    "loss_weights": None,
    "ld_alpha": None,
    "f_divergence_type": "reverse_kl",
    "label_smoothing": 0.0,
    "use_weighting": False,
}


@dataclass
class NCAConfig(DPOConfig):
    r"""
    Configuration for [`NCATrainer`] and [`InfoNCATrainer`]: every [`~trl.DPOConfig`] field, plus the fields below.

    `beta` keeps its DPOConfig meaning: r_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)); the paper used 0.01.
    DPO-only fields (`loss_type` other than its default, `loss_weights`, `ld_alpha`, `f_divergence_type`,
    `label_smoothing`, `use_weighting`) raise a `ValueError` when set.

    Parameters:
        reward_temperature (`float`, *optional*, defaults to `0.01`):
            The paper's alpha: the soft labels over a prompt's responses are softmax(rewards / reward_temperature),
            in the units of the dataset's rewards. `0` means a hard argmax, ties sharing the mass equally.
        ultrafeedback_reward (`str`, *optional*, defaults to `"overall_score"`):
            Which score of raw UltraFeedback rows (`instruction`, `completions` as dicts) becomes the reward:
            `"overall_score"`, `"fine-grained_score"`, or `"mean_rating"` (the mean of the annotations' ratings).
        prompt_sharing (`str`, *optional*, defaults to `"auto"`):
            `"auto"`: encode each prompt once for all its responses where the attention implementation takes a custom
            4D mask (`sdpa`, `eager`), else the padded layout with one warning. `"on"`: always (an error where it
            cannot work). `"off"`: the padded layout (K prompt+response sequences per row).
    """

    reward_temperature: float = field(
        default=0.01,
        metadata={
            "help": "The paper's alpha: soft labels are softmax(rewards / reward_temperature), in the units of the "
            "dataset's rewards (paper: 0.01 on UltraFeedback scores). 0 means a hard argmax on the best response, "
            "ties sharing the mass."
        },
    )
    ultrafeedback_reward: str = field(
        default="overall_score",
        metadata={
            "help": "Which score of raw UltraFeedback rows becomes the reward: 'overall_score' (default), "
            "'fine-grained_score', or 'mean_rating' (mean of the annotation ratings, 'N/A' left out).",
            "choices": list(ULTRAFEEDBACK_REWARDS),
        },
    )

    prompt_sharing: str = field(
        default="auto",
        metadata={
            "help": "Encode each prompt once for all its responses (the shared-prompt layout): 'auto' (default) where "
            "the attention implementation takes a custom 4D mask (sdpa, eager), else the padded layout with one "
            "warning; 'on' (an error where it cannot work); 'off' (the padded layout: K prompt+response sequences).",
            "choices": ["auto", "on", "off"],
        },
    )

    def __post_init__(self):
        super().__post_init__()
        for name, off in _DPO_ONLY_FIELDS.items():
            if getattr(self, name) != off:
                raise ValueError(
                    f"`{name}={getattr(self, name)!r}` has no meaning for NCA or InfoNCA, whose loss is fixed by the "
                    f"trainer class; leave it at its default ({off!r}). NCATrainer on pairs is TRL's 'nca_pair' loss, "
                    "InfoNCATrainer on pairs is DPO's 'sigmoid' loss."
                )
        if self.reward_temperature < 0:
            raise ValueError(f"`reward_temperature` must be >= 0 (0 = hard argmax), got {self.reward_temperature}.")
        if self.prompt_sharing not in ("auto", "on", "off"):
            raise ValueError(f"`prompt_sharing` must be 'auto', 'on' or 'off', got {self.prompt_sharing!r}.")
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
