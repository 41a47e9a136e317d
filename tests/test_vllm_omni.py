"""The in-memory LoRA patch, the output conversion and our custom pipeline's ``forward``, against the real vllm-omni
and vLLM classes, on the CPU.

These run in the second environment that ``.ci/run`` builds (vllm-omni 0.30 pins transformers >= 5.13 while verl
0.9 pins < 5.11). The manager, the loader and the LoRA layers are vllm-omni's and vLLM's own; the LoRA pipeline is
a small real ``nn.Module`` with vLLM ``ReplicatedLinear`` projections named as Qwen-Image's. The custom pipeline's
``forward`` runs over a labelled stand-in for vllm-omni's Qwen-Image pipeline class (its modules need vLLM's
compiled ops) that carries the tiny Qwen-Image; requests, sampling params and outputs are vllm-omni's own classes.
"""

from __future__ import annotations

import json
import threading

import pytest
import torch

vllm_omni = pytest.importorskip("vllm_omni", reason="vllm-omni not installed: these run in the second environment .ci/run builds")
pytestmark = pytest.mark.vllm_omni

from vllm.lora.request import LoRARequest  # noqa: E402

from verl_diffusion_rollout.engines.vllm_omni_lora import VLLMOmniLoRAPatch  # noqa: E402
from verl_diffusion_rollout.lora import WeightUpdateError, peft_config_dict, validate_lora_tensors  # noqa: E402

DIM, RANK, BLOCKS = 16, 4, 2
MODULES = ("to_q", "to_k")


@pytest.fixture(scope="module")
def vllm_cpu_runtime(tmp_path_factory):
    """vLLM's config and a one-process (gloo) model-parallel group, as a worker would have them."""
    import vllm.lora.lora_model as lora_model_module
    from vllm.config import DeviceConfig, VllmConfig, set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel

    # CPU-only test machine: vLLM pins host memory for adapters, which needs an accelerator.
    lora_model_module.PIN_MEMORY = False
    port = 29500 + (hash(str(tmp_path_factory.getbasetemp())) % 1000)
    with set_current_vllm_config(VllmConfig(device_config=DeviceConfig(device="cpu"))):
        init_distributed_environment(world_size=1, rank=0, distributed_init_method=f"tcp://127.0.0.1:{port}",
                                     local_rank=0, backend="gloo")
        initialize_model_parallel(1, 1)
        yield


