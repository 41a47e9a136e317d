"""FlowMatchSDEDiscreteScheduler: a drop-in diffusers scheduler with request-local state."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

from verl_diffusion_rollout.scheduler import FlowMatchSDEDiscreteScheduler


def test_drop_in_replacement_in_stock_pipeline_is_bit_identical(tiny_model_path):
    pipe = QwenImagePipeline.from_pretrained(tiny_model_path)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(prompt="a red cat", negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64,
                  num_inference_steps=4, output_type="latent")
    ref = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.scheduler = FlowMatchSDEDiscreteScheduler.from_config(pipe.scheduler.config)
    ours = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert torch.equal(ref, ours)


def test_for_request_gives_independent_state():
    template = FlowMatchSDEDiscreteScheduler(shift=3.0)
    a = template.for_request(4)
    b = template.for_request(8, sigmas=np.linspace(1.0, 1 / 8, 8))
    assert a is not template and len(a.timesteps) == 4 and len(b.timesteps) == 8
    x, v = torch.zeros(1, 4), torch.ones(1, 4)
    a.step(v, a.timesteps[0], x)
    assert a.step_index == 1 and b.step_index is None and template.step_index is None


def test_step_returns_log_prob_and_matches_euler_in_ode_mode():
    ref = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ref.set_timesteps(6)
    ours = FlowMatchSDEDiscreteScheduler(shift=3.0).for_request(6)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 4, generator=g)
    for t in ref.timesteps:
        v = torch.randn(2, 8, 4, generator=g)
        expected = ref.step(v, t, x).prev_sample
        out = ours.step(v, t, x)
        assert torch.equal(out.prev_sample, expected) and torch.equal(out.log_prob, torch.zeros(2))
        x = expected
    with pytest.raises(ValueError, match="past the last timestep"):
        ours.step(v, ref.timesteps[-1], x)


def test_sde_step_through_scheduler_reports_log_prob():
    sched = FlowMatchSDEDiscreteScheduler().for_request(4)
    x, v = torch.randn(2, 8), torch.randn(2, 8)
    out = sched.step(v, sched.timesteps[0], x, sde_type="sde", noise_level=0.7, generator=torch.Generator().manual_seed(0))
    assert out.log_prob.shape == (2,) and torch.all(out.log_prob < 0)
    assert out.noise is not None and out.std_dev.shape == (2,) and torch.all(out.std_dev > 0)


def test_threads_stepping_their_own_schedulers_match_sequential():
    template = FlowMatchSDEDiscreteScheduler(shift=2.0)

    def run(seed: int) -> torch.Tensor:
        sched = template.for_request(10)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(1, 64, generator=g)
        for t in sched.timesteps:
            x = sched.step(-x, t, x, sde_type="sde", noise_level=0.5, generator=g).prev_sample
        return x

    expected = [run(s) for s in range(4)]
    results = [None] * 4
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, run(i))) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(expected, results))
