"""The FlowGRPO training loop on top of the registered verl ``diffusion`` rollout.

One RL step:

1. pick ``samples_per_step / n`` prompts and a seed per sample (both derived from ``trainer.seed`` and the step,
   so a resumed run repeats an uninterrupted one exactly);
2. roll out through ``get_rollout_class("diffusion")`` (``generate_sequences`` on a ``DataProto``), ``n`` samples
   per prompt, scoring each rollout chunk in the background while the next one samples;
3. per-prompt group advantages; groups with equal rewards are dropped;
4. policy update of the transformer's LoRA: for each stochastic step, replay the recorded transition with
   :class:`~verl_diffusion_rollout.trainer.replay.StepReplayer`, FlowGRPO's clipped-ratio loss (+ optional KL to
   the reference = adapter disabled), backward; AdamW with grad-norm clipping per mini-batch;
5. sync the LoRA to the rollout in memory (``update_weights``), every step.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from verl import DataProto

from ..contract import RolloutBatch
from ..engines.base import MAX_SEED
from ..engines.diffusers_engine import resolve_device, resolve_dtype
from ..pipelines.qwenimage_attention import use_joint_attn_processor
from ..rollout import from_data_proto
from ..visualize import save_curves, save_image_grid
from .advantages import group_advantages
from .checkpoint import load_checkpoint, save_checkpoint
from .config import FlowGRPOConfig
from .loss import flowgrpo_step_loss, gaussian_kl
from .metrics import MetricsLogger
from .replay import StepReplayer, trainable_steps
from .rewards import AsyncRewardRunner

__all__ = ["FlowGRPOTrainer"]

logger = logging.getLogger(__name__)


class FlowGRPOTrainer:
    """FlowGRPO with a peft LoRA on the transformer, rolling out through verl's ``diffusion`` backend."""

    def __init__(self, config: FlowGRPOConfig):
        from diffusers import QwenImageTransformer2DModel
        from peft import LoraConfig
        from verl.workers.rollout.base import get_rollout_class

        self.config = config
        self.out_dir = Path(config.trainer.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prompts = config.data.load_prompts()
        self.reward = AsyncRewardRunner(config.reward.functions, config.reward.options, config.reward.backend)

        # The rollout, built the way verl builds any rollout backend.
        rollout_cls = get_rollout_class("diffusion", "async")
        self.rollout = rollout_cls(config=config.rollout, model_config=config.model, device_mesh=None)

        # The policy: the trainer's own copy of the transformer with a LoRA adapter (the reference = adapter off).
        self.device = resolve_device(config.actor.device)
        dtype = resolve_dtype(config.actor.dtype)
        policy = QwenImageTransformer2DModel.from_pretrained(config.model.local_path, subfolder="transformer", dtype=dtype)
        policy.requires_grad_(False)
        if config.rollout.fast_attention:  # the rollout's kernels, so replay matches it exactly
            use_joint_attn_processor(policy)
        if config.actor.gradient_checkpointing:
            policy.enable_gradient_checkpointing()
        self.peft_config = LoraConfig(
            r=config.model.lora_rank,
            lora_alpha=config.model.lora_alpha,
            target_modules=list(config.model.target_modules),
            init_lora_weights=True,  # B = 0: the first policy is exactly the base model
        )
        torch.manual_seed(config.trainer.seed)
        policy.add_adapter(self.peft_config)
        # Colocated, the policy waits on the host while the rollout samples.
        self.policy = policy.to("cpu" if config.trainer.colocate else self.device)
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            self.params,
            lr=config.actor.lr,
            betas=tuple(config.actor.adam_betas),
            eps=config.actor.adam_eps,
            weight_decay=config.actor.weight_decay,
        )
        self._loop = asyncio.new_event_loop()
        self.step = 0
        self.history: list[dict[str, Any]] = []
        if config.trainer.resume_from:
            self._resume(config.trainer.resume_from)
        self.logger = MetricsLogger(self.out_dir, config.trainer.logger, self.history)

    # -- public -----------------------------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``trainer.total_steps``; returns the metrics history.

        Ctrl-C saves a checkpoint of the state reached before re-raising: interrupted between steps or during the
        rollout, it resumes exactly; interrupted inside a policy update, the saved LoRA has that step's partial update.
        """
        from tqdm.auto import tqdm

        total = self.config.trainer.total_steps
        bar = tqdm(total=total, initial=self.step, desc="FlowGRPO", disable=not self.config.trainer.progress_bar)
        try:
            while self.step < total:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix(self._postfix(metrics), refresh=False)
                if "console" in self.config.trainer.logger and not self.config.trainer.progress_bar:
                    print(f"step {self.step}: " + ", ".join(f"{k}={v}" for k, v in self._postfix(metrics).items()))
        except KeyboardInterrupt:
            path = self.save()
            bar.write(f"interrupted at step {self.step}; checkpoint saved to {path}")
            raise
        finally:
            bar.close()
        self.save()
        self.plot()
        return self.history

    def train_step(self) -> dict[str, Any]:
        """One RL step (rollout -> rewards -> advantages -> update -> sync); returns its metrics."""
        step = self.step + 1
        cfg = self.config
        prompts, seeds = self._draw(step)

        start = time.perf_counter()
        batch, rewards, parts = self._rollout_and_score(prompts, seeds, step)
        rollout_s = time.perf_counter() - start

        group_ids = torch.arange(len(prompts)).repeat_interleave(cfg.group_size)
        adv = group_advantages(
            rewards,
            group_ids,
            global_std=cfg.algorithm.global_std,
            clip_max=cfg.actor.adv_clip_max,
            eps=cfg.algorithm.adv_eps,
            drop_equal_groups=cfg.algorithm.drop_equal_groups,
        )
        start = time.perf_counter()
        with self._policy_turn():
            stats = self.update_policy(batch, adv.advantages, adv.keep)
        train_s = time.perf_counter() - start

        start = time.perf_counter()
        version = self.sync_weights()
        sync_s = time.perf_counter() - start

        self.step = step
        metrics = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
            "zero_std_groups": adv.zero_std_fraction,
            **stats,
            "weight_version": version,
            "rollout_s": rollout_s,
            "train_s": train_s,
            "sync_s": sync_s,
        }
        self.history.append({"step": step, **metrics})
        self.logger.log(step, metrics)
        plot_freq = cfg.trainer.plot_freq
        if plot_freq and step % plot_freq == 0:
            self.plot(batch, rewards)
        if cfg.trainer.save_freq and step % cfg.trainer.save_freq == 0:
            self.save()
        return metrics

    # -- stages -----------------------------------------------------------------------------------------------------

    def _draw(self, step: int) -> tuple[list[str], list[int]]:
        """This step's prompts and per-sample seeds, a function of ``(trainer.seed, step)`` only."""
        rng = np.random.default_rng([self.config.trainer.seed, step])
        k = self.config.prompts_per_step
        replace = k > len(self.prompts)
        idx = rng.choice(len(self.prompts), size=k, replace=replace)
        seeds = rng.integers(0, MAX_SEED, size=k * self.config.group_size).tolist()
        return [self.prompts[i] for i in idx], seeds

    def _rollout_and_score(self, prompts: list[str], seeds: list[int], step: int):
        """Roll out in ``reward.rollout_chunks`` pieces; each piece is scored in the background."""
        n = self.config.group_size
        chunks = self.config.reward.rollout_chunks
        per_chunk = len(prompts) // chunks
        outputs, futures = [], []
        for c in range(chunks):
            chunk_prompts = prompts[c * per_chunk : (c + 1) * per_chunk]
            chunk_seeds = seeds[c * per_chunk * n : (c + 1) * per_chunk * n]
            rows = [p for p in chunk_prompts for _ in range(n)]
            data = DataProto.from_dict(
                tensors={"seeds": torch.tensor(chunk_seeds, dtype=torch.int64)},
                non_tensors={"raw_prompt": np.array(rows, dtype=object)},
                meta_info={"window_seed": step},
            )
            out = self.rollout.generate_sequences(data)
            outputs.append(out)
            futures.append(self.reward.submit(out.batch["responses"], rows))
        results = [f.result() for f in futures]
        rewards = torch.cat([r[0] for r in results])
        parts = {k: torch.cat([r[1][k] for r in results]) for k in results[0][1]}
        batch = RolloutBatch.concat([from_data_proto(out) for out in outputs])
        return batch, rewards, parts

    def update_policy(self, batch, advantages: torch.Tensor, keep: torch.Tensor) -> dict[str, float]:
        """FlowGRPO update over the batch's stochastic steps; returns the mean statistics."""
        cfg = self.config.actor
        steps = trainable_steps(batch)
        kept = torch.nonzero(keep).flatten()
        stats: dict[str, list[float]] = defaultdict(list)
        if len(kept) == 0 or not steps:
            return {"trained_samples": 0}
        mini = cfg.mini_batch_size or len(batch)
        micro = cfg.micro_batch_size or mini
        first_pass_dev = None
        self.policy.train()
        for epoch in range(cfg.ppo_epochs):
            for m0 in range(0, len(kept), mini):
                mini_idx = kept[m0 : m0 + mini]
                self.optimizer.zero_grad(set_to_none=True)
                for u0 in range(0, len(mini_idx), micro):
                    idx = mini_idx[u0 : u0 + micro]
                    sub = batch.select(idx)
                    replayer = StepReplayer(
                        sub, self.device, self.policy.dtype, attention=self.config.rollout.attention_backend
                    )
                    adv = advantages[idx].to(self.device)
                    weight = len(idx) / (len(mini_idx) * len(steps))
                    for i in steps:
                        out = replayer.step(self.policy, i)
                        kl = None
                        if cfg.kl_beta > 0:
                            with torch.no_grad(), self._reference():
                                ref = replayer.step(self.policy, i)
                            kl = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean, out.std_dev)
                        old = sub.rollout_log_probs[:, i].to(self.device)
                        result = flowgrpo_step_loss(out.log_prob, old, adv, cfg.clip_range, kl=kl, beta=cfg.kl_beta)
                        (result.loss * weight).backward()
                        stats["policy_loss"].append(float(result.policy_loss))
                        stats["clipfrac"].append(float(result.clipfrac))
                        stats["approx_kl"].append(float(result.approx_kl))
                        stats["kl"].append(float(result.kl))
                        stats["ratio_mean"].append(float(result.ratio.mean()))
                        if epoch == 0 and m0 == 0:  # before the first optimizer step: rollout == policy
                            dev = float((out.log_prob.detach() - old).abs().max())
                            first_pass_dev = dev if first_pass_dev is None else max(first_pass_dev, dev)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.max_grad_norm)
                stats["grad_norm"].append(float(grad_norm))
                self.optimizer.step()
        self.policy.eval()
        out = {k: float(np.mean(v)) for k, v in stats.items()}
        out["trained_samples"] = int(len(kept))
        out["logprob_max_abs_diff_pre_update"] = first_pass_dev
        return out

    @contextlib.contextmanager
    def _policy_turn(self):
        """With ``trainer.colocate``: the rollout sleeps and the policy comes to the device while training."""
        if not self.config.trainer.colocate:
            yield
            return
        self._loop.run_until_complete(self.rollout.release())
        self.policy.to(self.device)
        try:
            yield
        finally:
            self.policy.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            self._loop.run_until_complete(self.rollout.resume(["weights"]))

    @contextlib.contextmanager
    def _reference(self):
        """The reference policy: the same transformer with its LoRA switched off."""
        self.policy.disable_adapters()
        try:
            yield
        finally:
            self.policy.enable_adapters()

    def lora_state(self) -> dict[str, torch.Tensor]:
        """The policy's LoRA tensors, named as peft's ``get_peft_model_state_dict`` names them."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.policy)

    def sync_weights(self) -> int:
        """Send the LoRA to the rollout in memory (``update_weights``); returns the rollout's weight version."""
        weights = ((name, tensor.detach()) for name, tensor in self.lora_state().items())
        return self._loop.run_until_complete(self.rollout.update_weights(weights, peft_config=self.peft_config))

    # -- outputs ------------------------------------------------------------------------------------------------------

    def save(self) -> str:
        """Checkpoint the LoRA (peft format) and the trainer state under ``checkpoints/step_XXXXXX``."""
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "history": self.history,
            "seed": self.config.trainer.seed,
        }
        path = self.out_dir / "checkpoints" / f"step_{self.step:06d}"
        return save_checkpoint(path, self.lora_state(), self.peft_config, state)

    def _resume(self, path: str) -> None:
        from peft import set_peft_model_state_dict

        lora, _, state = load_checkpoint(path)
        result = set_peft_model_state_dict(self.policy, lora)
        if getattr(result, "unexpected_keys", None):
            raise ValueError(f"checkpoint {path} does not match the LoRA config: unexpected {result.unexpected_keys[:3]}")
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.sync_weights()
        logger.info("resumed from %s at step %d", path, self.step)

    def plot(self, batch=None, rewards: torch.Tensor | None = None) -> None:
        """Reward curve (``reward_curve.png``) and, given a batch, a grid of its images with their rewards."""
        if self.history:
            save_curves(
                {"reward_mean": [h["reward_mean"] for h in self.history]},
                self.out_dir / "reward_curve.png",
                title="FlowGRPO reward (mean ± std over the step's samples)",
                bands={"reward_mean": [h["reward_std"] for h in self.history]},
            )
        if batch is not None and rewards is not None:
            count = min(len(batch), 16)
            captions = [f"{p[:18]} r={float(r):.3f}" for p, r in zip(batch.prompts[:count], rewards[:count])]
            save_image_grid(batch.responses[:count], self.out_dir / f"samples_step_{self.step:06d}.png", captions)

    @staticmethod
    def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
        keys = {
            "reward_mean": "reward",
            "reward_std": "std",
            "clipfrac": "clip",
            "kl": "kl",
            "approx_kl": "akl",
            "sync_s": "sync",
            "rollout_s": "roll",
            "train_s": "train",
        }
        return {short: f"{metrics[k]:.3g}" for k, short in keys.items() if metrics.get(k) is not None}

    def close(self) -> None:
        self.logger.close()
        self.reward.close()
        self._loop.close()
