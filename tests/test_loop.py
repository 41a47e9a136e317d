"""The shared denoising loop on its own (a velocity function instead of a model), and both diffusers log-prob
pipelines running through it."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.errors import GenerationCancelled
from verl_diffusion_rollout.pipelines import loop
from verl_diffusion_rollout.pipelines.loop import denoise_loop, per_sample_generators
from verl_diffusion_rollout.scheduler import FlowMatchSDEDiscreteScheduler
from verl_diffusion_rollout.sde import randn_per_sample

SHAPE = (4, 3, 3)  # per-sample latent shape; the loop does not care what it means


def scheduler(num_steps: int = 4) -> FlowMatchSDEDiscreteScheduler:
    return FlowMatchSDEDiscreteScheduler(shift=3.0).for_request(num_steps, device="cpu")


def toy_velocity(calls: list):
    """An elementwise velocity of x and t (so every sample is computed independently); records grad mode."""

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        calls.append((t.clone(), torch.is_grad_enabled()))
        return torch.sin(x) * (t.view(-1, *([1] * (x.ndim - 1))) / 1000) - 0.3 * x

    return velocity


def run(seeds, sampling, calls=None, **kwargs):
    generators = per_sample_generators(seeds)
    x = randn_per_sample((len(seeds), *SHAPE), generators)
    return denoise_loop(toy_velocity([] if calls is None else calls), x, scheduler(sampling.num_steps), generators,
                        sampling, window_seed=kwargs.pop("window_seed", 0), **kwargs)


def test_ode_steps_are_diffusers_euler_steps():
    sampling = DiffusionSamplingConfig(num_steps=4, sde_type="ode")
    traj = run([3, 4], sampling)
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(4)
    x = traj.latents[:, 0]
    for t in ref.timesteps:
        x = ref.step(toy_velocity([])(x, t.expand(2)), t, x, return_dict=False)[0]
    assert torch.equal(traj.latents[:, -1], x) and torch.equal(traj.final, x)
    assert not traj.sde_mask.any() and torch.equal(traj.log_probs, torch.zeros(2, 4))
    assert torch.equal(traj.timesteps, ref.timesteps) and torch.equal(traj.sigmas, ref.sigmas)


def test_window_log_probs_and_per_sample_noise():
    sampling = DiffusionSamplingConfig(num_steps=6, sde_type="sde", sde_window_size=2, sde_window_range=[1, 5],
                                       return_debug=True)
    traj = run([11, 12, 13], sampling, window_seed=5)
    window = sampling.stochastic_steps(5)
    assert traj.sde_mask[0].nonzero().flatten().tolist() == window
    assert torch.all(traj.log_probs[:, window] != 0) and torch.all(traj.log_probs[:, ~traj.sde_mask[0]] == 0)
    # Sample 12's noise (initial latent and every epsilon) comes from its seed alone, alone or in a batch.
    alone = run([12], sampling, window_seed=5)
    assert torch.equal(traj.latents[1], alone.latents[0])
    assert torch.equal(traj.debug["variance_noise"][1], alone.debug["variance_noise"][0])
    assert torch.equal(traj.log_probs[1], alone.log_probs[0])


def test_cancel_stops_before_the_step_it_is_asked_at():
    calls: list = []
    asked = []

    def cancel() -> bool:
        asked.append(True)
        return len(asked) == 3

    with pytest.raises(GenerationCancelled, match="before step 2 of 4"):
        run([1], DiffusionSamplingConfig(num_steps=4), calls, cancel=cancel)
    assert len(calls) == 2


def test_stochastic_steps_with_grad_switches_autograd_on_exactly_there():
    sampling = DiffusionSamplingConfig(num_steps=5, sde_type="cps", sde_window=[1, 3])
    calls: list = []
    with_grad = run([7, 8], sampling, calls, stochastic_steps_with_grad=True)
    assert [grad for _, grad in calls] == [False, True, False, True, False]
    without = run([7, 8], sampling)
    assert torch.equal(with_grad.latents, without.latents) and torch.equal(with_grad.log_probs, without.log_probs)
    assert not with_grad.latents.requires_grad and not with_grad.final.requires_grad


def test_progress_bar_and_bad_generators():
    events = []

    class Bar:
        def __init__(self, total):
            events.append(("total", total))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def update(self):
            events.append("update")

    run([1], DiffusionSamplingConfig(num_steps=3, sde_type="ode"), progress_bar=Bar)
    assert events == [("total", 3), "update", "update", "update"]
    x = torch.zeros(2, *SHAPE)
    with pytest.raises(ValueError, match="got 1 generators for a batch of 2 latents"):
        denoise_loop(toy_velocity([]), x, scheduler(), per_sample_generators([1]), DiffusionSamplingConfig(),
                     window_seed=0)


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_both_diffusers_pipelines_run_the_shared_loop(family, request, monkeypatch):
    engine = request.getfixturevalue("engine" if family == "qwenimage" else "sd3_engine")
    seen = []
    shared = loop.denoise_loop

    def spy(*args, **kwargs):
        seen.append(kwargs["window_seed"])
        return shared(*args, **kwargs)

    monkeypatch.setattr(loop, "denoise_loop", spy)
    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=2, max_sequence_length=16)
    batch = engine.generate(["a red cat"], seeds=[9], sampling=sampling, window_seed=4)
    assert seen == [4] and batch.family == family and batch.num_steps == 2
