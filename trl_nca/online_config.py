"""`OnlineNCAConfig`: `GRPOConfig` plus the few fields online NCA and InfoNCA add (declared in
`config_fields.OnlineNCAFields`)."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, fields

from trl import GRPOConfig

from .config import check_beta_and_temperature, refuse_changed, resolve_bf16
from .config_fields import PROMPT_SHARING, REFERENCES, OnlineNCAFields

logger = logging.getLogger(__name__)

# GRPOConfig fields that only shape GRPO's own loss or advantages, with the value that leaves them off. Online NCA
# computes neither (its labels come from the raw rewards, its loss is trl_nca.losses), so setting one is an error
# rather than a silent no-op.
_GRPO_ONLY_FIELDS = {
    "loss_type": "dapo",
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "importance_sampling_level": "token",
    "scale_rewards": "group",
    "multi_objective_aggregation": "sum_then_normalize",
    "top_entropy_quantile": 1.0,
    "entropy_coef": 0.0,
    "use_adaptive_entropy": False,
    "off_policy_mask_threshold": None,
    "sapo_temperature_neg": 1.05,
    "sapo_temperature_pos": 1.0,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
}


@dataclass
class OnlineNCAConfig(OnlineNCAFields, GRPOConfig):
    r"""
    Configuration for [`OnlineNCATrainer`] and [`OnlineInfoNCATrainer`]: every [`~trl.GRPOConfig`] field (generation,
    `num_generations`, reward weights, vLLM, logging), plus the fields below.

    `beta` is NCA's beta, as in [`NCAConfig`]: r_k = beta * (log pi_theta(y_k|x) - log pi_ref(y_k|x)), a finite
    number > 0 (GRPO's `beta`, a KL coefficient, has no use here). GRPO-only loss and advantage fields (`loss_type`,
    `epsilon`, `epsilon_high`, `delta`, `importance_sampling_level`, `scale_rewards`, `multi_objective_aggregation`,
    `top_entropy_quantile`, `entropy_coef`, `use_adaptive_entropy`, `off_policy_mask_threshold`, the SAPO and VESPO
    coefficients) raise a `ValueError` when set.

    Parameters:
        reward_temperature (`float`, *optional*, defaults to `1.0`):
            alpha: each group's soft labels are softmax(rewards / alpha) over its K completions, in the units of the
            (weighted, summed) rewards. `0` puts all the mass on the best completions. Groups whose rewards all tie
            get uniform labels: no signal, counted in the `frac_tied_groups` metric. The default suits rewards
            between 0 and about 1 (verifiers, format checks); scale it with the rewards. Chosen by
            `benchmarks/online_vs_grpo.py` (docs/benchmarks.md): 1.0 ended above 0.1 on both of its tasks, 3 seeds
            each (+0.05 and +0.03 held-out accuracy).
        reference (`str`, *optional*, defaults to `"sampler"`):
            What pi_ref is. `"sampler"`: the policy that generated the group (its log-probabilities at generation
            time), so that each round moves the policy toward the reward-tilted version of the current one.
            `"initial"`: the starting policy, as GRPO's KL term and OnlineDPO use. With PEFT it is GRPO's own
            reference: with `peft_config`, the base model (the new adapter disabled); with a `PeftModel` instance, a
            frozen copy of its adapter as loaded (GRPO's `ref` adapter). See `docs/math.md` for the fixed point of
            each.
        disable_dropout (`bool`, *optional*, defaults to `True`):
            As DPOConfig's (GRPOConfig defaults it off): the reference and old log-probabilities are forwards of their
            own, so with dropout log pi_theta - log pi_ref is noise where it should be 0. Reaches the attention
            dropout that models apply functionally too (`trl_nca.dropout`).
    """

    def __post_init__(self):
        if self.num_generations < 2 or (self.num_generations_eval is not None and self.num_generations_eval < 2):
            raise ValueError(
                "`num_generations` (and `num_generations_eval`) must be at least 2: NCA and InfoNCA contrast the "
                f"completions of a prompt; got num_generations={self.num_generations}, "
                f"num_generations_eval={self.num_generations_eval}."
            )
        resolve_bf16(self)
        super().__post_init__()
        refuse_changed(
            self,
            _GRPO_ONLY_FIELDS,
            "shapes GRPO's loss or advantages, which online NCA does not compute",
            "The labels come from the raw rewards and `reward_temperature`, the loss from `trl_nca.losses`.",
        )
        check_beta_and_temperature(self.beta, self.reward_temperature)
        weights = self.reward_weights or []
        if any(not isinstance(w, (int, float)) or isinstance(w, bool) or not math.isfinite(w) for w in weights):
            # GRPO sums the weighted rewards with nansum: a NaN weight would silently drop its function
            raise ValueError(f"`reward_weights` must be finite numbers, got {self.reward_weights}.")
        if self.prompt_sharing not in PROMPT_SHARING:
            raise ValueError(f"`prompt_sharing` must be one of {PROMPT_SHARING}, got {self.prompt_sharing!r}.")
        if self.reference not in REFERENCES:
            raise ValueError(f"`reference` must be one of {REFERENCES}, got {self.reference!r}.")
        if self.sync_ref_model and self.reference == "sampler":
            raise ValueError("`sync_ref_model=True` needs `reference='initial'`: the sampler reference has no model.")

    @classmethod
    def from_grpo_config(cls, args: GRPOConfig, **overrides) -> OnlineNCAConfig:
        """An `OnlineNCAConfig` with the values of an existing `GRPOConfig` (for scripts written for GRPOTrainer).
        GRPO's `beta` (a KL coefficient, 0 by default) is not carried over: NCA's `beta` keeps its default unless
        given in `overrides`. `disable_dropout=False`, GRPOConfig's default, becomes True (this config's default)
        with a warning, since a default cannot be told from a choice; give it in `overrides` to keep dropout."""
        values = {f.name: getattr(args, f.name) for f in fields(GRPOConfig) if f.init and f.name != "beta"}
        if args.beta != 0.0 and "beta" not in overrides:
            logger.warning(
                f"OnlineNCAConfig from a GRPOConfig: GRPO's `beta={args.beta}` (a KL coefficient) is not carried "
                "over; "
                "NCA's `beta` (r = beta * logratio) keeps its default 0.1. Pass an OnlineNCAConfig to choose it."
            )
        values["generation_batch_size"] = None  # derived again from steps_per_generation, which GRPOConfig has set
        if not args.disable_dropout and "disable_dropout" not in overrides:
            del values["disable_dropout"]
            logger.warning(
                "OnlineNCAConfig from a GRPOConfig: `disable_dropout` is set to True (GRPOConfig's default is False): "
                "with dropout, the reference and old log-probabilities are noisy where the sampler reference makes "
                "them exact. Pass an OnlineNCAConfig with disable_dropout=False to keep dropout."
            )
        values.update(overrides)
        return cls(**values)
