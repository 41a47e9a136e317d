"""Qwen-Image log-prob pipeline: diffusers' ``QwenImagePipeline`` sampling with SDE/CPS/ODE steps for RL.

``QwenImageLogProbPipeline`` is a ``QwenImagePipeline`` (same components, same ``from_pretrained``) whose
``__call__`` returns a :class:`~verl_diffusion_rollout.contract.RolloutBatch`: images, the latent trajectory,
per-step log-probs and the denoising environment a trainer needs to replay every step.

:func:`predict_velocity` is the one place the transformer is called, by the rollout and by the trainer's replay
(:mod:`verl_diffusion_rollout.trainer.replay`), so both see the same velocity for the same inputs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch
from ..errors import GenerationCancelled
from ..scheduler import FlowMatchSDEDiscreteScheduler
from ..sde import randn_per_sample

__all__ = [
    "QwenImageLogProbPipeline",
    "TextConditioning",
    "Trajectory",
    "predict_velocity",
    "img_shapes_for",
    "attention_backend",
    "decode_packed_latents",
    "ATTENTION_BACKENDS",
]

ATTENTION_BACKENDS = ("auto", "default", "cudnn", "flash", "efficient", "math")


@contextlib.contextmanager
def attention_backend(name: str | None, device: torch.device) -> Iterator[None]:
    """Which scaled-dot-product-attention kernels the transformer may use, in priority order.

    ``"default"`` (or ``None``) leaves PyTorch's choice. ``"auto"`` prefers cuDNN, then FlashAttention, then the
    memory-efficient and math kernels: with batched CFG the joint attention carries a key-padding mask, which rules
    out FlashAttention, and PyTorch then picks the memory-efficient kernel, which runs it at 126 TFLOP/s on an
    H100 where cuDNN reaches 350 (537 vs 334 for FlashAttention without a mask; ``benchmarks/sdpa_probe.py``).
    A backend name puts that kernel first. Only CUDA devices are affected; elsewhere PyTorch's choice stands.
    """
    if name not in (None, *ATTENTION_BACKENDS):
        raise ValueError(f"attention backend must be one of {list(ATTENTION_BACKENDS)}, got {name!r}")
    if name in (None, "default") or device.type != "cuda":
        yield
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    order = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
             "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    first = "cudnn" if name == "auto" else name
    with sdpa_kernel([order[first], *(b for k, b in order.items() if k != first)], set_priority=True):
        yield


def _transformer_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """diffusers passes no mask when every token is real (and the attention can take its fastest kernel)."""
    return None if bool(mask.all()) else mask


def _pad_to(embeds: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad ``[B, S, E]`` embeddings with zeros and ``[B, S]`` masks with 0 up to ``length`` tokens."""
    pad = length - embeds.shape[1]
    if pad == 0:
        return embeds, mask
    embeds = torch.cat([embeds, embeds.new_zeros(embeds.shape[0], pad, embeds.shape[2])], dim=1)
    mask = torch.cat([mask, mask.new_zeros(mask.shape[0], pad)], dim=1)
    return embeds, mask


@dataclass
class TextConditioning:
    """Text inputs of the transformer for one batch, prepared once and reused at every step.

    With batched CFG, ``cond`` holds the conditional and unconditional embeddings concatenated on the batch
    dimension (padded to one length) and ``uncond`` is None.
    """

    cond: torch.Tensor
    cond_mask: torch.Tensor | None
    uncond: torch.Tensor | None
    uncond_mask: torch.Tensor | None
    guidance_scale: float
    batched_cfg: bool

    @classmethod
    def build(
        cls,
        prompt_embeds: torch.Tensor,
        prompt_embeds_mask: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds_mask: torch.Tensor | None,
        guidance_scale: float,
        batch_cfg: bool,
        dtype: torch.dtype,
    ) -> TextConditioning:
        """Cast to the transformer dtype, pick the masks, and concatenate for batched CFG."""
        cfg = guidance_scale > 1
        if cfg and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_prompt_embeds (true CFG)")
        cond = prompt_embeds.to(dtype)
        if not cfg:
            return cls(cond, _transformer_mask(prompt_embeds_mask), None, None, guidance_scale, False)
        uncond = negative_prompt_embeds.to(dtype)
        if batch_cfg:
            length = max(cond.shape[1], uncond.shape[1])
            cond, cond_mask = _pad_to(cond, prompt_embeds_mask, length)
            uncond, uncond_mask = _pad_to(uncond, negative_prompt_embeds_mask, length)
            joint_mask = torch.cat([cond_mask, uncond_mask])
            return cls(torch.cat([cond, uncond]), _transformer_mask(joint_mask), None, None, guidance_scale, True)
        return cls(
            cond,
            _transformer_mask(prompt_embeds_mask),
            uncond,
            _transformer_mask(negative_prompt_embeds_mask),
            guidance_scale,
            False,
        )


