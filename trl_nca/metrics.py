"""Per-prompt training metrics from `(B, K)` log-probabilities and data rewards (pure functions, no trainer state)."""

from __future__ import annotations

import torch


def _average_ranks(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1-based ranks of each row's real entries, ties sharing their average rank (Spearman's convention)."""
    v_i, v_j = values.unsqueeze(-1), values.unsqueeze(-2)
    real_j = mask.unsqueeze(-2)
    below = ((v_j < v_i) & real_j).sum(-1)
    equal = ((v_j == v_i) & real_j).sum(-1)
    return below + (equal + 1) / 2


def spearman(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Spearman rank correlation of `a` and `b` over each row's real entries; NaN where either row is constant."""
    ra, rb = _average_ranks(a, mask).double(), _average_ranks(b, mask).double()
    count = mask.sum(-1, keepdim=True).clamp(min=1)
    ra = torch.where(mask, ra - (ra * mask).sum(-1, keepdim=True) / count, 0.0)
    rb = torch.where(mask, rb - (rb * mask).sum(-1, keepdim=True) / count, 0.0)
    denominator = (ra.square().sum(-1) * rb.square().sum(-1)).sqrt()
    correlation = (ra * rb).sum(-1) / denominator
    return torch.where(denominator > 0, correlation, torch.nan).float()


def k_response_metrics(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
) -> dict[str, torch.Tensor]:
    """Per-prompt metrics, each a `(B,)` tensor (NaN where a prompt has no defined value).

    "best" and "worst" are the responses with the highest and lowest data reward (the first one among ties).

    - `rewards/accuracies`: 1 when the model reward beta*logratio of a best-reward response is strictly above that
      of every response with a lower data reward (NaN when all data rewards tie). For K = 2 this is DPO's
      `chosen > rejected`.
    - `rewards/margins`: model reward of the best minus the mean over the others.
    - `rewards/best`, `rewards/worst`, `logps/best`, `logps/worst`: model reward and policy log-likelihood of the
      best and worst response (the paper's likelihood trend).
    - `rewards/spearman`: rank correlation of model rewards with data rewards.
    - `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`: DPO's keys, for prompts with exactly
      two responses (the best one is "chosen"); NaN for other prompts.
    """
    with torch.no_grad():
        model_rewards = beta * (policy_logps - ref_logps).float()
        data = rewards.float()
        best = data.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)
        worst = data.masked_fill(~mask, float("inf")).argmin(-1, keepdim=True)

        top = mask & (data == data.gather(-1, best))
        lower = mask & ~top
        top_model = model_rewards.masked_fill(~top, float("-inf")).amax(-1)
        lower_model = model_rewards.masked_fill(~lower, float("-inf")).amax(-1)
        accuracy = torch.where(lower.any(-1), (top_model > lower_model).float(), torch.nan)

        best_reward = model_rewards.gather(-1, best).squeeze(-1)
        others = mask.clone()
        others.scatter_(-1, best, False)
        mean_others = (model_rewards * others).sum(-1) / others.sum(-1).clamp(min=1)

        mean_others_logps = (policy_logps.detach().float() * others).sum(-1) / others.sum(-1).clamp(min=1)
        # DPO's keys, for dashboards built on DPOTrainer: defined only for prompts with exactly two responses
        pair = mask.sum(-1) == 2

        return {
            "rewards/accuracies": accuracy,
            "rewards/margins": best_reward - mean_others,
            "rewards/best": best_reward,
            "rewards/worst": model_rewards.gather(-1, worst).squeeze(-1),
            "logps/best": policy_logps.detach().float().gather(-1, best).squeeze(-1),
            "logps/worst": policy_logps.detach().float().gather(-1, worst).squeeze(-1),
            "rewards/spearman": spearman(model_rewards, data, mask),
            "rewards/chosen": torch.where(pair, best_reward, torch.nan),
            "rewards/rejected": torch.where(pair, mean_others, torch.nan),
            "logps/chosen": torch.where(pair, policy_logps.detach().float().gather(-1, best).squeeze(-1), torch.nan),
            "logps/rejected": torch.where(pair, mean_others_logps, torch.nan),
        }
