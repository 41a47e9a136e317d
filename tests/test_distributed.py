"""FlowGRPO on several workers (verl single-controller workers on Ray, CPU processes here, gloo all-reduce).

A sample depends only on its prompt, its seed and the weights, forward batches hold the same samples whatever the
worker count, and gradients are summed in float64: a 2-worker run equals a 1-worker run bit for bit.
"""

from __future__ import annotations

import threading
import time

import pytest
import ray
import torch

from verl_diffusion_rollout.main_flowgrpo import run
from verl_diffusion_rollout.trainer.checkpoint import load_checkpoint

from test_trainer import compose_tiny

# two mini-batches (optimizer steps) per RL step, the first holding only rank 0's samples
STEPS = ["trainer.total_steps=3", "trainer.save_freq=1", "trainer.check_weights_freq=1",
         "actor_rollout_ref.actor.mini_batch_size=4"]
COMPARED = ("reward_mean", "reward_std", "policy_loss", "approx_kl", "ratio_mean", "grad_norm",
            "logprob_max_abs_diff_pre_update", "trained_samples")


@pytest.fixture(scope="module")
def ray_cpu():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def one_worker(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_worker")
    return out, run(compose_tiny(tiny_model_path, out, *STEPS))


def assert_same_checkpoint(a, b):
    lora_a, _, state_a = load_checkpoint(a)
    lora_b, _, state_b = load_checkpoint(b)
    assert sorted(lora_a) == sorted(lora_b)
    for key in lora_a:
        assert torch.equal(lora_a[key], lora_b[key]), key
    for index, moments in state_a["optimizer"]["state"].items():
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(moments[name], state_b["optimizer"]["state"][index][name]), (index, name)


def test_two_workers_equal_one_worker_bit_for_bit(ray_cpu, tiny_model_path, tmp_path, one_worker):
    ref_dir, ref = one_worker
    out = tmp_path / "two"
    two = run(compose_tiny(tiny_model_path, out, *STEPS, "trainer.n_gpus_per_node=2"))
    assert [h["step"] for h in two] == [1, 2, 3]
    for a, b in zip(ref, two):
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key, a[key], b[key])
    for step in (1, 2, 3):  # LoRA and AdamW moments after every step
        assert_same_checkpoint(ref_dir / "checkpoints" / f"step_{step:06d}", out / "checkpoints" / f"step_{step:06d}")
    assert all(h["allreduce_s"] > 0 for h in two)


def test_a_rank_killed_inside_update_stops_the_run_naming_it_and_the_checkpoint_to_resume(ray_cpu, tiny_model_path,
                                                                                          tmp_path, one_worker):
    """Rank 1 is SIGKILLed inside step 2's update, between the gradient all-reduce of its first mini-batch and its
    optimizer step, so rank 0 goes on into the second all-reduce without it. The driver (``ray.wait``) fails on rank
    1 at once, naming it, the phase, the step and the checkpoint to resume from; the resumed run continues the
    uninterrupted one exactly."""
    ref_dir, ref = one_worker
    out = tmp_path / "two"
    overrides = [*STEPS, "trainer.n_gpus_per_node=2"]

    def die_at_the_next_optimizer_step(worker):  # runs inside the rank-1 actor (between two of its calls)
        import os
        import signal

        from torch.optim.optimizer import register_optimizer_step_pre_hook

        def kill(optimizer, args, kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        register_optimizer_step_pre_hook(kill)

    def arm_rank_one_after_step_one():
        marker = out / "checkpoints" / "step_000001" / "pytorch_lora_weights.safetensors"
        deadline = time.monotonic() + 600
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = [a for a in ray.util.list_named_actors(all_namespaces=True) if "FlowGRPOWorker" in a["name"]]
        victim = next(a for a in workers if a["name"].endswith("_0:1"))
        ray.get_actor(victim["name"], namespace=victim["namespace"]).__ray_call__.remote(die_at_the_next_optimizer_step)

    killer = threading.Thread(target=arm_rank_one_after_step_one, daemon=True)
    killer.start()
    start = time.monotonic()
    with pytest.raises(RuntimeError) as failure:
        run(compose_tiny(tiny_model_path, out, *overrides))
    killer.join(timeout=60)
    message = str(failure.value)
    assert "worker 1 failed during update" in message and "at step 2" in message, message
    assert f"trainer.resume_from={out / 'checkpoints' / 'step_000001'}" in message
    assert time.monotonic() - start < 600  # failed on the dead rank, not on a collective timeout of rank 0

    resumed = run(compose_tiny(tiny_model_path, tmp_path / "resumed", *overrides,
                               f"trainer.resume_from={out / 'checkpoints' / 'step_000001'}"))
    assert [h["step"] for h in resumed] == [1, 2, 3]
    for a, b in zip(ref[1:], resumed[1:]):  # the resumed 2-worker run continues the 1-worker run exactly
        for key in COMPARED:
            assert a[key] == b[key], (a["step"], key)
    assert_same_checkpoint(ref_dir / "checkpoints" / "step_000003", tmp_path / "resumed" / "checkpoints" / "step_000003")
