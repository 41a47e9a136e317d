"""Disaggregated rollouts: an encoder, a denoiser and a decoder server chained over HTTP.

    encoder = python -m verl_diffusion_rollout.server --model-path M --role encoder  --port 8001
    denoiser= python -m verl_diffusion_rollout.server --model-path M --role denoiser --port 8002
    decoder = python -m verl_diffusion_rollout.server --model-path M --role decoder  --port 8003

    with DisaggregatedClient("HOST:8001", "HOST:8002", "HOST:8003", api_key=KEY) as client:
        batch = client.generate(["a red cat"], n=4, seeds=[1, 2, 3, 4])   # a RolloutBatch

The chain gives what one monolithic server gives for the same seeds, bit for bit (images, latents, log-probs, the
denoising environment): every tensor crosses HTTP exactly, and each stage computes what the monolithic rollout
computes. Bodies: :mod:`verl_diffusion_rollout.role_protocol`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import httpx
import torch

from .config import DiffusionSamplingConfig
from .contract import FAMILY_ENV_KEYS, RolloutBatch
from .role_protocol import DecodeRequest, EmbeddingsGenerateRequest, EncodeRequest, env_from_json, stack_entries
from .serialization import tensor_from_json, tensor_to_json
from .stages import DenoisedBatch, Role, expand_env

__all__ = ["DisaggregatedClient", "StageError", "Role"]

_PER_SAMPLE_KEYS = ("rollout_log_probs", "sde_mask", "all_timesteps", "all_sigmas", "all_latents")


class StageError(RuntimeError):
    """A stage server refused or failed a request; ``status`` is its HTTP status, the message its detail."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def _base_url(address: str) -> str:
    return address if address.startswith(("http://", "https://")) else f"http://{address}"


class DisaggregatedClient:
    """Runs rollouts through an encoder, a denoiser and a decoder server (each may also be monolithic).

    Args:
        encoder, denoiser, decoder: ``host:port`` or URLs of the three servers.
        api_key: sent as ``Authorization: Bearer <key>`` to all three (servers with a key refuse anything else).
        timeout: seconds per HTTP request.
    """

    def __init__(self, encoder: str, denoiser: str, decoder: str, *, api_key: str | None = None, timeout: float = 600.0):
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._clients = {
            stage: httpx.Client(base_url=_base_url(address), headers=headers, timeout=timeout)
            for stage, address in (("encoder", encoder), ("denoiser", denoiser), ("decoder", decoder))
        }

    def __enter__(self) -> DisaggregatedClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        for client in self._clients.values():
            client.close()

    def _post(self, stage: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        client = self._clients[stage]
        response = client.post(path, json=body)
        if response.status_code != 200:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise StageError(f"{stage} {client.base_url}{path} answered {response.status_code}: {detail}",
                             response.status_code)
        return response.json()

    def health(self) -> dict[str, dict[str, Any]]:
        """``GET /health`` of each stage server (its ``role`` and loaded ``modules``), by stage."""
        return {stage: client.get("/health").raise_for_status().json() for stage, client in self._clients.items()}

    # -- the stages ---------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str], sampling: DiffusionSamplingConfig | dict[str, Any] | None = None) -> dict[str, Any]:
        """The encoder's answer: ``family``, ``sampling`` (the full config it used) and ``env`` (tensors, one row per
        prompt)."""
        body = EncodeRequest(prompts=list(prompts), sampling=_sampling_dict(sampling)).model_dump()
        out = self._post("encoder", "/rollout/encode", body)
        out["env"] = env_from_json(out["env"])
        return out

    def denoise(
        self,
        env: dict[str, Any],
        prompts: Sequence[str],
        *,
        sampling: DiffusionSamplingConfig | dict[str, Any],
        n: int = 1,
        seeds: Sequence[int] | None = None,
        window_seed: int | None = None,
        family: str,
    ) -> DenoisedBatch:
        """The denoiser's rollout from one row of ``env`` per prompt; the environment is repeated per sample here
        exactly as the denoiser repeats it (so it need not travel back)."""
        body = EmbeddingsGenerateRequest(
            env={key: tensor_to_json(value) for key, value in env.items() if value is not None},
            prompts=list(prompts), seeds=None if seeds is None else [int(s) for s in seeds], n=n,
            sampling=_sampling_dict(sampling), window_seed=window_seed, return_env=False, return_trajectory=True,
            return_debug=bool(_sampling_dict(sampling).get("return_debug", False)),
        ).model_dump()
        out = self._post("denoiser", "/rollout/generate", body)
        if out["family"] != family or family not in FAMILY_ENV_KEYS:
            raise StageError(f"the denoiser serves the {out['family']!r} family, the encoder {family!r}", 200)
        samples = out["samples"]
        tensors = stack_entries(samples, _PER_SAMPLE_KEYS)
        debug_keys = list(samples[0].get("debug", {}))
        debug = stack_entries([s["debug"] for s in samples], debug_keys) if debug_keys else {}
        full_env = expand_env({key: env.get(key) for key in FAMILY_ENV_KEYS[family]}, n)
        return DenoisedBatch(
            **tensors,
            seeds=torch.tensor([s["seed"] for s in samples], dtype=torch.int64),
            prompts=[s["prompt"] for s in samples],
            sampling=DiffusionSamplingConfig(**out["sampling"]),
            env=full_env,
            family=out["family"],
            debug=debug,
            weight_version=out["weight_version"],
            timings=dict(out["timing"]),
        )

    def decode(self, latents: Any, sampling: DiffusionSamplingConfig | dict[str, Any]) -> tuple[Any, dict[str, float]]:
        """The decoder's images ``[B, 3, H, W]`` of final latents, and its timing."""
        body = DecodeRequest(latents=tensor_to_json(latents), sampling=_sampling_dict(sampling)).model_dump()
        out = self._post("decoder", "/rollout/decode", body)
        return tensor_from_json(out["images"]), out["timing"]

    # -- the chain ----------------------------------------------------------------------------------------------

    def generate(
        self,
        prompts: Sequence[str],
        *,
        n: int = 1,
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | dict[str, Any] | None = None,
        window_seed: int | None = None,
    ) -> RolloutBatch:
        """Encode -> denoise -> decode ``n`` samples per prompt; the :class:`RolloutBatch` a monolithic server
        returns for the same seeds. The encoder's full sampling config is sent on to the other two, so all three
        sample with the same values whatever their defaults."""
        start = time.perf_counter()
        encoded = self.encode(prompts, sampling)
        resolved = encoded["sampling"]
        denoised = self.denoise(
            encoded["env"], prompts, sampling=resolved, n=n, seeds=seeds, window_seed=window_seed,
            family=encoded["family"],
        )
        images, decode_timing = self.decode(denoised.final_latents, resolved)
        timings = {"encode_s": encoded["timing"]["encode_s"], **decode_timing}
        batch = denoised.with_images(images, timings)
        batch.timings["total_s"] = time.perf_counter() - start
        return batch


def _sampling_dict(sampling: DiffusionSamplingConfig | dict[str, Any] | None) -> dict[str, Any]:
    if sampling is None:
        return {}
    if isinstance(sampling, DiffusionSamplingConfig):
        return sampling.to_dict()
    return dict(sampling)

