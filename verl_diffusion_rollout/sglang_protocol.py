"""sglang's post-training rollout protocol, translated to this package's request and back from its
:class:`~verl_diffusion_rollout.contract.RolloutBatch`.

The server answers ``POST /rollout/generate`` in sglang's protocol when the body is sglang's ``RolloutRequest``
(sglang ``python/sglang/multimodal_gen/runtime/entrypoints/post_training/``: ``io_struct.py``, ``rollout_api.py``,
``utils.py``; release 0.5.23). What follows sglang there:

* One prompt, ``num_outputs_per_prompt`` samples (1 when absent); sample ``i`` is seeded ``seed + i`` and ``seed``
  is 42 when absent. Absent sizes, steps, guidance and negative prompt take the server's defaults. The CFG scale is
  ``true_cfg_scale`` when given, else ``guidance_scale``.
* ``rollout=false`` samples the plain deterministic (Euler) path and returns only ``generated_output``.
* ``rollout_sde_step_indices``: the stochastic steps, every step when absent; the other steps are ODE steps with
  log-prob 0. ``rollout_return_step_indices`` filters the trajectory's latents and timesteps (index ``T`` is the
  final latent).
* The answer is a list of ``RolloutResponse`` objects, one per sample, in seed order. Each sample gets its slice:
  ``generated_output`` ``[3, 1, H, W]`` in ``[0, 1]``, ``rollout_log_probs`` ``[T]``, the debug tensors
  (``rollout_variance_noises`` / ``rollout_prev_sample_means`` / ``rollout_model_outputs`` ``[T, ...]``,
  ``rollout_noise_std_devs`` ``[T, 1]``; ``rollout_debug_mode`` is on by default, as in sglang), ``denoising_env``
  and ``dit_trajectory``: ``latents`` ``[T+1, ...]``, ``timesteps`` ``[T+1]`` (sglang records the final latent's
  timestep, 0, with it) and ``sigmas`` ``[T+1]`` (shared by all samples). ``request_id``, ``prompt`` and the
  request's ``seed`` are the same in every entry.
* Tensors are ``{"__tensor__": true, "data": ..., "shape": [...], "dtype": "torch.float32"}`` with ``data`` the
  safetensors serialization of ``{"t": tensor}``: raw bytes in a msgpack answer, base64 text in a JSON one.

Which protocol a body speaks: sglang's keys and this server's own (:class:`~verl_diffusion_rollout.server.
GenerateRequest`) are disjoint (``prompt``/``prompts``, ``seed``/``seeds``...). A body with only sglang's keys is
sglang's; one with keys of both is refused naming them; anything else is validated as the server's own.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable
from dataclasses import dataclass, fields
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from .config import DiffusionSamplingConfig
from .contract import RolloutBatch
from .engines.base import MAX_SEED
from .sde import SDE_TYPES
from .serialization import named_tensors_to_bytes

__all__ = [
    "SglangRolloutRequest",
    "SglangRolloutResponse",
    "SglangCall",
    "SGLANG_KEYS",
    "OWN_EXTRA_KEYS",
    "DEFAULT_SEED",
    "MSGPACK_MEDIA_TYPE",
    "speaks_sglang",
    "translate_request",
    "tensor_envelope",
    "rollout_responses",
    "wants_msgpack",
    "encode_msgpack",
]

DEFAULT_SEED = 42  # sglang's SamplingParams.seed
MSGPACK_MEDIA_TYPE = "application/msgpack"
_MSGPACK_TYPES = (MSGPACK_MEDIA_TYPE, "application/x-msgpack")


class SglangRolloutRequest(BaseModel):
    """sglang's ``RolloutRequest``: its fields, names and defaults (strict types; unknown keys are refused)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str
    negative_prompt: str | None = None
    seed: int | None = None
    generator_device: str = "cuda"
    width: int | None = None
    height: int | None = None
    num_inference_steps: int | None = None
    num_outputs_per_prompt: int | None = None
    guidance_scale: float | None = None
    true_cfg_scale: float | None = None
    num_frames: int | None = None
    fps: int | None = None
    rollout: bool = True
    rollout_sde_type: str = "sde"
    rollout_noise_level: float = 0.7
    rollout_log_prob_no_const: bool = False
    rollout_debug_mode: bool = True
    rollout_return_denoising_env: bool = False
    rollout_return_dit_trajectory: bool = False
    rollout_sde_step_indices: list[int] | None = None
    rollout_return_step_indices: list[int] | None = None
    image_path: list[str] | None = None
    suppress_logs: bool = False
    extra_sampling_params: dict[str, Any] | None = None


