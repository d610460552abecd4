"""The fields `NCAConfig` and `OnlineNCAConfig` add to TRL's `DPOConfig` and `GRPOConfig`, as plain dataclasses.

`DPOConfig` and `GRPOConfig` are `TrainingArguments`, whose module imports torch, accelerate and peft (several
seconds); this module imports nothing, so that `trl-nca nca --help` lists these fields at once. The configs the
trainers take are `NCAConfig(NCAFields, DPOConfig)` and `OnlineNCAConfig(OnlineNCAFields, GRPOConfig)`: their
docstrings say what each field means, and their `__post_init__` checks the values.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# `prompt_sharing` settings, as `trl_nca.layouts` maps them to layouts (`LAYOUTS_OF_SETTING`, whose keys a test pins to
# these): the layouts module imports torch, which the help of the commands does without
PROMPT_SHARING = ("auto", "on", "off", "mask", "cache")
# Which score of raw UltraFeedback rows becomes the reward (`trl_nca.data.ultrafeedback_score`)
ULTRAFEEDBACK_REWARDS = ("overall_score", "fine-grained_score", "mean_rating")
# What online NCA's pi_ref is
REFERENCES = ("sampler", "initial")


@dataclass
class NCAFields:
    """What `NCAConfig` adds to `DPOConfig` (see `NCAConfig` for the meaning of each field)."""

    reward_temperature: float = field(
        default=0.01,
        metadata={
            "help": "The paper's alpha: soft labels are softmax(rewards / reward_temperature), in the units of the "
            "dataset's rewards (paper: 0.01 on UltraFeedback scores). 0 means a hard argmax on the best response. "
            "Ties share the mass, except in rows listed best first (preference pairs, ranked columns), where the "
            "first listed takes it."
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
            "help": "How K responses become model inputs: 'off' (padded: K prompt+response sequences per row, works "
            "everywhere); 'mask' (each prompt once, its responses after it, a 4D attention mask: sdpa, eager, "
            "flex_attention); 'cache' (each prompt run once, each response on its keys and values); 'on' (the "
            "cheaper of mask and cache per batch); 'auto' (default: the cheapest allowed layout per batch by a cost "
            "model). A named layout that cannot work here raises an error with the reason; 'auto' leaves it out.",
            "choices": list(PROMPT_SHARING),
        },
    )


@dataclass
class OnlineNCAFields:
    """What `OnlineNCAConfig` adds to `GRPOConfig`, and the two GRPOConfig fields it redefines (`beta`,
    `disable_dropout`); see `OnlineNCAConfig` for the meaning of each field."""

    beta: float = field(
        default=0.1,
        metadata={"help": "NCA's beta: r_k = beta * logratio_k, a finite number > 0 (not GRPO's KL coefficient)."},
    )
    reward_temperature: float = field(
        default=1.0,
        metadata={
            "help": "alpha: each group's soft labels are softmax(rewards / alpha), in the units of the rewards "
            "(default 1.0, for rewards between 0 and about 1). 0 puts all the mass on the best completions."
        },
    )
    reference: str = field(
        default="sampler",
        metadata={
            "help": "The reference pi_ref: 'sampler' (the policy that generated the group, default) or 'initial' "
            "(the starting policy).",
            "choices": list(REFERENCES),
        },
    )
    prompt_sharing: str = field(
        default="auto",
        metadata={
            "help": "How each forward encodes a group's prompt (as NCAConfig's): 'auto' (the cheapest allowed layout "
            "per batch by the cost model), 'on' (the cheaper of the two that encode each prompt once), 'off' (GRPO's "
            "forward: the prompt once per completion), 'mask', 'cache'.",
            "choices": list(PROMPT_SHARING),
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Turn off dropout in the policy and reference (default True, as DPOConfig; GRPOConfig's is "
            "False): with dropout the reference and old log-probabilities see other masks than the policy forward."
        },
    )
