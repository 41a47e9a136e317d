"""Evaluation on held-out prompts: deterministic ODE samples with fixed seeds, scored by the recipe's rewards.

verl's keys: ``data.val_prompts`` / ``data.val_files`` (the prompts), ``trainer.test_freq`` (every that many steps and
at the last step; ``<= 0``: never), ``trainer.val_before_train`` (once before the first step),
``trainer.log_val_generations`` (images in each evaluation's grid).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from ..visualize import save_curves, save_image_grid
from .config import FlowGRPOConfig

__all__ = ["Evaluator"]


class Evaluator:
    """The held-out prompts of a run, when to score them, and the record of every evaluation so far.

    Prompt ``i`` is sampled with seed ``i`` and ``sde_type=ode`` (no noise after the seed's initial latent), so two
    evaluations of the same LoRA give identical metrics; sampling for an evaluation changes no weight, no RNG and
    no rollout batch of the training step. ``history``: one ``{"step": s, "val/...": ...}`` per evaluation (saved in
    checkpoints).
    """

    def __init__(self, config: FlowGRPOConfig, out_dir: str | os.PathLike):
        self.prompts = config.data.load_val_prompts()
        self.run_config = config.trainer
        self.dp_size = config.dp_size
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, Any]] = []

    def due(self, step: int) -> bool:
        """verl's rule: every ``trainer.test_freq`` steps and at the last step, when ``test_freq > 0``."""
        freq = self.run_config.test_freq
        return bool(self.prompts) and freq > 0 and (step % freq == 0 or step == self.run_config.total_steps)

    def due_before_train(self, step: int) -> bool:
        """``trainer.val_before_train``, unless this step was already evaluated (a resumed run)."""
        return bool(self.prompts) and self.run_config.val_before_train and all(v["step"] != step for v in self.history)

    def run(self, workers: Any, step: int) -> dict[str, float]:
        """Sample and score every held-out prompt on ``workers`` (prompt ``i`` on data-parallel group
        ``i mod D``); returns ``val/reward_mean``, ``val/reward_std`` and ``val/<reward>``; saves
        ``val_step_XXXXXX.png`` and ``val_reward_curve.png``."""
        prompts, k = self.prompts, self.run_config.log_val_generations
        if not prompts:
            raise ValueError("no held-out prompts: set data.val_prompts (a list) or data.val_files")
        owned = [list(range(len(prompts)))[d :: self.dp_size] for d in range(self.dp_size)]
        requests = [{"prompts": [prompts[i] for i in idx], "seeds": list(idx),
                     "num_images": sum(1 for i in idx if i < k)} for idx in owned]
        results = workers.evaluate(requests)
        order = torch.tensor([i for idx in owned for i in idx])
        rewards = torch.empty(len(prompts))
        rewards[order] = torch.cat([r.rewards for r in results])
        metrics = {"val/reward_mean": float(rewards.mean()), "val/reward_std": float(rewards.std(unbiased=False))}
        for key in results[0].parts:
            part = torch.empty(len(prompts))
            part[order] = torch.cat([r.parts[key] for r in results if key in r.parts])  # a group may get none
            metrics[f"val/{key}"] = float(part.mean())
        self.history = [v for v in self.history if v["step"] != step] + [{"step": step, **metrics}]
        if k:
            images = {i: img for r, idx in zip(results, owned) if r.images is not None for i, img in zip(idx, r.images)}
            index = sorted(images)[:k]
            captions = [f"{prompts[i][:18]} r={float(rewards[i]):.3f}" for i in index]
            save_image_grid(torch.stack([images[i] for i in index]).float() / 255,
                            self.out_dir / f"val_step_{step:06d}.png", captions)
        save_curves({"val/reward_mean": [v["val/reward_mean"] for v in self.history]},
                    self.out_dir / "val_reward_curve.png", title="held-out reward (ODE, fixed seeds)",
                    steps=[v["step"] for v in self.history])
        return metrics
