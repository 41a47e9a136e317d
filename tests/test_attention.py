"""The compile-friendly joint-attention processor computes diffusers' function; attention-backend selection."""

from __future__ import annotations

import pytest
import torch
from diffusers import QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenDoubleStreamAttnProcessor2_0, apply_rotary_emb_qwen

from verl_diffusion_rollout.pipelines.qwenimage import attention_backend
from verl_diffusion_rollout.pipelines.qwenimage_attention import (
    QwenJointAttnProcessor,
    apply_rope_real,
    use_joint_attn_processor,
)
from verl_diffusion_rollout.testing import TINY_QWENIMAGE_DIMS


def test_real_rope_equals_complex_rope():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 3, 8, generator=g)
    freqs = torch.polar(torch.ones(5, 4), torch.randn(5, 4, generator=g))
    # The same float32 products and sums; a complex kernel may fuse them differently (one rounding at most).
    torch.testing.assert_close(apply_rope_real(x, freqs), apply_rotary_emb_qwen(x, freqs, use_real=False), rtol=0, atol=1e-6)
    xb = x.bfloat16()
    assert (apply_rope_real(xb, freqs).float() - apply_rotary_emb_qwen(xb, freqs, use_real=False).float()).abs().max() <= 2**-7


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformer_output_unchanged_and_swap_reversible(dtype):
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY_QWENIMAGE_DIMS["transformer"]).to(dtype)
    g = torch.Generator().manual_seed(1)
    mask = torch.ones(3, 10, dtype=torch.long)
    mask[1, 6:] = 0
    kwargs = dict(
        hidden_states=torch.randn(3, 64, 16, generator=g).to(dtype),
        encoder_hidden_states=torch.randn(3, 10, 32, generator=g).to(dtype),
        encoder_hidden_states_mask=mask,
        timestep=torch.full((3,), 0.4).to(dtype),
        img_shapes=[[(1, 8, 8)]] * 3,
        return_dict=False,
    )
    with torch.no_grad():
        reference = model(**kwargs)[0]
        handle = use_joint_attn_processor(model)
        assert all(isinstance(p, QwenJointAttnProcessor) for p in model.attn_processors.values())
        fast = model(**kwargs)[0]
        handle.remove()
        assert all(isinstance(p, QwenDoubleStreamAttnProcessor2_0) for p in model.attn_processors.values())
        again = model(**kwargs)[0]
    assert torch.equal(fast, reference) and torch.equal(again, reference)


def test_works_with_peft_wrapped_projections():
    from peft import LoraConfig

    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY_QWENIMAGE_DIMS["transformer"])
    model.add_adapter(LoraConfig(r=2, lora_alpha=4, target_modules=["to_q", "add_k_proj"], init_lora_weights=False))
    kwargs = dict(hidden_states=torch.randn(1, 64, 16), encoder_hidden_states=torch.randn(1, 6, 32),
                  timestep=torch.full((1,), 0.4), img_shapes=[[(1, 8, 8)]], return_dict=False)
    with torch.no_grad():
        reference = model(**kwargs)[0]
        use_joint_attn_processor(model)
        assert torch.equal(model(**kwargs)[0], reference)


def test_attention_backend_names_are_checked_and_cpu_is_untouched():
    with pytest.raises(ValueError, match="attention backend must be one of"):
        with attention_backend("flashy", torch.device("cpu")):
            pass
    x = torch.randn(1, 2, 4, 8)
    expected = torch.nn.functional.scaled_dot_product_attention(x, x, x)
    with attention_backend("auto", torch.device("cpu")):
        assert torch.equal(torch.nn.functional.scaled_dot_product_attention(x, x, x), expected)
