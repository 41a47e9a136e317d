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
``sde_mask``                       [B, T] bool                  which steps were stochastic, per sample
``prompt_embeds``                  [B, S, E] model dtype        text embeddings the transformer saw
``prompt_embeds_mask``             [B, S] int64                 1 for real tokens
``negative_prompt_embeds(_mask)``  [B, S', E] / [B, S']         present when CFG is on
``pooled_prompt_embeds``           [B, P] model dtype           SD3 only: pooled CLIP embeddings
``negative_pooled_prompt_embeds``  [B, P] model dtype           SD3 only, with CFG
``seeds``                          [B] int64                    per-sample seed
=================================  ===========================  ==============================================

``L, D`` stand for the latent's shape as the family's transformer takes it: ``[L, D]`` packed tokens for
Qwen-Image, ``[C, h, w]`` for SD3. The model family that produced a batch (``"qwenimage"``, ``"sd3"``) rides in
``meta_info["family"]``; it selects how the trainer replays the steps.

Debug tensors (``return_debug``): ``prev_sample_mean`` / ``variance_noise`` / ``model_output`` [B, T, L, D] fp32
and ``noise_std`` [B, T] fp32 (zeros at deterministic steps).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .config import DiffusionSamplingConfig

__all__ = [
    "RolloutBatch",
    "CONTRACT_KEYS",
    "ENV_KEYS",
    "SEQUENCE_ENV_KEYS",
    "DEBUG_KEYS",
    "FAMILY_ENV_KEYS",
    "infer_family",
    "pad_tokens",
    "stack_padded",
    "cat_padded",
    "WINDOW_FIELDS",
]

# Text inputs with a token axis (dim 1): right-padded with zeros (mask 0) when batches of different lengths meet.
SEQUENCE_ENV_KEYS: tuple[str, ...] = (
    "prompt_embeds",
    "prompt_embeds_mask",
    "negative_prompt_embeds",
    "negative_prompt_embeds_mask",
)
# The denoising environment of each model family: what the transformer needs besides the latent and timestep.
FAMILY_ENV_KEYS: dict[str, tuple[str, ...]] = {
    "qwenimage": SEQUENCE_ENV_KEYS,
    "sd3": (*SEQUENCE_ENV_KEYS, "pooled_prompt_embeds", "negative_pooled_prompt_embeds"),
}
ENV_KEYS: tuple[str, ...] = tuple(dict.fromkeys(k for keys in FAMILY_ENV_KEYS.values() for k in keys))
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
# Sampling fields that only say how the SDE window was chosen. Its outcome is recorded per sample in ``sde_mask``,
# which is what the trainer replays, so batches that differ only in these concatenate.
WINDOW_FIELDS: tuple[str, ...] = ("sde_window", "sde_window_size", "sde_window_range")


def _sampling_differences(first: DiffusionSamplingConfig, other: DiffusionSamplingConfig) -> list[str]:
    """Fields (other than :data:`WINDOW_FIELDS`) in which two sampling configs differ, as ``name (a vs b)``.

    ``log_prob_no_const`` is compared resolved (``None`` means FlowGRPO's convention for the ``sde_type``).
    """
    out = []
    for f in fields(first):
        if f.name in WINDOW_FIELDS or f.name == "_target_":
            continue
        if f.name == "log_prob_no_const":
            a, b = first.resolved_log_prob_no_const(), other.resolved_log_prob_no_const()
        else:
            a, b = getattr(first, f.name), getattr(other, f.name)
        if a != b:
            out.append(f"sampling.{f.name} ({a!r} vs {b!r})")
    return out


def infer_family(tensors: dict[str, Any]) -> str:
    """The family of a batch that does not name one: SD3 carries pooled embeddings, Qwen-Image does not."""
    return "sd3" if tensors.get("pooled_prompt_embeds") is not None else "qwenimage"


def pad_tokens(t: torch.Tensor, length: int) -> torch.Tensor:
    """Right-pad ``[B, S, E]`` embeddings or ``[B, S]`` masks with zeros on the token axis up to ``length``."""
    pad = length - t.shape[1]
    if pad < 0:
        raise ValueError(f"cannot pad {t.shape[1]} tokens down to {length}")
    if pad == 0:
        return t
    return torch.nn.functional.pad(t, (0, 0, 0, pad) if t.ndim == 3 else (0, pad))


