"""HTTP rollout API around one diffusion engine (FastAPI + uvicorn), authenticated and bounded.

    VDR_API_KEY=... python -m verl_diffusion_rollout.server --model-path /models/Qwen-Image --device cuda

Endpoints:

* ``POST /rollout/generate``: JSON ``{"prompts": [...], "seeds": [...]?, "n": 1, "sampling": {...}?,
  "window_seed": null, "return_env": true, "return_trajectory": true, "return_debug": false}``. The response
  has one entry per sample (a GRPO group's samples are consecutive), each with its own tensors as
  ``{"dtype", "shape", "data": base64}`` objects: ``image`` [3, H, W], ``rollout_log_probs`` [T], ``sde_mask``,
  ``all_timesteps``, ``all_sigmas``, and on request ``all_latents`` [T+1, L, D] and the denoising environment.
  A client that disconnects cancels its generation at the next denoising step.
* ``POST /update_weights``: the named tensors as a safetensors body (``application/x-safetensors`` or
  ``application/octet-stream``; the peft config may ride in the safetensors metadata under ``peft_config``),
  or JSON ``{"tensors": {name: tensor-object}, "peft_config": {...}}``. Answers the new weight version.
* ``GET /health`` (never authenticated; reports the engine's ``role`` and loaded ``modules``), ``GET
  /weight_version``, ``POST /sleep``, ``POST /wake_up``.
* Roles (``--role``, :class:`~verl_diffusion_rollout.stages.Role`): an ``encoder`` answers ``POST /rollout/encode``
  (prompts -> prompt embeddings), a ``denoiser`` answers ``POST /rollout/generate`` given those embeddings instead of
  prompts (the contract without images, plus each sample's final latent), a ``decoder`` answers ``POST
  /rollout/decode`` (final latents -> images); a ``monolithic`` server (the default) answers all of them. Bodies:
  :mod:`verl_diffusion_rollout.role_protocol`. A request the role cannot serve gets a 400 naming the role.
* sglang's protocol (:mod:`~verl_diffusion_rollout.sglang_protocol`): ``POST /rollout/generate`` with sglang's
  ``RolloutRequest`` body answers sglang's list of ``RolloutResponse`` objects (msgpack with
  ``Accept: application/msgpack``, else JSON); ``POST /release_memory_occupation``,
  ``POST /resume_memory_occupation`` (sleep / wake up) and ``POST /get_weights_checksum``. Generating from a
  ``RolloutRequest`` takes a monolithic server (a role server answers 400 naming its role).

Security: with an API key (``--api-key``, ``VDR_API_KEY`` or ``rollout.server_api_key``) every endpoint but
``GET /health`` needs ``Authorization: Bearer <key>`` (401 otherwise; compared in constant time). Binding a
non-loopback address without a key is refused unless ``--allow-unauthenticated`` is given. Every request is bounded
(:class:`~verl_diffusion_rollout.config.ServerLimits`) before work starts: bodies while they stream in (413),
sample count, pixels, prompt length and steps (422), each error naming the limit and its flag.

Statuses: 400 malformed request or rejected weight update, 401 missing/wrong key, 413 body too large, 415 content
type, 422 invalid or out-of-limit values, 409 engine asleep, 499 client gone (generation cancelled), 503 out of
memory, 500 any other error (JSON body). The server keeps serving after every one of them.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from fastapi import APIRouter, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, StrictStr, ValidationError
from starlette.concurrency import run_in_threadpool

from .config import DiffusionSamplingConfig, ServerLimits
from .contract import ENV_KEYS, RolloutBatch
from .engines import DiffusionEngine
from .errors import EngineAsleep, GenerationCancelled, NonFiniteOutput, RoleMismatch
from .lora.config import WeightUpdateError, to_lora_config
from .role_protocol import DecodeRequest, EmbeddingsGenerateRequest, EncodeRequest, GenerateRequest, env_from_json, env_to_json
from .serialization import SAFETENSORS_MEDIA_TYPE, named_tensors_from_bytes, tensor_from_json, tensor_to_json
from .sglang_protocol import (
    MSGPACK_MEDIA_TYPE,
    SglangRolloutRequest,
    encode_msgpack,
    rollout_responses,
    speaks_sglang,
    translate_request,
    wants_msgpack,
)
from .stages import ROLE_NAMES, DenoisedBatch, Role, check_role_serves

__all__ = ["build_app", "serve_in_thread", "main", "RolloutServer", "check_bind", "API_KEY_ENV"]

logger = logging.getLogger(__name__)

API_KEY_ENV = "VDR_API_KEY"
DISCONNECT_POLL_S = 0.05  # how often a running generation checks whether its client is still there
_PER_STEP_KEYS = ("rollout_log_probs", "sde_mask", "all_timesteps", "all_sigmas")


def _sample_entries(batch: RolloutBatch | DenoisedBatch, return_env: bool, return_trajectory: bool) -> list[dict[str, Any]]:
    """Split a batch into one JSON-ready entry per sample (a denoiser's batch has no image; it gives the final
    latent instead)."""
    tensors = batch.to_dict()
    entries = []
    for b in range(len(batch)):
        entry: dict[str, Any] = {"prompt": batch.prompts[b], "seed": int(batch.seeds[b])}
        if isinstance(batch, RolloutBatch):
            entry["image"] = tensor_to_json(batch.responses[b])
        else:
            entry["final_latent"] = tensor_to_json(batch.final_latents[b])
        for key in _PER_STEP_KEYS:
            entry[key] = tensor_to_json(tensors[key][b])
        if return_trajectory:
            entry["all_latents"] = tensor_to_json(batch.all_latents[b])
        if return_env:
            entry["denoising_env"] = {k: tensor_to_json(tensors[k][b]) for k in ENV_KEYS if k in tensors}
        if batch.debug:
            entry["debug"] = {k: tensor_to_json(v[b]) for k, v in batch.debug.items()}
        entries.append(entry)
    return entries


# -- authentication -----------------------------------------------------------------------------------------------


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts connections from this machine (``127.0.0.0/8``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, api_key: str | None, allow_unauthenticated: bool = False) -> None:
    """Refuse to serve a non-loopback address without an API key (the weights and the GPU would be anyone's)."""
    if api_key or allow_unauthenticated or is_loopback(host):
        return
    raise ValueError(
        f"refusing to serve {host!r} without an API key: anyone reaching it could replace the weights. Set "
        f"{API_KEY_ENV} (or --api-key / rollout.server_api_key), bind 127.0.0.1, or pass --allow-unauthenticated "
        "(rollout.server_allow_unauthenticated=true) on a trusted network"
    )


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class BearerAuth:
    """ASGI middleware: every request but ``GET /health`` needs ``Authorization: Bearer <key>``.

    Compares fixed-length digests with :func:`hmac.compare_digest`, so the time taken says nothing about the key.
    """

    OPEN = {("GET", "/health"), ("HEAD", "/health")}

    def __init__(self, app: Any, api_key: str):
        self.app = app
        self._expected = _digest(b"Bearer " + api_key.encode())

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or (scope["method"], scope["path"]) in self.OPEN:
            return await self.app(scope, receive, send)
        provided = b""
        for name, value in scope["headers"]:
            if name == b"authorization":
                provided = value
                break
        if not hmac.compare_digest(_digest(provided), self._expected):
            detail = "missing or wrong API key: send 'Authorization: Bearer <key>'"
            response = JSONResponse({"detail": detail}, status_code=401, headers={"WWW-Authenticate": "Bearer"})
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


# -- limits -------------------------------------------------------------------------------------------------------


async def read_body(request: Request, limit: int, flag: str) -> bytes:
    """The request body, read chunk by chunk and abandoned with a 413 as soon as it exceeds ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise HTTPException(status_code=400, detail=f"invalid Content-Length {declared[:40]!r}") from None
        if declared_bytes > limit:
            raise _too_large(declared_bytes, limit, flag)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit, flag, partial=True)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int, flag: str, partial: bool = False) -> HTTPException:
    got = f"more than {limit} bytes" if partial else f"{size} bytes"
    return HTTPException(
        status_code=413,
        detail=f"request body too large: {got}, the limit is {limit / 2**20:g} MiB ({flag})",
    )


def _limit_error(limits: ServerLimits, name: str, value: Any, what: str) -> HTTPException:
    return HTTPException(
        status_code=422,
        detail=f"{what} = {value} exceeds the server limit {name}={getattr(limits, name)} ({limits.flag(name)})",
    )


def check_generate_limits(req: GenerateRequest, limits: ServerLimits) -> None:
    """Samples per request and prompt lengths (before the sampling config is even built)."""
    samples = len(req.prompts) * req.n
    if samples > limits.max_samples:
        raise _limit_error(limits, "max_samples", samples, f"samples (len(prompts)={len(req.prompts)} x n={req.n})")
    longest = max((len(p) for p in req.prompts), default=0)
    if longest > limits.max_prompt_chars:
        raise _limit_error(limits, "max_prompt_chars", longest, "prompt length in characters")


def check_sampling_limits(sampling: DiffusionSamplingConfig, limits: ServerLimits) -> None:
    """Pixels per image, steps and negative-prompt length of a validated sampling config."""
    pixels = sampling.height * sampling.width
    if pixels > limits.max_pixels:
        raise _limit_error(limits, "max_pixels", pixels, f"pixels per image ({sampling.height}x{sampling.width})")
    if sampling.num_steps > limits.max_steps:
        raise _limit_error(limits, "max_steps", sampling.num_steps, "num_steps")
    if len(sampling.negative_prompt) > limits.max_prompt_chars:
        raise _limit_error(limits, "max_prompt_chars", len(sampling.negative_prompt), "negative_prompt length")


# -- errors -------------------------------------------------------------------------------------------------------


def engine_error(err: BaseException) -> HTTPException:
    """The HTTP status of an engine exception: 409 asleep only, 4xx invalid input, 503 out of memory, else 500."""
    message = str(err) or type(err).__name__
    if isinstance(err, EngineAsleep):
        return HTTPException(status_code=409, detail=message)
    if isinstance(err, GenerationCancelled):
        return HTTPException(status_code=499, detail=f"client closed the request: {message}")
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return HTTPException(status_code=503, detail=f"out of memory: {message}")
    if isinstance(err, (WeightUpdateError, RoleMismatch)):
        return HTTPException(status_code=400, detail=message)
    if isinstance(err, ValueError):
        return HTTPException(status_code=422, detail=message)
    if isinstance(err, NonFiniteOutput):
        return HTTPException(status_code=500, detail=message)
    logger.exception("rollout server: internal error", exc_info=err)
    return HTTPException(status_code=500, detail=f"internal error ({type(err).__name__}): {message}")


async def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an engine call in the thread pool, mapping its exceptions to HTTP statuses."""
    try:
        return await run_in_threadpool(fn, *args, **kwargs)
    except HTTPException:
        raise
    except Exception as err:  # noqa: BLE001 - every error becomes a status; the server keeps serving
        raise engine_error(err) from err


async def _watch_disconnect(request: Request, gone: threading.Event) -> None:
    while not gone.is_set():
        if await request.is_disconnected():
            gone.set()
            return
        await asyncio.sleep(DISCONNECT_POLL_S)


# -- application --------------------------------------------------------------------------------------------------


def build_app(
    engine: DiffusionEngine,
    default_sampling: DiffusionSamplingConfig | None = None,
    *,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
) -> FastAPI:
    """The FastAPI application serving ``engine``; ``api_key`` (when set) guards every endpoint but ``/health``."""
    default_sampling = default_sampling or DiffusionSamplingConfig()
    limits = limits or ServerLimits()
    app = FastAPI(title="verl_diffusion_rollout", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    if api_key:
        app.add_middleware(BearerAuth, api_key=api_key)

    def bad_request(err: Exception, status: int = 400) -> HTTPException:
        return HTTPException(status_code=status, detail=str(err))

    roles = RoleEndpoints(engine, default_sampling, limits)
    app.post("/rollout/encode")(roles.encode)
    app.post("/rollout/decode")(roles.decode)

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "sleeping": engine.is_sleeping, "weight_version": engine.weight_version,
                "role": engine.role.value, "modules": list(engine.modules)}

    @app.get("/weight_version")
    def weight_version() -> dict[str, int]:
        return {"weight_version": engine.weight_version}

    async def generate_batch(req: GenerateRequest, request: Request) -> RolloutBatch:
        """Bound, configure and run one generation, whichever protocol asked; a client that leaves cancels it."""
        check_generate_limits(req, limits)
        try:
            sampling = default_sampling.replace(**{**req.sampling, "return_debug": req.return_debug})
        except (ValueError, TypeError) as err:
            raise bad_request(err, 422) from err
        check_sampling_limits(sampling, limits)
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            return await _call(engine.generate, req.prompts, req.seeds, sampling, req.n, req.window_seed,
                               cancel=gone.is_set)
        finally:
            watcher.cancel()

    @app.post("/rollout/generate")
    async def generate(request: Request) -> Any:
        raw = await read_body(request, limits.request_bytes, limits.flag("max_request_mb"))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise bad_request(ValueError(f"request body is not valid JSON: {err}")) from err
        if engine.role is not Role.MONOLITHIC or (isinstance(body, dict) and "env" in body):
            return await roles.generate_from_env(body, request)  # a denoiser's: from prompt embeddings
        try:
            sglang_body = speaks_sglang(body, GenerateRequest.model_fields)
        except ValueError as err:
            raise bad_request(err, 422) from err
        if sglang_body:
            return await sglang_generate(body, request, default_sampling, limits, generate_batch)
        try:
            req = GenerateRequest.model_validate(body)
        except ValidationError as err:
            raise bad_request(ValueError(err.errors(include_url=False, include_input=False)), 422) from err
        batch = await generate_batch(req, request)
        samples = await _call(_sample_entries, batch, req.return_env, req.return_trajectory)
        return {
            "weight_version": batch.weight_version,
            "timing": batch.timings,
            "sampling": batch.sampling.to_dict(),
            "samples": samples,
        }

    @app.post("/update_weights")
    async def update_weights(request: Request) -> dict[str, Any]:
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        if content_type not in ("application/json", SAFETENSORS_MEDIA_TYPE, "application/octet-stream"):
            raise HTTPException(
                status_code=415,
                detail=f"unsupported content-type {content_type!r}; send {SAFETENSORS_MEDIA_TYPE} or application/json",
            )
        raw = await read_body(request, limits.update_bytes, limits.flag("max_update_mb"))
        try:
            tensors, peft_config = await run_in_threadpool(_parse_update, raw, content_type)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
            raise bad_request(err) from err
        version = await _call(engine.update_weights, list(tensors.items()), peft_config)
        return {"weight_version": version, "num_tensors": len(tensors)}

    @app.post("/sleep")
    async def sleep() -> dict[str, bool]:
        await _call(engine.sleep)
        return {"sleeping": True}

    @app.post("/wake_up")
    async def wake_up() -> dict[str, bool]:
        await _call(engine.wake_up)
        return {"sleeping": False}

    app.include_router(sglang_weights_router(engine, limits))
    return app


# -- role endpoints: encode, generate from embeddings, decode ----------------------------------------------------------


def _parse_body(raw: bytes, model: type[BaseModel]) -> Any:
    """A JSON body validated as ``model``: 400 if it is not JSON, 422 if it does not fit."""
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HTTPException(status_code=400, detail=f"request body is not valid JSON: {err}") from err
    return _validate(body, model)


def _validate(body: Any, model: type[BaseModel]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as err:
        raise HTTPException(status_code=422, detail=str(err.errors(include_url=False, include_input=False))) from err


def _role_error(engine: DiffusionEngine, stage: str) -> None:
    """400 naming the role before a request's tensors are even parsed, when the role cannot serve ``stage``."""
    try:
        check_role_serves(engine.role, stage, engine.modules)
    except RoleMismatch as err:
        raise HTTPException(status_code=400, detail=str(err)) from err


class RoleEndpoints:
    """The handlers of one stage each (``POST /rollout/encode``, ``/rollout/decode``, and ``/rollout/generate`` from
    embeddings), bounded by the server's limits like every request; the bodies are
    :mod:`verl_diffusion_rollout.role_protocol`'s."""

    def __init__(self, engine: DiffusionEngine, default_sampling: DiffusionSamplingConfig, limits: ServerLimits):
        self.engine, self.default_sampling, self.limits = engine, default_sampling, limits

    def _sampling(self, overrides: dict[str, Any], **fixed: Any) -> DiffusionSamplingConfig:
        try:
            sampling = self.default_sampling.replace(**{**overrides, **fixed})
        except (ValueError, TypeError) as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        check_sampling_limits(sampling, self.limits)
        return sampling

    def _check_prompts(self, prompts: list[str], samples: int) -> None:
        if samples > self.limits.max_samples:
            raise _limit_error(self.limits, "max_samples", samples, "samples")
        longest = max((len(p) for p in prompts), default=0)
        if longest > self.limits.max_prompt_chars:
            raise _limit_error(self.limits, "max_prompt_chars", longest, "prompt length in characters")

    async def encode(self, request: Request) -> dict[str, Any]:
        """Prompts -> the denoising environment, one row per prompt."""
        _role_error(self.engine, "encode")
        raw = await read_body(request, self.limits.request_bytes, self.limits.flag("max_request_mb"))
        req = _parse_body(raw, EncodeRequest)
        self._check_prompts(req.prompts, len(req.prompts))
        sampling = self._sampling(req.sampling)
        start = time.perf_counter()
        env = await _call(self.engine.encode, req.prompts, sampling)
        encode_s = time.perf_counter() - start
        return {
            "family": self.engine.family,
            "prompts": req.prompts,
            "sampling": sampling.to_dict(),
            "env": await run_in_threadpool(env_to_json, env),
            "timing": {"encode_s": encode_s},
        }

    async def generate_from_env(self, body: Any, request: Request) -> dict[str, Any]:
        """Prompt embeddings -> the rollout contract without images (the body is already read and bounded)."""
        if not (isinstance(body, dict) and "env" in body):
            _role_error(self.engine, "generate")  # prompts alone: only a monolithic server generates from them
        _role_error(self.engine, "denoise")
        req = _validate(body, EmbeddingsGenerateRequest)
        self._check_prompts(req.prompts, len(req.prompts) * req.n)
        sampling = self._sampling(req.sampling, return_debug=req.return_debug)
        try:
            env = await run_in_threadpool(env_from_json, req.env)
        except ValueError as err:
            raise HTTPException(status_code=422, detail=str(err)) from err
        gone = threading.Event()
        watcher = asyncio.create_task(_watch_disconnect(request, gone))
        try:
            batch = await _call(self.engine.denoise, env, req.prompts, req.seeds, sampling, req.n, req.window_seed,
                                cancel=gone.is_set)
        finally:
            watcher.cancel()
        samples = await _call(_sample_entries, batch, req.return_env, req.return_trajectory)
        return {
            "weight_version": batch.weight_version,
            "family": batch.family,
            "timing": batch.timings,
            "sampling": batch.sampling.to_dict(),
            "samples": samples,
        }

    async def decode(self, request: Request) -> dict[str, Any]:
        """Final latents ``[B, ...]`` -> images ``[B, 3, H, W]``, in one VAE batch."""
        _role_error(self.engine, "decode")
        raw = await read_body(request, self.limits.request_bytes, self.limits.flag("max_request_mb"))
        req = _parse_body(raw, DecodeRequest)
        sampling = self._sampling(req.sampling)
        try:
            latents = tensor_from_json(req.latents)
        except ValueError as err:
            raise HTTPException(status_code=422, detail=f"latents: {err}") from err
        rows = latents.shape[0] if latents.ndim else 0
        if rows > self.limits.max_samples:
            raise _limit_error(self.limits, "max_samples", rows, "latents to decode")
        start = time.perf_counter()
        images = await _call(self.engine.decode, latents, sampling)
        return {"images": await run_in_threadpool(tensor_to_json, images),
                "timing": {"decode_s": time.perf_counter() - start}}


def _parse_update(raw: bytes, content_type: str) -> tuple[dict[str, torch.Tensor], Any]:
    """``(tensors, peft_config)`` of an update body; a client's peft config is validated strictly (no regexes)."""
    if content_type == "application/json":
        body = json.loads(raw)
        if not isinstance(body, dict) or not isinstance(body.get("tensors"), dict):
            raise ValueError("JSON weight updates need {'tensors': {name: tensor}, 'peft_config'?: {...}}")
        unknown = sorted(set(body) - {"tensors", "peft_config"})
        if unknown:
            raise ValueError(f"unknown keys {unknown} in a JSON weight update; known: ['peft_config', 'tensors']")
        tensors = {name: tensor_from_json(obj) for name, obj in body["tensors"].items()}
        peft_config = body.get("peft_config")
    else:
        tensors, metadata = named_tensors_from_bytes(raw)
        peft_config = metadata.get("peft_config")
    if not tensors:
        raise ValueError("empty weight update: no tensors in the body")
    if peft_config is not None:
        if not isinstance(peft_config, dict):
            raise WeightUpdateError(f"peft_config must be a JSON object, got {type(peft_config).__name__}")
        to_lora_config(peft_config, from_client=True)
    return tensors, peft_config


# -- sglang's protocol (POST /rollout/generate with a RolloutRequest body, and the weight endpoints) ------------------


def _peak_memory_mb() -> float | None:
    """Peak CUDA memory reserved by this process, MiB (what sglang reports); None without CUDA."""
    if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
        return None
    peak = torch.cuda.max_memory_reserved()
    return peak / 2**20 if peak > 0 else None


async def sglang_generate(
    body: dict[str, Any],
    request: Request,
    default_sampling: DiffusionSamplingConfig,
    limits: ServerLimits,
    generate_batch: Callable[[GenerateRequest, Request], Awaitable[RolloutBatch]],
) -> Response:
    """``POST /rollout/generate`` with sglang's ``RolloutRequest`` body: sglang's list of per-sample
    ``RolloutResponse`` objects (:mod:`~verl_diffusion_rollout.sglang_protocol`), msgpack when the client's
    ``Accept`` names it, JSON otherwise. Runs through the same limits and generation as the server's own schema;
    the weight version rides in the ``X-Weight-Version`` header."""
    try:
        call = translate_request(SglangRolloutRequest.model_validate(body), default_sampling)
    except ValidationError as err:
        raise HTTPException(status_code=422, detail=str(err.errors(include_url=False, include_input=False))) from err
    except ValueError as err:
        raise HTTPException(status_code=422, detail=str(err)) from err
    check_generate_limits(GenerateRequest(prompts=[call.prompt], n=call.n), limits)  # before n seeds exist
    req = GenerateRequest(
        prompts=[call.prompt], seeds=call.seeds, n=call.n, sampling=call.sampling, return_debug=call.return_debug,
        return_env=call.return_env, return_trajectory=call.return_trajectory,
    )
    start = time.perf_counter()
    batch = await generate_batch(req, request)
    seconds = time.perf_counter() - start
    binary = wants_msgpack(request.headers.get("accept", ""))
    responses = await _call(
        rollout_responses, batch, call, request_id=str(uuid.uuid4()), inference_time_s=seconds,
        peak_memory_mb=_peak_memory_mb() if call.report_memory else None, binary=binary,
    )
    headers = {"X-Weight-Version": str(batch.weight_version)}
    if binary:
        content = await _call(encode_msgpack, responses)
        return Response(content=content, media_type=MSGPACK_MEDIA_TYPE, headers=headers)
    return JSONResponse(responses, headers=headers)


class WeightsChecksumRequest(BaseModel):
    """Body of ``POST /get_weights_checksum`` (sglang's ``GetWeightsChecksumReqInput``)."""

    model_config = ConfigDict(extra="forbid")

    module_names: list[StrictStr] | None = None


def sglang_weights_router(engine: DiffusionEngine, limits: ServerLimits) -> APIRouter:
    """sglang's weight endpoints that map onto this server's own; authenticated like every other endpoint.

    * ``POST /release_memory_occupation`` / ``POST /resume_memory_occupation``: :meth:`DiffusionEngine.sleep` /
      :meth:`~DiffusionEngine.wake_up`; sglang's ``{"success", "sleeping", "message"}`` answer.
    * ``POST /get_weights_checksum``: ``{"module_names": [...] | null}`` -> ``{module: sha256 hex}``
      (``"not_found"`` for an unknown module), as sglang hashes them.
    * ``POST /update_weights_from_tensor`` and ``/update_weights_from_disk`` answer 501 with the reason: sglang's
      tensor payload is pickled (``MultiprocessingSerializer``, CUDA IPC handles), which this server never
      unpickles, and a server-side path is not a way in; ``POST /update_weights`` takes the tensors instead.
    """
    router = APIRouter()

    async def memory(change: Any, sleeping: bool, done: str, already: str) -> JSONResponse:
        was = engine.is_sleeping
        try:
            await _call(change)
        except HTTPException as err:
            body = {"success": False, "sleeping": engine.is_sleeping, "message": str(err.detail)}
            return JSONResponse(body, status_code=err.status_code)
        message = already if was == sleeping else done
        return JSONResponse({"success": True, "sleeping": engine.is_sleeping, "message": message})

    @router.post("/release_memory_occupation")
    async def release_memory_occupation() -> JSONResponse:
        return await memory(engine.sleep, True, "released accelerator memory (weights moved to the CPU)", "already sleeping")

    @router.post("/resume_memory_occupation")
    async def resume_memory_occupation() -> JSONResponse:
        return await memory(engine.wake_up, False, "resumed accelerator memory (weights back on the device)", "already awake")

    @router.post("/get_weights_checksum")
    async def get_weights_checksum(request: Request) -> dict[str, str]:
        raw = await read_body(request, limits.request_bytes, limits.flag("max_request_mb"))
        try:
            req = WeightsChecksumRequest.model_validate(json.loads(raw) if raw.strip() else {})
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
            raise HTTPException(status_code=400, detail=f"request body is not valid JSON: {err}") from err
        except ValidationError as err:
            raise HTTPException(status_code=422, detail=str(err.errors(include_url=False, include_input=False))) from err
        try:
            return await run_in_threadpool(engine.weights_checksum, req.module_names)
        except NotImplementedError as err:
            raise HTTPException(status_code=501, detail=str(err)) from err
        except Exception as err:  # noqa: BLE001 - every error becomes a status; the server keeps serving
            raise engine_error(err) from err

    refusals = {
        "/update_weights_from_tensor": "sglang's tensor payload is pickled (MultiprocessingSerializer with CUDA IPC "
        "handles) and this server never unpickles request data",
        "/update_weights_from_disk": "this server does not load weights from a path on its own disk",
    }
    for path, reason in refusals.items():
        router.add_api_route(path, _refusal(reason), methods=["POST"])
    return router


def _refusal(reason: str) -> Any:
    """An endpoint answering 501 with ``reason`` and the way that is served (it reads no body)."""

    async def refuse() -> JSONResponse:
        detail = f"not served: {reason}; send the named tensors to POST /update_weights (safetensors body)"
        return JSONResponse({"success": False, "message": detail}, status_code=501)

    return refuse


class RolloutServer:
    """A uvicorn server running ``build_app(engine)`` in a background thread (for replicas and tests)."""

    def __init__(
        self,
        engine: DiffusionEngine,
        host: str = "127.0.0.1",
        port: int = 0,
        sampling: DiffusionSamplingConfig | None = None,
        *,
        api_key: str | None = None,
        limits: ServerLimits | None = None,
        allow_unauthenticated: bool = False,
    ):
        import uvicorn

        check_bind(host, api_key, allow_unauthenticated)
        app = build_app(engine, sampling, api_key=api_key, limits=limits)
        config = uvicorn.Config(app, host=host, port=port, log_level="warning")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="vdr-rollout-server", daemon=True)
        self.host = host

    def start(self, timeout: float = 30.0) -> str:
        """Start serving; returns ``host:port``."""
        self._thread.start()
        start = time.monotonic()
        while not self._server.started:
            if time.monotonic() - start > timeout or not self._thread.is_alive():
                raise RuntimeError("rollout server failed to start")
            time.sleep(0.02)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        return f"{self.host}:{port}"

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)


