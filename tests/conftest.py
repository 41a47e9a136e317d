"""Shared fixtures: one tiny Qwen-Image folder per test session, built offline, loaded like a real checkpoint."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> str:
    from verl_diffusion_rollout.testing import make_tiny_qwenimage

    return make_tiny_qwenimage(tmp_path_factory.mktemp("models") / "tiny-qwenimage")


@pytest.fixture(scope="session")
def engine(tiny_model_path):
    """A float32 CPU engine shared by read-only tests (tests that sync weights build their own)."""
    from verl_diffusion_rollout.engines import DiffusersEngine

    return DiffusersEngine(tiny_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture
def small_sampling():
    from verl_diffusion_rollout.config import DiffusionSamplingConfig

    return DiffusionSamplingConfig(height=64, width=64, num_steps=4, guidance_scale=4.0, noise_level=0.7)


@pytest.fixture(scope="session")
def tiny_sd3_model_path(tmp_path_factory) -> str:
    from verl_diffusion_rollout.testing import make_tiny_sd3

    return make_tiny_sd3(tmp_path_factory.mktemp("models") / "tiny-sd3")


@pytest.fixture(scope="session")
def sd3_engine(tiny_sd3_model_path):
    """A float32 CPU engine on the tiny SD3.5, shared by read-only tests."""
    from verl_diffusion_rollout.engines import DiffusersEngine

    return DiffusersEngine(tiny_sd3_model_path, device="cpu", dtype=torch.float32)


@pytest.fixture
def sd3_sampling():
    from verl_diffusion_rollout.config import DiffusionSamplingConfig

    return DiffusionSamplingConfig(
        height=64, width=64, num_steps=4, guidance_scale=4.5, noise_level=0.7, negative_prompt="", max_sequence_length=16
    )


@pytest.fixture
def default_activation_memory_budget():
    """torch's default partitioner budget (1.0) for the test, whatever the test sets it to, and the previous value
    back afterwards: ``actor.activation_memory_budget`` is process-wide (``torch._functorch.config``), and a
    config module's ``patch`` restores it where pytest's ``monkeypatch`` would not."""
    import torch._functorch.config as functorch_config

    with functorch_config.patch(activation_memory_budget=1.0):
        yield functorch_config
