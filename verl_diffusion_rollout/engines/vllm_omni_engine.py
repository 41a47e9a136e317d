"""``VLLMOmniEngine``: the optional production engine, vllm-omni serving our log-prob Qwen-Image pipeline.

    pip install "verl_diffusion_rollout[vllm-omni]"     # vllm 0.30 + vllm-omni 0.30 (or both 0.26), own environment

Same :class:`~verl_diffusion_rollout.engines.DiffusionEngine` interface as the diffusers engine. vllm-omni loads
:class:`~verl_diffusion_rollout.engines.vllm_omni_pipeline.VLLMOmniQwenImageLogProbPipeline` as a custom pipeline
(``load_format="custom_pipeline"``), whose denoising loop calls the same ``sde.py`` step as the diffusers engine;
each request carries its seeds and sampling config in ``extra_args["vdr"]``, and the trajectory comes back in the
output's ``trajectory`` payload, which :func:`rollout_batch_from_omni_outputs` turns into a :class:`RolloutBatch`.
LoRA updates travel in memory as a :class:`~verl_diffusion_rollout.engines.vllm_omni_lora.TensorLoRARequest` (the adapter loader
patch is installed in the workers by ``LoRAPatchWorkerExtension``).

vllm-omni needs a GPU and vLLM's compiled ops: this engine is not exercised end to end by the CPU test suite
(``pytest -m vllm_omni_gpu`` runs it on a GPU machine); the conversion and the LoRA patch are.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from ..config import DiffusionSamplingConfig, LoRASyncConfig
from ..contract import RolloutBatch, cat_padded
from ..errors import EngineAsleep, GenerationCancelled
from ..lora.config import WeightUpdateError, is_lora_name, peft_config_dict, to_lora_config
from ..lora.sync import iter_with_first, validate_lora_tensors
from .base import DiffusionEngine, ReadWriteLock, check_finite_batch, expand_group_request
from .vllm_omni_lora import VLLMOmniLoRAPatch

__all__ = [
    "VLLMOmniEngine",
    "rollout_batch_from_omni_outputs",
    "omni_request_extra_args",
    "omni_requests",
    "check_uniform_requests",
]

PIPELINE_CLASS = "verl_diffusion_rollout.engines.vllm_omni_pipeline.VLLMOmniQwenImageLogProbPipeline"
WORKER_EXTENSION = "verl_diffusion_rollout.engines.vllm_omni_pipeline.LoRAPatchWorkerExtension"
EXTRA_ARGS_KEY = "vdr"  # the same key as vllm_omni_pipeline.EXTRA_ARGS_KEY (that module needs vllm-omni)


def omni_request_extra_args(sampling: DiffusionSamplingConfig, seeds: Sequence[int], window_seed: int) -> dict:
    """``extra_args`` of one vllm-omni request: what our custom pipeline reads."""
    return {EXTRA_ARGS_KEY: {"sampling": sampling.to_dict(), "seeds": [int(s) for s in seeds], "window_seed": int(window_seed)}}


def omni_requests(
    prompts: Sequence[str],
    seeds: Sequence[int],
    n: int,
    sampling: DiffusionSamplingConfig,
    window_seed: int,
    lora_request: Any = None,
) -> tuple[list[dict[str, str]], list[Any]]:
    """The vllm-omni inputs and ``OmniDiffusionSamplingParams`` of one submission: prompt ``i`` with its ``n``
    seeds ``seeds[i*n:(i+1)*n]``, every request with the same sampling config and window seed (checked by
    :func:`check_uniform_requests`)."""
    from vllm_omni.inputs.data import OmniDiffusionSamplingParams

    prompts = list(prompts)
    if len(seeds) != len(prompts) * n:
        raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts x n={n}")
    params = [
        OmniDiffusionSamplingParams(
            height=sampling.height,
            width=sampling.width,
            num_inference_steps=sampling.num_steps,
            true_cfg_scale=sampling.guidance_scale,
            num_outputs_per_prompt=n,
            max_sequence_length=sampling.max_sequence_length,
            output_type="pt",
            lora_request=lora_request,
            extra_args=omni_request_extra_args(sampling, seeds[i * n : (i + 1) * n], window_seed),
        )
        for i in range(len(prompts))
    ]
    inputs = [{"prompt": p, "negative_prompt": sampling.negative_prompt} for p in prompts]
    check_uniform_requests(params)
    return inputs, params


def check_uniform_requests(params: Sequence[Any]) -> None:
    """Refuse a submission whose requests differ in sampling config, window seed, group size or LoRA: our pipeline
    samples a vllm-omni batch with one of each, so mixing them would silently sample some requests wrongly."""
    keys = []
    for p in params:
        spec = (getattr(p, "extra_args", None) or {}).get(EXTRA_ARGS_KEY)
        if spec is None:
            raise ValueError("a request lacks our extra_args; every request of a submission must carry them")
        lora = getattr(p, "lora_request", None)
        keys.append((
            json.dumps(spec["sampling"], sort_keys=True),
            spec.get("window_seed"),
            getattr(p, "num_outputs_per_prompt", None),
            getattr(lora, "lora_int_id", None),
        ))
    if len(set(keys)) > 1:
        first, other = keys[0], next(k for k in keys if k != keys[0])
        raise ValueError(
            "requests of one vllm-omni submission differ in (sampling, window_seed, n, lora): "
            f"{first} vs {other}; submit them separately"
        )


def _image_tensor(image: Any) -> torch.Tensor:
    """One image as ``[3, H, W]`` float32 in ``[0, 1]`` (vllm-omni returns tensors or PIL images)."""
    if isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        return t if t.shape[0] == 3 else t.permute(2, 0, 1)
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(array).permute(2, 0, 1)


def rollout_batch_from_omni_outputs(
    outputs: Sequence[Any],
    sampling: DiffusionSamplingConfig,
    weight_version: int = 0,
    prompts: Sequence[str] | None = None,
) -> RolloutBatch:
    """vllm-omni ``OmniRequestOutput`` objects (one per prompt, ``n`` samples each) to a :class:`RolloutBatch`.

    Reads the images and the ``trajectory`` payload our custom pipeline returns (``multimodal_output``), with
    ``trajectory_latents`` / ``trajectory_timesteps`` / ``trajectory_log_probs`` as fallbacks for those three.
    """
    if not outputs:
        raise ValueError("no vllm-omni outputs to convert")
    parts: dict[str, list[torch.Tensor]] = {}
    images: list[torch.Tensor] = []
    out_prompts: list[str] = []
    for index, output in enumerate(outputs):
        error = getattr(output, "error", None)
        if error:
            raise RuntimeError(f"vllm-omni request {getattr(output, 'request_id', index)} failed: {error}")
        trajectory = dict((getattr(output, "multimodal_output", None) or {}).get("trajectory") or {})
        for key, attr in (("latents", "trajectory_latents"), ("timesteps", "trajectory_timesteps"),
                          ("log_probs", "trajectory_log_probs")):
            if trajectory.get(key) is None and getattr(output, attr, None) is not None:
                trajectory[key] = getattr(output, attr)
        missing = [k for k in ("latents", "timesteps", "log_probs", "sigmas", "sde_mask", "seeds", "prompt_embeds")
                   if trajectory.get(k) is None]
        if missing:
            raise ValueError(f"vllm-omni output {index} lacks trajectory fields {missing}; is the custom pipeline loaded?")
        count = trajectory["latents"].shape[0]
        request_images = list(getattr(output, "images", None) or [])
        if len(request_images) != count:
            raise ValueError(f"vllm-omni output {index} has {len(request_images)} images for {count} samples")
        images.extend(_image_tensor(im) for im in request_images)
        for key, value in trajectory.items():
            parts.setdefault(key, []).append(torch.as_tensor(value).cpu())
        prompt = getattr(output, "prompt", None)
        text = prompt if isinstance(prompt, str) else (prompt or {}).get("prompt", "") if isinstance(prompt, dict) else ""
        out_prompts.extend([text] * count)
    tensors = {key: cat_padded(key, values) for key, values in parts.items()}  # text inputs right-padded
    batch_prompts = list(prompts) if prompts is not None else out_prompts
    if len(batch_prompts) != len(images):
        raise ValueError(f"{len(batch_prompts)} prompts for {len(images)} samples")
    return RolloutBatch(
        responses=torch.stack(images).clamp(0, 1),
        all_latents=tensors["latents"].float(),
        all_timesteps=tensors["timesteps"].float(),
        all_sigmas=tensors["sigmas"].float(),
        rollout_log_probs=tensors["log_probs"].float(),
        sde_mask=tensors["sde_mask"].bool(),
        prompt_embeds=tensors["prompt_embeds"],
        prompt_embeds_mask=tensors["prompt_embeds_mask"].long(),
        negative_prompt_embeds=tensors.get("negative_prompt_embeds"),
        negative_prompt_embeds_mask=(
            tensors["negative_prompt_embeds_mask"].long() if "negative_prompt_embeds_mask" in tensors else None
        ),
        seeds=tensors["seeds"].long(),
        prompts=batch_prompts,
        sampling=sampling,
        weight_version=weight_version,
    )


class VLLMOmniEngine(DiffusionEngine):
    """vllm-omni serving our log-prob pipeline (GPU; ``pip install verl_diffusion_rollout[vllm-omni]``).

    Args mirror :class:`~verl_diffusion_rollout.engines.DiffusersEngine`; ``engine_kwargs`` go to vllm-omni's
    ``Omni`` (e.g. ``gpu_memory_utilization``, parallel sizes). ``compile`` maps to vllm-omni's ``enforce_eager``.
    """

    def __init__(
        self,
        model_path: str,
        device: str | None = None,
        dtype: str | torch.dtype = "bfloat16",
        *,
        seed: int = 0,
        lora: LoRASyncConfig | None = None,
        progress_bar: bool = False,
        compile: bool = False,
        attention_backend: str = "auto",
        fast_attention: bool = True,
        **engine_kwargs: Any,
    ):
        if device is not None and not str(device).startswith("cuda"):
            raise ValueError(f"the vllm_omni engine runs on CUDA devices, got device={device!r}")
        try:
            from vllm_omni.entrypoints.omni import Omni
        except ImportError as err:
            raise ImportError(
                "rollout.engine=vllm_omni needs vllm-omni 0.30 (or 0.26) and a GPU: pip install 'verl_diffusion_rollout[vllm-omni]' "
                f"in its own environment (see README, 'Choosing an engine'); import failed: {err}"
            ) from err
        VLLMOmniLoRAPatch.install()
        self.model_path = str(model_path)
        omni = Omni(
            model=self.model_path,
            load_format="custom_pipeline",
            custom_pipeline_args={"pipeline_class": PIPELINE_CLASS},
            worker_extension_cls=WORKER_EXTENSION,
            dtype=str(dtype).replace("torch.", ""),
            enforce_eager=not compile,
            **engine_kwargs,
        )
        self._init_client(omni, seed=seed, lora=lora, progress_bar=progress_bar)

    def _init_client(self, omni: Any, *, seed: int, lora: LoRASyncConfig | None, progress_bar: bool) -> None:
        """The client-side state around an ``Omni`` instance (locks, version, LoRA request, seed generator)."""
        self.omni = omni
        self.lora_defaults = lora or LoRASyncConfig()
        self.progress_bar = progress_bar
        self._rng = random.Random(seed)
        self._lock = ReadWriteLock()
        self._submit_lock = threading.Lock()
        self._version = 0
        self._lora_request = None
        self._sleeping = False
        self.last_sync_s: float | None = None

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RolloutBatch:
        """As :meth:`DiffusionEngine.generate`. vllm-omni runs a submitted batch to the end, so ``cancel`` is
        polled before submitting (a request whose client has left by then never starts)."""
        request = expand_group_request(prompts, seeds, n, self._rng)
        sampling = sampling or DiffusionSamplingConfig()
        if not isinstance(sampling, DiffusionSamplingConfig):
            raise ValueError(f"sampling must be a DiffusionSamplingConfig, got {type(sampling).__name__}")
        window = request.seeds[0] if window_seed is None else window_seed
        start = time.perf_counter()
        with self._lock.read():
            if self._sleeping:
                raise EngineAsleep("the engine is asleep (weights released); call wake_up() before generate()")
            inputs, params = omni_requests(request.prompts[::n], request.seeds, n, sampling, window, self._lora_request)
            # Our pipeline samples a whole vllm-omni batch with one sampling config and window; one submission at a
            # time keeps requests with different configs out of each other's batches.
            with self._submit_lock:
                if cancel is not None and cancel():
                    raise GenerationCancelled("generation cancelled before it was submitted to vllm-omni")
                outputs = self.omni.generate(inputs, params, use_tqdm=self.progress_bar)
            batch = rollout_batch_from_omni_outputs(outputs, sampling, self._version, request.prompts)
        batch.timings = {"total_s": time.perf_counter() - start}
        check_finite_batch(batch)
        return batch

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], peft_config: Any = None) -> int:
        """LoRA updates only (vllm-omni loads full weights from its model folder); validated, then sent in memory."""
        from .vllm_omni_lora import TensorLoRARequest

        start = time.perf_counter()
        first, stream = iter_with_first(weights)
        if first is None or not is_lora_name(str(first[0])):
            raise WeightUpdateError("the vllm_omni engine takes LoRA updates (lora_A/lora_B tensors) only")
        config = to_lora_config(peft_config, self.lora_defaults)
        tensors = validate_lora_tensors(stream, config.r)
        with self._lock.write():
            version = self._version + 1
            request = TensorLoRARequest(
                lora_name=f"vdr-v{version}",
                lora_int_id=version,
                lora_path=f"vdr://memory/v{version}",
                peft_config=peft_config_dict(config),
                lora_tensors=tensors,
            )
            add_lora = getattr(self.omni, "add_lora", None)
            if callable(add_lora) and not add_lora(request):
                raise WeightUpdateError("vllm-omni refused the LoRA update (add_lora returned False)")
            previous, self._lora_request = self._lora_request, request
            remove_lora = getattr(self.omni, "remove_lora", None)
            if previous is not None and callable(remove_lora):
                remove_lora(previous.lora_int_id)
            self._version = version
        self.last_sync_s = time.perf_counter() - start
        return self._version

    def sleep(self) -> None:
        with self._lock.write():
            if not self._sleeping:
                self.omni.sleep()
                self._sleeping = True

    def wake_up(self) -> None:
        with self._lock.write():
            if self._sleeping:
                self.omni.wake_up()
                self._sleeping = False

    def close(self) -> None:
        close = getattr(self.omni, "close", None)
        if callable(close):
            close()
