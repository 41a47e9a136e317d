"""Replay a rollout's steps in the trainer: recompute per-step log-probs with the current transformer.

The trainer re-runs the transformer on the recorded denoising environment and trajectory and scores each
recorded next latent with the same :func:`~verl_diffusion_rollout.sde.sde_step_with_logprob` the rollout
sampled it with. With the rollout's weights, in float32, the result equals ``rollout_log_probs`` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch
from ..pipelines.qwenimage import TextConditioning, img_shapes_for, predict_velocity
from ..sde import sde_step_with_logprob

__all__ = ["compute_log_probs", "trainable_steps"]


def trainable_steps(batch: RolloutBatch) -> list[int]:
    """Step indices that were stochastic for any sample (the ones a policy-gradient loss trains on)."""
    return torch.nonzero(batch.sde_mask.any(dim=0)).flatten().tolist()


def _vae_patch_factor(height: int, width: int, num_tokens: int) -> int:
    """Pixels per latent token side (VAE factor x 2x2 packing), recovered from the image size and token count."""
    factor = math.isqrt(height * width // num_tokens)
    if factor * factor * num_tokens != height * width:
        raise ValueError(f"{num_tokens} latent tokens do not tile a {height}x{width} image")
    return factor


def compute_log_probs(
    transformer: torch.nn.Module,
    batch: RolloutBatch,
    step_indices: Sequence[int] | None = None,
    *,
    guidance_scale: float | None = None,
    sampling: DiffusionSamplingConfig | None = None,
) -> torch.Tensor:
    """Log-probs of the recorded transitions under ``transformer``.

    Args:
        transformer: the policy's ``QwenImageTransformer2DModel`` (peft-wrapped is fine); gradients flow through
            it when called with grad enabled.
        batch: a rollout's :class:`RolloutBatch` (tensors may live on the CPU; they are moved step by step).
        step_indices: steps to score; defaults to :func:`trainable_steps`.
        guidance_scale: CFG scale to replay with; defaults to the rollout's.
        sampling: sampling config to replay with; defaults to ``batch.sampling``.

    Returns:
        ``[B, len(step_indices)]`` float32 log-probs (0 at deterministic steps).
    """
    sampling = sampling or batch.sampling
    steps = trainable_steps(batch) if step_indices is None else [int(i) for i in step_indices]
    num_steps = batch.num_steps
    bad = [i for i in steps if not 0 <= i < num_steps]
    if bad:
        raise ValueError(f"step_indices must lie in 0..{num_steps - 1}, got {bad}")
    scale = sampling.guidance_scale if guidance_scale is None else float(guidance_scale)
    param = next(transformer.parameters())
    device, dtype = param.device, param.dtype
    if getattr(transformer, "dtype", None) is not None:
        dtype = transformer.dtype

    def on_device(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.to(device)

    text = TextConditioning.build(
        on_device(batch.prompt_embeds),
        on_device(batch.prompt_embeds_mask),
        on_device(batch.negative_prompt_embeds),
        on_device(batch.negative_prompt_embeds_mask),
        guidance_scale=scale,
        batch_cfg=sampling.batch_cfg,
        dtype=dtype,
    )
    size = len(batch)
    factor = _vae_patch_factor(sampling.height, sampling.width, batch.all_latents.shape[2])
    img_shapes = img_shapes_for(size, sampling.height, sampling.width, factor // 2)
    sigmas = batch.all_sigmas.float()
    sigma_max = sigmas[:, 1] if sigmas.shape[1] > 1 else None
    log_probs = []
    for i in steps:
        x = batch.all_latents[:, i].to(device)
        prev = batch.all_latents[:, i + 1].to(device)
        velocity = predict_velocity(transformer, x, batch.all_timesteps[:, i].to(device), text, img_shapes)
        sde_type = sampling.sde_type if bool(batch.sde_mask[:, i].any()) else "ode"
        out = sde_step_with_logprob(
            velocity,
            x,
            sigmas[:, i],
            sigmas[:, i + 1],
            sde_type=sde_type,
            noise_level=sampling.noise_level,
            prev_sample=prev,
            log_prob_no_const=sampling.log_prob_no_const,
            sigma_max=sigma_max,
        )
        log_probs.append(out.log_prob)
    if not log_probs:
        return torch.zeros(size, 0, dtype=torch.float32, device=device)
    return torch.stack(log_probs, dim=1)
