"""``FlowMatchSDEDiscreteScheduler``: diffusers' flow-matching Euler scheduler with SDE/CPS steps and log-probs.

diffusers schedulers keep the timestep table and a step counter on the instance, so one scheduler shared by
two requests in flight would interleave their step indices. Here the pipeline's scheduler is only a template:
:meth:`FlowMatchSDEDiscreteScheduler.for_request` returns a fresh scheduler with its own table and counter for
each request, and nothing a request does touches the template.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput

from .sde import sde_step_with_logprob

__all__ = ["FlowMatchSDEDiscreteScheduler", "FlowMatchSDESchedulerOutput"]


@dataclass
class FlowMatchSDESchedulerOutput(BaseOutput):
    """Output of :meth:`FlowMatchSDEDiscreteScheduler.step` (see :class:`verl_diffusion_rollout.sde.SDEStep`)."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std_dev: torch.Tensor
    std_dev_t: torch.Tensor
    noise: torch.Tensor | None = None


class FlowMatchSDEDiscreteScheduler(FlowMatchEulerDiscreteScheduler):
    """Flow-matching scheduler whose :meth:`step` can be stochastic (``sde``/``cps``) and returns log-probs.

    With the default ``sde_type="ode"`` it is a drop-in replacement for ``FlowMatchEulerDiscreteScheduler``:
    the step is bit-identical to diffusers' Euler step.
    """

    def for_request(
        self,
        num_inference_steps: int | None = None,
        *,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        device: torch.device | str | None = None,
    ) -> FlowMatchSDEDiscreteScheduler:
        """Return a new scheduler with this one's config and its own timesteps, sigmas and step counter."""
        scheduler = type(self).from_config(self.config)
        scheduler.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu)
        scheduler.set_begin_index(0)
        return scheduler

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """diffusers' ``set_timesteps`` (same signature, so pipelines see custom-sigma support)."""
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        # A host copy of the table: stepping reads sigmas from it, so a step never waits on the device.
        self._host_sigmas = self.sigmas.detach().to("cpu", torch.float32)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        *,
        sde_type: str = "ode",
        noise_level: float = 0.0,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | Sequence[torch.Generator] | None = None,
        prev_sample: torch.Tensor | None = None,
        log_prob_no_const: bool | None = None,
        return_dict: bool = True,
        **unsupported,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """Step from the current timestep to the next one.

        Args:
            model_output: ``[B, ...]`` velocity.
            timestep: the current entry of ``self.timesteps`` (used to find the step on the first call).
            sample: ``[B, ...]`` current latent.
            sde_type, noise_level, noise, generator, prev_sample, log_prob_no_const: as in
                :func:`verl_diffusion_rollout.sde.sde_step_with_logprob`.
            return_dict: return a :class:`FlowMatchSDESchedulerOutput` (default) or the tuple
                ``(prev_sample, log_prob, prev_sample_mean, std_dev, noise, std_dev_t)``.
        """
        if unsupported.get("per_token_timesteps") is not None or self.config.stochastic_sampling:
            raise ValueError(
                "FlowMatchSDEDiscreteScheduler does not support per_token_timesteps or stochastic_sampling=True; "
                "use sde_type='sde' or 'cps' for stochastic steps"
            )
        if self.step_index is None:
            self._init_step_index(timestep)
        sigmas = getattr(self, "_host_sigmas", None)
        if sigmas is None:
            raise ValueError("call set_timesteps() (or use for_request()) before step()")
        if self.step_index + 1 >= len(sigmas):
            raise ValueError(f"step index {self.step_index} is past the last timestep ({len(self.timesteps)} steps)")
        out = sde_step_with_logprob(
            model_output,
            sample,
            sigmas[self.step_index],
            sigmas[self.step_index + 1],
            sde_type=sde_type,
            noise_level=noise_level,
            noise=noise,
            generator=generator,
            prev_sample=prev_sample,
            log_prob_no_const=log_prob_no_const,
            sigma_max=sigmas[1],
        )
        self._step_index += 1
        if not return_dict:
            return (out.prev_sample, out.log_prob, out.prev_sample_mean, out.std_dev, out.noise, out.std_dev_t)
        return FlowMatchSDESchedulerOutput(
            prev_sample=out.prev_sample,
            log_prob=out.log_prob,
            prev_sample_mean=out.prev_sample_mean,
            std_dev=out.std_dev,
            std_dev_t=out.std_dev_t,
            noise=out.noise,
        )
