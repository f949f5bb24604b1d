"""DiCO and SCST losses against independent computations (float64, loops, analytic gradients)."""
import math

import pytest
import torch

from dico.losses import dico_loss, loser_weights, scst_advantages, scst_loss


def reference_dico(policy, ref, rewards, beta, tau):
    """Loop-by-loop DiCO: value and analytic gradient w.r.t. the policy log-probs."""
    B, k = policy.shape
    value, grad = 0.0, [[0.0] * k for _ in range(B)]
    for b in range(B):
        r = [float(x) for x in rewards[b]]
        w = max(range(k), key=lambda j: (r[j], -j))  # first maximum, as torch.argmax
        losers = [j for j in range(k) if j != w]
        m = max(tau * (r[w] - r[j]) for j in losers)
        e = {j: math.exp(tau * (r[w] - r[j]) - m) for j in losers}
        z = sum(e.values())
        gamma = {j: e[j] / z for j in losers}
        delta = [float(policy[b, j] - ref[b, j]) for j in range(k)]
        h = delta[w] - sum(gamma[j] * delta[j] for j in losers)
        value += math.log1p(math.exp(-beta * h)) / B
        s = 1.0 / (1.0 + math.exp(beta * h))  # sigma(-beta h)
        grad[b][w] = -beta * s / B
        for j in losers:
            grad[b][j] = beta * s * gamma[j] / B
    return value, torch.tensor(grad, dtype=torch.float64)


@pytest.mark.parametrize("seed,k,beta,tau", [(0, 5, 0.2, 300.0), (1, 3, 1.0, 1.0), (2, 2, 0.5, 30.0), (3, 8, 0.05, 0.0)])
def test_dico_loss_matches_reference_value_and_gradient(seed, k, beta, tau):
    g = torch.Generator().manual_seed(seed)
    B = 7
    policy = (-20 * torch.rand(B, k, generator=g, dtype=torch.float64)).requires_grad_()
    ref = -20 * torch.rand(B, k, generator=g, dtype=torch.float64)
    rewards = 0.6 + 0.1 * torch.rand(B, k, generator=g, dtype=torch.float64)
    loss = dico_loss(policy, ref, rewards, beta=beta, tau=tau)
    loss.backward()
    value, grad = reference_dico(policy.detach(), ref, rewards, beta, tau)
    assert abs(loss.item() - value) < 1e-9
    assert torch.allclose(policy.grad, grad, atol=1e-9, rtol=0)


def test_k2_is_dpo():
    g = torch.Generator().manual_seed(4)
    policy = torch.randn(6, 2, generator=g, dtype=torch.float64)
    ref = torch.randn(6, 2, generator=g, dtype=torch.float64)
    rewards = torch.randn(6, 2, generator=g, dtype=torch.float64)
    beta = 0.3
    w = rewards.argmax(1)
    l = 1 - w
    rows = torch.arange(6)
    logits = (policy[rows, w] - policy[rows, l]) - (ref[rows, w] - ref[rows, l])
    dpo = -torch.nn.functional.logsigmoid(beta * logits).mean()
    assert torch.allclose(dico_loss(policy, ref, rewards, beta=beta, tau=123.0), dpo, atol=1e-12)


def test_gamma_carries_no_gradient_and_sums_to_one():
    rewards = torch.tensor([[0.5, 0.7, 0.1, 0.69]], requires_grad=True)
    policy = torch.zeros(1, 4, requires_grad=True)
    dico_loss(policy, torch.zeros(1, 4), rewards).backward()
    assert rewards.grad is None
    winner, gamma = loser_weights(rewards, tau=300.0)
    assert winner.item() == 1 and gamma[0, 1] == 0
    assert torch.isclose(gamma.sum(), torch.tensor(1.0))
    assert gamma[0, 2] > 0.99  # tau = 300: nearly all weight on the worst candidate


def test_gradient_pushes_winner_up_and_worst_loser_down():
    rewards = torch.tensor([[0.30, 0.80, 0.10, 0.50, 0.45]])
    policy = torch.full((1, 5), -10.0, requires_grad=True)
    ref = torch.full((1, 5), -10.0)
    opt = torch.optim.SGD([policy], lr=1.0)
    dico_loss(policy, ref, rewards, beta=0.2, tau=30.0).backward()
    opt.step()
    moved = policy.detach() + 10.0
    assert moved[0, 1] > 0          # winner's log-prob rises
    assert moved[0, 2] < 0          # worst loser falls
    assert moved[0, 2] < moved[0, 0] < 0  # and falls most


def test_uniform_tau_zero_weights_losers_equally():
    _, gamma = loser_weights(torch.tensor([[1.0, 0.0, 0.5, 0.2]]), tau=0.0)
    assert torch.allclose(gamma, torch.tensor([[0.0, 1 / 3, 1 / 3, 1 / 3]]))


def test_shape_errors():
    with pytest.raises(ValueError, match=r"\[B, k\]"):
        dico_loss(torch.zeros(3), torch.zeros(3), torch.zeros(3))
    with pytest.raises(ValueError, match="k >= 2"):
        dico_loss(torch.zeros(3, 1), torch.zeros(3, 1), torch.zeros(3, 1))


def test_scst_advantage_signs_and_gradient():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.5, 0.5]])
    adv = scst_advantages(rewards)
    assert adv[0].tolist() == [-1.0, 0.0, 1.0]
    assert torch.all(adv[1] == 0)              # equal rewards: no signal
    assert torch.allclose(adv.sum(1), torch.zeros(2))
    logps = torch.full((2, 3), -5.0, requires_grad=True)
    scst_loss(logps, rewards).backward()
    assert logps.grad[0, 2] < 0 < logps.grad[0, 0]  # descent raises the best, lowers the worst
    assert torch.all(logps.grad[1] == 0)
