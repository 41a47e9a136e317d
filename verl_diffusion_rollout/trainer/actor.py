"""One worker's share of FlowGRPO on one device: roll out, score, and update the policy it samples with.

:class:`FlowGRPOActor` holds the registered verl ``diffusion`` rollout (its diffusers engine), the policy trained
in place in that engine's transformer (:class:`~verl_diffusion_rollout.trainer.policy.SharedPolicy`), the
optimizer and the reward runner. The driver (:mod:`verl_diffusion_rollout.trainer.flowgrpo`) gives it whole GRPO
groups to sample and, once advantages are known over every group, the plan of its update. In a multi-worker run
the same object lives inside each :class:`~verl_diffusion_rollout.trainer.worker.FlowGRPOWorker`, and the
gradients are summed across workers before every optimizer step.

Exactness: the rollout samples in forward batches of ``actor.micro_batch_size`` samples and the update replays
exactly those batches through the same module, with autograd enabled in both, so the first pass of the update
reproduces the rollout's log-probs bit for bit. Each sample trains on the steps its ``sde_mask`` marks stochastic,
its loss averaged over them (:func:`~verl_diffusion_rollout.trainer.loss.sample_step_weights`). Gradients of each
forward batch are folded into float64 accumulators, so their sum (over micro-batches and workers) does not depend
on how the batches were spread.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from verl import DataProto

from ..contract import RolloutBatch
from ..pipelines.compile import set_activation_memory_budget
from ..rollout import from_data_proto
from ..sde import to_device_async
from .block_checkpointing import DEFAULT_CHECKPOINT_MEMORY_FRACTION
from .config import FlowGRPOConfig
from .loss import flowgrpo_step_loss, gaussian_kl, sample_step_weights
from .policy import SharedPolicy
from .replay import StepReplayer, trainable_steps
from .rewards import AsyncRewardRunner

__all__ = ["FlowGRPOActor", "GenerateResult", "MiniBatchPlan", "UpdateResult"]

logger = logging.getLogger(__name__)

AllReduce = Callable[[torch.Tensor], None]

# Largest pre-update |replayed - rollout| log-prob accepted as the rollout's own: above it the gap guard recomputes
# the step's old log-probs from a replay (see FlowGRPOActor.update).
LOGPROB_GAP_TOLERANCE = 1e-6


@dataclass
class GenerateResult:
    """What a worker reports after sampling its groups.

    Attributes:
        rewards: ``[N]`` float32, one per sample, in the order the samples were given.
        parts: each reward function's ``[N]`` scores.
        images: ``[K, 3, H, W]`` uint8 of the first ``K`` samples (``K`` as asked; for sample grids), or None.
        timings: ``rollout_s`` (sampling, scoring overlapped), ``reward_s`` (waiting for the last scores).
        weight_version: the rollout weights' version.
    """

    rewards: torch.Tensor
    parts: dict[str, torch.Tensor]
    images: torch.Tensor | None
    timings: dict[str, float]
    weight_version: int


@dataclass
class MiniBatchPlan:
    """This worker's share of one global mini-batch (one optimizer step on every worker).

    Attributes:
        forward_batches: indices of this worker's forward batches (of this step) in the mini-batch.
        kept: samples kept for training in the whole mini-batch, over all workers (the loss normaliser).
    """

    forward_batches: list[int]
    kept: int


@dataclass
class UpdateResult:
    """Sums over this worker's trained sample-steps (the driver adds workers up and divides by ``count``)."""

    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0
    grad_norms: list[float] = field(default_factory=list)
    logprob_max_abs_diff_pre_update: float | None = None
    old_log_probs_recomputed: int = 0  # 1 when the gap guard replaced this step's old log-probs by a replay
    seconds: dict[str, float] = field(default_factory=dict)
    weight_version: int = 0
    skipped: str | None = None  # why the update was discarded (non-finite loss, gradient or LoRA), else None
    recomputed_blocks: int | None = None  # with checkpoint_blocks=auto: the most blocks one update forward recomputed


