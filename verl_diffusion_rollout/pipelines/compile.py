"""Regional ``torch.compile`` of a transformer's blocks, one graph per forward shape whatever the prompt lengths.

A forward batch must be replayed by the graph that sampled it: the trainer's log-probs equal the rollout's only if
both run the same kernels. With dynamo's defaults they do not: the first prompt length compiles a static graph,
the second one makes dynamo promote the text dimension to dynamic and build a second graph (automatic dynamic
shapes), and which of the two a later batch runs then depends on the history of the process (issue 19: a 2.16e-4
pre-update gap on an H200, bf16).

:func:`compile_blocks` compiles every block with automatic dynamic promotion off (``dynamic=False``) and, before
every block call, marks the dimensions the family declares variable (:meth:`DenoisingFamily.prepare_block_inputs
<verl_diffusion_rollout.pipelines.loop.DenoisingFamily.prepare_block_inputs>`: Qwen-Image's text tokens) dynamic.
So the first compile of a block already builds the graph every text length runs, nothing is promoted later, and
every other dimension (batch, image tokens) stays static: a given forward shape maps to exactly one graph, in the
rollout and in the replay. ``benchmarks/compile_text_length.py`` measures this against the alternative (text
padded to length buckets, static graphs).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["COMPILED_GRAPHS_PER_BLOCK", "CompiledBlocks", "compile_blocks", "mark_dynamic_dim",
           "set_activation_memory_budget"]

COMPILED_GRAPHS_PER_BLOCK = 64  # torch._dynamo recompile limit set when the blocks are compiled

# Called with a block call's arguments bound by name (``inspect.BoundArguments.arguments``); marks dimensions
# dynamic and may normalise optional inputs, in place.
BlockInputHook = Callable[[dict[str, Any]], None]


def mark_dynamic_dim(tensor: torch.Tensor | None, dim: int) -> None:
    """Mark ``tensor``'s dimension ``dim`` dynamic for the next compile (no-op for None; a size-0/1 dimension is
    left to dynamo, which specialises it rather than failing)."""
    if tensor is not None:
        torch._dynamo.maybe_mark_dynamic(tensor, dim)


def set_activation_memory_budget(budget: float) -> None:
    """Bound what the compiled blocks' training graphs keep for backward: AOT autograd's partitioner
    (``torch._functorch.config.activation_memory_budget``) saves at most ``budget`` (0..1) of the activations its
    runtime-optimal split would keep and recomputes the rest in the backward pass, cheapest first by FLOPs (so the
    elementwise ops before the matrix multiplies). 0 is whole-region recompute, 1 torch's default.

    The setting is process-wide and read when a graph compiles: call it before the first autograd-mode block call
    (graphs compiled earlier in the process keep their split). The forward values do not change, and the rollout's
    autograd-mode steps and the replay run the same forward graph, so replayed log-probs stay equal to the rollout's.
    """
    import torch._functorch.config as functorch_config

    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget <= 1:
        raise ValueError(f"activation memory budget must be a number in [0, 1], got {budget!r}")
    functorch_config.activation_memory_budget = float(budget)


@dataclass
class CompiledBlocks:
    """Undo for :func:`compile_blocks`: the blocks' own ``forward`` comes back."""

    blocks: list[torch.nn.Module] = field(default_factory=list)

    def remove(self) -> None:
        for block in self.blocks:
            block.__dict__.pop("forward", None)
        self.blocks = []


def compile_blocks(
    transformer: torch.nn.Module, prepare: BlockInputHook | None, *, backend: str = "inductor"
) -> CompiledBlocks:
    """Compile each of ``transformer.transformer_blocks`` (regional compilation) with no automatic dynamic shapes.

    Args:
        transformer: a diffusers DiT with ``transformer_blocks`` (Qwen-Image, SD3); peft layers inside are fine.
        prepare: the family's :meth:`~verl_diffusion_rollout.pipelines.loop.DenoisingFamily.prepare_block_inputs`,
            run (eagerly) on every block call before the compiled forward; None: nothing is marked dynamic.
        backend: ``torch.compile``'s backend (graphs, guards and recompiles are dynamo's whatever the backend).

    Returns:
        A handle whose ``remove()`` puts the eager forwards back.
    """
    # One compiled graph per distinct block structure (SD3.5's dual-attention and plain blocks, the last
    # context-pre-only block) x mode (inference, autograd, adapters off for a KL reference) x batch shape: more than
    # dynamo's default limit of 8, past which the remaining blocks would silently run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, COMPILED_GRAPHS_PER_BLOCK)
    handle = CompiledBlocks()
    for block in transformer.transformer_blocks:
        block.forward = _compiled_forward(block.forward, prepare, backend)  # an instance attribute: nn.Module calls it
        handle.blocks.append(block)
    return handle


def _compiled_forward(forward: Callable[..., Any], prepare: BlockInputHook | None, backend: str) -> Callable[..., Any]:
    compiled = torch.compile(forward, dynamic=False, backend=backend)
    if prepare is None:
        return compiled
    signature = inspect.signature(forward)

    def call(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)  # diffusers calls blocks by keyword, gradient checkpointing by position
        prepare(bound.arguments)
        return compiled(*bound.args, **bound.kwargs)

    return call
