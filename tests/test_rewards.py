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
