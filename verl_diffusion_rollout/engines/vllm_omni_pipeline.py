"""Our log-prob sampling inside vllm-omni: a custom pipeline and the worker extension that loads it.

vllm-omni runs a diffusion pipeline in its workers; with ``load_format="custom_pipeline"`` and
``custom_pipeline_args={"pipeline_class": ...}`` that pipeline can be ours. ``VLLMOmniQwenImageLogProbPipeline``
is vllm-omni's own Qwen-Image pipeline (its transformer, text encoder, VAE, CFG-parallel helpers) whose
``forward`` runs the denoising loop with :func:`verl_diffusion_rollout.sde.sde_step_with_logprob`, the same step
the diffusers engine and the trainer use, and returns the rollout data contract in the output's ``trajectory``
payload. Requests without our ``extra_args["vdr"]`` go to vllm-omni's plain ``forward``.

This module imports vllm-omni at import time: only vllm-omni workers (and the vllm-omni engine) import it.
It needs a GPU and vLLM's compiled ops to run; the data it produces is converted on the client by
:func:`verl_diffusion_rollout.engines.vllm_omni_engine.rollout_batch_from_omni_outputs` (tested on the CPU).
"""

from __future__ import annotations

from typing import Any

import torch
from vllm_omni.diffusion.data import DiffusionOutput
from vllm_omni.diffusion.models.qwen_image.pipeline_qwen_image import QwenImagePipeline as OmniQwenImagePipeline
from vllm_omni.diffusion.worker.diffusion_worker import CustomPipelineWorkerExtension

from ..config import DiffusionSamplingConfig
from ..lora_sync import VLLMOmniLoRAPatch
from ..pipelines.qwenimage import decode_packed_latents
from ..sde import randn_per_sample, sde_step_with_logprob

__all__ = ["VLLMOmniQwenImageLogProbPipeline", "LoRAPatchWorkerExtension", "EXTRA_ARGS_KEY"]

EXTRA_ARGS_KEY = "vdr"


class LoRAPatchWorkerExtension(CustomPipelineWorkerExtension):
    """vllm-omni's custom-pipeline worker extension that installs the in-memory LoRA patch in the worker."""

    def re_init_pipeline(self, custom_pipeline_args: dict[str, Any]) -> None:
        VLLMOmniLoRAPatch.install()
        super().re_init_pipeline(custom_pipeline_args)


