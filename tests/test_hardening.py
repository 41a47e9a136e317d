"""Issue 10: the rollout server as a hostile or careless client meets it, and updates that are all or nothing.

Every bad input asserts its status (or exception), that the message names the problem, and that the weights, the
weight version and the next fixed-seed output did not change.
"""

from __future__ import annotations

import json
import math
import queue
import socket
import threading

import httpx
import pytest
import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from verl_diffusion_rollout.config import DiffusionSamplingConfig, LoRASyncConfig, ServerLimits
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.errors import GenerationCancelled
from verl_diffusion_rollout.lora import WeightUpdateError, to_lora_config
from verl_diffusion_rollout.serialization import SAFETENSORS_MEDIA_TYPE, named_tensors_to_bytes, tensor_to_json
from verl_diffusion_rollout.server import check_bind, check_sampling_limits, main, serve_in_thread

KEY = "test-key-0123456789"
AUTH = {"Authorization": f"Bearer {KEY}"}
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Small and fast: no CFG (one transformer call per step), two steps.
SAMPLING = DiffusionSamplingConfig(height=32, width=32, num_steps=2, guidance_scale=1.0, noise_level=0.8)
LIMITS = ServerLimits(max_request_mb=1, max_update_mb=2, max_samples=8, max_pixels=64 * 64, max_prompt_chars=200,
                      max_steps=20)
PROMPTS, SEEDS = ["a red cat"], [5]
GOOD_PEFT = {"r": 4, "lora_alpha": 8.0, "target_modules": TARGETS}


def random_lora(transformer, config: LoraConfig, seed: int, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """A random LoRA named as peft writes it, from a peft-wrapped copy of the architecture."""
    ref = type(transformer).from_config(transformer.config)
    inject_adapter_in_model(config, ref)
    g = torch.Generator().manual_seed(seed)
    return {f"base_model.model.{k}": torch.randn(v.shape, generator=g) * scale for k, v in get_peft_model_state_dict(ref).items()}


def snapshot(engine: DiffusersEngine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.transformer.named_parameters()}


def assert_weights(engine: DiffusersEngine, snap: dict[str, torch.Tensor]) -> None:
    now = dict(engine.transformer.named_parameters())
    assert now.keys() == snap.keys()
    for name, value in snap.items():
        assert torch.equal(now[name], value), f"{name} changed"


def output(engine: DiffusersEngine) -> dict[str, torch.Tensor]:
    return engine.generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING).to_dict()


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


class CountCalls:
    """Counts forward calls of a module (to show a rejected request did no work)."""

    def __init__(self, module: torch.nn.Module):
        self.count = 0
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1


@pytest.fixture(scope="module")
def served(tiny_model_path):
    """An engine with a valid LoRA (version 1), its reference output, and an authenticated, bounded server."""
    engine = DiffusersEngine(tiny_model_path)
    config = LoraConfig(**GOOD_PEFT)
    lora = random_lora(engine.transformer, config, seed=0)
    assert engine.update_weights(lora.items(), peft_config=config) == 1
    reference = output(engine)
    server, address = serve_in_thread(engine, sampling=SAMPLING, api_key=KEY, limits=LIMITS)
    with httpx.Client(base_url=f"http://{address}", timeout=120, headers=AUTH) as client:
        yield engine, client, address, lora, reference
    server.stop()


def lora_body(lora: dict[str, torch.Tensor], peft_config: dict) -> bytes:
    return named_tensors_to_bytes(lora, {"peft_config": peft_config})


# -- 1. authentication --------------------------------------------------------------------------------------------


