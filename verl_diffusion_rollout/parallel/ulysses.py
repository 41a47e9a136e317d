"""Ulysses sequence parallelism for joint text-image attention: token shards and the attention over them.

A transformer forward under sequence parallelism (SP) over S ranks:

1. every rank holds the full inputs; each stream (text tokens, image tokens) is padded to a multiple of S and
   rank ``r`` keeps tokens ``r * local .. (r + 1) * local - 1`` (:class:`TokenShard`);
2. everything but attention acts on single tokens and runs on the shard as it would on the whole sequence;
3. attention (:func:`ulysses_attention`): one all-to-all turns "my tokens, all H heads" into "all tokens, my H/S
   heads"; the padding is dropped and the streams are laid out in the order the unsharded model uses, so the
   attention kernel sees exactly the tensors it sees without SP, restricted to this rank's heads; a second
   all-to-all sends every token's output back to the rank that owns it;
4. the output tokens are gathered on every rank and the padding dropped (:meth:`TokenShard.gather`), so what
   follows the transformer (the SDE step, the log-prob) runs on the full buffer on every rank, with no reduction.

Padding therefore never enters attention: it is masked exactly by leaving it out. The text and image shards of a
forward are one :class:`SequencePlan`, made by the family's input hook and passed to its attention processors in
the attention kwargs; :data:`ACTIVE_PLAN` carries it to the hooks inside the forward (positional embeddings,
output projection).
"""

from __future__ import annotations

import contextvars
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .collectives import SequenceParallel, all_to_all, gather_tokens

__all__ = ["TokenShard", "SequencePlan", "ulysses_attention", "ACTIVE_PLAN", "PLAN_KWARG", "active_plan", "HookHandle"]

PLAN_KWARG = "sequence_plan"  # the attention-kwargs key a family's SP processor takes its plan from

ACTIVE_PLAN: contextvars.ContextVar[SequencePlan | None] = contextvars.ContextVar("vdr_sequence_plan", default=None)


@dataclass(frozen=True)
class TokenShard:
    """How a sequence of ``length`` tokens splits over ``sp.size`` ranks: padded to ``padded`` (a multiple of the
    group size), ``local`` tokens per rank, this rank's starting at ``sp.rank * local``."""

    length: int
    sp: SequenceParallel

    @property
    def local(self) -> int:
        return math.ceil(self.length / self.sp.size)

    @property
    def padded(self) -> int:
        return self.local * self.sp.size

    def take(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's shard of the full ``x`` (``x.shape[dim] == length``), zero-padded at the end; contiguous, as
        the full tensor is (a strided view would send a bf16 matmul down another kernel, with other roundings)."""
        if x.shape[dim] != self.length:
            raise ValueError(f"expected {self.length} tokens on dim {dim}, got shape {tuple(x.shape)}")
        return _pad(x, dim, self.padded - self.length).narrow(dim, self.sp.rank * self.local, self.local).contiguous()

    def gather(self, x: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """The full sequence from every rank's shard ``x`` (``local`` tokens on ``dim``), padding dropped."""
        if x.shape[dim] != self.local:
            raise ValueError(f"expected a shard of {self.local} tokens on dim {dim}, got shape {tuple(x.shape)}")
        return gather_tokens(x, self.sp, dim).narrow(dim, 0, self.length)


def _pad(x: torch.Tensor, dim: int, extra: int) -> torch.Tensor:
    if not extra:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


@dataclass(frozen=True)
class SequencePlan:
    """The shards of one transformer forward: text and image tokens, and the unsharded text mask.

    Attributes:
        text, image: the two streams' shards.
        text_mask: ``[B, L_text]`` bool key mask of the text tokens as the unsharded model gets it, or None.
    """

    text: TokenShard
    image: TokenShard
    text_mask: torch.Tensor | None = field(default=None, compare=False)

    @property
    def sp(self) -> SequenceParallel:
        return self.text.sp


def active_plan(where: str) -> SequencePlan:
    """The plan of the transformer forward in progress (set by the family's input hook)."""
    plan = ACTIVE_PLAN.get()
    if plan is None:
        raise RuntimeError(f"{where} ran outside a sequence-parallel transformer forward (no active plan)")
    return plan


Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def ulysses_attention(
    queries: Sequence[torch.Tensor],
    keys: Sequence[torch.Tensor],
    values: Sequence[torch.Tensor],
    shards: Sequence[TokenShard],
    attend: Attend,
) -> list[torch.Tensor]:
    """Attention over the full sequence of several token streams, from each rank's shards.

    Args:
        queries, keys, values: per stream, this rank's ``[B, local, H, D]`` shard, in the order the unsharded model
            concatenates the streams (Qwen-Image: text then image; SD3: image then text).
        shards: each stream's :class:`TokenShard` (same group).
        attend: the model's attention on full ``[B, H/S, L, D]`` queries, keys and values (``L`` the streams'
            unpadded lengths summed, in stream order), returning ``[B, H/S, L, D]``; it runs on exactly the
            tensors the unsharded model's attention gets, for this rank's heads.

    Returns:
        Per stream, this rank's ``[B, local, H, D]`` shard of the attention output.
    """
    sp = shards[0].sp
    local = [s.local for s in shards]
    qkv = torch.stack([torch.cat(list(t), dim=1) for t in (queries, keys, values)])  # [3, B, n, H, D]
    _, batch, n, heads, dim = qkv.shape
    h = heads // sp.size
    # [S, 3, B, n, h, D]: head group j goes to rank j; we receive every rank's tokens of our head group.
    received = all_to_all(qkv.view(3, batch, n, sp.size, h, dim).permute(3, 0, 1, 2, 4, 5), sp)
    streams = []
    for piece, shard in zip(received.split(local, dim=3), shards):
        full = piece.permute(1, 2, 0, 3, 4, 5).reshape(3, batch, shard.padded, h, dim)
        streams.append(full[:, :, : shard.length])
    q, k, v = torch.cat(streams, dim=2).unbind(0)  # [B, L, h, D] each
    out = attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)  # [B, L, h, D]
    back = []
    for part, shard in zip(out.split([s.length for s in shards], dim=1), shards):
        back.append(_pad(part, 1, shard.padded - shard.length).view(batch, sp.size, shard.local, h, dim))
    # [S, B, n, h, D]: the tokens of rank j go back to rank j; we receive our tokens of every head group.
    mine = all_to_all(torch.cat(back, dim=2).transpose(0, 1), sp)
    mine = mine.permute(1, 2, 0, 3, 4).reshape(batch, n, heads, dim)
    return list(mine.split(local, dim=1))


