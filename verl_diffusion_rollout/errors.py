"""Exceptions shared by the pipelines, engines and server (importable without verl).

The HTTP server maps them to statuses: :class:`EngineAsleep` -> 409, :class:`GenerationCancelled` -> 499 (the
client has gone), :class:`NonFiniteOutput` -> 500, :class:`RoleMismatch` -> 400; validation errors (``ValueError``)
are 4xx.
"""

from __future__ import annotations

__all__ = ["GenerationCancelled", "EngineAsleep", "NonFiniteOutput", "RoleMismatch"]


class GenerationCancelled(RuntimeError):
    """A generation was stopped between two denoising steps because its ``cancel`` callback returned True
    (e.g. the HTTP client went away); nothing of it is returned."""


class EngineAsleep(RuntimeError):
    """The engine has released its weights (``sleep()``); call ``wake_up()`` before generating."""


class NonFiniteOutput(RuntimeError):
    """A generation produced NaN or Inf (log-probs, latents or images); it is refused rather than returned."""


class RoleMismatch(ValueError):
    """The request needs a stage (text encoding, denoising, decoding) whose modules this engine's role did not load
    (see :class:`~verl_diffusion_rollout.stages.Role`); the message names the role and where to send it instead."""
