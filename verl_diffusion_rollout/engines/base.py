"""The ``DiffusionEngine`` interface every engine implements, and the request handling they share."""

from __future__ import annotations

import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch
from ..errors import NonFiniteOutput, RoleMismatch
from ..stages import DenoisedBatch, Role

__all__ = [
    "DiffusionEngine",
    "GroupRequest",
    "expand_group_request",
    "ReadWriteLock",
    "check_finite_batch",
    "fallback_seed",
    "MAX_SEED",
]

MAX_SEED = 2**31 - 1  # seeds stay exact in JSON and fit every generator


def fallback_seed(seed: int, replica_rank: int = 0, dp_rank: int = 0) -> int:
    """The seed of an engine's generator of fallback seeds (used only for requests that bring none).

    ``seed`` itself on replica 0 / data-parallel rank 0; elsewhere a hash of ``(seed, replica_rank, dp_rank)``, so
    replicas serving unseeded requests draw different samples (a GRPO group split over them keeps its variance).
    Seeds that requests give are never changed.
    """
    if replica_rank == 0 and dp_rank == 0:
        return int(seed)
    import hashlib

    digest = hashlib.sha256(f"{int(seed)}/{int(replica_rank)}/{int(dp_rank)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % (MAX_SEED + 1)


@dataclass
class GroupRequest:
    """A request expanded to one entry per sample: prompt ``i`` repeated ``n`` times, consecutively."""

    prompts: list[str]
    seeds: list[int]
    n: int


def expand_group_request(
    prompts: Sequence[str], seeds: Sequence[int] | None, n: int, rng: random.Random
) -> GroupRequest:
    """Validate ``prompts``/``seeds``/``n`` and expand them to per-sample lists.

    ``seeds``, when given, has one entry per sample (``len(prompts) * n``); otherwise fresh seeds are drawn from
    ``rng`` (the engine's seeded generator, so runs are reproducible and successive calls differ).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts must be a non-empty list of strings, got an empty list")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every prompt must be a string, got {bad[0]!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n (samples per prompt) must be an int >= 1, got {n!r}")
    total = len(prompts) * n
    if seeds is None:
        seeds = [rng.randint(0, MAX_SEED) for _ in range(total)]
    else:
        seeds = [int(s) for s in (seeds.tolist() if isinstance(seeds, torch.Tensor) else seeds)]
        if len(seeds) != total:
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts x n={n}; pass {total} seeds")
        out_of_range = [s for s in seeds if not 0 <= s <= MAX_SEED]
        if out_of_range:
            raise ValueError(f"seeds must be in 0..{MAX_SEED}, got {out_of_range[0]}")
    return GroupRequest(prompts=[p for p in prompts for _ in range(n)], seeds=seeds, n=n)


class ReadWriteLock:
    """Many concurrent readers (generations) or one writer (weight sync, sleep), never both; writers first.

    A writer waits only for the readers already inside: from the moment it asks, new readers queue behind it, so
    a steady stream of generations cannot starve a weight update. Not reentrant.

    Args:
        trace: optional ``trace(event)`` called under the lock's own mutex at every state change, with ``event``
            one of ``"read_acquired"``, ``"read_released"``, ``"write_waiting"``, ``"write_acquired"``,
            ``"write_released"``; the calls are therefore totally ordered like the lock's states (tests and
            profiling use it).
    """

    def __init__(self, trace: Callable[[str], None] | None = None) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self._trace = trace

    def _event(self, name: str) -> None:
        if self._trace is not None:
            self._trace(name)

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
            self._event("read_acquired")
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._event("read_released")
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._waiting_writers += 1
            self._event("write_waiting")
            try:
                while self._writer or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = True
            self._event("write_acquired")
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._event("write_released")
                self._cond.notify_all()


def check_finite_batch(batch: RolloutBatch | DenoisedBatch) -> None:
    """Raise :class:`~verl_diffusion_rollout.errors.NonFiniteOutput` if a rollout holds NaN or Inf.

    Checks the log-probs, the images (a denoiser's batch has none) and the final latent: every step feeds the next,
    so a non-finite value anywhere in the trajectory reaches the final latent.
    """
    checks = {"rollout_log_probs": batch.rollout_log_probs}
    if isinstance(batch, RolloutBatch):
        checks["responses (images)"] = batch.responses
    checks["all_latents (final latent)"] = batch.all_latents[:, -1]
    bad = [name for name, tensor in checks.items() if not bool(torch.isfinite(tensor).all())]
    if bad:
        rows = sorted({int(b) for name in bad for b in _nonfinite_rows(checks[name])})
        raise NonFiniteOutput(
            f"the generation produced NaN/Inf in {', '.join(bad)} (samples {rows[:8]}); nothing is returned. "
            "The weights or the sampling values (noise_level, guidance_scale) give a numerically invalid rollout"
        )


def _nonfinite_rows(tensor: torch.Tensor) -> torch.Tensor:
    return (~torch.isfinite(tensor.reshape(tensor.shape[0], -1))).any(dim=1).nonzero().flatten()


class DiffusionEngine(ABC):
    """A diffusion model serving rollouts.

    Engines are thread-safe: generations may run concurrently; a weight update or a sleep waits for them and
    blocks new ones until it is done, so every rollout sees one complete set of weights, reported as
    ``RolloutBatch.weight_version``.
    """

    @property
    @abstractmethod
    def weight_version(self) -> int:
        """Incremented by every successful weight update; 0 for the weights loaded at start."""

    @abstractmethod
    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` images per prompt (``len(prompts) * n`` samples, grouped by prompt).

        ``cancel``, when given, is polled between denoising steps; once it returns True the generation stops with
        :class:`~verl_diffusion_rollout.errors.GenerationCancelled`. Raises
        :class:`~verl_diffusion_rollout.errors.EngineAsleep` while asleep and
        :class:`~verl_diffusion_rollout.errors.NonFiniteOutput` rather than return NaN/Inf.
        """

    @abstractmethod
    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], peft_config: Any = None) -> int:
        """Apply a LoRA or full-weight update atomically; returns the new weight version."""

    @abstractmethod
    def sleep(self) -> None:
        """Release accelerator memory held by the weights (generation raises until :meth:`wake_up`)."""

    @abstractmethod
    def wake_up(self) -> None:
        """Bring the weights back; generation afterwards is bit-identical to before :meth:`sleep`."""

    @property
    def is_sleeping(self) -> bool:
        return False

    @property
    def role(self) -> Role:
        """Which stages the engine serves (:class:`~verl_diffusion_rollout.stages.Role`); engines without roles
        are monolithic."""
        return Role.MONOLITHIC

    @property
    def modules(self) -> tuple[str, ...]:
        """Names of the pipeline components the engine loaded (empty where the engine does not say)."""
        return ()

    @property
    def family(self) -> str | None:
        """The model family served (``"qwenimage"``, ``"sd3"``), where the engine says."""
        return None

    # The stages one at a time (roles); engines that run whole rollouts only refuse them.

    def encode(self, prompts: Sequence[str], sampling: DiffusionSamplingConfig | None = None) -> dict[str, torch.Tensor | None]:
        """The denoising environment of ``prompts``, one row per prompt."""
        raise RoleMismatch(f"the {type(self).__name__} runs whole rollouts only: it serves no separate encode stage")

    def denoise(
        self,
        env: dict[str, torch.Tensor | None],
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> DenoisedBatch:
        """Sample ``n`` per prompt from encoded prompts (no images)."""
        raise RoleMismatch(f"the {type(self).__name__} runs whole rollouts only: it serves no separate denoise stage")

    def decode(self, latents: torch.Tensor, sampling: DiffusionSamplingConfig | None = None) -> torch.Tensor:
        """Images of final latents."""
        raise RoleMismatch(f"the {type(self).__name__} runs whole rollouts only: it serves no separate decode stage")

    def weights_checksum(self, module_names: Sequence[str] | None = None) -> dict[str, str]:
        """SHA-256 (:func:`~verl_diffusion_rollout.serialization.weights_sha256`) of each named module's live
        parameters, every module when ``module_names`` is None; ``"not_found"`` for a name the engine lacks."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its weights for a checksum")

    def close(self) -> None:
        """Free everything the engine holds."""