class FlowGRPOActor:
    """The rollout engine, its transformer trained in place, the optimizer and the reward, on one device.

    Args:
        config: the validated recipe.
        all_reduce: sums a float64 tensor in place over every worker (``None``: a single worker).
        device_mesh: verl's ``("dp", "sp")`` mesh when the transformer is sequence-parallel (the rollout takes its
            ``sp`` group; the replay and the update run on the same module, so they are sequence-parallel too, and
            ``all_reduce`` sums the token shards' gradients with the other groups'); ``None`` otherwise.
    """

    def __init__(self, config: FlowGRPOConfig, all_reduce: AllReduce | None = None, device_mesh: Any = None):
        from peft import LoraConfig
        from verl.workers.rollout.base import get_rollout_class

        self.config = config
        self.all_reduce = all_reduce
        self.micro = config.actor.micro_batch_size
        if config.actor.activation_memory_budget is not None:  # before the engine exists, so before any compile
            set_activation_memory_budget(config.actor.activation_memory_budget)
        rollout_cls = get_rollout_class("diffusion", "async")
        self.rollout = rollout_cls(config=config.rollout, model_config=config.model, device_mesh=device_mesh)
        self.engine = self.rollout.engine
        if not hasattr(self.engine, "attach_trainer"):
            raise ValueError(f"the {type(self.engine).__name__} engine cannot share its transformer with a trainer")
        transformer = self.engine.attach_trainer()
        self.device = next(transformer.parameters()).device
        self.dtype = transformer.dtype
        self.lora_config = LoraConfig(
            r=config.model.lora_rank,
            lora_alpha=config.model.lora_alpha,
            target_modules=list(config.model.target_modules),
            init_lora_weights=True,  # B = 0: the first policy is exactly the base model
        )
        self.policy = SharedPolicy(
            transformer,
            self.lora_config,
            merged=config.rollout.lora.merge,
            gradient_checkpointing=config.actor.gradient_checkpointing,
            checkpoint_blocks=config.actor.checkpoint_blocks,
            checkpoint_memory_fraction=config.actor.checkpoint_memory_fraction or DEFAULT_CHECKPOINT_MEMORY_FRACTION,
            seed=config.trainer.seed,
        )
        self.optimizer = torch.optim.AdamW(
            self.policy.params,
            lr=config.actor.lr,
            betas=tuple(config.actor.adam_betas),
            eps=config.actor.adam_eps,
            weight_decay=config.actor.weight_decay,
        )
        # Gradients of all forward batches of a mini-batch are summed here, in float64 (one flat buffer, so the
        # cross-worker sum is one collective).
        sizes = [p.numel() for p in self.policy.params]
        self._grad_acc = torch.zeros(sum(sizes), dtype=torch.float64, device=self.device)
        self._grad_views = list(torch.split(self._grad_acc, sizes))
        self.reward = AsyncRewardRunner(config.reward.functions, config.reward.options, config.reward.backend)
        self._batches: list[RolloutBatch] = []
        self._step: int | None = None  # the RL step of the last generate, named by the gap guard
        self.last_switch_s = 0.0

    @property
    def transformer(self) -> torch.nn.Module:
        return self.policy.transformer

    # -- rollout --------------------------------------------------------------------------------------------------

    def generate(self, prompts: list[str], seeds: list[int], step: int, num_images: int = 0) -> GenerateResult:
        """Sample one image per ``(prompt, seed)`` (whole groups, consecutive) and score them.

        The samples go through the verl rollout (``generate_sequences``) in forward batches of
        ``actor.micro_batch_size``; each batch is scored in the background while the next one samples. The
        batches are kept for :meth:`update`.
        """
        if len(prompts) != len(seeds) or len(prompts) % self.micro:
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; need equal counts, a multiple of "
                             f"the forward batch {self.micro}")
        start = time.perf_counter()
        self._step = step
        self._batches, futures = [], []
        for lo in range(0, len(prompts), self.micro):
            rows = prompts[lo : lo + self.micro]
            data = DataProto.from_dict(
                tensors={"seeds": torch.tensor(seeds[lo : lo + self.micro], dtype=torch.int64)},
                non_tensors={"raw_prompt": np.array(rows, dtype=object)},
                meta_info={"window_seed": step},
            )
            batch = from_data_proto(self.rollout.generate_sequences(data))
            self._batches.append(batch)
            futures.append(self.reward.submit(batch.responses, rows))
        rollout_s = time.perf_counter() - start
        scores = [f.result() for f in futures]
        reward_s = time.perf_counter() - start - rollout_s
        images = None
        if num_images:
            picked = torch.cat([b.responses for b in self._batches])[:num_images]
            images = (picked.clamp(0, 1) * 255).round().to(torch.uint8)
        return GenerateResult(
            rewards=torch.cat([s[0] for s in scores]).float(),
            parts={k: torch.cat([s[1][k] for s in scores]).float() for k in scores[0][1]},
            images=images,
            timings={"rollout_s": rollout_s, "reward_s": reward_s},
            weight_version=self._batches[0].weight_version,
        )

    def evaluate(self, prompts: list[str], seeds: list[int], num_images: int = 0) -> GenerateResult:
        """Sample one image per ``(prompt, seed)`` deterministically (``sde_type=ode``: no noise after the seed's
        initial latent) with the current policy, in forward batches of up to ``actor.micro_batch_size``, and score
        them. Nothing is kept: the batches of the last :meth:`generate` (which :meth:`update` trains on) stay."""
        if len(prompts) != len(seeds):
            raise ValueError(f"got {len(prompts)} prompts and {len(seeds)} seeds; need one seed per prompt")
        start = time.perf_counter()
        responses, futures = [], []
        for lo in range(0, len(prompts), self.micro):
            rows = prompts[lo : lo + self.micro]
            data = DataProto.from_dict(
                tensors={"seeds": torch.tensor(seeds[lo : lo + self.micro], dtype=torch.int64)},
                non_tensors={"raw_prompt": np.array(rows, dtype=object)},
                meta_info={"sampling": {"sde_type": "ode"}},
            )
            batch = from_data_proto(self.rollout.generate_sequences(data))
            if lo < num_images:
                responses.append(batch.responses[: num_images - lo])
            futures.append(self.reward.submit(batch.responses, rows))
        rollout_s = time.perf_counter() - start
        scores = [f.result() for f in futures]
        images = None
        if num_images and responses:
            images = (torch.cat(responses).clamp(0, 1) * 255).round().to(torch.uint8)
        empty = torch.zeros(0)
        return GenerateResult(
            rewards=torch.cat([s[0] for s in scores]).float() if scores else empty,
            parts={k: torch.cat([s[1][k] for s in scores]).float() for k in scores[0][1]} if scores else {},
            images=images,
            timings={"rollout_s": rollout_s, "reward_s": time.perf_counter() - start - rollout_s},
            weight_version=self.engine.weight_version,
        )

    # -- update ---------------------------------------------------------------------------------------------------

    def update(self, advantages: torch.Tensor, keep: torch.Tensor, plan: list[MiniBatchPlan]) -> UpdateResult:
        """FlowGRPO's update over the batches of the last :meth:`generate`.

        Args:
            advantages: ``[N]`` float32, this worker's samples in generation order.
            keep: ``[N]`` bool, samples that train (groups with equal rewards are dropped).
            plan: one :class:`MiniBatchPlan` per global mini-batch, the same count on every worker.

        Gap guard: the first mini-batch's forwards (before any optimizer step) measure the replay against the
        rollout (``logprob_max_abs_diff_pre_update``). A sample-step off by more than ``LOGPROB_GAP_TOLERANCE``
        takes its replayed log-prob as its old log-prob, and once the gap is known to exceed it (one check, after
        that mini-batch) the actor warns, naming the step and the gap, and recomputes the old log-probs of the
        other forward batches from a replay with the still pre-update weights, so every ratio starts at 1.
        """
        cfg = self.config.actor
        if advantages.shape != (len(self._batches) * self.micro,) or keep.shape != advantages.shape:
            raise ValueError(f"advantages {tuple(advantages.shape)} / keep {tuple(keep.shape)} do not match the "
                             f"{len(self._batches) * self.micro} samples of this worker's rollout")
        # Each forward batch trains its own stochastic steps, and each sample only those it was sampled with.
        steps = [trainable_steps(b) for b in self._batches]
        result = UpdateResult(weight_version=self.engine.weight_version)
        if not any(steps) or not any(p.kept for p in plan):
            return result
        start = time.perf_counter()
        device, micro = self.device, self.micro
        advantages = advantages.to(device, torch.float32)
        keep_f = keep.to(device, torch.float32)
        sums = {k: torch.zeros((), dtype=torch.float64, device=device)
                for k in ("policy_loss", "clipfrac", "approx_kl", "kl", "ratio")}
        max_diff = torch.zeros((), dtype=torch.float32, device=device)
        grad_norms: list[torch.Tensor] = []
        count = 0
        replayers: dict[int, StepReplayer] = {}  # the conditioning of each forward batch, prepared once

        def replayer_for(fb: int) -> StepReplayer:
            if fb not in replayers:
                replayers[fb] = StepReplayer(self._batches[fb], device, self.dtype,
                                             attention=self.config.rollout.attention_backend)
            return replayers[fb]

        old = self._recompute_old_log_probs(steps, replayer_for) if cfg.recompute_old_log_probs else None
        planned = self.policy.checkpointing if self.policy.checkpointing and self.policy.checkpointing.plan else None
        if planned is not None:  # counts of the training forwards only (the rollout's and the replays' forget)
            planned.reset_counts()
        guarded: dict[int, dict[int, torch.Tensor]] = {}  # old log-probs of the first mini-batch, gap-corrected
        pre_update = True  # no optimizer step yet: the policy is the rollout's
        allreduce_s = switch_s = 0.0
        bad_loss = torch.zeros((), dtype=torch.bool, device=device)
        # All or nothing: a non-finite step, an error or an interrupt puts the LoRA and the optimizer back as they were.
        transaction = _UpdateTransaction(self)
        with transaction, self.engine.modify_weights():
            for epoch in range(cfg.ppo_epochs):
                for m, mini in enumerate(plan):
                    if not mini.kept:
                        continue
                    for fb in mini.forward_batches:
                        rows = slice(fb * micro, (fb + 1) * micro)
                        if not bool(keep[rows].any()):
                            continue
                        batch = self._batches[fb]
                        replayer = replayer_for(fb)
                        step_weights = sample_step_weights(keep_f[rows], batch.sde_mask, mini.kept)
                        trained = keep[rows].cpu()[:, None] & batch.sde_mask  # sample-steps in the statistics
                        stat_weights = to_device_async(trained.float(), device)
                        adv = advantages[rows]
                        for i in steps[fb]:
                            weight, sample_weight = stat_weights[:, i], step_weights[:, i]
                            out = replayer.step(self.transformer, i)
                            rollout_lp = to_device_async(batch.rollout_log_probs[:, i], device)
                            old_lp = rollout_lp if old is None else old[fb][i]
                            if pre_update:
                                gap = (out.log_prob.detach() - rollout_lp).abs()
                                max_diff = torch.maximum(max_diff, gap.max())
                                if old is None:  # the guard, per sample-step: no host sync here
                                    old_lp = torch.where(gap > LOGPROB_GAP_TOLERANCE, out.log_prob.detach(), old_lp)
                                    guarded.setdefault(fb, {})[i] = old_lp
                            kl = None
                            if cfg.kl_beta > 0:
                                with torch.no_grad(), self.policy.reference():
                                    ref = replayer.step(self.transformer, i)
                                std = out.std_dev_t if cfg.kl_convention == "flowgrpo" else out.std_dev
                                kl = gaussian_kl(out.prev_sample_mean, ref.prev_sample_mean, std)
                            loss = flowgrpo_step_loss(out.log_prob, old_lp, adv, cfg.clip_range, kl=kl,
                                                      beta=cfg.kl_beta, sample_weight=sample_weight)
                            loss.loss.backward()
                            bad_loss |= ~torch.isfinite(loss.loss.detach())
                            with torch.no_grad():
                                ratio = loss.ratio
                                surrogate = torch.maximum(
                                    -adv * ratio, -adv * ratio.clamp(1 - cfg.clip_range, 1 + cfg.clip_range)
                                )
                                diff = out.log_prob.detach() - old_lp
                                sums["policy_loss"] += (surrogate * weight).sum().double()
                                sums["clipfrac"] += (((ratio - 1).abs() > cfg.clip_range).float() * weight).sum().double()
                                sums["approx_kl"] += (0.5 * diff**2 * weight).sum().double()
                                sums["ratio"] += (ratio * weight).sum().double()
                                if kl is not None:
                                    sums["kl"] += (kl.detach() * weight).sum().double()
                            count += int(trained[:, i].sum())
                        self._fold_grads()
                    if pre_update and old is None and float(max_diff) > LOGPROB_GAP_TOLERANCE:
                        logger.warning(
                            "step %s: the replayed log-probs differ from the rollout's by %.3g before the update "
                            "(> %g); recomputing this step's old log-probs from a replay, so the ratio starts at 1",
                            self._step, float(max_diff), LOGPROB_GAP_TOLERANCE,
                        )
                        rest = [fb for fb in range(len(self._batches)) if fb not in guarded]
                        old = {**self._recompute_old_log_probs(steps, replayer_for, rest), **guarded}
                        result.old_log_probs_recomputed = 1
                    pre_update = False
                    if bool(bad_loss):  # every worker sees it in the summed gradient, and all skip together
                        self._grad_acc.fill_(float("nan"))
                    t0 = time.perf_counter()
                    if self.all_reduce is not None:
                        self.all_reduce(self._grad_acc)
                    allreduce_s += time.perf_counter() - t0
                    for p, acc in zip(self.policy.params, self._grad_views):
                        p.grad = acc.view_as(p).to(p.dtype)
                    grad_norms.append(torch.nn.utils.clip_grad_norm_(self.policy.params, cfg.max_grad_norm))
                    if not bool(torch.isfinite(grad_norms[-1])):
                        what = "loss" if bool(bad_loss) else "gradient"
                        raise _SkipUpdate(f"non-finite {what} (grad norm {float(grad_norms[-1])}) in mini-batch {m}")
                    self.optimizer.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    self._grad_acc.zero_()
                    t0 = time.perf_counter()
                    self.policy.refresh()
                    switch_s += time.perf_counter() - t0
                    bad = first_nonfinite(self.policy)
                    if bad is not None:
                        raise _SkipUpdate(f"non-finite updated LoRA ({bad}) after mini-batch {m}")
        if transaction.skipped is not None:
            logger.warning("update discarded, weights and optimizer unchanged: %s", transaction.skipped)
            result.skipped, grad_norms = transaction.skipped, []
        values = torch.stack([*sums.values(), max_diff.double(), *[g.double() for g in grad_norms]]).tolist()
        result.sums = dict(zip(sums, values[: len(sums)]))
        result.count = count
        result.logprob_max_abs_diff_pre_update = values[len(sums)]
        result.grad_norms = values[len(sums) + 1 :]
        result.seconds = {"train_s": time.perf_counter() - start, "allreduce_s": allreduce_s, "switch_s": switch_s}
        result.weight_version = self.engine.weight_version
        if planned is not None:
            result.recomputed_blocks = max(planned.reset_counts(), default=None)
        return result

    def _fold_grads(self) -> None:
        """Add the gradients of one forward batch to the float64 accumulators and clear them."""
        with torch.no_grad():
            for p, acc in zip(self.policy.params, self._grad_views):
                if p.grad is not None:
                    acc.add_(p.grad.reshape(-1))
                    p.grad = None

    def _recompute_old_log_probs(
        self, steps: list[list[int]], replayer_for: Callable[[int], StepReplayer], batches: list[int] | None = None
    ) -> dict[int, dict[int, torch.Tensor]]:
        """Old log-probs ``{forward batch: {step: [micro] float32}}`` from a replay before the update (autograd on,
        as the update runs, then discarded), of ``batches`` (default: every forward batch of the rollout)."""
        old = {}
        for fb in range(len(self._batches)) if batches is None else batches:
            replayer = replayer_for(fb)
            with torch.enable_grad():
                old[fb] = {i: replayer.step(self.transformer, i).log_prob.detach() for i in steps[fb]}
        return old

    # -- state ----------------------------------------------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        """The LoRA (CPU tensors, peft names) and the optimizer state, for a checkpoint."""
        return {
            "lora": {k: v.cpu() for k, v in self.policy.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
        }

    def load_state(self, lora: dict[str, torch.Tensor], optimizer: dict[str, Any] | None, source: str) -> None:
        """Restore the LoRA (checked against the policy's names and shapes) and the optimizer state, which
        ``load_state_dict`` moves onto the device the parameters train on."""
        with self.engine.modify_weights():
            self.policy.load_state_dict(lora, source=source)
            if optimizer is not None:
                self.optimizer.load_state_dict(optimizer)

    def checksum(self) -> str:
        return self.policy.checksum()

    def close(self) -> None:
        self.reward.close()


class _SkipUpdate(Exception):
    """Raised inside an update whose step would put a non-finite value into the weights."""


class _UpdateTransaction:
    """Snapshot the LoRA and the optimizer state on entry; restore both if the block raises.

    A :class:`_SkipUpdate` is swallowed (its message kept in :attr:`skipped`); anything else (an error, a
    ``KeyboardInterrupt``) propagates after the restore, so the actor never holds a half-applied step.
    """

    def __init__(self, actor: FlowGRPOActor):
        self.actor = actor
        self.skipped: str | None = None

    def __enter__(self) -> _UpdateTransaction:
        # On the host: the copy (LoRA + AdamW moments) costs no accelerator memory, and one transfer per RL step.
        policy, optimizer = self.actor.policy, self.actor.optimizer
        self._params = [p.detach().to("cpu", copy=True) for p in policy.params]
        self._optimizer = _clone_to_cpu(optimizer.state_dict())
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if error is None:
            return False
        actor = self.actor
        with torch.no_grad(), actor.engine.modify_weights():
            for p, saved in zip(actor.policy.params, self._params):
                p.copy_(saved)  # in place: the optimizer and the merged layers keep referring to these tensors
                p.grad = None
            actor.optimizer.load_state_dict(self._optimizer)
            actor._grad_acc.zero_()
            actor.policy.refresh()
        if isinstance(error, _SkipUpdate):
            self.skipped = str(error)
            return True
        return False


def first_nonfinite(policy: SharedPolicy) -> str | None:
    """The name of the first LoRA parameter, or merged weight, holding NaN/Inf; ``None`` when all are finite.

    Unmerged (peft layers), each layer's ``scale * B @ A`` is checked: a LoRA of finite but huge entries whose
    product overflows is caught here rather than in the next rollout.
    """
    named: list[tuple[str, torch.Tensor]] = list(policy.named_params.items())
    for name, layer in policy.layers.items():
        merged = getattr(layer, "merged_weight", None)
        if policy.merged and merged is not None:
            named.append((f"{name} (merged weight)", merged))
        else:
            named += [(f"{name} (scale * B @ A)", layer.get_delta_weight(a)) for a in layer.active_adapters]
    finite = torch.stack([torch.isfinite(t).all() for _, t in named])
    if bool(finite.all()):  # one device sync
        return None
    return named[int((~finite).nonzero()[0])][0]


def _clone_to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {k: _clone_to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_clone_to_cpu(v) for v in value)
    return value


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value
