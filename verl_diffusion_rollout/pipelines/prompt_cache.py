"""A bounded cache of per-prompt text-encoder outputs, so a prompt is encoded once however many calls sample it.

The FlowGRPO trainer samples a step in forward batches of ``actor.micro_batch_size``: a 16-sample group with
forward batches of 4 reaches the engine in 4 calls, and each call used to encode its prompt (and the negative prompt)
again. The text encoders are frozen (weight updates and the trainer touch only the transformer), so a prompt's
embedding depends only on its text and the encoding settings the key holds; a cached entry is the very tensor the
encoder produced, so outputs are bit-identical with and without the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import TypeVar

import torch

__all__ = ["PromptEmbeddingCache"]

T = TypeVar("T")


def _nbytes(value: object) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    raise TypeError(f"the prompt cache holds tensors or tuples of tensors, got {type(value).__name__}")


class PromptEmbeddingCache:
    """Least-recently-used entries up to ``max_bytes`` of tensor memory (on whatever device they live).

    Args:
        max_bytes: the budget; an entry larger than it is computed and returned but not kept. 0 disables caching.

    Attributes:
        hits, misses: lookups answered from the cache / computed.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"prompt cache budget must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self._entries: OrderedDict[Hashable, tuple[object, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def get_or_compute(self, key: Hashable, compute: Callable[[], T]) -> T:
        """The cached value of ``key``, or ``compute()`` (then kept, evicting the least recently used entries)."""
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                self.hits += 1
                return self._entries[key][0]  # type: ignore[return-value]
        value = compute()
        size = _nbytes(value)
        with self._lock:
            self.misses += 1
            if self.max_bytes and size <= self.max_bytes and key not in self._entries:
                self._entries[key] = (value, size)
                self._bytes += size
                while self._bytes > self.max_bytes:
                    _, (_, evicted) = self._entries.popitem(last=False)
                    self._bytes -= evicted
        return value

    def clear(self) -> None:
        """Drop every entry (e.g. before the engine releases its accelerator memory)."""
        with self._lock:
            self._entries.clear()
            self._bytes = 0
