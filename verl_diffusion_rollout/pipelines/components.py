"""Loading a log-prob pipeline for a role: only the role's components are read from disk.

Each family's pipeline class declares, in one place, which of its diffusers components each role needs
(``ROLE_COMPONENTS``, e.g. Qwen-Image's encoder: ``text_encoder`` and ``tokenizer``). :func:`load_pipeline` passes
``None`` for every other component to diffusers' own ``from_pretrained``, which then never opens their folders; the
monolithic role loads the whole folder as before.

One fact crosses the split: the denoiser draws initial noise in the VAE's latent geometry (its downsampling
factor), so a role that has the transformer but not the VAE reads ``vae/config.json``, a few hundred bytes, and
never the VAE's weights.
"""

from __future__ import annotations

import inspect
import json
import os
from typing import Any

import torch

from ..stages import Role

__all__ = ["role_components", "pipeline_components", "load_pipeline", "loaded_modules"]


def pipeline_components(pipeline_cls: type) -> tuple[str, ...]:
    """The component names of a diffusers pipeline class (its ``__init__`` arguments), in declaration order."""
    return tuple(name for name in inspect.signature(pipeline_cls.__init__).parameters if name != "self")


def role_components(pipeline_cls: type, role: Role) -> tuple[str, ...]:
    """The components ``role`` loads, from the family's ``ROLE_COMPONENTS`` (monolithic: all of them)."""
    declared: dict[Role, tuple[str, ...]] = pipeline_cls.ROLE_COMPONENTS
    if role is Role.MONOLITHIC:
        return tuple(dict.fromkeys(name for names in declared.values() for name in names))
    return declared[role]


def load_pipeline(pipeline_cls: type, model_path: str, role: Role, dtype: torch.dtype) -> Any:
    """``pipeline_cls.from_pretrained(model_path)`` with only ``role``'s components; the others are None.

    Raises ``FileNotFoundError`` naming the role and the folder when a component the role needs is missing.
    """
    if role is Role.MONOLITHIC:
        return pipeline_cls.from_pretrained(model_path, dtype=dtype)
    wanted = role_components(pipeline_cls, role)
    with open(os.path.join(model_path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    for name in wanted:
        folder = os.path.join(model_path, name)
        if index.get(name, [None])[0] is not None and not os.path.isdir(folder):
            raise FileNotFoundError(f"the {role.value} role loads {name!r}, but {folder} does not exist")
    skipped = {name: None for name in pipeline_components(pipeline_cls) if name not in wanted}
    pipe = pipeline_cls.from_pretrained(model_path, dtype=dtype, **skipped)
    if getattr(pipe, "transformer", None) is not None and getattr(pipe, "vae", None) is None:
        config_file = os.path.join(model_path, "vae", "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"the {role.value} role reads the VAE's latent geometry from {config_file} (the config only, never "
                "the VAE's weights), which does not exist"
            )
        with open(config_file, encoding="utf-8") as f:
            pipe.vae_scale_factor = pipeline_cls.vae_scale_factor_from_config(json.load(f))
    return pipe


def loaded_modules(pipe: Any) -> tuple[str, ...]:
    """The components ``pipe`` holds (not None), in the pipeline's declaration order."""
    return tuple(name for name in pipeline_components(type(pipe)) if getattr(pipe, name, None) is not None)
