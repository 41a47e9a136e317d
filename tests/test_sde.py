"""sde.py: the SDE/CPS/ODE step against independent implementations of the formulas and diffusers' Euler step."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from verl_diffusion_rollout.sde import randn_per_sample, sde_step_with_logprob


def reference_step(v, x, sigma, sigma_next, eps, sde_type, eta, sigma_max, no_const, dtype):
    """The FlowGRPO formulas written out directly, in ``dtype`` (float64 for the precision reference)."""
    v, x, eps = v.to(dtype), x.to(dtype), eps.to(dtype)
    shape = (-1,) + (1,) * (x.ndim - 1)
    s = torch.as_tensor(sigma, dtype=dtype).expand(x.shape[0]).reshape(shape)
    sn = torch.as_tensor(sigma_next, dtype=dtype).expand(x.shape[0]).reshape(shape)
    dt = sn - s
    if sde_type == "sde":
        smax = torch.as_tensor(sigma_max, dtype=dtype).expand(x.shape[0]).reshape(shape)
        std_t = torch.sqrt(s / (1 - torch.where(s == 1, smax, s))) * eta
        mean = x * (1 + std_t**2 / (2 * s) * dt) + v * (1 + std_t**2 * (1 - s) / (2 * s)) * dt
        std = std_t * torch.sqrt(-dt)
        prev = mean + std * eps
        lp = -((prev - mean) ** 2) / (2 * std**2)
        if not no_const:
            lp = lp - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    else:
        std = sn * math.sin(eta * math.pi / 2)
        mean = (x - s * v) * (1 - sn) + (x + v * (1 - s)) * torch.sqrt(sn**2 - std**2)
        prev = mean + std * eps
        lp = -((prev - mean) ** 2)
        if not no_const:
            lp = lp / (2 * std**2) - torch.log(std) - math.log(math.sqrt(2 * math.pi))
    return prev, mean, lp.mean(dim=tuple(range(1, x.ndim)))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """Norm-wise relative error max|a-b| / max|b|."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


CASES = [
    # (sde_type, no_const)
    ("sde", False),
    ("sde", True),
    ("cps", True),
    ("cps", False),
]


@pytest.mark.parametrize("sde_type,no_const", CASES)
@pytest.mark.parametrize("seed", range(12))
def test_matches_float64_and_float32_references(sde_type, no_const, seed):
    g = torch.Generator().manual_seed(seed)
    batch = int(torch.randint(1, 5, (1,), generator=g))
    tail = [int(d) for d in torch.randint(1, 9, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g)]
    shape = (batch, *tail)
    x = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    eps = torch.randn(shape, generator=g)
    sigma = float(torch.rand((), generator=g) * 0.9 + 0.05)
    if seed % 4 == 0:
        sigma = 1.0  # FlowGRPO's first step, where sigma_max stands in for sigma
    sigma_next = sigma * float(torch.rand((), generator=g) * 0.9)
    sigma_max = 0.97
    per_sample = seed % 3 == 0
    sig = torch.full((batch,), sigma) if per_sample else sigma
    sig_next = torch.full((batch,), sigma_next) if per_sample else sigma_next
    eta = float(torch.rand((), generator=g) * 1.2 + 0.1)

    out = sde_step_with_logprob(
        v, x, sig, sig_next, sde_type=sde_type, noise_level=eta, noise=eps,
        log_prob_no_const=no_const, sigma_max=sigma_max,
    )
    assert out.log_prob.dtype == torch.float32 and out.log_prob.shape == (batch,)
    prev64, mean64, lp64 = reference_step(v, x, sigma, sigma_next, eps, sde_type, eta, sigma_max, no_const, torch.float64)
    assert rel_err(out.prev_sample, prev64) <= 1e-5
    assert rel_err(out.prev_sample_mean, mean64) <= 1e-5
    assert rel_err(out.log_prob, lp64) <= 1e-5
    prev32, mean32, lp32 = reference_step(v, x, sigma, sigma_next, eps, sde_type, eta, sigma_max, no_const, torch.float32)
    assert (out.prev_sample - prev32).abs().max().item() <= 1e-6 * max(1.0, prev32.abs().max().item())
    assert (out.prev_sample_mean - mean32).abs().max().item() <= 1e-6 * max(1.0, mean32.abs().max().item())
    assert (out.log_prob - lp32).abs().max().item() <= 1e-6 * max(1.0, lp32.abs().max().item())
    # Replay: scoring the sampled latent gives the same log-prob, bit for bit.
    replay = sde_step_with_logprob(
        v, x, sig, sig_next, sde_type=sde_type, noise_level=eta, prev_sample=out.prev_sample,
        log_prob_no_const=no_const, sigma_max=sigma_max,
    )
    assert torch.equal(replay.log_prob, out.log_prob)
    assert replay.noise is None and torch.equal(out.noise, eps)


