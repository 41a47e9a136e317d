"""The HTTP bodies the role endpoints take, shared by the server and :class:`~verl_diffusion_rollout.roles.DisaggregatedClient`.

Tensors travel as ``{"dtype", "shape", "data": base64}`` objects (:mod:`verl_diffusion_rollout.serialization`):
exact in every dtype, bfloat16 included.

* ``POST /rollout/encode`` (:class:`EncodeRequest`) answers ``{"family", "prompts", "sampling", "env": {key:
  tensor [P, ...]}, "timing"}``: one row per prompt under the contract's keys.
* ``POST /rollout/generate`` on a denoiser (:class:`EmbeddingsGenerateRequest`) answers what a monolithic generate
  answers, minus each sample's ``image``, plus its ``final_latent`` and the batch's ``family``.
* ``POST /rollout/decode`` (:class:`DecodeRequest`) answers ``{"images": tensor [B, 3, H, W], "timing"}``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from .contract import ENV_KEYS
from .serialization import tensor_from_json, tensor_to_json

__all__ = [
    "EncodeRequest",
    "GenerateRequest",
    "EmbeddingsGenerateRequest",
    "DecodeRequest",
    "env_to_json",
    "env_from_json",
    "stack_entries",
]


class EncodeRequest(BaseModel):
    """Body of ``POST /rollout/encode``: the prompts to encode (one row each) and the sampling values that shape the
    text (``max_sequence_length``, ``guidance_scale`` > 1 adds the negative prompt's rows)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]
    sampling: dict[str, Any] = Field(default_factory=dict)


class GenerateRequest(BaseModel):
    """Body of ``POST /rollout/generate`` on a monolithic server (strict types: ``"false"`` is not a boolean, ``"3"``
    not an int)."""

    model_config = ConfigDict(extra="forbid")

    prompts: list[StrictStr]
    seeds: list[StrictInt] | None = None
    n: StrictInt = Field(1, ge=1)
    sampling: dict[str, Any] = Field(default_factory=dict)
    window_seed: StrictInt | None = None
    return_env: StrictBool = True
    return_trajectory: StrictBool = True
    return_debug: StrictBool = False


class EmbeddingsGenerateRequest(GenerateRequest):
    """Body of ``POST /rollout/generate`` on a denoiser: ``env`` holds one row per prompt (an encoder's answer),
    ``prompts`` labels the rows; the rest as in a monolithic :class:`GenerateRequest`."""

    env: dict[str, Any]


class DecodeRequest(BaseModel):
    """Body of ``POST /rollout/decode``: final latents ``[B, ...]`` float32 (a denoiser's ``final_latent`` rows) and
    the sampling values of the image size."""

    model_config = ConfigDict(extra="forbid")

    latents: dict[str, Any]
    sampling: dict[str, Any] = Field(default_factory=dict)


def env_to_json(env: Mapping[str, torch.Tensor | None]) -> dict[str, Any]:
    """The present entries of a denoising environment as tensor objects."""
    return {key: tensor_to_json(value) for key, value in env.items() if value is not None}


def env_from_json(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`env_to_json`; ``ValueError`` naming an unknown key or a malformed tensor."""
    unknown = sorted(set(obj) - set(ENV_KEYS))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in 'env'; known: {sorted(ENV_KEYS)}")
    out = {}
    for key, value in obj.items():
        try:
            out[key] = tensor_from_json(value)
        except ValueError as err:
            raise ValueError(f"env[{key!r}]: {err}") from err
    return out


def stack_entries(entries: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-sample tensor objects of ``entries`` stacked into ``[B, ...]`` tensors, one per key."""
    return {key: torch.stack([tensor_from_json(entry[key]) for entry in entries]) for key in keys}
