"""A rollout's three stages as deployable roles, and what the stages hand each other.

A rollout encodes the prompts (text encoders), denoises (the transformer) and decodes the final latents (the VAE).
A ``monolithic`` engine loads every module and runs all three; an ``encoder``, ``denoiser`` or ``decoder`` engine
loads only its stage's modules (the others are never read from disk), so each stage can sit where it fits and its
memory is only its own (sglang's role-based component loading). What crosses between them:

* encoder -> denoiser: the denoising environment, one row per prompt (the contract's ``prompt_embeds``,
  ``prompt_embeds_mask``, the negative ones with CFG, SD3's pooled ones); :func:`expand_env` repeats each row for
  the ``n`` samples of its group exactly as a monolithic rollout stacks them;
* denoiser -> decoder: a :class:`DenoisedBatch`, the rollout contract without ``responses``; its
  :attr:`~DenoisedBatch.final_latents` are what the decoder takes, and :meth:`~DenoisedBatch.with_images` gives the
  full :class:`~verl_diffusion_rollout.contract.RolloutBatch`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch

from .config import DiffusionSamplingConfig
from .contract import RolloutBatch
from .errors import RoleMismatch

__all__ = [
    "Role",
    "ROLE_NAMES",
    "STAGES",
    "parse_role",
    "check_role_serves",
    "expand_env",
    "DenoisedBatch",
]


class Role(str, Enum):
    """Which stages an engine (or server) loads and serves."""

    MONOLITHIC = "monolithic"
    ENCODER = "encoder"
    DENOISER = "denoiser"
    DECODER = "decoder"


ROLE_NAMES: tuple[str, ...] = tuple(r.value for r in Role)

# stage -> (roles that serve it, what a request of that stage sends, where to send it instead)
STAGES: dict[str, tuple[tuple[Role, ...], str, str]] = {
    "generate": (
        (Role.MONOLITHIC,),
        "generate from prompts",
        "a monolithic server generates from prompts; with roles, encode on an encoder (POST /rollout/encode) and "
        "send the embeddings ('env') to a denoiser, or chain all three with verl_diffusion_rollout.roles."
        "DisaggregatedClient",
    ),
    "encode": ((Role.MONOLITHIC, Role.ENCODER), "encode prompts", "send prompts to an encoder or monolithic server"),
    "denoise": (
        (Role.MONOLITHIC, Role.DENOISER),
        "denoise (it has no transformer)",
        "send prompt embeddings to a denoiser or monolithic server",
    ),
    "decode": ((Role.MONOLITHIC, Role.DECODER), "decode latents", "send final latents to a decoder or monolithic server"),
    "weights": (
        (Role.MONOLITHIC, Role.DENOISER),
        "take weight updates or a trainer (the weights are the transformer's)",
        "sync the weights to the denoiser",
    ),
}


def parse_role(value: Role | str) -> Role:
    """``"denoiser"`` / ``Role.DENOISER`` -> ``Role.DENOISER``; anything else raises ``ValueError`` naming the choices."""
    if isinstance(value, Role):
        return value
    if isinstance(value, str) and value in ROLE_NAMES:
        return Role(value)
    raise ValueError(f"role must be one of {list(ROLE_NAMES)}, got {value!r}")


def check_role_serves(role: Role, stage: str, modules: Sequence[str]) -> None:
    """Raise :class:`~verl_diffusion_rollout.errors.RoleMismatch` unless ``role`` serves ``stage`` (a key of
    :data:`STAGES`); the message names the role, its loaded ``modules`` and where to send the request."""
    roles, what, hint = STAGES[stage]
    if role not in roles:
        raise RoleMismatch(
            f"the {role.value!r} role (modules: {', '.join(modules) or 'none'}) cannot {what}; {hint}"
        )


def expand_env(env: Mapping[str, torch.Tensor | None], n: int) -> dict[str, torch.Tensor | None]:
    """Per-prompt rows ``[P, ...]`` -> per-sample rows ``[P * n, ...]``, each row repeated ``n`` times in a row (a GRPO
    group's samples are consecutive); None stays None. The same values a monolithic rollout stacks per sample."""
    return {key: None if value is None else value.repeat_interleave(n, dim=0) for key, value in env.items()}


@dataclass
class DenoisedBatch:
    """A denoiser's output: every tensor of the rollout contract but ``responses`` (shapes as in
    :mod:`verl_diffusion_rollout.contract`), on the CPU.

    ``env`` holds the family's denoising environment per sample (None where absent, e.g. without CFG).
    """

    all_latents: torch.Tensor
    all_timesteps: torch.Tensor
    all_sigmas: torch.Tensor
    rollout_log_probs: torch.Tensor
    sde_mask: torch.Tensor
    seeds: torch.Tensor
    prompts: list[str]
    sampling: DiffusionSamplingConfig
    env: dict[str, torch.Tensor | None]
    family: str
    debug: dict[str, torch.Tensor] = field(default_factory=dict)
    weight_version: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def __len__(self) -> int:
        return self.seeds.shape[0]

    @property
    def final_latents(self) -> torch.Tensor:
        """``[B, L, D]`` (or ``[B, C, h, w]``) float32 x_0, the latent the decoder turns into the image."""
        return self.all_latents[:, -1]

    def to_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor by contract key (``responses`` excepted; environment keys only where present)."""
        out = {
            "all_latents": self.all_latents,
            "all_timesteps": self.all_timesteps,
            "all_sigmas": self.all_sigmas,
            "rollout_log_probs": self.rollout_log_probs,
            "sde_mask": self.sde_mask,
            "seeds": self.seeds,
        }
        out.update({key: value for key, value in self.env.items() if value is not None})
        out.update(self.debug)
        return out

    def with_images(self, images: torch.Tensor, timings: Mapping[str, float] | None = None) -> RolloutBatch:
        """The full :class:`RolloutBatch` once ``images`` (``[B, 3, H, W]`` float32 in [0, 1]) are decoded;
        ``timings`` are added to this batch's."""
        if images.shape[0] != len(self):
            raise ValueError(f"got {images.shape[0]} images for a denoised batch of {len(self)} samples")
        return RolloutBatch(
            responses=images,
            all_latents=self.all_latents,
            all_timesteps=self.all_timesteps,
            all_sigmas=self.all_sigmas,
            rollout_log_probs=self.rollout_log_probs,
            sde_mask=self.sde_mask,
            seeds=self.seeds,
            prompts=list(self.prompts),
            sampling=self.sampling,
            debug=dict(self.debug),
            weight_version=self.weight_version,
            timings={**self.timings, **(timings or {})},
            family=self.family,
            **self.env,
        )
