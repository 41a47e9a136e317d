"""A larger forward batch (``actor.micro_batch_size``): the rollout samples and the update replays the same larger
batches, so the replay stays exact, and the update equals the smaller batch's up to float32 rounding."""

from __future__ import annotations

import torch

from verl_diffusion_rollout.trainer.actor import MiniBatchPlan
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer

from test_trainer import compose_tiny


def _one_update(tiny_model_path, out_dir, micro: int, advantages: torch.Tensor):
    cfg = FlowGRPOConfig.from_omegaconf(compose_tiny(tiny_model_path, out_dir, f"actor_rollout_ref.actor.micro_batch_size={micro}"))
    trainer = FlowGRPOTrainer(cfg)
    try:
        actor = trainer.workers.actor
        actor.engine.pipe.stochastic_steps_with_grad = True  # the accelerator setting, on the CPU
        prompts, seeds = trainer._draw(1)
        rows = [p for p in prompts for _ in range(cfg.group_size)]
        generated = actor.generate(rows, seeds, step=1)
        sizes = [len(b) for b in actor._batches]
        latents = torch.cat([b.all_latents for b in actor._batches])
        keep = torch.ones(len(seeds), dtype=torch.bool)
        plan = [MiniBatchPlan(forward_batches=list(range(len(sizes))), kept=len(seeds))]
        out = actor.update(advantages, keep, plan)
        lora = {k: v.clone() for k, v in actor.policy.state_dict().items()}
        return sizes, latents, generated, out, lora
    finally:
        trainer.close()


def test_larger_forward_batch_replays_exactly_and_trains_like_the_default(tiny_model_path, tmp_path):
    advantages = torch.tensor([1.0, -0.5, 0.25, 0.75, 0.5, -1.0, 1.5, -0.25])
    small = _one_update(tiny_model_path, tmp_path / "micro4", 4, advantages)
    large = _one_update(tiny_model_path, tmp_path / "micro8", 8, advantages)
    assert small[0] == [4, 4] and large[0] == [8]  # two groups of 4 sampled and replayed as one batch of 8
    for _, _, _, out, _ in (small, large):
        assert out.logprob_max_abs_diff_pre_update == 0.0
    assert small[3].count == large[3].count > 0  # every sample-step of the SDE window trained, in both
    # the same samples (each depends only on its seed), up to the rounding of a different batch shape
    torch.testing.assert_close(large[1], small[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(large[2].rewards, small[2].rewards, rtol=1e-4, atol=1e-5)
    # the same loss, gradient norm and updated LoRA, up to float32 rounding
    assert small[3].sums["policy_loss"] != 0
    for key in ("policy_loss", "ratio", "clipfrac"):
        assert abs(large[3].sums[key] - small[3].sums[key]) <= 1e-5 * max(1.0, abs(small[3].sums[key])), key
    assert abs(large[3].grad_norms[0] - small[3].grad_norms[0]) <= 1e-4 * small[3].grad_norms[0]
    assert small[3].grad_norms[0] > 0
    assert small[4].keys() == large[4].keys()
    # AdamW's first step is lr * g / (|g| + eps), about lr * sign(g): where |g| is near eps, gradient rounding moves
    # an entry by a fraction of lr, so the LoRAs are compared to 1% of one step (lr = 1e-2 in the tiny recipe)
    moved = 0
    for key, value in small[4].items():
        torch.testing.assert_close(large[4][key], value, rtol=0, atol=1e-4)
        moved += int(not torch.equal(value, torch.zeros_like(value)))
    assert moved > 0