class SglangRolloutResponse(BaseModel):
    """sglang's ``RolloutResponse``: one sample; tensors as :func:`tensor_envelope` objects."""

    request_id: str
    prompt: str
    seed: int
    generated_output: Any = None
    rollout_log_probs: dict[str, Any] | None = None
    rollout_debug_tensors: dict[str, Any] | None = None
    denoising_env: dict[str, Any] | None = None
    dit_trajectory: dict[str, Any] | None = None
    inference_time_s: float | None = None
    peak_memory_mb: float | None = None


SGLANG_KEYS: frozenset[str] = frozenset(SglangRolloutRequest.model_fields)

# sglang field -> the sampling key it sets here (the CFG scale comes from either of two fields).
_SAMPLING_KEYS = {
    "width": "width",
    "height": "height",
    "num_inference_steps": "num_steps",
    "negative_prompt": "negative_prompt",
    "true_cfg_scale": "guidance_scale",
    "guidance_scale": "guidance_scale",
    "rollout_sde_type": "sde_type",
    "rollout_noise_level": "noise_level",
    "rollout_log_prob_no_const": "log_prob_no_const",
    "rollout_sde_step_indices": "sde_window",
    "rollout_debug_mode": "return_debug",
}
# Sampling keys of this server that sglang has no field for; ``extra_sampling_params`` may set them.
OWN_EXTRA_KEYS: frozenset[str] = frozenset(
    f.name for f in fields(DiffusionSamplingConfig)
    if f.name not in {*_SAMPLING_KEYS.values(), "_target_", "sde_window_size", "sde_window_range"}
)


def speaks_sglang(body: Any, native_keys: Iterable[str]) -> bool:
    """Whether a generate body is sglang's ``RolloutRequest`` (else it is validated as the server's own).

    Raises ``ValueError`` naming the keys when a body mixes both protocols' keys.
    """
    if not isinstance(body, dict):
        return False
    native, sglang = set(body) & set(native_keys), set(body) & SGLANG_KEYS
    if native and sglang:
        raise ValueError(
            f"ambiguous generate body: it has keys of this server's request {sorted(native)} and of sglang's "
            f"RolloutRequest {sorted(sglang)}; send one or the other"
        )
    return bool(sglang)


@dataclass
class SglangCall:
    """One sglang request in this package's terms: what to generate and how to answer.

    Attributes:
        prompt: the request's prompt (every sample's).
        seed: the request's seed, echoed in every response (sample ``i`` is seeded ``seed + i``).
        n: the number of samples.
        sampling: overrides of the server's :class:`~verl_diffusion_rollout.config.DiffusionSamplingConfig`.
        rollout: return the rollout data (log-probs, debug tensors, environment, trajectory) or only the images.
        return_debug, return_env, return_trajectory: which rollout data.
        return_step_indices: the trajectory entries returned (``0..T``), all when None.
        report_memory: report ``peak_memory_mb`` (sglang leaves it out under ``suppress_logs``).
    """

    prompt: str
    seed: int
    n: int
    sampling: dict[str, Any]
    rollout: bool
    return_debug: bool
    return_env: bool
    return_trajectory: bool
    return_step_indices: list[int] | None
    report_memory: bool

    @property
    def seeds(self) -> list[int]:
        """One seed per sample: ``seed + i`` (materialise only after the server's sample limit is checked)."""
        return [self.seed + i for i in range(self.n)]


def _merge_extra(req: SglangRolloutRequest) -> tuple[SglangRolloutRequest, dict[str, Any]]:
    """Apply ``extra_sampling_params`` as sglang does (they override the request's fields, ``rollout`` excepted; a
    None value means the field's default); keys of :data:`OWN_EXTRA_KEYS` become sampling overrides."""
    extra = dict(req.extra_sampling_params or {})
    own = {key: extra.pop(key) for key in sorted(set(extra) & OWN_EXTRA_KEYS)}
    unknown = sorted(set(extra) - (SGLANG_KEYS - {"extra_sampling_params"}))
    if unknown:
        raise ValueError(
            f"extra_sampling_params has keys {unknown} that are neither RolloutRequest fields nor this server's own "
            f"sampling keys {sorted(OWN_EXTRA_KEYS)}"
        )
    extra.pop("rollout", None)  # sglang keeps the request's own `rollout`
    if not extra:
        return req, own
    body = req.model_dump(exclude={"extra_sampling_params"})
    for key, value in extra.items():
        body[key] = SglangRolloutRequest.model_fields[key].default if value is None else value
    return SglangRolloutRequest.model_validate(body), own


def _check_indices(name: str, indices: list[int], stop: int) -> list[int]:
    bad = [i for i in indices if not 0 <= i < stop]
    if bad:
        raise ValueError(f"{name} must be step indices in 0..{stop - 1}, got {bad}")
    return sorted(set(indices))