class VLLMOmniQwenImageLogProbPipeline(OmniQwenImagePipeline):
    """vllm-omni's Qwen-Image pipeline sampling with SDE/CPS/ODE steps and returning the RL trajectory."""

    @torch.no_grad()
    def forward(self, req) -> list[DiffusionOutput]:
        params = req.sampling_params_list
        specs = [(p.extra_args or {}).get(EXTRA_ARGS_KEY) for p in params]
        if any(spec is None for spec in specs):
            return super().forward(req)
        sampling = DiffusionSamplingConfig(**specs[0]["sampling"])
        n = params[0].num_outputs_per_prompt
        seeds = [int(s) for spec in specs for s in spec["seeds"]]
        prompts = [p if isinstance(p, str) else (p.get("prompt") or "") for p in req.prompts]
        negative = [sampling.negative_prompt] * len(prompts) if sampling.guidance_scale > 1 else None
        batch = len(seeds)
        if batch != len(prompts) * n:
            raise ValueError(f"got {batch} seeds for {len(prompts)} prompts x {n} outputs")

        # 1-4. Encode prompts, draw each sample's initial noise from its own seed, prepare timesteps
        generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        channels = self.transformer.in_channels // 4
        h = 2 * (sampling.height // (self.vae_scale_factor * 2))
        w = 2 * (sampling.width // (self.vae_scale_factor * 2))
        noise = randn_per_sample((batch, 1, channels, h, w), generators, device=self.device)
        init = self._pack_latents(noise, batch, channels, h, w)
        ctx = self._prepare_generation_context(
            prompt=prompts,
            negative_prompt=negative,
            height=sampling.height,
            width=sampling.width,
            num_inference_steps=sampling.num_steps,
            sigmas=None,
            guidance_scale=1.0,
            num_images_per_prompt=n,
            generator=None,
            true_cfg_scale=sampling.guidance_scale,
            max_sequence_length=sampling.max_sequence_length,
            latents=init,
            attention_kwargs=None,
            callback_on_step_end_tensor_inputs=["latents"],
        )
        sigmas = self.scheduler.sigmas.detach().to("cpu", torch.float32)
        timesteps = ctx["timesteps"]
        num_steps = len(timesteps)

        # 5. Stochastic steps (one window for the whole batch, from the first request's window seed)
        stochastic = set(sampling.stochastic_steps(int(specs[0].get("window_seed", seeds[0]))))
        no_const = sampling.resolved_log_prob_no_const()

        # 6. Denoising loop: vllm-omni's (CFG-parallel aware) velocity, our step
        x = init.float()
        dtype = ctx["prompt_embeds"].dtype
        trajectory = [x.cpu()]
        log_probs = torch.zeros(batch, num_steps, dtype=torch.float32)
        self.transformer.do_true_cfg = ctx["do_true_cfg"]
        for i, t in enumerate(timesteps):
            timestep = t.expand(batch).to(device=x.device, dtype=dtype)
            common = {"hidden_states": x.to(dtype), "timestep": timestep / 1000, "guidance": ctx["guidance"],
                      "img_shapes": ctx["img_shapes"], "return_dict": False}
            positive = {**common, "encoder_hidden_states": ctx["prompt_embeds"],
                        "encoder_hidden_states_mask": ctx["prompt_embeds_mask"], "txt_seq_lens": ctx["txt_seq_lens"]}
            negative_kwargs = None
            if ctx["do_true_cfg"]:
                negative_kwargs = {**common, "encoder_hidden_states": ctx["negative_prompt_embeds"],
                                   "encoder_hidden_states_mask": ctx["negative_prompt_embeds_mask"],
                                   "txt_seq_lens": ctx["negative_txt_seq_lens"]}
            velocity = self.predict_noise_maybe_with_cfg(
                ctx["do_true_cfg"], sampling.guidance_scale, positive, negative_kwargs, True, None
            )
            if i in stochastic:
                out = sde_step_with_logprob(
                    velocity, x, sigmas[i], sigmas[i + 1], sde_type=sampling.sde_type,
                    noise_level=sampling.noise_level, noise=randn_per_sample(x.shape, generators, device=x.device),
                    log_prob_no_const=no_const, sigma_max=sigmas[1],
                )
                log_probs[:, i] = out.log_prob.cpu()
            else:
                out = sde_step_with_logprob(velocity, x, sigmas[i], sigmas[i + 1], sde_type="ode")
            x = out.prev_sample.float()
            trajectory.append(x.cpu())

        # 7. Decode, then one output per request
        images = decode_packed_latents(self, x.to(dtype), sampling.height, sampling.width).cpu()
        sde_mask = torch.zeros(batch, num_steps, dtype=torch.bool)
        sde_mask[:, sorted(stochastic)] = True
        tensors = {
            "latents": torch.stack(trajectory, dim=1),
            "timesteps": timesteps.float().cpu().expand(batch, -1).contiguous(),
            "log_probs": log_probs,
            "sigmas": sigmas.expand(batch, -1).contiguous(),
            "sde_mask": sde_mask,
            "seeds": torch.tensor(seeds, dtype=torch.int64),
            **_env(ctx, batch),
        }
        outputs = []
        for r in range(len(prompts)):
            part = slice(r * n, (r + 1) * n)
            payload = {"image": images[part], "trajectory": {k: v[part] for k, v in tensors.items()}}
            outputs.append(DiffusionOutput(output={"payload": payload}))
        return outputs


def _env(ctx: dict[str, Any], batch: int) -> dict[str, torch.Tensor]:
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