def test_every_endpoint_but_health_needs_the_key(served):
    engine, client, address, lora, _ = served
    version = engine.weight_version
    calls = [
        ("POST", "/rollout/generate", {"json": {"prompts": ["x"]}}),
        ("POST", "/update_weights", {"content": lora_body(lora, GOOD_PEFT), "headers": {"content-type": SAFETENSORS_MEDIA_TYPE}}),
        ("POST", "/sleep", {}),
        ("POST", "/wake_up", {}),
        ("GET", "/weight_version", {}),
        ("GET", "/docs", {}),
    ]
    with httpx.Client(base_url=f"http://{address}", timeout=60) as anonymous:
        assert anonymous.get("/health").status_code == 200
        for method, path, kwargs in calls:
            for auth in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                headers = {**kwargs.get("headers", {}), **auth}
                r = anonymous.request(method, path, **{**kwargs, "headers": headers})
                assert r.status_code == 401, (path, auth, r.text)
                assert "API key" in r.json()["detail"] and r.headers["www-authenticate"] == "Bearer"
    assert not engine.is_sleeping and engine.weight_version == version
    assert client.get("/weight_version").json() == {"weight_version": version}


def test_public_bind_without_a_key_refuses_to_start(engine, monkeypatch):
    monkeypatch.delenv("VDR_API_KEY", raising=False)
    for host in ("0.0.0.0", "10.1.2.3", "::"):
        with pytest.raises(ValueError, match="VDR_API_KEY.*--allow-unauthenticated"):
            check_bind(host, None)
        check_bind(host, "a-key")
        check_bind(host, None, allow_unauthenticated=True)
    for host in ("127.0.0.1", "localhost", "::1"):
        check_bind(host, None)
    from verl_diffusion_rollout.server import RolloutServer

    with pytest.raises(ValueError, match="without an API key"):
        RolloutServer(engine, host="0.0.0.0")
    # The CLI refuses before loading anything (the model path does not even exist).
    with pytest.raises(SystemExit, match="--allow-unauthenticated"):
        main(["--model-path", "/does/not/exist", "--host", "0.0.0.0"])


def test_replica_passes_its_key_to_its_server_and_uses_it(tiny_model_path, monkeypatch):
    from verl_diffusion_rollout.verl_config import DiffusionRolloutConfig
    from verl_diffusion_rollout.replica import DiffusionReplica, DiffusionServer

    monkeypatch.delenv("VDR_API_KEY", raising=False)
    model = {"path": tiny_model_path}
    with pytest.raises(ValueError, match="without an API key"):
        DiffusionReplica(0, DiffusionRolloutConfig(device="cpu", server_host="0.0.0.0"), model, gpus_per_node=1)
    monkeypatch.setenv("VDR_API_KEY", "from-env")
    replica = DiffusionReplica(0, DiffusionRolloutConfig(device="cpu", server_host="0.0.0.0"), model, gpus_per_node=1)
    assert replica.http_headers == {"Authorization": "Bearer from-env"}
    config = DiffusionRolloutConfig(device="cpu", dtype="float32", server_api_key="replica-key", sampling=SAMPLING)
    replica = DiffusionReplica(0, config, model, gpus_per_node=1)
    assert replica.http_headers == {"Authorization": "Bearer replica-key"}
    assert "replica-key" not in repr(config)
    # The actor class, in this process: its server takes exactly the key the replica sends.
    server = DiffusionServer(config, replica.model_path, api_key="replica-key")
    try:
        with httpx.Client(base_url=f"http://{server.address()}", timeout=60) as client:
            assert client.get("/weight_version").status_code == 401
            assert client.get("/weight_version", headers=replica.http_headers).status_code == 200
    finally:
        server.shutdown()


# -- 2. limits and cancellation -----------------------------------------------------------------------------------


def _raw_post(address: str, head: str, body_chunks, read_timeout: float = 60.0) -> tuple[int, dict]:
    """POST through a raw socket: headers, then body bytes from a sender thread; returns (status, JSON body)."""
    host, port = address.rsplit(":", 1)
    sock = socket.create_connection((host, int(port)))
    sock.settimeout(read_timeout)

    def send():
        try:
            sock.sendall(head.encode())
            for chunk in body_chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed: expected once over the limit
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _content_length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    finally:
        sock.close()
    head_bytes, _, payload = data.partition(b"\r\n\r\n")
    status = int(head_bytes.split(b" ", 2)[1])
    return status, json.loads(payload[: _content_length(data)])


