"""Reward functions: offline image statistics, model-based rewards on a locally built tiny CLIP, clear errors."""

from __future__ import annotations

import pytest
import torch

from verl_diffusion_rollout.testing import make_tiny_clip
from verl_diffusion_rollout.trainer.rewards import (
    AsyncRewardRunner,
    _AestheticHead,
    build_reward,
    check_reward_config,
    edit_similarity,
    quoted_text,
)


def smooth_and_noisy() -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    smooth = torch.linspace(0, 1, 64).view(1, 1, 64).expand(3, 64, 64)
    noisy = torch.rand(3, 64, 64, generator=g)
    return torch.stack([smooth, noisy])


def test_jpeg_compressibility_prefers_smooth_images():
    images = smooth_and_noisy()
    comp, parts = build_reward({"jpeg_compressibility": 1.0})(images, ["a", "b"])
    incomp, _ = build_reward({"jpeg_incompressibility": 1.0})(images, ["a", "b"])
    assert comp[0] > comp[1] and incomp[1] > incomp[0]
    assert torch.allclose(comp, -incomp) and torch.equal(parts["jpeg_compressibility"], comp)
    assert 0 < incomp[0] < incomp[1] < 24  # bits per pixel


def test_brightness_and_color_targets():
    dark = torch.zeros(1, 3, 8, 8)
    bright = torch.full((1, 3, 8, 8), 0.8)
    red = torch.zeros(1, 3, 8, 8)
    red[:, 0] = 1.0
    images = torch.cat([dark, bright, red])
    b, _ = build_reward({"brightness": 1.0}, {"brightness": {"target": 0.8}})(images, ["x"] * 3)
    assert b[1] == pytest.approx(0.0, abs=1e-6) and b[0] == pytest.approx(-0.8, abs=1e-6)
    c, _ = build_reward({"color": 1.0}, {"color": {"rgb": [1, 0, 0]}})(images, ["x"] * 3)
    assert c[2] == pytest.approx(0.0, abs=1e-6) and c[0] == pytest.approx(-1.0, abs=1e-6)
    total, parts = build_reward({"brightness": 2.0, "color": 0.5})(images, ["x"] * 3)
    assert torch.allclose(total, 2.0 * parts["brightness"] + 0.5 * parts["color"])


@pytest.mark.parametrize(
    "weights,options,match",
    [
        ({"jpeg_compressibilty": 1.0}, None, "unknown reward 'jpeg_compressibilty'"),
        ({}, None, "reward.functions is empty"),
        ({"brightness": "high"}, None, "must be a number"),
        ({"brightness": 1.0}, {"color": {"rgb": [1, 0, 0]}}, "not in reward.functions"),
    ],
)
def test_bad_reward_config_is_refused(weights, options, match):
    with pytest.raises(ValueError, match=match):
        check_reward_config(weights, options)


@pytest.mark.parametrize(
    "name,options,key",
    [
        ("pickscore", {}, "reward.options.pickscore.model_path"),
        ("pickscore", {"model_path": "/nonexistent/PickScore"}, "reward.options.pickscore.model_path"),
        ("aesthetic", {}, "reward.options.aesthetic.clip_path"),
        ("ocr", {"model_path": None}, "reward.options.ocr.model_path"),
        ("vlm_ocr", {"model_path": "/nonexistent/Qwen3-VL"}, "reward.options.vlm_ocr.model_path"),
    ],
)
def test_model_rewards_without_a_local_model_fail_clearly(name, options, key):
    with pytest.raises(FileNotFoundError, match=key):
        build_reward({name: 1.0}, {name: options})


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_pickscore_on_a_local_clip(tiny_clip):
    reward = build_reward({"pickscore": 1.0}, {"pickscore": {"model_path": tiny_clip}})
    images = smooth_and_noisy()
    a, _ = reward(images, ["a red cat", "a red cat"])
    b, _ = reward(images, ["a blue dog", "a blue dog"])
    assert a.shape == (2,) and torch.isfinite(a).all()
    assert not torch.equal(a, b)  # the prompt matters
    assert a[0] != a[1]  # the image matters


