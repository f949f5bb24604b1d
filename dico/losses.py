"""Fine-tuning objectives over plain tensors: DiCO and SCST.

Both take per-candidate *sequence* log-probabilities, shape [B, k]: B images, k beam candidates
each, every entry log pi(s|I) = sum over the caption's tokens (EOS included, pads excluded) of the
token log-probabilities (see dico.model.sequence_logprobs). Token-level cross-entropy for XE
pre-training lives in dico.model.token_xe_loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def loser_weights(rewards: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Winner index and loser weights gamma of each row (no gradient).

        w = argmax_j r_j,   gamma_j = softmax_{j != w}( tau * (r_w - r_j) ),   gamma_w = 0

    The gap r_w - r_j is >= 0, so the *worst* candidate gets the largest weight; tau = 300 with
    PAC-S gaps of 0.01-0.05 makes gamma nearly one-hot on it (official trainers/dico_trainer.py
    weight_quality_distances).
    """
    rewards = rewards.detach()
    winner = rewards.argmax(dim=1)
    gap = rewards.gather(1, winner[:, None]) - rewards                      # [B, k], >= 0
    is_winner = F.one_hot(winner, rewards.shape[1]).bool()
    logits = (tau * gap).masked_fill(is_winner, float("-inf"))
    return winner, torch.softmax(logits, dim=1)


def dico_loss(policy_logps: torch.Tensor, ref_logps: torch.Tensor, rewards: torch.Tensor,
              beta: float = 0.2, tau: float = 300.0) -> torch.Tensor:
    """The DiCO objective: one winner against a reward-weighted mix of the k-1 losers.

    With Delta(s) = log pi_theta(s|I) - log pi_ref(s|I) (the implicit reward of the captioner, up to
    the factor beta, from the closed-form optimum of KL-regularised reward maximisation), per image

        h = Delta(s_w) - sum_{j != w} gamma_j * Delta(s_j)
        L = mean_over_images( -log sigmoid(beta * h) )

    The partition function log Z(I) cancels because the gammas sum to 1. For k = 2 this is exactly
    the DPO loss of Rafailov et al. (2023) with the higher-reward beam as the preferred caption.

    policy_logps: [B, k] with gradient; ref_logps: [B, k] from the frozen XE model (no gradient
    needed); rewards: [B, k] from the evaluator. Defaults beta = 0.2, tau = 300 (official code).
    """
    if not (policy_logps.shape == ref_logps.shape == rewards.shape) or policy_logps.dim() != 2:
        raise ValueError(f"dico_loss expects three [B, k] tensors, got {tuple(policy_logps.shape)}, "
                         f"{tuple(ref_logps.shape)}, {tuple(rewards.shape)}")
    if policy_logps.shape[1] < 2:
        raise ValueError("dico_loss needs k >= 2 candidates per image (one winner, at least one loser)")
    winner, gamma = loser_weights(rewards, tau)
    delta = policy_logps - ref_logps.detach()
    h = delta.gather(1, winner[:, None]).squeeze(1) - (gamma * delta).sum(dim=1)
    return -F.logsigmoid(beta * h).mean()


def dico_diagnostics(policy_logps, ref_logps, rewards, beta: float, tau: float) -> dict[str, float]:
    """Implicit rewards beta*Delta of the winners and of the gamma-weighted losers, as the official
    code logs them (chosen_rewards / rejected_rewards), and the accuracy of h > 0."""
    with torch.no_grad():
        winner, gamma = loser_weights(rewards, tau)
        delta = policy_logps - ref_logps
        chosen = delta.gather(1, winner[:, None]).squeeze(1)
        rejected = (gamma * delta).sum(dim=1)
        return {"chosen_reward": float(beta * chosen.mean()), "rejected_reward": float(beta * rejected.mean()),
                "margin_acc": float((chosen > rejected).float().mean())}


def scst_advantages(rewards: torch.Tensor) -> torch.Tensor:
    """Reward minus the mean reward of the row's k candidates (the "mean of beams" baseline of
    M2-Transformer-style SCST). Sums to zero per row; no gradient."""
    rewards = rewards.detach()
    return rewards - rewards.mean(dim=1, keepdim=True)


def scst_loss(policy_logps: torch.Tensor, rewards: torch.Tensor) -> torch.Tensor:
    """Self-critical policy gradient: L = -mean_{b,j}( (r_bj - mean_j r_bj) * log pi(s_bj|I) ).

    Its gradient raises the log-probability of candidates better than their image's average and
    lowers the others'.
    """
    if policy_logps.shape != rewards.shape or policy_logps.dim() != 2:
        raise ValueError(f"scst_loss expects two [B, k] tensors, got {tuple(policy_logps.shape)}, "
                         f"{tuple(rewards.shape)}")
    return -(scst_advantages(rewards) * policy_logps).mean()
