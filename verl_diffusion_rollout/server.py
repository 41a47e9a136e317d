"""HTTP rollout API around one diffusion engine (FastAPI + uvicorn).

    python -m verl_diffusion_rollout.server --model-path /models/Qwen-Image --device cuda --dtype bfloat16

Endpoints:

* ``POST /rollout/generate``: JSON ``{"prompts": [...], "seeds": [...]?, "n": 1, "sampling": {...}?,
  "window_seed": null, "return_env": true, "return_trajectory": true, "return_debug": false}``. The response
  has one entry per sample (a GRPO group's samples are consecutive), each with its own tensors as
  ``{"dtype", "shape", "data": base64}`` objects: ``image`` [3, H, W], ``rollout_log_probs`` [T], ``sde_mask``,
  ``all_timesteps``, ``all_sigmas``, and on request ``all_latents`` [T+1, L, D] and the denoising environment.
* ``POST /update_weights``: the named tensors as a safetensors body (``application/x-safetensors`` or
  ``application/octet-stream``; the peft config may ride in the safetensors metadata under ``peft_config``),
  or JSON ``{"tensors": {name: tensor-object}, "peft_config": {...}}``. Answers the new weight version.
* ``GET /health``, ``GET /weight_version``, ``POST /sleep``, ``POST /wake_up``.

Malformed requests get a 4xx with a message; the server keeps serving.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
import time
from typing import Any

import torch
from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field, ValidationError
from starlette.concurrency import run_in_threadpool

from .config import DiffusionSamplingConfig
from .contract import ENV_KEYS, RolloutBatch
from .engines import DiffusionEngine
from .lora_sync import WeightUpdateError
from .serialization import SAFETENSORS_MEDIA_TYPE, named_tensors_from_bytes, tensor_from_json, tensor_to_json

__all__ = ["build_app", "serve_in_thread", "main", "RolloutServer"]

logger = logging.getLogger(__name__)

_PER_STEP_KEYS = ("rollout_log_probs", "sde_mask", "all_timesteps", "all_sigmas")


def _sample_entries(batch: RolloutBatch, return_env: bool, return_trajectory: bool) -> list[dict[str, Any]]:
    """Split a batch into one JSON-ready entry per sample."""
    tensors = batch.to_dict()
    entries = []
    for b in range(len(batch)):
        entry: dict[str, Any] = {
            "prompt": batch.prompts[b],
            "seed": int(batch.seeds[b]),
            "image": tensor_to_json(batch.responses[b]),
        }
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


class GenerateRequest(BaseModel):
    """Body of ``POST /rollout/generate``."""

    prompts: list[str]
    seeds: list[int] | None = None
    n: int = Field(1, ge=1)
    sampling: dict[str, Any] = Field(default_factory=dict)
    window_seed: int | None = None
    return_env: bool = True
    return_trajectory: bool = True
    return_debug: bool = False


def build_app(engine: DiffusionEngine, default_sampling: DiffusionSamplingConfig | None = None):
    """The FastAPI application serving ``engine``."""
    default_sampling = default_sampling or DiffusionSamplingConfig()
    app = FastAPI(title="verl_diffusion_rollout", version="0.1.0")

    def bad_request(err: Exception, status: int = 400) -> HTTPException:
        return HTTPException(status_code=status, detail=str(err))

    @app.get("/health")
    def health() -> dict[str, Any]:
        return {"status": "ok", "sleeping": engine.is_sleeping, "weight_version": engine.weight_version}

    @app.get("/weight_version")
    def weight_version() -> dict[str, int]:
        return {"weight_version": engine.weight_version}

    @app.post("/rollout/generate")
    async def generate(request: Request) -> dict[str, Any]:
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise bad_request(ValueError(f"request body is not valid JSON: {err}")) from err
        try:
            req = GenerateRequest.model_validate(body)
        except ValidationError as err:
            raise bad_request(ValueError(err.errors(include_url=False)), 422) from err
        try:
            sampling = default_sampling.replace(**{**req.sampling, "return_debug": req.return_debug})
        except (ValueError, TypeError) as err:
            raise bad_request(err, 422) from err
        try:
            batch = await run_in_threadpool(
                engine.generate, req.prompts, req.seeds, sampling, req.n, req.window_seed
            )
        except ValueError as err:
            raise bad_request(err, 422) from err
        except RuntimeError as err:  # asleep
            raise bad_request(err, 409) from err
        return {
            "weight_version": batch.weight_version,
            "timing": batch.timings,
            "sampling": batch.sampling.to_dict(),
            "samples": _sample_entries(batch, req.return_env, req.return_trajectory),
        }

    @app.post("/update_weights")
    async def update_weights(request: Request) -> dict[str, Any]:
        raw = await request.body()
        content_type = request.headers.get("content-type", "").split(";")[0].strip()
        try:
            if content_type == "application/json":
                body = json.loads(raw)
                if not isinstance(body, dict) or not isinstance(body.get("tensors"), dict):
                    raise ValueError("JSON weight updates need {'tensors': {name: tensor}, 'peft_config'?: {...}}")
                tensors = {name: tensor_from_json(obj) for name, obj in body["tensors"].items()}
                peft_config = body.get("peft_config")
            elif content_type in (SAFETENSORS_MEDIA_TYPE, "application/octet-stream"):
                tensors, metadata = named_tensors_from_bytes(raw)
                peft_config = metadata.get("peft_config")
            else:
                raise HTTPException(
                    status_code=415,
                    detail=f"unsupported content-type {content_type!r}; send {SAFETENSORS_MEDIA_TYPE} or application/json",
                )
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as err:
            raise bad_request(err) from err
        try:
            version = await run_in_threadpool(engine.update_weights, list(tensors.items()), peft_config)
        except WeightUpdateError as err:
            raise bad_request(err) from err
        return {"weight_version": version, "num_tensors": len(tensors)}

    @app.post("/sleep")
    def sleep() -> dict[str, bool]:
        engine.sleep()
        return {"sleeping": True}

    @app.post("/wake_up")
    def wake_up() -> dict[str, bool]:
        engine.wake_up()
        return {"sleeping": False}

    return app


class RolloutServer:
    """A uvicorn server running ``build_app(engine)`` in a background thread (for replicas and tests)."""

    def __init__(self, engine: DiffusionEngine, host: str = "127.0.0.1", port: int = 0, sampling=None):
        import uvicorn

        config = uvicorn.Config(build_app(engine, sampling), host=host, port=port, log_level="warning")
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


def serve_in_thread(engine: DiffusionEngine, host: str = "127.0.0.1", port: int = 0, sampling=None) -> tuple[RolloutServer, str]:
    """Start a :class:`RolloutServer`; returns it and its ``host:port`` address."""
    server = RolloutServer(engine, host, port, sampling)
    return server, server.start()


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from .engines import get_engine_class

    parser = argparse.ArgumentParser(description="verl_diffusion_rollout HTTP rollout server")
    parser.add_argument("--model-path", required=True, help="diffusers model folder (model_index.json at its root)")
    parser.add_argument("--engine", default="diffusers", choices=["diffusers", "vllm_omni"])
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1... (default: cuda if available)")
    parser.add_argument("--dtype", default=None, help="float32 / bfloat16 (default: bfloat16 on GPU, float32 on CPU)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    dtype = args.dtype or ("bfloat16" if torch.cuda.is_available() and args.device != "cpu" else "float32")
    engine = get_engine_class(args.engine)(args.model_path, device=args.device, dtype=dtype, seed=args.seed)
    uvicorn.run(build_app(engine), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