class HookHandle:
    """Undo for a family's sequence-parallel install: removes its hooks and puts the original processors back.

    :meth:`follow` keeps a forward hook on a child module that a LoRA may replace after the install (peft swaps a
    targeted ``nn.Linear`` for its LoRA layer); :meth:`refresh_followed`, called at the start of every forward, moves
    the hook onto the module in place now.
    """

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer
        self.hooks: list[Any] = []
        self.processors: dict[str, Any] = {}
        self._followed: list[list[Any]] = []  # [attribute name, hook, hooked module, hook handle]

    def set_processor(self, name: str, module: torch.nn.Module, processor: Any) -> None:
        self.processors.setdefault(name, module.processor)
        module.set_processor(processor)

    @classmethod
    def install_processor(
        cls, transformer: torch.nn.Module, attention: tuple[type, ...], processor: Any, family: str
    ) -> HookHandle:
        """Set ``processor`` on every attention module of ``transformer`` whose processor is one of ``attention``
        (the family's stock processors and its sequence-parallel one); returns the handle that undoes it.

        Raises ValueError naming the family when the transformer has no such module, or when a processor of
        ``processor``'s type is already installed.
        """
        targets = {
            name: module
            for name, module in transformer.named_modules()
            if isinstance(getattr(module, "processor", None), (*attention, type(processor)))
        }
        if not targets:
            raise ValueError(f"{type(transformer).__name__} has no {family} joint-attention modules")
        if any(type(module.processor) is type(processor) for module in targets.values()):
            raise ValueError("sequence parallelism is already installed on this transformer")
        handle = cls(transformer)
        for name, module in targets.items():
            handle.set_processor(name, module, processor)
        return handle

    def follow(self, attr: str, hook: Callable) -> None:
        """Keep ``hook`` as a forward hook of ``transformer.<attr>``, whatever module that is at each forward."""
        self._followed.append([attr, hook, None, None])
        self.refresh_followed()

    def refresh_followed(self) -> None:
        for entry in self._followed:
            attr, hook, hooked, handle = entry
            module = getattr(self.transformer, attr)
            if module is not hooked:
                if handle is not None:
                    handle.remove()
                entry[2], entry[3] = module, module.register_forward_hook(hook)

    def remove(self) -> None:
        for hook in self.hooks:
            hook.remove()
        for entry in self._followed:
            entry[3].remove()
        for name, processor in self.processors.items():
            self.transformer.get_submodule(name).set_processor(processor)
        self.hooks, self.processors, self._followed = [], {}, []