def _content_length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 1 << 30


def test_body_limit_is_enforced_while_reading(served):
    engine, client, address, _, _ = served
    limit = LIMITS.request_bytes
    head = (f"POST /rollout/generate HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    piece = b"x" * 65536
    chunk = f"{len(piece):x}\r\n".encode() + piece + b"\r\n"
    # 1.5x the limit and never the closing chunk: a server that buffered the whole body first would wait forever.
    status, body = _raw_post(address, head, [chunk] * (3 * limit // (2 * len(piece))))
    assert status == 413 and "--max-request-mb" in body["detail"] and "1 MiB" in body["detail"]
    # A declared size over the limit is refused before a byte of the body is read.
    head = (f"POST /rollout/generate HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {40 * 2**20}\r\n\r\n")
    status, body = _raw_post(address, head, [])
    assert status == 413 and "--max-request-mb" in body["detail"]
    # Weight uploads have their own, larger limit.
    head = (f"POST /update_weights HTTP/1.1\r\nHost: {address}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: {SAFETENSORS_MEDIA_TYPE}\r\nContent-Length: {LIMITS.update_bytes + 1}\r\n\r\n")
    status, body = _raw_post(address, head, [])
    assert status == 413 and "--max-update-mb" in body["detail"] and "2 MiB" in body["detail"]
    assert client.get("/health").status_code == 200 and engine.weight_version == 1


@pytest.mark.parametrize(
    "body, limit, flag",
    [
        ({"prompts": ["x"], "n": 10000}, "max_samples=8", "--max-samples"),
        ({"prompts": ["x"] * 9}, "max_samples=8", "--max-samples"),
        ({"prompts": ["x"], "sampling": {"height": 100000}}, "max_pixels=4096", "--max-pixels"),
        ({"prompts": ["x"], "sampling": {"height": 2048, "width": 2048}}, "max_pixels=4096", "--max-pixels"),
        ({"prompts": ["x"], "sampling": {"num_steps": 1000}}, "max_steps=20", "--max-steps"),
        ({"prompts": ["x" * 201]}, "max_prompt_chars=200", "--max-prompt-chars"),
        ({"prompts": ["x"], "sampling": {"negative_prompt": "y" * 201}}, "max_prompt_chars=200", "--max-prompt-chars"),
    ],
)
def test_request_limits_are_422_before_any_work(served, body, limit, flag):
    engine, client, _, _, reference = served
    text_calls, dit_calls = CountCalls(engine.pipe.text_encoder), CountCalls(engine.transformer)
    try:
        r = client.post("/rollout/generate", json=body)
    finally:
        text_calls.handle.remove()
        dit_calls.handle.remove()
    assert r.status_code == 422, r.text
    assert limit in r.json()["detail"] and flag in r.json()["detail"]
    assert text_calls.count == 0 and dit_calls.count == 0  # no work was started
    assert client.get("/health").status_code == 200


def test_default_limits_fit_the_recipes_and_refuse_height_100000():
    limits = ServerLimits()
    for h, w in ((512, 512), (1024, 1024), (1328, 1328), (1664, 928)):
        check_sampling_limits(DiffusionSamplingConfig(height=h, width=w, num_steps=50), limits)
    with pytest.raises(Exception) as err:
        check_sampling_limits(DiffusionSamplingConfig(height=100000), limits)
    assert err.value.status_code == 422 and "max_pixels" in err.value.detail and "--max-pixels" in err.value.detail
    with pytest.raises(ValueError, match="server_limits.max_steps"):
        ServerLimits(max_steps=0)


class ObservedEngine:
    """Our engine, unchanged, plus a record of how each of its generations ended (test instrumentation)."""

    def __init__(self, engine: DiffusersEngine):
        self.engine = engine
        self.outcomes: queue.Queue = queue.Queue()

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def generate(self, *args, cancel=None, **kwargs):
        self.cancel = cancel
        try:
            batch = self.engine.generate(*args, cancel=cancel, **kwargs)
        except BaseException as err:
            self.outcomes.put(err)
            raise
        self.outcomes.put(batch)
        return batch


def test_client_disconnect_cancels_generation_at_the_next_step(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path)
    observed = ObservedEngine(engine)
    server, address = serve_in_thread(observed, sampling=SAMPLING)
    calls = {"n": 0}
    entered = threading.Event()

    def hold_first_step(module, args):
        # Step 0 waits until the server has seen the client leave (bounded wait; no timing is asserted).
        calls["n"] += 1
        if calls["n"] == 1:
            entered.set()
            for _ in range(600):
                if observed.cancel():
                    return
                threading.Event().wait(0.05)

    handle = engine.transformer.register_forward_pre_hook(hold_first_step)
    try:
        host, port = address.rsplit(":", 1)
        payload = json.dumps({"prompts": ["a cat"], "seeds": [1], "sampling": {"num_steps": 20}}).encode()
        sock = socket.create_connection((host, int(port)))
        sock.sendall(f"POST /rollout/generate HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert entered.wait(120)
        sock.close()  # the client leaves during step 0
        outcome = observed.outcomes.get(timeout=120)
        assert isinstance(outcome, GenerationCancelled) and "before step 1 of 20" in str(outcome)
        assert calls["n"] == 1  # one transformer call of 20: stopped at the next step
        with httpx.Client(base_url=f"http://{address}", timeout=120) as client:
            assert client.get("/health").status_code == 200
            ok = client.post("/rollout/generate", json={"prompts": ["a cat"], "seeds": [1], "return_env": False})
            assert ok.status_code == 200 and not isinstance(observed.outcomes.get(timeout=1), BaseException)
    finally:
        handle.remove()
        server.stop()


# -- 3. validation: sampling values and peft configs ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sampling, key",
    [
        ({"noise_level": 1e308}, "noise_level"),
        ({"noise_level": float("nan")}, "noise_level"),
        ({"guidance_scale": 1e308}, "guidance_scale"),
        ({"log_prob_no_const": "false"}, "log_prob_no_const"),
        ({"batch_cfg": "false"}, "batch_cfg"),
        ({"height": 32.0}, "height"),
        ({"noise_level": "0.7"}, "noise_level"),
        ({"sde_window": ["0"]}, "sde_window"),
        ({"sde_type": 3}, "sde_type"),
    ],
)
def test_sampling_values_are_typed_and_bounded(served, sampling, key):
    engine, client, _, _, reference = served
    r = client.post("/rollout/generate", content=json.dumps({"prompts": ["x"], "sampling": sampling}),
                    headers={"content-type": "application/json"})
    assert r.status_code == 422 and key in r.json()["detail"], r.text
    with pytest.raises(ValueError, match=key):
        SAMPLING.replace(**sampling)


def test_request_fields_are_strict(served):
    _, client, _, _, _ = served
    for body, key in (({"prompts": ["x"], "return_env": "false"}, "return_env"), ({"prompts": ["x"], "n": "2"}, "n"),
                      ({"prompts": ["x"], "prompt": "typo"}, "prompt"), ({"prompts": "x"}, "prompts")):
        r = client.post("/rollout/generate", json=body)
        assert r.status_code == 422 and key in r.text, r.text


BAD_PEFT = {
    "alpha 1e308": ({"lora_alpha": 1e308}, "lora_alpha"),
    "alpha nan": ({"lora_alpha": float("nan")}, "lora_alpha"),
    "alpha 1e30": ({"lora_alpha": 1e30}, "scale"),
    "alpha 0": ({"lora_alpha": 0}, "lora_alpha"),
    "alpha bool": ({"lora_alpha": True}, "lora_alpha"),
    "r 0": ({"r": 0}, "r (the LoRA rank)"),
    "r -4": ({"r": -4}, "r (the LoRA rank)"),
    "r abc": ({"r": "abc"}, "r (the LoRA rank)"),
    "r 4.0": ({"r": 4.0}, "r (the LoRA rank)"),
    "targets 5": ({"target_modules": 5}, "target_modules"),
    "targets regex string": ({"target_modules": r"(\w+\.?)*X$"}, "regular expressions"),
    "targets regex entry": ({"target_modules": ["to_q", r"(\w+\.?)*X$"]}, "not a plain module name"),
    "dora": ({"use_dora": True}, "use_dora"),
    "rank_pattern": ({"rank_pattern": {"to_q": 8}}, "rank_pattern"),
    "alpha_pattern": ({"alpha_pattern": {"to_q": 64}}, "alpha_pattern"),
    "layers_to_transform": ({"layers_to_transform": [0]}, "layers_to_transform"),
    "unknown key": ({"lora_magic": 1}, "lora_magic"),
    "rslora string": ({"use_rslora": "false"}, "use_rslora"),
}


def test_bad_updates_over_http_change_nothing(served):
    engine, client, _, lora, reference = served
    before = snapshot(engine)
    for case, (change, key) in BAD_PEFT.items():
        for send in ("safetensors", "json"):
            peft = {**GOOD_PEFT, **change}
            if send == "safetensors":
                r = client.post("/update_weights", content=lora_body(lora, peft), headers={"content-type": SAFETENSORS_MEDIA_TYPE})
            else:
                body = json.dumps({"tensors": {k: tensor_to_json(v) for k, v in lora.items()}, "peft_config": peft})
                r = client.post("/update_weights", content=body, headers={"content-type": "application/json"})
            assert r.status_code == 400, (case, send, r.text)
            assert key in r.json()["detail"], (case, r.json()["detail"])
            assert engine.weight_version == 1, case
        assert_weights(engine, before)
    assert client.get("/health").json()["weight_version"] == 1
    assert_same(output(engine), reference)


def test_bad_updates_through_python_change_nothing(served):
    engine, _, _, lora, reference = served
    before = snapshot(engine)
    for case, (change, key) in BAD_PEFT.items():
        if case.startswith("targets regex"):
            continue  # trusted callers may pass peft's own regex / 'all-linear' targets
        with pytest.raises(WeightUpdateError, match=key.replace("(", r"\(").replace(")", r"\)")):
            engine.update_weights(lora.items(), peft_config={**GOOD_PEFT, **change})
    for config in (LoraConfig(**GOOD_PEFT, use_dora=True), LoraConfig(**GOOD_PEFT, rank_pattern={"to_q": 8}),
                   LoraConfig(**GOOD_PEFT, alpha_pattern={"to_k": 1.0}), LoraConfig(r=4, lora_alpha=1e30, target_modules=TARGETS)):
        with pytest.raises(WeightUpdateError, match="use_dora|rank_pattern|alpha_pattern|scale"):
            engine.update_weights(iter(lora.items()), peft_config=config)
    assert engine.weight_version == 1
    assert_weights(engine, before)
    assert_same(output(engine), reference)


def test_merge_that_would_overflow_is_refused_before_any_write(served):
    """Finite LoRA factors whose product overflows float32: found before the first write (same config, and a
    changed config that would otherwise first remove the current LoRA)."""
    engine, client, _, lora, reference = served
    before = snapshot(engine)
    huge = {k: torch.full_like(v, 1e20) for k, v in lora.items()}
    with pytest.raises(WeightUpdateError, match="overflows"):
        engine.update_weights(huge.items(), peft_config=dict(GOOD_PEFT))
    other = LoraConfig(r=2, lora_alpha=2.0, target_modules=["to_q", "add_q_proj"])
    changed = {k: torch.full_like(v, 1e20) for k, v in random_lora(engine.transformer, other, seed=3).items()}
    r = client.post("/update_weights", content=lora_body(changed, {"r": 2, "lora_alpha": 2.0, "target_modules": ["to_q", "add_q_proj"]}),
                    headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 400 and "overflows" in r.json()["detail"]
    assert engine.weight_version == 1
    assert_weights(engine, before)
    assert_same(output(engine), reference)


def test_update_whose_tensors_do_not_match_a_new_config_allocates_nothing(served):
    """A huge r with small tensors is refused by comparing shapes before any staging memory is allocated."""
    engine, client, _, lora, _ = served
    before = snapshot(engine)
    r = client.post("/update_weights", content=lora_body(lora, {**GOOD_PEFT, "r": 10**9, "lora_alpha": 10**9}),
                    headers={"content-type": SAFETENSORS_MEDIA_TYPE})
    assert r.status_code == 400 and "shape" in r.json()["detail"]
    assert engine.weight_version == 1
    assert_weights(engine, before)


def test_every_peft_path_refuses_what_it_cannot_apply():
    assert to_lora_config(dict(GOOD_PEFT)).r == 4
    assert to_lora_config(LoraConfig(**GOOD_PEFT).to_dict()).lora_alpha == 8.0  # a full peft dict round-trips
    assert to_lora_config(LoRASyncConfig(rank=4, alpha=8.0)).r == 4
    with pytest.raises(WeightUpdateError, match="alpha_pattern"):
        to_lora_config({**LoraConfig(**GOOD_PEFT).to_dict(), "alpha_pattern": {"to_q": 2.0}})
    with pytest.raises(WeightUpdateError, match="regular expressions"):
        to_lora_config({**GOOD_PEFT, "target_modules": ".*"}, from_client=True)
    assert to_lora_config({**GOOD_PEFT, "target_modules": "all-linear"}).target_modules == "all-linear"
    with pytest.raises(ValueError, match="lora.alpha"):
        LoRASyncConfig(rank=4, alpha="16")


# -- 4. errors ----------------------------------------------------------------------------------------------------


def test_error_statuses_and_the_server_keeps_serving(served):
    engine, client, _, _, reference = served
    body = {"prompts": PROMPTS, "seeds": SEEDS, "return_env": False}

    def still_serving():
        assert client.get("/health").status_code == 200
        assert client.post("/rollout/generate", json=body).status_code == 200

    assert client.post("/sleep").status_code == 200
    r = client.post("/rollout/generate", json=body)
    assert r.status_code == 409 and "asleep" in r.json()["detail"]
    assert client.post("/wake_up").status_code == 200
    still_serving()

    def raising(err):
        def hook(module, args):
            raise err
        return engine.transformer.register_forward_pre_hook(hook)

    # Stand-in for a GPU running out of memory (cannot happen on this CPU machine): the real exception type.
    handle = raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"))
    try:
        r = client.post("/rollout/generate", json=body)
    finally:
        handle.remove()
    assert r.status_code == 503 and "out of memory" in r.json()["detail"] and "20.00 GiB" in r.json()["detail"]
    still_serving()
    handle = raising(RuntimeError("shape '[1, 4, 16]' is invalid for input of size 7"))
    try:
        r = client.post("/rollout/generate", json=body)
    finally:
        handle.remove()
    assert r.status_code == 500 and r.json()["detail"].startswith("internal error (RuntimeError)")
    assert "shape" in r.json()["detail"]
    still_serving()
    assert engine.weight_version == 1
    assert_same(output(engine), reference)


def test_nonfinite_result_is_an_error_not_a_200(tiny_model_path):
    engine = DiffusersEngine(tiny_model_path)
    server, address = serve_in_thread(engine, sampling=SAMPLING)
    try:
        with httpx.Client(base_url=f"http://{address}", timeout=120) as client:
            # Finite weights (the update is valid) whose activations overflow float32.
            weights = {n: (p.detach() * 1e30 if n == "proj_out.weight" else p.detach()) for n, p in engine.transformer.named_parameters()}
            r = client.post("/update_weights", content=named_tensors_to_bytes(weights), headers={"content-type": SAFETENSORS_MEDIA_TYPE})
            assert r.status_code == 200
            r = client.post("/rollout/generate", json={"prompts": PROMPTS, "seeds": SEEDS})
            assert r.status_code == 500 and "NaN/Inf" in r.json()["detail"], r.text
            assert client.get("/health").status_code == 200
    finally:
        server.stop()


# -- 5. writer preference -----------------------------------------------------------------------------------------


def test_lock_lets_a_waiting_writer_go_before_new_readers():
    from verl_diffusion_rollout.engines.base import ReadWriteLock

    events: list[str] = []
    lock = ReadWriteLock(trace=events.append)
    order: list[str] = []
    reader_in, release_reader, writer_done = threading.Event(), threading.Event(), threading.Event()

    def old_reader():
        with lock.read():
            reader_in.set()
            release_reader.wait(60)
            order.append("old reader out")

    def writer():
        with lock.write():
            order.append("writer")
        writer_done.set()

    def new_reader():
        with lock.read():
            order.append("new reader")

    threads = [threading.Thread(target=old_reader)]
    threads[0].start()
    assert reader_in.wait(60)
    threads.append(threading.Thread(target=writer))
    threads[1].start()
    while "write_waiting" not in events:
        threading.Event().wait(0.01)
    threads.append(threading.Thread(target=new_reader))
    threads[2].start()
    release_reader.set()
    for t in threads:
        t.join(60)
    assert order == ["old reader out", "writer", "new reader"]
    assert events.index("write_acquired") < events.index("read_acquired", events.index("write_waiting"))


@pytest.mark.timeout(600)  # a starved update (the old lock) hangs: fail instead
def test_updates_under_load_wait_only_for_running_generations(tiny_model_path):
    """4 threads generate in a loop while 10 updates arrive. From the moment an update asks for the lock, no new
    generation starts before it (so it waits only for those already running); every result is the output of the
    weights of the version it reports."""
    engine = DiffusersEngine(tiny_model_path)
    config = LoraConfig(**GOOD_PEFT)
    loras = [random_lora(engine.transformer, config, seed=s) for s in (10, 11)]
    engine.update_weights(loras[1].items(), peft_config=config)
    expected = {0: None, 1: None}
    expected[1] = output(engine)  # odd versions: LoRA 1
    engine.update_weights(loras[0].items(), peft_config=config)
    expected[0] = output(engine)  # even versions: LoRA 0

    events: list[tuple[str, int]] = []
    engine._lock._trace = lambda name: events.append((name, threading.get_ident()))
    stop = threading.Event()
    results: list[tuple[int, dict]] = []
    done = threading.Semaphore(0)

    def generate_forever():
        while not stop.is_set():
            batch = engine.generate(PROMPTS, seeds=SEEDS, sampling=SAMPLING)
            results.append((batch.weight_version, batch.to_dict()))
            done.release()

    threads = [threading.Thread(target=generate_forever) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(10):
            assert done.acquire(timeout=300)  # let generations run between updates
            for _ in range(6000):  # and arrive while some are running (bounded wait)
                if engine._lock._readers:
                    break
                threading.Event().wait(0.005)
            version = engine.update_weights(loras[(i + 1) % 2].items(), peft_config=config)
            assert version == 3 + i
    finally:
        stop.set()
        for t in threads:
            t.join(300)
    names = [name for name, _ in events]
    waits = [i for i, name in enumerate(names) if name == "write_waiting"]
    assert len(waits) == 10
    running_at_arrival = []
    for start in waits:
        end = names.index("write_acquired", start)
        assert "read_acquired" not in names[start:end], "a generation that arrived after the update went first"
        running_at_arrival.append(names[:start].count("read_acquired") - names[:start].count("read_released"))
    assert sum(1 for n in running_at_arrival if n > 0) >= 5, running_at_arrival  # the load was real
    assert len({v for v, _ in results}) >= 5  # results from many versions, interleaved with the updates
    for version, out in results:
        assert_same(out, expected[version % 2])