def stack_padded(rows: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``[S_b, E]`` embeddings into ``[B, max S_b, E]`` (zeros after each row) and its ``[B, S]`` int64 mask."""
    length = max(r.shape[0] for r in rows)
    embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
    mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
    for b, r in enumerate(rows):
        embeds[b, : r.shape[0]] = r
        mask[b, : r.shape[0]] = 1
    return embeds, mask


def cat_padded(key: str, values: Sequence[torch.Tensor]) -> torch.Tensor:
    """Concatenate one contract key's tensors on the batch axis; token axes of text inputs are right-padded."""
    if key in SEQUENCE_ENV_KEYS:
        length = max(v.shape[1] for v in values)
        values = [pad_tokens(v, length) for v in values]
    return torch.cat(list(values))


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
    pooled_prompt_embeds: torch.Tensor | None = None
    negative_pooled_prompt_embeds: torch.Tensor | None = None
    debug: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    family: str | None = None

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = infer_family({"pooled_prompt_embeds": self.pooled_prompt_embeds})
        if self.family not in FAMILY_ENV_KEYS:
            raise ValueError(f"unknown model family {self.family!r}; known: {sorted(FAMILY_ENV_KEYS)}")
        if self.family == "sd3" and self.pooled_prompt_embeds is None:
            raise ValueError("an sd3 rollout batch needs pooled_prompt_embeds")

    def __len__(self) -> int:
        return self.seeds.shape[0]

    @property
    def num_steps(self) -> int:
        return self.all_timesteps.shape[1]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the contract by key (negative embeddings only with CFG, debug tensors if asked)."""
        out = {key: getattr(self, key) for key in CONTRACT_KEYS}
        for key in ENV_KEYS:
            value = getattr(self, key)
            if key not in out and value is not None:
                out[key] = value
        out.update(self.debug)
        return out

    def env(self) -> dict[str, torch.Tensor | None]:
        """The denoising environment of this batch's family, by key (None where absent, e.g. without CFG)."""
        return {key: getattr(self, key) for key in FAMILY_ENV_KEYS[self.family]}

    def meta(self) -> dict[str, Any]:
        """The non-tensor facts a trainer needs next to the tensors (goes to DataProto ``meta_info``)."""
        return {
            "weight_version": self.weight_version,
            "timing": dict(self.timings),
            "sampling": self.sampling.to_dict(),
            "family": self.family,
        }

    @classmethod
    def from_dict(
        cls,
        tensors: dict[str, torch.Tensor],
        prompts: Sequence[str],
        sampling: DiffusionSamplingConfig | dict[str, Any],
        weight_version: int = 0,
        timings: dict[str, float] | None = None,
        family: str | None = None,
    ) -> RolloutBatch:
        """Rebuild a batch from :meth:`to_dict` output (e.g. a DataProto's tensors and ``meta_info``).

        ``family`` comes from ``meta_info["family"]``; without it the family is inferred from the tensors.
        """
        missing = [key for key in CONTRACT_KEYS if key not in tensors]
        if missing:
            raise KeyError(f"rollout batch is missing contract keys {missing}")
        if isinstance(sampling, dict):
            sampling = DiffusionSamplingConfig(**{k: v for k, v in sampling.items() if k != "_target_"})
        known = set(CONTRACT_KEYS) | set(ENV_KEYS)
        return cls(
            **{key: tensors[key] for key in CONTRACT_KEYS},
            **{key: tensors.get(key) for key in ENV_KEYS if key not in CONTRACT_KEYS},
            debug={k: v for k, v in tensors.items() if k not in known},
            prompts=list(prompts),
            sampling=sampling,
            weight_version=weight_version,
            timings=dict(timings or {}),
            family=family,
        )

    @staticmethod
    def concat(batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Samples of several batches in one; prompt embeddings are right-padded (mask 0) to the longest.

        The batches must agree on everything the replay depends on: every sampling field except the window fields
        (:data:`WINDOW_FIELDS`), the model family, and whether negative embeddings are present; otherwise
        ``ValueError`` names what differs. Their SDE windows may differ: each sample keeps its own ``sde_mask`` row,
        which the trainer replays per sample; the result's sampling config then records the union of the windows
        as ``sde_window``. Padding is exact for the transformer (padded tokens are masked), though a padded batch
        may round differently from its parts.
        """
        if not batches:
            raise ValueError("concat needs at least one batch")
        first = batches[0]
        for n, b in enumerate(batches[1:], start=1):
            differences = _sampling_differences(first.sampling, b.sampling)
            if differences:
                raise ValueError(
                    f"cannot concat rollout batches sampled with different configs: batch {n} differs from batch 0 "
                    f"in {', '.join(differences)}"
                )
        sampling = first.sampling
        windows = {tuple(repr(getattr(b.sampling, k)) for k in WINDOW_FIELDS) for b in batches}
        if len(windows) > 1:
            union = torch.cat([b.sde_mask for b in batches]).any(dim=0).nonzero().flatten().tolist()
            sampling = sampling.replace(sde_window=union or None, sde_window_size=0, sde_window_range=None)
        families = sorted({b.family for b in batches})
        if len(families) > 1:
            raise ValueError(f"cannot concat rollout batches of different model families {families}")
        if any((b.negative_prompt_embeds is None) != (first.negative_prompt_embeds is None) for b in batches):
            raise ValueError("cannot concat batches with and without negative prompt embeddings")
        dicts = [b.to_dict() for b in batches]
        tensors = {key: cat_padded(key, [d[key] for d in dicts]) for key in dicts[0]}
        timings = {k: sum(b.timings.get(k, 0.0) for b in batches) for k in first.timings}
        return RolloutBatch.from_dict(
            tensors,
            [p for b in batches for p in b.prompts],
            sampling,
            weight_version=min(b.weight_version for b in batches),
            timings=timings,
            family=first.family,
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
            family=self.family,
        )
