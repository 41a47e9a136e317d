"""Diffusion engines behind the rollout: one small interface, implementations imported lazily.

``DiffusersEngine`` (embedded default, CPU/GPU) and ``VLLMOmniEngine`` (optional, GPU, ``pip install
verl_diffusion_rollout[vllm-omni]``) are loaded on first access, so importing this package pulls in neither.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import DiffusionEngine, expand_group_request

__all__ = ["DiffusionEngine", "DiffusersEngine", "VLLMOmniEngine", "ENGINE_REGISTRY", "get_engine_class", "expand_group_request"]

# rollout.engine -> dotted path of the engine class
ENGINE_REGISTRY: dict[str, str] = {
    "diffusers": "verl_diffusion_rollout.engines.diffusers_engine.DiffusersEngine",
    "vllm_omni": "verl_diffusion_rollout.engines.vllm_omni_engine.VLLMOmniEngine",
}


def get_engine_class(name: str) -> type[DiffusionEngine]:
    """The engine class for ``rollout.engine``."""
    if name not in ENGINE_REGISTRY:
        raise ValueError(f"unknown engine {name!r}; available: {sorted(ENGINE_REGISTRY)}")
    module_name, class_name = ENGINE_REGISTRY[name].rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def __getattr__(name: str) -> Any:
    if name == "DiffusersEngine":
        return get_engine_class("diffusers")
    if name == "VLLMOmniEngine":
        return get_engine_class("vllm_omni")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
