"""Role-based loading: encoder / denoiser / decoder engines and servers, chained, equal the monolithic rollout.

Each role is loaded from a copy of the tiny model whose other components were deleted (so they cannot have been
read); three role servers in threads, chained by the DisaggregatedClient, give the monolithic server's tensors
bit for bit; bad requests get a clear 4xx and change nothing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from hydra import compose, initialize_config_dir

from verl_diffusion_rollout.config import DiffusionSamplingConfig, ServerLimits
from verl_diffusion_rollout.contract import FAMILY_ENV_KEYS
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.errors import RoleMismatch
from verl_diffusion_rollout.parallel import SequenceParallel
from verl_diffusion_rollout.pipelines.prompt_cache import PromptEmbeddingCache
from verl_diffusion_rollout.roles import DisaggregatedClient, StageError
from verl_diffusion_rollout.serialization import tensor_from_json, tensor_to_json
from verl_diffusion_rollout.server import parse_args, serve_in_thread
from verl_diffusion_rollout.stages import Role

ROOT = Path(__file__).resolve().parents[1]
KEY = "role-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPTS = ["a red cat", "a blue dog photo with a tree"]

# What each role of each family loads, and (for the copies) which component folders may stay on disk.
MODULES = {
    "qwenimage": {
        Role.ENCODER: ("text_encoder", "tokenizer"),
        Role.DENOISER: ("scheduler", "transformer"),
        Role.DECODER: ("vae",),
    },
    "sd3": {
        Role.ENCODER: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        Role.DENOISER: ("transformer", "scheduler"),
        Role.DECODER: ("vae",),
    },
}


def role_copy(source: str, dest: Path, role: Role, family: str) -> str:
    """A copy of ``source`` holding only ``role``'s component folders (the denoiser keeps ``vae/config.json``, the
    latent geometry, and not the VAE's weights)."""
    shutil.copytree(source, dest)
    keep = set(MODULES[family][role])
    for folder in dest.iterdir():
        if folder.is_dir() and folder.name not in keep:
            if role is Role.DENOISER and folder.name == "vae":
                for f in folder.iterdir():
                    if f.name != "config.json":
                        f.unlink()
            else:
                shutil.rmtree(folder)
    return str(dest)


@pytest.fixture(scope="module")
def family_paths(tiny_model_path, tiny_sd3_model_path):
    return {"qwenimage": tiny_model_path, "sd3": tiny_sd3_model_path}


@pytest.fixture(scope="module")
def role_paths(family_paths, tmp_path_factory):
    root = tmp_path_factory.mktemp("role_copies")
    return {
        (family, role): role_copy(path, root / f"{family}-{role.value}", role, family)
        for family, path in family_paths.items()
        for role in (Role.ENCODER, Role.DENOISER, Role.DECODER)
    }


@pytest.fixture(scope="module")
def stacks(family_paths, role_paths):
    """Per family: a monolithic server and the three role servers (all with an API key), in threads."""
    sampling = {
        "qwenimage": DiffusionSamplingConfig(height=64, width=64, num_steps=4, guidance_scale=4.0, noise_level=0.9),
        "sd3": DiffusionSamplingConfig(height=64, width=64, num_steps=4, guidance_scale=4.5, noise_level=0.7,
                                       negative_prompt="", max_sequence_length=16),
    }
    out, servers = {}, []
    for family, path in family_paths.items():
        engines = {Role.MONOLITHIC: DiffusersEngine(path)}
        for role in (Role.ENCODER, Role.DENOISER, Role.DECODER):
            engines[role] = DiffusersEngine(role_paths[(family, role)], role=role)
        addresses = {}
        for role, engine in engines.items():
            server, address = serve_in_thread(engine, sampling=sampling[family], api_key=KEY,
                                              limits=ServerLimits(max_samples=8))
            servers.append(server)
            addresses[role] = f"http://{address}"
        out[family] = {"engines": engines, "urls": addresses, "sampling": sampling[family]}
    yield out
    for server in servers:
        server.stop()


