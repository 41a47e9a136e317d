"""The Qwen-Image log-prob pipeline through DiffusersEngine: contract, ODE exactness, replay, batch invariance."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from diffusers import QwenImagePipeline

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.contract import CONTRACT_KEYS, DEBUG_KEYS
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

PROMPTS = ["a red cat", "a blue dog photo with a tree", "a green bird on a house", "city sky"]


def test_contract_keys_shapes_and_dtypes(engine, small_sampling):
    batch = engine.generate(PROMPTS[:2], n=3, sampling=small_sampling.replace(return_debug=True))
    d = batch.to_dict()
    B, T = 6, small_sampling.num_steps
    L, D = (64 // 8) ** 2, 16  # tiny VAE factor 4, 2x2 packing: 8x8 tokens of 4 channels x 4
    assert set(CONTRACT_KEYS) <= set(d) and set(DEBUG_KEYS) <= set(d)
    assert d["responses"].shape == (B, 3, 64, 64) and d["responses"].dtype == torch.float32
    assert 0.0 <= d["responses"].min() and d["responses"].max() <= 1.0
    assert d["all_latents"].shape == (B, T + 1, L, D) and d["all_latents"].dtype == torch.float32
    assert d["all_timesteps"].shape == (B, T) and d["all_sigmas"].shape == (B, T + 1)
    assert torch.all(d["all_sigmas"][:, 0] == 1.0) and torch.all(d["all_sigmas"][:, -1] == 0.0)
    assert torch.allclose(d["all_timesteps"], d["all_sigmas"][:, :-1] * 1000)
    assert d["rollout_log_probs"].shape == (B, T) and d["rollout_log_probs"].dtype == torch.float32
    assert d["sde_mask"].dtype == torch.bool
    # default window: every step but the last
    assert d["sde_mask"][:, :-1].all() and not d["sde_mask"][:, -1].any()
    assert torch.all(d["rollout_log_probs"][:, -1] == 0) and torch.all(d["rollout_log_probs"][:, :-1] != 0)
    assert d["prompt_embeds"].shape[0] == B and d["prompt_embeds_mask"].shape == d["prompt_embeds"].shape[:2]
    assert d["negative_prompt_embeds"].shape[0] == B
    assert d["seeds"].dtype == torch.int64 and d["seeds"].shape == (B,)
    assert batch.prompts == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    assert d["model_output"].shape == (B, T, L, D) and d["noise_std"].shape == (B, T)
    # GRPO group: same prompt, different seeds -> different images
    assert len(set(d["seeds"].tolist())) == B
    assert not torch.equal(d["responses"][0], d["responses"][1])


def test_no_cfg_omits_negative_embeddings(engine, small_sampling):
    batch = engine.generate(PROMPTS[:1], sampling=small_sampling.replace(guidance_scale=1.0), seeds=[3])
    assert batch.negative_prompt_embeds is None and "negative_prompt_embeds" not in batch.to_dict()


def test_same_seed_same_sample_and_fresh_seeds_differ(engine, small_sampling):
    a = engine.generate(PROMPTS[:1], sampling=small_sampling, seeds=[123])
    b = engine.generate(PROMPTS[:1], sampling=small_sampling, seeds=[123])
    c = engine.generate(PROMPTS[:1], sampling=small_sampling)
    d = engine.generate(PROMPTS[:1], sampling=small_sampling)
    for key in CONTRACT_KEYS:
        assert torch.equal(a.to_dict()[key], b.to_dict()[key]), key
    assert c.seeds.item() != d.seeds.item()
    assert not torch.equal(c.all_latents, d.all_latents)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ode_rollout_is_bit_identical_to_stock_diffusers_pipeline(tiny_model_path, dtype):
    engine = DiffusersEngine(tiny_model_path, dtype=dtype)
    sampling = DiffusionSamplingConfig(
        height=64, width=64, num_steps=5, guidance_scale=4.0, sde_type="ode", batch_cfg=False, negative_prompt="blurry",
        text_token_multiple=1,  # the default; padded text (masked) moves the attention's rounding away from stock's
    )
    init = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    ours = engine.pipe([PROMPTS[1]], seeds=[0], sampling=sampling, latents=init.float())
    stock = QwenImagePipeline.from_pretrained(tiny_model_path, dtype=dtype)
    stock.set_progress_bar_config(disable=True)
    ref = stock(
        prompt=PROMPTS[1], negative_prompt="blurry", true_cfg_scale=4.0, height=64, width=64,
        num_inference_steps=5, latents=init, output_type="latent",
    ).images
    assert ref.dtype == dtype
    assert torch.equal(ours.all_latents[:, -1], ref.float())
    assert torch.equal(ours.rollout_log_probs, torch.zeros(1, 5)) and not ours.sde_mask.any()


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
@pytest.mark.parametrize("batch_cfg", [True, False])
def test_replay_equals_rollout_log_probs(engine, sde_type, guidance_scale, batch_cfg):
    sampling = DiffusionSamplingConfig(
        height=64, width=64, num_steps=6, sde_type=sde_type, guidance_scale=guidance_scale,
        batch_cfg=batch_cfg, noise_level=0.9, sde_window_size=2, sde_window_range=[1, 5],
    )
    batch = engine.generate(PROMPTS[:2], n=2, sampling=sampling)
    steps = trainable_steps(batch)
    assert len(steps) == 2 and 1 <= steps[0] and steps[-1] <= 4
    with torch.no_grad():
        replayed = compute_log_probs(engine.transformer, batch, steps)
    assert replayed.shape == (4, 2)
    assert torch.all(batch.rollout_log_probs[:, steps] != 0)
    assert (replayed - batch.rollout_log_probs[:, steps]).abs().max().item() == 0.0
    # Replaying all steps gives 0 at the deterministic ones.
    with torch.no_grad():
        full = compute_log_probs(engine.transformer, batch, range(6))
    assert torch.equal(full, batch.rollout_log_probs)


def test_replay_detects_different_weights(engine, tiny_model_path, small_sampling):
    batch = engine.generate(PROMPTS[:1], sampling=small_sampling, seeds=[5])
    other = DiffusersEngine(tiny_model_path)
    with torch.no_grad():
        for p in other.transformer.proj_out.parameters():
            p.add_(0.01)
        replayed = compute_log_probs(other.transformer, batch)
    assert (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item() > 1e-4


def test_window_is_deterministic_from_window_seed(engine, small_sampling):
    sampling = small_sampling.replace(num_steps=8, sde_window_size=2, sde_window_range=[0, 6])
    windows = set()
    for window_seed in range(6):
        batch = engine.generate(PROMPTS[:1], sampling=sampling, seeds=[1], window_seed=window_seed)
        steps = trainable_steps(batch)
        assert steps == sampling.stochastic_steps(window_seed) and len(steps) == 2
        assert torch.all(batch.rollout_log_probs[0, [i for i in range(8) if i not in steps]] == 0)
        windows.add(tuple(steps))
    assert len(windows) > 1


@pytest.mark.parametrize("position", [0, 3, 7])
def test_sample_is_batch_invariant(engine, position, record_property):
    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=4, return_debug=True)
    target_prompt, target_seed = "a red cat photo", 4242
    prompts = [PROMPTS[i % 4] for i in range(8)]
    seeds = list(range(100, 108))
    prompts[position], seeds[position] = target_prompt, target_seed
    alone = engine.generate([target_prompt], seeds=[target_seed], sampling=sampling)
    batch = engine.generate(prompts, seeds=seeds, sampling=sampling)
    # Noise depends on the seed alone: bit-identical initial latent and per-step epsilon.
    assert torch.equal(batch.all_latents[position, 0], alone.all_latents[0, 0])
    assert torch.equal(batch.debug["variance_noise"][position], alone.debug["variance_noise"][0])
    assert torch.equal(batch.prompt_embeds[position, : alone.prompt_embeds.shape[1]], alone.prompt_embeds[0])
    # The transformer sees a padded, masked batch: results agree to float32 rounding.
    latent_diff = (batch.all_latents[position] - alone.all_latents[0]).abs().max().item()
    logp_diff = (batch.rollout_log_probs[position] - alone.rollout_log_probs[0]).abs().max().item()
    record_property("final_latent_max_abs_diff", latent_diff)
    record_property("log_prob_max_abs_diff", logp_diff)
    print(f"batch invariance @ position {position}: latents {latent_diff:.3g}, log-probs {logp_diff:.3g}")
    assert latent_diff <= 1e-5
    assert logp_diff <= 1e-5


def test_concurrent_requests_equal_sequential_runs(engine, small_sampling):
    requests = [([PROMPTS[i]], [1000 + i], small_sampling.replace(sde_type=("sde", "cps")[i % 2])) for i in range(4)]
    sequential = [engine.generate(p, seeds=s, sampling=c) for p, s, c in requests]
    for _ in range(6):  # several rounds: races do not show every time
        results: list = [None] * 4
        errors: list = []
        barrier = threading.Barrier(4)

        def run(i):
            try:
                barrier.wait()
                results[i] = engine.generate(requests[i][0], seeds=requests[i][1], sampling=requests[i][2])
            except Exception as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for seq, par in zip(sequential, results):
            for key, value in seq.to_dict().items():
                assert torch.equal(value, par.to_dict()[key]), key


def test_scheduler_template_is_never_mutated(engine, small_sampling):
    template = engine.pipe.scheduler
    before = (template.step_index, template.begin_index, len(template.timesteps))
    engine.generate(PROMPTS[:1], sampling=small_sampling, seeds=[9])
    assert (template.step_index, template.begin_index, len(template.timesteps)) == before


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda e, s: e.generate([], sampling=s), ValueError, "non-empty"),
        (lambda e, s: e.generate(["x"], n=0, sampling=s), ValueError, "n .samples per prompt. must be an int >= 1, got 0"),
        (lambda e, s: e.generate(["x"], seeds=[1, 2], sampling=s), ValueError, "got 2 seeds for 1 prompts"),
        (lambda e, s: e.generate([3], sampling=s), ValueError, "every prompt must be a string"),
        (lambda e, s: e.generate(["x"], sampling=s.replace(height=60)), ValueError, "multiples of 8.*60x64"),
        (lambda e, s: e.generate(["x"], seeds=[-1], sampling=s), ValueError, "seeds must be in"),
        (lambda e, s: e.generate(["x"], sampling=s.replace(num_steps=1)), ValueError, "num_steps=1 gives a non-finite"),
    ],
)
def test_bad_requests_raise_clear_errors(engine, small_sampling, call, error, match):
    with pytest.raises(error, match=match):
        call(engine, small_sampling)


def test_unknown_model_folders_raise_clear_errors(tmp_path, tiny_model_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        DiffusersEngine(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="no model_index.json"):
        DiffusersEngine(str(tmp_path))
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(ValueError, match="no log-prob pipeline for diffusers pipeline 'StableDiffusionPipeline'"):
        DiffusersEngine(str(tmp_path))


def test_sampling_config_validation_names_the_key():
    for kwargs, match in [
        (dict(sde_type="foo"), "sampling.sde_type"),
        (dict(num_steps=0), "sampling.num_steps must be >= 1"),
        (dict(noise_level=-1.0), "sampling.noise_level"),
        (dict(guidance_scale=0.5), "sampling.guidance_scale"),
        (dict(num_steps=4, sde_window=[4]), "sampling.sde_window"),
        (dict(num_steps=4, sde_window_size=3, sde_window_range=[0, 2]), "sampling.sde_window_size"),
    ]:
        with pytest.raises(ValueError, match=match):
            DiffusionSamplingConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown sampling keys"):
        DiffusionSamplingConfig().replace(noise=1.0)
