"""Log-prob pipelines, one module per model family, looked up by the diffusers pipeline class name.

A checkpoint folder's ``model_index.json`` names its diffusers pipeline class (``"_class_name"``); the registry
maps that name to our log-prob subclass, imported lazily. Every family runs the same denoising loop
(:mod:`.loop`); what differs is a :class:`~.loop.DenoisingFamily`, looked up by the family name a
:class:`~verl_diffusion_rollout.contract.RolloutBatch` carries (:func:`get_family`), so the trainer's replay
dispatches the same way as the rollout.
"""

from __future__ import annotations

import importlib
import json
import os

__all__ = [
    "PIPELINE_REGISTRY",
    "FAMILY_REGISTRY",
    "get_pipeline_class",
    "get_family",
    "pipeline_class_name",
    "register_pipeline",
]

# diffusers class name -> dotted path of our log-prob pipeline
PIPELINE_REGISTRY: dict[str, str] = {
    "QwenImagePipeline": "verl_diffusion_rollout.pipelines.qwenimage.QwenImageLogProbPipeline",
    "StableDiffusion3Pipeline": "verl_diffusion_rollout.pipelines.sd3.StableDiffusion3LogProbPipeline",
}

# family name (RolloutBatch.family) -> dotted path of its DenoisingFamily instance
FAMILY_REGISTRY: dict[str, str] = {
    "qwenimage": "verl_diffusion_rollout.pipelines.qwenimage.QWEN_IMAGE",
    "sd3": "verl_diffusion_rollout.pipelines.sd3.SD3",
}


def register_pipeline(diffusers_class_name: str, dotted_path: str) -> None:
    """Add (or replace) the log-prob pipeline used for a diffusers pipeline class."""
    PIPELINE_REGISTRY[diffusers_class_name] = dotted_path


def get_pipeline_class(diffusers_class_name: str) -> type:
    """Our log-prob pipeline class for a diffusers pipeline class name."""
    if diffusers_class_name not in PIPELINE_REGISTRY:
        raise ValueError(
            f"no log-prob pipeline for diffusers pipeline {diffusers_class_name!r}; "
            f"supported: {sorted(PIPELINE_REGISTRY)}"
        )
    module_name, class_name = PIPELINE_REGISTRY[diffusers_class_name].rsplit(".", 1)
    return getattr(importlib.import_module(module_name), class_name)


def get_family(name: str):
    """The :class:`~.loop.DenoisingFamily` registered under ``name`` (``"qwenimage"``, ``"sd3"``)."""
    if name not in FAMILY_REGISTRY:
        raise ValueError(f"unknown model family {name!r}; supported: {sorted(FAMILY_REGISTRY)}")
    module_name, attr = FAMILY_REGISTRY[name].rsplit(".", 1)
    return getattr(importlib.import_module(module_name), attr)


def pipeline_class_name(model_path: str) -> str:
    """The diffusers pipeline class named by ``model_path/model_index.json``."""
    index = os.path.join(model_path, "model_index.json")
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"model folder {model_path!r} does not exist")
    if not os.path.isfile(index):
        raise ValueError(f"{model_path!r} is not a diffusers model folder (no model_index.json)")
    with open(index, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    if not name:
        raise ValueError(f"{index} has no '_class_name'")
    return name
