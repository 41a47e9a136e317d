"""GPU paths of the engine (skipped, with the reason, where no CUDA GPU is present; CI has none).

Run on a GPU machine with ``python -m pytest -q -m gpu tests/test_gpu.py``; the CPU suite covers the same code
paths on the CPU.
"""

from __future__ import annotations

import pytest
import torch

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.engines import DiffusersEngine
from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (CI has none; run with -m gpu on one)"),
]

SAMPLING = DiffusionSamplingConfig(height=64, width=64, num_steps=6, sde_window=[1, 3], noise_level=0.9)
PROMPTS = ["a red cat", "a blue dog photo with a tree"]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_rollout_replays_exactly(tiny_model_path, dtype, compile):
    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=dtype, compile=compile)
    for sde_type in ("sde", "cps"):
        batch = engine.generate(PROMPTS, n=2, sampling=SAMPLING.replace(sde_type=sde_type), seeds=[1, 2, 3, 4])
        assert batch.all_latents.device.type == "cpu" and torch.isfinite(batch.all_latents).all()
        with torch.no_grad():
            replayed = compute_log_probs(engine.transformer, batch, trainable_steps(batch)).cpu()
        diff = (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item()
        print(f"{dtype} compile={compile} {sde_type}: replay max |diff| = {diff}")
        assert diff == 0.0


def test_cuda_ode_matches_stock_diffusers(tiny_model_path):
    from diffusers import QwenImagePipeline

    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16, fast_attention=False,
                             attention_backend="default")
    sampling = SAMPLING.replace(sde_type="ode", batch_cfg=False)
    init = torch.randn(1, 64, 16, generator=torch.Generator().manual_seed(0)).bfloat16()
    ours = engine.pipe([PROMPTS[0]], seeds=[0], sampling=sampling, latents=init.float())
    stock = QwenImagePipeline.from_pretrained(tiny_model_path, dtype=torch.bfloat16).to("cuda")
    stock.set_progress_bar_config(disable=True)
    ref = stock(prompt=PROMPTS[0], negative_prompt=" ", true_cfg_scale=4.0, height=64, width=64, num_inference_steps=6,
                latents=init.cuda(), output_type="latent").images
    assert torch.equal(ours.all_latents[:, -1], ref.float().cpu())


def test_cuda_lora_sync_and_sleep_wake(tiny_model_path):
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    engine = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.bfloat16)
    before = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    ref = type(engine.transformer).from_config(engine.transformer.config)
    inject_adapter_in_model(config, ref)
    lora = {k: v * 0.2 for k, v in get_peft_model_state_dict(ref).items()}
    assert engine.update_weights(((k, v.cuda()) for k, v in lora.items()), peft_config=config) == 1
    synced = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    assert not torch.equal(synced.all_latents, before.all_latents)
    engine.sleep()
    assert all(p.device.type == "cpu" for p in engine.transformer.parameters())
    free_after_sleep = torch.cuda.memory_allocated()
    engine.wake_up()
    assert all(p.device.type == "cuda" for p in engine.transformer.parameters())
    assert torch.cuda.memory_allocated() > free_after_sleep
    again = engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6])
    for key, value in synced.to_dict().items():
        assert torch.equal(value, again.to_dict()[key]), key
    # A sync after the round trip still lands (buffers moved with the weights).
    assert engine.update_weights(((k, v) for k, v in lora.items()), peft_config=config) == 2
    assert torch.equal(engine.generate(PROMPTS, sampling=SAMPLING, seeds=[5, 6]).all_latents, synced.all_latents)