def img_shapes_for(batch: int, height: int, width: int, vae_scale_factor: int) -> list[list[tuple[int, int, int]]]:
    """Qwen-Image's RoPE image shapes: one ``(frames, h/2, w/2)`` in latent patches per sample."""
    return [[(1, height // vae_scale_factor // 2, width // vae_scale_factor // 2)]] * batch


def _apply_true_cfg(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG with norm rescale over the channel dimension, in the model's dtype (as diffusers)."""
    comb = uncond + scale * (cond - uncond)
    cond_norm = torch.norm(cond, dim=-1, keepdim=True)
    comb_norm = torch.norm(comb, dim=-1, keepdim=True)
    return comb * (cond_norm / comb_norm)


def predict_velocity(
    transformer: torch.nn.Module,
    latents: torch.Tensor,
    timesteps: torch.Tensor,
    text: TextConditioning,
    img_shapes: list,
) -> torch.Tensor:
    """The guided velocity for packed latents.

    Args:
        transformer: a ``QwenImageTransformer2DModel`` (possibly peft-wrapped or compiled).
        latents: ``[B, L, D]`` packed latents, any float dtype (cast to the transformer's dtype).
        timesteps: ``[B]`` float32 scheduler timesteps (``sigma * 1000``); the transformer gets ``t / 1000`` in its
            dtype, computed exactly as diffusers' ``QwenImagePipeline`` does.
        text: prepared :class:`TextConditioning`.
        img_shapes: from :func:`img_shapes_for`.

    Returns:
        ``[B, L, D]`` velocity in the transformer's dtype.
    """
    dtype = text.cond.dtype
    x = latents.to(dtype)
    t = timesteps.to(dtype) / 1000
    if text.batched_cfg:
        out = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=text.cond,
            encoder_hidden_states_mask=text.cond_mask,
            img_shapes=img_shapes * 2,
            return_dict=False,
        )[0]
        cond, uncond = out.chunk(2)
        return _apply_true_cfg(cond, uncond, text.guidance_scale)
    cond = transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=text.cond,
        encoder_hidden_states_mask=text.cond_mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    if text.uncond is None:
        return cond
    uncond = transformer(
        hidden_states=x,
        timestep=t,
        encoder_hidden_states=text.uncond,
        encoder_hidden_states_mask=text.uncond_mask,
        img_shapes=img_shapes,
        return_dict=False,
    )[0]
    return _apply_true_cfg(cond, uncond, text.guidance_scale)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.cpu()


@dataclass
class Trajectory:
    """What the denoising loop produced (CPU tensors).

    Attributes:
        latents: ``[B, T+1, L, D]`` float32, x_T .. x_0.
        log_probs: ``[B, T]`` float32 (0 at deterministic steps).
        sde_mask: ``[B, T]`` bool.
        timesteps: ``[T]`` and sigmas ``[T+1]`` float32, the request's schedule.
        debug: ``prev_sample_mean`` / ``variance_noise`` / ``model_output`` ``[B, T, L, D]`` and ``noise_std``
            ``[B, T]`` when ``return_debug``, else empty.
        seconds: wall time of the loop.
        final: ``[B, L, D]`` float32 x_0 still on the pipeline's device (what the VAE decodes).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    debug: dict[str, torch.Tensor]
    seconds: float
    final: torch.Tensor | None = None


class _TrajectoryRecorder:
    """Collects x_T .. x_0 (and debug tensors) on the host.

    On a GPU every step's latent is copied into pinned host memory with a non-blocking copy right after it is
    computed, so the copy overlaps the next transformer forward instead of stalling at the end.
    """

    DEBUG_KEYS = ("prev_sample_mean", "noise_std", "variance_noise", "model_output")

    def __init__(self, x0: torch.Tensor, num_steps: int, debug: bool):
        self.async_copy = x0.device.type == "cuda"
        shape = (x0.shape[0], num_steps + 1, *x0.shape[1:])
        self.host = torch.empty(shape, dtype=torch.float32, pin_memory=self.async_copy)
        self.host[:, 0].copy_(x0, non_blocking=self.async_copy)
        self._debug: dict[str, list[torch.Tensor]] | None = {k: [] for k in self.DEBUG_KEYS} if debug else None

    def record(self, i: int, x: torch.Tensor, out, velocity: torch.Tensor) -> None:
        self.host[:, i + 1].copy_(x, non_blocking=self.async_copy)
        if self._debug is not None:
            self._debug["prev_sample_mean"].append(out.prev_sample_mean.float().cpu())
            self._debug["noise_std"].append(out.std_dev.cpu())
            noise = out.noise if out.noise is not None else torch.zeros_like(x)
            self._debug["variance_noise"].append(noise.cpu())
            self._debug["model_output"].append(velocity.float().cpu())

    def latents(self) -> torch.Tensor:
        if self.async_copy:
            torch.cuda.current_stream().synchronize()
        return self.host

    def debug(self) -> dict[str, torch.Tensor]:
        return {} if self._debug is None else {k: torch.stack(v, dim=1) for k, v in self._debug.items()}


class QwenImageLogProbPipeline(QwenImagePipeline):
    """Qwen-Image text-to-image sampling that records what RL training needs.

    Every request gets its own scheduler (see :meth:`FlowMatchSDEDiscreteScheduler.for_request`) and its own
    per-sample random generators, and ``__call__`` keeps no state on the pipeline, so concurrent requests do not
    interfere and a sample depends only on its prompt, its seed and the sampling config. The text encoder
    (Qwen2.5-VL caches ``rope_deltas`` on itself) and the VAE (it keeps a causal-conv feature cache) hold state
    between calls, so those two stages run one request at a time; the denoising loop runs concurrently.
    """

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self._stateful_stage_lock = threading.Lock()
        self.attention_backend = "auto"  # see attention_backend(); the engine sets it from the rollout config
        # True when a trainer trains this very transformer: stochastic steps then run the transformer with autograd
        # enabled, exactly as the trainer's replay does, so both execute the same kernels (compiled graphs differ
        # between inference and autograd mode) and the replayed log-probs equal the rollout's.
        self.stochastic_steps_with_grad = False

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        *,
        seeds: Sequence[int],
        sampling: DiffusionSamplingConfig | None = None,
        window_seed: int | None = None,
        latents: torch.Tensor | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RolloutBatch:
        """Sample one image per prompt entry.

        Args:
            prompt: one prompt per sample (repeat a prompt ``n`` times for a GRPO group).
            seeds: one seed per sample; the sample's initial latent and every step's noise come from it alone.
            sampling: how to sample (defaults to ``DiffusionSamplingConfig()``).
            window_seed: seed of the random SDE window (``sampling.sde_window_size > 0``); defaults to ``seeds[0]``.
            latents: optional ``[B, L, D]`` initial packed latents instead of drawing them from the seeds.
            cancel: called before every denoising step; when it returns True the generation stops with
                :class:`~verl_diffusion_rollout.errors.GenerationCancelled`.

        Returns:
            A :class:`RolloutBatch` with CPU tensors.
        """
        sampling = sampling or DiffusionSamplingConfig()
        start = time.perf_counter()

        # 1. Check inputs
        prompts = self.check_rollout_inputs(prompt, seeds, sampling, latents)
        device = self._execution_device

        # 2. Encode prompts: each distinct prompt once, whatever the group size
        env = self.encode_denoising_env(prompts, sampling, device)
        _sync(device)
        encode_s = time.perf_counter() - start

        # 3-6. Latents, timesteps, SDE window, denoising loop
        trajectory = self.denoise(env, seeds, sampling, window_seed=window_seed, latents=latents, cancel=cancel)

        # 7. Decode, all samples in one VAE batch
        decode_start = time.perf_counter()
        images = self.decode_latents(trajectory.final, sampling.height, sampling.width)
        decode_s = time.perf_counter() - decode_start

        batch = len(prompts)
        return RolloutBatch(
            responses=images.cpu(),
            all_latents=trajectory.latents,
            all_timesteps=trajectory.timesteps.expand(batch, -1).contiguous(),
            all_sigmas=trajectory.sigmas.expand(batch, -1).contiguous(),
            rollout_log_probs=trajectory.log_probs,
            sde_mask=trajectory.sde_mask,
            prompt_embeds=env["prompt_embeds"].cpu(),
            prompt_embeds_mask=env["prompt_embeds_mask"].cpu(),
            negative_prompt_embeds=_cpu(env["negative_prompt_embeds"]),
            negative_prompt_embeds_mask=_cpu(env["negative_prompt_embeds_mask"]),
            seeds=torch.tensor([int(s) for s in seeds], dtype=torch.int64),
            prompts=prompts,
            sampling=sampling,
            debug=trajectory.debug,
            timings={
                "encode_s": encode_s,
                "denoise_s": trajectory.seconds,
                "decode_s": decode_s,
                "total_s": time.perf_counter() - start,
            },
        )

    @torch.no_grad()
    def denoise(
        self,
        env: dict[str, torch.Tensor | None],
        seeds: Sequence[int],
        sampling: DiffusionSamplingConfig,
        *,
        window_seed: int | None = None,
        latents: torch.Tensor | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> Trajectory:
        """Stages 3-6: initial noise, timesteps, SDE window and the denoising loop, from encoded prompts.

        Args:
            env: prompt embeddings and masks as :meth:`encode_denoising_env` returns them (on the device).
            seeds, sampling, window_seed, latents, cancel: as in :meth:`__call__`.

        Returns:
            A :class:`Trajectory` with CPU tensors.
        """
        device = self._execution_device
        batch = len(seeds)
        text = TextConditioning.build(
            **env, guidance_scale=sampling.guidance_scale, batch_cfg=sampling.batch_cfg, dtype=self.transformer.dtype
        )

        # 3. Prepare latents, from per-sample generators
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]
        if latents is None:
            latents = self.prepare_rollout_latents(generators, sampling.height, sampling.width, device)
        x = latents.to(device=device, dtype=torch.float32)
        img_shapes = img_shapes_for(batch, sampling.height, sampling.width, self.vae_scale_factor)

        # 4. Prepare timesteps (a scheduler of this request's own)
        scheduler = self.request_scheduler(sampling.num_steps, image_seq_len=x.shape[1], device=device)
        num_steps = len(scheduler.timesteps)

        # 5. Pick the stochastic steps
        stochastic = set(sampling.stochastic_steps(int(seeds[0]) if window_seed is None else window_seed))
        no_const = sampling.resolved_log_prob_no_const()

        # 6. Denoising loop; the trajectory streams to host memory while the next step computes
        recorder = _TrajectoryRecorder(x, num_steps, sampling.return_debug)
        log_probs = torch.zeros(batch, num_steps, dtype=torch.float32, device=device)
        loop_start = time.perf_counter()
        with self.progress_bar(total=num_steps) as progress_bar, attention_backend(self.attention_backend, device):
            for i, t in enumerate(scheduler.timesteps):
                if cancel is not None and cancel():
                    raise GenerationCancelled(f"generation cancelled before step {i} of {num_steps}")
                grad = self.stochastic_steps_with_grad and i in stochastic
                with torch.enable_grad() if grad else contextlib.nullcontext():
                    velocity = predict_velocity(self.transformer, x, t.expand(batch), text, img_shapes)
                velocity = velocity.detach()
                if i in stochastic:
                    noise = randn_per_sample(x.shape, generators, device=device)
                    out = scheduler.step(
                        velocity,
                        t,
                        x,
                        sde_type=sampling.sde_type,
                        noise_level=sampling.noise_level,
                        noise=noise,
                        log_prob_no_const=no_const,
                    )
                    log_probs[:, i] = out.log_prob
                else:
                    out = scheduler.step(velocity, t, x)
                x = out.prev_sample.float()
                recorder.record(i, x, out, velocity)
                progress_bar.update()
        log_probs = log_probs.cpu()  # waits for the loop to finish
        sde_mask = torch.zeros(batch, num_steps, dtype=torch.bool)
        sde_mask[:, sorted(stochastic)] = True
        return Trajectory(
            latents=recorder.latents(),
            log_probs=log_probs,
            sde_mask=sde_mask,
            timesteps=scheduler.timesteps.float().cpu(),
            sigmas=scheduler.sigmas.float().cpu(),
            debug=recorder.debug(),
            seconds=time.perf_counter() - loop_start,
            final=x,
        )

    # -- stages -------------------------------------------------------------------------------------------------

    def check_rollout_inputs(
        self,
        prompt: str | Sequence[str],
        seeds: Sequence[int],
        sampling: DiffusionSamplingConfig,
        latents: torch.Tensor | None,
    ) -> list[str]:
        """Validate the request; returns the prompts as a list."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts:
            raise ValueError("prompt must be a non-empty string or list of strings, got an empty list")
        bad = [p for p in prompts if not isinstance(p, str)]
        if bad:
            raise ValueError(f"every prompt must be a string, got {bad[0]!r}")
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per sample")
        multiple = self.vae_scale_factor * 2
        if sampling.height % multiple or sampling.width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor {self.vae_scale_factor} x 2x2 patches), "
                f"got {sampling.height}x{sampling.width}"
            )
        if self.transformer.config.guidance_embeds:
            raise NotImplementedError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        if latents is not None:
            expected = (len(prompts), self._num_latent_tokens(sampling.height, sampling.width), self.transformer.config.in_channels)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        return prompts

    def _num_latent_tokens(self, height: int, width: int) -> int:
        return (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)

    def encode_denoising_env(
        self, prompts: list[str], sampling: DiffusionSamplingConfig, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """Prompt (and negative prompt) embeddings and masks for every sample, in the transformer's dtype.

        Each distinct prompt is encoded alone (so its embedding never depends on what else is in the batch), then
        the batch is right-padded to its longest prompt.
        """
        dtype = self.transformer.dtype
        cache: dict[str, torch.Tensor] = {}
        with self._stateful_stage_lock:
            for p in dict.fromkeys(prompts):
                embeds, _ = self._get_qwen_prompt_embeds([p], device=device)
                cache[p] = embeds[0, : sampling.max_sequence_length].to(dtype)
            if sampling.guidance_scale > 1:
                neg, _ = self._get_qwen_prompt_embeds([sampling.negative_prompt], device=device)
                neg = neg[0, : sampling.max_sequence_length].to(dtype)
        prompt_embeds, prompt_mask = self._stack_padded([cache[p] for p in prompts])
        env = {
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_mask": prompt_mask,
            "negative_prompt_embeds": None,
            "negative_prompt_embeds_mask": None,
        }
        if sampling.guidance_scale > 1:
            env["negative_prompt_embeds"], env["negative_prompt_embeds_mask"] = self._stack_padded([neg] * len(prompts))
        return env

    @staticmethod
    def _stack_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        length = max(r.shape[0] for r in rows)
        embeds = rows[0].new_zeros(len(rows), length, rows[0].shape[1])
        mask = torch.zeros(len(rows), length, dtype=torch.long, device=rows[0].device)
        for b, r in enumerate(rows):
            embeds[b, : r.shape[0]] = r
            mask[b, : r.shape[0]] = 1
        return embeds, mask

    def prepare_rollout_latents(
        self, generators: Sequence[torch.Generator], height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """``[B, L, D]`` float32 packed initial noise; row ``b`` drawn at full shape from ``generators[b]``."""
        channels = self.transformer.config.in_channels // 4
        h = 2 * (height // (self.vae_scale_factor * 2))
        w = 2 * (width // (self.vae_scale_factor * 2))
        noise = randn_per_sample((len(generators), 1, channels, h, w), generators, device=device)
        return self._pack_latents(noise, len(generators), channels, h, w)

    def request_scheduler(
        self, num_steps: int, *, image_seq_len: int, device: torch.device
    ) -> FlowMatchSDEDiscreteScheduler:
        """A scheduler for one request: Qwen-Image's sigmas ``linspace(1, 1/N, N)`` with dynamic shift ``mu``."""
        template = self.scheduler
        if not isinstance(template, FlowMatchSDEDiscreteScheduler):
            template = FlowMatchSDEDiscreteScheduler.from_config(template.config)
        config = template.config
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        scheduler = template.for_request(num_steps, sigmas=sigmas, mu=mu, device=device)
        if not bool(torch.isfinite(scheduler._host_sigmas).all()):
            raise ValueError(
                f"num_steps={num_steps} gives a non-finite sigma schedule with this scheduler "
                f"(shift_terminal={config.get('shift_terminal')}); use more steps"
            )
        return scheduler

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, L, D]`` packed latents to ``[B, 3, H, W]`` float32 images in ``[0, 1]``."""
        with self._stateful_stage_lock:
            return decode_packed_latents(self, latents, height, width)


def decode_packed_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Qwen-Image's decode on any pipeline with its components (``vae``, ``image_processor``, ``_unpack_latents``,
    ``vae_scale_factor``): ``[B, L, D]`` packed latents to ``[B, 3, H, W]`` float32 images in ``[0, 1]``."""
    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    z_dim = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    x = x / inv_std + mean
    image = pipe.vae.decode(x, return_dict=False)[0][:, :, 0]
    return pipe.image_processor.postprocess(image, output_type="pt").float()
