"""The rollout -> trainer data contract: :class:`RolloutBatch`.

Key names follow verl's own diffusion stack (now verl-omni) so trainers written for it read ours unchanged.
Per sample ``b`` and ``T`` sampling steps:

=================================  ===========================  ==============================================
key                                shape, dtype                 meaning
=================================  ===========================  ==============================================
``responses``                      [B, 3, H, W] fp32 in [0, 1]  decoded images
``all_latents``                    [B, T+1, L, D] fp32          packed latents x_T .. x_0
``all_timesteps``                  [B, T] fp32                  scheduler timesteps (sigma * 1000)
``all_sigmas``                     [B, T+1] fp32                the sigma schedule, final 0 included
``rollout_log_probs``              [B, T] fp32                  per-step log-prob, 0 where not stochastic
``sde_mask``                       [B, T] bool                  which steps were stochastic
``prompt_embeds``                  [B, S, E] model dtype        text embeddings the transformer saw
``prompt_embeds_mask``             [B, S] int64                 1 for real tokens
``negative_prompt_embeds(_mask)``  [B, S', E] / [B, S']         present when true CFG is on
``seeds``                          [B] int64                    per-sample seed
=================================  ===========================  ==============================================

Debug tensors (``return_debug``): ``prev_sample_mean`` / ``variance_noise`` / ``model_output`` [B, T, L, D] fp32
and ``noise_std`` [B, T] fp32 (zeros at deterministic steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .config import DiffusionSamplingConfig

__all__ = ["RolloutBatch", "CONTRACT_KEYS", "ENV_KEYS", "DEBUG_KEYS"]

ENV_KEYS: tuple[str, ...] = (
    "prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
)
CONTRACT_KEYS: tuple[str, ...] = (
    "responses",
    "all_latents",
    "all_timesteps",
    "all_sigmas",
    "rollout_log_probs",
    "sde_mask",
    "prompt_embeds",
    "prompt_embeds_mask",
    "seeds",
)
DEBUG_KEYS: tuple[str, ...] = ("prev_sample_mean", "noise_std", "variance_noise", "model_output")


@dataclass
class RolloutBatch:
    """One rollout's samples, trajectory and denoising environment (see the module docstring for shapes).

    ``prompts`` holds one prompt per sample (a GRPO group repeats its prompt ``n`` times, consecutively).
    """

    responses: torch.Tensor
    all_latents: torch.Tensor
    all_timesteps: torch.Tensor
    all_sigmas: torch.Tensor
    rollout_log_probs: torch.Tensor
    sde_mask: torch.Tensor
    prompt_embeds: torch.Tensor
    prompt_embeds_mask: torch.Tensor
    seeds: torch.Tensor
    prompts: list[str]
    sampling: DiffusionSamplingConfig
    negative_prompt_embeds: torch.Tensor | None = None
    negative_prompt_embeds_mask: torch.Tensor | None = None
    debug: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seeds.shape[0]

    @property
    def num_steps(self) -> int:
        return self.all_timesteps.shape[1]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the contract by key (negative embeddings only with CFG, debug tensors if asked)."""
        out = {key: getattr(self, key) for key in CONTRACT_KEYS}
        if self.negative_prompt_embeds is not None:
            out["negative_prompt_embeds"] = self.negative_prompt_embeds
            out["negative_prompt_embeds_mask"] = self.negative_prompt_embeds_mask
        out.update(self.debug)
        return out

    def meta(self) -> dict[str, Any]:
        """The non-tensor facts a trainer needs next to the tensors (goes to DataProto ``meta_info``)."""
        return {
            "weight_version": self.weight_version,
            "timing": dict(self.timings),
            "sampling": self.sampling.to_dict(),
        }

    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        prompts: Sequence[str],
        sampling: DiffusionSamplingConfig | dict[str, Any],
        weight_version: int = 0,
        timings: dict[str, float] | None = None,
    ) -> RolloutBatch:
        """Rebuild a batch from :meth:`to_dict` output (e.g. a DataProto's tensors and ``meta_info``)."""
        missing = [key for key in CONTRACT_KEYS if key not in tensors]
        if missing:
            raise KeyError(f"rollout batch is missing contract keys {missing}")
        if isinstance(sampling, dict):
            sampling = DiffusionSamplingConfig(**{k: v for k, v in sampling.items() if k != "_target_"})
        known = set(CONTRACT_KEYS) | set(ENV_KEYS)
        return cls(
            **{key: tensors[key] for key in CONTRACT_KEYS},
            negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
            negative_prompt_embeds_mask=tensors.get("negative_prompt_embeds_mask"),
            debug={k: v for k, v in tensors.items() if k not in known},
            prompts=list(prompts),
            sampling=sampling,
            weight_version=weight_version,
            timings=dict(timings or {}),
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Samples of several batches in one; prompt embeddings are right-padded (mask 0) to the longest.

        All batches must share the sampling config. Padding is exact for the transformer (padded tokens are
        masked), though a padded batch may round differently from its parts.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        first = batches[0]
        if any(b.sampling != first.sampling for b in batches[1:]):
            raise ValueError("cannot concat rollout batches sampled with different configs")
        if any((b.negative_prompt_embeds is None) != (first.negative_prompt_embeds is None) for b in batches):
            raise ValueError("cannot concat batches with and without negative prompt embeddings")
        dicts = [b.to_dict() for b in batches]
        tensors = {}
        for key in dicts[0]:
            parts = [d[key] for d in dicts]
            if key in ENV_KEYS:
                length = max(p.shape[1] for p in parts)
                parts = [torch.nn.functional.pad(p, (0, 0, 0, length - p.shape[1]) if p.ndim == 3 else (0, length - p.shape[1])) for p in parts]
            tensors[key] = torch.cat(parts)
        timings = {k: sum(b.timings.get(k, 0.0) for b in batches) for k in first.timings}
        return RolloutBatch.from_dict(
            tensors,
            [p for b in batches for p in b.prompts],
            first.sampling,
            weight_version=min(b.weight_version for b in batches),
            timings=timings,
        )

    def select(self, index: Sequence[int] | torch.Tensor) -> RolloutBatch:
        """The samples at ``index``, in that order (tensors indexed on dim 0)."""
        idx = torch.as_tensor(index, dtype=torch.long)
        tensors = {key: value.index_select(0, idx) for key, value in self.to_dict().items()}
        return RolloutBatch.from_dict(
            tensors,
            [self.prompts[i] for i in idx.tolist()],
            self.sampling,
            weight_version=self.weight_version,
            timings=self.timings,
        )
