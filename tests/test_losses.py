"""The losses against an independent float64 per-prompt computation, and the special cases of docs/math.md."""

import math

import pytest
import torch
import torch.nn.functional as F

from trl_nca.losses import infonca_loss, nca_loss, soft_labels

BETA = 0.1


def reference_losses(policy, ref, rewards, counts, beta, alpha):
    """Slow per-prompt loop in float64 over each prompt's own responses, written from the equations."""
    infonca, nca = [], []
    for i, k in enumerate(counts):
        r = beta * (policy[i, :k] - ref[i, :k])
        if alpha == 0:
            best = rewards[i, :k] == rewards[i, :k].max()
            p = best.double() / best.sum()
        else:
            e = torch.exp((rewards[i, :k] - rewards[i, :k].max()) / alpha)
            p = e / e.sum()
        log_q = r - torch.log(torch.exp(r).sum())
        infonca.append(-(p * log_q).sum())
        log_sig = lambda x: -torch.log1p(torch.exp(-x))  # noqa: E731
        nca.append(-sum(p[j] * log_sig(r[j]) + log_sig(-r[j]) / k for j in range(k)))
    return torch.stack(infonca), torch.stack(nca)


def ragged_inputs(seed=0, counts=(2, 4, 3, 1 + 1)):
    gen = torch.Generator().manual_seed(seed)
    batch, width = len(counts), max(counts)
    mask = torch.arange(width)[None] < torch.tensor(counts)[:, None]
    policy = (torch.randn(batch, width, generator=gen, dtype=torch.float64) * 20 - 50).requires_grad_()
    ref = torch.randn(batch, width, generator=gen, dtype=torch.float64) * 20 - 50
    rewards = torch.randint(0, 5, (batch, width), generator=gen).double()
    return policy, ref, rewards, mask, list(counts)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("name", ["infonca", "nca"])
def test_loss_and_gradient_match_independent_float64(name, alpha):
    policy, ref, rewards, mask, counts = ragged_inputs()
    loss_fn = {"infonca": infonca_loss, "nca": nca_loss}[name]
    got = loss_fn(policy, ref, rewards, mask, beta=BETA, reward_temperature=alpha)
    (grad,) = torch.autograd.grad(got.mean(), policy)

    leaf = policy.detach().clone().requires_grad_()
    expected = dict(zip(["infonca", "nca"], reference_losses(leaf, ref, rewards, counts, BETA, alpha)))[name]
    (expected_grad,) = torch.autograd.grad(expected.mean(), leaf)

    assert got.shape == (len(counts),)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss])
def test_padding_gives_zero_loss_and_zero_gradient_even_with_garbage(loss_fn):
    policy, ref, rewards, mask, _ = ragged_inputs()
    garbage = policy.detach().clone()
    garbage[~mask] = float("nan")
    ref_garbage = ref.clone()
    ref_garbage[~mask] = float("inf")
    rewards_garbage = rewards.clone()
    rewards_garbage[~mask] = 1e6  # would take all label mass if padding leaked into the softmax
    garbage.requires_grad_()

    clean = loss_fn(policy, ref, rewards, mask, beta=BETA, reward_temperature=1.0)
    dirty = loss_fn(garbage, ref_garbage, rewards_garbage, mask, beta=BETA, reward_temperature=1.0)
    (grad,) = torch.autograd.grad(dirty.sum(), garbage)

    torch.testing.assert_close(dirty, clean.detach())
    assert torch.all(grad[~mask] == 0)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize("loss_fn", [infonca_loss, nca_loss])
def test_row_loss_does_not_depend_on_padding_width(loss_fn):
    policy, ref, rewards, _, _ = ragged_inputs(counts=(3,))
    narrow = loss_fn(policy, ref, rewards, beta=BETA, reward_temperature=0.3)
    pad = torch.zeros(1, 5, dtype=torch.float64)
    wide_mask = torch.tensor([[True, True, True] + [False] * 5])
    wide = loss_fn(
        torch.cat([policy, pad], 1),
        torch.cat([ref, pad], 1),
        torch.cat([rewards, pad + 9], 1),
        wide_mask,
        beta=BETA,
        reward_temperature=0.3,
    )
    torch.testing.assert_close(wide, narrow)