def serve_in_thread(
    engine: DiffusionEngine,
    host: str = "127.0.0.1",
    port: int = 0,
    sampling: DiffusionSamplingConfig | None = None,
    *,
    api_key: str | None = None,
    limits: ServerLimits | None = None,
    allow_unauthenticated: bool = False,
) -> tuple[RolloutServer, str]:
    """Start a :class:`RolloutServer`; returns it and its ``host:port`` address."""
    server = RolloutServer(
        engine, host, port, sampling, api_key=api_key, limits=limits, allow_unauthenticated=allow_unauthenticated
    )
    return server, server.start()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = ServerLimits()
    parser = argparse.ArgumentParser(description="verl_diffusion_rollout HTTP rollout server")
    parser.add_argument("--model-path", required=True, help="diffusers model folder (model_index.json at its root)")
    parser.add_argument("--engine", default="diffusers", choices=["diffusers", "vllm_omni"])
    parser.add_argument(
        "--role", default="monolithic", choices=list(ROLE_NAMES),
        help="the stages this server loads and serves: monolithic (all, default), encoder (text encoders: POST "
        "/rollout/encode), denoiser (transformer: POST /rollout/generate from embeddings, weight updates), decoder "
        "(VAE: POST /rollout/decode); the other modules are never read from disk (diffusers engine)",
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--api-key", default=None,
        help=f"require 'Authorization: Bearer <key>' on every endpoint but GET /health (default: ${API_KEY_ENV}; "
        "prefer the environment variable: a flag is visible in the process list)",
    )
    parser.add_argument(
        "--allow-unauthenticated", action="store_true",
        help="serve a non-loopback --host without an API key (trusted networks only)",
    )
    parser.add_argument("--max-request-mb", type=float, default=defaults.max_request_mb,
                        help="largest generate request body, MiB (default %(default)s)")
    parser.add_argument("--max-update-mb", type=float, default=defaults.max_update_mb,
                        help="largest /update_weights body, MiB (default %(default)s)")
    parser.add_argument("--max-samples", type=int, default=defaults.max_samples,
                        help="most samples (prompts x n) per request (default %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="most pixels (height x width) per image (default %(default)s)")
    parser.add_argument("--max-prompt-chars", type=int, default=defaults.max_prompt_chars,
                        help="longest prompt / negative prompt in characters (default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=defaults.max_steps,
                        help="most denoising steps per request (default %(default)s)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .engines import get_engine_class

    args = parse_args(argv)
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    try:
        limits = ServerLimits(
            max_request_mb=args.max_request_mb, max_update_mb=args.max_update_mb, max_samples=args.max_samples,
            max_pixels=args.max_pixels, max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps,
        )
        check_bind(args.host, api_key, args.allow_unauthenticated)
    except ValueError as err:
        raise SystemExit(f"error: {err}") from None
    if args.role != Role.MONOLITHIC.value and args.engine != "diffusers":
        raise SystemExit(f"error: --role {args.role} needs --engine diffusers (the {args.engine} engine is monolithic)")
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() and args.device != "cpu" else "float32")
    role_kwargs = {} if args.role == Role.MONOLITHIC.value else {"role": args.role}
    engine = get_engine_class(args.engine)(args.model_path, device=args.device, dtype=dtype, seed=args.seed,
                                           **role_kwargs)
    uvicorn.run(build_app(engine, api_key=api_key, limits=limits), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
