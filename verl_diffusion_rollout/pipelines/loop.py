"""The denoising loop every model family shares, and the small interface a family implements for it.

A rollout is the same for every flow-matching text-to-image model once the text is encoded and the initial noise
drawn: walk the request's sigma schedule, ask the transformer for a velocity at each step, take an ODE step or,
inside the SDE window, a stochastic step with its log-prob, and record the trajectory. :func:`denoise_loop` does
exactly that and nothing model-specific; it takes the velocity as a function of ``(x, t)``.

What differs between families is how the transformer is conditioned and called (CFG style, timestep convention,
extra inputs). A :class:`DenoisingFamily` supplies those two things from the recorded denoising environment, so the
rollout (:mod:`.qwenimage`, :mod:`.sd3`, the vllm-omni pipeline) and the trainer's replay
(:mod:`verl_diffusion_rollout.trainer.replay`) compute the velocity with the same code. Text encoding, initial
noise shape and decoding need the pipeline's other components and stay on each family's log-prob pipeline.
"""

from __future__ import annotations

import contextlib
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config import ATTENTION_BACKENDS, DiffusionSamplingConfig
from ..contract import DEBUG_KEYS, FAMILY_ENV_KEYS, RolloutBatch
from ..errors import GenerationCancelled
from ..scheduler import FlowMatchSDEDiscreteScheduler
from ..sde import randn_per_sample
from ..stages import DenoisedBatch, expand_env

__all__ = [
    "ATTENTION_BACKENDS",
    "DenoisingFamily",
    "Trajectory",
    "TrajectoryRecorder",
    "Velocity",
    "attention_backend",
    "check_prompts",
    "denoise_loop",
    "denoised_batch",
    "per_sample_generators",
    "rollout_batch",
    "run_denoise",
    "run_rollout",
]

# (x [B, ...] float32, t [B] float32 scheduler timesteps) -> velocity [B, ...] in the transformer's dtype
Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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


class DenoisingFamily(ABC):
    """How one model family's transformer is conditioned and called; stateless, one instance per family.

    Used by the family's log-prob pipeline inside :func:`denoise_loop` and by the trainer's replay, which has only
    the transformer and a :class:`~verl_diffusion_rollout.contract.RolloutBatch`.
    """

    name: ClassVar[str]

    @property
    def env_keys(self) -> tuple[str, ...]:
        """The denoising-environment keys of this family (see :data:`~verl_diffusion_rollout.contract.FAMILY_ENV_KEYS`)."""
        return FAMILY_ENV_KEYS[self.name]

    @abstractmethod
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
    ) -> Any:
        """The transformer's conditioning for one batch, prepared once and reused at every step.

        Args:
            env: the denoising environment (:attr:`env_keys`) on the transformer's device.
            guidance_scale: CFG scale; 1 turns CFG off.
            batch_cfg: run the conditional and unconditional passes as one batched forward.
            dtype: the transformer's dtype.
            height, width: image size in pixels.
            latent_shape: ``[B, ...]`` shape of the latents the transformer takes.
            text_token_multiple: pad variable-length text (masked) to a multiple of this many tokens
                (:attr:`~verl_diffusion_rollout.config.DiffusionSamplingConfig.text_token_multiple`).
        """

    @abstractmethod
    def velocity(self, transformer: torch.nn.Module, latents: torch.Tensor, timesteps: torch.Tensor, cond: Any) -> torch.Tensor:
        """The guided velocity for ``latents`` ``[B, ...]`` (any float dtype) at ``timesteps`` ``[B]`` (float32
        scheduler timesteps, ``sigma * 1000``), in the transformer's dtype."""

    def use_fast_attention(self, transformer: torch.nn.Module) -> Any:
        """Swap in a faster attention processor computing the same function; returns a handle with ``remove()``,
        or None when the family has none (its diffusers processors are already compile-friendly)."""
        return None

    def prepare_block_inputs(self, arguments: dict[str, Any]) -> None:
        """Before every call of a compiled transformer block (:func:`~.compile.compile_blocks`), with the call's
        arguments by name: mark the dimensions that vary between requests dynamic, so the first compile builds the
        one graph every request runs. Nothing by default: the family's block inputs have one shape per config
        (SD3's text is always ``77 + max_sequence_length`` tokens)."""

    def use_sequence_parallel(self, transformer: torch.nn.Module, sp: Any) -> Any:
        """Make every forward of ``transformer`` sequence-parallel (Ulysses) over ``sp``
        (a :class:`~verl_diffusion_rollout.parallel.SequenceParallel`): each rank runs its shard of the text and
        image tokens and returns the full output. Returns a handle with ``remove()``."""
        raise NotImplementedError(f"the {self.name} family has no sequence-parallel transformer")