def test_aesthetic_on_a_local_clip_and_head(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPConfig

    torch.manual_seed(0)
    head = _AestheticHead(CLIPConfig.from_pretrained(tiny_clip).projection_dim)
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    reward = build_reward({"aesthetic": 1.0}, {"aesthetic": {"clip_path": tiny_clip, "head_path": str(tmp_path / "head.safetensors")}})
    scores, _ = reward(smooth_and_noisy(), ["", ""])
    assert scores.shape == (2,) and torch.isfinite(scores).all() and scores[0] != scores[1]


# -- fidelity to the reference scorers (FlowGRPO's pickscore_scorer.py / aesthetic_scorer.py) ------------------------
#
# The references take uint8 images ((x * 255).round().clamp(0, 255), as PIL images for PickScore, a uint8 tensor
# for the aesthetic scorer: the same pixels) through transformers' PIL-based CLIP processor. Below, that path is
# rebuilt in the test from transformers' own classes, on 96x64 images (resize 64 -> 32 on the short edge, 96 -> 48,
# then a 32x32 center crop), and the scores must agree to 1e-5.

PROMPTS = ["a red cat on a mat", "two blue dogs"]


def odd_sized_images() -> torch.Tensor:
    """Two [3, 64, 96] images with detail everywhere, so resize, crop and normalisation all move the score."""
    g = torch.Generator().manual_seed(3)
    ramp = torch.linspace(0, 1, 96).view(1, 1, 96).expand(3, 64, 96)
    return torch.stack([ramp * torch.rand(3, 64, 1, generator=g), torch.rand(3, 64, 96, generator=g)])


def reference_pil(images: torch.Tensor):
    from PIL import Image

    arrays = (images * 255).round().clamp(0, 255).to(torch.uint8).cpu().numpy().transpose(0, 2, 3, 1)
    return [Image.fromarray(a) for a in arrays]


def reference_processor(path: str):
    from transformers import CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # transformers 4: CLIPImageProcessor is the PIL one
        from transformers import CLIPImageProcessor as ImageProcessor
    return CLIPProcessor(image_processor=ImageProcessor.from_pretrained(path), tokenizer=CLIPTokenizer.from_pretrained(path))


def hand_pixels(images: torch.Tensor, path: str, crop: bool = True, normalize: bool = True) -> torch.Tensor:
    """CLIP preprocessing written out: bicubic PIL resize of the short edge, center crop, /255, mean/std."""
    import json

    import numpy as np
    from PIL import Image

    cfg = json.load(open(f"{path}/processor_config.json"))["image_processor"]
    short, (ch, cw) = cfg["size"]["shortest_edge"], (cfg["crop_size"]["height"], cfg["crop_size"]["width"])
    out = []
    for img in reference_pil(images):
        w, h = img.size
        if crop:
            size = (int(short * w / h), short) if w >= h else (short, int(short * h / w))
            img = img.resize(size, Image.BICUBIC)
            top, left = (img.size[1] - ch) // 2, (img.size[0] - cw) // 2
            img = img.crop((left, top, left + cw, top + ch))
        else:  # a squash to the crop size: the classic wrong resize
            img = img.resize((cw, ch), Image.BICUBIC)
        x = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) * np.float32(cfg["rescale_factor"])
        if normalize:
            mean = np.asarray(cfg["image_mean"], dtype=np.float32).reshape(3, 1, 1)
            std = np.asarray(cfg["image_std"], dtype=np.float32).reshape(3, 1, 1)
            x = (x - mean) / std
        out.append(torch.from_numpy(np.ascontiguousarray(x)))
    return torch.stack(out)


def test_clip_preprocessing_is_resize_crop_normalize_from_uint8(tiny_clip):
    from verl_diffusion_rollout.trainer.rewards import clip_pixel_values, load_clip_image_processor

    images = odd_sized_images()
    ours = clip_pixel_values(load_clip_image_processor(tiny_clip), images)
    assert ours.shape == (2, 3, 32, 32) and ours.dtype == torch.float32
    torch.testing.assert_close(ours, hand_pixels(images, tiny_clip), atol=1e-6, rtol=0)
    # Quantised to uint8 first, as the reference: on exact grey levels, a shift below half a level changes nothing.
    levels = (images * 255).round() / 255
    processor = load_clip_image_processor(tiny_clip)
    assert torch.equal(clip_pixel_values(processor, levels + 0.4 / 255), clip_pixel_values(processor, levels))


def test_pickscore_matches_clip_logits_through_transformers(tiny_clip):
    from transformers import CLIPModel

    ours, _ = build_reward({"pickscore": 1.0}, {"pickscore": {"model_path": tiny_clip}})(odd_sized_images(), PROMPTS)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    inputs = reference_processor(tiny_clip)(
        text=PROMPTS, images=reference_pil(odd_sized_images()), padding=True, truncation=True, max_length=77,
        return_tensors="pt",
    )
    with torch.no_grad():
        reference = model(**inputs).logits_per_image.diag() / 26
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    # The comparison can fail: each classic mistake moves the score far more than the tolerance.
    with torch.no_grad():
        def score(pixel_values: torch.Tensor, scale: bool = True) -> torch.Tensor:
            out = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=pixel_values)
            logits = out.logits_per_image.diag()
            return (logits if scale else logits / model.logit_scale.exp()) / 26

        torch.testing.assert_close(score(hand_pixels(odd_sized_images(), tiny_clip)), reference, atol=1e-5, rtol=0)
        wrong = {
            "squash resize": score(hand_pixels(odd_sized_images(), tiny_clip, crop=False)),
            "no normalisation": score(hand_pixels(odd_sized_images(), tiny_clip, normalize=False)),
            "no logit scale": score(hand_pixels(odd_sized_images(), tiny_clip), scale=False),
        }
    for mistake, value in wrong.items():
        assert (value - reference).abs().max() > 1e-3, mistake


