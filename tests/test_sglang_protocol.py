"""sglang's rollout protocol on the server: RolloutRequest bodies, RolloutResponse lists, sglang's weight endpoints.

Responses are decoded here from sglang's documented wire format (``{"__tensor__": true, "data", "shape",
"dtype"}``, ``data`` the safetensors bytes of ``{"t": tensor}``, base64 in JSON, raw in msgpack), parsed byte by
byte rather than with this package's encoder, and compared with the server's own schema for the same seeds.
"""

from __future__ import annotations

import base64
import hashlib
import json

import httpx
import msgpack
import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig, ServerLimits
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.serialization import SAFETENSORS_MEDIA_TYPE, named_tensors_to_bytes, tensor_from_json
from verl_diffusion_rollout.server import serve_in_thread

KEY = "sglang-test-key-0123"
AUTH = {"Authorization": f"Bearer {KEY}"}
MSGPACK = {"Accept": "application/msgpack"}
# Small and fast (CFG off unless a request turns it on); three steps so step filters have both neighbours.
SAMPLING = DiffusionSamplingConfig(height=32, width=32, num_steps=3, guidance_scale=1.0)
LIMITS = ServerLimits(max_request_mb=1, max_samples=4, max_pixels=32 * 32, max_prompt_chars=100, max_steps=8)
PROMPT = "a red cat"
# Every field a trainer built on sglang sends, with values that differ from the defaults where they can.
BODY = {
    "prompt": PROMPT, "negative_prompt": "blurry", "seed": 11, "width": 32, "height": 32, "num_inference_steps": 3,
    "num_outputs_per_prompt": 2, "guidance_scale": 4.0, "rollout": True, "rollout_sde_type": "sde",
    "rollout_noise_level": 0.8, "rollout_log_prob_no_const": False, "rollout_debug_mode": True,
    "rollout_return_denoising_env": True, "rollout_return_dit_trajectory": True,
}
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
                      "BOOL": torch.bool}


# -- an independent decoder of sglang's format ----------------------------------------------------------------------


def decode_tensor(obj: dict, binary: bool) -> torch.Tensor:
    """One sglang tensor object: the envelope's keys, then the safetensors bytes parsed by hand."""
    assert set(obj) == {"__tensor__", "data", "shape", "dtype"} and obj["__tensor__"] is True
    if binary:
        assert isinstance(obj["data"], bytes), "msgpack answers carry raw bytes"
        raw = obj["data"]
    else:
        assert isinstance(obj["data"], str), "JSON answers carry base64 text"
        raw = base64.b64decode(obj["data"], validate=True)
    header_len = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + header_len])
    assert list(header) == ["t"], header  # exactly {"t": tensor}, as sglang saves it
    entry = header["t"]
    start, end = entry["data_offsets"]
    payload = bytearray(raw[8 + header_len + start : 8 + header_len + end])
    dtype = SAFETENSORS_DTYPES[entry["dtype"]]
    tensor = torch.frombuffer(payload, dtype=torch.uint8).view(dtype).reshape(entry["shape"]) if payload else \
        torch.empty(entry["shape"], dtype=dtype)
    assert list(tensor.shape) == obj["shape"] and obj["dtype"] == str(tensor.dtype)  # e.g. "torch.float32"
    return tensor


def decode(obj, binary: bool):
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return decode_tensor(obj, binary)
        return {k: decode(v, binary) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode(v, binary) for v in obj]
    return obj


def post_sglang(client: httpx.Client, body: dict, binary: bool = False) -> tuple[httpx.Response, list[dict]]:
    r = client.post("/rollout/generate", json=body, headers=MSGPACK if binary else {})
    assert r.status_code == 200, r.text
    if binary:
        assert r.headers["content-type"] == "application/msgpack"
        return r, decode(msgpack.unpackb(r.content, raw=False), binary=True)
    assert r.headers["content-type"].startswith("application/json")
    return r, decode(r.json(), binary=False)


def post_native(client: httpx.Client, seeds: list[int], sampling: dict, **extra) -> list[dict]:
    body = {"prompts": [PROMPT], "seeds": seeds, "n": len(seeds), "sampling": sampling, **extra}
    r = client.post("/rollout/generate", json=body)
    assert r.status_code == 200, r.text
    out = []
    for sample in r.json()["samples"]:
        decoded = {k: tensor_from_json(v) for k, v in sample.items() if isinstance(v, dict) and "dtype" in v}
        for group in ("denoising_env", "debug"):
            decoded.update({k: tensor_from_json(v) for k, v in sample.get(group, {}).items()})
        out.append(decoded)
    return out