def make_pipeline():
    from vllm.model_executor.layers.linear import ReplicatedLinear

    class Attention(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = ReplicatedLinear(DIM, DIM, bias=True)
            self.to_k = ReplicatedLinear(DIM, DIM, bias=True)

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attention()

    class Transformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer_blocks = torch.nn.ModuleList([Block() for _ in range(BLOCKS)])

    class Pipeline(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = Transformer()

    torch.manual_seed(0)
    pipe = Pipeline()
    for p in pipe.parameters():
        p.data.normal_(0, 0.1)
    return pipe


def lora_tensors(seed: int, prefix: str = "base_model.model.") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for b in range(BLOCKS):
        for m in MODULES:
            out[f"{prefix}transformer_blocks.{b}.attn.{m}.lora_A.weight"] = torch.randn(RANK, DIM, generator=g)
            out[f"{prefix}transformer_blocks.{b}.attn.{m}.lora_B.weight"] = torch.randn(DIM, RANK, generator=g)
    return out


PEFT = {"r": RANK, "lora_alpha": 2 * RANK, "target_modules": list(MODULES)}


@pytest.fixture
def patch():
    VLLMOmniLoRAPatch.install()
    yield VLLMOmniLoRAPatch
    VLLMOmniLoRAPatch.uninstall()


def test_patch_installs_idempotently_and_uninstalls():
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    original = DiffusionLoRAManager._load_adapter
    VLLMOmniLoRAPatch.install()
    patched = DiffusionLoRAManager._load_adapter
    VLLMOmniLoRAPatch.install()
    assert patched is not original and DiffusionLoRAManager._load_adapter is patched
    VLLMOmniLoRAPatch.uninstall()
    VLLMOmniLoRAPatch.uninstall()
    assert DiffusionLoRAManager._load_adapter is original and not VLLMOmniLoRAPatch.installed()
    with VLLMOmniLoRAPatch():
        assert DiffusionLoRAManager._load_adapter is not original
    assert DiffusionLoRAManager._load_adapter is original


def test_unknown_version_or_signature_is_refused(monkeypatch):
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    monkeypatch.setattr(vllm_omni, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match="vllm-omni 0.99.0 is not a version"):
        VLLMOmniLoRAPatch.install()
    assert not VLLMOmniLoRAPatch.installed()
    original = DiffusionLoRAManager._load_adapter
    for verified in ("0.26.0", "0.30.0"):  # the releases whose _load_adapter the patch was checked against
        monkeypatch.setattr(vllm_omni, "__version__", verified)
        with VLLMOmniLoRAPatch():
            assert DiffusionLoRAManager._load_adapter is not original
        assert DiffusionLoRAManager._load_adapter is original
    monkeypatch.setattr(DiffusionLoRAManager, "_load_adapter", lambda self, lora_request, extra: None)
    with pytest.raises(RuntimeError, match="refusing to patch"):
        VLLMOmniLoRAPatch.install()
    assert not VLLMOmniLoRAPatch.installed()


def test_tensor_request_loads_through_the_real_manager(vllm_cpu_runtime, patch):
    from vllm.lora.lora_model import LoRAModel
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    from verl_diffusion_rollout.engines.vllm_omni_lora import TensorLoRARequest

    pipe = make_pipeline()
    manager = DiffusionLoRAManager(pipe, torch.device("cpu"), torch.float32)
    sent = lora_tensors(1)
    sent_copy = {k: v.clone() for k, v in sent.items()}
    x = torch.randn(3, DIM)
    base_out = pipe.transformer.transformer_blocks[0].attn.to_q(x)[0].detach()
    request = TensorLoRARequest(lora_name="step-1", lora_int_id=1, lora_path="vdr://memory/1",
                                peft_config=peft_config_dict(PEFT), lora_tensors=sent)
    lora_model, helper = manager._load_adapter(request)
    assert all(torch.equal(sent[k], sent_copy[k]) for k in sent)  # the sender's tensors are never scaled in place
    assert isinstance(lora_model, LoRAModel) and helper.r == RANK and len(lora_model.loras) == BLOCKS * len(MODULES)
    scale = 2 * RANK / RANK
    for b in range(BLOCKS):
        for m in MODULES:
            weights = lora_model.get_lora(f"transformer_blocks.{b}.attn.{m}")
            key = f"base_model.model.transformer_blocks.{b}.attn.{m}"
            assert torch.equal(weights.lora_a, sent[f"{key}.lora_A.weight"])
            torch.testing.assert_close(weights.lora_b, sent[f"{key}.lora_B.weight"] * scale, rtol=0, atol=1e-6)
    # Through the manager's own activation: every module binds, and the layer computes W x + s B A x.
    manager.set_active_adapter(request, 1.0)
    assert len(manager._lora_modules) == BLOCKS * len(MODULES)
    out = pipe.transformer.transformer_blocks[0].attn.to_q(x)[0]
    a = sent["base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight"]
    b = sent["base_model.model.transformer_blocks.0.attn.to_q.lora_B.weight"]
    torch.testing.assert_close(out, base_out + scale * x @ a.T @ b.T, rtol=1e-5, atol=1e-5)


def test_path_requests_still_take_the_original_loader(vllm_cpu_runtime, patch, tmp_path):
    from safetensors.torch import save_file
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    (tmp_path / "adapter_config.json").write_text(json.dumps({**PEFT, "peft_type": "LORA"}))
    on_disk = lora_tensors(2)
    save_file(on_disk, tmp_path / "adapter_model.safetensors")
    manager = DiffusionLoRAManager(make_pipeline(), torch.device("cpu"), torch.float32)
    lora_model, helper = manager._load_adapter(LoRARequest(lora_name="disk", lora_int_id=7, lora_path=str(tmp_path)))
    got = lora_model.get_lora("transformer_blocks.1.attn.to_k")
    assert torch.equal(got.lora_a, on_disk["base_model.model.transformer_blocks.1.attn.to_k.lora_A.weight"])


def test_tensor_request_for_unknown_modules_is_refused(vllm_cpu_runtime, patch):
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    from verl_diffusion_rollout.engines.vllm_omni_lora import TensorLoRARequest

    manager = DiffusionLoRAManager(make_pipeline(), torch.device("cpu"), torch.float32)
    bad = {"transformer_blocks.0.attn.to_zz.lora_A.weight": torch.zeros(RANK, DIM),
           "transformer_blocks.0.attn.to_zz.lora_B.weight": torch.zeros(DIM, RANK)}
    request = TensorLoRARequest(lora_name="bad", lora_int_id=3, lora_path="vdr://memory/3",
                                peft_config=peft_config_dict(PEFT), lora_tensors=bad)
    with pytest.raises(WeightUpdateError, match="to_zz"):
        manager._load_adapter(request)


def test_update_validation_without_the_model():
    good = lora_tensors(3)
    assert len(validate_lora_tensors(good.items(), RANK)) == len(good)
    cases = {
        "lora_B": {k: v for k, v in good.items() if not k.endswith("0.attn.to_q.lora_B.weight")},
        "rank 4": {**good, "base_model.model.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, DIM)},
        "NaN": {**good, "base_model.model.transformer_blocks.1.attn.to_k.lora_B.weight": torch.full((DIM, RANK), float("nan"))},
        "not a LoRA factor": {**good, "transformer_blocks.0.attn.to_q.weight": torch.zeros(DIM, DIM)},
    }
    for match, tensors in cases.items():
        with pytest.raises(WeightUpdateError, match=match):
            validate_lora_tensors(tensors.items(), RANK)


# -- engine side: requests in, outputs to the data contract ---------------------------------------------------------


def recorded_request_outputs(n: int = 2, prompts=("a red cat", "a blue dog")):
    """Outputs as vllm-omni returns them for our custom pipeline (real OmniRequestOutput objects)."""
    from vllm_omni.outputs import OmniRequestOutput

    T, L, D, S = 4, 64, 16, 7
    g = torch.Generator().manual_seed(0)
    outputs, expected = [], []
    for r, prompt in enumerate(prompts):
        length = S + r  # the prompts differ in length
        trajectory = {
            "latents": torch.randn(n, T + 1, L, D, generator=g),
            "timesteps": torch.linspace(1000, 250, T).expand(n, -1).contiguous(),
            "log_probs": torch.randn(n, T, generator=g),
            "sigmas": torch.linspace(1, 0, T + 1).expand(n, -1).contiguous(),
            "sde_mask": torch.tensor([True, True, True, False]).expand(n, -1).contiguous(),
            "seeds": torch.arange(n) + 10 * r,
            "prompt_embeds": torch.randn(n, length, 32, generator=g).bfloat16(),
            "prompt_embeds_mask": torch.ones(n, length, dtype=torch.long),
            "negative_prompt_embeds": torch.randn(n, 3, 32, generator=g).bfloat16(),
            "negative_prompt_embeds_mask": torch.ones(n, 3, dtype=torch.long),
        }
        images = [torch.rand(3, 64, 64, generator=g) for _ in range(n)]
        outputs.append(OmniRequestOutput.from_diffusion(
            request_id=f"req-{r}", images=images, prompt={"prompt": prompt, "negative_prompt": " "},
            trajectory_latents=trajectory["latents"], trajectory_timesteps=trajectory["timesteps"],
            trajectory_log_probs=trajectory["log_probs"], multimodal_output={"trajectory": trajectory},
        ))
        expected.append((trajectory, images, prompt))
    return outputs, expected


def test_outputs_convert_to_the_data_contract():
    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.contract import CONTRACT_KEYS
    from verl_diffusion_rollout.engines.vllm_omni_engine import rollout_batch_from_omni_outputs

    outputs, expected = recorded_request_outputs()
    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=4)
    batch = rollout_batch_from_omni_outputs(outputs, sampling, weight_version=3)
    assert len(batch) == 4 and batch.weight_version == 3 and batch.prompts == ["a red cat"] * 2 + ["a blue dog"] * 2
    assert set(CONTRACT_KEYS) <= set(batch.to_dict())
    assert batch.all_latents.shape == (4, 5, 64, 16) and batch.all_latents.dtype == torch.float32
    assert torch.equal(batch.all_latents[2:], expected[1][0]["latents"])
    assert torch.equal(batch.rollout_log_probs[:2], expected[0][0]["log_probs"])
    assert torch.equal(batch.responses[1], expected[0][1][1])
    assert batch.seeds.tolist() == [0, 1, 10, 11]
    # prompt embeddings of different lengths are right-padded with mask 0
    assert batch.prompt_embeds.shape[1] == 8 and batch.prompt_embeds_mask[:2, 7].eq(0).all()
    assert torch.equal(batch.prompt_embeds[:2, :7], expected[0][0]["prompt_embeds"])
    assert batch.negative_prompt_embeds.dtype == torch.bfloat16


def test_outputs_without_our_trajectory_are_refused():
    from vllm_omni.outputs import OmniRequestOutput

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines.vllm_omni_engine import rollout_batch_from_omni_outputs

    plain = OmniRequestOutput.from_diffusion(request_id="x", images=[torch.rand(3, 8, 8)], prompt="a cat")
    with pytest.raises(ValueError, match="is the custom pipeline loaded"):
        rollout_batch_from_omni_outputs([plain], DiffusionSamplingConfig())


def test_request_extra_args_ride_in_real_sampling_params():
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines.vllm_omni_engine import EXTRA_ARGS_KEY, omni_request_extra_args

    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=4, sde_type="cps", noise_level=0.8)
    params = OmniDiffusionSamplingParams(num_outputs_per_prompt=2, extra_args=omni_request_extra_args(sampling, [5, 6], 9))
    spec = params.extra_args[EXTRA_ARGS_KEY]
    assert spec["seeds"] == [5, 6] and spec["window_seed"] == 9
    assert DiffusionSamplingConfig(**spec["sampling"]) == sampling


def _qwen_image_module_importable() -> str | None:
    try:
        import torchvision  # noqa: F401
    except Exception as err:  # ImportError, or a build that does not match torch
        return f"vllm-omni's Qwen-Image pipeline imports torchvision, unusable here ({type(err).__name__}: {err})"
    return None


@pytest.mark.skipif(_qwen_image_module_importable() is not None, reason=_qwen_image_module_importable() or "")
def test_custom_pipeline_and_worker_extension_are_vllm_omnis_own_classes():
    from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import QwenImagePipeline
    from vllm_omni.diffusion.worker.diffusion_worker import CustomPipelineWorkerExtension

    from verl_diffusion_rollout.engines import vllm_omni_engine, vllm_omni_pipeline

    assert issubclass(vllm_omni_pipeline.VLLMOmniQwenImageLogProbPipeline, QwenImagePipeline)
    assert issubclass(vllm_omni_pipeline.LoRAPatchWorkerExtension, CustomPipelineWorkerExtension)
    assert vllm_omni_pipeline.EXTRA_ARGS_KEY == vllm_omni_engine.EXTRA_ARGS_KEY
    assert vllm_omni_engine.PIPELINE_CLASS.endswith(vllm_omni_pipeline.VLLMOmniQwenImageLogProbPipeline.__name__)


def test_engine_refuses_cpu_devices(tmp_path):
    from verl_diffusion_rollout.engines import VLLMOmniEngine

    with pytest.raises(ValueError, match="runs on CUDA devices"):
        VLLMOmniEngine(str(tmp_path), device="cpu")


# -- the custom pipeline's forward, on the CPU ------------------------------------------------------------------------


class StandInOmniQwenImagePipeline(torch.nn.Module):
    """STAND-IN for vllm-omni's ``QwenImagePipeline`` (``vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image``),
    whose transformer, text encoder and VAE need vLLM's compiled ops and a GPU worker.

    It carries the tiny Qwen-Image's diffusers modules, loaded from the tiny folder like a real checkpoint, and
    provides what our custom pipeline uses of vllm-omni's class, computed as vllm-omni 0.30 computes it:
    ``encode_prompt`` (masks always explicit), ``_prepare_generation_context``, ``predict_noise_maybe_with_cfg``
    (sequential true CFG with norm rescale), ``device``, ``vae_scale_factor``, ``transformer.in_channels``, the latent
    (un)packing, no ``image_processor``; its plain ``forward`` only records the call.
    """

    def __init__(self, model_path: str):
        from diffusers import QwenImagePipeline

        super().__init__()
        self._diffusers = QwenImagePipeline.from_pretrained(model_path)
        self.transformer = self._diffusers.transformer
        self.transformer.in_channels = self.transformer.config.in_channels  # vllm-omni's transformer attribute
        self.vae = self._diffusers.vae
        self.text_encoder = self._diffusers.text_encoder
        self.scheduler = self._diffusers.scheduler
        self.vae_scale_factor = self._diffusers.vae_scale_factor
        self.device = torch.device("cpu")
        self.plain_requests = []

    _pack_latents = staticmethod(lambda *a: __import__("diffusers").QwenImagePipeline._pack_latents(*a))
    _unpack_latents = staticmethod(lambda *a: __import__("diffusers").QwenImagePipeline._unpack_latents(*a))

    def forward(self, req):
        self.plain_requests.append(req)
        return ["plain vllm-omni output"]

    def encode_prompt(self, prompt, num_images_per_prompt=1, prompt_embeds=None, prompt_embeds_mask=None,
                      max_sequence_length=1024, prompt_name="prompt"):
        batch = len(prompt) if prompt_embeds is None else prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds, prompt_embeds_mask = self._diffusers._get_qwen_prompt_embeds(prompt, device=self.device)
        prompt_embeds = prompt_embeds[:, :max_sequence_length]
        prompt_embeds_mask = prompt_embeds_mask[:, :max_sequence_length]
        seq = prompt_embeds.shape[1]
        prompt_embeds = prompt_embeds.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq, -1)
        prompt_embeds_mask = prompt_embeds_mask.repeat(1, num_images_per_prompt, 1).view(batch * num_images_per_prompt, seq)
        return prompt_embeds, prompt_embeds_mask

    def _prepare_generation_context(self, *, prompt, negative_prompt, height, width, num_inference_steps, sigmas,
                                    guidance_scale, num_images_per_prompt, generator, true_cfg_scale,
                                    max_sequence_length, prompt_embeds=None, prompt_embeds_mask=None,
                                    negative_prompt_embeds=None, negative_prompt_embeds_mask=None, latents=None,
                                    attention_kwargs=None, callback_on_step_end_tensor_inputs=None):
        batch = len(prompt) if prompt is not None else prompt_embeds.shape[0]
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        do_true_cfg = true_cfg_scale > 1 and has_negative
        prompt_embeds, prompt_embeds_mask = self.encode_prompt(
            prompt, num_images_per_prompt, prompt_embeds, prompt_embeds_mask, max_sequence_length)
        if do_true_cfg:
            negative_prompt_embeds, negative_prompt_embeds_mask = self.encode_prompt(
                negative_prompt, num_images_per_prompt, negative_prompt_embeds, negative_prompt_embeds_mask,
                max_sequence_length)
        else:
            negative_prompt_embeds = negative_prompt_embeds_mask = None
        return {
            "prompt_embeds": prompt_embeds, "prompt_embeds_mask": prompt_embeds_mask,
            "negative_prompt_embeds": negative_prompt_embeds, "negative_prompt_embeds_mask": negative_prompt_embeds_mask,
            "latents": latents.to(prompt_embeds.dtype),
            "img_shapes": [[(1, height // self.vae_scale_factor // 2, width // self.vae_scale_factor // 2)]] * batch,
            "timesteps": None, "do_true_cfg": do_true_cfg, "guidance": None,
            "txt_seq_lens": [prompt_embeds.shape[1]] * prompt_embeds.shape[0],
            "negative_txt_seq_lens": None if negative_prompt_embeds is None else
            [negative_prompt_embeds.shape[1]] * negative_prompt_embeds.shape[0],
        }

    def predict_noise(self, **kwargs):
        kwargs.pop("txt_seq_lens")  # vllm-omni's transformer builds RoPE from it; diffusers' from the embeddings
        return self.transformer(**kwargs)[0]

    def predict_noise_maybe_with_cfg(self, do_true_cfg, true_cfg_scale, positive_kwargs, negative_kwargs,
                                     cfg_normalize=True, output_slice=None):
        positive = self.predict_noise(**positive_kwargs)
        if not do_true_cfg:
            return positive
        negative = self.predict_noise(**negative_kwargs)
        comb = negative + true_cfg_scale * (positive - negative)
        if cfg_normalize:
            comb = comb * (torch.norm(positive, dim=-1, keepdim=True) / torch.norm(comb, dim=-1, keepdim=True))
        return comb


@pytest.fixture
def omni_pipeline(tiny_model_path):
    """``VLLMOmniQwenImageLogProbPipeline`` imported over the stand-in base class (and, where vllm-omni's worker module
    cannot import here, a stand-in ``CustomPipelineWorkerExtension``), built on the tiny Qwen-Image."""
    import importlib
    import sys
    import types

    name = "verl_diffusion_rollout.engines.vllm_omni_pipeline"
    base_name = "vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image"
    worker_name = "vllm_omni.diffusion.worker.diffusion_worker"
    saved = {k: sys.modules.get(k) for k in (name, base_name, worker_name)}
    base = types.ModuleType(base_name)
    base.QwenImagePipeline = StandInOmniQwenImagePipeline
    sys.modules[base_name] = base
    try:
        importlib.import_module(worker_name)
    except ImportError:  # it imports torchvision, whose compiled ops do not match the CPU torch here
        worker = types.ModuleType(worker_name)
        worker.CustomPipelineWorkerExtension = type("CustomPipelineWorkerExtension", (), {})  # stand-in
        sys.modules[worker_name] = worker
    sys.modules.pop(name, None)
    module = importlib.import_module(name)
    try:
        yield module, module.VLLMOmniQwenImageLogProbPipeline(tiny_model_path)
    finally:
        for key, value in saved.items():
            if value is None:
                sys.modules.pop(key, None)
            else:
                sys.modules[key] = value
        import verl_diffusion_rollout.engines as engines_pkg

        if saved[name] is None and hasattr(engines_pkg, "vllm_omni_pipeline"):
            delattr(engines_pkg, "vllm_omni_pipeline")


def omni_request(prompts, sampling, seeds_per_request, window_seeds, n):
    """A real vllm-omni request batch, one request per prompt, as VLLMOmniEngine.generate builds it."""
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    from verl_diffusion_rollout.engines.vllm_omni_engine import omni_request_extra_args

    requests = []
    for i, prompt in enumerate(prompts):
        config = sampling[i] if isinstance(sampling, list) else sampling
        params = OmniDiffusionSamplingParams(
            height=config.height, width=config.width, num_inference_steps=config.num_steps,
            true_cfg_scale=config.guidance_scale, num_outputs_per_prompt=n, output_type="pt",
            extra_args=omni_request_extra_args(config, seeds_per_request[i], window_seeds[i]),
        )
        requests.append(OmniDiffusionRequest(prompt={"prompt": prompt, "negative_prompt": config.negative_prompt},
                                             sampling_params=params, request_id=f"r{i}"))
    return DiffusionRequestBatch(requests=requests)


def to_batch(outputs, sampling, prompts, n):
    """Our pipeline's DiffusionOutputs as the engine's client receives them, converted to the data contract."""
    from vllm_omni.outputs import OmniRequestOutput

    from verl_diffusion_rollout.engines.vllm_omni_engine import rollout_batch_from_omni_outputs

    converted = []
    for i, out in enumerate(outputs):
        payload = out.output["payload"]
        converted.append(OmniRequestOutput.from_diffusion(
            request_id=f"r{i}", images=list(payload["image"]), prompt={"prompt": prompts[i]},
            multimodal_output={"trajectory": payload["trajectory"]},
        ))
    return rollout_batch_from_omni_outputs(converted, sampling, prompts=[p for p in prompts for _ in range(n)])


OMNI_SAMPLING = dict(height=64, width=64, num_steps=4, guidance_scale=4.0, sde_window=[1, 2], noise_level=0.8,
                     batch_cfg=False, negative_prompt=" ")


def test_forward_runs_the_shared_loop_and_matches_the_diffusers_engine(omni_pipeline, tiny_model_path, monkeypatch):
    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines import DiffusersEngine
    from verl_diffusion_rollout.pipelines import loop
    from verl_diffusion_rollout.trainer.replay import compute_log_probs, trainable_steps

    module, pipe = omni_pipeline
    calls = []
    monkeypatch.setattr(module, "denoise_loop", lambda *a, **k: calls.append(k) or loop.denoise_loop(*a, **k))
    sampling = DiffusionSamplingConfig(**OMNI_SAMPLING)
    prompts = ["a red cat", "a blue dog photo with a tree"]  # different lengths: masked padding in the batch
    seeds = [[5, 6], [7, 8]]
    outputs = pipe.forward(omni_request(prompts, sampling, seeds, [3, 3], n=2))
    assert len(calls) == 1 and calls[0]["window_seed"] == 3 and len(outputs) == 2
    batch = to_batch(outputs, sampling, prompts, n=2)
    assert batch.seeds.tolist() == [5, 6, 7, 8] and batch.sde_mask[0].nonzero().flatten().tolist() == [1, 2]
    # The same samples from the diffusers engine (same modules, same loop, sequential CFG, diffusers' processor);
    # with several prompts of different lengths and n=2 each sample keeps its own prompt's mask.
    reference = DiffusersEngine(tiny_model_path, fast_attention=False)
    expected = reference.generate(prompts, seeds=[5, 6, 7, 8], n=2, sampling=sampling, window_seed=3)
    assert torch.equal(batch.all_latents[:, 0], expected.all_latents[:, 0])  # initial noise from the seeds alone
    assert torch.equal(batch.prompt_embeds_mask, expected.prompt_embeds_mask)
    assert batch.prompt_embeds_mask.sum(1).tolist()[:2] == [batch.prompt_embeds_mask.sum(1).tolist()[0]] * 2
    assert torch.equal(batch.prompt_embeds, expected.prompt_embeds)
    assert torch.equal(batch.all_sigmas, expected.all_sigmas) and torch.equal(batch.all_timesteps, expected.all_timesteps)
    diffs = {key: (getattr(batch, key) - getattr(expected, key)).abs().max().item()
             for key in ("all_latents", "rollout_log_probs", "responses")}
    print(f"vllm-omni pipeline (stand-in base) vs diffusers engine: {diffs}")
    # Same modules, same loop, same inputs: the same numbers, bit for bit.
    assert diffs == {"all_latents": 0.0, "rollout_log_probs": 0.0, "responses": 0.0}
    # The trainer's replay of what the vllm-omni pipeline recorded gives back its log-probs.
    steps = trainable_steps(batch)
    with torch.no_grad():
        replayed = compute_log_probs(reference.transformer, batch, steps)
    replay_diff = (replayed - batch.rollout_log_probs[:, steps]).abs().max().item()
    print(f"vllm-omni pipeline rollout vs diffusers replay: max |d log_prob| = {replay_diff}")
    assert replay_diff == 0.0


def test_forward_splits_a_batch_with_different_sampling_configs_or_window_seeds(omni_pipeline):
    from verl_diffusion_rollout.config import DiffusionSamplingConfig

    module, pipe = omni_pipeline
    sde = DiffusionSamplingConfig(**{**OMNI_SAMPLING, "sde_window": None, "sde_window_size": 1,
                                     "sde_window_range": [0, 3]})
    cps = sde.replace(sde_type="cps")
    prompts = ["a red cat", "a blue dog", "city sky", "a green bird"]
    configs = [sde, cps, sde, sde]
    seeds = [[1], [2], [3], [4]]
    windows = [0, 0, 0, 5]  # the last request differs from the first only in its window seed
    assert sde.stochastic_steps(0) != sde.stochastic_steps(5)
    mixed = pipe.forward(omni_request(prompts, configs, seeds, windows, n=1))
    assert module.group_requests([{"sampling": c.to_dict(), "window_seed": w} for c, w in zip(configs, windows)],
                                 [1] * 4) == [[0, 2], [1], [3]]

    def alone(indices, config):
        req = omni_request([prompts[i] for i in indices], config, [seeds[i] for i in indices],
                           [windows[i] for i in indices], n=1)
        return to_batch(pipe.forward(req), config, [prompts[i] for i in indices], n=1)

    got = to_batch(mixed, sde, prompts, n=1)
    for indices, config in (([0, 2], sde), ([1], cps), ([3], sde)):
        ref = alone(indices, config)
        for key in ("all_latents", "rollout_log_probs", "sde_mask"):
            assert torch.equal(getattr(got, key)[indices], getattr(ref, key)), (indices, key)
    # Never sampled with the first request's config: the cps request has cps log-probs, the last its own window.
    sde_mask = got.sde_mask
    assert sde_mask[3].nonzero().flatten().tolist() == sde.stochastic_steps(5)
    assert sde_mask[0].nonzero().flatten().tolist() == sde.stochastic_steps(0)
    as_sde = alone([1], sde)
    assert not torch.equal(got.rollout_log_probs[1], as_sde.rollout_log_probs[0])


def test_plain_requests_go_to_vllm_omni_and_mixed_batches_are_refused(omni_pipeline):
    from vllm_omni.diffusion.request import OmniDiffusionRequest
    from vllm_omni.diffusion.worker.request_batch import DiffusionRequestBatch
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    from verl_diffusion_rollout.config import DiffusionSamplingConfig

    _, pipe = omni_pipeline
    plain = OmniDiffusionRequest(prompt="a cat", sampling_params=OmniDiffusionSamplingParams(), request_id="p")
    assert pipe.forward(DiffusionRequestBatch(requests=[plain])) == ["plain vllm-omni output"]
    ours = omni_request(["a dog"], DiffusionSamplingConfig(**OMNI_SAMPLING), [[1]], [0], n=1).requests[0]
    with pytest.raises(ValueError, match=r"requests \[1\] of this batch carry no extra_args\['vdr'\]"):
        pipe.forward(DiffusionRequestBatch(requests=[ours, plain]))
    assert len(pipe.plain_requests) == 1

# -- one sampling config per submission (issue 10) ------------------------------------------------------------------


def test_requests_of_a_submission_share_one_sampling_config():
    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines.vllm_omni_engine import EXTRA_ARGS_KEY, check_uniform_requests, omni_requests

    sampling = DiffusionSamplingConfig(height=64, width=64, num_steps=4, sde_type="cps", noise_level=0.8)
    inputs, params = omni_requests(["a red cat", "a blue dog"], [1, 2, 3, 4], 2, sampling, 9)
    assert [p.extra_args[EXTRA_ARGS_KEY]["seeds"] for p in params] == [[1, 2], [3, 4]]
    assert [i["prompt"] for i in inputs] == ["a red cat", "a blue dog"]
    _, other = omni_requests(["a green bird"], [5, 6], 2, sampling.replace(noise_level=0.3), 9)
    with pytest.raises(ValueError, match="differ in"):
        check_uniform_requests(params + other)  # the merge our worker pipeline would sample with one config
    _, other_window = omni_requests(["a green bird"], [5, 6], 2, sampling, 10)
    with pytest.raises(ValueError, match="differ in"):
        check_uniform_requests(params + other_window)


class RecordingOmni:
    """Stand-in for vllm-omni's ``Omni`` (it needs a GPU and vLLM's compiled ops): records every submission and
    answers it with outputs of the shape our custom pipeline returns (real ``OmniRequestOutput`` objects)."""

    def __init__(self):
        self.submissions = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.first_entered = threading.Event()

    def generate(self, inputs, params, use_tqdm=False):
        from vllm_omni.outputs import OmniRequestOutput

        from verl_diffusion_rollout.engines.vllm_omni_engine import EXTRA_ARGS_KEY

        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            first = not self.submissions
            self.submissions.append([p.extra_args[EXTRA_ARGS_KEY] for p in params])
        if first:
            self.first_entered.set()
            # Stay inside long enough for a concurrent submission to arrive if nothing kept it out.
            threading.Event().wait(1.0)
        outputs = []
        for r, (inp, p) in enumerate(zip(inputs, params)):
            spec = p.extra_args[EXTRA_ARGS_KEY]
            n, T, L = len(spec["seeds"]), spec["sampling"]["num_steps"], (p.height // 16) * (p.width // 16)
            trajectory = {
                "latents": torch.zeros(n, T + 1, L, 16), "timesteps": torch.zeros(n, T), "log_probs": torch.zeros(n, T),
                "sigmas": torch.zeros(n, T + 1), "sde_mask": torch.zeros(n, T, dtype=torch.bool),
                "seeds": torch.tensor(spec["seeds"]), "prompt_embeds": torch.zeros(n, 3, 8),
                "prompt_embeds_mask": torch.ones(n, 3, dtype=torch.long),
            }
            outputs.append(OmniRequestOutput.from_diffusion(
                request_id=f"req-{r}", images=[torch.zeros(3, p.height, p.width)] * n, prompt=inp,
                multimodal_output={"trajectory": trajectory},
            ))
        with self.lock:
            self.in_flight -= 1
        return outputs


def test_concurrent_generations_with_different_configs_are_never_batched_together():
    import threading

    from verl_diffusion_rollout.config import DiffusionSamplingConfig
    from verl_diffusion_rollout.engines import VLLMOmniEngine

    omni = RecordingOmni()
    engine = VLLMOmniEngine.__new__(VLLMOmniEngine)
    engine._init_client(omni, seed=0, lora=None, progress_bar=False)
    configs = [DiffusionSamplingConfig(height=32, width=32, num_steps=2, noise_level=level) for level in (0.3, 0.9)]
    results = {}

    def run(i):
        results[i] = engine.generate(["a cat", "a dog"], seeds=[1, 2, 3, 4], n=2, sampling=configs[i])

    first = threading.Thread(target=run, args=(0,))
    first.start()
    assert omni.first_entered.wait(30)
    second = threading.Thread(target=run, args=(1,))
    second.start()
    first.join(60)
    second.join(60)
    assert omni.max_in_flight == 1 and len(omni.submissions) == 2
    for submission in omni.submissions:
        assert len({json.dumps(spec["sampling"], sort_keys=True) for spec in submission}) == 1
    assert {s[0]["sampling"]["noise_level"] for s in omni.submissions} == {0.3, 0.9}
    assert results[0].sampling.noise_level == 0.3 and results[1].sampling.noise_level == 0.9


def test_engine_lora_updates_refuse_what_vllm_would_not_apply_exactly():
    from verl_diffusion_rollout.engines import VLLMOmniEngine

    class AddLoRA:  # stand-in for Omni.add_lora / remove_lora (GPU workers)
        def __init__(self):
            self.added = []

        def add_lora(self, request):
            self.added.append(request)
            return True

        def remove_lora(self, lora_id):
            return True

    omni = AddLoRA()
    engine = VLLMOmniEngine.__new__(VLLMOmniEngine)
    engine._init_client(omni, seed=0, lora=None, progress_bar=False)
    tensors = lora_tensors(4)
    assert engine.update_weights(tensors.items(), peft_config=PEFT) == 1
    assert omni.added[0].peft_config["lora_alpha"] == 2 * RANK and omni.added[0].peft_config["use_dora"] is False
    for bad, key in (({"use_dora": True}, "use_dora"), ({"rank_pattern": {"to_q": 8}}, "rank_pattern"),
                     ({"alpha_pattern": {"to_q": 8}}, "alpha_pattern"), ({"lora_alpha": float("nan")}, "lora_alpha"),
                     ({"r": 0}, "r")):
        with pytest.raises(WeightUpdateError, match=key):
            engine.update_weights(tensors.items(), peft_config={**PEFT, **bad})
    assert engine.weight_version == 1 and len(omni.added) == 1


def test_worker_side_loader_refuses_a_dora_config(vllm_cpu_runtime, patch):
    from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

    from verl_diffusion_rollout.engines.vllm_omni_lora import TensorLoRARequest

    manager = DiffusionLoRAManager(make_pipeline(), torch.device("cpu"), torch.float32)
    request = TensorLoRARequest(lora_name="dora", lora_int_id=5, lora_path="vdr://memory/5",
                                peft_config={**peft_config_dict(PEFT), "use_dora": True}, lora_tensors=lora_tensors(5))
    with pytest.raises(WeightUpdateError, match="use_dora"):
        manager._load_adapter(request)
