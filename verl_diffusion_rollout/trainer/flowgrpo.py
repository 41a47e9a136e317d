"""The FlowGRPO driver: the RL step loop over one or many workers.

One RL step:

1. draw ``samples_per_step / n`` prompts and a seed per sample, both functions of ``(trainer.seed, step)`` only, so
   a resumed run repeats an uninterrupted one and no sample depends on which worker draws it;
2. hand whole GRPO groups to the data-parallel groups of workers (group ``g`` to DP group ``g mod D``; with
   sequence parallelism the S workers of a DP group share every transformer forward); each rolls them out through verl's
   registered ``diffusion`` rollout, in forward batches of ``actor.micro_batch_size``, and scores each batch in the
   background while the next one samples;
3. per-prompt group advantages over all groups (groups with equal rewards are dropped);
4. the update: each worker replays its forward batches through the transformer it sampled with (the same module:
   no weight sync, no copy), FlowGRPO's clipped-ratio loss (+ optional KL to the adapter-off reference), gradients
   summed over workers, AdamW with grad-norm clipping per mini-batch; the merged LoRA weights are re-derived after
   every optimizer step, and the next rollout samples with them.

With one worker everything runs in this process; with more, the workers are verl single-controller workers on Ray
(:mod:`verl_diffusion_rollout.trainer.worker`).

Faults. A step is applied exactly once whatever stops the run: checkpoints are written only between steps, from the
state after a whole step, each step once, atomically (:func:`~.checkpoint.save_checkpoint`). Ctrl-C during an
update lets the update finish and saves that step; a second Ctrl-C aborts it (one worker: the update is rolled
back and the step before is saved under its own name; on Ray nothing is saved, the last checkpoint stands). Ctrl-C
anywhere else saves the last finished step. An update with a non-finite loss, gradient or LoRA is discarded
(``skipped_steps``); ``actor.max_skipped_steps`` in a row stop the run.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf

from ..compile_cache import use_compile_cache
from ..engines.base import MAX_SEED
from ..pipelines import pipeline_class_name
from ..visualize import save_curves, save_image_grid
from .advantages import group_advantages
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import FlowGRPOConfig
from .evaluation import Evaluator
from .metrics import RunLogger
from .workers import WorkerFailed, make_workers

__all__ = ["FlowGRPOTrainer", "NonFiniteTraining"]

logger = logging.getLogger(__name__)

GRID_IMAGES = 16


class NonFiniteTraining(RuntimeError):
    """``actor.max_skipped_steps`` updates in a row were discarded for non-finite values."""


class _DeferredInterrupt:
    """Hold a Ctrl-C (SIGINT) that arrives inside the block until the caller reaches a safe point.

    The first SIGINT is recorded (:attr:`pending`) and the block runs on; :meth:`fire` then delivers it to the
    handler that was installed before. A second SIGINT inside the block is delivered at once. Outside the main
    thread, or when SIGINT is ignored, nothing is deferred.
    """

    def __init__(self, what: str):
        self.what = what
        self.pending = False
        self._previous = None

    def __enter__(self) -> _DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            previous = signal.getsignal(signal.SIGINT)
            if callable(previous):
                self._previous = previous
                signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.pending:  # pressed again: stop now
            self._restore()
            self._previous(signum, frame)
            return
        self.pending = True
        logger.warning("Ctrl-C: finishing the %s first (press Ctrl-C again to abort it)", self.what)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)

    def __exit__(self, *exc) -> bool:
        self._restore()
        return False

    def fire(self) -> None:
        """Deliver the held SIGINT (normally: raise ``KeyboardInterrupt``)."""
        if self.pending and self._previous is not None:
            self.pending = False
            self._previous(signal.SIGINT, None)


class FlowGRPOTrainer:
    """FlowGRPO with a LoRA trained in the rollout's own transformer, on ``trainer.nnodes x n_gpus_per_node`` workers."""

    def __init__(self, config: FlowGRPOConfig):
        from peft import LoraConfig

        self.config = config
        self.out_dir = Path(config.trainer.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.prompts = config.data.load_prompts()
        if config.trainer.resolved_compile_cache_dir:  # before the engines compile (Ray workers inherit the env)
            use_compile_cache(config.trainer.resolved_compile_cache_dir)
        self.peft_config = LoraConfig(
            r=config.model.lora_rank,
            lora_alpha=config.model.lora_alpha,
            target_modules=list(config.model.target_modules),
        )
        self.workers = make_workers(config)
        self.world_size = self.workers.world_size
        self.dp_size = config.dp_size  # requests and results: one per data-parallel group
        self.step = 0
        self.history: list[dict[str, Any]] = []
        self.saved_step: int | None = None  # the step the last checkpoint written (or resumed from) holds
        self.skipped_steps = 0  # discarded updates, in all
        self.skipped_in_a_row = 0
        self._in_update = False  # an update is running on the workers (their state is not a step's)
        self.evaluator = Evaluator(config, self.out_dir)
        sums = self.workers.checksums()
        if len(set(sums)) != 1:
            raise RuntimeError(f"workers start from different LoRA weights (checksums {sums})")
        if config.trainer.resume_from:
            self._resume(config.trainer.resume_from)
        run = config.trainer
        plain = OmegaConf.to_container(config.raw, resolve=True) if config.raw is not None else None
        self.logger = RunLogger(self.out_dir, run.logger, run.project_name, run.experiment_name, plain, self.history)

    # -- public -----------------------------------------------------------------------------------------------------

    def fit(self) -> list[dict[str, Any]]:
        """Train until ``trainer.total_steps``; returns the metrics history.

        Ctrl-C saves a checkpoint of the last finished step (once) before re-raising; inside an update it lets the
        update finish first (see the module docstring). A worker that dies stops the run with an error naming it,
        the phase, the step and the checkpoint to resume from.
        """
        from tqdm.auto import tqdm

        total = self.config.trainer.total_steps
        bar = tqdm(total=total, initial=self.step, desc="FlowGRPO", disable=not self.config.trainer.progress_bar)
        try:
            if self.step < total and self.evaluator.due_before_train(self.step):
                self.logger.log(self.step, self.evaluate())
            while self.step < total:
                metrics = self.train_step()
                bar.update(1)
                bar.set_postfix(self._postfix(metrics), refresh=False)
        except KeyboardInterrupt:
            if self._in_update and not self.workers.rolls_back_interrupted_update:
                bar.write(f"interrupted inside the update of step {self.step + 1}; nothing saved. "
                          f"{self._resume_hint()}")
            else:
                self._in_update = False
                path = self.save()
                bar.write(f"interrupted after step {self.step}; checkpoint {path}")
            raise
        except WorkerFailed as err:
            raise RuntimeError(f"{err} (at step {self.step + 1}); {self._resume_hint()}") from err
        finally:
            bar.close()
        self.save()
        self.plot()
        return self.history

    def _resume_hint(self) -> str:
        last = latest_checkpoint(self.out_dir / "checkpoints")
        if last is None:
            return "last good checkpoint: None; no checkpoint was saved yet"
        return f"last good checkpoint: {last}; resume with trainer.resume_from={last}"

    def train_step(self) -> dict[str, Any]:
        """One RL step (rollout -> rewards -> advantages -> update); returns its metrics."""
        step = self.step + 1
        cfg = self.config
        n, world = cfg.group_size, self.world_size
        start = time.perf_counter()
        prompts, seeds = self._draw(step)
        groups = len(prompts)
        owned = self._assign(groups)
        plot = bool(cfg.trainer.plot_freq) and step % cfg.trainer.plot_freq == 0
        requests = [
            {
                "prompts": [prompts[g] for g in gs for _ in range(n)],
                "seeds": [seeds[g * n + j] for g in gs for j in range(n)],
                "step": step,
                "num_images": min(GRID_IMAGES, len(gs) * n) if plot else 0,
            }
            for gs in owned
        ]
        results = self.workers.generate(requests)
        rollout_s = time.perf_counter() - start

        # Back to the global sample order (group after group).
        order = torch.tensor([g * n + j for gs in owned for g in gs for j in range(n)])
        rewards = torch.empty(groups * n)
        rewards[order] = torch.cat([r.rewards for r in results])
        parts = {}
        for key in results[0].parts:
            parts[key] = torch.empty(groups * n)
            parts[key][order] = torch.cat([r.parts[key] for r in results])
        group_ids = torch.arange(groups).repeat_interleave(n)
        adv = group_advantages(
            rewards,
            group_ids,
            global_std=cfg.algorithm.global_std,
            clip_max=cfg.actor.adv_clip_max,
            eps=cfg.algorithm.adv_eps,
            drop_equal_groups=cfg.algorithm.drop_equal_groups,
        )

        # The update and its commit (the step counter, the history) are one unit for Ctrl-C.
        with _DeferredInterrupt(f"update of step {step}") as interrupt:
            update_start = time.perf_counter()
            self._in_update = True
            updates = self.workers.update(self._update_requests(owned, adv.advantages, adv.keep))
            train_s = time.perf_counter() - update_start
            metrics = self._commit(step, updates, rewards, parts, adv, start, rollout_s, train_s, results, groups)
        interrupt.fire()
        if plot:
            self._plot_samples(results, owned, rewards, prompts)
        if cfg.trainer.save_freq and step % cfg.trainer.save_freq == 0:
            self.save()
        if world > 1 and cfg.trainer.check_weights_freq and step % cfg.trainer.check_weights_freq == 0:
            self.check_weights()
        if self.skipped_in_a_row >= cfg.actor.max_skipped_steps:
            raise NonFiniteTraining(
                f"{self.skipped_in_a_row} updates in a row were discarded (actor_rollout_ref.actor.max_skipped_steps="
                f"{cfg.actor.max_skipped_steps}); the last, at step {step}: {updates[0].skipped}. The weights are "
                f"those of the last good update; lower actor_rollout_ref.actor.lr or check the rewards; "
                f"{self._resume_hint()}"
            )
        return metrics

    def _commit(self, step, updates, rewards, parts, adv, start, rollout_s, train_s, results, groups) -> dict[str, Any]:
        """Record a finished step: the step counter, skipped-update bookkeeping, metrics and history."""
        n, world = self.config.group_size, self.world_size
        self.step = step
        self._in_update = False
        skipped = updates[0].skipped
        if skipped is not None:
            self.skipped_steps += 1
            self.skipped_in_a_row += 1
            logger.warning("step %d: update skipped (%d in a row): %s", step, self.skipped_in_a_row, skipped)
        else:
            self.skipped_in_a_row = 0
        step_s = time.perf_counter() - start
        count = sum(u.count for u in updates)
        metrics: dict[str, Any] = {
            "reward_mean": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            **{f"reward/{k}": float(v.mean()) for k, v in parts.items()},
            "zero_std_groups": adv.zero_std_fraction,
            "trained_samples": int(adv.keep.sum()),
        }
        if count and skipped is None:
            for key in ("policy_loss", "clipfrac", "approx_kl", "kl", "ratio"):
                metrics["ratio_mean" if key == "ratio" else key] = sum(u.sums[key] for u in updates) / count
            metrics["grad_norm"] = float(np.mean(updates[0].grad_norms))
            metrics["logprob_max_abs_diff_pre_update"] = max(u.logprob_max_abs_diff_pre_update for u in updates)
            metrics["old_log_probs_recomputed"] = sum(u.old_log_probs_recomputed for u in updates)  # the gap guard
            planned = [u.recomputed_blocks for u in updates if u.recomputed_blocks is not None]
            if planned:  # checkpoint_blocks=auto: the most blocks any worker's update forward recomputed
                metrics["recomputed_blocks"] = max(planned)
        metrics.update(
            weight_version=updates[0].weight_version,
            rollout_s=rollout_s,
            reward_s=float(np.mean([r.timings["reward_s"] for r in results])),
            train_s=train_s,
            switch_s=float(np.mean([u.seconds.get("switch_s", 0.0) for u in updates])),
            allreduce_s=float(np.mean([u.seconds.get("allreduce_s", 0.0) for u in updates])),
            step_s=step_s,
            images_per_s_per_worker=groups * n / step_s / world,
            skipped_steps=self.skipped_steps,
        )
        entry = {"step": step, **metrics}
        self.history.append(entry)  # before the evaluation: a second Ctrl-C there still leaves a whole history
        if self.evaluator.due(step):
            val = self.evaluate(step)
            metrics.update(val)
            entry.update(val)
        self.logger.log(step, metrics)
        return metrics

    def check_weights(self) -> None:
        """Fail loudly if the workers' LoRA weights are not bit-identical."""
        sums = self.workers.checksums()
        if len(set(sums)) != 1:
            raise RuntimeError(f"after step {self.step} the workers' LoRA weights differ: checksums by rank {sums}")

    def evaluate(self, step: int | None = None) -> dict[str, float]:
        """Score the held-out prompts with the current policy (:class:`~.evaluation.Evaluator`); returns the
        ``val/`` metrics."""
        return self.evaluator.run(self.workers, self.step if step is None else step)

    # -- stages -----------------------------------------------------------------------------------------------------

    def _draw(self, step: int) -> tuple[list[str], list[int]]:
        """This step's prompts (one per group) and per-sample seeds, a function of ``(trainer.seed, step)`` only."""
        rng = np.random.default_rng([self.config.trainer.seed, step])
        k = self.config.prompts_per_step
        idx = rng.choice(len(self.prompts), size=k, replace=k > len(self.prompts))
        seeds = rng.integers(0, MAX_SEED, size=k * self.config.group_size).tolist()
        return [self.prompts[i] for i in idx], seeds

    def _assign(self, groups: int) -> list[list[int]]:
        """The groups each data-parallel group samples and trains: units of ``max(n, micro_batch_size)`` samples (one
        group, or one forward batch of whole groups) dealt round-robin, unit ``u`` to DP group ``u mod D``."""
        per_unit = max(1, self.config.actor.micro_batch_size // self.config.group_size)
        units = groups // per_unit
        return [[u * per_unit + k for u in range(w, units, self.dp_size) for k in range(per_unit)]
                for w in range(self.dp_size)]

    def _update_requests(self, owned: list[list[int]], advantages: torch.Tensor, keep: torch.Tensor) -> list[dict]:
        """Each data-parallel group's advantages, keep mask and mini-batch plan (in its own sample order).

        Global mini-batch ``m`` holds samples ``m * mini .. (m + 1) * mini - 1``; a worker trains its forward
        batches in it, and every worker takes the optimizer step after it.
        """
        cfg = self.config
        n, micro, mini = cfg.group_size, cfg.actor.micro_batch_size, cfg.actor.mini_batch_size
        num_minis = len(keep) // mini
        kept = [int(keep[m * mini : (m + 1) * mini].sum()) for m in range(num_minis)]
        requests = []
        for gs in owned:
            rows = torch.tensor([g * n + j for g in gs for j in range(n)], dtype=torch.long)
            # forward batch f of this worker covers its local samples f * micro .. (f + 1) * micro - 1
            first_row = rows[::micro]
            plan = [{"forward_batches": [f for f, r in enumerate(first_row.tolist()) if r // mini == m],
                     "kept": kept[m]} for m in range(num_minis)]
            requests.append({"advantages": advantages[rows].float(), "keep": keep[rows].bool(), "plan": plan})
        return requests

    # -- checkpoints ------------------------------------------------------------------------------------------------

    def save(self) -> str:
        """Checkpoint the LoRA (diffusers' LoRA format), the optimizer and the metrics under ``checkpoints/step_XXXXXX``.

        Once per step (a step already saved, or resumed from, is not written again); Ctrl-C waits for the write.
        """
        path = self.out_dir / "checkpoints" / f"step_{self.step:06d}"
        if self.saved_step == self.step:
            return str(path)
        with _DeferredInterrupt(f"checkpoint of step {self.step}") as interrupt:
            state = self.workers.state()
            trainer_state = {
                "step": self.step,
                "optimizer": state["optimizer"],
                "history": self.history,
                "seed": self.config.trainer.seed,
                "val_history": self.evaluator.history,
                "skipped_steps": self.skipped_steps,
                "skipped_in_a_row": self.skipped_in_a_row,
            }
            save_checkpoint(path, state["lora"], self.peft_config, trainer_state,
                            pipeline_class=pipeline_class_name(self.config.model.local_path),
                            keep=self.config.trainer.max_actor_ckpt_to_keep)
            self.saved_step = self.step
        interrupt.fire()
        return str(path)

    def _resume(self, path: str) -> None:
        lora, _, state = load_checkpoint(path)
        self.workers.load_state(lora, state["optimizer"], source=f"checkpoint {path}")
        self.step = int(state["step"])
        self.history = list(state["history"])
        self.evaluator.history = list(state.get("val_history", []))  # checkpoints from before evaluation have none
        self.skipped_steps = int(state.get("skipped_steps", 0))
        self.skipped_in_a_row = int(state.get("skipped_in_a_row", 0))
        if Path(path).resolve().parent == (self.out_dir / "checkpoints").resolve() or (
            Path(path).resolve() == (self.out_dir / "checkpoints").resolve()
        ):
            self.saved_step = self.step  # this step's checkpoint is already in this run's folder
        logger.info("resumed from %s at step %d", path, self.step)

    # -- outputs ------------------------------------------------------------------------------------------------------

    def plot(self) -> None:
        """The reward curve (``reward_curve.png``)."""
        if self.history:
            save_curves(
                {"reward_mean": [h["reward_mean"] for h in self.history]},
                self.out_dir / "reward_curve.png",
                title="FlowGRPO reward (mean ± std over the step's samples)",
                bands={"reward_mean": [h["reward_std"] for h in self.history]},
            )

    def _plot_samples(self, results, owned, rewards: torch.Tensor, prompts: list[str]) -> None:
        """A grid of the step's first samples (global order) with their rewards; and the reward curve."""
        n = self.config.group_size
        found: dict[int, torch.Tensor] = {}
        for result, gs in zip(results, owned):
            if result.images is None:
                continue
            for k, image in enumerate(result.images):
                found[gs[k // n] * n + k % n] = image
        index = sorted(found)[:GRID_IMAGES]
        if index:
            images = torch.stack([found[i] for i in index]).float() / 255
            captions = [f"{prompts[i // n][:18]} r={float(rewards[i]):.3f}" for i in index]
            save_image_grid(images, self.out_dir / f"samples_step_{self.step:06d}.png", captions)
        self.plot()

    @staticmethod
    def _postfix(metrics: dict[str, Any]) -> dict[str, str]:
        keys = {
            "reward_mean": "reward",
            "reward_std": "std",
            "clipfrac": "clip",
            "kl": "kl",
            "approx_kl": "akl",
            "rollout_s": "roll",
            "train_s": "train",
            "switch_s": "switch",
        }
        return {short: f"{metrics[k]:.3g}" for k, short in keys.items() if metrics.get(k) is not None}

    def close(self) -> None:
        self.logger.close()
        self.workers.close()
