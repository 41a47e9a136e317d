"""Training that survives faults: Ctrl-C and SIGKILL at a rollout, an update and a checkpoint write, each followed by a
resume, end with the uninterrupted run's LoRA and AdamW state bit for bit (fp32, CPU); a non-finite update never
reaches a checkpoint and stops the run naming the cause; old checkpoints are pruned; replicas draw distinct
fallback seeds.

Faults land at exact moments: :class:`SignalAt` sends a real signal to this process when the main thread enters a
given function for the n-th time (``sys.setprofile``). SIGKILL runs happen in children of a ``forkserver`` that
imported the trainer once.
"""

from __future__ import annotations

import inspect
import multiprocessing
import os
import signal
import sys
from pathlib import Path

import pytest
import torch

from verl_diffusion_rollout.main_flowgrpo import run
from verl_diffusion_rollout.rollout import DiffusionRollout
from verl_diffusion_rollout.trainer.checkpoint import checkpoint_steps, latest_checkpoint, load_checkpoint
from verl_diffusion_rollout.trainer.config import FlowGRPOConfig
from verl_diffusion_rollout.trainer.flowgrpo import FlowGRPOTrainer, NonFiniteTraining

from test_trainer import compose_tiny

# 3 RL steps; each: 2 forward batches of 4 samples (2 rollout calls), 2 mini-batches (2 optimizer steps), a checkpoint
# (2 safetensors files).
RECIPE = ["trainer.total_steps=3", "trainer.save_freq=1", "trainer.plot_freq=0", "trainer.logger=[file]",
          "actor_rollout_ref.actor.mini_batch_size=4"]
POINTS = {  # moment -> the function whose n-th call the signal is sent at
    "rollout": "verl_diffusion_rollout.rollout:DiffusionRollout.generate_sequences",  # 2 calls per RL step
    "update": "torch.optim:AdamW.step",  # 2 calls per RL step
    "checkpoint": "safetensors.torch:save_file",  # 2 calls per checkpoint (LoRA, trainer-state tensors)
}


def _code(spec: str):
    module, _, qualname = spec.partition(":")
    obj = __import__(module, fromlist=["_"])
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj).__code__


class SignalAt:
    """Send ``signum`` to this process each time the main thread enters ``spec`` for the n-th time, n in ``nths``."""

    def __init__(self, spec: str, nths: int | tuple[int, ...], signum: int):
        self.code, self.signum, self.calls = _code(spec), signum, 0
        self.nths = (nths,) if isinstance(nths, int) else tuple(nths)

    def _hook(self, frame, event, arg):
        if event == "call" and frame.f_code is self.code:
            self.calls += 1
            if self.calls in self.nths:
                if self.calls == max(self.nths):
                    sys.setprofile(None)
                os.kill(os.getpid(), self.signum)

    def __enter__(self):
        sys.setprofile(self._hook)
        return self

    def __exit__(self, *exc):
        sys.setprofile(None)
        return False


def _killed_child(model_path: str, out: str, point: str, nth: int, resumed: bool) -> None:
    resume = [f"trainer.resume_from={out}/checkpoints"] if resumed else []
    with SignalAt(POINTS[point], nth, signal.SIGKILL):
        run(compose_tiny(model_path, out, *RECIPE, *resume))


def assert_same_state(a, b):
    lora_a, _, state_a = load_checkpoint(a)
    lora_b, _, state_b = load_checkpoint(b)
    assert state_a["step"] == state_b["step"]
    assert sorted(lora_a) == sorted(lora_b)
    for key in lora_a:
        assert torch.equal(lora_a[key], lora_b[key]), (a, key)
    opt_a, opt_b = state_a["optimizer"]["state"], state_b["optimizer"]["state"]
    assert sorted(opt_a) == sorted(opt_b) and opt_a
    for index in opt_a:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt_a[index][name], opt_b[index][name]), (a, index, name)


