"""The offline tiny Qwen-Image: a normal diffusers folder with Qwen-Image's layout and tokenizer geometry."""

from __future__ import annotations

import json
import os

from diffusers import QwenImagePipeline

from verl_diffusion_rollout.testing import build_tiny_tokenizer, tiny_qwenimage_path


def test_folder_layout_matches_a_real_qwen_image_checkpoint(tiny_model_path):
    with open(os.path.join(tiny_model_path, "model_index.json")) as f:
        index = json.load(f)
    assert index["_class_name"] == "QwenImagePipeline"
    assert index["transformer"] == ["diffusers", "QwenImageTransformer2DModel"]
    assert index["vae"] == ["diffusers", "AutoencoderKLQwenImage"]
    assert index["text_encoder"] == ["transformers", "Qwen2_5_VLForConditionalGeneration"]
    assert index["tokenizer"][1] == "Qwen2Tokenizer"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert os.path.isdir(os.path.join(tiny_model_path, sub))


def test_chat_template_prefix_is_the_34_tokens_the_pipeline_drops(tiny_model_path):
    pipe = QwenImagePipeline.from_pretrained(tiny_model_path)
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34
    # A prompt's own tokens survive the drop: two different prompts give different embeddings.
    a, _ = pipe._get_qwen_prompt_embeds(["a red cat"], device="cpu")
    b, _ = pipe._get_qwen_prompt_embeds(["a blue dog"], device="cpu")
    assert a.shape[1] > 0 and not (a.shape == b.shape and bool((a == b).all()))


def test_tokenizer_handles_any_text():
    tok = build_tiny_tokenizer()
    ids = tok("naïve café ☕ 123").input_ids
    assert len(ids) > 0 and tok.decode(ids) == "naïve café ☕ 123"


def test_cache_path_builds_once(tmp_path):
    first = tiny_qwenimage_path(tmp_path)
    mtime = os.path.getmtime(os.path.join(first, "model_index.json"))
    assert tiny_qwenimage_path(tmp_path) == first
    assert os.path.getmtime(os.path.join(first, "model_index.json")) == mtime
