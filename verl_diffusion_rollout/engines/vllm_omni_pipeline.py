"""Our log-prob sampling inside vllm-omni: a custom pipeline and the worker extension that loads it.

vllm-omni runs a diffusion pipeline in its workers; with ``load_format="custom_pipeline"`` and
``custom_pipeline_args={"pipeline_class": ...}`` that pipeline can be ours. ``VLLMOmniQwenImageLogProbPipeline``
is vllm-omni's own Qwen-Image pipeline (its transformer, text encoder, VAE, CFG-parallel helpers) whose
``forward`` runs the shared :func:`~verl_diffusion_rollout.pipelines.loop.denoise_loop` (the loop the diffusers
engine runs, with Qwen-Image's initial noise and schedule from :mod:`verl_diffusion_rollout.pipelines.qwenimage`)
around vllm-omni's velocity, and returns the rollout data contract in the output's ``trajectory`` payload.
Requests without our ``extra_args["vdr"]`` go to vllm-omni's plain ``forward``; a batch whose requests differ in
sampling config, window seed or samples per prompt is split into groups that each run on their own.

This module imports vllm-omni at import time: only vllm-omni workers (and the vllm-omni engine) import it.
It needs a GPU and vLLM's compiled ops to serve; its ``forward`` runs on the CPU in the tests over a stand-in for
vllm-omni's Qwen-Image pipeline class, and the data it produces is converted on the client by
:func:`verl_diffusion_rollout.engines.vllm_omni_engine.rollout_batch_from_omni_outputs`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import QwenImagePipeline as OmniQwenImagePipeline
from vllm_omni.diffusion.worker.diffusion_worker import CustomPipelineWorkerExtension

from ..config import DiffusionSamplingConfig
from ..contract import stack_padded
from ..pipelines.loop import Velocity, denoise_loop, per_sample_generators
from ..pipelines.qwenimage import decode_packed_latents, qwenimage_initial_latents, qwenimage_scheduler
from .vllm_omni_lora import VLLMOmniLoRAPatch

__all__ = ["VLLMOmniQwenImageLogProbPipeline", "LoRAPatchWorkerExtension", "EXTRA_ARGS_KEY", "group_requests"]

EXTRA_ARGS_KEY = "vdr"


class LoRAPatchWorkerExtension(CustomPipelineWorkerExtension):
    """vllm-omni's custom-pipeline worker extension that installs the in-memory LoRA patch in the worker."""

    def re_init_pipeline(self, custom_pipeline_args: dict[str, Any]) -> None:
        VLLMOmniLoRAPatch.install()
        super().re_init_pipeline(custom_pipeline_args)


def group_requests(specs: Sequence[dict[str, Any]], outputs_per_prompt: Sequence[int]) -> list[list[int]]:
    """Indices of the requests that can be sampled together: same sampling config, window seed and ``n``.

    Groups keep the order of their first request; requests keep their order inside a group.
    """
    groups: dict[str, list[int]] = {}
    for index, (spec, n) in enumerate(zip(specs, outputs_per_prompt)):
        key = json.dumps({"sampling": spec["sampling"], "window_seed": spec.get("window_seed"), "n": int(n)},
                         sort_keys=True, default=str)
        groups.setdefault(key, []).append(index)
    return list(groups.values())


