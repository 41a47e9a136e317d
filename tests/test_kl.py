"""FlowGRPO's KL to the reference: ``SDEStep.std_dev_t``, ``gaussian_kl`` and the trainer's ``actor.kl_convention``.

FlowGRPO (``scripts/train_sd3.py``) regularises with ``mean((mu - mu_ref)**2) / (2 * std_dev_t**2)`` per sample,
``std_dev_t`` as its ``sd3_sde_with_logprob.py`` returns it: ``eta * sqrt(sigma / (1 - sigma~))`` for ``sde`` (no
``sqrt(-dt)``) and ``sigma_next * sin(eta * pi / 2)`` for ``cps``. The formulas below are written from that math.
"""

from __future__ import annotations

import math

import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.pipelines.qwenimage import qwenimage_initial_latents, qwenimage_scheduler
from verl_diffusion_rollout.pipelines.sd3 import sd3_scheduler
from verl_diffusion_rollout.scheduler import FlowMatchSDEDiscreteScheduler
from verl_diffusion_rollout.sde import sde_step_with_logprob
from verl_diffusion_rollout.testing import QWEN_IMAGE_SCHEDULER_CONFIG, SD3_SCHEDULER_CONFIG
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer
from verl_diffusion_rollout.trainer.loss import gaussian_kl
from verl_diffusion_rollout.trainer.replay import StepReplayer, trainable_steps

from test_trainer import compose_tiny

ETA = 0.7


def sd35m_sigmas() -> torch.Tensor:
    """SD3.5-Medium at 512 px, 10 steps: its published scheduler (static shift 3), as the product builds it."""
    template = FlowMatchSDEDiscreteScheduler(**SD3_SCHEDULER_CONFIG)
    return sd3_scheduler(template, 10, image_seq_len=(512 // 16) ** 2, device="cpu")._host_sigmas


def qwenimage_sigmas() -> torch.Tensor:
    """Qwen-Image at 512 px, 10 steps: linspace sigmas with the dynamic shift of its 1024 packed image tokens."""
    tokens = qwenimage_initial_latents([torch.Generator().manual_seed(0)], 64, 512, 512, 8, "cpu").shape[1]
    template = FlowMatchSDEDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    return qwenimage_scheduler(template, 10, image_seq_len=tokens, device="cpu")._host_sigmas


SCHEDULES = {"sd35m": sd35m_sigmas, "qwenimage": qwenimage_sigmas}


def flowgrpo_std_dev_t(sde_type: str, sigma: float, sigma_next: float, sigma_max: float, eta: float) -> float:
    if sde_type == "sde":
        return eta * math.sqrt(sigma / (1 - (sigma_max if sigma == 1 else sigma)))
    return sigma_next * math.sin(eta * math.pi / 2)


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("schedule", sorted(SCHEDULES))
def test_both_kl_conventions_pin_flowgrpos_formula_at_every_trainable_step(schedule, sde_type):
    sigmas = SCHEDULES[schedule]()
    assert sigmas.shape == (11,) and sigmas[0] == 1 and sigmas[-1] == 0
    steps = DiffusionSamplingConfig(num_steps=10, sde_type=sde_type).stochastic_steps()
    assert steps == list(range(9))  # every step but the last
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, 8, generator=g)
    v = torch.randn(3, 16, 8, generator=g)
    v_ref = v + 0.5 * torch.randn(3, 16, 8, generator=g)
    ratios = []
    for i in steps:
        s, s_next, s_max = float(sigmas[i]), float(sigmas[i + 1]), float(sigmas[1])
        kw = dict(sde_type=sde_type, noise_level=ETA, sigma_max=sigmas[1], noise=torch.zeros_like(x))
        pol = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], **kw)
        ref = sde_step_with_logprob(v_ref, x, sigmas[i], sigmas[i + 1], **kw)
        std_t = flowgrpo_std_dev_t(sde_type, s, s_next, s_max, ETA)
        assert pol.std_dev_t.dtype == torch.float32 and pol.std_dev_t.tolist() == pytest.approx([std_t] * 3, rel=1e-6)

        sq = ((pol.prev_sample_mean.double() - ref.prev_sample_mean.double()) ** 2).mean(dim=(1, 2))
        flowgrpo = gaussian_kl(pol.prev_sample_mean, ref.prev_sample_mean, pol.std_dev_t)
        assert flowgrpo.shape == (3,) and torch.all(flowgrpo > 0)
        assert flowgrpo.double().tolist() == pytest.approx((sq / (2 * std_t**2)).tolist(), rel=1e-5)

        exact = gaussian_kl(pol.prev_sample_mean, ref.prev_sample_mean, pol.std_dev)
        ratio = (exact.double() / flowgrpo.double()).tolist()
        assert ratio == pytest.approx([1 / (s - s_next) if sde_type == "sde" else 1.0] * 3, rel=1e-5)
        # "exact" is the KL between the two transition Gaussians (equal variances): log p(mu_p) - log q(mu_p)
        # with the full densities of the product's own log-prob (float32 log-densities of size ~1: abs 1e-6).
        dens = dict(kw, noise=None, prev_sample=pol.prev_sample_mean, log_prob_no_const=False)
        log_p = sde_step_with_logprob(v, x, sigmas[i], sigmas[i + 1], **dens).log_prob.double()
        log_q = sde_step_with_logprob(v_ref, x, sigmas[i], sigmas[i + 1], **dens).log_prob.double()
        assert exact.double().tolist() == pytest.approx((log_p - log_q).tolist(), rel=1e-4, abs=1e-6)
        ratios.append(ratio[0])
    # The README's figures: over the trainable steps the exact KL is 3.7x (step 8) to 25.1x (step 0) FlowGRPO's on
    # SD3.5-M's schedule, 6.1x to 14.1x on Qwen-Image's.
    expected_range = {"sd35m": (3.716, 25.081), "qwenimage": (6.124, 14.078)}[schedule] if sde_type == "sde" else (1, 1)
    assert (min(ratios), max(ratios)) == pytest.approx(expected_range, abs=1e-3)
    if sde_type == "sde":
        assert ratios[0] == max(ratios) and ratios[8] == min(ratios)


