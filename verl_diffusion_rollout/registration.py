"""Registers the ``diffusion`` rollout with stock verl, without editing verl.

verl (>= 0.9) imports every entry point of the ``verl.plugins`` group on ``import verl``; ours points at this
module, and importing ``verl_diffusion_rollout`` runs it too. :func:`register` is idempotent and only adds
entries to verl's own registries:

* ``verl.workers.rollout.base._ROLLOUT_REGISTRY[("diffusion", "async")]`` -> :class:`~.rollout.DiffusionRollout`
  (what ``get_rollout_class("diffusion", "async")`` returns);
* ``RolloutReplicaRegistry["diffusion"]`` -> :class:`~.replica.DiffusionReplica`;
* the config schemas in Hydra's ConfigStore, and the ``vdr.tiny_model`` (Qwen-Image) and ``vdr.tiny_sd3`` (SD3.5)
  OmegaConf resolvers that the tiny recipes use for their model path (they build the offline tiny model on first
  use).
"""

from __future__ import annotations

ROLLOUT_NAME = "diffusion"
ROLLOUT_CLASS = "verl_diffusion_rollout.rollout.DiffusionRollout"

__all__ = ["ROLLOUT_NAME", "register"]


def _load_replica():
    from .replica import DiffusionReplica

    return DiffusionReplica


def _tiny_model_resolver(cache_dir: str | None = None) -> str:
    from .testing import tiny_qwenimage_path

    return tiny_qwenimage_path(cache_dir or None)


def _tiny_sd3_resolver(cache_dir: str | None = None) -> str:
    from .testing import tiny_sd3_path

    return tiny_sd3_path(cache_dir or None)


def register() -> None:
    """Add the ``diffusion`` rollout and replica to verl's registries (safe to call many times)."""
    from omegaconf import OmegaConf
    from verl.workers.rollout import base
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    base._ROLLOUT_REGISTRY[(ROLLOUT_NAME, "async")] = ROLLOUT_CLASS
    RolloutReplicaRegistry.register(ROLLOUT_NAME, _load_replica)
    if not OmegaConf.has_resolver("vdr.tiny_model"):
        OmegaConf.register_new_resolver("vdr.tiny_model", _tiny_model_resolver)
    if not OmegaConf.has_resolver("vdr.tiny_sd3"):
        OmegaConf.register_new_resolver("vdr.tiny_sd3", _tiny_sd3_resolver)

    from .verl_config import register_configs

    register_configs()


register()
