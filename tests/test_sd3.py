"""The SD3 / SD3.5 log-prob pipeline through DiffusersEngine, on the offline tiny SD3.5: folder, contract, ODE
exactness against diffusers' StableDiffusion3Pipeline, replay, batch invariance, bad inputs, LoRA sync."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.contract import CONTRACT_KEYS, DEBUG_KEYS, RolloutBatch
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.lora import WeightUpdateError
from verl_diffusion_rollout.pipelines import get_family, get_pipeline_class
from verl_diffusion_rollout.pipelines.sd3 import StableDiffusion3LogProbPipeline
from verl_diffusion_rollout.testing import TINY_SD3_DIMS, build_tiny_t5_tokenizer, tiny_sd3_path
from verl_diffusion_rollout.trainer.replay import StepReplayer, compute_log_probs, trainable_steps

PROMPTS = ["a red cat", "a blue dog photo with a tree", "a green bird on a house", "city sky"]
SD3_ATTENTION_MODULES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]


# -- the tiny model ---------------------------------------------------------------------------------------------------


def test_folder_layout_matches_a_real_sd35_checkpoint(tiny_sd3_model_path):
    with open(os.path.join(tiny_sd3_model_path, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == ["transformers", "T5EncoderModel"]
    assert index["tokenizer"][1] == index["tokenizer_2"][1] == "CLIPTokenizer"
    assert index["tokenizer_3"][1].startswith("T5Tokenizer")
    for sub in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer", "tokenizer_2",
                "tokenizer_3", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_sd3_model_path, sub)), sub
    # Loaded by the same code as a real checkpoint, with SD3.5-Medium's architecture features.
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model_path)
    config = pipe.transformer.config
    assert config.qk_norm == "rms_norm" and list(config.dual_attention_layers) == [0]
    assert pipe.scheduler.config.shift == 3.0 and pipe.vae_scale_factor == 4 and pipe.tokenizer_max_length == 77
    # CLIP-L + CLIP-G hidden widths = T5 width = joint_attention_dim; projections = pooled width.
    assert 2 * TINY_SD3_DIMS["clip"]["hidden_size"] == pipe.text_encoder_3.config.d_model == config.joint_attention_dim
    assert 2 * TINY_SD3_DIMS["clip"]["projection_dim"] == config.pooled_projection_dim


def test_t5_tokenizer_handles_any_text():
    tok = build_tiny_t5_tokenizer()
    ids = tok("a red cat, naïve ☕ 123").input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id in ids and len(ids) > 5


def test_cache_path_builds_once(tmp_path):
    first = tiny_sd3_path(tmp_path)
    mtime = os.path.getmtime(os.path.join(first, "model_index.json"))
    assert tiny_sd3_path(tmp_path) == first
    assert os.path.getmtime(os.path.join(first, "model_index.json")) == mtime


def test_registry_maps_the_diffusers_class_and_the_family():
    assert get_pipeline_class("StableDiffusion3Pipeline") is StableDiffusion3LogProbPipeline
    assert get_family("sd3") is StableDiffusion3LogProbPipeline.family
    with pytest.raises(ValueError, match="unknown model family 'flux'"):
        get_family("flux")


# -- the data contract ------------------------------------------------------------------------------------------------


def test_contract_keys_shapes_and_dtypes(sd3_engine, sd3_sampling):
    batch = sd3_engine.generate(PROMPTS[:2], n=2, sampling=sd3_sampling.replace(return_debug=True))
    d = batch.to_dict()
    B, T = 4, sd3_sampling.num_steps
    C, h = 4, 64 // 4  # tiny VAE factor 4, 4 latent channels, unpacked
    S = 77 + sd3_sampling.max_sequence_length  # CLIP tokens then T5 tokens
    assert batch.family == "sd3" and batch.meta()["family"] == "sd3"
    assert sd3_engine.attn_processor is None  # SD3 keeps diffusers' joint-attention processors
    assert set(CONTRACT_KEYS) <= set(d) and set(DEBUG_KEYS) <= set(d)
    assert d["responses"].shape == (B, 3, 64, 64) and 0.0 <= d["responses"].min() and d["responses"].max() <= 1.0
    assert d["all_latents"].shape == (B, T + 1, C, h, h) and d["all_latents"].dtype == torch.float32
    assert d["all_timesteps"].shape == (B, T) and d["all_sigmas"].shape == (B, T + 1)
    assert torch.all(d["all_sigmas"][:, 0] == 1.0) and torch.all(d["all_sigmas"][:, -1] == 0.0)
    assert torch.allclose(d["all_timesteps"], d["all_sigmas"][:, :-1] * 1000)
    assert d["prompt_embeds"].shape == (B, S, 32) and bool(d["prompt_embeds_mask"].all())
    assert d["pooled_prompt_embeds"].shape == (B, 32) and d["negative_pooled_prompt_embeds"].shape == (B, 32)
    assert d["negative_prompt_embeds"].shape == (B, S, 32)
    assert d["sde_mask"][:, :-1].all() and not d["sde_mask"][:, -1].any()
    assert torch.all(d["rollout_log_probs"][:, :-1] != 0) and torch.all(d["rollout_log_probs"][:, -1] == 0)
    assert d["model_output"].shape == (B, T, C, h, h) and d["noise_std"].shape == (B, T)
    assert batch.prompts == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
    assert not torch.equal(d["responses"][0], d["responses"][1])  # a group: same prompt, different seeds
    # Each distinct prompt is encoded once: group members share bit-identical embeddings.
    assert torch.equal(d["prompt_embeds"][0], d["prompt_embeds"][1])
    assert not torch.equal(d["prompt_embeds"][0], d["prompt_embeds"][2])


def test_no_cfg_omits_negative_embeddings(sd3_engine, sd3_sampling):
    batch = sd3_engine.generate(PROMPTS[:1], sampling=sd3_sampling.replace(guidance_scale=1.0), seeds=[3])
    d = batch.to_dict()
    assert batch.negative_prompt_embeds is None and batch.negative_pooled_prompt_embeds is None
    assert "negative_prompt_embeds" not in d and "negative_pooled_prompt_embeds" not in d
    assert "pooled_prompt_embeds" in d


def test_family_survives_the_dataproto_round_trip_and_concat(sd3_engine, sd3_sampling, engine):
    from verl_diffusion_rollout.rollout import from_data_proto, to_data_proto

    batch = sd3_engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[1, 2])
    back = from_data_proto(to_data_proto(batch))
    assert back.family == "sd3" and torch.equal(back.pooled_prompt_embeds, batch.pooled_prompt_embeds)
    assert torch.equal(back.negative_pooled_prompt_embeds, batch.negative_pooled_prompt_embeds)
    # Without meta_info["family"] (an older producer) the family is recognised from the pooled embeddings.
    assert RolloutBatch.from_dict(batch.to_dict(), batch.prompts, batch.sampling).family == "sd3"
    joined = RolloutBatch.concat([batch, back.select([1])])
    assert joined.family == "sd3" and len(joined) == 3
    assert torch.equal(joined.pooled_prompt_embeds[2], batch.pooled_prompt_embeds[1])
    with torch.no_grad():
        replayed = compute_log_probs(sd3_engine.transformer, back)
    assert (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item() == 0.0
    qwen = engine.generate(PROMPTS[:1], sampling=sd3_sampling, seeds=[1])
    with pytest.raises(ValueError, match="different model families"):
        RolloutBatch.concat([batch, qwen])
    with pytest.raises(ValueError, match="sd3 rollout batch needs pooled_prompt_embeds"):
        RolloutBatch.from_dict(qwen.to_dict(), qwen.prompts, qwen.sampling, family="sd3")


# -- numerics -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype,guidance_scale", [(torch.float32, 4.5), (torch.bfloat16, 4.5), (torch.float32, 1.0)]
)
def test_ode_rollout_is_bit_identical_to_stock_diffusers_pipeline(tiny_sd3_model_path, dtype, guidance_scale):
    engine = DiffusersEngine(tiny_sd3_model_path, dtype=dtype)
    sampling = DiffusionSamplingConfig(
        height=64, width=64, num_steps=5, guidance_scale=guidance_scale, sde_type="ode", batch_cfg=True,
        negative_prompt="blurry", max_sequence_length=16,
    )
    init = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(7)).to(dtype)
    ours = engine.pipe([PROMPTS[1]], seeds=[0], sampling=sampling, latents=init.float())
    stock = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model_path, dtype=dtype)
    stock.set_progress_bar_config(disable=True)
    ref = stock(
        prompt=PROMPTS[1], negative_prompt="blurry", guidance_scale=guidance_scale, height=64, width=64,
        num_inference_steps=5, latents=init, output_type="latent", max_sequence_length=16,
    ).images
    assert ref.dtype == dtype
    assert torch.equal(ours.all_latents[:, -1], ref.float())
    assert torch.equal(ours.rollout_log_probs, torch.zeros(1, 5)) and not ours.sde_mask.any()
    # Same schedule as diffusers' pipeline sets it (shift 3), timesteps = sigma * 1000.
    assert torch.equal(ours.all_timesteps[0], stock.scheduler.timesteps.float())


@pytest.mark.parametrize("sde_type", ["sde", "cps"])
@pytest.mark.parametrize("guidance_scale,batch_cfg", [(1.0, True), (4.5, True), (4.5, False)])
def test_replay_equals_rollout_log_probs(sd3_engine, sde_type, guidance_scale, batch_cfg):
    sampling = DiffusionSamplingConfig(
        height=64, width=64, num_steps=5, sde_type=sde_type, guidance_scale=guidance_scale, batch_cfg=batch_cfg,
        noise_level=0.9, sde_window_size=2, sde_window_range=[1, 4], negative_prompt="", max_sequence_length=16,
    )
    batch = sd3_engine.generate(PROMPTS[:2], n=2, sampling=sampling, window_seed=11)
    steps = trainable_steps(batch)
    assert steps == sampling.stochastic_steps(11) and len(steps) == 2
    with torch.no_grad():
        replayed = compute_log_probs(sd3_engine.transformer, batch, steps)
    assert replayed.shape == (4, 2) and torch.all(batch.rollout_log_probs[:, steps] != 0)
    assert (replayed - batch.rollout_log_probs[:, steps]).abs().max().item() == 0.0
    with torch.no_grad():
        full = compute_log_probs(sd3_engine.transformer, batch, range(5))
    assert torch.equal(full, batch.rollout_log_probs)


def test_replay_detects_different_weights_and_guidance(sd3_engine, tiny_sd3_model_path, sd3_sampling):
    batch = sd3_engine.generate(PROMPTS[:1], sampling=sd3_sampling, seeds=[5])
    steps = trainable_steps(batch)
    with torch.no_grad():
        other_cfg = compute_log_probs(sd3_engine.transformer, batch, steps, guidance_scale=1.0)
        other = DiffusersEngine(tiny_sd3_model_path)
        for p in other.transformer.proj_out.parameters():
            p.add_(0.05)
        other_weights = compute_log_probs(other.transformer, batch, steps)
    diffs = [(replayed - batch.rollout_log_probs[:, steps]).abs().max().item() for replayed in (other_cfg, other_weights)]
    print(f"SD3 replay with CFG off / perturbed weights: max |d log_prob| = {diffs}")
    assert min(diffs) > 1e-3


def test_replayer_refuses_padded_sd3_text(sd3_engine, sd3_sampling):
    batch = sd3_engine.generate(PROMPTS[:1], sampling=sd3_sampling, seeds=[5])
    batch.prompt_embeds_mask = batch.prompt_embeds_mask.clone()
    batch.prompt_embeds_mask[:, -3:] = 0
    with pytest.raises(ValueError, match="prompt_embeds_mask marks padding"):
        StepReplayer(batch, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("position", [0, 5])
def test_sample_is_batch_invariant(sd3_engine, position, record_property):
    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=3, guidance_scale=4.5, return_debug=True,
                                       negative_prompt="", max_sequence_length=16)
    target_prompt, target_seed = "a red cat photo", 4242
    prompts = [PROMPTS[i % 4] for i in range(8)]
    seeds = list(range(100, 108))
    prompts[position], seeds[position] = target_prompt, target_seed
    alone = sd3_engine.generate([target_prompt], seeds=[target_seed], sampling=sampling)
    batch = sd3_engine.generate(prompts, seeds=seeds, sampling=sampling)
    # Noise and text depend on the seed and prompt alone: bit-identical initial latent, epsilons and embeddings.
    assert torch.equal(batch.all_latents[position, 0], alone.all_latents[0, 0])
    assert torch.equal(batch.debug["variance_noise"][position], alone.debug["variance_noise"][0])
    assert torch.equal(batch.prompt_embeds[position], alone.prompt_embeds[0])
    assert torch.equal(batch.pooled_prompt_embeds[position], alone.pooled_prompt_embeds[0])
    latent_diff = (batch.all_latents[position] - alone.all_latents[0]).abs().max().item()
    logp_diff = (batch.rollout_log_probs[position] - alone.rollout_log_probs[0]).abs().max().item()
    record_property("final_latent_max_abs_diff", latent_diff)
    record_property("log_prob_max_abs_diff", logp_diff)
    print(f"SD3 batch invariance @ position {position}: latents {latent_diff:.3g}, log-probs {logp_diff:.3g}")
    assert latent_diff <= 1e-5 and logp_diff <= 1e-5


def test_concurrent_requests_equal_sequential_runs(sd3_engine, sd3_sampling):
    import threading

    requests = [([PROMPTS[i]], [1000 + i], sd3_sampling.replace(sde_type=("sde", "cps")[i % 2])) for i in range(3)]
    sequential = [sd3_engine.generate(p, seeds=s, sampling=c) for p, s, c in requests]
    for _ in range(4):  # several rounds: races do not show every time
        results: list = [None] * 3
        errors: list = []
        barrier = threading.Barrier(3)

        def run(i):
            try:
                barrier.wait()
                results[i] = sd3_engine.generate(requests[i][0], seeds=requests[i][1], sampling=requests[i][2])
            except Exception as err:  # surfaced below
                errors.append(err)

        threads = [threading.Thread(target=run, args=(i,)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        for seq, par in zip(sequential, results):
            for key, value in seq.to_dict().items():
                assert torch.equal(value, par.to_dict()[key]), key


# -- bad inputs ----------------------------------------------------------------------------------------------------------


def test_bad_requests_raise_clear_errors_and_change_nothing(sd3_engine, sd3_sampling):
    before = sd3_engine.generate(PROMPTS[:1], sampling=sd3_sampling, seeds=[77])
    cases = [
        (lambda e, s: e.generate([], sampling=s), "non-empty"),
        (lambda e, s: e.generate(["x"], n=0, sampling=s), r"n \(samples per prompt\) must be an int >= 1, got 0"),
        (lambda e, s: e.generate(["x"], seeds=[1, 2], sampling=s), "got 2 seeds for 1 prompts"),
        (lambda e, s: e.generate([3], sampling=s), "every prompt must be a string, got 3"),
        (lambda e, s: e.generate(["x"], sampling=s.replace(height=60)), r"multiples of 8 .*got 60x64"),
        (lambda e, s: e.generate(["x"], sampling=s.replace(width=256)), r"at most 128 px .*got 64x256"),
        (lambda e, s: e.generate(["x"], sampling=s.replace(max_sequence_length=600)),
         "max_sequence_length must be <= 512 for SD3's T5 encoder, got 600"),
        (lambda e, s: e.generate(["x"], seeds=[-1], sampling=s), "seeds must be in .*got -1"),
        (lambda e, s: e.pipe(["x"], seeds=[1], sampling=s, latents=torch.zeros(1, 4, 8, 8)),
         r"latents must have shape \(1, 4, 16, 16\), got \(1, 4, 8, 8\)"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call(sd3_engine, sd3_sampling)
    assert sd3_engine.weight_version == before.weight_version
    after = sd3_engine.generate(PROMPTS[:1], sampling=sd3_sampling, seeds=[77])
    for key, value in before.to_dict().items():
        assert torch.equal(value, after.to_dict()[key]), key


# -- the engine: LoRA sync with SD3's module names ----------------------------------------------------------------------


def test_engine_lora_sync_changes_output_deterministically_and_bad_updates_change_nothing(
    tiny_sd3_model_path, sd3_sampling
):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    engine = DiffusersEngine(tiny_sd3_model_path)
    before = engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[5, 6])
    again = engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[5, 6])
    assert torch.equal(before.all_latents, again.all_latents)  # generation is deterministic

    config = LoraConfig(r=4, lora_alpha=8, target_modules=SD3_ATTENTION_MODULES, init_lora_weights=False)
    trainer_copy = type(engine.transformer).from_config(engine.transformer.config)
    inject_adapter_in_model(config, trainer_copy)
    lora = {k: v * 0.3 for k, v in get_peft_model_state_dict(trainer_copy).items()}
    names = list(lora)
    assert any(".attn2.to_q." in n for n in names)  # SD3.5's dual-attention (MMDiT-X) block
    assert any(".to_add_out." in n for n in names) and any(".add_k_proj." in n for n in names)

    assert engine.update_weights(iter(lora.items()), peft_config=config) == 1
    synced = engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[5, 6])
    assert synced.weight_version == 1 and not torch.equal(synced.all_latents, before.all_latents)
    assert torch.equal(engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[5, 6]).all_latents, synced.all_latents)

    # A bad update (one non-finite tensor) is refused whole: version and the next fixed-seed output unchanged.
    bad = dict(lora)
    bad[names[-1]] = torch.full_like(lora[names[-1]], float("nan"))
    with pytest.raises(WeightUpdateError):
        engine.update_weights(iter(bad.items()), peft_config=config)
    assert engine.weight_version == 1
    assert torch.equal(engine.generate(PROMPTS[:2], sampling=sd3_sampling, seeds=[5, 6]).all_latents, synced.all_latents)

    # A trainer's peft-wrapped transformer carrying the same LoRA (unmerged) replays the synced rollout: the names
    # map onto the same modules (merged vs unmerged arithmetic differs only in rounding).
    from diffusers import SD3Transformer2DModel
    from peft import set_peft_model_state_dict

    policy = SD3Transformer2DModel.from_pretrained(tiny_sd3_model_path, subfolder="transformer")
    inject_adapter_in_model(config, policy)
    set_peft_model_state_dict(policy, lora)
    with torch.no_grad():
        replayed = compute_log_probs(policy.eval(), synced)
        base = compute_log_probs(SD3Transformer2DModel.from_pretrained(tiny_sd3_model_path, subfolder="transformer"), synced)
    steps = trainable_steps(synced)
    diff = (replayed - synced.rollout_log_probs[:, steps]).abs().max().item()
    print(f"SD3 merged-LoRA rollout vs unmerged peft replay: max |d log_prob| = {diff:.3g}")
    assert diff < 1e-4 < (base - synced.rollout_log_probs[:, steps]).abs().max().item()


# -- model configs ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tiny_sd3", "sd35_medium"])
def test_model_configs_target_the_joint_attention_of_every_block(name, tiny_sd3_model_path, tmp_path, monkeypatch):
    from pathlib import Path

    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from peft import LoraConfig

    import verl_diffusion_rollout  # noqa: F401  (registers the vdr.* resolvers)
    from verl_diffusion_rollout.lora import LoRASpec

    config = OmegaConf.load(Path(__file__).resolve().parents[1] / "configs" / "model" / f"{name}.yaml")
    if name == "tiny_sd3":
        monkeypatch.setenv("VDR_CACHE", str(tmp_path))
        model = instantiate(config)
        assert model.local_path == str(tmp_path / "tiny-sd3") and os.path.isfile(
            os.path.join(model.local_path, "model_index.json"))
    else:
        assert OmegaConf.is_missing(config, "path") and (config.lora_rank, config.lora_alpha) == (32, 64)
    transformer = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_model_path).transformer
    spec = LoRASpec.from_model(transformer, LoraConfig(r=4, target_modules=list(config.target_modules)))
    # The 8 joint-attention projections of the first block and 7 of the last (text-pre-only: it keeps add_q/k/v_proj
    # but has no to_add_out), never the first block's image-only attn2.
    assert not any(".attn2." in m for m in spec.modules)
    assert {m.rsplit("attn.", 1)[1] for m in spec.modules} == set(SD3_ATTENTION_MODULES)
    assert len(spec.modules) == 8 + 7
