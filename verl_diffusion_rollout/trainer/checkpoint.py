"""LoRA checkpoints in peft's format, written atomically, plus the trainer state that makes a resume exact.

A checkpoint folder holds ``adapter_model.safetensors`` and ``adapter_config.json`` (what
``peft.PeftModel.from_pretrained`` reads), and the trainer state (step, seed, metrics history, optimizer state) as
``trainer_state.json`` (its structure) plus ``trainer_state.safetensors`` (its tensors). Nothing is unpickled on
load: a checkpoint is data, never code. The older pickle ``trainer_state.pt`` is no longer read.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "latest_checkpoint",
    "checkpoint_steps",
    "prune_checkpoints",
    "check_lora_keys",
    "encode_state",
    "decode_state",
    "PEFT_PREFIX",
]

PEFT_PREFIX = "base_model.model."
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
LEGACY_TRAINER_STATE = "trainer_state.pt"
LATEST = "latest"
TMP_SUFFIX, OLD_SUFFIX = ".tmp", ".old"
_STEP_DIR = re.compile(r"step_(\d+)")
FORMAT_VERSION = 1

# Tags of the JSON encoding: an object with exactly one of these keys stands for a value JSON has no type for.
_TENSOR, _TUPLE, _DICT, _FLOAT = "__tensor__", "__tuple__", "__dict__", "__float__"


def _json_ready(value: Any) -> Any:
    if isinstance(value, (set, tuple)):
        return sorted(value) if isinstance(value, set) else list(value)
    if isinstance(value, dict):
        return {k: _json_ready(v) for k, v in value.items()}
    if hasattr(value, "value") and value.__class__.__module__.startswith("peft"):  # peft enums
        return value.value
    return value


# -- trainer state: JSON structure + safetensors tensors --------------------------------------------------------------


def encode_state(value: Any, tensors: dict[str, torch.Tensor], where: str = "trainer_state") -> Any:
    """``value`` as JSON-able data; its tensors move to ``tensors`` (referenced by key).

    Handles what a trainer state holds: dicts (any int/str keys, e.g. an optimizer's parameter ids), lists,
    tuples, str, int, float (NaN/Inf included), bool, None and tensors. Anything else raises ``TypeError`` naming
    where it sits, at save time rather than at resume.
    """
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, torch.Tensor):
        key = f"t{len(tensors)}"
        tensors[key] = value.detach().to("cpu", copy=True).contiguous()
        return {_TENSOR: key}
    if isinstance(value, numbers.Integral):  # numpy integers too (saved as plain ints)
        return int(value)
    if isinstance(value, numbers.Real):  # float, numpy floats (saved as plain floats)
        value = float(value)
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, tuple):
        return {_TUPLE: [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]}
    if isinstance(value, list):
        return [encode_state(v, tensors, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        plain = all(isinstance(k, str) and not k.startswith("__") for k in value)
        if plain:
            return {k: encode_state(v, tensors, f"{where}[{k!r}]") for k, v in value.items()}
        pairs = []
        for k, v in value.items():
            if isinstance(k, bool) or not isinstance(k, (str, int)):
                raise TypeError(f"{where}: dict keys must be str or int to be saved, got {k!r}")
            pairs.append([k, encode_state(v, tensors, f"{where}[{k!r}]")])
        return {_DICT: pairs}
    raise TypeError(f"{where}: cannot save a {type(value).__name__} in a checkpoint (use numbers, strings, lists, dicts, tensors)")


def decode_state(value: Any, tensors: Mapping[str, torch.Tensor], source: str = TRAINER_STATE) -> Any:
    """Inverse of :func:`encode_state`; ``ValueError`` naming ``source`` on anything malformed."""
    if isinstance(value, list):
        return [decode_state(v, tensors, source) for v in value]
    if not isinstance(value, dict):
        return value
    if len(value) == 1:
        (tag, inner), = value.items()
        if tag == _TENSOR:
            if not isinstance(inner, str) or inner not in tensors:
                raise ValueError(f"{source}: refers to tensor {inner!r}, which the tensor file does not hold")
            return tensors[inner]
        if tag == _TUPLE:
            return tuple(decode_state(v, tensors, source) for v in _expect_list(inner, source, tag))
        if tag == _FLOAT:
            if inner not in ("nan", "inf", "-inf"):
                raise ValueError(f"{source}: invalid {_FLOAT} value {inner!r}")
            return float(inner)
        if tag == _DICT:
            out = {}
            for pair in _expect_list(inner, source, tag):
                if not (isinstance(pair, list) and len(pair) == 2 and isinstance(pair[0], (str, int))):
                    raise ValueError(f"{source}: malformed {_DICT} entry {pair!r:.80}")
                out[pair[0]] = decode_state(pair[1], tensors, source)
            return out
    if any(k.startswith("__") for k in value):
        raise ValueError(f"{source}: unknown tagged value with keys {sorted(value)[:4]}")
    return {k: decode_state(v, tensors, source) for k, v in value.items()}


def _expect_list(value: Any, source: str, tag: str) -> list:
    if not isinstance(value, list):
        raise ValueError(f"{source}: {tag} must hold a list, got {type(value).__name__}")
    return value


# -- save / load --------------------------------------------------------------------------------------------------------


def save_checkpoint(
    path: str | os.PathLike,
    lora_state: dict[str, torch.Tensor],
    peft_config: Any,
    trainer_state: dict[str, Any],
    keep: int | None = None,
) -> str:
    """Write the checkpoint to ``path`` atomically and point the folder's ``latest`` marker at it.

    The files go to ``<path>.tmp``, are fsynced, and the folder is renamed into place (an existing ``path`` is moved
    aside first and removed only once the new one is in place); then ``latest`` is replaced the same way. A crash or
    a kill at any moment leaves ``latest`` naming a complete checkpoint (the new one or the previous one).
    ``keep``: keep this many ``step_*`` folders, removing the oldest (never the one ``latest`` names); ``None``
    keeps all.

    ``trainer_state``: ``step``, ``seed``, ``history``, ``optimizer`` (a torch ``state_dict()``) and any other
    JSON-able values or tensors; :func:`load_checkpoint` returns an equal structure (tensors bit-identical).
    """
    if keep is not None and (isinstance(keep, bool) or not isinstance(keep, int) or keep < 1):
        raise ValueError(f"trainer.max_actor_ckpt_to_keep must be an int >= 1 or null, got {keep!r}")
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    if tmp.exists():  # left by a crash during an earlier write
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({PEFT_PREFIX + k: v.detach().cpu().contiguous() for k, v in lora_state.items()}, tmp / ADAPTER_WEIGHTS)
    config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    (tmp / ADAPTER_CONFIG).write_text(json.dumps(_json_ready(config), indent=2, default=str))
    tensors: dict[str, torch.Tensor] = {}
    structure = encode_state(trainer_state, tensors)
    save_file(tensors, tmp / TRAINER_TENSORS)
    document = {"format": "verl_diffusion_rollout.trainer_state", "version": FORMAT_VERSION, "state": structure}
    (tmp / TRAINER_STATE).write_text(json.dumps(document, indent=1, allow_nan=False))
    for file in tmp.iterdir():
        _fsync(file)
    _fsync(tmp)
    _replace_dir(tmp, path)
    marker_tmp = path.parent / (LATEST + TMP_SUFFIX)
    marker_tmp.write_text(path.name)
    _fsync(marker_tmp)
    os.replace(marker_tmp, path.parent / LATEST)
    _fsync(path.parent)
    if keep is not None:
        prune_checkpoints(path.parent, keep)
    return str(path)


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _replace_dir(src: Path, dst: Path) -> None:
    """Rename folder ``src`` to ``dst``; an existing ``dst`` is renamed aside first and deleted only afterwards."""
    aside = dst.with_name(dst.name + OLD_SUFFIX)
    if aside.exists():
        shutil.rmtree(aside)
    if dst.exists():
        os.replace(dst, aside)
    os.replace(src, dst)
    _fsync(dst.parent)
    if aside.exists():
        shutil.rmtree(aside)


def checkpoint_steps(checkpoints_dir: str | os.PathLike) -> dict[int, Path]:
    """The complete-looking ``step_<N>`` folders of a checkpoints folder, by step (temporary folders excluded)."""
    found = {}
    for entry in Path(checkpoints_dir).glob("step_*"):
        match = _STEP_DIR.fullmatch(entry.name)
        if match and entry.is_dir():
            found[int(match.group(1))] = entry
    return dict(sorted(found.items()))


def prune_checkpoints(checkpoints_dir: str | os.PathLike, keep: int) -> list[str]:
    """Remove the oldest ``step_*`` folders beyond the newest ``keep``; the one ``latest`` names always stays.
    Returns the removed paths."""
    checkpoints_dir = Path(checkpoints_dir)
    latest = latest_checkpoint(checkpoints_dir)
    steps = checkpoint_steps(checkpoints_dir)
    removed = []
    for step in list(steps)[: max(0, len(steps) - keep)]:
        folder = steps[step]
        if latest is not None and Path(latest).name == folder.name:
            continue
        shutil.rmtree(folder)
        removed.append(str(folder))
    return removed


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any], dict[str, Any]]:
    """``(lora_state without the peft prefix, adapter config dict, trainer state)``.

    ``path`` is a checkpoint folder, or a checkpoints folder whose ``latest`` marker names one. Every error names
    the file at fault; nothing is unpickled.
    """
    path = Path(path)
    if (path / LATEST).is_file():  # a checkpoints folder: take its latest checkpoint
        path = _resolve_latest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):
        if not (path / name).is_file():
            raise FileNotFoundError(f"{path} is not a checkpoint: {path / name} is missing")
    if not (path / TRAINER_STATE).is_file():
        if (path / LEGACY_TRAINER_STATE).is_file():
            raise ValueError(
                f"{path / LEGACY_TRAINER_STATE} is a pickled trainer state from an older version; it is no longer "
                f"read (unpickling can run code). Resume is not possible from it; its LoRA weights "
                f"({path / ADAPTER_WEIGHTS}) still load with peft"
            )
        raise FileNotFoundError(f"{path} is not a checkpoint: {path / TRAINER_STATE} is missing")
    state = _load_tensors(path / ADAPTER_WEIGHTS)
    lora = {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in state.items()}
    config = _load_json(path / ADAPTER_CONFIG)
    if not isinstance(config, dict):
        raise ValueError(f"{path / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
    document = _load_json(path / TRAINER_STATE)
    if not isinstance(document, dict) or document.get("format") != "verl_diffusion_rollout.trainer_state":
        raise ValueError(f"{path / TRAINER_STATE}: not a verl_diffusion_rollout trainer state")
    if document.get("version") != FORMAT_VERSION:
        raise ValueError(f"{path / TRAINER_STATE}: format version {document.get('version')!r}, expected {FORMAT_VERSION}")
    if not (path / TRAINER_TENSORS).is_file():
        raise FileNotFoundError(f"{path} is not a complete checkpoint: {path / TRAINER_TENSORS} is missing")
    tensors = _load_tensors(path / TRAINER_TENSORS)
    trainer_state = decode_state(document.get("state"), tensors, str(path / TRAINER_STATE))
    if not isinstance(trainer_state, dict):
        raise ValueError(f"{path / TRAINER_STATE}: the trainer state must be an object")
    return lora, config, trainer_state


def _load_json(file: Path) -> Any:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise ValueError(f"{file}: not valid JSON ({err})") from err


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{file}: not a valid safetensors file ({err})") from err


def _resolve_latest(checkpoints_dir: Path) -> Path:
    """The folder the ``latest`` marker names, which must be a direct child of ``checkpoints_dir``."""
    marker = checkpoints_dir / LATEST
    try:
        name = marker.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{marker}: cannot read the latest marker ({err})") from err
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or os.path.isabs(name):
        raise ValueError(f"{marker} must name a checkpoint folder inside {checkpoints_dir}, got {name[:200]!r}")
    target = checkpoints_dir / name
    root = checkpoints_dir.resolve()
    if target.resolve().parent != root:
        raise ValueError(f"{marker} points at {name!r}, which resolves outside {checkpoints_dir} ({target.resolve()})")
    return target


def latest_checkpoint(checkpoints_dir: str | os.PathLike) -> str | None:
    """The checkpoint the ``latest`` marker of a checkpoints folder points at, if any.

    ``None`` without a marker or when the folder it names is gone; ``ValueError`` naming the marker if it tries to
    leave the checkpoints folder (absolute path, ``..``, a symlink pointing out).
    """
    checkpoints_dir = Path(checkpoints_dir)
    if not (checkpoints_dir / LATEST).is_file():
        return None
    path = _resolve_latest(checkpoints_dir)
    return str(path) if path.is_dir() else None


def check_lora_keys(
    expected: Mapping[str, tuple[int, ...] | torch.Size], loaded: Mapping[str, torch.Tensor], source: str | os.PathLike
) -> None:
    """Raise ``ValueError`` naming ``source`` (e.g. ``"checkpoint <path>"``) unless ``loaded`` has exactly the
    ``expected`` keys with the expected shapes (missing keys, unexpected keys and shape mismatches are all listed)."""
    missing = sorted(set(expected) - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    mismatched = sorted(
        f"{k}: {tuple(loaded[k].shape)} (expected {tuple(expected[k])})"
        for k in set(expected) & set(loaded)
        if tuple(loaded[k].shape) != tuple(expected[k])
    )
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    if mismatched:
        parts.append(f"{len(mismatched)} with the wrong shape (e.g. {mismatched[:3]})")
    raise ValueError(f"{source} does not match the LoRA being trained: " + "; ".join(parts))
