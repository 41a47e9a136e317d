"""Where training metrics go: a JSONL file, TensorBoard, and the console progress bar."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Writes one record per RL step to ``metrics.jsonl`` and TensorBoard (``tensorboard/``)."""

    def __init__(self, output_dir: str | os.PathLike, loggers: list[str], history: list[dict[str, Any]] | None = None):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._jsonl = None
        if "jsonl" in loggers:
            # Rewritten from the restored history: a resumed run's file holds exactly its steps.
            with open(self.jsonl_path, "w", encoding="utf-8") as f:
                for record in history or []:
                    f.write(json.dumps(record) + "\n")
            self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if "tensorboard" in loggers:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        if self._jsonl is not None:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