def test_infonca_pair_with_hard_labels_is_dpo_sigmoid():
    policy, ref, _, _, _ = ragged_inputs(counts=(2, 2, 2))
    rewards = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    got = infonca_loss(policy, ref, rewards, beta=BETA, reward_temperature=0.0)
    chosen, rejected = (policy - ref).unbind(-1)
    torch.testing.assert_close(got, -F.logsigmoid(BETA * (chosen - rejected)))


def test_nca_pair_with_hard_labels_is_trl_nca_pair():
    policy, ref, _, _, _ = ragged_inputs(counts=(2, 2, 2))
    rewards = torch.tensor([[1.0, 0.0]] * 3, dtype=torch.float64)
    got = nca_loss(policy, ref, rewards, beta=BETA, reward_temperature=0.0)
    r_w, r_l = (BETA * (policy - ref)).unbind(-1)
    expected = -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("alpha", [0.0, 0.01, 1.0])
def test_values_at_initialisation(alpha):
    counts = (2, 3, 4, 6)
    _, _, rewards, mask, _ = ragged_inputs(counts=counts)
    same = torch.randn(mask.shape, dtype=torch.float64) * 30
    infonca = infonca_loss(same, same, rewards, mask, beta=BETA, reward_temperature=alpha)
    nca = nca_loss(same, same, rewards, mask, beta=BETA, reward_temperature=alpha)
    torch.testing.assert_close(infonca, torch.tensor([math.log(k) for k in counts], dtype=torch.float64))
    torch.testing.assert_close(nca, torch.full((len(counts),), 2 * math.log(2), dtype=torch.float64))


def test_infonca_gradient_sums_to_zero_and_nca_pushes_labelled_response_up():
    policy, ref, rewards, mask, _ = ragged_inputs()
    (g_info,) = torch.autograd.grad(
        infonca_loss(policy, ref, rewards, mask, beta=BETA, reward_temperature=0).sum(), policy
    )
    torch.testing.assert_close(g_info.sum(-1), torch.zeros(mask.size(0), dtype=torch.float64), atol=1e-12, rtol=0)

    same = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    rewards = torch.tensor([[3.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    (g_nca,) = torch.autograd.grad(nca_loss(same, same.detach(), rewards, beta=BETA, reward_temperature=0).sum(), same)
    # At r = 0: d/dr = -(p_k - 1/K) * sigmoid(0): negative (likelihood goes up) for the best, positive for the rest
    torch.testing.assert_close(g_nca, -BETA * 0.5 * (torch.tensor([[1.0, 0, 0, 0]]) - 0.25).double())


def test_soft_labels_hard_argmax_shares_ties_and_ignores_padding():
    rewards = torch.tensor([[2.0, 5.0, 5.0, 1.0], [7.0, 3.0, 9.0, 0.0]])
    mask = torch.tensor([[True, True, True, True], [True, True, False, False]])
    labels = soft_labels(rewards, mask, reward_temperature=0)
    torch.testing.assert_close(labels, torch.tensor([[0.0, 0.5, 0.5, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    soft = soft_labels(rewards, mask, reward_temperature=2.0)
    torch.testing.assert_close(soft[1, :2], torch.softmax(torch.tensor([3.5, 1.5]), 0))
    assert soft[1, 2:].eq(0).all()


def test_bad_shapes_and_temperature_are_rejected():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="ref_logps must have the shape"):
        nca_loss(x, torch.zeros(2, 4), x, beta=0.1, reward_temperature=1)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        infonca_loss(x, x, x, torch.ones(2, 3), beta=0.1, reward_temperature=1)
    with pytest.raises(ValueError, match="reward_temperature must be >= 0"):
        infonca_loss(x, x, x, beta=0.1, reward_temperature=-1)