class VLLMOmniQwenImageLogProbPipeline(OmniQwenImagePipeline):
    """vllm-omni's Qwen-Image pipeline sampling with SDE/CPS/ODE steps and returning the RL trajectory."""

    @torch.no_grad()
    def forward(self, req) -> list[DiffusionOutput]:
        params = req.sampling_params_list
        specs = [(p.extra_args or {}).get(EXTRA_ARGS_KEY) for p in params]
        if all(spec is None for spec in specs):
            return super().forward(req)
        if any(spec is None for spec in specs):
            plain = [i for i, spec in enumerate(specs) if spec is None]
            raise ValueError(
                f"requests {plain} of this batch carry no extra_args[{EXTRA_ARGS_KEY!r}] while the others do; "
                "rollout requests and plain vllm-omni requests cannot share a batch"
            )
        n_per_request = [p.num_outputs_per_prompt for p in params]
        outputs: list[DiffusionOutput | None] = [None] * len(params)
        for group in group_requests(specs, n_per_request):
            results = self.rollout([req.prompts[r] for r in group], [specs[r] for r in group], n_per_request[group[0]])
            for r, output in zip(group, results):
                outputs[r] = output
        return outputs

    def rollout(self, prompts: Sequence[Any], specs: Sequence[dict[str, Any]], n: int) -> list[DiffusionOutput]:
        """Sample ``n`` images for each prompt of requests sharing one sampling config; one output per request."""
        sampling = DiffusionSamplingConfig(**specs[0]["sampling"])
        seeds = [int(s) for spec in specs for s in spec["seeds"]]
        texts = [p if isinstance(p, str) else (p.get("prompt") or "") for p in prompts]
        batch = len(seeds)
        if batch != len(texts) * n:
            raise ValueError(f"got {batch} seeds for {len(texts)} prompts x {n} outputs")

        # 1-3. Each sample's initial noise from its own seed; each distinct prompt encoded once by vllm-omni's
        # encoder and repeated per sample here (vllm-omni's num_images_per_prompt repeat misorders the masks of a
        # batch of prompts of different lengths).
        generators = per_sample_generators(seeds)
        init = qwenimage_initial_latents(
            generators, self.transformer.in_channels, sampling.height, sampling.width, self.vae_scale_factor, self.device
        )
        per_sample = [t for t in texts for _ in range(n)]
        prompt_embeds, prompt_mask = self._encode_each(per_sample, sampling.max_sequence_length)
        negative_embeds = negative_mask = None
        if sampling.guidance_scale > 1:
            negative_embeds, negative_mask = self._encode_each([sampling.negative_prompt] * batch,
                                                               sampling.max_sequence_length)
        ctx = self._prepare_generation_context(
            prompt=None,
            negative_prompt=None,
            height=sampling.height,
            width=sampling.width,
            num_inference_steps=sampling.num_steps,
            sigmas=None,
            guidance_scale=1.0,
            num_images_per_prompt=1,
            generator=None,
            true_cfg_scale=sampling.guidance_scale,
            max_sequence_length=sampling.max_sequence_length,
            prompt_embeds=prompt_embeds,
            prompt_embeds_mask=prompt_mask,
            negative_prompt_embeds=negative_embeds,
            negative_prompt_embeds_mask=negative_mask,
            latents=init,
            attention_kwargs=None,
            callback_on_step_end_tensor_inputs=["latents"],
        )

        # 4-6. Qwen-Image's schedule, the shared loop around vllm-omni's (CFG-parallel aware) velocity
        scheduler = qwenimage_scheduler(self.scheduler, sampling.num_steps, image_seq_len=init.shape[1], device=init.device)
        window_seed = int(specs[0].get("window_seed", seeds[0]))
        trajectory = denoise_loop(
            self._velocity(ctx, sampling.guidance_scale), init, scheduler, generators, sampling, window_seed=window_seed
        )

        # 7. Decode, then one output per request
        dtype = ctx["prompt_embeds"].dtype
        images = decode_packed_latents(self, trajectory.final.to(dtype), sampling.height, sampling.width).cpu()
        tensors = {
            "latents": trajectory.latents,
            "timesteps": trajectory.timesteps.expand(batch, -1).contiguous(),
            "log_probs": trajectory.log_probs,
            "sigmas": trajectory.sigmas.expand(batch, -1).contiguous(),
            "sde_mask": trajectory.sde_mask,
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            **_env(ctx),
        }
        outputs = []
        for r in range(len(texts)):
            part = slice(r * n, (r + 1) * n)
            payload = {"image": images[part], "trajectory": {k: v[part] for k, v in tensors.items()}}
            outputs.append(DiffusionOutput(output={"payload": payload}))
        return outputs

    def _encode_each(self, texts: Sequence[str], max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, S, E]`` embeddings and ``[B, S]`` masks, each distinct text encoded alone by vllm-omni's encoder
        (so a sample's embedding never depends on the batch), right-padded to the longest."""
        cache = {}
        for text in dict.fromkeys(texts):
            embeds, mask = self.encode_prompt(prompt=[text], num_images_per_prompt=1,
                                              max_sequence_length=max_sequence_length)
            cache[text] = embeds[0, : int(mask[0].sum())]
        return stack_padded([cache[t] for t in texts])

    def _velocity(self, ctx: dict[str, Any], guidance_scale: float) -> Velocity:
        """vllm-omni's guided Qwen-Image velocity (true CFG with norm rescale, ``t / 1000`` in the model dtype)."""
        dtype = ctx["prompt_embeds"].dtype
        do_true_cfg = ctx["do_true_cfg"]
        self.transformer.do_true_cfg = do_true_cfg

        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            timestep = t.to(device=x.device, dtype=dtype)
            common = {"hidden_states": x.to(dtype), "timestep": timestep / 1000, "guidance": ctx["guidance"],
                      "img_shapes": ctx["img_shapes"], "return_dict": False}
            positive = {**common, "encoder_hidden_states": ctx["prompt_embeds"],
                        "encoder_hidden_states_mask": ctx["prompt_embeds_mask"], "txt_seq_lens": ctx["txt_seq_lens"]}
            negative = None
            if do_true_cfg:
                negative = {**common, "encoder_hidden_states": ctx["negative_prompt_embeds"],
                            "encoder_hidden_states_mask": ctx["negative_prompt_embeds_mask"],
                            "txt_seq_lens": ctx["negative_txt_seq_lens"]}
            return self.predict_noise_maybe_with_cfg(do_true_cfg, guidance_scale, positive, negative, True, None)

        return velocity


def _env(ctx: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The denoising environment with masks made explicit (vllm-omni passes None for all-real tokens)."""
    env = {}
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        embeds = ctx.get(key)
        if embeds is None:
            continue
        mask = ctx.get(f"{key}_mask")
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        env[key] = embeds.cpu()
        env[f"{key}_mask"] = mask.to(torch.long).cpu()
    return env
