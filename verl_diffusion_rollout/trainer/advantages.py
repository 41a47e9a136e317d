"""GRPO advantages: each sample's reward against its prompt group."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["GroupAdvantages", "group_advantages"]


@dataclass
class GroupAdvantages:
    """Advantages and which samples to train on.

    Attributes:
        advantages: ``[B]`` float32, ``(r - mean_group) / (std + eps)`` clipped to ``±clip_max``.
        keep: ``[B]`` bool, False for samples of groups whose rewards are all equal (no learning signal).
        zero_std_fraction: fraction of groups dropped for having equal rewards.
    """

    advantages: torch.Tensor
    keep: torch.Tensor
    zero_std_fraction: float


def group_advantages(
    rewards: torch.Tensor,
    group_ids: Sequence[int] | torch.Tensor,
    *,
    global_std: bool = False,
    clip_max: float = 5.0,
    eps: float = 1e-4,
    drop_equal_groups: bool = True,
) -> GroupAdvantages:
    """Per-group normalized advantages (FlowGRPO / GRPO).

    Args:
        rewards: ``[B]`` rewards.
        group_ids: ``[B]`` group of each sample (samples of one prompt share an id).
        global_std: divide by the std of all rewards instead of the group's (FlowGRPO's ``global_std``).
        clip_max: clip advantages to ``[-clip_max, clip_max]``.
        eps: added to the std.
        drop_equal_groups: mark samples of groups with identical rewards as not kept.
    """
    rewards = torch.as_tensor(rewards, dtype=torch.float64).flatten()
    ids = torch.as_tensor(group_ids).flatten()
    if ids.shape != rewards.shape:
        raise ValueError(f"group_ids has {ids.numel()} entries for {rewards.numel()} rewards")
    if not torch.isfinite(rewards).all():
        raise ValueError(f"rewards must be finite, got {rewards.tolist()}")
    advantages = torch.zeros_like(rewards)
    keep = torch.ones_like(rewards, dtype=torch.bool)
    std_all = rewards.std(unbiased=False)
    groups = ids.unique()
    dropped = 0
    for g in groups:
        member = ids == g
        r = rewards[member]
        if r.numel() < 2:
            raise ValueError(f"group {int(g)} has {r.numel()} sample; GRPO needs at least 2 per group")
        std = std_all if global_std else r.std(unbiased=False)
        advantages[member] = (r - r.mean()) / (std + eps)
        if drop_equal_groups and bool((r == r[0]).all()):
            keep[member] = False
            advantages[member] = 0.0
            dropped += 1
    advantages = advantages.clamp(-clip_max, clip_max).float()
    return GroupAdvantages(advantages=advantages, keep=keep, zero_std_fraction=dropped / max(len(groups), 1))
