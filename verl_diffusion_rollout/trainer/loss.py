"""FlowGRPO's clipped-ratio policy loss for one denoising step, with an optional KL to the reference policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PolicyLossOutput", "flowgrpo_step_loss", "gaussian_kl"]


@dataclass
class PolicyLossOutput:
    """Loss and the statistics a user watches.

    Attributes:
        loss: scalar to backpropagate (policy loss + beta * KL).
        policy_loss: scalar, the clipped surrogate.
        ratio: ``[B]`` importance ratios ``exp(new - old)``.
        clipfrac: fraction of samples with ``|ratio - 1| > clip_range``.
        approx_kl: ``0.5 * mean((new - old)**2)`` (FlowGRPO's estimate of KL(old || new)).
        kl: mean KL to the reference policy (0 when beta is 0).
    """

    loss: torch.Tensor
    policy_loss: torch.Tensor
    ratio: torch.Tensor
    clipfrac: torch.Tensor
    approx_kl: torch.Tensor
    kl: torch.Tensor


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL between two Gaussians of equal std, per sample: ``mean(|mu - mu_ref|^2) / (2 std^2)`` -> ``[B]``."""
    sq = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    return sq / (2 * std.clamp_min(1e-12) ** 2)


def flowgrpo_step_loss(
    log_probs: torch.Tensor,
    old_log_probs: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    *,
    kl: torch.Tensor | None = None,
    beta: float = 0.0,
    sample_weight: torch.Tensor | None = None,
) -> PolicyLossOutput:
    """PPO-style clipped loss on one step's log-probs.

    Args:
        log_probs: ``[B]`` current policy's log-probs of the recorded transitions (with grad).
        old_log_probs: ``[B]`` the rollout's log-probs.
        advantages: ``[B]`` advantages.
        clip_range: ratio clip ``epsilon``.
        kl: ``[B]`` KL to the reference for this step (with grad), when ``beta > 0``.
        beta: KL weight.
        sample_weight: ``[B]`` weights; when given, ``loss`` and ``policy_loss`` are weighted sums over the batch
            instead of means (a trainer normalising by the samples of a whole mini-batch, across micro-batches and
            workers, passes ``keep / count``; a weight of 0 drops a sample). The statistics stay batch means.
    """
    if log_probs.shape != old_log_probs.shape or log_probs.shape != advantages.shape:
        raise ValueError(
            f"shapes differ: log_probs {tuple(log_probs.shape)}, old {tuple(old_log_probs.shape)}, "
            f"advantages {tuple(advantages.shape)}"
        )
    diff = log_probs - old_log_probs
    ratio = torch.exp(diff)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_sample = torch.maximum(unclipped, clipped)
    if sample_weight is None:
        policy_loss = per_sample.mean()
        kl_mean = torch.zeros((), device=log_probs.device) if kl is None else kl.mean()
    else:
        if sample_weight.shape != per_sample.shape:
            raise ValueError(f"sample_weight has shape {tuple(sample_weight.shape)}, expected {tuple(per_sample.shape)}")
        policy_loss = (per_sample * sample_weight).sum()
        kl_mean = torch.zeros((), device=log_probs.device) if kl is None else (kl * sample_weight).sum()
    loss = policy_loss + beta * kl_mean if beta > 0 else policy_loss
    with torch.no_grad():
        clipfrac = ((ratio - 1.0).abs() > clip_range).float().mean()
        approx_kl = 0.5 * (diff**2).mean()
    return PolicyLossOutput(
        loss=loss,
        policy_loss=policy_loss.detach(),
        ratio=ratio.detach(),
        clipfrac=clipfrac,
        approx_kl=approx_kl,
        kl=kl_mean.detach(),
    )