def _check_rollout_values(req: SglangRolloutRequest) -> None:
    """The requests sglang's rollout refuses, and the one convention this server computes differently."""
    sde_type, no_const = req.rollout_sde_type, req.rollout_log_prob_no_const
    if sde_type not in SDE_TYPES:
        raise ValueError(f"rollout_sde_type must be one of {list(SDE_TYPES)}, got {sde_type!r}")
    if sde_type == "ode" and not no_const:
        raise ValueError(
            "rollout_sde_type='ode' needs rollout_log_prob_no_const=true: a deterministic step has no density "
            "(sglang refuses it too)"
        )
    if sde_type != "ode" and not no_const and req.rollout_noise_level <= 0:
        raise ValueError(
            f"rollout_noise_level must be > 0 for a full Gaussian log-prob (rollout_log_prob_no_const=false), got "
            f"{req.rollout_noise_level} (sglang refuses it too)"
        )
    if sde_type == "sde" and no_const:
        raise ValueError(
            "rollout_log_prob_no_const=true with rollout_sde_type='sde' is not served: sglang's constant-free SDE "
            "log-prob is -(x'-mean)^2, this server's is -(x'-mean)^2/(2 std^2); use the full Gaussian "
            "(rollout_log_prob_no_const=false, FlowGRPO's) or rollout_sde_type='cps'"
        )


def _renamed(err: ValueError, sources: dict[str, str]) -> ValueError:
    """A sampling-config error that names the sglang field the offending key came from."""
    message = str(err)
    for key, sglang_key in sources.items():
        if f"sampling.{key} " in message:
            return ValueError(f"{sglang_key}: {message}")
    return err


def translate_request(req: SglangRolloutRequest, defaults: DiffusionSamplingConfig) -> SglangCall:
    """The :class:`SglangCall` of a validated request against the server's default sampling config.

    Raises ``ValueError`` naming the sglang field for values this server refuses (the config's own checks
    included), before any work. Allocates nothing proportional to the requested sizes or steps: the server's
    limits are checked after this.
    """
    req, own = _merge_extra(req)
    if req.num_frames not in (None, 1):
        raise ValueError(f"num_frames must be 1 or absent: this server serves text-to-image models, got {req.num_frames}")
    if req.image_path:
        raise ValueError("image_path is not served: this server generates from text only (text-to-image)")
    n = 1 if req.num_outputs_per_prompt is None else req.num_outputs_per_prompt
    if n < 1:
        raise ValueError(f"num_outputs_per_prompt must be >= 1, got {n}")
    seed = DEFAULT_SEED if req.seed is None else req.seed
    if seed < 0 or seed + n - 1 > MAX_SEED:
        raise ValueError(f"seed must be in 0..{MAX_SEED - n + 1} for {n} outputs (sample i is seeded seed + i), got {seed}")
    num_steps = defaults.num_steps if req.num_inference_steps is None else req.num_inference_steps
    if num_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_steps}")
    # sglang names the stochastic steps by index: the server's own FlowGRPO window settings do not apply.
    sampling: dict[str, Any] = {"num_steps": num_steps, "sde_window_size": 0, "sde_window_range": None, **own}
    sources = {"num_steps": "num_inference_steps"}
    for name in ("width", "height", "negative_prompt", "true_cfg_scale", "guidance_scale"):
        key = _SAMPLING_KEYS[name]
        if getattr(req, name) is not None and key not in sampling:  # true_cfg_scale wins over guidance_scale
            sampling[key], sources[key] = getattr(req, name), name
    return_steps = None
    if not req.rollout:
        sampling.update(sde_type="ode", sde_window=None)
    else:
        _check_rollout_values(req)
        sampling.update(
            sde_type=req.rollout_sde_type, noise_level=req.rollout_noise_level,
            log_prob_no_const=req.rollout_log_prob_no_const,
        )
        sources.update(sde_type="rollout_sde_type", noise_level="rollout_noise_level")
        if req.rollout_sde_step_indices is None:
            sampling["sde_window_size"] = num_steps  # every step (a window of all of them, starting at 0)
        elif req.rollout_sde_step_indices:
            sampling["sde_window"] = _check_indices("rollout_sde_step_indices", req.rollout_sde_step_indices, num_steps)
        else:
            sampling["sde_type"] = "ode"  # an empty index list: every step deterministic, log-probs 0
        if req.rollout_return_step_indices is not None:
            return_steps = _check_indices("rollout_return_step_indices", req.rollout_return_step_indices, num_steps + 1)
    try:
        defaults.replace(**sampling)
    except ValueError as err:
        raise _renamed(err, sources) from err
    return SglangCall(
        prompt=req.prompt,
        seed=seed,
        n=n,
        sampling=sampling,
        rollout=req.rollout,
        return_debug=req.rollout and req.rollout_debug_mode,
        return_env=req.rollout and req.rollout_return_denoising_env,
        return_trajectory=req.rollout and req.rollout_return_dit_trajectory,
        return_step_indices=return_steps,
        report_memory=not req.suppress_logs,
    )