def test_default_log_prob_convention_follows_flowgrpo():
    x, v, eps = torch.randn(2, 8), torch.randn(2, 8), torch.randn(2, 8)
    sde = sde_step_with_logprob(v, x, 0.6, 0.5, sde_type="sde", noise_level=0.7, noise=eps)
    sde_full = sde_step_with_logprob(v, x, 0.6, 0.5, sde_type="sde", noise_level=0.7, noise=eps, log_prob_no_const=False)
    assert torch.equal(sde.log_prob, sde_full.log_prob)  # sde: full Gaussian by default
    cps = sde_step_with_logprob(v, x, 0.6, 0.5, sde_type="cps", noise_level=0.7, noise=eps)
    expected = -((cps.prev_sample - cps.prev_sample_mean) ** 2).mean(dim=1)
    assert torch.equal(cps.log_prob, expected)  # cps: -(prev - mean)^2, no constants


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ode_is_bit_identical_to_diffusers_euler_step(dtype):
    diffusers_sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    diffusers_sched.set_timesteps(8)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 12, generator=g).to(dtype)
    ours = x.clone()
    for i, t in enumerate(diffusers_sched.timesteps):
        v = torch.randn(3, 16, 12, generator=g).to(dtype)
        ref = diffusers_sched.step(v, t, x, return_dict=False)[0]
        out = sde_step_with_logprob(v, ours, diffusers_sched.sigmas[i], diffusers_sched.sigmas[i + 1], sde_type="ode")
        assert out.prev_sample.dtype == dtype
        assert torch.equal(out.prev_sample, ref), f"step {i} differs"
        assert torch.equal(out.log_prob, torch.zeros(3))
        # Per-sample sigmas take the same path sample by sample.
        per = sde_step_with_logprob(
            v, ours, diffusers_sched.sigmas[i].expand(3), diffusers_sched.sigmas[i + 1].expand(3), sde_type="ode"
        )
        assert torch.equal(per.prev_sample, ref)
        x, ours = ref, out.prev_sample


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
def test_bf16_inputs_give_fp32_results(sde_type):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 32, 16, generator=g).bfloat16()
    v = torch.randn(2, 32, 16, generator=g).bfloat16()
    eps = torch.randn(2, 32, 16, generator=g)
    out = sde_step_with_logprob(v, x, 0.8, 0.7, sde_type=sde_type, noise_level=0.9, noise=eps)
    assert out.prev_sample.dtype == torch.float32
    assert out.log_prob.dtype == torch.float32
    assert out.prev_sample_mean.dtype == torch.float32
    ref = sde_step_with_logprob(v.float(), x.float(), 0.8, 0.7, sde_type=sde_type, noise_level=0.9, noise=eps)
    assert torch.equal(out.log_prob, ref.log_prob)
    assert torch.equal(out.prev_sample, ref.prev_sample)


def test_zero_noise_level_is_deterministic_with_zero_log_prob():
    x, v = torch.randn(2, 5), torch.randn(2, 5)
    out = sde_step_with_logprob(v, x, 0.5, 0.3, sde_type="sde", noise_level=0.0, noise=torch.randn(2, 5))
    assert torch.equal(out.prev_sample, out.prev_sample_mean)
    assert torch.equal(out.log_prob, torch.zeros(2))
    assert torch.allclose(out.prev_sample, x + (0.3 - 0.5) * v, atol=1e-6)


def test_per_sample_generators_make_rows_independent_of_batch():
    def gens(seeds):
        return [torch.Generator().manual_seed(s) for s in seeds]

    batch = randn_per_sample((4, 3, 5), gens([11, 22, 33, 44]))
    alone = randn_per_sample((1, 3, 5), gens([33]))
    assert torch.equal(batch[2], alone[0])
    x, v = torch.zeros(4, 3, 5), torch.zeros(4, 3, 5)
    out = sde_step_with_logprob(v, x, 0.5, 0.4, generator=gens([11, 22, 33, 44]))
    out_alone = sde_step_with_logprob(v[:1], x[:1], 0.5, 0.4, generator=gens([33]))
    assert torch.equal(out.noise[2], out_alone.noise[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(sde_type="langevin"), "unknown sde_type 'langevin'"),
        (dict(noise_level=-0.1), "noise_level must be finite and >= 0, got -0.1"),
        (dict(noise_level=float("nan")), "noise_level must be finite"),
        (dict(sigma=0.4, sigma_next=0.5), "sigma_next must be smaller than sigma"),
        (dict(sigma=0.5, sigma_next=0.5), "sigma_next must be smaller than sigma"),
        (dict(sigma=1.2, sigma_next=0.5), r"sigmas must lie in \[0, 1\]"),
        (dict(sigma=torch.ones(3) * 0.5), r"sigma must be a scalar or a tensor of shape \[2\]"),
        (dict(prev_sample=torch.zeros(2, 4)), r"prev_sample shape \(2, 4\) does not match sample shape \(2, 3\)"),
        (dict(noise=torch.zeros(3, 3)), r"noise shape \(3, 3\)"),
        (dict(model_output=torch.zeros(2, 4)), r"model_output shape \(2, 4\) does not match"),
        (dict(sigma=1.0, sigma_next=0.5, sigma_max=1.0), "sigma_max must be < 1"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs, match):
    args = dict(model_output=torch.zeros(2, 3), sample=torch.zeros(2, 3), sigma=0.5, sigma_next=0.4)
    args.update({k: kwargs.pop(k) for k in list(kwargs) if k in args})
    with pytest.raises(ValueError, match=match):
        sde_step_with_logprob(args["model_output"], args["sample"], args["sigma"], args["sigma_next"], **kwargs)