def test_ode_steps_have_zero_std_and_zero_kl():
    x, v = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    step = sde_step_with_logprob(v, x, 0.8, 0.6, sde_type="ode")
    assert step.std_dev_t.tolist() == [0.0, 0.0] and step.std_dev.tolist() == [0.0, 0.0]
    kl = gaussian_kl(torch.ones(2, 5), torch.zeros(2, 5), torch.tensor([0.0, 0.5]))
    assert kl.tolist() == [0.0, 2.0]  # a deterministic sample-step contributes 0, not inf
    with pytest.raises(ValueError, match=r"std_dev_t has shape \(3,\), expected \[2\]"):
        gaussian_kl(torch.ones(2, 5), torch.zeros(2, 5), torch.ones(3))


def independent_kl(actor, convention: str) -> float:
    """Mean KL over the last rollout's sample-steps, from a replay with and without the adapters and the std
    written from FlowGRPO's math (``flowgrpo``) or the transition variance (``exact``)."""
    total, count = 0.0, 0
    for batch in actor._batches:
        replayer = StepReplayer(batch, actor.device, actor.dtype, attention=actor.config.rollout.attention_backend)
        for i in trainable_steps(batch):
            with torch.no_grad():
                pol = replayer.step(actor.transformer, i)
                with actor.policy.reference():
                    ref = replayer.step(actor.transformer, i)
            s, s_next, s_max = (batch.all_sigmas[:, j].double() for j in (i, i + 1, 1))
            var = ETA**2 * s / (1 - torch.where(s == 1, s_max, s))
            if convention == "exact":
                var = var * (s - s_next)
            sq = ((pol.prev_sample_mean.double() - ref.prev_sample_mean.double()) ** 2).mean(dim=(1, 2))
            total += float((sq / (2 * var)).sum())
            count += len(batch)
    return total / count


@pytest.mark.parametrize("convention", ["flowgrpo", "exact"])
def test_the_trainers_kl_uses_the_configured_convention(tiny_model_path, tmp_path, convention):
    cfg = FlowGRPOConfig.from_omegaconf(compose_tiny(
        tiny_model_path, tmp_path / "run", "actor_rollout_ref.actor.kl_beta=0.1",
        f"+actor_rollout_ref.actor.kl_convention={convention}", "+algorithm.drop_equal_groups=false",
    ))
    assert cfg.actor.kl_convention == convention and cfg.rollout.sampling.noise_level == ETA
    trainer = FlowGRPOTrainer(cfg)
    try:
        actor = trainer.workers.actor
        # A policy away from its reference (LoRA B != 0), so the KL is not 0.
        g = torch.Generator().manual_seed(1)
        lora = {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in actor.policy.state_dict().items()}
        actor.load_state(lora, None, source="the test")
        metrics = trainer.train_step()
        assert metrics["trained_samples"] == 8 and metrics["logprob_max_abs_diff_pre_update"] == 0.0
        actor.load_state(lora, None, source="the test")  # the policy of the update's first (and only) pass
        assert metrics["kl"] > 0 and metrics["kl"] == pytest.approx(independent_kl(actor, convention), rel=1e-5)
    finally:
        trainer.close()
