"""HTTP rollout API: generate, update_weights, health; malformed requests get a 4xx and the server keeps serving."""

from __future__ import annotations

import httpx
import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.serialization import (
    SAFETENSORS_MEDIA_TYPE,
    named_tensors_from_bytes,
    named_tensors_to_bytes,
    tensor_from_json,
    tensor_to_json,
)
from verl_diffusion_rollout.server import serve_in_thread

SAMPLING = {"height": 64, "width": 64, "num_steps": 4}


@pytest.fixture(scope="module")
def server(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path)
    srv, address = serve_in_thread(engine, sampling=DiffusionSamplingConfig(**SAMPLING))
    with httpx.Client(base_url=f"http://{address}", timeout=120) as client:
        yield engine, client
    srv.stop()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.bool])
def test_tensor_serialization_round_trips_dtype_and_shape(dtype):
    t = (torch.randn(3, 0 if dtype == torch.int64 else 4, 5) * 10).to(dtype)
    back = tensor_from_json(tensor_to_json(t))
    assert back.dtype == dtype and back.shape == t.shape and torch.equal(back, t)
    data = named_tensors_to_bytes({"a": t, "b": torch.ones(2, dtype=torch.bfloat16)}, {"peft_config": {"r": 4}})
    tensors, meta = named_tensors_from_bytes(data)
    assert torch.equal(tensors["a"], t) and tensors["b"].dtype == torch.bfloat16 and meta == {"peft_config": {"r": 4}}


def test_health_and_weight_version(server):
    _, client = server
    assert client.get("/health").json()["status"] == "ok"
    assert "weight_version" in client.get("/weight_version").json()


def test_generate_returns_one_entry_per_sample(server):
    engine, client = server
    body = {"prompts": ["a red cat", "a blue dog"], "n": 2, "seeds": [1, 2, 3, 4], "sampling": {"noise_level": 0.9}}
    r = client.post("/rollout/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["samples"]) == 4 and out["sampling"]["noise_level"] == 0.9
    first = out["samples"][0]
    assert first["prompt"] == "a red cat" and first["seed"] == 1
    assert tensor_from_json(first["image"]).shape == (3, 64, 64)
    assert tensor_from_json(first["all_latents"]).shape == (5, 64, 16)
    assert set(first["denoising_env"]) == {
        "prompt_embeds", "prompt_embeds_mask", "negative_prompt_embeds", "negative_prompt_embeds_mask",
    }
    # Same numbers as the engine called directly.
    direct = engine.generate(
        ["a red cat", "a blue dog"], seeds=[1, 2, 3, 4], n=2, sampling=DiffusionSamplingConfig(**SAMPLING, noise_level=0.9)
    )
    assert torch.equal(tensor_from_json(first["rollout_log_probs"]), direct.rollout_log_probs[0])
    assert torch.equal(tensor_from_json(first["all_latents"]), direct.all_latents[0])
    slim = client.post("/rollout/generate", json={**body, "return_env": False, "return_trajectory": False}).json()
    assert "all_latents" not in slim["samples"][0] and "denoising_env" not in slim["samples"][0]


def test_update_weights_binary_and_json(server):
    engine, client = server
    params = {f"transformer.{n}": p.detach().clone() for n, p in engine.transformer.named_parameters()}
    v0 = client.get("/weight_version").json()["weight_version"]
    r = client.post("/update_weights", content=named_tensors_to_bytes(params), headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    assert r.json() == {"weight_version": v0 + 1, "num_tensors": len(params)}
    r = client.post("/update_weights", json={"tensors": {k: tensor_to_json(v) for k, v in params.items()}})
    assert r.status_code == 200 and r.json()["weight_version"] == v0 + 2


def test_malformed_requests_get_4xx_and_server_keeps_serving(server):
    engine, client = server
    version = engine.weight_version
    r = client.post("/rollout/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["detail"]
    r = client.post("/rollout/generate", json={"prompts": ["x"], "sampling": {"sde_type": "langevin"}})
    assert r.status_code == 422 and "sde_type" in r.json()["detail"]
    name, param = next(iter(engine.transformer.named_parameters()))
    bad = {n: p.detach().clone() for n, p in engine.transformer.named_parameters()}
    bad[name] = torch.zeros(param.shape[0] + 1, *param.shape[1:])
    r = client.post("/update_weights", content=named_tensors_to_bytes(bad), headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 400 and name in r.json()["detail"] and "shape" in r.json()["detail"]
    r = client.post("/update_weights", content=b"garbage", headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 400
    r = client.post("/rollout/generate", json={"prompts": []})
    assert r.status_code == 422
    assert engine.weight_version == version
    assert client.get("/health").status_code == 200
    ok = client.post("/rollout/generate", json={"prompts": ["still here"], "return_env": False})
    assert ok.status_code == 200 and len(ok.json()["samples"]) == 1