@pytest.fixture(scope="module")
def reference(tiny_model_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    history = run(compose_tiny(tiny_model_path, out, *RECIPE))
    assert sorted(checkpoint_steps(out / "checkpoints")) == [1, 2, 3]
    return out, history


def check_left_checkpoints(out: Path, ref: Path) -> dict[int, Path]:
    left = checkpoint_steps(out / "checkpoints")
    assert left, "the faulted run left no checkpoint"
    for folder in left.values():  # no folder holds another step's state, or a partial one
        assert_same_state(folder, ref / "checkpoints" / folder.name)
    return left


# -- Ctrl-C (a real SIGINT to this process), then resume, four times over ------------------------------------------------


def trainer_for(tiny_model_path, out: Path, *extra: str) -> FlowGRPOTrainer:
    return FlowGRPOTrainer(FlowGRPOConfig.from_omegaconf(compose_tiny(tiny_model_path, out, *RECIPE, *extra)))


def test_ctrl_c_anywhere_then_resume_gives_the_uninterrupted_run(tiny_model_path, tmp_path, reference):
    """One run, Ctrl-C'd and resumed four times; each link resumes from the ``latest`` marker:

    1. in step 2's rollout: step 1 is saved already, nothing is written again;
    2. in step 2's update, between its two optimizer steps (where a checkpoint named step 1 used to get half of
       step 2): the update finishes and step 2 is saved;
    3. twice in step 3's update (at each optimizer step): the update is aborted and rolled back; the live state is
       step 2's exactly and no checkpoint holds any of step 3;
    4. in step 3's checkpoint write: the write finishes.
    Every checkpoint left equals the uninterrupted run's of that step; the last is its final LoRA and AdamW state.
    """
    ref, ref_history = reference
    out = tmp_path / "run"
    resume = (f"trainer.resume_from={out / 'checkpoints'}", "trainer.max_actor_ckpt_to_keep=2")
    links = [  # (resumed, moment, its n-th calls in this link, checkpoints left, step of the live state)
        (False, "rollout", 4, [1], 1),
        (True, "update", 2, [1, 2], 2),
        (True, "update", (1, 2), [1, 2], 2),
        (True, "checkpoint", 2, [2, 3], 3),  # max_actor_ckpt_to_keep=2 prunes step 1
    ]
    for i, (resumed, point, nths, left_steps, live_step) in enumerate(links):
        trainer = trainer_for(tiny_model_path, out, *(resume if resumed else ()))
        try:
            with pytest.raises(KeyboardInterrupt), SignalAt(POINTS[point], nths, signal.SIGINT) as fault:
                trainer.fit()
            assert fault.calls == max(fault.nths), i
            assert trainer.step == live_step, i
            left = check_left_checkpoints(out, ref)
            assert sorted(left) == left_steps, i
            assert latest_checkpoint(out / "checkpoints") == str(left[live_step]), i
            assert not list((out / "checkpoints").glob("*.tmp")), i
            lora, _, state = load_checkpoint(left[live_step])
            live = trainer.workers.state()
            for key in lora:
                assert torch.equal(live["lora"][key], lora[key]), (i, key)
            for index, moments in state["optimizer"]["state"].items():
                for name in ("exp_avg", "exp_avg_sq", "step"):
                    assert torch.equal(live["optimizer"]["state"][index][name], moments[name]), (i, index, name)
            history = list(trainer.history)
        finally:
            trainer.close()
    assert [h["reward_mean"] for h in history] == [h["reward_mean"] for h in ref_history]
    assert_same_state(out / "checkpoints" / "step_000003", ref / "checkpoints" / "step_000003")


# -- SIGKILL: no handler runs; what resume reads must still be whole -----------------------------------------------------


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["verl_diffusion_rollout.trainer.flowgrpo", "test_faults"])
    return ctx


def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(tiny_model_path, tmp_path, reference, forkserver):
    """SIGKILL in step 2's rollout; resumed, killed in step 2's update; resumed, killed inside step 2's checkpoint
    write (its temporary folder is left); resumed to the end: the uninterrupted run's final state."""
    ref, _ = reference
    out = tmp_path / "run"
    for point, nth, resumed in [("rollout", 4, False), ("update", 2, True), ("checkpoint", 2, True)]:
        child = forkserver.Process(target=_killed_child, args=(tiny_model_path, str(out), point, nth, resumed))
        child.start()
        child.join(timeout=300)
        assert child.exitcode == -signal.SIGKILL, point
        left = check_left_checkpoints(out, ref)
        assert sorted(left) == [1], point  # killed inside step 2: its checkpoint, if begun, is a temporary folder
        assert latest_checkpoint(out / "checkpoints") == str(left[1]), point
    assert (out / "checkpoints" / "step_000002.tmp").is_dir()
    history = run(compose_tiny(tiny_model_path, out, *RECIPE, f"trainer.resume_from={out / 'checkpoints'}"))
    assert [h["step"] for h in history] == [1, 2, 3]
    assert not list((out / "checkpoints").glob("*.tmp"))
    assert_same_state(out / "checkpoints" / "step_000003", ref / "checkpoints" / "step_000003")


# -- checkpoint mechanics -------------------------------------------------------------------------------------------------


def _lora(value: float) -> dict[str, torch.Tensor]:
    return {"blocks.0.to_q.lora_A.weight": torch.full((2, 4), value)}


