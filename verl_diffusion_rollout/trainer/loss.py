"""FlowGRPO's clipped-ratio policy loss for one denoising step, with an optional KL to the reference policy."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..sde import to_device_async

__all__ = ["PolicyLossOutput", "flowgrpo_step_loss", "gaussian_kl", "sample_step_weights"]


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


def gaussian_kl(mean: torch.Tensor, ref_mean: torch.Tensor, std_dev_t: torch.Tensor) -> torch.Tensor:
    """FlowGRPO's KL term to the reference policy, per sample: ``mean(|mu - mu_ref|^2) / (2 * std_dev_t^2)``.

    As flow_grpo's ``train_sd3.py`` computes it: the squared difference of the two step means is averaged over
    every non-batch dimension first, then divided by ``2 * std_dev_t[b]**2`` for each sample ``b`` (the loss then
    averages over samples). Pass :attr:`~verl_diffusion_rollout.sde.SDEStep.std_dev_t` for FlowGRPO's term; passing
    :attr:`~verl_diffusion_rollout.sde.SDEStep.std_dev` gives the exact KL between the two transition Gaussians,
    which is ``1 / (-dt)`` times larger for ``sde`` (the same for ``cps``).

    Args:
        mean, ref_mean: ``[B, ...]`` float32 step means of the policy (with grad) and of the reference.
        std_dev_t: ``[B]`` float32 std per sample; where it is 0 (a deterministic step) the term is 0.

    Returns:
        ``[B]`` float32.
    """
    if std_dev_t.shape != mean.shape[:1]:
        raise ValueError(f"std_dev_t has shape {tuple(std_dev_t.shape)}, expected [{mean.shape[0]}]")
    sq = ((mean - ref_mean) ** 2).mean(dim=tuple(range(1, mean.ndim)))
    stochastic = std_dev_t > 0
    safe = torch.where(stochastic, std_dev_t, torch.ones_like(std_dev_t))
    return torch.where(stochastic, sq / (2 * safe**2), torch.zeros_like(sq))


def sample_step_weights(keep: torch.Tensor, sde_mask: torch.Tensor, kept: int) -> torch.Tensor:
    """Loss weight of every sample-step of one forward batch: ``keep[b] * sde_mask[b, i] / (kept * n_b)``.

    ``n_b`` is sample ``b``'s own number of stochastic steps, so each sample's loss is the mean over the steps it
    was sampled stochastically, and a step that was deterministic for it does not count. When every sample has
    the same number of stochastic steps ``n`` this is FlowGRPO's normalisation, computed exactly as
    ``keep / (kept * n)``.

    Args:
        keep: ``[B]`` float32, 1 for samples that train, 0 for dropped ones.
        sde_mask: ``[B, T]`` bool, the rollout's stochastic steps (any device).
        kept: samples kept in the whole mini-batch (the normaliser over micro-batches and workers).

    Returns:
        ``[B, T]`` weights, ``keep``'s dtype and device (0 at deterministic steps).
    """
    mask = to_device_async(sde_mask, keep.device)
    counts = sde_mask.sum(dim=1)
    if bool((counts == counts[0]).all()):
        return (keep / (kept * max(int(counts[0]), 1)))[:, None] * mask
    per_sample = kept * to_device_async(counts.clamp_min(1).to(keep.dtype), keep.device)
    return (keep / per_sample)[:, None] * mask


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
