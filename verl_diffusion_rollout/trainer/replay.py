"""Replay a rollout's steps in the trainer: recompute per-step log-probs with the current transformer.

The trainer re-runs the transformer on the recorded denoising environment and trajectory and scores each
recorded next latent with the same :func:`~verl_diffusion_rollout.sde.sde_step_with_logprob` the rollout
sampled it with. The transformer is conditioned and called by the batch's model family
(:func:`~verl_diffusion_rollout.pipelines.get_family` of ``batch.family``), the same code the rollout's loop
used. With the rollout's weights, in float32, the result equals ``rollout_log_probs`` exactly.

Which steps were stochastic is a per-sample fact (``sde_mask[b, i]``): a batch concatenated from rollouts with
different SDE windows is replayed sample by sample, each sample's step ``i`` as the rollout took it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch
from ..pipelines import get_family
from ..pipelines.loop import attention_backend
from ..sde import SDEStep, sde_step_with_logprob, to_device_async

__all__ = ["compute_log_probs", "trainable_steps", "StepReplayer"]


def trainable_steps(batch: RolloutBatch) -> list[int]:
    """Step indices that were stochastic for any sample (the ones a policy-gradient loss trains on).

    Samples of a concatenated batch may differ: ``batch.sde_mask[:, i]`` says which samples train at step ``i``.
    """
    return torch.nonzero(batch.sde_mask.any(dim=0)).flatten().tolist()


def _per_sample(stochastic: torch.Tensor, sde: SDEStep, ode: SDEStep) -> SDEStep:
    """One step of a batch whose samples differ in whether it was stochastic: the ``sde`` result where
    ``stochastic[b]`` (``[B]`` bool), the deterministic step elsewhere (log-prob 0, std 0, mean = its Euler step).
    Rows are selected, not recomputed, so each sample's values are those of a batch of its own kind."""
    rows = stochastic.view(-1, *([1] * (sde.prev_sample_mean.ndim - 1)))
    return SDEStep(
        prev_sample=sde.prev_sample,
        log_prob=torch.where(stochastic, sde.log_prob, torch.zeros_like(sde.log_prob)),
        prev_sample_mean=torch.where(rows, sde.prev_sample_mean, ode.prev_sample_mean.float()),
        std_dev=torch.where(stochastic, sde.std_dev, torch.zeros_like(sde.std_dev)),
        std_dev_t=torch.where(stochastic, sde.std_dev_t, torch.zeros_like(sde.std_dev_t)),
        noise=None,
    )