def post(url: str, path: str, body: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(url + path, json=body, headers=headers or {}, timeout=120)


def chain(stack) -> DisaggregatedClient:
    urls = stack["urls"]
    return DisaggregatedClient(urls[Role.ENCODER], urls[Role.DENOISER], urls[Role.DECODER], api_key=KEY)


# -- loading ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_each_role_loads_only_its_modules(family, family_paths, stacks):
    """Loaded from copies without the other components' folders (they cannot have been read): each role holds
    exactly its modules, the others are None; monolithic holds every module."""
    engines = stacks[family]["engines"]
    for role in (Role.ENCODER, Role.DENOISER, Role.DECODER):
        engine = engines[role]
        assert engine.role is role
        assert set(engine.modules) == set(MODULES[family][role])
        others = set().union(*MODULES[family].values()) - set(MODULES[family][role])
        assert all(getattr(engine.pipe, name) is None for name in others), role
    assert set(engines[Role.MONOLITHIC].modules) == set().union(*MODULES[family].values())
    # The denoiser draws latents in the VAE's geometry, read from vae/config.json alone.
    assert engines[Role.DENOISER].pipe.vae_scale_factor == engines[Role.MONOLITHIC].pipe.vae_scale_factor == 4


def test_a_role_missing_its_component_or_the_vae_config_fails_naming_it(tiny_model_path, tmp_path):
    broken = role_copy(tiny_model_path, tmp_path / "enc", Role.ENCODER, "qwenimage")
    with pytest.raises(FileNotFoundError, match="denoiser role loads 'transformer'"):
        DiffusersEngine(broken, role="denoiser")
    no_geometry = role_copy(tiny_model_path, tmp_path / "den", Role.DENOISER, "qwenimage")
    (Path(no_geometry) / "vae" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"vae/config.json"):
        DiffusersEngine(no_geometry, role="denoiser")


def test_a_wrong_role_is_refused_naming_the_value_and_the_choices(tiny_model_path):
    with pytest.raises(ValueError, match=r"role must be one of \['monolithic', 'encoder', 'denoiser', 'decoder'\], "
                                         r"got 'generator'"):
        DiffusersEngine(tiny_model_path, role="generator")
    with pytest.raises(ValueError, match=r"sequence_parallel \(size 2\) splits the transformer, which the 'encoder' "
                                         r"role does not load"):
        DiffusersEngine(tiny_model_path, role="encoder", sequence_parallel=SequenceParallel(group=None, size=2, rank=0))
    with pytest.raises(SystemExit):
        parse_args(["--model-path", tiny_model_path, "--role", "generator"])
    assert parse_args(["--model-path", tiny_model_path, "--role", "decoder"]).role == "decoder"


# -- endpoints ----------------------------------------------------------------------------------------------------


def test_health_reports_role_and_modules_without_a_key(stacks):
    urls = stacks["sd3"]["urls"]
    for role, url in urls.items():
        health = httpx.get(url + "/health").json()
        assert health["role"] == role.value and health["status"] == "ok"
        assert health["modules"] == list(stacks["sd3"]["engines"][role].modules)
    # sglang's checksum endpoint hashes a role's own modules; the others it never loaded are not found.
    checksums = post(urls[Role.DENOISER], "/get_weights_checksum", {"module_names": ["transformer", "vae"]}).json()
    assert checksums["vae"] == "not_found" and len(checksums["transformer"]) == 64
    mono = post(urls[Role.MONOLITHIC], "/get_weights_checksum", {"module_names": ["transformer"]}).json()
    assert mono == {"transformer": checksums["transformer"]}


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_encode_returns_one_row_per_prompt_under_the_contract_keys(family, stacks):
    stack = stacks[family]
    urls = stack["urls"]
    out = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": PROMPTS}).json()
    assert out["family"] == family and out["prompts"] == PROMPTS
    assert set(out["env"]) == set(FAMILY_ENV_KEYS[family])  # CFG on: negative (and SD3's pooled) keys too
    env = {k: tensor_from_json(v) for k, v in out["env"].items()}
    assert all(v.shape[0] == len(PROMPTS) for v in env.values())
    assert env["prompt_embeds"].shape[:2] == env["prompt_embeds_mask"].shape
    no_cfg = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": PROMPTS, "sampling": {"guidance_scale": 1.0}})
    assert not any(k.startswith("negative") for k in no_cfg.json()["env"])
    # The encoder's rows are the monolithic engine's, for the same prompts.
    direct = stack["engines"][Role.MONOLITHIC].encode(PROMPTS, stack["sampling"])
    assert all(torch.equal(env[k], direct[k]) for k in env)


def test_denoiser_generates_from_embeddings_and_returns_the_contract_without_images(stacks):
    stack = stacks["qwenimage"]
    urls = stack["urls"]
    env = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": PROMPTS}).json()["env"]
    r = post(urls[Role.DENOISER], "/rollout/generate", {"env": env, "prompts": PROMPTS, "n": 2, "seeds": [5, 6, 7, 8]})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["family"] == "qwenimage" and len(out["samples"]) == 4
    first = out["samples"][0]
    assert "image" not in first and first["prompt"] == PROMPTS[0] and first["seed"] == 5
    latents = tensor_from_json(first["all_latents"])
    assert torch.equal(tensor_from_json(first["final_latent"]), latents[-1])
    assert set(first["denoising_env"]) == set(FAMILY_ENV_KEYS["qwenimage"])
    images = post(urls[Role.DECODER], "/rollout/decode",
                  {"latents": tensor_to_json(latents[-1:]), "sampling": out["sampling"]}).json()["images"]
    assert tensor_from_json(images).shape == (1, 3, 64, 64)


@pytest.mark.parametrize("family", ["qwenimage", "sd3"])
def test_disaggregated_chain_equals_the_monolithic_server_bit_for_bit(family, stacks):
    """Encoder -> denoiser -> decoder over HTTP vs one monolithic server, same seeds, fp32 CPU: images, the whole
    latent trajectory, log-probs, schedule and denoising environment are equal exactly."""
    stack = stacks[family]
    request = {"prompts": PROMPTS, "n": 2, "seeds": [11, 12, 13, 14], "sampling": {"sde_window": [1, 2]}}
    mono = post(stack["urls"][Role.MONOLITHIC], "/rollout/generate", request)
    assert mono.status_code == 200, mono.text
    samples = mono.json()["samples"]
    with chain(stack) as client:
        batch = client.generate(PROMPTS, n=2, seeds=[11, 12, 13, 14], sampling={"sde_window": [1, 2]})
    assert batch.family == family and batch.prompts == [p for p in PROMPTS for _ in range(2)]
    assert batch.seeds.tolist() == [11, 12, 13, 14]
    assert batch.sde_mask[:, 1:3].all() and not batch.sde_mask[:, [0, 3]].any()
    expected = {
        "responses": [s["image"] for s in samples],
        **{k: [s[k] for s in samples] for k in ("all_latents", "rollout_log_probs", "sde_mask", "all_timesteps",
                                                 "all_sigmas")},
        **{k: [s["denoising_env"][k] for s in samples] for k in samples[0]["denoising_env"]},
    }
    assert set(expected) - {"responses"} >= set(FAMILY_ENV_KEYS[family])
    got = batch.to_dict()
    for key, rows in expected.items():
        assert torch.equal(got[key], torch.stack([tensor_from_json(r) for r in rows])), key
    assert (batch.rollout_log_probs[:, 1:3] != 0).all()


# -- bad requests -------------------------------------------------------------------------------------------------


def _fixed_seed_output(stack) -> torch.Tensor:
    with chain(stack) as client:
        return client.generate(PROMPTS[:1], seeds=[3]).all_latents


def _weights(engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.transformer.named_parameters()}


def test_wrong_embeddings_are_refused_422_naming_the_key_and_nothing_changes(stacks):
    stack = stacks["sd3"]
    urls, denoiser = stack["urls"], stack["engines"][Role.DENOISER]
    before, version, rng = _fixed_seed_output(stack), denoiser.weight_version, denoiser._rng.getstate()
    weights = _weights(denoiser)
    env = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": PROMPTS}).json()["env"]
    good = {k: tensor_from_json(v) for k, v in env.items()}
    width = good["prompt_embeds"].shape[2]

    def refused(changed: dict, *needles: str) -> None:
        body = {"env": {**env, **{k: tensor_to_json(v) for k, v in changed.items()}}, "prompts": PROMPTS}
        r = post(urls[Role.DENOISER], "/rollout/generate", body)
        assert r.status_code == 422, r.text
        assert all(n in r.json()["detail"] for n in needles), r.json()["detail"]

    refused({"prompt_embeds": good["prompt_embeds"][..., : width // 2]}, "prompt_embeds", f"[2, S, {width}] float32")
    refused({"pooled_prompt_embeds": good["pooled_prompt_embeds"].double()}, "pooled_prompt_embeds", "float32",
            "float64")
    refused({"prompt_embeds_mask": good["prompt_embeds_mask"][:, :-1]}, "prompt_embeds_mask", "S=")
    refused({"negative_prompt_embeds": torch.full_like(good["negative_prompt_embeds"], float("nan"))},
            "negative_prompt_embeds", "NaN")
    body = {"env": {k: v for k, v in env.items() if k != "negative_pooled_prompt_embeds"}, "prompts": PROMPTS}
    r = post(urls[Role.DENOISER], "/rollout/generate", body)
    assert r.status_code == 422 and "negative_pooled_prompt_embeds is missing" in r.json()["detail"]
    r = post(urls[Role.DENOISER], "/rollout/generate", {"env": env, "prompts": PROMPTS[:1]})  # 2 rows, 1 prompt
    assert r.status_code == 422 and "prompt_embeds" in r.json()["detail"] and "[1, S," in r.json()["detail"]
    r = post(urls[Role.DENOISER], "/rollout/generate", {"env": {**env, "latents": env["prompt_embeds"]}, "prompts": PROMPTS})
    assert r.status_code == 422 and "unknown keys ['latents']" in r.json()["detail"]
    assert denoiser.weight_version == version and denoiser._rng.getstate() == rng
    assert all(torch.equal(w, _weights(denoiser)[n]) for n, w in weights.items())
    assert torch.equal(_fixed_seed_output(stack), before)


def test_requests_a_role_cannot_serve_get_400_naming_the_role(stacks):
    stack = stacks["qwenimage"]
    urls, engines = stack["urls"], stack["engines"]
    before, weights = _fixed_seed_output(stack), _weights(engines[Role.DENOISER])
    latents = tensor_to_json(torch.zeros(1, 64, 16))
    cases = [
        (Role.DENOISER, "/rollout/generate", {"prompts": ["a cat"]}, "'denoiser' role", "cannot generate from prompts"),
        (Role.ENCODER, "/rollout/decode", {"latents": latents}, "'encoder' role", "cannot decode"),
        (Role.DECODER, "/rollout/encode", {"prompts": ["a cat"]}, "'decoder' role", "cannot encode"),
        (Role.ENCODER, "/rollout/generate", {"env": {}, "prompts": ["a cat"]}, "'encoder' role", "cannot denoise"),
        # sglang's RolloutRequest generates from a prompt: a monolithic server's
        (Role.DENOISER, "/rollout/generate", {"prompt": "a cat", "seed": 1}, "'denoiser' role", "from prompts"),
        (Role.DECODER, "/rollout/generate", {"prompt": "a cat", "seed": 1}, "'decoder' role", "from prompts"),
    ]
    for role, path, body, *needles in cases:
        r = post(urls[role], path, body)
        assert r.status_code == 400 and all(n in r.json()["detail"] for n in needles), (role, path, r.text)
    r = httpx.post(urls[Role.ENCODER] + "/update_weights", json={"tensors": {"x": tensor_to_json(torch.zeros(1))}},
                   headers=AUTH)
    assert r.status_code == 400 and "'encoder' role" in r.json()["detail"]
    with pytest.raises(RoleMismatch, match="'decoder' role"):
        engines[Role.DECODER].generate(["a cat"])
    with pytest.raises(RoleMismatch, match="'encoder' role"):
        engines[Role.ENCODER].attach_trainer()
    assert all(e.weight_version == 0 for e in engines.values()) and not engines[Role.ENCODER]._trainer_attached
    assert all(torch.equal(w, _weights(engines[Role.DENOISER])[n]) for n, w in weights.items())
    assert torch.equal(_fixed_seed_output(stack), before)
    assert httpx.get(urls[Role.DENOISER] + "/health").status_code == 200


def test_auth_and_limits_apply_to_every_role(stacks):
    stack = stacks["qwenimage"]
    urls = stack["urls"]
    for role, path in ((Role.ENCODER, "/rollout/encode"), (Role.DENOISER, "/rollout/generate"),
                       (Role.DECODER, "/rollout/decode"), (Role.MONOLITHIC, "/rollout/encode")):
        assert post(urls[role], path, {"prompts": ["a cat"]}, headers=None).status_code == 401, role
        assert post(urls[role], path, {"prompts": ["a cat"]}, headers={"Authorization": "Bearer nope"}).status_code == 401
    big = {"prompts": ["a cat"], "pad": "x" * (9 * 2**20)}  # over the 8 MiB request body limit
    for role, path in ((Role.ENCODER, "/rollout/encode"), (Role.DENOISER, "/rollout/generate"),
                       (Role.DECODER, "/rollout/decode")):
        r = post(urls[role], path, big)
        assert r.status_code == 413 and "--max-request-mb" in r.json()["detail"], role
    r = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": ["a cat"] * 9})
    assert r.status_code == 422 and "max_samples=8" in r.json()["detail"]
    env = post(urls[Role.ENCODER], "/rollout/encode", {"prompts": ["a cat"]}).json()["env"]
    r = post(urls[Role.DENOISER], "/rollout/generate", {"env": env, "prompts": ["a cat"], "n": 9})
    assert r.status_code == 422 and "max_samples=8" in r.json()["detail"]
    r = post(urls[Role.DENOISER], "/rollout/generate", {"env": env, "prompts": ["a cat"],
                                                         "sampling": {"height": 4096, "width": 4096}})
    assert r.status_code == 422 and "max_pixels" in r.json()["detail"]
    r = post(urls[Role.DECODER], "/rollout/decode", {"latents": tensor_to_json(torch.zeros(9, 64, 16))})
    assert r.status_code == 422 and "max_samples=8" in r.json()["detail"]
    r = post(urls[Role.DECODER], "/rollout/decode", {"latents": tensor_to_json(torch.zeros(2, 64, 15))})
    assert r.status_code == 422 and "latents" in r.json()["detail"] and "[2, 64, 16] float32" in r.json()["detail"]
    with DisaggregatedClient(urls[Role.ENCODER], urls[Role.DENOISER], urls[Role.DECODER], api_key="wrong") as bad:
        with pytest.raises(StageError, match="encoder .* answered 401") as info:
            bad.generate(["a cat"])
        assert info.value.status == 401


# -- text encoding once per prompt in the trainer -------------------------------------------------------------------


def test_prompt_cache_is_a_bounded_lru():
    cache = PromptEmbeddingCache(max_bytes=3 * 40)  # three 10-float entries
    calls = []

    def entry(name):
        calls.append(name)
        return torch.zeros(10)

    for name in ["a", "b", "c", "a", "d", "b"]:  # "d" evicts "b" (least recently used after "a" was reused)
        cache.get_or_compute(name, lambda name=name: entry(name))
    assert calls == ["a", "b", "c", "d", "b"] and len(cache) == 3 and cache.nbytes == 120
    assert cache.hits == 1 and cache.misses == 5
    off = PromptEmbeddingCache(0)
    off.get_or_compute("a", lambda: entry("a"))
    off.get_or_compute("a", lambda: entry("a"))
    assert calls[-2:] == ["a", "a"] and len(off) == 0
    with pytest.raises(ValueError, match=">= 0 bytes"):
        PromptEmbeddingCache(-1)


def test_trainer_encodes_each_distinct_prompt_once_per_step_with_identical_outputs(tiny_model_path, tmp_path):
    """The actor samples a step in forward batches of actor.micro_batch_size (here 4 batches of 2 for 2 groups of 4):
    without the cache every batch encoded its prompt and the negative prompt again (8 text-encoder runs); with it,
    each distinct text once (3), and the step's tensors are bit-identical."""
    from verl_diffusion_rollout.trainer.actor import FlowGRPOActor
    from verl_diffusion_rollout.trainer.config import FlowGRPOConfig

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base=None):
        cfg = compose(config_name="flowgrpo_tiny", overrides=[
            f"actor_rollout_ref.model.path={tiny_model_path}", f"trainer.output_dir={tmp_path}",
            "data.samples_per_step=8", "actor_rollout_ref.rollout.n=4", "actor_rollout_ref.actor.micro_batch_size=2",
            "actor_rollout_ref.rollout.sampling.num_steps=2", "actor_rollout_ref.rollout.sampling.height=32",
            "actor_rollout_ref.rollout.sampling.width=32",
        ])
    actor = FlowGRPOActor(FlowGRPOConfig.from_omegaconf(cfg))
    try:
        pipe = actor.engine.pipe
        runs = []
        pipe.text_encoder.register_forward_hook(lambda *_: runs.append(1))
        prompts = ["a red cat"] * 4 + ["a blue dog"] * 4
        seeds = list(range(8))
        first = actor.generate(prompts, seeds, step=1)
        cached = [b.to_dict() for b in actor._batches]
        assert len(runs) == 3  # 2 prompts + the negative prompt, over 4 forward batches
        actor.generate(prompts, seeds, step=2)
        assert len(runs) == 3  # the same prompts next step: still cached
        pipe.prompt_cache = None  # the engine without its cache
        runs.clear()
        again = actor.generate(prompts, seeds, step=1)
        assert len(runs) == 8  # 4 forward batches x (1 prompt + the negative)
        assert torch.equal(first.rewards, again.rewards)
        for with_cache, without in zip(cached, (b.to_dict() for b in actor._batches)):
            assert all(torch.equal(with_cache[k], without[k]) for k in with_cache)
    finally:
        actor.close()


# -- the per-role memory benchmark ----------------------------------------------------------------------------------


def test_role_memory_benchmark_tiny_loads_each_role_alone(tmp_path, engine):
    """benchmarks/role_memory.py --tiny: each role in its own process holds exactly its modules, and the three roles'
    parameters add up to the monolithic engine's, byte for byte (they partition the model)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "role_memory.py"), "--tiny", "--roles", "encoder,denoiser,decoder",
           "--out", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    (json_path,) = tmp_path.glob("cpu_*_role_memory_qwenimage.json")
    results = json.loads(json_path.read_text())
    rows = {r["role"]: r for r in results["rows"]}
    assert list(rows) == ["encoder", "denoiser", "decoder"]
    assert len({r["pid"] for r in rows.values()}) == 3
    for role in (Role.ENCODER, Role.DENOISER, Role.DECODER):
        assert set(rows[role.value]["modules"]) == set(MODULES["qwenimage"][role])
        assert rows[role.value]["param_bytes"] > 0 and rows[role.value]["request_s"] > 0
    monolithic = sum(p.numel() * p.element_size() for m in engine.pipe.components.values()
                     if isinstance(m, torch.nn.Module) for p in m.parameters())
    assert sum(r["param_bytes"] for r in rows.values()) == monolithic
    assert (tmp_path / json_path.name.replace(".json", ".md")).read_text().startswith("# Per-role memory")