class CountCalls:
    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


@pytest.fixture(scope="module")
def served(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path)
    server, address = serve_in_thread(engine, sampling=SAMPLING, api_key=KEY, limits=LIMITS)
    with httpx.Client(base_url=f"http://{address}", timeout=120, headers=AUTH) as client:
        yield engine, client, address
    server.stop()


# -- generate -------------------------------------------------------------------------------------------------------


def test_rollout_request_answers_sglang_responses_equal_to_the_native_schema(served):
    engine, client, _ = served
    r_json, as_json = post_sglang(client, BODY)
    r_pack, as_pack = post_sglang(client, BODY, binary=True)
    assert r_json.headers["x-weight-version"] == str(engine.weight_version)
    native = post_native(client, [11, 12], {"num_steps": 3, "noise_level": 0.8, "sde_window": [0, 1, 2],
                                            "negative_prompt": "blurry", "guidance_scale": 4.0,
                                            "log_prob_no_const": False}, return_debug=True)
    for responses in (as_json, as_pack):
        assert len(responses) == 2
        assert len({r["request_id"] for r in responses}) == 1 and len(responses[0]["request_id"]) == 36  # a uuid4
        for response, mine in zip(responses, native):
            assert set(response) == {"request_id", "prompt", "seed", "generated_output", "rollout_log_probs",
                                     "rollout_debug_tensors", "denoising_env", "dit_trajectory", "inference_time_s",
                                     "peak_memory_mb"}
            assert response["prompt"] == PROMPT and response["seed"] == 11  # sglang echoes the request's seed
            assert response["inference_time_s"] > 0 and response["peak_memory_mb"] is None  # no CUDA here
            image = response["generated_output"]
            assert image.shape == (3, 1, 32, 32) and torch.equal(image[:, 0], mine["image"])
            log_probs = response["rollout_log_probs"]
            assert log_probs.shape == (3,) and log_probs.dtype == torch.float32
            assert torch.equal(log_probs, mine["rollout_log_probs"]) and bool((log_probs != 0).all())
            latents = mine["all_latents"]  # [T+1, L, D]
            traj = response["dit_trajectory"]
            assert set(traj) == {"latents", "timesteps", "sigmas"}
            assert traj["latents"].shape == latents.shape and torch.equal(traj["latents"], latents)
            assert traj["timesteps"].shape == (4,) and torch.equal(traj["timesteps"][:3], mine["all_timesteps"])
            assert traj["timesteps"][3] == 0 and torch.equal(traj["sigmas"], mine["all_sigmas"])
            debug = response["rollout_debug_tensors"]
            assert torch.equal(debug["rollout_variance_noises"], mine["variance_noise"])
            assert torch.equal(debug["rollout_prev_sample_means"], mine["prev_sample_mean"])
            assert torch.equal(debug["rollout_model_outputs"], mine["model_output"])
            assert debug["rollout_noise_std_devs"].shape == (3, 1)
            assert torch.equal(debug["rollout_noise_std_devs"][:, 0], mine["noise_std"])
            env = response["denoising_env"]
            assert env["image_kwargs"] is None and env["guidance"] is None
            assert torch.equal(env["pos_cond_kwargs"]["encoder_hidden_states"], mine["prompt_embeds"])
            assert torch.equal(env["pos_cond_kwargs"]["encoder_hidden_states_mask"], mine["prompt_embeds_mask"])
            assert torch.equal(env["neg_cond_kwargs"]["encoder_hidden_states"], mine["negative_prompt_embeds"])
    # The two samples are two seeds (11, 12), not one sample twice.
    assert not torch.equal(as_json[0]["rollout_log_probs"], as_json[1]["rollout_log_probs"])


