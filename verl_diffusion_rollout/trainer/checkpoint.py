"""LoRA checkpoints in diffusers' LoRA format, written atomically, plus the trainer state that makes a resume exact.

A checkpoint folder holds ``pytorch_lora_weights.safetensors``, written by the model's diffusers pipeline class
(``QwenImagePipeline.save_lora_weights``, ``StableDiffusion3Pipeline.save_lora_weights``): ``transformer.``-prefixed
peft names, the LoRA config in the file's metadata, so ``pipe.load_lora_weights(<checkpoint>)`` loads it as is.
The trainer state (step, seed, metrics history, optimizer state) sits beside it as ``trainer_state.json`` (its
structure) plus ``trainer_state.safetensors`` (its tensors). Nothing is unpickled on load: a checkpoint is data,
never code. Checkpoints of the older peft layout (``adapter_model.safetensors`` + ``adapter_config.json``) still
resume; the older pickle ``trainer_state.pt`` is no longer read.
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
from safetensors import SafetensorError, safe_open
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
    "save_lora",
    "load_lora",
    "PEFT_PREFIX",
    "LORA_WEIGHTS",
    "DIFFUSERS_PREFIX",
]

PEFT_PREFIX = "base_model.model."
# diffusers' LoRA layout (``LORA_WEIGHT_NAME_SAFE``, ``LORA_ADAPTER_METADATA_KEY``, the pipelines' ``transformer_name``)
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LORA_METADATA_KEY = "lora_adapter_metadata"
DIFFUSERS_PREFIX = "transformer."
# the older peft layout, still read
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
    pipeline_class: str = "QwenImagePipeline",
    keep: int | None = None,
) -> str:
    """Write the checkpoint to ``path`` atomically and point the folder's ``latest`` marker at it.

    The files go to ``<path>.tmp``, are fsynced, and the folder is renamed into place (an existing ``path`` is moved
    aside first and removed only once the new one is in place); then ``latest`` is replaced the same way. A crash or
    a kill at any moment leaves ``latest`` naming a complete checkpoint (the new one or the previous one).
    ``keep``: keep this many ``step_*`` folders, removing the oldest (never the one ``latest`` names); ``None``
    keeps all.

    ``lora_state``: peft names (``get_peft_model_state_dict``); ``pipeline_class``: the diffusers pipeline class
    of the model (``model_index.json``'s ``_class_name``), whose ``save_lora_weights`` writes the LoRA.

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
    save_lora(tmp, lora_state, peft_config, pipeline_class)
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
    """``(lora_state with peft names, LoRA config dict, trainer state)``.

    ``path`` is a checkpoint folder, or a checkpoints folder whose ``latest`` marker names one. Every error names
    the file at fault; nothing is unpickled.
    """
    path = Path(path)
    if (path / LATEST).is_file():  # a checkpoints folder: take its latest checkpoint
        path = _resolve_latest(path)
    if not path.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(path)!r} does not exist")
    if not (path / TRAINER_STATE).is_file():
        if (path / LEGACY_TRAINER_STATE).is_file():
            raise ValueError(
                f"{path / LEGACY_TRAINER_STATE} is a pickled trainer state from an older version; it is no longer "
                f"read (unpickling can run code). Resume is not possible from it; its LoRA weights "
                f"({path / LORA_WEIGHTS}) still load with diffusers' load_lora_weights"
            )
        raise FileNotFoundError(f"{path} is not a checkpoint: {path / TRAINER_STATE} is missing")
    lora, config = load_lora(path)
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


def save_lora(
    folder: str | os.PathLike, lora_state: Mapping[str, torch.Tensor], peft_config: Any, pipeline_class: str
) -> Path:
    """Write ``lora_state`` (peft names) with diffusers' ``<pipeline_class>.save_lora_weights`` into ``folder``,
    the LoRA config in the file's metadata; returns the weights file."""
    import diffusers

    cls = getattr(diffusers, pipeline_class, None)
    if cls is None or not hasattr(cls, "save_lora_weights"):
        raise ValueError(f"diffusers has no pipeline class {pipeline_class!r} with save_lora_weights to save the LoRA")
    config = peft_config.to_dict() if hasattr(peft_config, "to_dict") else dict(peft_config)
    metadata = json.loads(json.dumps(_json_ready(config), default=str))  # plain JSON values (sets, enums)
    layers = {k: v.detach().cpu().contiguous() for k, v in lora_state.items()}
    cls.save_lora_weights(
        str(folder), transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata, weight_name=LORA_WEIGHTS
    )
    return Path(folder) / LORA_WEIGHTS


def load_lora(folder: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """``(lora_state with peft names, LoRA config dict)`` of a checkpoint folder, diffusers' layout
    (``pytorch_lora_weights.safetensors``) or the older peft one (``adapter_model.safetensors`` +
    ``adapter_config.json``); errors name the file at fault."""
    folder = Path(folder)
    weights = folder / LORA_WEIGHTS
    if weights.is_file():
        tensors = _load_tensors(weights)
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {}
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{weights}: not a valid safetensors file ({err})") from err
        if LORA_METADATA_KEY not in metadata:
            raise ValueError(f"{weights}: no LoRA config in its metadata (key {LORA_METADATA_KEY!r})")
        try:
            packed = json.loads(metadata[LORA_METADATA_KEY])
        except json.JSONDecodeError as err:
            raise ValueError(f"{weights}: the LoRA config in its metadata is not valid JSON ({err})") from err
        if not isinstance(packed, dict):
            raise ValueError(f"{weights}: the LoRA config in its metadata must be a JSON object")
        config = {k[len(DIFFUSERS_PREFIX):]: v for k, v in packed.items() if k.startswith(DIFFUSERS_PREFIX)}
        foreign = sorted(k for k in tensors if not k.startswith(DIFFUSERS_PREFIX))
        if foreign:
            raise ValueError(f"{weights}: holds tensors for other components than the transformer, e.g. {foreign[:3]}")
        return {k[len(DIFFUSERS_PREFIX):]: v for k, v in tensors.items()}, config
    if (folder / ADAPTER_WEIGHTS).is_file():  # the older peft layout
        if not (folder / ADAPTER_CONFIG).is_file():
            raise FileNotFoundError(f"{folder} is not a checkpoint: {folder / ADAPTER_CONFIG} is missing")
        tensors = _load_tensors(folder / ADAPTER_WEIGHTS)
        config = _load_json(folder / ADAPTER_CONFIG)
        if not isinstance(config, dict):
            raise ValueError(f"{folder / ADAPTER_CONFIG}: expected a JSON object, got {type(config).__name__}")
        return {k[len(PEFT_PREFIX):] if k.startswith(PEFT_PREFIX) else k: v for k, v in tensors.items()}, config
    raise FileNotFoundError(f"{folder} is not a checkpoint: {weights} is missing")


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
