"""Tensors over HTTP: safetensors bytes for weight updates, base64 JSON for rollout responses, a weights checksum.

Both round-trip dtype (bfloat16 included) and shape exactly.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import torch

__all__ = [
    "tensor_to_json",
    "tensor_from_json",
    "named_tensors_to_bytes",
    "named_tensors_from_bytes",
    "weights_sha256",
    "SAFETENSORS_MEDIA_TYPE",
]

SAFETENSORS_MEDIA_TYPE = "application/x-safetensors"

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


def tensor_to_json(tensor: torch.Tensor) -> dict[str, Any]:
    """``{"dtype": "bfloat16", "shape": [..], "data": <base64 of the raw little-endian bytes>}``."""
    t = tensor.detach().to("cpu").contiguous()
    name = str(t.dtype).removeprefix("torch.")
    if name not in _DTYPES:
        raise ValueError(f"unsupported tensor dtype {t.dtype}")
    raw = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {"dtype": name, "shape": list(t.shape), "data": base64.b64encode(raw).decode("ascii")}


def tensor_from_json(obj: Any) -> torch.Tensor:
    """Inverse of :func:`tensor_to_json`; raises ``ValueError`` on a malformed object."""
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise ValueError("a tensor must be an object with 'dtype', 'shape' and 'data'")
    dtype = _DTYPES.get(str(obj["dtype"]))
    if dtype is None:
        raise ValueError(f"unsupported tensor dtype {obj['dtype']!r}; known: {sorted(_DTYPES)}")
    shape = obj["shape"]
    if not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0 for s in shape):
        raise ValueError(f"tensor shape must be a list of non-negative ints, got {shape!r}")
    try:
        raw = base64.b64decode(obj["data"], validate=True)
    except (ValueError, TypeError) as err:
        raise ValueError(f"tensor data is not valid base64: {err}") from err
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for s in shape:
        numel *= s
    if len(raw) != numel * itemsize:
        raise ValueError(f"tensor data has {len(raw)} bytes, shape {shape} of {obj['dtype']} needs {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dtype).reshape(shape)


def named_tensors_to_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None) -> bytes:
    """Serialize named tensors to safetensors bytes; ``metadata`` values are stored as JSON strings."""
    from safetensors.torch import save

    meta = {k: json.dumps(v) for k, v in (metadata or {}).items()}
    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=meta or None)


def named_tensors_from_bytes(data: bytes) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`named_tensors_to_bytes`: ``(tensors, metadata)``; ``ValueError`` if not safetensors."""
    from safetensors.torch import load

    try:
        tensors = load(data)
    except Exception as err:  # safetensors raises its own error types
        raise ValueError(f"body is not a valid safetensors payload: {err}") from err
    metadata: dict[str, Any] = {}
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    for key, value in (header.get("__metadata__") or {}).items():
        try:
            metadata[key] = json.loads(value)
        except json.JSONDecodeError:
            metadata[key] = value
    return tensors, metadata


def weights_sha256(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> str:
    """SHA-256 hex digest of named tensors: in name order, each name's UTF-8 bytes then its raw bytes.

    The checksum sglang's ``/get_weights_checksum`` reports per module, so a client can compare the two.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        digest.update(name.encode())
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