class StepReplayer:
    """Replays single steps of one rollout batch; the family's conditioning is prepared once per batch.

    Args:
        batch: the rollout's :class:`RolloutBatch` of any model family (tensors may live on the CPU).
        device, dtype: where and in which dtype the transformer runs.
        guidance_scale: CFG scale to replay with; defaults to the rollout's.
        sampling: sampling config to replay with; defaults to ``batch.sampling``.
        attention: attention kernels, as the rollout's ``attention_backend`` (same kernels, same numbers).
    """

    def __init__(
        self,
        batch: RolloutBatch,
        device: torch.device,
        dtype: torch.dtype,
        *,
        guidance_scale: float | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        attention: str | None = "auto",
    ):
        self.batch = batch
        self.attention = attention
        self.sampling = sampling or batch.sampling
        self.device = device
        scale = self.sampling.guidance_scale if guidance_scale is None else float(guidance_scale)

        self.family = get_family(batch.family)
        env = {k: None if v is None else v.to(device) for k, v in batch.env().items()}
        self.cond = self.family.condition(
            env,
            guidance_scale=scale,
            batch_cfg=self.sampling.batch_cfg,
            dtype=dtype,
            height=self.sampling.height,
            width=self.sampling.width,
            latent_shape=(len(batch), *batch.all_latents.shape[2:]),
            text_token_multiple=self.sampling.text_token_multiple,
        )
        self.sigmas = batch.all_sigmas.float()
        self.sigma_max = self.sigmas[:, 1] if self.sigmas.shape[1] > 1 else None

    def step(self, transformer: torch.nn.Module, i: int) -> SDEStep:
        """Re-run step ``i``: the transformer on ``x_i`` and the step scored at the recorded ``x_{i+1}``.

        Per sample, as the rollout took it: where ``sde_mask[b, i]`` the stochastic step (``sampling.sde_type``) and
        its log-prob, elsewhere the deterministic step with log-prob exactly 0, ``std_dev`` and ``std_dev_t`` 0.
        With the rollout's weights the log-probs are bit-identical to ``rollout_log_probs[:, i]`` in float32.

        Returns:
            An :class:`SDEStep` over the whole batch (``log_prob`` ``[B]`` float32, with grad when enabled).
        """
        if not 0 <= i < self.batch.num_steps:
            raise ValueError(f"step index must lie in 0..{self.batch.num_steps - 1}, got {i}")
        x = to_device_async(self.batch.all_latents[:, i], self.device)
        prev = to_device_async(self.batch.all_latents[:, i + 1], self.device)
        timesteps = to_device_async(self.batch.all_timesteps[:, i], self.device)
        with attention_backend(self.attention, self.device):
            velocity = self.family.velocity(transformer, x, timesteps, self.cond)
        stochastic = self.batch.sde_mask[:, i]
        common = dict(sigma=self.sigmas[:, i], sigma_next=self.sigmas[:, i + 1], noise_level=self.sampling.noise_level)
        if not bool(stochastic.any()):
            return sde_step_with_logprob(velocity, x, sde_type="ode", prev_sample=prev, **common)
        sde = sde_step_with_logprob(
            velocity,
            x,
            sde_type=self.sampling.sde_type,
            prev_sample=prev,
            log_prob_no_const=self.sampling.log_prob_no_const,
            sigma_max=self.sigma_max,
            **common,
        )
        if bool(stochastic.all()):
            return sde
        ode = sde_step_with_logprob(velocity.detach(), x, sde_type="ode", **common)
        return _per_sample(stochastic.to(self.device), sde, ode)


def _placement(transformer: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    param = next(transformer.parameters())
    return param.device, getattr(transformer, "dtype", None) or param.dtype


def compute_log_probs(
    transformer: torch.nn.Module,
    batch: RolloutBatch,
    step_indices: Sequence[int] | None = None,
    *,
    guidance_scale: float | None = None,
    sampling: DiffusionSamplingConfig | None = None,
    attention: str | None = "auto",
) -> torch.Tensor:
    """Log-probs of the recorded transitions under ``transformer``.

    Args:
        transformer: the policy's transformer of the batch's family (``QwenImageTransformer2DModel``,
            ``SD3Transformer2DModel``; peft-wrapped is fine); gradients flow through it when called with grad enabled.
        batch: a rollout's :class:`RolloutBatch` (tensors may live on the CPU; they are moved step by step).
        step_indices: steps to score; defaults to :func:`trainable_steps`.
        guidance_scale: CFG scale to replay with; defaults to the rollout's.
        sampling: sampling config to replay with; defaults to ``batch.sampling``.
        attention: attention kernels (use the rollout's ``attention_backend``).

    Returns:
        ``[B, len(step_indices)]`` float32 log-probs, per sample: 0 exactly where ``batch.sde_mask[b, i]`` is False
        (the rollout recorded 0 there), the stochastic step's log-prob elsewhere; with the rollout's weights in
        float32, bit-identical to ``batch.rollout_log_probs[:, step_indices]``, also for batches concatenated from
        rollouts with different SDE windows.
    """
    steps = trainable_steps(batch) if step_indices is None else [int(i) for i in step_indices]
    device, dtype = _placement(transformer)
    replayer = StepReplayer(batch, device, dtype, guidance_scale=guidance_scale, sampling=sampling, attention=attention)
    log_probs = [replayer.step(transformer, i).log_prob for i in steps]
    if not log_probs:
        return torch.zeros(len(batch), 0, dtype=torch.float32, device=device)
    return torch.stack(log_probs, dim=1)