def test_rollout_options_follow_sglang(served):
    engine, client, _ = served
    base = {"prompt": PROMPT, "seed": 5}
    # Defaults: seed 42, one sample, every step stochastic, debug tensors on, no environment or trajectory.
    _, (default,) = post_sglang(client, {"prompt": PROMPT})
    (mine,) = post_native(client, [42], {"sde_window": [0, 1, 2]})
    assert default["seed"] == 42 and torch.equal(default["rollout_log_probs"], mine["rollout_log_probs"])
    assert default["rollout_debug_tensors"] is not None
    assert default["denoising_env"] is None and default["dit_trajectory"] is None
    # Step filters: noise only at step 1; the trajectory keeps x_T and the final latent.
    _, (filtered,) = post_sglang(client, {**base, "rollout_sde_step_indices": [1], "rollout_return_dit_trajectory": True,
                                          "rollout_return_step_indices": [0, 3], "rollout_debug_mode": False})
    (mine,) = post_native(client, [5], {"sde_window": [1]})
    log_probs = filtered["rollout_log_probs"]
    assert log_probs[0] == 0 and log_probs[2] == 0 and log_probs[1] != 0
    assert torch.equal(log_probs, mine["rollout_log_probs"]) and filtered["rollout_debug_tensors"] is None
    assert torch.equal(filtered["dit_trajectory"]["latents"], mine["all_latents"][[0, 3]])
    assert torch.equal(filtered["dit_trajectory"]["timesteps"], torch.stack([mine["all_timesteps"][0], torch.tensor(0.0)]))
    # cps without the constants; true_cfg_scale wins over guidance_scale; extra_sampling_params override fields.
    _, (cps,) = post_sglang(client, {**base, "rollout_sde_type": "cps", "rollout_log_prob_no_const": True,
                                     "guidance_scale": 1.0, "true_cfg_scale": 4.0,
                                     "extra_sampling_params": {"num_inference_steps": 2, "max_sequence_length": 64}})
    (mine,) = post_native(client, [5], {"sde_type": "cps", "log_prob_no_const": True, "num_steps": 2,
                                        "sde_window": [0, 1], "guidance_scale": 4.0, "max_sequence_length": 64})
    assert cps["rollout_log_probs"].shape == (2,) and torch.equal(cps["rollout_log_probs"], mine["rollout_log_probs"])
    # rollout=false: the plain deterministic sample, nothing else.
    _, (plain,) = post_sglang(client, {**base, "rollout": False, "rollout_return_dit_trajectory": True})
    (mine,) = post_native(client, [5], {"sde_type": "ode"})
    assert torch.equal(plain["generated_output"][:, 0], mine["image"])
    assert all(plain[k] is None for k in ("rollout_log_probs", "rollout_debug_tensors", "denoising_env", "dit_trajectory"))


# -- the same checks as the native schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, words",
    [
        ({**BODY, "num_outputs_per_prompt": 5}, 422, ["max_samples=4", "--max-samples"]),
        ({**BODY, "num_outputs_per_prompt": 10**9}, 422, ["max_samples=4", "--max-samples"]),
        ({**BODY, "width": 64}, 422, ["max_pixels=1024", "--max-pixels"]),
        ({**BODY, "num_inference_steps": 10**9}, 422, ["max_steps=8", "--max-steps"]),
        ({**BODY, "prompt": "x" * 101}, 422, ["max_prompt_chars=100", "--max-prompt-chars"]),
        ({**BODY, "negative_prompt": "x" * 101}, 422, ["max_prompt_chars=100", "--max-prompt-chars"]),
        ({**BODY, "prompts": [PROMPT]}, 422, ["ambiguous", "'prompts'", "'prompt'"]),
        ({**BODY, "rollout_sde_steps": [0]}, 422, ["rollout_sde_steps", "extra"]),
        ({**BODY, "seed": "3"}, 422, ["seed", "int"]),
        ({**BODY, "rollout": "false"}, 422, ["rollout", "bool"]),
        ({**BODY, "rollout_sde_type": "ode"}, 422, ["rollout_log_prob_no_const=true"]),
        ({**BODY, "rollout_log_prob_no_const": True}, 422, ["rollout_sde_type='sde'", "not served"]),
        ({**BODY, "rollout_sde_type": "dance"}, 422, ["rollout_sde_type", "'dance'"]),
        ({**BODY, "rollout_sde_step_indices": [0, 3]}, 422, ["rollout_sde_step_indices", "0..2", "[3]"]),
        ({**BODY, "rollout_return_step_indices": [4]}, 422, ["rollout_return_step_indices", "0..3"]),
        ({**BODY, "guidance_scale": 0.5}, 422, ["guidance_scale", ">= 1"]),
        ({**BODY, "rollout_noise_level": 1e9}, 422, ["rollout_noise_level", "noise_level"]),
        ({**BODY, "seed": 2**31 - 1}, 422, ["seed must be in 0..2147483646"]),
        ({**BODY, "num_frames": 8}, 422, ["num_frames"]),
        ({**BODY, "image_path": ["/etc/passwd"]}, 422, ["image_path", "text-to-image"]),
        ({**BODY, "extra_sampling_params": {"num_steps": 2}}, 422, ["extra_sampling_params", "num_steps"]),
    ],
)
def test_bad_rollout_requests_are_refused_before_any_work(served, body, status, words):
    engine, client, _ = served
    version = engine.weight_version
    dit_calls, text_calls = CountCalls(engine.transformer), CountCalls(engine.pipe.text_encoder)
    try:
        r = client.post("/rollout/generate", json=body)
    finally:
        dit_calls.handle.remove()
        text_calls.handle.remove()
    assert r.status_code == status, r.text
    detail = str(r.json()["detail"])
    for word in words:
        assert word in detail, (word, detail)
    assert dit_calls.count == 0 and text_calls.count == 0 and engine.weight_version == version


