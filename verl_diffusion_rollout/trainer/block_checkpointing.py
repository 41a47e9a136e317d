"""Which transformer blocks recompute their activations in the backward pass.

Gradient checkpointing trades time for memory: a recomputed block runs its forward twice, a kept block holds its
activations until the backward pass. :class:`BlockCheckpointing` recomputes the first ``count`` blocks of every
forward and keeps the rest (``actor.checkpoint_blocks: N``), or, with a :class:`MemoryPlan`
(``actor.checkpoint_blocks: auto``), chooses ``count`` again at every forward: as few recomputed blocks as keep the
forward's activations within a share of the device's memory. A GPU with room for every activation then recomputes
nothing, and a smaller one recomputes what it must.

The choice never changes a number: a recomputed block runs the same module (and, compiled, the same graph) on the
same inputs, so the forward values, the log-probs and the gradients are those of any other count.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.utils.checkpoint
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["BlockCheckpointing", "MemoryPlan", "DEFAULT_CHECKPOINT_MEMORY_FRACTION", "tensor_bytes"]

# ``actor.checkpoint_memory_fraction`` when unset: room for the allocator's cache and what PyTorch does not count
DEFAULT_CHECKPOINT_MEMORY_FRACTION = 0.85


def tensor_bytes(value: Any) -> int:
    """Bytes of every tensor in ``value`` (a tensor, or tuples / lists / dicts of them; anything else counts 0)."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(tensor_bytes(v) for v in value)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    return 0


@dataclass
class MemoryPlan:
    """How many blocks a forward must recompute so that its peak stays under ``memory_fraction`` of the memory this
    process can reach.

    The activations a kept block holds are measured in the first forward in grad mode, by running its second block
    (the only one of a one-block model) one extra time and reading the allocator (``allocated``) before and after:
    the second block, whose inputs carry gradients as every later block's do (the first block's do not, so it keeps
    less). Until a measurement succeeds every block is recomputed; a reading of nothing held (memory freed
    meanwhile) is retried on the next forward, at most ``MAX_MEASUREMENTS`` times. The activations are taken to grow
    with the bytes of the block's inputs (tokens x rows). Each later forward plans, when its first block is called,
    from what is allocated then and the size of its inputs:

    ``peak = allocated + blocks x input_bytes (every block's kept inputs) + (kept + 2) x activations``

    (the 2: the block being recomputed in the backward pass and its gradients), and keeps as many blocks (the last
    ones) as fit under ``memory_fraction x reachable()``.

    Args:
        num_blocks: the transformer's block count.
        memory_fraction: the share of ``reachable()`` the planned peak may take.
        allocated: bytes this process's tensors take on the device now (``torch.cuda.memory_allocated``).
        reachable: bytes this process could hold now: what its allocator has reserved plus the device's free
            memory (other processes' use excluded), within its per-process limit.
    """

    MAX_MEASUREMENTS = 3

    num_blocks: int
    memory_fraction: float
    allocated: Callable[[], int]
    reachable: Callable[[], int]
    activations_per_input_byte: float | None = None
    measurements: int = 0

    @classmethod
    def for_device(cls, device: torch.device, num_blocks: int, memory_fraction: float) -> MemoryPlan:
        """A plan on the CUDA ``device``'s caching allocator."""
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"actor_rollout_ref.actor.checkpoint_blocks=auto reads the CUDA allocator; the policy is "
                             f"on {device} (set a number of blocks instead)")
        total = torch.cuda.get_device_properties(device).total_memory
        cap = total * getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device)

        def reachable() -> int:
            free, _ = torch.cuda.mem_get_info(device)
            return int(min(cap, torch.cuda.memory_reserved(device) + free))

        return cls(num_blocks, memory_fraction, lambda: torch.cuda.memory_allocated(device), reachable)

    @property
    def measured(self) -> bool:
        return self.activations_per_input_byte is not None

    @property
    def wants_measurement(self) -> bool:
        return not self.measured and self.measurements < self.MAX_MEASUREMENTS

    @property
    def measure_index(self) -> int:
        """The block measured: the second, or the only one."""
        return min(1, self.num_blocks - 1)

    def measure(self, block: nn.Module, args: Sequence[Any]) -> None:
        """Run ``block(*args)`` once, keeping its activations, and record their bytes per byte of its inputs (a
        reading of nothing held leaves the plan unmeasured)."""
        self.measurements += 1
        before = self.allocated()
        out = block(*args)
        held = self.allocated() - before - tensor_bytes(out)
        del out
        if held > 0:
            self.activations_per_input_byte = held / max(tensor_bytes(args), 1)
        elif not self.wants_measurement:
            logger.warning("checkpoint_blocks=auto: %d measurements of a kept block read no activations; every "
                           "block stays recomputed", self.measurements)

    def recompute_count(self, args: Sequence[Any]) -> int:
        """Blocks a forward whose first block takes ``args`` recomputes (0 .. ``num_blocks``; all until measured,
        and all when what is allocated leaves no room)."""
        if not self.measured:
            return self.num_blocks
        inputs = tensor_bytes(args)
        per_block = self.activations_per_input_byte * inputs
        room = self.memory_fraction * self.reachable() - self.allocated() - self.num_blocks * inputs
        if room <= 0 or per_block <= 0:
            return self.num_blocks
        kept = int(room // per_block) - 2
        return self.num_blocks - min(max(kept, 0), self.num_blocks)


@dataclass(eq=False)
class BlockCheckpointing:
    """A ``gradient_checkpointing_func`` for diffusers' ``enable_gradient_checkpointing``.

    The first ``count`` of ``blocks`` in a forward run under ``torch.utils.checkpoint`` (non-reentrant) and are
    recomputed in the backward pass; the others run plainly and keep their activations. With ``plan``, ``count`` is
    re-chosen when the first block is called (diffusers calls this function only for forwards in grad mode), and
    the first forward measures the plan (:attr:`MemoryPlan.measure_index`).
    ``counts`` records every chosen count until :meth:`reset_counts`.
    """

    blocks: Sequence[nn.Module]
    count: int
    plan: MemoryPlan | None = None
    counts: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._index = {id(block): i for i, block in enumerate(self.blocks)}

    def __call__(self, block: nn.Module, *args: Any) -> Any:
        index = self._index.get(id(block))
        if self.plan is not None:
            if index == 0:
                self.count = self.plan.recompute_count(args)
                self.counts.append(self.count)
            if index == self.plan.measure_index and self.plan.wants_measurement:
                self.plan.measure(block, args)
        if index is not None and index < self.count:
            return torch.utils.checkpoint.checkpoint(block.__call__, *args, use_reentrant=False)
        return block(*args)

    def reset_counts(self) -> list[int]:
        """The counts chosen since the last reset (then forgotten)."""
        counts, self.counts = self.counts, []
        return counts