# -- the answer ---------------------------------------------------------------------------------------------------


def tensor_envelope(tensor: torch.Tensor, binary: bool) -> dict[str, Any]:
    """sglang's tensor object: ``data`` is the safetensors bytes of ``{"t": tensor}`` (base64 text unless binary)."""
    t = tensor.detach().to("cpu").contiguous()
    raw = named_tensors_to_bytes({"t": t})
    return {
        "__tensor__": True,
        "data": raw if binary else base64.b64encode(raw).decode("ascii"),
        "shape": list(t.shape),
        "dtype": str(t.dtype),
    }


# Contract key -> the transformer keyword sglang's denoising environment names it by.
_ENV_KWARGS = {
    "prompt_embeds": "encoder_hidden_states",
    "prompt_embeds_mask": "encoder_hidden_states_mask",
    "pooled_prompt_embeds": "pooled_projections",
}
# Contract debug key -> sglang's debug tensor name.
_DEBUG_NAMES = {
    "variance_noise": "rollout_variance_noises",
    "prev_sample_mean": "rollout_prev_sample_means",
    "noise_std": "rollout_noise_std_devs",
    "model_output": "rollout_model_outputs",
}


def _env_entry(batch: RolloutBatch, b: int, binary: bool) -> dict[str, Any]:
    env = batch.env()

    def kwargs(prefix: str) -> dict[str, Any] | None:
        found = {kw: env[prefix + key][b] for key, kw in _ENV_KWARGS.items() if env.get(prefix + key) is not None}
        return {kw: tensor_envelope(t, binary) for kw, t in found.items()} or None

    return {"image_kwargs": None, "pos_cond_kwargs": kwargs(""), "neg_cond_kwargs": kwargs("negative_"), "guidance": None}


def _trajectory_entry(batch: RolloutBatch, b: int, keep: list[int] | None, binary: bool) -> dict[str, Any] | None:
    steps = batch.num_steps
    keep = list(range(steps + 1)) if keep is None else keep
    if not keep:
        return None  # sglang returns no trajectory when the filter keeps nothing
    timesteps = torch.cat([batch.all_timesteps[b], batch.all_timesteps.new_zeros(1)])  # the final latent's: 0
    index = torch.tensor(keep, dtype=torch.long)
    return {
        "latents": tensor_envelope(batch.all_latents[b].index_select(0, index), binary),
        "timesteps": tensor_envelope(timesteps.index_select(0, index), binary),
        "sigmas": tensor_envelope(batch.all_sigmas[b], binary),
    }


def rollout_responses(
    batch: RolloutBatch,
    call: SglangCall,
    *,
    request_id: str,
    inference_time_s: float | None,
    peak_memory_mb: float | None,
    binary: bool,
) -> list[dict[str, Any]]:
    """sglang's answer: one ``RolloutResponse`` dict per sample of ``batch``, each with its own slice."""
    out = []
    for b in range(len(batch)):
        response = SglangRolloutResponse(
            request_id=request_id,
            prompt=call.prompt,
            seed=call.seed,
            generated_output=tensor_envelope(batch.responses[b].unsqueeze(1), binary),  # [C, frames=1, H, W]
            inference_time_s=inference_time_s,
            peak_memory_mb=peak_memory_mb,
        )
        if call.rollout:
            response.rollout_log_probs = tensor_envelope(batch.rollout_log_probs[b], binary)
            if call.return_debug and batch.debug:
                debug = {name: batch.debug[key][b] for key, name in _DEBUG_NAMES.items()}
                debug["rollout_noise_std_devs"] = debug["rollout_noise_std_devs"].unsqueeze(-1)  # [T, 1]
                response.rollout_debug_tensors = {k: tensor_envelope(v, binary) for k, v in debug.items()}
            if call.return_env:
                response.denoising_env = _env_entry(batch, b, binary)
            if call.return_trajectory:
                response.dit_trajectory = _trajectory_entry(batch, b, call.return_step_indices, binary)
        out.append(response.model_dump())
    return out


def wants_msgpack(accept: str) -> bool:
    """Whether an ``Accept`` header asks for msgpack (``application/msgpack`` or ``application/x-msgpack``)."""
    for item in accept.split(","):
        media, _, params = item.strip().partition(";")
        if media.strip().lower() in _MSGPACK_TYPES and "q=0" not in params.replace(" ", "").split(";"):
            return True
    return False


def encode_msgpack(responses: list[dict[str, Any]]) -> bytes:
    """The msgpack body of an answer: tensor ``data`` as msgpack binary, floats as float64."""
    import msgpack

    return msgpack.packb(responses, use_bin_type=True)
