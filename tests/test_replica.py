"""DiffusionReplica: verl's RolloutReplica serving one engine from a Ray actor, here on CPU."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import ray
from omegaconf import OmegaConf

from verl_diffusion_rollout.config import DiffusionSamplingConfig
from verl_diffusion_rollout.verl_config import DiffusionRolloutConfig
from verl_diffusion_rollout.replica import DiffusionReplica


@pytest.fixture(scope="module")
def ray_cpu():
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True, log_to_driver=False)
    yield
    ray.shutdown()


def test_replica_serves_generate_from_a_ray_actor(ray_cpu, tiny_model_path):
    config = DiffusionRolloutConfig(
        device="cpu", dtype="float32", sampling=DiffusionSamplingConfig(height=64, width=64, num_steps=3)
    )
    model = OmegaConf.create({"_target_": "verl_diffusion_rollout.verl_config.DiffusionModelConfig", "path": tiny_model_path})
    replica = DiffusionReplica(replica_rank=0, config=config, model_config=model, gpus_per_node=1)

    async def scenario():
        await replica.init_standalone()
        batch = await replica.generate(["a red cat"], seeds=[7, 8], n=2)
        version = await replica.update_weights(_full_weights(replica))
        await replica.sleep()
        await replica.wake_up()
        return batch, version

    batch, version = asyncio.run(scenario())
    assert batch.all_latents.shape == (2, 4, 64, 16) and batch.seeds.tolist() == [7, 8]
    assert batch.prompts == ["a red cat", "a red cat"]
    assert version == 1
    with httpx.Client(base_url=f"http://{replica.server_address}", timeout=60) as client:
        health = client.get("/health").json()
        assert health == {"status": "ok", "sleeping": False, "weight_version": 1, "role": "monolithic",
                          "modules": ["scheduler", "vae", "text_encoder", "tokenizer", "transformer"]}
        r = client.post("/rollout/generate", json={"prompts": ["a red cat"], "seeds": [7], "n": 1, "return_env": False})
        assert r.status_code == 200 and r.json()["samples"][0]["seed"] == 7
    asyncio.run(replica.shutdown())


def _full_weights(replica):
    from diffusers import QwenImageTransformer2DModel

    transformer = QwenImageTransformer2DModel.from_pretrained(replica.model_path, subfolder="transformer")
    return [(n, p.detach()) for n, p in transformer.named_parameters()]


def test_replica_refuses_parallel_layouts(tiny_model_path):
    config = DiffusionRolloutConfig(device="cpu", tensor_model_parallel_size=2)
    with pytest.raises(ValueError, match="one engine on one device"):
        DiffusionReplica(replica_rank=0, config=config, model_config={"path": tiny_model_path}, gpus_per_node=2)
