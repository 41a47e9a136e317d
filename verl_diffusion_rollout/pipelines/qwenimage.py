"""Qwen-Image log-prob pipeline: diffusers' ``QwenImagePipeline`` sampling with SDE/CPS/ODE steps for RL.

``QwenImageLogProbPipeline`` is a ``QwenImagePipeline`` (same components, same ``from_pretrained``) whose
``__call__`` returns a :class:`~verl_diffusion_rollout.contract.RolloutBatch`: images, the latent trajectory,
per-step log-probs and the denoising environment a trainer needs to replay every step. The loop itself is the
shared :func:`~verl_diffusion_rollout.pipelines.loop.denoise_loop`; this module supplies what is Qwen-Image's own:
text encoding (Qwen2.5-VL), packed 2x2 latents, the sigma schedule with dynamic shift, true CFG with norm rescale
and the ``t / 1000`` timestep convention (:class:`QwenImageFamily`), and the decode.

:func:`predict_velocity` is the one place the transformer is called, by the rollout and by the trainer's replay
(:mod:`verl_diffusion_rollout.trainer.replay`), so both see the same velocity for the same inputs.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import QwenImagePipeline
from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

from ..config import DiffusionSamplingConfig
from ..contract import RolloutBatch, pad_tokens, stack_padded
from ..scheduler import FlowMatchSDEDiscreteScheduler
from ..sde import randn_per_sample
from ..stages import Role
from .loop import (
    ATTENTION_BACKENDS,
    DenoisingFamily,
    Trajectory,
    attention_backend,
    check_prompts,
    denoise_encoded,
    run_rollout,
)
from .compile import mark_dynamic_dim
from .prompt_cache import PromptEmbeddingCache
from .tensor_specs import TensorSpec, check_tensors

__all__ = [
    "QwenImageLogProbPipeline",
    "QwenImageFamily",
    "QwenImageConditioning",
    "QWEN_IMAGE",
    "TextConditioning",
    "Trajectory",
    "predict_velocity",
    "img_shapes_for",
    "attention_backend",
    "decode_packed_latents",
    "qwenimage_initial_latents",
    "qwenimage_scheduler",
    "ATTENTION_BACKENDS",
]


def _transformer_mask(mask: torch.Tensor) -> torch.Tensor | None:
    """diffusers passes no mask when every token is real (and the attention can take its fastest kernel)."""
    return None if bool(mask.all()) else mask


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
        multiple: int = 1,
    ) -> TextConditioning:
        """Cast to the transformer dtype, pick the masks, and concatenate for batched CFG; every text input is
        right-padded (masked) to a multiple of ``multiple`` tokens."""
        cfg = guidance_scale > 1
        if cfg and negative_prompt_embeds is None:
            raise ValueError(f"guidance_scale={guidance_scale} needs negative_prompt_embeds (true CFG)")

        def padded(t: torch.Tensor) -> torch.Tensor:  # [B, S, E] or [B, S] -> S rounded up to the multiple
            return pad_tokens(t, -(-t.shape[1] // multiple) * multiple)

        cond, prompt_embeds_mask = padded(prompt_embeds.to(dtype)), padded(prompt_embeds_mask)
        if not cfg:
            return cls(cond, _transformer_mask(prompt_embeds_mask), None, None, guidance_scale, False)
        uncond = padded(negative_prompt_embeds.to(dtype))
        negative_prompt_embeds_mask = padded(negative_prompt_embeds_mask)
        if batch_cfg:
            length = max(cond.shape[1], uncond.shape[1])
            joint = torch.cat([pad_tokens(cond, length), pad_tokens(uncond, length)])
            joint_mask = torch.cat([pad_tokens(prompt_embeds_mask, length), pad_tokens(negative_prompt_embeds_mask, length)])
            return cls(joint, _transformer_mask(joint_mask), None, None, guidance_scale, True)
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


def patch_factor(height: int, width: int, num_tokens: int) -> int:
    """Pixels per latent token side (VAE factor x 2x2 packing), recovered from the image size and token count."""
    factor = math.isqrt(height * width // num_tokens)
    if factor * factor * num_tokens != height * width:
        raise ValueError(f"{num_tokens} latent tokens do not tile a {height}x{width} image")
    return factor


@dataclass
class QwenImageConditioning:
    """The Qwen-Image transformer's inputs besides latents and timestep: text and RoPE image shapes."""

    text: TextConditioning
    img_shapes: list