def test_rollout_requests_need_the_key_and_fit_the_body_limit(served):
    engine, client, address = served
    _, before = post_sglang(client, {"prompt": PROMPT, "seed": 3})
    with httpx.Client(base_url=f"http://{address}", timeout=60) as anonymous:
        for auth in ({}, {"Authorization": "Bearer wrong"}):
            r = anonymous.post("/rollout/generate", json=BODY, headers=auth)
            assert r.status_code == 401 and "API key" in r.json()["detail"]
    r = client.post("/rollout/generate", json={**BODY, "prompt": "x" * (LIMITS.request_bytes + 1)})
    assert r.status_code == 413 and "--max-request-mb" in r.json()["detail"]
    _, after = post_sglang(client, {"prompt": PROMPT, "seed": 3})
    assert torch.equal(before[0]["rollout_log_probs"], after[0]["rollout_log_probs"])  # nothing changed


# -- sglang's weight endpoints --------------------------------------------------------------------------------------


def sha256_of(module: torch.nn.Module) -> str:
    """sglang's checksum, written out: sorted names, each name's bytes then the tensor's raw bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.named_parameters(), key=lambda item: item[0]):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def test_weights_checksum_memory_occupation_and_refused_updates(served):
    engine, client, address = served
    r = client.post("/get_weights_checksum", json={"module_names": ["transformer", "no_such_module"]})
    assert r.status_code == 200, r.text
    assert r.json() == {"transformer": sha256_of(engine.transformer), "no_such_module": "not_found"}
    everything = client.post("/get_weights_checksum").json()
    assert {"transformer", "vae", "text_encoder"} <= set(everything)
    assert everything["vae"] == sha256_of(engine.pipe.vae)
    bad = client.post("/get_weights_checksum", json={"module_names": "transformer"})
    assert bad.status_code == 422 and "module_names" in bad.text

    # A weight update changes the transformer's checksum and nothing else.
    version = engine.weight_version
    params = {f"transformer.{n}": p.detach().clone() for n, p in engine.transformer.named_parameters()}
    first = next(iter(params))
    update = named_tensors_to_bytes({**params, first: params[first] + 0.01})
    r = client.post("/update_weights", content=update, headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 200, r.text
    after = client.post("/get_weights_checksum").json()
    assert after["transformer"] != everything["transformer"] and after["vae"] == everything["vae"]
    assert after["transformer"] == sha256_of(engine.transformer) and engine.weight_version == version + 1

    # sglang's sleep and wake up.
    _, before = post_sglang(client, {"prompt": PROMPT, "seed": 9})
    r = client.post("/release_memory_occupation")
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["sleeping"] is True and engine.is_sleeping
    assert client.post("/release_memory_occupation").json()["message"] == "already sleeping"
    asleep = client.post("/rollout/generate", json={"prompt": PROMPT})
    assert asleep.status_code == 409 and "asleep" in asleep.json()["detail"]
    r = client.post("/resume_memory_occupation")
    assert r.status_code == 200 and r.json() == {**r.json(), "success": True, "sleeping": False}
    _, woken = post_sglang(client, {"prompt": PROMPT, "seed": 9})
    assert torch.equal(before[0]["rollout_log_probs"], woken[0]["rollout_log_probs"])

    # sglang's pickled tensor updates are refused with the reason; nothing changes.
    checksum = client.post("/get_weights_checksum").json()
    r = client.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["gASVAAAA"]})
    assert r.status_code == 501 and "unpickles" in r.json()["message"] and "/update_weights" in r.json()["message"]
    r = client.post("/update_weights_from_disk", json={"model_path": "/tmp"})
    assert r.status_code == 501
    assert client.post("/get_weights_checksum").json() == checksum and engine.weight_version == version + 1

    with httpx.Client(base_url=f"http://{address}", timeout=60) as anonymous:
        for path in ("/get_weights_checksum", "/release_memory_occupation", "/resume_memory_occupation",
                     "/update_weights_from_tensor"):
            assert anonymous.post(path).status_code == 401, path
    assert not engine.is_sleeping
