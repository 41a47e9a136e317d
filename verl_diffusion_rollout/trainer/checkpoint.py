"""LoRA checkpoints in peft's format, written atomically, plus the trainer state that makes a resume exact.

A checkpoint folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` (what
``peft.PeftModel.from_pretrained`` reads) and ``trainer_state.pt`` (optimizer, step, metrics history).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "PEFT_PREFIX"]

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.pt"


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if hasattr(value, "value") and value.__class__.__module__.startswith("peft"):  # peft enums
        return value.value
    return value


def save_checkpoint(
    path: str | os.PathLike, lora_state: dict[str, torch.Tensor], peft_config: Any, trainer_state: dict[str, Any]
) -> str:
    """Write the checkpoint to ``path`` (via a temporary folder renamed into place, so a crash or Ctrl-C
    never leaves a half-written checkpoint behind)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, tmp / ADAPTER_WEIGHTS)
    config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(_json_ready(config), indent=2, default=str))
    torch.save(trainer_state, tmp / TRAINER_STATE)
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)
    (path.parent / "latest").write_text(path.name)
    return str(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(lora_state without the peft prefix, adapter config dict, trainer state)``."""
    path = Path(path)
    if (path / "latest").is_file():  # a checkpoints folder: take its latest checkpoint
        path = path / (path / "latest").read_text().strip()
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG, TRAINER_STATE):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: {name} is missing")
    state = load_file(path / ADAPTER_WEIGHTS)
    lora = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    config = json.loads((path / ADAPTER_CONFIG).read_text())
    trainer_state = torch.load(path / TRAINER_STATE, map_location="cpu", weights_only=False)
    return lora, config, trainer_state


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> str | None:
    """The checkpoint the ``latest`` marker of a checkpoints folder points at, if any."""
    marker = Path(checkpoints_dir) / "latest"
    if not marker.is_file():
        return None
    path = Path(checkpoints_dir) / marker.read_text().strip()
    return str(path) if path.is_dir() else None
