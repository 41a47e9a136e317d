"""The sequence-parallel group and the two collectives Ulysses attention needs, with the gradients it needs.

Every rank of a sequence-parallel (SP) group holds the same full inputs and computes the same loss from the same
full outputs; only the transformer's tokens are split. Two collectives follow from that:

* :func:`all_to_all` trades a rank's token shard of every head for every rank's tokens of its own heads (and back).
  Its gradient is the same exchange run backwards.
* :func:`gather_tokens` rebuilds the full sequence on every rank from the shards. Its consumer is replicated (every
  rank computes the same function of the gathered tensor), so every rank receives the same full gradient, and the
  gradient of a rank's shard is its own slice of it, taken once. (A plain all-gather's backward, a reduce-scatter,
  would sum the S identical gradients and scale every parameter gradient by S.)

Both run on any ``torch.distributed`` backend with ``all_to_all_single`` and ``all_gather``: NCCL on GPUs, gloo on
CPUs (torch 2.13's gloo has both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..config import check_heads

__all__ = ["SequenceParallel", "all_to_all", "gather_tokens", "check_heads"]


@dataclass(frozen=True)
class SequenceParallel:
    """One rank's view of its sequence-parallel group.

    Attributes:
        group: the ``torch.distributed`` process group of the ``size`` ranks sharing one transformer forward.
        size: ranks in the group (S).
        rank: this rank's index in the group (its shard of every token sequence).
    """

    group: Any
    size: int
    rank: int

    @classmethod
    def from_group(cls, group: Any) -> SequenceParallel:
        """The group's size and this process's rank in it."""
        return cls(group=group, size=dist.get_world_size(group), rank=dist.get_rank(group))

    @classmethod
    def from_mesh(cls, mesh: Any, dim: str = "sp") -> SequenceParallel | None:
        """The ``dim`` axis of a ``DeviceMesh`` (verl's ``("dp", "sp")`` mesh), or None when the mesh has no such
        axis or it has size 1."""
        if mesh is None or dim not in (mesh.mesh_dim_names or ()):
            return None
        sub = mesh[dim]
        if sub.size() == 1:
            return None
        return cls(group=sub.get_group(), size=sub.size(), rank=sub.get_local_rank())


class _AllToAll(torch.autograd.Function):
    """``out[j] = x_on_rank_j[my_rank]`` along dim 0 (size S); an involution, so its backward is itself."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: Any) -> torch.Tensor:  # noqa: D401
        ctx.group = group
        return _exchange(x, group)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _exchange(grad, ctx.group), None


def _exchange(x: torch.Tensor, group: Any) -> torch.Tensor:
    x = x.contiguous()
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x, group=group)
    return out


def all_to_all(x: torch.Tensor, sp: SequenceParallel) -> torch.Tensor:
    """Exchange ``x`` ``[S, ...]`` across the group: chunk ``j`` goes to rank ``j``; the result's chunk ``j`` came from
    rank ``j``. Differentiable (the gradient goes back the same way)."""
    if x.shape[0] != sp.size:
        raise ValueError(f"all_to_all needs a leading dimension of the group size {sp.size}, got shape {tuple(x.shape)}")
    return _AllToAll.apply(x, sp.group)


class _GatherTokens(torch.autograd.Function):
    """All-gather along ``dim``; backward: this rank's slice of the (replicated) gradient, not a sum over ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, group: Any, size: int, rank: int) -> torch.Tensor:  # noqa: D401
        ctx.dim, ctx.rank, ctx.local = dim, rank, x.shape[dim]
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(size)]
        dist.all_gather(parts, x, group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.narrow(ctx.dim, ctx.rank * ctx.local, ctx.local), None, None, None, None


def gather_tokens(x: torch.Tensor, sp: SequenceParallel, dim: int = 1) -> torch.Tensor:
    """Concatenate every rank's equal-size shard ``x`` along ``dim`` (rank order), on every rank.

    The backward assumes what holds in SP: every rank computes the same function of the result, so each rank's
    shard gets its own slice of the gradient once.
    """
    return _GatherTokens.apply(x, dim, sp.group, sp.size, sp.rank)
