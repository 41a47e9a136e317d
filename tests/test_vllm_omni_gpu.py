"""End to end on a GPU with vllm-omni installed: ``python -m pytest -m vllm_omni_gpu tests/test_vllm_omni_gpu.py``.

Not part of CI (no GPU there); skipped, with the reason, wherever vllm-omni or a usable GPU is missing.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.vllm_omni_gpu


def _usable() -> str | None:
    try:
        import vllm._C  # noqa: F401
        import vllm_omni  # noqa: F401
    except ImportError as err:
        return f"needs vllm-omni with vLLM's compiled ops ({err})"
    if not torch.cuda.is_available():
        return "needs a CUDA GPU"
    return None


@pytest.mark.skipif(_usable() is not None, reason=_usable() or "")
def test_vllm_omni_engine_rollout_sync_and_replay(tiny_model_path):
    from peft import LoraConfig

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines import DiffusersEngine, VLLMOmniEngine
    from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=4, sde_window=[0, 1])
    engine = VLLMOmniEngine(tiny_model_path, device="cuda", dtype="float32")
    batch = engine.generate(["a red cat", "a blue dog"], seeds=[1, 2, 3, 4], n=2, sampling=sampling)
    assert batch.all_latents.shape[:2] == (4, 5) and torch.isfinite(batch.rollout_log_probs).all()
    reference = DiffusersEngine(tiny_model_path, device="cuda", dtype=torch.float32)
    with torch.no_grad():
        replayed = compute_log_probs(reference.transformer, batch, trainable_steps(batch)).cpu()
    diff = (replayed - batch.rollout_log_probs[:, trainable_steps(batch)]).abs().max().item()
    print(f"vllm-omni rollout vs diffusers replay: max |d log_prob| = {diff}")
    assert diff < 1e-3
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v"])
    lora = {f"transformer_blocks.{b}.attn.{m}.lora_{ab}.weight": torch.randn(*(4, 64) if ab == "A" else (64, 4)) * 0.1
            for b in range(2) for m in ("to_q", "to_k", "to_v") for ab in "AB"}
    assert engine.update_weights(lora.items(), peft_config=config) == 1
    after = engine.generate(["a red cat", "a blue dog"], seeds=[1, 2, 3, 4], n=2, sampling=sampling)
    assert after.weight_version == 1 and not torch.equal(after.all_latents, batch.all_latents)
