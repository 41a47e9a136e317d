"""``DiffusionRollout``: verl's ``BaseRollout`` for diffusion models (``rollout.name=diffusion``).

verl builds it as it builds any rollout (``get_rollout_class("diffusion", "async")(config=..., model_config=...,
device_mesh=...)``); it wraps one :class:`~verl_diffusion_rollout.engines.DiffusionEngine` in this process.

``generate_sequences`` takes a ``DataProto`` with one row per sample:

* ``non_tensor_batch["raw_prompt"]`` (or ``"prompt"``): the prompt strings;
* optional ``batch["seeds"]`` / ``meta_info["seeds"]``: per-sample seeds (drawn from ``rollout.seed`` otherwise);
* optional ``meta_info["sampling"]``: overrides of ``rollout.sampling`` for this batch (e.g. ``{"noise_level": 0}``
  for validation); ``meta_info["n"]``: repeat every row ``n`` times (default 1: rows already are samples);
  ``meta_info["window_seed"]`` (or ``global_steps``): seed of a random SDE window.

and returns the data contract (:mod:`verl_diffusion_rollout.contract`) as a ``DataProto``: tensors in ``batch``,
``raw_prompt`` (and the input's other per-row fields) in ``non_tensor_batch``, ``weight_version``, ``timing``
and ``sampling`` in ``meta_info``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Generator
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from verl import DataProto
from verl.workers.rollout.base import BaseRollout

from .config import DiffusionSamplingConfig
from .verl_config import DiffusionModelConfig, DiffusionRolloutConfig
from .contract import RolloutBatch
from .engines import DiffusionEngine, get_engine_class
from .engines.base import fallback_seed
from .parallel import SequenceParallel

__all__ = ["DiffusionRollout", "to_data_proto", "from_data_proto", "build_engine"]

logger = logging.getLogger(__name__)

PROMPT_KEYS = ("raw_prompt", "prompt")


def _as_model_config(model_config: Any) -> Any:
    """Let a plain ``{path: ...}`` mapping stand for a :class:`DiffusionModelConfig` (verl needs ``_target_``)."""
    if isinstance(model_config, (dict, DictConfig)) and "_target_" not in model_config:
        values = OmegaConf.to_container(model_config, resolve=True) if isinstance(model_config, DictConfig) else dict(model_config)
        return DiffusionModelConfig(**values)
    return model_config


def build_engine(
    config: DiffusionRolloutConfig,
    model_path: str,
    sequence_parallel: SequenceParallel | None = None,
    replica_rank: int = 0,
    dp_rank: int = 0,
) -> DiffusionEngine:
    """The engine ``config.engine`` names, loaded from ``model_path``; ``sequence_parallel``: the group its
    transformer forwards are split over (the ``diffusers`` engine only). ``replica_rank`` and ``dp_rank`` are folded
    into the seed of its fallback seeds (:func:`~verl_diffusion_rollout.engines.base.fallback_seed`)."""
    engine_cls = get_engine_class(config.engine)
    extra = {}
    if sequence_parallel is not None and sequence_parallel.size > 1:
        if config.engine != "diffusers":
            raise ValueError(
                f"sequence parallelism (a device mesh with an 'sp' axis of size {sequence_parallel.size}) needs "
                f"rollout.engine=diffusers, got {config.engine!r}"
            )
        extra["sequence_parallel"] = sequence_parallel
    return engine_cls(
        model_path,
        device=config.device,
        dtype=config.dtype,
        seed=fallback_seed(config.seed, replica_rank, dp_rank),
        lora=config.lora,
        progress_bar=config.progress_bar,
        compile=config.compile,
        attention_backend=config.attention_backend,
        fast_attention=config.fast_attention,
        **extra,
    )


def to_data_proto(batch: RolloutBatch, extra_non_tensors: dict[str, np.ndarray] | None = None) -> DataProto:
    """A :class:`RolloutBatch` as a verl ``DataProto`` (CPU tensors, prompts as ``raw_prompt``)."""
    non_tensors = {"raw_prompt": np.array(batch.prompts, dtype=object)}
    for key, value in (extra_non_tensors or {}).items():
        non_tensors.setdefault(key, value)
    return DataProto.from_dict(tensors=batch.to_dict(), non_tensors=non_tensors, meta_info=batch.meta())


def from_data_proto(data: DataProto) -> RolloutBatch:
    """Rebuild a :class:`RolloutBatch` from the ``DataProto`` :func:`to_data_proto` made (trainer side)."""
    meta = data.meta_info
    return RolloutBatch.from_dict(
        {k: v for k, v in data.batch.items()},
        prompts=[str(p) for p in data.non_tensor_batch["raw_prompt"]],
        sampling=meta["sampling"],
        weight_version=meta.get("weight_version", 0),
        timings=meta.get("timing"),
        family=meta.get("family"),
    )


class DiffusionRollout(BaseRollout):
    """verl rollout backend for diffusion models, sampling with log-probs through a diffusion engine.

    Args:
        config: a :class:`DiffusionRolloutConfig` (or the DictConfig of ``configs/rollout/diffusion.yaml``).
        model_config: a :class:`DiffusionModelConfig` (or its DictConfig, or a plain ``{"path": ...}``).
        device_mesh: verl's device mesh of this process, or None. With an ``"sp"`` axis of size > 1 the engine's
            transformer runs sequence-parallel over that axis (Ulysses; every rank of it must get the same batches),
            following ``actor_rollout_ref.actor.ulysses_sequence_parallel_size``.
        engine: an already-built engine to wrap instead of loading one (tests, custom engines).
        replica_rank: rank of the replica this rollout belongs to (verl passes it).
    """

    def __init__(
        self,
        config: DiffusionRolloutConfig | DictConfig,
        model_config: DiffusionModelConfig | DictConfig | dict,
        device_mesh: Any = None,
        *args: Any,
        engine: DiffusionEngine | None = None,
        replica_rank: int = 0,
        **kwargs: Any,
    ):
        super().__init__(config, _as_model_config(model_config), device_mesh)
        if not isinstance(self.config, DiffusionRolloutConfig):
            raise TypeError(
                f"rollout config must be a DiffusionRolloutConfig, got {type(self.config).__name__}; use "
                "configs/rollout/diffusion.yaml (its _target_ is verl_diffusion_rollout.verl_config.DiffusionRolloutConfig)"
            )
        if not isinstance(self.model_config, DiffusionModelConfig):
            raise TypeError(
                f"model config must be a DiffusionModelConfig, got {type(self.model_config).__name__}; use "
                "configs/model/qwen_image.yaml (its _target_ is verl_diffusion_rollout.verl_config.DiffusionModelConfig)"
            )
        self.replica_rank = replica_rank
        self.is_leader_rank = True
        dp_rank = 0
        if device_mesh is not None and "dp" in (getattr(device_mesh, "mesh_dim_names", None) or ()):
            dp_rank = device_mesh["dp"].get_local_rank()  # the ranks of one sp group share it, and so their seeds
        self.engine = engine if engine is not None else build_engine(
            self.config, self.model_config.local_path, SequenceParallel.from_mesh(device_mesh),
            replica_rank=replica_rank, dp_rank=dp_rank,
        )

    @property
    def weight_version(self) -> int:
        return self.engine.weight_version

    # -- generation -----------------------------------------------------------------------------------------------

    def generate_sequences(self, prompts: DataProto) -> DataProto:
        """Sample every row of ``prompts`` (see the module docstring) and return the data contract."""
        meta = dict(prompts.meta_info or {})
        key = next((k for k in PROMPT_KEYS if k in prompts.non_tensor_batch), None)
        if key is None:
            raise ValueError(
                f"prompts.non_tensor_batch needs one of {list(PROMPT_KEYS)}, got {sorted(prompts.non_tensor_batch)}"
            )
        texts = [str(p) for p in prompts.non_tensor_batch[key]]
        n = int(meta.get("n", 1))
        seeds = None
        if prompts.batch is not None and "seeds" in prompts.batch.keys():
            seeds = prompts.batch["seeds"].tolist()
        elif meta.get("seeds") is not None:
            seeds = list(meta["seeds"])
        sampling = self.sampling_for(meta.get("sampling"))
        window_seed = meta.get("window_seed", meta.get("global_steps"))
        result = self.engine.generate(
            texts, seeds=seeds, sampling=sampling, n=n, window_seed=None if window_seed is None else int(window_seed)
        )
        extra = {
            k: np.repeat(np.asarray(v, dtype=object), n)
            for k, v in prompts.non_tensor_batch.items()
            if k not in PROMPT_KEYS
        }
        return to_data_proto(result, extra)

    def sampling_for(self, overrides: dict[str, Any] | None) -> DiffusionSamplingConfig:
        """``rollout.sampling`` with a batch's overrides applied (validated; unknown keys raise)."""
        if not overrides:
            return self.config.sampling
        if isinstance(overrides, DictConfig):
            overrides = OmegaConf.to_container(overrides, resolve=True)
        return self.config.sampling.replace(**dict(overrides))

    # -- BaseRollout ------------------------------------------------------------------------------------------------

    async def update_weights(
        self,
        weights: Generator[tuple[str, torch.Tensor], None, None],
        wire_format: str = "named_tensors",
        **kwargs: Any,
    ) -> int:
        """Apply the trainer's weights in memory (LoRA or full), atomically; returns the new weight version.

        ``kwargs`` may carry ``peft_config`` (the trainer's peft ``LoraConfig``: the first LoRA sync creates the
        adapter from it), ``base_sync_done`` and ``global_steps`` as verl passes them.
        """
        if wire_format != "named_tensors":
            raise NotImplementedError(
                f"the diffusion rollout takes wire_format='named_tensors', got {wire_format!r}; use a checkpoint engine "
                "that sends full tensors"
            )
        peft_config = kwargs.get("peft_config")
        return await asyncio.to_thread(self.engine.update_weights, weights, peft_config)

    async def resume(self, tags: list[str]) -> None:
        """``"weights"``: bring the weights back to the accelerator. ``"kv_cache"``: nothing to do (no KV cache)."""
        unknown = [t for t in tags if t not in ("weights", "kv_cache")]
        if unknown:
            raise ValueError(f"unknown resume tags {unknown}; expected 'weights' and/or 'kv_cache'")
        if "weights" in tags:
            await asyncio.to_thread(self.engine.wake_up)

    async def release(self) -> None:
        """Move the weights off the accelerator so a colocated trainer can use it."""
        await asyncio.to_thread(self.engine.sleep)
