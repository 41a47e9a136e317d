"""The diffusion rollout as a plugin of stock verl: registries, Hydra configs, DataProto in and out."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from verl import DataProto
from verl.utils.config import omega_conf_to_dataclass

import verl_diffusion_rollout  # noqa: F401  (registers)
from verl_diffusion_rollout.verl_config import DiffusionModelConfig, DiffusionRolloutConfig
from verl_diffusion_rollout.contract import CONTRACT_KEYS
from verl_diffusion_rollout.rollout import DiffusionRollout, from_data_proto

CONFIG_DIR = str(__import__("pathlib").Path(__file__).resolve().parents[1] / "configs")


def compose_rollout(tiny_model_path, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
        return compose(
            config_name="diffusion_rollout",
            overrides=[f"actor_rollout_ref.model.path={tiny_model_path}", *overrides],
        )


def test_registered_in_verl_registries():
    from verl.workers.rollout.base import get_rollout_class
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    from verl_diffusion_rollout.replica import DiffusionReplica

    assert get_rollout_class("diffusion", "async") is DiffusionRollout
    assert RolloutReplicaRegistry.get("diffusion") is DiffusionReplica


def test_plain_import_verl_finds_the_plugin_through_its_entry_point():
    code = (
        "import verl, sys\n"
        "from verl.workers.rollout.base import get_rollout_class\n"
        "cls = get_rollout_class('diffusion', 'async')\n"
        "print(cls.__module__ + '.' + cls.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("verl_diffusion_rollout.rollout.DiffusionRollout")


def test_hydra_compose_with_command_line_overrides(tiny_model_path):
    cfg = compose_rollout(
        tiny_model_path,
        "actor_rollout_ref.rollout.name=diffusion",
        "actor_rollout_ref.rollout.sampling.noise_level=0.8",
        "actor_rollout_ref.rollout.sampling.sde_type=cps",
    )
    rollout_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert isinstance(rollout_cfg, DiffusionRolloutConfig)
    assert rollout_cfg.sampling.noise_level == 0.8 and rollout_cfg.sampling.sde_type == "cps"
    model_cfg = omega_conf_to_dataclass(cfg.actor_rollout_ref.model)
    assert isinstance(model_cfg, DiffusionModelConfig)
    assert model_cfg.architectures == ["QwenImagePipeline"] and model_cfg.tokenizer is not None


@pytest.mark.parametrize(
    "override,key",
    [
        ("actor_rollout_ref.rollout.sampling.sde_type=foo", "sampling.sde_type"),
        ("actor_rollout_ref.rollout.sampling.num_steps=0", "sampling.num_steps"),
        ("actor_rollout_ref.rollout.sampling.noise_level=-0.5", "sampling.noise_level"),
        ("actor_rollout_ref.rollout.sampling.sde_window=[0,7]", "sampling.sde_window"),
        ("actor_rollout_ref.rollout.sampling.guidance_scale=0.5", "sampling.guidance_scale"),
        ("actor_rollout_ref.rollout.engine=tensorrt", "rollout.engine"),
    ],
)
def test_invalid_values_fail_at_config_time_naming_the_key(tiny_model_path, override, key):
    cfg = compose_rollout(tiny_model_path, override)
    with pytest.raises(Exception) as info:
        omega_conf_to_dataclass(cfg.actor_rollout_ref.rollout)
    assert key in str(info.value)


def test_model_config_rejects_non_diffusers_folder(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model folder"):
        DiffusionModelConfig(path=str(tmp_path))


@pytest.fixture(scope="module")
def rollout(tiny_model_path):
    cfg = compose_rollout(tiny_model_path)
    return DiffusionRollout(config=cfg.actor_rollout_ref.rollout, model_config=cfg.actor_rollout_ref.model, device_mesh=None)


def test_generate_sequences_returns_the_contract_as_dataproto(rollout):
    prompts = DataProto.from_dict(
        tensors={"seeds": torch.tensor([1, 2, 3, 4])},
        non_tensors={
            "raw_prompt": np.array(["a red cat", "a red cat", "a blue dog", "a blue dog"], dtype=object),
            "data_source": np.array(["toy"] * 4, dtype=object),
        },
        meta_info={"sampling": {"noise_level": 0.9}, "global_steps": 3},
    )
    out = rollout.generate_sequences(prompts)
    assert isinstance(out, DataProto) and len(out) == 4
    for key in CONTRACT_KEYS:
        assert key in out.batch.keys(), key
    T = 4
    assert out.batch["responses"].shape == (4, 3, 64, 64)
    assert out.batch["all_latents"].shape == (4, T + 1, 64, 16)
    assert out.batch["rollout_log_probs"].shape == (4, T)
    assert out.batch["seeds"].tolist() == [1, 2, 3, 4]
    assert list(out.non_tensor_batch["raw_prompt"]) == ["a red cat", "a red cat", "a blue dog", "a blue dog"]
    assert list(out.non_tensor_batch["data_source"]) == ["toy"] * 4
    assert out.meta_info["weight_version"] == 0 and out.meta_info["sampling"]["noise_level"] == 0.9
    assert {"encode_s", "denoise_s", "decode_s", "total_s"} <= set(out.meta_info["timing"])
    # Round trip to the trainer-side batch.
    batch = from_data_proto(out)
    assert batch.sampling.noise_level == 0.9 and batch.prompts[2] == "a blue dog"
    assert torch.equal(batch.all_latents, out.batch["all_latents"])


def test_generate_sequences_with_n_repeats_rows(rollout):
    prompts = DataProto.from_dict(non_tensors={"raw_prompt": np.array(["a", "b"], dtype=object)}, meta_info={"n": 3})
    out = rollout.generate_sequences(prompts)
    assert len(out) == 6 and list(out.non_tensor_batch["raw_prompt"]) == ["a"] * 3 + ["b"] * 3
    assert len(set(out.batch["seeds"].tolist())) == 6


def test_generate_sequences_rejects_unknown_override(rollout):
    prompts = DataProto.from_dict(non_tensors={"raw_prompt": np.array(["a"], dtype=object)}, meta_info={"sampling": {"steps": 3}})
    with pytest.raises(ValueError, match="unknown sampling keys"):
        rollout.generate_sequences(prompts)


def test_async_release_resume_and_update_weights(rollout):
    prompts = DataProto.from_dict(
        tensors={"seeds": torch.tensor([5])}, non_tensors={"raw_prompt": np.array(["a red cat"], dtype=object)}
    )
    before = rollout.generate_sequences(prompts)
    asyncio.run(rollout.release())
    with pytest.raises(RuntimeError, match="asleep"):
        rollout.generate_sequences(prompts)
    asyncio.run(rollout.resume(["weights", "kv_cache"]))
    again = rollout.generate_sequences(prompts)
    for key in before.batch.keys():
        assert torch.equal(before.batch[key], again.batch[key]), key
    transformer = rollout.engine.transformer
    weights = ((f"base_model.model.{n}", p.detach() * 1.0) for n, p in transformer.named_parameters())
    version = asyncio.run(rollout.update_weights(weights, peft_config=None, base_sync_done=True, global_steps=1))
    assert version == 1 and rollout.generate_sequences(prompts).meta_info["weight_version"] == 1
    with pytest.raises(NotImplementedError, match="named_tensors"):
        asyncio.run(rollout.update_weights(iter(()), wire_format="delta_flush"))


def test_sampler_core_imports_without_verl():
    """sde/scheduler/pipelines/engines/replay need neither verl nor ray (e.g. on a bare GPU box)."""
    code = (
        "import importlib.abc, sys\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('verl', 'ray', 'omegaconf', 'hydra'):\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import importlib.util\n"
        "importlib.util.find_spec = (lambda f: lambda name, *a: None if name == 'verl' else f(name, *a))(importlib.util.find_spec)\n"
        "from verl_diffusion_rollout.engines import DiffusersEngine\n"
        "from verl_diffusion_rollout.trainer.replay import compute_log_probs\n"
        "from verl_diffusion_rollout.config import DiffusionSamplingConfig\n"
        "assert not {'verl', 'ray', 'omegaconf', 'hydra'} & set(sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_vllm_omni_engine_is_optional_and_says_how_to_get_it(tiny_model_path):
    import importlib.util

    from verl_diffusion_rollout.engines import get_engine_class

    engine_cls = get_engine_class("vllm_omni")
    assert engine_cls.__name__ == "VLLMOmniEngine"
    if importlib.util.find_spec("vllm_omni") is not None:
        pytest.skip("vllm-omni is installed here; tests/test_vllm_omni.py covers it")
    with pytest.raises(ImportError, match=r"pip install 'verl_diffusion_rollout\[vllm-omni\]'"):
        engine_cls(tiny_model_path, device="cuda")


def test_vllm_omni_custom_pipeline_module_compiles():
    """It imports vllm-omni's GPU pipeline, so it cannot be imported here; at least it must be valid Python."""
    import ast
    from pathlib import Path

    import verl_diffusion_rollout.engines as engines

    source = (Path(engines.__file__).parent / "vllm_omni_pipeline.py").read_text()
    tree = ast.parse(source)
    classes = {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    assert {"VLLMOmniQwenImageLogProbPipeline", "LoRAPatchWorkerExtension"} <= classes
    compile(source, "vllm_omni_pipeline.py", "exec")
