"""Sequence parallelism (Ulysses) for the diffusion transformers: the group, its collectives, token shards and the
attention over them. Each model family installs it on its transformer (``DenoisingFamily.use_sequence_parallel``);
nothing here knows a model."""

from .collectives import SequenceParallel, all_to_all, check_heads, gather_tokens
from .ulysses import ACTIVE_PLAN, PLAN_KWARG, HookHandle, SequencePlan, TokenShard, active_plan, ulysses_attention

__all__ = [
    "ACTIVE_PLAN",
    "PLAN_KWARG",
    "HookHandle",
    "SequenceParallel",
    "SequencePlan",
    "TokenShard",
    "active_plan",
    "all_to_all",
    "check_heads",
    "gather_tokens",
    "ulysses_attention",
]
