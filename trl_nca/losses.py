"""The NCA and InfoNCA objectives as pure tensor functions.

Chen, He, Yuan, Cui, Su, Zhu, "Noise Contrastive Alignment of Language Models with Explicit Rewards",
NeurIPS 2024 (arXiv 2402.05369). The math, its special cases and the tie rule are written out in `docs/math.md`.

Glossary, for one prompt x with K responses y_1..y_K:

    logratio_k = log pi_theta(y_k | x) - log pi_ref(y_k | x)     (summed over the response's tokens)
    r_k        = beta * logratio_k                                (the model's implicit reward)
    p_k        = softmax(R / alpha)_k                             (soft label from the data rewards R)

Arguments of both losses (`nca_loss`, `infonca_loss`):

    policy_logps        `(B, K)` log pi_theta(y_k | x), summed over response tokens (B prompts, K response slots)
    ref_logps           `(B, K)` log pi_ref(y_k | x)
    rewards             `(B, K)` data rewards R (no gradient flows into them)
    mask                `(B, K)` bool, True for a real response; `None` means all are real
    beta                beta > 0 of r = beta * logratio
    reward_temperature  alpha >= 0 of the soft labels p = softmax(R / alpha); 0 = one-hot on the best
    ordered             `(B,)` bool, rows whose responses are listed best first (preference pairs, ranked lists
                        and columns): there, among equal rewards, the response listed first takes the label mass

Rows may have different numbers of real responses K_i; padded slots contribute exactly zero loss and zero gradient.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _check_coefficient(name: str, value: float, *, allow_zero: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value < 0 or (value == 0 and not allow_zero):
        raise ValueError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _check_shapes(policy_logps, ref_logps, rewards, mask) -> torch.Tensor:
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


def _prologue(policy_logps, ref_logps, rewards, mask, ordered, beta, reward_temperature):
    """What both losses start from: the checked mask, the soft labels p and the model rewards r."""
    _check_coefficient("beta", beta, allow_zero=False)
    mask = _check_shapes(policy_logps, ref_logps, rewards, mask)
    labels = soft_labels(rewards, mask, reward_temperature=reward_temperature, ordered=ordered)
    return mask, labels, beta * (policy_logps - ref_logps)


def first_of_ties(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`(B, K)` bool: True where no earlier real response of the row has the same reward (the first of each tie)."""
    same = rewards.unsqueeze(-1) == rewards.unsqueeze(-2)  # [b, k, j]: R_k == R_j
    earlier = torch.ones(same.shape[-2:], dtype=torch.bool, device=rewards.device).tril(-1)  # j < k
    return mask & ~(same & earlier & mask.unsqueeze(-2)).any(-1)


def soft_labels(
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    reward_temperature: float,
    ordered: torch.Tensor | None = None,
) -> torch.Tensor:
    """Target distribution over each prompt's responses: `p = softmax(R / alpha)` over the real responses.

    Args:
        rewards: `(B, K)` data rewards R.
        mask: `(B, K)` bool, True for a real response; padded slots get probability exactly 0.
        reward_temperature: alpha >= 0. `0` puts all the mass on the highest reward.
        ordered: `(B,)` bool, rows whose responses are listed best first. Tied responses share their mass equally,
            except in ordered rows, where the first listed of each tie takes the mass of the whole tie (DPO trusts
            which response a pair calls chosen, whatever its scores say).

    Returns:
        `(B, K)` probabilities that sum to 1 over each row's real responses.
    """
    _check_coefficient("reward_temperature", reward_temperature, allow_zero=True)
    mask = torch.ones_like(rewards, dtype=torch.bool) if mask is None else mask
    # float64, so that R / alpha cannot overflow for a small alpha (an inf logit would make the softmax NaN)
    dtype = rewards.dtype if rewards.is_floating_point() else torch.get_default_dtype()
    rewards = rewards.detach().double()
    if reward_temperature == 0:
        masked = rewards.masked_fill(~mask, float("-inf"))
        labels = ((masked == masked.max(dim=-1, keepdim=True).values) & mask).to(rewards.dtype)
    else:
        logits = (rewards / reward_temperature).masked_fill(~mask, float("-inf"))
        labels = torch.softmax(logits, dim=-1).nan_to_num(0.0)  # a row with no real response gives 0, not NaN
    if ordered is not None and bool(ordered.any()):
        # Each tie's total mass, moved onto its first listed member
        same = (rewards.unsqueeze(-1) == rewards.unsqueeze(-2)) & mask.unsqueeze(-2)
        tie_mass = (same.to(labels.dtype) * labels.unsqueeze(-2)).sum(-1)
        first = first_of_ties(rewards, mask)
        labels = torch.where(ordered.unsqueeze(-1), torch.where(first, tie_mass, 0.0), labels)
    return (labels / labels.sum(dim=-1, keepdim=True).clamp(min=torch.finfo(labels.dtype).tiny)).to(dtype)


def infonca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    reward_temperature: float,
    ordered: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCA: a K-way classification of which response is the "data" sample.

        L_InfoNCA(x) = - sum_k p_k * log_softmax(r)_k

    With K = 2 and one-hot labels on the chosen response this is DPO's loss, -log sigmoid(r_w - r_l).
    At initialisation (all r_k = 0) it equals log K_i for any labels.

    Arguments as in the module docstring; returns the `(B,)` per-prompt losses.
    """
    mask, labels, model_rewards = _prologue(policy_logps, ref_logps, rewards, mask, ordered, beta, reward_temperature)
    log_q = torch.log_softmax(model_rewards.masked_fill(~mask, float("-inf")), dim=-1)
    # Padded slots hold log_q = -inf with p = 0; zero them before the product to avoid 0 * inf = NaN
    return -(labels * log_q.masked_fill(~mask, 0.0)).sum(dim=-1)


def nca_terms(model_rewards: torch.Tensor, labels: torch.Tensor, num_responses: torch.Tensor) -> torch.Tensor:
    """NCA's per-response terms, elementwise: `-(p_k log sigmoid(r_k) + log sigmoid(-r_k) / K_i)`.

    A prompt's NCA loss is the sum of its responses' terms, so once the labels are known the responses may be
    processed in any grouping (the online trainer computes p_k when it scores a group and the terms per micro-batch).
    All three arguments broadcast against each other; `num_responses` is K_i of each response's prompt.
    """
    return -(labels * F.logsigmoid(model_rewards) + F.logsigmoid(-model_rewards) / num_responses)


def nca_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    beta: float,
    reward_temperature: float,
    ordered: torch.Tensor | None = None,
) -> torch.Tensor:
    """NCA: K independent binary classifications, each response against the noise distribution.

        L_NCA(x) = - sum_k [ p_k * log sigmoid(r_k) + (1 / K_i) * log sigmoid(-r_k) ]

    K_i is the number of real responses of the prompt. With K = 2 and one-hot labels on the chosen response this is
    TRL's `nca_pair` loss; at initialisation (all r_k = 0) it equals 2 log 2 for any labels and any K_i.

    Arguments as in the module docstring; returns the `(B,)` per-prompt losses.
    """
    mask, labels, model_rewards = _prologue(policy_logps, ref_logps, rewards, mask, ordered, beta, reward_temperature)
    # Padded slots are set to 0 before the nonlinearity so that NaN or inf padding cannot leak into the gradient
    model_rewards = model_rewards.masked_fill(~mask, 0.0)
    num_responses = mask.sum(dim=-1, keepdim=True).clamp(min=1).to(model_rewards.dtype)
    terms = nca_terms(model_rewards, labels, num_responses)
    return torch.where(mask, terms, torch.zeros_like(terms)).sum(dim=-1)