def per_sample_generators(seeds: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample, seeded with its seed: the sample's initial noise and every step's noise come
    from it alone, whatever else is in the batch."""
    return [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]


@dataclass
class Trajectory:
    """What the denoising loop produced (CPU tensors).

    Attributes:
        latents: ``[B, T+1, ...]`` float32, x_T .. x_0.
        log_probs: ``[B, T]`` float32 (0 at deterministic steps).
        sde_mask: ``[B, T]`` bool.
        timesteps: ``[T]`` and sigmas ``[T+1]`` float32, the request's schedule.
        debug: ``prev_sample_mean`` / ``variance_noise`` / ``model_output`` ``[B, T, ...]`` and ``noise_std``
            ``[B, T]`` when ``return_debug``, else empty.
        seconds: wall time of the loop.
        final: ``[B, ...]`` float32 x_0 still on the device (what the VAE decodes).
    """

    latents: torch.Tensor
    log_probs: torch.Tensor
    sde_mask: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    debug: dict[str, torch.Tensor]
    seconds: float
    final: torch.Tensor | None = None


class TrajectoryRecorder:
    """Collects x_T .. x_0 (and debug tensors) on the host.

    On a GPU every step's latent is copied into pinned host memory with a non-blocking copy right after it is
    computed, so the copy overlaps the next transformer forward instead of stalling at the end.
    """

    def __init__(self, x0: torch.Tensor, num_steps: int, debug: bool):
        self.async_copy = x0.device.type == "cuda"
        shape = (x0.shape[0], num_steps + 1, *x0.shape[1:])
        self.host = torch.empty(shape, dtype=torch.float32, pin_memory=self.async_copy)
        self.host[:, 0].copy_(x0, non_blocking=self.async_copy)
        self._debug: dict[str, list[torch.Tensor]] | None = {k: [] for k in DEBUG_KEYS} if debug else None

    def record(self, i: int, x: torch.Tensor, out: Any, velocity: torch.Tensor) -> None:
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


@torch.no_grad()
def denoise_loop(
    velocity: Velocity,
    latents: torch.Tensor,
    scheduler: FlowMatchSDEDiscreteScheduler,
    generators: Sequence[torch.Generator],
    sampling: DiffusionSamplingConfig,
    *,
    window_seed: int,
    cancel: Callable[[], bool] | None = None,
    stochastic_steps_with_grad: bool = False,
    progress_bar: Callable[..., Any] | None = None,
) -> Trajectory:
    """Run the request's schedule from ``latents`` and record the trajectory with per-step log-probs.

    Args:
        velocity: the family's guided velocity as a function of ``(x, t)`` (see :data:`Velocity`).
        latents: ``[B, ...]`` initial noise as the transformer takes it (cast to float32 here).
        scheduler: this request's own scheduler (:meth:`FlowMatchSDEDiscreteScheduler.for_request`), timesteps set.
        generators: one per sample (:func:`per_sample_generators`), already used for the initial noise; every
            stochastic step's noise for sample ``b`` is drawn from ``generators[b]`` alone.
        sampling: ``sde_type``, ``noise_level``, the SDE window, ``log_prob_no_const``, ``return_debug``.
        window_seed: seed of a random SDE window (``sampling.stochastic_steps``).
        cancel: called before every step; True stops the loop with :class:`GenerationCancelled`.
        stochastic_steps_with_grad: compute the velocity of stochastic steps under ``torch.enable_grad()`` (then
            detached), as a trainer that trains this very transformer replays them, so both run the same kernels.
        progress_bar: ``progress_bar(total=T)`` context manager with ``update()`` (a pipeline's ``progress_bar``).

    Returns:
        A :class:`Trajectory`; ``final`` is x_0 on the device.
    """
    device = latents.device
    batch = latents.shape[0]
    if len(generators) != batch:
        raise ValueError(f"got {len(generators)} generators for a batch of {batch} latents")
    x = latents.to(torch.float32)
    num_steps = len(scheduler.timesteps)
    stochastic = set(sampling.stochastic_steps(window_seed))
    no_const = sampling.resolved_log_prob_no_const()

    recorder = TrajectoryRecorder(x, num_steps, sampling.return_debug)
    log_probs = torch.zeros(batch, num_steps, dtype=torch.float32, device=device)
    bar = progress_bar(total=num_steps) if progress_bar is not None else contextlib.nullcontext()
    start = time.perf_counter()
    with bar as bar_handle:
        for i, t in enumerate(scheduler.timesteps):
            if cancel is not None and cancel():
                raise GenerationCancelled(f"generation cancelled before step {i} of {num_steps}")
            grad = stochastic_steps_with_grad and i in stochastic
            with torch.enable_grad() if grad else contextlib.nullcontext():
                v = velocity(x, t.expand(batch))
            v = v.detach()
            if i in stochastic:
                noise = randn_per_sample(x.shape, generators, device=device)
                out = scheduler.step(
                    v, t, x, sde_type=sampling.sde_type, noise_level=sampling.noise_level, noise=noise,
                    log_prob_no_const=no_const,
                )
                log_probs[:, i] = out.log_prob
            else:
                out = scheduler.step(v, t, x)
            x = out.prev_sample.float()
            recorder.record(i, x, out, v)
            if bar_handle is not None:
                bar_handle.update()
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
        seconds=time.perf_counter() - start,
        final=x,
    )


def denoised_batch(
    trajectory: Trajectory,
    env: Mapping[str, torch.Tensor | None],
    *,
    family: str,
    seeds: Sequence[int],
    prompts: list[str],
    sampling: DiffusionSamplingConfig,
    timings: dict[str, float],
) -> DenoisedBatch:
    """What a denoising run produced, as the contract holds it: CPU tensors, the family's environment, per-sample
    schedule rows; everything but the images."""
    batch = len(seeds)
    return DenoisedBatch(
        all_latents=trajectory.latents,
        all_timesteps=trajectory.timesteps.expand(batch, -1).contiguous(),
        all_sigmas=trajectory.sigmas.expand(batch, -1).contiguous(),
        rollout_log_probs=trajectory.log_probs,
        sde_mask=trajectory.sde_mask,
        seeds=torch.tensor([int(s) for s in seeds], dtype=torch.int64),
        prompts=prompts,
        sampling=sampling,
        env={key: None if value is None else value.cpu() for key, value in env.items()},
        family=family,
        debug=trajectory.debug,
        timings=timings,
    )


def rollout_batch(
    trajectory: Trajectory,
    images: torch.Tensor,
    env: Mapping[str, torch.Tensor | None],
    *,
    family: str,
    seeds: Sequence[int],
    prompts: list[str],
    sampling: DiffusionSamplingConfig,
    timings: dict[str, float],
) -> RolloutBatch:
    """The data contract of one rollout: :func:`denoised_batch` with the decoded ``images``."""
    denoised = denoised_batch(
        trajectory, env, family=family, seeds=seeds, prompts=prompts, sampling=sampling, timings=timings
    )
    return denoised.with_images(images.cpu())


# -- the pipelines' shared stages ---------------------------------------------------------------------------------


def check_prompts(prompt: str | Sequence[str]) -> list[str]:
    """A request's prompt(s) as a non-empty list of strings; ``ValueError`` naming the first bad entry."""
    prompts = [prompt] if isinstance(prompt, str) else list(prompt)
    if not prompts:
        raise ValueError("prompt must be a non-empty string or list of strings, got an empty list")
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"every prompt must be a string, got {bad[0]!r}")
    return prompts


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_rollout(
    pipe: Any,
    prompt: str | Sequence[str],
    seeds: Sequence[int],
    sampling: DiffusionSamplingConfig,
    *,
    window_seed: int | None,
    latents: torch.Tensor | None,
    cancel: Callable[[], bool] | None,
) -> RolloutBatch:
    """A log-prob pipeline's ``__call__``: check, encode, denoise, decode, package (any family).

    ``pipe`` provides ``check_rollout_inputs``, ``encode_denoising_env``, ``denoise``, ``decode_latents``,
    ``family`` and ``_execution_device``; returns the :class:`RolloutBatch` with per-stage timings.
    """
    start = time.perf_counter()
    # 1. Check inputs
    prompts = pipe.check_rollout_inputs(prompt, seeds, sampling, latents)
    device = pipe._execution_device
    # 2. Encode prompts: each distinct prompt once, whatever the group size
    env = pipe.encode_denoising_env(prompts, sampling, device)
    _sync(device)
    encode_s = time.perf_counter() - start
    # 3-6. Latents, timesteps, SDE window, denoising loop
    trajectory = pipe.denoise(env, seeds, sampling, window_seed=window_seed, latents=latents, cancel=cancel)
    # 7. Decode, all samples in one VAE batch
    decode_start = time.perf_counter()
    images = pipe.decode_latents(trajectory.final, sampling.height, sampling.width)
    decode_s = time.perf_counter() - decode_start
    timings = {
        "encode_s": encode_s,
        "denoise_s": trajectory.seconds,
        "decode_s": decode_s,
        "total_s": time.perf_counter() - start,
    }
    return rollout_batch(
        trajectory, images, env, family=pipe.family.name, seeds=seeds, prompts=prompts, sampling=sampling,
        timings=timings,
    )


def run_denoise(
    pipe: Any,
    env_rows: Mapping[str, torch.Tensor | None],
    n: int,
    prompts: list[str],
    seeds: Sequence[int],
    sampling: DiffusionSamplingConfig,
    *,
    window_seed: int | None,
    cancel: Callable[[], bool] | None,
) -> DenoisedBatch:
    """A denoiser's rollout from encoded prompts (any family): ``env_rows`` holds one row per prompt, already checked
    (``pipe.check_denoise_inputs``); each row is repeated for its ``n`` samples, then denoised as :func:`run_rollout`
    denoises. ``prompts`` and ``seeds`` have one entry per sample."""
    start = time.perf_counter()
    device = pipe._execution_device
    env = expand_env({key: None if v is None else v.to(device) for key, v in env_rows.items()}, n)
    trajectory = pipe.denoise(env, seeds, sampling, window_seed=window_seed, latents=None, cancel=cancel)
    timings = {"denoise_s": trajectory.seconds, "total_s": time.perf_counter() - start}
    return denoised_batch(
        trajectory, env, family=pipe.family.name, seeds=seeds, prompts=prompts, sampling=sampling, timings=timings
    )


def denoise_encoded(
    pipe: Any,
    env: Mapping[str, torch.Tensor | None],
    seeds: Sequence[int],
    sampling: DiffusionSamplingConfig,
    *,
    image_seq_len: Callable[[torch.Tensor], int],
    window_seed: int | None,
    latents: torch.Tensor | None,
    cancel: Callable[[], bool] | None,
) -> Trajectory:
    """A log-prob pipeline's ``denoise``: initial noise from the seeds, the family's conditioning, the request's
    scheduler (shifted for ``image_seq_len(x)`` image tokens) and :func:`denoise_loop` (any family)."""
    device = pipe._execution_device
    generators = per_sample_generators(seeds)
    if latents is None:
        latents = pipe.prepare_rollout_latents(generators, sampling.height, sampling.width, device)
    x = latents.to(device=device, dtype=torch.float32)
    cond = pipe.family.condition(
        env, guidance_scale=sampling.guidance_scale, batch_cfg=sampling.batch_cfg, dtype=pipe.transformer.dtype,
        height=sampling.height, width=sampling.width, latent_shape=x.shape,
        text_token_multiple=sampling.text_token_multiple,
    )
    scheduler = pipe.request_scheduler(sampling.num_steps, image_seq_len=image_seq_len(x), device=device)
    with attention_backend(pipe.attention_backend, device):
        return denoise_loop(
            lambda xt, t: pipe.family.velocity(pipe.transformer, xt, t, cond),
            x,
            scheduler,
            generators,
            sampling,
            window_seed=int(seeds[0]) if window_seed is None else int(window_seed),
            cancel=cancel,
            stochastic_steps_with_grad=pipe.stochastic_steps_with_grad,
            progress_bar=pipe.progress_bar,
        )