def test_checkpoints_replace_atomically_and_prune_to_max_actor_ckpt_to_keep(tmp_path):
    from peft import LoraConfig

    from verl_diffusion_rollout.trainer.checkpoint import prune_checkpoints, save_checkpoint

    peft = LoraConfig(r=2, lora_alpha=4, target_modules=["to_q"])
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3, 4):
        save_checkpoint(root / f"step_{step:06d}", _lora(step), peft, {"step": step}, keep=2)
    assert sorted(checkpoint_steps(root)) == [3, 4]  # keep=2 keeps two
    assert latest_checkpoint(root) == str(root / "step_000004")
    # a stale temporary folder (a kill mid-write) and an existing folder of the same name: replaced, nothing left over
    (root / "step_000004.tmp").mkdir()
    (root / "step_000004.tmp" / "pytorch_lora_weights.safetensors").write_bytes(b"partial")
    save_checkpoint(root / "step_000004", _lora(40.0), peft, {"step": 4})
    assert torch.equal(load_checkpoint(root)[0]["blocks.0.to_q.lora_A.weight"], torch.full((2, 4), 40.0))
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_000003", "step_000004"]
    # the folder latest names is never pruned, even when it is not among the newest
    (root / "latest").write_text("step_000003")
    assert prune_checkpoints(root, 1) == []
    assert sorted(checkpoint_steps(root)) == [3, 4]
    with pytest.raises(ValueError, match="trainer.max_actor_ckpt_to_keep must be an int >= 1"):
        save_checkpoint(root / "step_000005", _lora(5.0), peft, {"step": 5}, keep=0)
    assert not (root / "step_000005").exists() and latest_checkpoint(root) == str(root / "step_000003")


# -- non-finite updates ---------------------------------------------------------------------------------------------------


def test_non_finite_updates_never_reach_a_checkpoint_and_stop_the_run(tiny_model_path, tmp_path):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteTraining) as failure:
        run(compose_tiny(tiny_model_path, out, *RECIPE, "actor_rollout_ref.actor.lr=1e30",
                         "actor_rollout_ref.actor.max_skipped_steps=2"))
    message = str(failure.value)
    assert "2 updates in a row were discarded" in message and "at step 2" in message
    assert "non-finite updated LoRA" in message and "actor_rollout_ref.actor.max_skipped_steps=2" in message
    last = out / "checkpoints" / "step_000002"
    assert f"trainer.resume_from={last}" in message
    steps = checkpoint_steps(out / "checkpoints")
    assert sorted(steps) == [1, 2]
    for folder in steps.values():  # every checkpoint finite, and still the initial LoRA (B = 0): nothing applied
        lora, _, state = load_checkpoint(folder)
        assert all(torch.isfinite(v).all() for v in lora.values())
        assert all(torch.equal(v, torch.zeros_like(v)) for k, v in lora.items() if "lora_B" in k)
        assert state["optimizer"]["state"] == {}  # AdamW never stepped
        assert [h["skipped_steps"] for h in state["history"]] == list(range(1, state["step"] + 1))


def test_a_nan_reward_names_its_reward_function():
    from verl_diffusion_rollout.trainer.rewards import REWARD_REGISTRY, build_reward, register_reward

    if "nan_for_test" not in REWARD_REGISTRY:
        @register_reward("nan_for_test")
        def _nan(**_):
            return lambda images, prompts: torch.tensor([0.5, float("nan"), 0.1])

    reward = build_reward({"brightness": 1.0, "nan_for_test": 1.0})
    with pytest.raises(ValueError, match=r"reward 'nan_for_test' returned NaN/Inf for 1 of 3 images \(first at index 1"):
        reward(torch.rand(3, 3, 8, 8), ["a", "b", "c"])


# -- replica seeds ----------------------------------------------------------------------------------------------------------


def test_replicas_draw_distinct_fallback_seeds_and_keep_given_ones(tiny_model_path):
    from omegaconf import OmegaConf

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.verl_config import DiffusionRolloutConfig
    from verl_diffusion_rollout.engines.base import fallback_seed

    config = DiffusionRolloutConfig(device="cpu", dtype="float32", seed=5,
                                    sampling=DiffusionSamplingConfig(height=64, width=64, num_steps=2))
    model = OmegaConf.create({"_target_": "verl_diffusion_rollout.verl_config.DiffusionModelConfig", "path": tiny_model_path})
    replicas = [DiffusionRollout(config=config, model_config=model, replica_rank=r) for r in (0, 1)]
    unseeded = [r.engine.generate(["a red cat"], sampling=config.sampling, n=2) for r in replicas]
    assert unseeded[0].seeds.tolist() != unseeded[1].seeds.tolist()
    assert not torch.equal(unseeded[0].responses, unseeded[1].responses)
    seeded = [r.engine.generate(["a red cat"], seeds=[11, 12], sampling=config.sampling, n=2) for r in replicas]
    assert seeded[0].seeds.tolist() == seeded[1].seeds.tolist() == [11, 12]
    assert torch.equal(seeded[0].responses, seeded[1].responses)
    assert fallback_seed(5) == 5  # replica 0 / dp rank 0 keep the configured seed
    assert len({fallback_seed(5, r, d) for r in range(3) for d in range(3)}) == 9
