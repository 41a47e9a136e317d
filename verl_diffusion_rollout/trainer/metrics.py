"""Where training metrics go: verl's ``Tracking`` (console, file, tensorboard, wandb, mlflow, swanlab, ...).

:class:`RunLogger` builds one ``verl.utils.tracking.Tracking`` for a run with the run's output folder as the home of
the backends that write files: ``file`` writes ``metrics.jsonl`` (verl's records, ``{"step": s, "data": {...}}``),
``tensorboard`` writes ``tensorboard/``, ``wandb`` writes ``wandb/`` (offline unless ``WANDB_MODE`` or an API key
says otherwise). Tracking takes those places from environment variables, which are set only while it is built.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

__all__ = ["RunLogger", "scalars"]


def scalars(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """The numbers of ``metrics`` (what every backend can log); ``None``, booleans, strings are left out."""
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


@contextlib.contextmanager
def _environ(values: Mapping[str, str]) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` for the block, then restore what was there."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class RunLogger:
    """verl's ``Tracking`` over ``backends``, writing into ``output_dir``.

    Args:
        output_dir: the run's folder (``metrics.jsonl``, ``tensorboard/``, ``wandb/`` go there).
        backends: verl backend names (``trainer.logger``).
        project_name, experiment_name: the run's names (``trainer.project_name`` / ``trainer.experiment_name``).
        config: the resolved recipe as a plain dict (wandb / mlflow / swanlab record it), or None.
        history: a resumed run's earlier records (``{"step": s, ...}``): written to the ``file`` backend first, so
            the file of a resumed run holds every step of it, exactly once.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        backends: list[str],
        project_name: str,
        experiment_name: str,
        config: dict[str, Any] | None = None,
        history: list[dict[str, Any]] | None = None,
    ):
        from verl.utils.tracking import Tracking

        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self.backends = list(backends)
        env = {"VERL_FILE_LOGGER_PATH": str(self.jsonl_path), "TENSORBOARD_DIR": str(self.dir / "tensorboard")}
        if "wandb" in self.backends:
            env["WANDB_DIR"] = os.environ.get("WANDB_DIR", str(self.dir))
            if not os.environ.get("WANDB_MODE") and not os.environ.get("WANDB_API_KEY"):
                env["WANDB_MODE"] = "offline"  # no account configured: keep the run on disk (``wandb sync`` later)
        with _environ(env):
            self.tracking = Tracking(project_name, experiment_name, default_backend=self.backends, config=config)
        if "file" in self.backends:
            for record in history or []:
                self.tracking.log(scalars({k: v for k, v in record.items() if k != "step"}), int(record["step"]),
                                  backend=["file"])

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """One record for ``step`` to every backend (numbers only)."""
        self.tracking.log(scalars(metrics), step)

    def close(self) -> None:
        self.tracking.finish()
