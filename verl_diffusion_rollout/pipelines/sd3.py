"""Stable Diffusion 3 / 3.5 log-prob pipeline: diffusers' ``StableDiffusion3Pipeline`` sampling with SDE/CPS/ODE
steps for RL.

``StableDiffusion3LogProbPipeline`` is a ``StableDiffusion3Pipeline`` (same components: ``SD3Transformer2DModel``,
CLIP-L, CLIP-G, T5, ``AutoencoderKL``; same ``from_pretrained``) whose ``__call__`` returns a
:class:`~verl_diffusion_rollout.contract.RolloutBatch`. The loop is the shared
:func:`~verl_diffusion_rollout.pipelines.loop.denoise_loop`; what is SD3's own:

* text: CLIP-L and CLIP-G penultimate hidden states (77 tokens, concatenated and zero-padded to T5's width) followed
  by T5's ``max_sequence_length`` tokens, plus the pooled CLIP embeddings; every token is attended to (no mask);
* latents: ``[B, C, H/8, W/8]``, unpacked (the transformer patchifies them itself);
* the schedule: the scheduler's own (``shift``, dynamic shift when configured), as diffusers' pipeline sets it;
* the velocity (:class:`SD3Family`): the transformer takes the scheduler timestep (``sigma * 1000``) as is, and
  guidance is standard CFG ``uncond + s * (cond - uncond)``, the batched forward ordered ``[uncond, cond]`` as
  diffusers orders it; skip-layer guidance is off;
* decoding: ``latents / scaling_factor + shift_factor`` through the VAE.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch
from ..scheduler import FlowMatchSDEDiscreteScheduler
from ..sde import randn_per_sample
from ..stages import Role
from .loop import DenoisingFamily, Trajectory, check_prompts, denoise_encoded, run_rollout
from .prompt_cache import PromptEmbeddingCache
from .tensor_specs import TensorSpec, check_tensors

__all__ = [
    "StableDiffusion3LogProbPipeline",
    "SD3Family",
    "SD3Conditioning",
    "SD3",
    "predict_velocity_sd3",
    "sd3_scheduler",
    "T5_MAX_SEQUENCE_LENGTH",
]

T5_MAX_SEQUENCE_LENGTH = 512  # diffusers' StableDiffusion3Pipeline refuses longer T5 prompts


@dataclass
class SD3Conditioning:
    """Text inputs of the SD3 transformer for one batch, prepared once and reused at every step.

    With batched CFG, ``embeds`` / ``pooled`` hold the unconditional and conditional inputs concatenated on the
    batch dimension, unconditional first (as diffusers' pipeline orders them), and ``uncond_*`` are None.
    """

    embeds: torch.Tensor
    pooled: torch.Tensor
    uncond_embeds: torch.Tensor | None
    uncond_pooled: torch.Tensor | None
    guidance_scale: float
    batched_cfg: bool

    @classmethod
    def build(
        cls,
        prompt_embeds: torch.Tensor,
        pooled_prompt_embeds: torch.Tensor,
        negative_prompt_embeds: torch.Tensor | None,
        negative_pooled_prompt_embeds: torch.Tensor | None,
        *,
        guidance_scale: float,
        batch_cfg: bool,
        dtype: torch.dtype,
    ) -> SD3Conditioning:
        """Cast to the transformer dtype and concatenate ``[uncond, cond]`` for batched CFG."""
        cond, pooled = prompt_embeds.to(dtype), pooled_prompt_embeds.to(dtype)
        if guidance_scale <= 1:
            return cls(cond, pooled, None, None, guidance_scale, False)
        if negative_prompt_embeds is None or negative_pooled_prompt_embeds is None:
            raise ValueError(
                f"guidance_scale={guidance_scale} needs negative_prompt_embeds and negative_pooled_prompt_embeds (CFG)"
            )
        uncond, uncond_pooled = negative_prompt_embeds.to(dtype), negative_pooled_prompt_embeds.to(dtype)
        if not batch_cfg:
            return cls(cond, pooled, uncond, uncond_pooled, guidance_scale, False)
        if uncond.shape != cond.shape:
            raise ValueError(
                f"batched CFG needs negative_prompt_embeds of the prompt's shape {tuple(cond.shape)}, "
                f"got {tuple(uncond.shape)}"
            )
        return cls(torch.cat([uncond, cond]), torch.cat([uncond_pooled, pooled]), None, None, guidance_scale, True)


def predict_velocity_sd3(
    transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, text: SD3Conditioning
) -> torch.Tensor:
    """The guided velocity, computed operation for operation as diffusers' ``StableDiffusion3Pipeline`` does.

    Args:
        transformer: an ``SD3Transformer2DModel`` (possibly peft-wrapped or compiled).
        latents: ``[B, C, h, w]`` latents, any float dtype (cast to the transformer's dtype).
        timesteps: ``[B]`` float32 scheduler timesteps (``sigma * 1000``), passed to the transformer unchanged.
        text: prepared :class:`SD3Conditioning`.

    Returns:
        ``[B, C, h, w]`` velocity in the transformer's dtype.
    """
    x = latents.to(text.embeds.dtype)
    if text.batched_cfg:
        out = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([timesteps, timesteps]),
            encoder_hidden_states=text.embeds,
            pooled_projections=text.pooled,
            return_dict=False,
        )[0]
        uncond, cond = out.chunk(2)
        return uncond + text.guidance_scale * (cond - uncond)
    cond = transformer(
        hidden_states=x,
        timestep=timesteps,
        encoder_hidden_states=text.embeds,
        pooled_projections=text.pooled,
        return_dict=False,
    )[0]
    if text.uncond_embeds is None:
        return cond
    uncond = transformer(
        hidden_states=x,
        timestep=timesteps,
        encoder_hidden_states=text.uncond_embeds,
        pooled_projections=text.uncond_pooled,
        return_dict=False,
    )[0]
    return uncond + text.guidance_scale * (cond - uncond)


class SD3Family(DenoisingFamily):
    """SD3 / SD3.5: standard CFG, the transformer takes the scheduler timestep, ``[B, C, h, w]`` latents."""

    name = "sd3"

    def condition(
        self,
        env: Mapping[str, torch.Tensor | None],
        *,
        guidance_scale: float,
        batch_cfg: bool,
        dtype: torch.dtype,
        height: int,
        width: int,
        latent_shape: Sequence[int],
        text_token_multiple: int = 1,  # SD3's text has one fixed length (CLIP 77 + T5): nothing to pad
    ) -> SD3Conditioning:
        if len(latent_shape) != 4:
            raise ValueError(f"SD3 latents are [B, C, h, w], got shape {tuple(latent_shape)}")
        if env.get("pooled_prompt_embeds") is None:
            raise ValueError("the SD3 denoising environment needs pooled_prompt_embeds")
        for key in ("prompt_embeds_mask", "negative_prompt_embeds_mask"):
            mask = env.get(key)
            if mask is not None and not bool(mask.all()):
                raise ValueError(f"SD3 attends to every text token, but {key} marks padding tokens (zeros)")
        return SD3Conditioning.build(
            env["prompt_embeds"],
            env["pooled_prompt_embeds"],
            env.get("negative_prompt_embeds"),
            env.get("negative_pooled_prompt_embeds"),
            guidance_scale=guidance_scale,
            batch_cfg=batch_cfg,
            dtype=dtype,
        )

    def velocity(
        self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: SD3Conditioning
    ) -> torch.Tensor:
        return predict_velocity_sd3(transformer, latents, timesteps, cond)

    def use_sequence_parallel(self, transformer: torch.nn.Module, sp: Any) -> Any:
        from .sd3_parallel import use_sequence_parallel

        return use_sequence_parallel(transformer, sp)


SD3 = SD3Family()


def sd3_scheduler(
    template, num_steps: int, *, image_seq_len: int, device: torch.device
) -> FlowMatchSDEDiscreteScheduler:
    """A scheduler for one request with the schedule diffusers' ``StableDiffusion3Pipeline`` sets: the scheduler's
    ``set_timesteps(num_steps)`` (its ``shift``), with ``mu`` from the image size when it uses dynamic shifting."""
    if not isinstance(template, FlowMatchSDEDiscreteScheduler):
        template = FlowMatchSDEDiscreteScheduler.from_config(template.config)
    config = template.config
    mu = None
    if config.get("use_dynamic_shifting", None):
        mu = calculate_shift(
            image_seq_len,
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.16),
        )
    return template.for_request(num_steps, mu=mu, device=device)


class StableDiffusion3LogProbPipeline(StableDiffusion3Pipeline):
    """SD3 / SD3.5 text-to-image sampling that records what RL training needs.

    Every request gets its own scheduler and per-sample generators, and ``__call__`` keeps no state on the
    pipeline, so concurrent requests do not interfere and a sample depends only on its prompt, its seed and the
    sampling config. The tokenizers are not thread-safe (a fast tokenizer switches its padding and truncation
    settings for every call), so text encoding runs one request at a time; the denoising loop and the decode run
    concurrently.
    """

    family = SD3
    # What each role loads (components.load_pipeline); the others (image_encoder and feature_extractor included,
    # which text-to-image never uses) stay None and are never read from disk.
    ROLE_COMPONENTS = {
        Role.ENCODER: ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"),
        Role.DENOISER: ("transformer", "scheduler"),
        Role.DECODER: ("vae",),
    }

    def __init__(
        self,
        transformer,
        scheduler,
        vae,
        text_encoder,
        tokenizer,
        text_encoder_2,
        tokenizer_2,
        text_encoder_3,
        tokenizer_3,
        image_encoder=None,
        feature_extractor=None,
    ):
        super().__init__(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3,
            tokenizer_3=tokenizer_3,
            image_encoder=image_encoder,
            feature_extractor=feature_extractor,
        )
        self._text_lock = threading.Lock()
        # Per-prompt text-encoder outputs kept across calls (the engine sets one; None: encode on every call).
        self.prompt_cache: PromptEmbeddingCache | None = None
        self.attention_backend = "auto"  # see loop.attention_backend(); the engine sets it from the rollout config
        # True when a trainer trains this very transformer (see QwenImageLogProbPipeline): stochastic steps run the
        # transformer with autograd enabled, as the trainer's replay does.
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
            sampling: how to sample (defaults to ``DiffusionSamplingConfig()``); ``guidance_scale`` is standard CFG.
            window_seed: seed of the random SDE window; defaults to ``seeds[0]``.
            latents: optional ``[B, C, H/8, W/8]`` initial latents instead of drawing them from the seeds.
            cancel: called before every denoising step; True stops the generation with
                :class:`~verl_diffusion_rollout.errors.GenerationCancelled`.

        Returns:
            A :class:`RolloutBatch` with CPU tensors (``family == "sd3"``).
        """
        return run_rollout(
            self, prompt, seeds, sampling or DiffusionSamplingConfig(), window_seed=window_seed, latents=latents,
            cancel=cancel,
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
        """Stages 3-6: initial noise, timesteps, SDE window and the shared denoising loop, from encoded prompts.

        Args:
            env: the denoising environment as :meth:`encode_denoising_env` returns it (on the device).
            seeds, sampling, window_seed, latents, cancel: as in :meth:`__call__`.
        """
        return denoise_encoded(
            self, env, seeds, sampling, image_seq_len=self._image_seq_len, window_seed=window_seed, latents=latents,
            cancel=cancel,
        )

    def _image_seq_len(self, latents: torch.Tensor) -> int:
        """Image tokens of ``[B, C, h, w]`` latents after the transformer's patching (the scheduler's shift input)."""
        patch = self.transformer.config.patch_size
        return (latents.shape[2] // patch) * (latents.shape[3] // patch)

    @staticmethod
    def vae_scale_factor_from_config(vae_config: Mapping[str, Any]) -> int:
        """The VAE's spatial downsampling factor from its ``config.json``, as ``StableDiffusion3Pipeline`` derives it."""
        return 2 ** (len(vae_config["block_out_channels"]) - 1)

    @property
    def env_dtype(self) -> torch.dtype:
        """The dtype of the denoising environment: the transformer's (the text encoders' in an encoder role)."""
        return (self.transformer if self.transformer is not None else self.text_encoder).dtype

    # -- stages -------------------------------------------------------------------------------------------------

    def check_rollout_inputs(
        self,
        prompt: str | Sequence[str],
        seeds: Sequence[int],
        sampling: DiffusionSamplingConfig,
        latents: torch.Tensor | None,
    ) -> list[str]:
        """Validate the request; returns the prompts as a list."""
        prompts = self.check_text_inputs(prompt, sampling)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per sample")
        self.check_image_size(sampling)
        if latents is not None:
            expected = (len(prompts), *self._latent_shape(sampling.height, sampling.width))
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        return prompts

    def check_text_inputs(self, prompt: str | Sequence[str], sampling: DiffusionSamplingConfig) -> list[str]:
        """Validate an encode request (the text encoders' stage alone); returns the prompts as a list."""
        prompts = check_prompts(prompt)
        if sampling.max_sequence_length > T5_MAX_SEQUENCE_LENGTH:
            raise ValueError(
                f"sampling.max_sequence_length must be <= {T5_MAX_SEQUENCE_LENGTH} for SD3's T5 encoder, "
                f"got {sampling.max_sequence_length}"
            )
        return prompts

    def check_image_size(self, sampling: DiffusionSamplingConfig) -> None:
        """Height and width must tile into VAE factor x patch size, within the transformer's position embedding."""
        patch = self.transformer.config.patch_size
        multiple = self.vae_scale_factor * patch
        if sampling.height % multiple or sampling.width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor {self.vae_scale_factor} x patch size "
                f"{patch}), got {sampling.height}x{sampling.width}"
            )
        max_patches = self.transformer.config.pos_embed_max_size
        if max_patches is not None and max(sampling.height, sampling.width) > max_patches * multiple:
            raise ValueError(
                f"height and width must be at most {max_patches * multiple} px (pos_embed_max_size={max_patches} "
                f"patches), got {sampling.height}x{sampling.width}"
            )

    def env_specs(self, sampling: DiffusionSamplingConfig, rows: int) -> dict[str, TensorSpec | None]:
        """The denoising environment this transformer takes for ``rows`` prompts (negative keys only with CFG)."""
        config, dtype = self.transformer.config, self.env_dtype
        width, pooled = config.joint_attention_dim, config.pooled_projection_dim
        cfg = sampling.guidance_scale > 1
        return {
            "prompt_embeds": TensorSpec((rows, "S", width), dtype),
            "prompt_embeds_mask": TensorSpec((rows, "S"), torch.int64, binary=True),
            "pooled_prompt_embeds": TensorSpec((rows, pooled), dtype),
            "negative_prompt_embeds": TensorSpec((rows, "S_neg", width), dtype) if cfg else None,
            "negative_prompt_embeds_mask": TensorSpec((rows, "S_neg"), torch.int64, binary=True) if cfg else None,
            "negative_pooled_prompt_embeds": TensorSpec((rows, pooled), dtype) if cfg else None,
        }

    def check_denoise_inputs(
        self, env: Mapping[str, torch.Tensor | None], rows: int, sampling: DiffusionSamplingConfig
    ) -> None:
        """Validate a denoise request: per-prompt embeddings of exactly the shapes and dtype the transformer takes."""
        self.check_image_size(sampling)
        check_tensors(env, self.env_specs(sampling, rows), what="prompt embeddings ('env')")

    def check_decode_inputs(self, latents: torch.Tensor, sampling: DiffusionSamplingConfig) -> None:
        """Validate a decode request: ``[B, C, H/f, W/f]`` float32 latents of the image size, finite."""
        factor = self.vae_scale_factor
        if sampling.height % factor or sampling.width % factor:
            raise ValueError(f"height and width must be multiples of the VAE factor {factor}, "
                             f"got {sampling.height}x{sampling.width}")
        shape = (self.vae.config.latent_channels, sampling.height // factor, sampling.width // factor)
        rows = latents.shape[0] if isinstance(latents, torch.Tensor) and latents.ndim else 0
        check_tensors({"latents": latents}, {"latents": TensorSpec((rows, *shape), torch.float32)},
                      what=f"decode request ({sampling.height}x{sampling.width} images)")

    def _latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        return (self.transformer.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)

    def encode_denoising_env(
        self, prompts: list[str], sampling: DiffusionSamplingConfig, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """Prompt (and negative prompt) embeddings, pooled embeddings and all-ones masks for every sample, in the
        transformer's dtype. Each distinct prompt is encoded alone, so its embedding never depends on the batch."""
        with self._text_lock:
            cache = {p: self._encode_cached(p, sampling.max_sequence_length, device) for p in dict.fromkeys(prompts)}
            if sampling.guidance_scale > 1:
                neg, neg_pooled = self._encode_cached(sampling.negative_prompt, sampling.max_sequence_length, device)
        embeds = torch.stack([cache[p][0] for p in prompts])
        env: dict[str, torch.Tensor | None] = {
            "prompt_embeds": embeds,
            "prompt_embeds_mask": torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device),
            "pooled_prompt_embeds": torch.stack([cache[p][1] for p in prompts]),
            "negative_prompt_embeds": None,
            "negative_prompt_embeds_mask": None,
            "negative_pooled_prompt_embeds": None,
        }
        if sampling.guidance_scale > 1:
            env["negative_prompt_embeds"] = neg.expand(len(prompts), -1, -1).contiguous()
            env["negative_prompt_embeds_mask"] = torch.ones(
                env["negative_prompt_embeds"].shape[:2], dtype=torch.long, device=neg.device
            )
            env["negative_pooled_prompt_embeds"] = neg_pooled.expand(len(prompts), -1).contiguous()
        return env

    def _encode_cached(
        self, text: str, max_sequence_length: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`_encode_one` through :attr:`prompt_cache` when set (T5's token count is part of the key)."""
        if self.prompt_cache is None:
            return self._encode_one(text, max_sequence_length, device)
        return self.prompt_cache.get_or_compute(
            ("sd3", text, max_sequence_length), lambda: self._encode_one(text, max_sequence_length, device)
        )

    def _encode_one(self, text: str, max_sequence_length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``([77 + max_sequence_length, E], [P])`` embeddings of one text through CLIP-L, CLIP-G and T5."""
        embeds, _, pooled, _ = self.encode_prompt(
            prompt=[text], prompt_2=None, prompt_3=None, device=device, do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        dtype = self.env_dtype
        return embeds[0].to(dtype), pooled[0].to(dtype)

    def prepare_rollout_latents(
        self, generators: Sequence[torch.Generator], height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """``[B, C, H/8, W/8]`` float32 initial noise; row ``b`` drawn at full shape from ``generators[b]``."""
        shape = (len(generators), *self._latent_shape(height, width))
        return randn_per_sample(shape, generators, device=device)

    def request_scheduler(
        self, num_steps: int, *, image_seq_len: int, device: torch.device
    ) -> FlowMatchSDEDiscreteScheduler:
        """A scheduler for one request (see :func:`sd3_scheduler`)."""
        return sd3_scheduler(self.scheduler, num_steps, image_seq_len=image_seq_len, device=device)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, C, h, w]`` latents to ``[B, 3, H, W]`` float32 images in ``[0, 1]`` (the size follows from the
        latents; ``height``/``width`` keep the signature every log-prob pipeline shares)."""
        x = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        image = self.vae.decode(x, return_dict=False)[0]
        return self.image_processor.postprocess(image, output_type="pt").float()