class QwenImageFamily(DenoisingFamily):
    """Qwen-Image: true CFG with norm rescale, the transformer takes ``t / 1000``, packed ``[B, L, D]`` latents."""

    name = "qwenimage"

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
        text_token_multiple: int = 1,
    ) -> QwenImageConditioning:
        if len(latent_shape) != 3:
            raise ValueError(f"Qwen-Image latents are packed [B, L, D], got shape {tuple(latent_shape)}")
        text = TextConditioning.build(
            env["prompt_embeds"],
            env["prompt_embeds_mask"],
            env.get("negative_prompt_embeds"),
            env.get("negative_prompt_embeds_mask"),
            guidance_scale=guidance_scale,
            batch_cfg=batch_cfg,
            dtype=dtype,
            multiple=text_token_multiple,
        )
        factor = patch_factor(height, width, latent_shape[1])
        return QwenImageConditioning(text, img_shapes_for(latent_shape[0], height, width, factor // 2))

    def velocity(
        self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: QwenImageConditioning
    ) -> torch.Tensor:
        return predict_velocity(transformer, latents, timesteps, cond.text, cond.img_shapes)

    def prepare_block_inputs(self, arguments: dict[str, Any]) -> None:
        """The text-token dimension is dynamic (prompts have any length up to ``max_sequence_length``): the text
        stream, its mask and its RoPE rows. A batch whose tokens are all real brings no mask (diffusers' convention);
        compiled blocks get an all-ones one instead (the same function), so one graph serves every batch."""
        text = arguments["encoder_hidden_states"]
        if arguments.get("encoder_hidden_states_mask") is None:
            arguments["encoder_hidden_states_mask"] = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        mark_dynamic_dim(text, 1)
        mark_dynamic_dim(arguments["encoder_hidden_states_mask"], 1)
        rotary = arguments.get("image_rotary_emb")
        if rotary is not None:
            mark_dynamic_dim(rotary[1], 0)

    def use_fast_attention(self, transformer: torch.nn.Module) -> Any:
        from .qwenimage_attention import use_joint_attn_processor

        return use_joint_attn_processor(transformer)

    def use_sequence_parallel(self, transformer: torch.nn.Module, sp: Any) -> Any:
        from .qwenimage_parallel import use_sequence_parallel

        return use_sequence_parallel(transformer, sp)


QWEN_IMAGE = QwenImageFamily()


def qwenimage_initial_latents(
    generators: Sequence[torch.Generator], in_channels: int, height: int, width: int, vae_scale_factor: int,
    device: torch.device,
) -> torch.Tensor:
    """``[B, L, D]`` float32 packed initial noise; row ``b`` drawn at full ``[1, C, h, w]`` shape from
    ``generators[b]``, then packed into 2x2 patches as ``QwenImagePipeline._pack_latents`` does."""
    channels = in_channels // 4
    h = 2 * (height // (vae_scale_factor * 2))
    w = 2 * (width // (vae_scale_factor * 2))
    noise = randn_per_sample((len(generators), 1, channels, h, w), generators, device=device)
    return QwenImagePipeline._pack_latents(noise, len(generators), channels, h, w)


def qwenimage_scheduler(
    template: Any, num_steps: int, *, image_seq_len: int, device: torch.device
) -> FlowMatchSDEDiscreteScheduler:
    """A scheduler for one request: Qwen-Image's sigmas ``linspace(1, 1/N, N)`` with dynamic shift ``mu``.

    ``template`` is any flow-matching scheduler with Qwen-Image's config (diffusers' or vllm-omni's); it is not
    modified.
    """
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


class QwenImageLogProbPipeline(QwenImagePipeline):
    """Qwen-Image text-to-image sampling that records what RL training needs.

    Every request gets its own scheduler (see :meth:`FlowMatchSDEDiscreteScheduler.for_request`) and its own
    per-sample random generators, and ``__call__`` keeps no state on the pipeline, so concurrent requests do not
    interfere and a sample depends only on its prompt, its seed and the sampling config. The text encoder
    (Qwen2.5-VL caches ``rope_deltas`` on itself) and the VAE (it keeps a causal-conv feature cache) hold state
    between calls, so those two stages run one request at a time; the denoising loop runs concurrently.
    """

    family = QWEN_IMAGE
    # What each role loads (components.load_pipeline); the others stay None and are never read from disk.
    ROLE_COMPONENTS = {
        Role.ENCODER: ("text_encoder", "tokenizer"),
        Role.DENOISER: ("transformer", "scheduler"),
        Role.DECODER: ("vae",),
    }

    def __init__(self, scheduler, vae, text_encoder, tokenizer, transformer):
        super().__init__(
            scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
        )
        self._stateful_stage_lock = threading.Lock()
        # Per-prompt text-encoder outputs kept across calls (the engine sets one; None: encode on every call).
        self.prompt_cache: PromptEmbeddingCache | None = None
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
            env: prompt embeddings and masks as :meth:`encode_denoising_env` returns them (on the device).
            seeds, sampling, window_seed, latents, cancel: as in :meth:`__call__`.

        Returns:
            A :class:`Trajectory` with CPU tensors (``final`` on the device).
        """
        return denoise_encoded(
            self, env, seeds, sampling, image_seq_len=lambda x: x.shape[1], window_seed=window_seed, latents=latents,
            cancel=cancel,
        )

    @staticmethod
    def vae_scale_factor_from_config(vae_config: Mapping[str, Any]) -> int:
        """The VAE's spatial downsampling factor from its ``config.json``, as ``QwenImagePipeline`` derives it."""
        return 2 ** len(vae_config["temperal_downsample"])

    @property
    def env_dtype(self) -> torch.dtype:
        """The dtype of the denoising environment: the transformer's (the text encoder's in an encoder role)."""
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
        prompts = check_prompts(prompt)
        if len(seeds) != len(prompts):
            raise ValueError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per sample")
        self.check_image_size(sampling)
        if self.transformer.config.guidance_embeds:
            raise NotImplementedError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        if latents is not None:
            expected = (len(prompts), self._num_latent_tokens(sampling.height, sampling.width), self.transformer.config.in_channels)
            if tuple(latents.shape) != expected:
                raise ValueError(f"latents must have shape {expected}, got {tuple(latents.shape)}")
        return prompts

    def check_image_size(self, sampling: DiffusionSamplingConfig) -> None:
        """Height and width must tile into the VAE's factor x 2x2 patches."""
        multiple = self.vae_scale_factor * 2
        if sampling.height % multiple or sampling.width % multiple:
            raise ValueError(
                f"height and width must be multiples of {multiple} (VAE factor {self.vae_scale_factor} x 2x2 patches), "
                f"got {sampling.height}x{sampling.width}"
            )

    def check_text_inputs(self, prompt: str | Sequence[str], sampling: DiffusionSamplingConfig) -> list[str]:
        """Validate an encode request (the text encoder's stage alone); returns the prompts as a list."""
        return check_prompts(prompt)

    def env_specs(self, sampling: DiffusionSamplingConfig, rows: int) -> dict[str, TensorSpec | None]:
        """The denoising environment this transformer takes for ``rows`` prompts (negative keys only with CFG)."""
        width, dtype = self.transformer.config.joint_attention_dim, self.env_dtype
        cfg = sampling.guidance_scale > 1
        return {
            "prompt_embeds": TensorSpec((rows, "S", width), dtype),
            "prompt_embeds_mask": TensorSpec((rows, "S"), torch.int64, binary=True),
            "negative_prompt_embeds": TensorSpec((rows, "S_neg", width), dtype) if cfg else None,
            "negative_prompt_embeds_mask": TensorSpec((rows, "S_neg"), torch.int64, binary=True) if cfg else None,
        }

    def check_denoise_inputs(
        self, env: Mapping[str, torch.Tensor | None], rows: int, sampling: DiffusionSamplingConfig
    ) -> None:
        """Validate a denoise request: per-prompt embeddings of exactly the shapes and dtype the transformer takes."""
        self.check_image_size(sampling)
        if self.transformer.config.guidance_embeds:
            raise NotImplementedError("guidance-distilled Qwen-Image transformers (guidance_embeds=True) are not supported")
        check_tensors(env, self.env_specs(sampling, rows), what="prompt embeddings ('env')")

    def check_decode_inputs(self, latents: torch.Tensor, sampling: DiffusionSamplingConfig) -> None:
        """Validate a decode request: ``[B, L, D]`` float32 packed latents of the image size, finite."""
        self.check_image_size(sampling)
        tokens, channels = self._num_latent_tokens(sampling.height, sampling.width), self.vae.config.z_dim * 4
        rows = latents.shape[0] if isinstance(latents, torch.Tensor) and latents.ndim else 0
        check_tensors({"latents": latents}, {"latents": TensorSpec((rows, tokens, channels), torch.float32)},
                      what=f"decode request ({sampling.height}x{sampling.width} images)")

    def _num_latent_tokens(self, height: int, width: int) -> int:
        return (height // self.vae_scale_factor // 2) * (width // self.vae_scale_factor // 2)

    def encode_denoising_env(
        self, prompts: list[str], sampling: DiffusionSamplingConfig, device: torch.device
    ) -> dict[str, torch.Tensor | None]:
        """Prompt (and negative prompt) embeddings and masks for every sample, in the transformer's dtype.

        Each distinct prompt is encoded alone (so its embedding never depends on what else is in the batch), then
        the batch is right-padded to its longest prompt.
        """
        dtype = self.env_dtype
        cache: dict[str, torch.Tensor] = {}
        with self._stateful_stage_lock:
            for p in dict.fromkeys(prompts):
                cache[p] = self._encode_text(p, device)[: sampling.max_sequence_length].to(dtype)
            if sampling.guidance_scale > 1:
                neg = self._encode_text(sampling.negative_prompt, device)[: sampling.max_sequence_length].to(dtype)
        prompt_embeds, prompt_mask = stack_padded([cache[p] for p in prompts])
        env = {
            "prompt_embeds": prompt_embeds,
            "prompt_embeds_mask": prompt_mask,
            "negative_prompt_embeds": None,
            "negative_prompt_embeds_mask": None,
        }
        if sampling.guidance_scale > 1:
            env["negative_prompt_embeds"], env["negative_prompt_embeds_mask"] = stack_padded([neg] * len(prompts))
        return env

    def _encode_text(self, text: str, device: torch.device) -> torch.Tensor:
        """``[S, E]`` Qwen2.5-VL embedding of one text alone (through :attr:`prompt_cache` when set)."""

        def encode() -> torch.Tensor:
            return self._get_qwen_prompt_embeds([text], device=device)[0][0]

        return encode() if self.prompt_cache is None else self.prompt_cache.get_or_compute(("qwenimage", text), encode)

    def prepare_rollout_latents(
        self, generators: Sequence[torch.Generator], height: int, width: int, device: torch.device
    ) -> torch.Tensor:
        """``[B, L, D]`` float32 packed initial noise; row ``b`` drawn at full shape from ``generators[b]``."""
        return qwenimage_initial_latents(
            generators, self.transformer.config.in_channels, height, width, self.vae_scale_factor, device
        )

    def request_scheduler(
        self, num_steps: int, *, image_seq_len: int, device: torch.device
    ) -> FlowMatchSDEDiscreteScheduler:
        """A scheduler for one request (see :func:`qwenimage_scheduler`)."""
        return qwenimage_scheduler(self.scheduler, num_steps, image_seq_len=image_seq_len, device=device)

    def decode_latents(self, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """``[B, L, D]`` packed latents to ``[B, 3, H, W]`` float32 images in ``[0, 1]``."""
        with self._stateful_stage_lock:
            return decode_packed_latents(self, latents, height, width)


def decode_packed_latents(pipe, latents: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Qwen-Image's decode on any pipeline with its components (``vae``, ``_unpack_latents``, ``vae_scale_factor``;
    diffusers' pipeline or vllm-omni's, which has no ``image_processor``): ``[B, L, D]`` packed latents to
    ``[B, 3, H, W]`` float32 images in ``[0, 1]``."""
    from diffusers.image_processor import VaeImageProcessor

    x = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor).to(pipe.vae.dtype)
    z_dim = pipe.vae.config.z_dim
    mean = torch.tensor(pipe.vae.config.latents_mean).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    inv_std = 1.0 / torch.tensor(pipe.vae.config.latents_std).view(1, z_dim, 1, 1, 1).to(x.device, x.dtype)
    x = x / inv_std + mean
    image = pipe.vae.decode(x, return_dict=False)[0][:, :, 0]
    processor = getattr(pipe, "image_processor", None) or VaeImageProcessor(vae_scale_factor=pipe.vae_scale_factor * 2)
    return processor.postprocess(image, output_type="pt").float()
