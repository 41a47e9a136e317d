"""Exceptions shared by the pipelines, engines and server (importable without verl)."""

from __future__ import annotations

__all__ = ["GenerationCancelled"]


class GenerationCancelled(RuntimeError):
    """A generation was stopped between two denoising steps because its ``cancel`` callback returned True
    (e.g. the HTTP client went away); nothing of it is returned."""
