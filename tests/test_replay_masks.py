"""Per-sample SDE masks: batches sampled with different SDE windows, concatenated, replay exactly per sample, and
the update trains each sample on its own stochastic steps."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.contract import RolloutBatch
from verl_diffusion_rollout.trainer.actor import MiniBatchPlan
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer
from verl_diffusion_rollout.trainer.loss import sample_step_weights
from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

from test_trainer import compose_tiny

PROMPT = "a red cat on a mat"


def two_windows(sampling: DiffusionSamplingConfig, seeds: range = range(20)) -> tuple[int, int]:
    """Two window seeds whose random SDE windows differ."""
    first = sampling.stochastic_steps(seeds[0])
    return seeds[0], next(s for s in seeds if sampling.stochastic_steps(s) != first)


@pytest.fixture(scope="module")
def window_rollouts(engine):
    """Pairs of 2-sample rollouts of one prompt with different SDE windows, made once per module."""
    made: dict[tuple[str, str], list[RolloutBatch]] = {}

    def get(sde_type: str, windows: str) -> list[RolloutBatch]:
        if (sde_type, windows) not in made:
            base = DiffusionSamplingConfig(height=64, width=64, num_steps=5, sde_type=sde_type, noise_level=0.7)
            if windows == "explicit":  # sde_window [0, 1] and [2, 3]
                made[sde_type, windows] = [
                    engine.generate([PROMPT], n=2, sampling=base.replace(sde_window=w), seeds=[1, 2])
                    for w in ([0, 1], [2, 3])
                ]
            else:  # the reproduction: one config, random windows drawn from different window seeds
                sampling = base.replace(sde_window_size=2, sde_window_range=[0, 4])
                made[sde_type, windows] = [
                    engine.generate([PROMPT], n=2, sampling=sampling, seeds=[1, 2], window_seed=s)
                    for s in two_windows(sampling)
                ]
        return made[sde_type, windows]

    return get


@pytest.mark.parametrize("sde_type,windows", [("sde", "explicit"), ("sde", "random"), ("cps", "explicit")])
def test_concatenated_rollouts_with_different_windows_replay_exactly(window_rollouts, engine, sde_type, windows):
    parts = window_rollouts(sde_type, windows)
    assert trainable_steps(parts[0]) != trainable_steps(parts[1])
    joined = RolloutBatch.concat(parts)
    assert torch.equal(joined.sde_mask, torch.cat([p.sde_mask for p in parts]))
    union = sorted(set(trainable_steps(parts[0])) | set(trainable_steps(parts[1])))
    assert trainable_steps(joined) == union and len(union) > 2
    if windows == "explicit":
        assert joined.sampling.sde_window == union  # the result says which steps any sample trains on
    with torch.no_grad():
        replayed = compute_log_probs(engine.transformer, joined, range(5))
    # Each sample's deterministic steps replay to exactly 0, its stochastic ones to the rollout's value.
    assert torch.all((joined.rollout_log_probs != 0) == joined.sde_mask)
    assert (replayed - joined.rollout_log_probs).abs().max().item() == 0.0


@pytest.mark.parametrize(
    "change,field",
    [
        (dict(noise_level=0.9), "sampling.noise_level (0.7 vs 0.9)"),
        (dict(sde_type="cps"), "sampling.sde_type ('sde' vs 'cps')"),
        (dict(log_prob_no_const=True), "sampling.log_prob_no_const (False vs True)"),
        (dict(num_steps=6), "sampling.num_steps (5 vs 6)"),
        (dict(guidance_scale=1.0), "sampling.guidance_scale (4.0 vs 1.0)"),
        (dict(batch_cfg=False), "sampling.batch_cfg (True vs False)"),
        (dict(height=128), "sampling.height (64 vs 128)"),
    ],
)
def test_concat_refuses_batches_whose_replay_would_differ_naming_the_field(window_rollouts, change, field):
    batch = window_rollouts("sde", "explicit")[0]
    other = dataclasses.replace(batch, sampling=batch.sampling.replace(**change))
    before = (batch.sampling, other.sampling, batch.sde_mask.clone(), batch.rollout_log_probs.clone())
    with pytest.raises(ValueError, match="batch 1 differs from batch 0 in " + re.escape(field)):
        RolloutBatch.concat([batch, other])
    assert (batch.sampling, other.sampling) == before[:2]
    assert torch.equal(batch.sde_mask, before[2]) and torch.equal(batch.rollout_log_probs, before[3])
    # The same convention spelled differently (None resolves to FlowGRPO's: full Gaussian for sde) is accepted.
    same = dataclasses.replace(batch, sampling=batch.sampling.replace(log_prob_no_const=False))
    assert len(RolloutBatch.concat([batch, same])) == 4


def test_sample_step_weights_are_flowgrpos_for_equal_masks_and_per_sample_otherwise():
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0])
    equal = torch.zeros(4, 6, dtype=torch.bool)
    equal[:, [1, 2, 4]] = True
    w = sample_step_weights(keep, equal, kept=12)
    for i in range(6):  # bit for bit FlowGRPO's (and the previous trainer's) keep / (kept * steps)
        assert torch.equal(w[:, i], keep / (12 * 3) if i in (1, 2, 4) else torch.zeros(4))
    mixed = torch.zeros(4, 6, dtype=torch.bool)
    mixed[0, [0, 1]] = mixed[1, [0, 1]] = True
    mixed[2, [2, 3, 4]] = mixed[3, [4]] = True
    w = sample_step_weights(keep, mixed, kept=12)
    assert torch.all(w[~mixed] == 0)
    # every kept sample carries 1 / kept in total, spread over its own stochastic steps
    assert w.sum(dim=1).tolist() == pytest.approx([1 / 12, 0.0, 1 / 12, 1 / 12], rel=1e-6)
    assert w[2, 2].item() == pytest.approx(1 / 36) and w[3, 4].item() == pytest.approx(1 / 12)


def test_update_trains_each_sample_on_its_own_stochastic_steps(tiny_model_path, tmp_path):
    cfg = FlowGRPOConfig.from_omegaconf(compose_tiny(
        tiny_model_path, tmp_path / "run",
        "actor_rollout_ref.rollout.sampling.sde_window_size=2", "actor_rollout_ref.rollout.sampling.sde_window_range=[0,3]",
    ))
    trainer = FlowGRPOTrainer(cfg)
    try:
        actor = trainer.workers.actor
        assert actor.micro == 4
        rows, seeds = [PROMPT] * 4, [11, 12, 13, 14]
        parts = []
        for step in two_windows(cfg.rollout.sampling, range(1, 20)):
            actor.generate(rows, seeds, step=step)
            parts.append(actor._batches[0])
        # one forward batch whose samples were sampled with two different windows, as a verl trainer may hand over
        mixed = RolloutBatch.concat([parts[0].select([0, 1]), parts[1].select([2, 3])])
        actor._batches = [mixed]
        mask, n_b = mixed.sde_mask, mixed.sde_mask.sum(dim=1)
        assert len(trainable_steps(mixed)) > 2 and n_b.tolist() == [2, 2, 2, 2]

        # The expected gradient, from the definition: each sample's loss averaged over its own stochastic steps.
        advantages = torch.tensor([1.0, -0.5, 0.8, 0.3])
        log_probs = compute_log_probs(actor.transformer, mixed, range(mixed.num_steps))
        ratio = torch.exp(log_probs - mixed.rollout_log_probs)
        loss = (-advantages[:, None] * ratio * mask / (4 * n_b[:, None])).sum()
        loss.backward()
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in actor.policy.params]
        expected_norm = torch.cat([g.flatten() for g in grads]).norm().item()
        for p in actor.policy.params:
            p.grad = None

        keep = torch.ones(4, dtype=torch.bool)
        out = actor.update(advantages, keep, [MiniBatchPlan(forward_batches=[0], kept=4)])
        assert out.logprob_max_abs_diff_pre_update == 0.0
        assert out.count == int(mask.sum()) == 8  # the sample-steps that were stochastic, not 4 x every window step
        assert out.sums["ratio"] == 8.0  # ratio exactly 1 at each of them
        assert out.sums["policy_loss"] == pytest.approx(-(advantages * n_b).sum().item(), rel=1e-6)
        assert expected_norm > 0 and out.grad_norms[0] == pytest.approx(expected_norm, rel=1e-5)
    finally:
        trainer.close()
