"""Checking tensors a client sends (prompt embeddings to a denoiser, latents to a decoder) against the shapes and
dtypes the model takes, before any work: each refusal names the key, the expected shape and what came."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["TensorSpec", "check_tensors"]


@dataclass(frozen=True)
class TensorSpec:
    """What one tensor must be.

    Attributes:
        shape: one entry per dimension: an int is a fixed size; a string names a size that must be the same
            wherever the name appears in one :func:`check_tensors` call (e.g. ``"S"``, the prompt's token count,
            shared by the embeddings and their mask).
        dtype: the exact dtype.
        binary: every value must be 0 or 1 (attention masks).
    """

    shape: tuple[int | str, ...]
    dtype: torch.dtype
    binary: bool = False

    def describe(self) -> str:
        return f"[{', '.join(str(d) for d in self.shape)}] {str(self.dtype).removeprefix('torch.')}"


def check_tensors(
    tensors: Mapping[str, torch.Tensor | None], specs: Mapping[str, TensorSpec | None], *, what: str
) -> None:
    """Raise ``ValueError`` unless ``tensors`` match ``specs`` exactly.

    A key whose spec is a :class:`TensorSpec` is required; a key whose spec is None must be absent (or None), and
    keys without a spec are unknown. Float tensors must be finite. ``what`` names the tensors in messages (e.g.
    ``"prompt embeddings ('env')"``).
    """
    unknown = sorted(set(k for k, v in tensors.items() if v is not None) - set(specs))
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the {what}; known: {sorted(specs)}")
    sizes: dict[str, tuple[int, str]] = {}
    for key, spec in specs.items():
        value = tensors.get(key)
        if spec is None:
            if value is not None:
                raise ValueError(f"{key} was sent in the {what} but is not used with this sampling config (e.g. "
                                 "negative embeddings need guidance_scale > 1); leave it out")
            continue
        if value is None:
            raise ValueError(f"{key} is missing from the {what}: expected {spec.describe()}")
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"{key} in the {what} must be a tensor, got {type(value).__name__}")
        expected = [sizes[d][0] if isinstance(d, str) and d in sizes else d for d in spec.shape]
        got = tuple(value.shape)
        matches = len(got) == len(spec.shape) and all(
            isinstance(e, str) or e == g for e, g in zip(expected, got)
        )
        if not matches or value.dtype != spec.dtype:
            bound = [f"{d}={sizes[d][0]} (from {sizes[d][1]})" for d in spec.shape if isinstance(d, str) and d in sizes]
            raise ValueError(
                f"{key} in the {what} must have shape {spec.describe()}"
                + (f" with {', '.join(bound)}" if bound else "")
                + f", got {list(got)} {str(value.dtype).removeprefix('torch.')}"
            )
        for d, g in zip(spec.shape, got):
            if isinstance(d, str):
                sizes.setdefault(d, (g, key))
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise ValueError(f"{key} in the {what} holds NaN or Inf")
        if spec.binary and value.numel() and not bool(((value == 0) | (value == 1)).all()):
            raise ValueError(f"{key} in the {what} must hold only 0 and 1")
