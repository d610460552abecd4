"""The NCA and InfoNCA objectives as pure tensor functions.

Chen, He, Yuan, Cui, Su, Zhu, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
NeurIPS 2024 (arXiv 2402.05369). The math is restated in `docs/nca-math.md` of the project.

Glossary, for one prompt x with K responses y_1..y_K:

    logratio_k = log pi_theta(y_k | x) - log pi_ref(y_k | x)     (summed over the response's tokens)
    r_k        = beta * logratio_k                                (the model's implicit reward)
    p_k        = softmax(R / alpha)_k                             (soft label from the data rewards R)

Every function takes `(B, K)` tensors (B prompts, K response slots) and an optional `(B, K)` boolean `mask`
(True = a real response). Rows may have different numbers of real responses K_i; padded slots contribute exactly
zero loss and zero gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_inputs(policy_logps, ref_logps, rewards, mask) -> torch.Tensor:
    if policy_logps.dim() != 2:
        raise ValueError(f"policy_logps must have shape (B, K), got {tuple(policy_logps.shape)}")
    for name, tensor in (("ref_logps", ref_logps), ("rewards", rewards)):
        if tensor.shape != policy_logps.shape:
            raise ValueError(
                f"{name} must have the shape of policy_logps {tuple(policy_logps.shape)}, got {tuple(tensor.shape)}"
            )
    if mask is None:
        return torch.ones_like(policy_logps, dtype=torch.bool)
    if mask.shape != policy_logps.shape or mask.dtype != torch.bool:
        raise ValueError(
            f"mask must be a bool tensor of shape {tuple(policy_logps.shape)}, got {mask.dtype} {tuple(mask.shape)}"
        )
    return mask


def soft_labels(rewards: torch.Tensor, mask: torch.Tensor | None = None, *, reward_temperature: float) -> torch.Tensor:
    """Target distribution over each prompt's responses: `p = softmax(R / alpha)` over the real responses.

    Args:
        rewards: `(B, K)` data rewards R.
        mask: `(B, K)` bool, True for a real response; padded slots get probability exactly 0.
        reward_temperature: alpha >= 0. `0` puts all the mass on the highest reward, shared equally among ties.

    Returns:
        `(B, K)` probabilities that sum to 1 over each row's real responses.
    """
    if reward_temperature < 0:
        raise ValueError(f"reward_temperature must be >= 0, got {reward_temperature}")
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    rewards = rewards.detach()
    if reward_temperature == 0:
        masked = rewards.masked_fill(~mask, float("-inf"))
        best = (masked == masked.max(dim=-1, keepdim=True).values) & mask
        return best.to(rewards.dtype) / best.sum(dim=-1, keepdim=True).clamp(min=1)
    logits = (rewards / reward_temperature).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no real response gives 0, not NaN


def infonca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    reward_temperature: float,
) -> torch.Tensor:
    """InfoNCA: a K-way classification of which response is the "data" sample.

        L_InfoNCA(x) = - sum_k p_k * log_softmax(r)_k

    With K = 2 and one-hot labels on the chosen response this is DPO's loss, -log sigmoid(r_w - r_l).
    At initialisation (all r_k = 0) it equals log K_i for any labels.

    Args:
        policy_logps: `(B, K)` log pi_theta(y_k | x), summed over response tokens.
        ref_logps: `(B, K)` log pi_ref(y_k | x).
        rewards: `(B, K)` data rewards R (no gradient flows into them).
        mask: `(B, K)` bool, True for a real response. `None` means all are real.
        beta: the KL coefficient beta of r = beta * logratio.
        reward_temperature: alpha of the soft labels p = softmax(R / alpha); 0 = one-hot on the best.

    Returns:
        `(B,)` per-prompt losses.
    """
    mask = _check_inputs(policy_logps, ref_logps, rewards, mask)
    labels = soft_labels(rewards, mask, reward_temperature=reward_temperature)
    model_rewards = beta * (policy_logps - ref_logps)
    log_q = torch.log_softmax(model_rewards.masked_fill(~mask, float("-inf")), dim=-1)
    # Padded slots hold log_q = -inf with p = 0; zero them before the product to avoid 0 * inf = NaN
    return -(labels * log_q.masked_fill(~mask, 0.0)).sum(dim=-1)


def nca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    reward_temperature: float,
) -> torch.Tensor:
    """NCA: K independent binary classifications, each response against the noise distribution.

        L_NCA(x) = - sum_k [ p_k * log sigmoid(r_k) + (1 / K_i) * log sigmoid(-r_k) ]

    K_i is the number of real responses of the prompt. With K = 2 and one-hot labels on the chosen response this is
    TRL's `nca_pair` loss; at initialisation (all r_k = 0) it equals 2 log 2 for any labels and any K_i.

    Args:
        policy_logps: `(B, K)` log pi_theta(y_k | x), summed over response tokens.
        ref_logps: `(B, K)` log pi_ref(y_k | x).
        rewards: `(B, K)` data rewards R (no gradient flows into them).
        mask: `(B, K)` bool, True for a real response. `None` means all are real.
        beta: the KL coefficient beta of r = beta * logratio.
        reward_temperature: alpha of the soft labels p = softmax(R / alpha); 0 = one-hot on the best.

    Returns:
        `(B,)` per-prompt losses.
    """
    mask = _check_inputs(policy_logps, ref_logps, rewards, mask)
    labels = soft_labels(rewards, mask, reward_temperature=reward_temperature)
    # Padded slots are set to 0 before the nonlinearity so that NaN or inf padding cannot leak into the gradient
    model_rewards = (beta * (policy_logps - ref_logps)).masked_fill(~mask, 0.0)
    num_responses = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(model_rewards.dtype)
    per_response = labels * F.logsigmoid(model_rewards) + F.logsigmoid(-model_rewards) / num_responses
    return -torch.where(mask, per_response, torch.zeros_like(per_response)).sum(dim=-1)
