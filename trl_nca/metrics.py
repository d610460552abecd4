"""Training metrics from `(B, K)` log-probabilities and data rewards, and per-token sums (pure functions); and the
reading of per-step metric values kept on the device, once per logging step (`read_device_metrics`)."""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

import torch

from .losses import first_of_ties


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


def best_and_worst(rewards: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(B, 1)` indices of each row's best response (the first listed among the highest rewards) and worst response
    (the last listed among the lowest). They differ whenever a row has two responses or more, ties included."""
    data = rewards.float()
    best = data.masked_fill(~mask, float("-inf")).argmax(-1, keepdim=True)  # argmax returns the first maximum
    flipped = data.masked_fill(~mask, float("inf")).flip(-1).argmin(-1, keepdim=True)
    return best, data.size(-1) - 1 - flipped


def k_response_metrics(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    ordered: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Per-prompt metrics, each a `(B,)` tensor (NaN where a prompt has no defined value).

    "best" and "worst" are given by `best_and_worst`. In `ordered` rows (listed best first), ties are broken by the
    listed order, as the loss's labels are.

    - `rewards/accuracies`: 1 when the model reward beta*logratio of a best response is strictly above that of every
      response ranked lower (NaN when nothing ranks lower: all data rewards tie in a row without order). For K = 2
      this is DPO's `chosen > rejected`.
    - `rewards/margins`: model reward of the best minus the mean over the others.
    - `rewards/best`, `rewards/worst`, `logps/best`, `logps/worst`: model reward and policy log-likelihood of the
      best and worst response (the paper's likelihood trend).
    - `rewards/spearman`: rank correlation of model rewards with data rewards.
    - `rewards/chosen`, `rewards/rejected`, `logps/chosen`, `logps/rejected`: DPO's keys, for prompts with exactly
      two responses (the best one is "chosen"); NaN for other prompts.
    """
    with torch.no_grad():
        model_rewards = beta * (policy_logps - ref_logps).float()
        policy = policy_logps.detach().float()
        data = rewards.float()
        best, worst = best_and_worst(data, mask)

        top = mask & (data == data.gather(-1, best))
        if ordered is not None:  # the order breaks ties: only the first listed of the top rewards ranks first
            top = torch.where(ordered.unsqueeze(-1), top & first_of_ties(data, mask), top)
        lower = mask & ~top
        top_model = model_rewards.masked_fill(~top, float("-inf")).amax(-1)
        lower_model = model_rewards.masked_fill(~lower, float("-inf")).amax(-1)
        accuracy = torch.where(lower.any(-1), (top_model > lower_model).float(), torch.nan)

        best_reward = model_rewards.gather(-1, best).squeeze(-1)
        others = mask.clone()
        others.scatter_(-1, best, False)
        mean_others = (model_rewards * others).sum(-1) / others.sum(-1).clamp(min=1)
        mean_others_logps = (policy * others).sum(-1) / others.sum(-1).clamp(min=1)
        best_logps = policy.gather(-1, best).squeeze(-1)
        # DPO's keys, for dashboards built on DPOTrainer: defined only for prompts with exactly two responses
        pair = mask.sum(-1) == 2

        return {
            "rewards/accuracies": accuracy,
            "rewards/margins": best_reward - mean_others,
            "rewards/best": best_reward,
            "rewards/worst": model_rewards.gather(-1, worst).squeeze(-1),
            "logps/best": best_logps,
            "logps/worst": policy.gather(-1, worst).squeeze(-1),
            "rewards/spearman": spearman(model_rewards, data, mask),
            "rewards/chosen": torch.where(pair, best_reward, torch.nan),
            "rewards/rejected": torch.where(pair, mean_others, torch.nan),
            "logps/chosen": torch.where(pair, best_logps, torch.nan),
            "logps/rejected": torch.where(pair, mean_others_logps, torch.nan),
        }


def token_metric_sums(
    entropy: torch.Tensor,
    is_top1: torch.Tensor,
    owner: torch.Tensor,
    rewards: torch.Tensor,
    response_mask: torch.Tensor,
) -> torch.Tensor:
    """`(4,)` sums over a batch's scored tokens, to be gathered across processes before dividing: entropy over all
    response tokens, their count, tokens of best responses whose label is the model's top-1, and the count of
    best-response tokens. `entropy`, `is_top1` and `owner` (each token's response, row-major over `response_mask`)
    are flat over the scored tokens."""
    entropy = entropy.detach().float()
    best, _ = best_and_worst(rewards, response_mask)
    # Flat index (row-major over `response_mask`) of each row's best response, or `numel` for a row without any;
    # counted on the device (a boolean-mask index or the number of responses would be read on the host)
    flat_index = response_mask.flatten().cumsum(0).view(response_mask.shape) - 1
    has_best = response_mask.gather(-1, best).squeeze(-1)
    best_index = torch.where(has_best, flat_index.gather(-1, best).squeeze(-1), response_mask.numel())
    is_best = torch.zeros(response_mask.numel() + 1, dtype=torch.bool, device=response_mask.device)
    best_tokens = is_best.index_fill_(0, best_index, True)[owner]
    return torch.stack(
        [
            entropy.sum(),
            entropy.new_full((), entropy.numel()),
            (is_top1.bool() & best_tokens).sum().float(),
            best_tokens.sum().float(),
        ]
    )


class IfDefined(NamedTuple):
    """A step's value of a metric that the step may leave undefined, kept on the device: `value` (0-d) counts in the
    logged mean only where `defined` (0-d bool) is true, as if the step had not appended it otherwise."""

    value: torch.Tensor
    defined: torch.Tensor


def read_device_metrics(metrics: dict[str, list]) -> None:
    """Turn the device values in TRL's per-step metric lists (`trainer._metrics[mode]`: 0-d tensors and `IfDefined`)
    into the Python numbers TRL's `log` averages, in place, with one host read per device and dtype; an undefined
    `IfDefined` value is dropped, and a key left without values is removed. Floats already there stay as they are.

    >>> undefined = IfDefined(torch.tensor(1.0), torch.tensor(False))
    >>> metrics = {"entropy": [torch.tensor(0.5), 0.25], "logratio/labelled": [undefined]}
    >>> read_device_metrics(metrics)
    >>> metrics
    {'entropy': [0.5, 0.25]}
    """
    tensors = []  # every tensor to read, in list order; an IfDefined adds its value then its flag
    for values in metrics.values():
        for value in values:
            if isinstance(value, IfDefined):
                tensors += [value.value, value.defined.to(value.value.dtype)]
            elif isinstance(value, torch.Tensor):
                tensors.append(value)
    if not tensors:
        return
    groups = defaultdict(list)
    for i, tensor in enumerate(tensors):
        groups[tensor.device, tensor.dtype].append(i)
    numbers = [None] * len(tensors)
    with torch.no_grad():
        for members in groups.values():
            for i, number in zip(members, torch.stack([tensors[i] for i in members]).tolist()):
                numbers[i] = number
    read = iter(numbers)
    for key, values in list(metrics.items()):
        kept = []
        for value in values:
            if isinstance(value, IfDefined):
                number, defined = next(read), next(read)
                if defined:
                    kept.append(number)
            else:
                kept.append(next(read) if isinstance(value, torch.Tensor) else value)
        if values and not kept:
            del metrics[key]
        else:
            metrics[key] = kept