def test_aesthetic_matches_normalised_clip_embedding_through_transformers(tiny_clip, tmp_path):
    from safetensors.torch import save_file
    from transformers import CLIPModel

    torch.manual_seed(0)
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    head = _AestheticHead(model.config.projection_dim).eval()
    save_file(head.state_dict(), tmp_path / "head.safetensors")
    options = {"clip_path": tiny_clip, "head_path": str(tmp_path / "head.safetensors")}
    ours, _ = build_reward({"aesthetic": 1.0}, {"aesthetic": options})(odd_sized_images(), PROMPTS)
    inputs = reference_processor(tiny_clip)(images=reference_pil(odd_sized_images()), return_tensors="pt")
    with torch.no_grad():
        embeds = model.visual_projection(model.vision_model(pixel_values=inputs["pixel_values"]).pooler_output)
        reference = head(embeds / embeds.norm(dim=-1, keepdim=True)).squeeze(-1)
        unnormalised = head(embeds).squeeze(-1)
    assert ours.shape == (2,)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=0)
    assert (unnormalised - reference).abs().max() > 1e-3  # the embedding normalisation matters


def test_ocr_text_matching():
    assert quoted_text('a sign that says "Hello World" on a wall') == "Hello World"
    assert edit_similarity("hello world", "Hello World") == 1.0
    assert edit_similarity("hallo", "hello") == pytest.approx(0.8)
    assert edit_similarity("", "abc") == 0.0


@pytest.mark.parametrize("backend", ["thread", "sync"])
def test_async_runner_matches_direct_call(backend):
    runner = AsyncRewardRunner({"jpeg_compressibility": 1.0, "brightness": 0.5}, backend=backend)
    images = smooth_and_noisy()
    total, parts = runner.submit(images, ["a", "b"]).result()
    direct, _ = build_reward({"jpeg_compressibility": 1.0, "brightness": 0.5})(images, ["a", "b"])
    runner.close()
    assert torch.equal(total, direct) and set(parts) == {"jpeg_compressibility", "brightness"}


def test_ray_backend_scores_in_an_actor():
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        runner = AsyncRewardRunner({"jpeg_compressibility": 1.0}, backend="ray")
        images = smooth_and_noisy()
        total, parts = runner.submit(images, ["a", "b"]).result(timeout=120)
        direct, _ = build_reward({"jpeg_compressibility": 1.0})(images, ["a", "b"])
        runner.close()
        assert torch.equal(total, direct) and set(parts) == {"jpeg_compressibility"}
    finally:
        if started:
            ray.shutdown()


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    from verl_diffusion_rollout.testing import make_qwen3_vl

    return make_qwen3_vl(tmp_path_factory.mktemp("qwen3_vl"))


def test_vlm_ocr_scores_images_through_a_local_qwen3_vl(tiny_vlm):
    """The VLM reward (Qwen3-VL architecture, tiny config, loaded from its folder): one probability per image,
    finite, deterministic, independent of the batch it is scored in, and sensitive to the image and the text."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(5, 3, 64, 64, generator=gen)
    prompts = ['a sign saying "cat"', 'a sign saying "dog"', "a red car", 'a poster "open"', 'a cup "tea"']
    fn = build_reward({"vlm_ocr": 1.0}, {"vlm_ocr": {"model_path": tiny_vlm, "batch_size": 2}})
    total, parts = fn(images, prompts)
    assert total.shape == (5,) and total.dtype == torch.float32 and set(parts) == {"vlm_ocr"}
    assert torch.isfinite(total).all() and bool(((total > 0) & (total < 1)).all())
    assert torch.equal(fn(images, prompts)[0], total)  # deterministic
    one_by_one = torch.cat([fn(images[i : i + 1], prompts[i : i + 1])[0] for i in range(5)])
    big_batch = build_reward({"vlm_ocr": 1.0}, {"vlm_ocr": {"model_path": tiny_vlm, "batch_size": 8}})(images, prompts)[0]
    torch.testing.assert_close(one_by_one, total, rtol=0, atol=1e-5)
    torch.testing.assert_close(big_batch, total, rtol=0, atol=1e-5)
    other_image = fn(images.flip(0), prompts)[0]
    other_text = fn(images, ['a sign saying "bird"'] * 5)[0]
    assert not torch.equal(other_image, total) and not torch.equal(other_text, total)


def test_vlm_ocr_bad_options_name_the_key(tiny_vlm):
    with pytest.raises(ValueError, match="reward.options.vlm_ocr.batch_size"):
        build_reward({"vlm_ocr": 1.0}, {"vlm_ocr": {"model_path": tiny_vlm, "batch_size": 0}})
    with pytest.raises(ValueError, match="reward.options.vlm_ocr.question must contain"):
        build_reward({"vlm_ocr": 1.0}, {"vlm_ocr": {"model_path": tiny_vlm, "question": "yes or no?"}})
