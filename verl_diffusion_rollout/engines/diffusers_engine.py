"""``DiffusersEngine``: the embedded default engine, a diffusers log-prob pipeline in this process (CPU or GPU)."""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from ..config import DiffusionSamplingConfig, LoRASyncConfig, attention_heads, check_heads
from ..contract import RolloutBatch
from ..errors import EngineAsleep, NonFiniteOutput
from ..lora.config import LoRASpec, WeightUpdateError, is_lora_name, to_lora_config
from ..lora.sync import FullWeightSync, LoRASync, check_names_and_shapes, iter_with_first
from ..parallel import SequenceParallel
from ..pipelines import get_pipeline_class, pipeline_class_name
from ..pipelines.compile import compile_blocks
from ..pipelines.components import load_pipeline, loaded_modules
from ..pipelines.loop import run_denoise
from ..pipelines.prompt_cache import PromptEmbeddingCache
from ..scheduler import FlowMatchSDEDiscreteScheduler
from ..serialization import weights_sha256
from ..stages import DenoisedBatch, Role, check_role_serves, parse_role
from .base import DiffusionEngine, ReadWriteLock, check_finite_batch, expand_group_request

__all__ = ["DiffusersEngine", "resolve_device", "resolve_dtype"]

PROMPT_CACHE_MB = 256.0  # default budget of the per-engine cache of prompt embeddings

logger = logging.getLogger(__name__)


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but CUDA is not available")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bfloat16"`` / ``torch.bfloat16`` -> ``torch.bfloat16`` (float32, bfloat16 and float16 accepted)."""
    if isinstance(dtype, torch.dtype):
        resolved = dtype
    else:
        resolved = getattr(torch, str(dtype).replace("torch.", ""), None)
    if resolved not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    return resolved


def _lora_key(lora_config: Any) -> tuple:
    targets = lora_config.target_modules
    targets = tuple(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets
    return (lora_config.r, float(lora_config.lora_alpha), targets, bool(lora_config.use_rslora))


class DiffusersEngine(DiffusionEngine):
    """Loads a diffusers checkpoint folder and serves rollouts from it.

    Args:
        model_path: a diffusers folder (``model_index.json`` at its root), e.g. ``Qwen/Qwen-Image`` downloaded.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        dtype: weights' dtype (``torch.float32`` by default; ``torch.bfloat16`` on GPUs).
        seed: seeds the engine's generator of per-sample seeds when a request brings none.
        lora: the LoRA expected from the trainer when ``update_weights`` gets no ``peft_config``.
        progress_bar: show the per-step progress bar while sampling.
        compile: ``torch.compile`` each transformer block (regional compilation, GPU), the text length dynamic
            (:func:`~verl_diffusion_rollout.pipelines.compile.compile_blocks`).
        attention_backend: attention kernels on CUDA (see ``pipelines.loop.attention_backend``).
        fast_attention: let the model family swap in its faster attention processor, if it has one
            (:meth:`~verl_diffusion_rollout.pipelines.loop.DenoisingFamily.use_fast_attention`; Qwen-Image's computes
            the same function with real-valued RoPE that ``torch.compile`` fuses; SD3 keeps diffusers' processors).
        role: which stages this engine loads and serves (:class:`~verl_diffusion_rollout.stages.Role`):
            ``"monolithic"`` (every module, the default), ``"encoder"`` (text encoders and tokenizers: :meth:`encode`),
            ``"denoiser"`` (transformer and scheduler: :meth:`denoise`, weight updates), ``"decoder"`` (VAE:
            :meth:`decode`). The other modules are never read from disk.
        prompt_cache_mb: budget of the cache of per-prompt text embeddings (each distinct prompt is encoded once
            while it stays cached; the text encoders are frozen); 0 turns it off.
        sequence_parallel: the group this engine shares every transformer forward with (Ulysses sequence
            parallelism, :mod:`verl_diffusion_rollout.parallel`); every rank of it must make the same calls with the
            same requests, and each returns the full result. ``None`` or a group of 1: no sequence parallelism (and
            no trace of it in the model). Only for roles that load the transformer.
    """

    def __init__(
        self,
        model_path: str,
        device: str | torch.device | None = "cpu",
        dtype: str | torch.dtype = torch.float32,
        *,
        seed: int = 0,
        lora: LoRASyncConfig | None = None,
        progress_bar: bool = False,
        compile: bool = False,
        attention_backend: str = "auto",
        fast_attention: bool = True,
        role: Role | str = Role.MONOLITHIC,
        prompt_cache_mb: float = PROMPT_CACHE_MB,
        sequence_parallel: SequenceParallel | None = None,
    ):
        self.model_path = str(model_path)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype)
        self._role = parse_role(role)
        if isinstance(prompt_cache_mb, bool) or not isinstance(prompt_cache_mb, (int, float)) or not prompt_cache_mb >= 0:
            raise ValueError(f"prompt_cache_mb must be a number >= 0, got {prompt_cache_mb!r}")
        pipeline_cls = get_pipeline_class(pipeline_class_name(self.model_path))
        if sequence_parallel is not None and sequence_parallel.size > 1:
            if self._role not in (Role.MONOLITHIC, Role.DENOISER):
                raise ValueError(
                    f"sequence_parallel (size {sequence_parallel.size}) splits the transformer, which the "
                    f"{self._role.value!r} role does not load; use it with the denoiser or monolithic role"
                )
            check_heads(sequence_parallel.size, attention_heads(self.model_path), "ulysses_sequence_parallel_size")
        else:
            sequence_parallel = None
        self.sequence_parallel = sequence_parallel
        pipe = load_pipeline(pipeline_cls, self.model_path, self._role, self.dtype)
        if pipe.scheduler is not None:
            pipe.scheduler = FlowMatchSDEDiscreteScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=not progress_bar)
        pipe.attention_backend = attention_backend
        pipe.prompt_cache = PromptEmbeddingCache(int(prompt_cache_mb * 2**20)) if prompt_cache_mb else None
        self.pipe = pipe.to(self.device)
        self._modules = loaded_modules(pipe)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.eval().requires_grad_(False)
        has_transformer = pipe.transformer is not None
        self.attn_processor = pipe.family.use_fast_attention(pipe.transformer) if fast_attention and has_transformer else None
        # Sequence parallelism: every forward of the transformer (rollout, replay, update) runs on this rank's token
        # shards; its collectives must come in the same order on every rank, so generations run one at a time.
        self.sp_handle = None
        self._sp_serial: contextlib.AbstractContextManager = contextlib.nullcontext()
        if sequence_parallel is not None:
            self.sp_handle = pipe.family.use_sequence_parallel(pipe.transformer, sequence_parallel)
            self._sp_serial = threading.Lock()
        # One graph per forward shape whatever the prompt lengths, so the replay runs the graph that sampled.
        self.compiled = None
        if compile and has_transformer:
            self.compiled = compile_blocks(pipe.transformer, pipe.family.prepare_block_inputs)
        self.lora_defaults = lora or LoRASyncConfig()
        self._rng = random.Random(seed)
        self._lock = ReadWriteLock()
        self._version = 0
        self._lora: LoRASync | None = None
        self._lora_key: tuple | None = None
        self._full: FullWeightSync | None = None
        self._sleeping = False
        self._trainer_attached = False
        self.last_sync_s: float | None = None

    # -- DiffusionEngine ------------------------------------------------------------------------------------------

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def transformer(self) -> torch.nn.Module:
        return self.pipe.transformer

    @property
    def is_sleeping(self) -> bool:
        return self._sleeping

    @property
    def role(self) -> Role:
        return self._role

    @property
    def modules(self) -> tuple[str, ...]:
        return self._modules

    @property
    def family(self) -> str:
        return self.pipe.family.name

    def generate(
        self,
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> RolloutBatch:
        """Sample ``n`` images per prompt; see :class:`~verl_diffusion_rollout.contract.RolloutBatch`.

        ``cancel`` is polled before every denoising step (:class:`~verl_diffusion_rollout.errors.GenerationCancelled`
        once it returns True). Raises :class:`~verl_diffusion_rollout.errors.EngineAsleep` while asleep and
        :class:`~verl_diffusion_rollout.errors.NonFiniteOutput` instead of returning NaN/Inf.
        """
        check_role_serves(self._role, "generate", self._modules)
        request = expand_group_request(prompts, seeds, n, self._rng)
        sampling = _check_sampling(sampling)
        with self._lock.read():
            self._check_awake("generate")
            with self._sp_serial:
                batch = self.pipe(
                    request.prompts, seeds=request.seeds, sampling=sampling, window_seed=window_seed, cancel=cancel
                )
            batch.weight_version = self._version
        check_finite_batch(batch)
        return batch

    def update_weights(self, weights: Iterable[tuple[str, torch.Tensor]], peft_config: Any = None) -> int:
        """Apply a LoRA (names with ``lora_A``/``lora_B``) or a full-weight update, all or nothing.

        The first LoRA sync creates the adapter from ``peft_config`` (a peft ``LoraConfig`` or dict; verl passes
        the trainer's) or from the engine's ``lora`` defaults. Raises :class:`WeightUpdateError` naming the
        offending tensor or config key; on any error the weights and ``weight_version`` stay as they were: every
        check (names, shapes, dtypes, NaN/Inf, finiteness of the merged weights) runs before the first write.
        """
        if self._trainer_attached:
            raise WeightUpdateError(
                "a trainer trains this engine's transformer in place (attach_trainer); it has no weights to receive"
            )
        check_role_serves(self._role, "weights", self._modules)
        start = time.perf_counter()
        first, stream = iter_with_first(weights)
        if first is None:
            raise WeightUpdateError("empty weight update: the generator yielded no tensors")
        is_lora = isinstance(first, tuple) and len(first) == 2 and is_lora_name(str(first[0]))
        # The config is validated before waiting for the lock: a bad one never blocks generations.
        lora_config = to_lora_config(peft_config, self.lora_defaults) if is_lora else None
        materialised = weights if isinstance(weights, (list, tuple)) else None
        with self._lock.write():
            if is_lora:
                self._apply_lora(stream, lora_config, materialised)
            else:
                self._apply_full(stream)
            self._version += 1
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
        self.last_sync_s = time.perf_counter() - start
        return self._version

    def _apply_lora(self, stream: Iterable, lora_config: Any, materialised: Sequence | None) -> None:
        """Stage and check everything, then write (the writes cannot fail on the values). A new LoRA config
        builds a new :class:`LoRASync`, which replaces the previous one's layers only when it commits."""
        transformer = self.pipe.transformer
        key = _lora_key(lora_config)
        lora = self._lora
        if lora is None or key != self._lora_key:
            spec = LoRASpec.from_model(transformer, lora_config)
            if materialised is not None:  # nothing is allocated for tensors the update does not bring
                check_names_and_shapes(materialised, spec.shapes)
            lora = LoRASync(transformer, spec, lora_config, merged=self.lora_defaults.merge, replaces=self._lora)
        lora.stage(stream)
        lora.commit()
        self._lora, self._lora_key, self._full = lora, key, None

    def _apply_full(self, stream: Iterable) -> None:
        if self._full is None:
            self._full = FullWeightSync(self.pipe.transformer, self._lora)
        staged = self._full.stage(stream)
        self._full.commit(staged)

    # -- the stages one at a time (roles) -------------------------------------------------------------------------

    def encode(
        self, prompts: Sequence[str], sampling: DiffusionSamplingConfig | None = None
    ) -> dict[str, torch.Tensor | None]:
        """The denoising environment of ``prompts``, one row per prompt (CPU tensors, the family's keys; see
        :func:`~verl_diffusion_rollout.stages.expand_env`). Needs the ``encoder`` or ``monolithic`` role."""
        check_role_serves(self._role, "encode", self._modules)
        sampling = _check_sampling(sampling)
        prompts = self.pipe.check_text_inputs(prompts, sampling)
        with self._lock.read():
            self._check_awake("encode")
            env = self.pipe.encode_denoising_env(prompts, sampling, self.pipe._execution_device)
        return {key: None if value is None else value.cpu() for key, value in env.items()}

    def denoise(
        self,
        env: Mapping[str, torch.Tensor | None],
        prompts: Sequence[str],
        seeds: Sequence[int] | None = None,
        sampling: DiffusionSamplingConfig | None = None,
        n: int = 1,
        window_seed: int | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> DenoisedBatch:
        """Sample ``n`` per prompt from encoded prompts: ``env`` has one row per entry of ``prompts`` (as
        :meth:`encode` returns it); the result is what :meth:`generate` returns without the images, bit for bit.

        The embeddings are checked first (keys, shapes, dtype, finiteness: ``ValueError`` naming the key and the
        expected shape); a refused request draws no seeds and changes nothing. Needs the ``denoiser`` or
        ``monolithic`` role.
        """
        check_role_serves(self._role, "denoise", self._modules)
        sampling = _check_sampling(sampling)
        prompts = list(prompts)
        self.pipe.check_denoise_inputs(env, len(prompts), sampling)
        request = expand_group_request(prompts, seeds, n, self._rng)
        with self._lock.read():
            self._check_awake("denoise")
            with self._sp_serial:
                batch = run_denoise(
                    self.pipe, env, n, request.prompts, request.seeds, sampling, window_seed=window_seed, cancel=cancel
                )
            batch.weight_version = self._version
        check_finite_batch(batch)
        return batch

    def decode(self, latents: torch.Tensor, sampling: DiffusionSamplingConfig | None = None) -> torch.Tensor:
        """``[B, 3, H, W]`` float32 images in [0, 1] (CPU) of final latents as a denoiser returns them
        (:attr:`DenoisedBatch.final_latents`), decoded in one VAE batch as :meth:`generate` decodes. Needs the
        ``decoder`` or ``monolithic`` role."""
        check_role_serves(self._role, "decode", self._modules)
        sampling = _check_sampling(sampling)
        self.pipe.check_decode_inputs(latents, sampling)
        with self._lock.read():
            self._check_awake("decode")
            images = self.pipe.decode_latents(latents.to(self.pipe._execution_device), sampling.height, sampling.width)
        images = images.cpu()
        if not bool(torch.isfinite(images).all()):
            raise NonFiniteOutput("the decode produced NaN/Inf images; nothing is returned")
        return images

    def _check_awake(self, what: str) -> None:
        if self._sleeping:
            raise EngineAsleep(f"the engine is asleep (weights released); call wake_up() before {what}()")

    # -- a trainer training this engine's transformer in place ------------------------------------------------------

    def attach_trainer(self, autograd_stochastic_steps: bool | None = None) -> torch.nn.Module:
        """Hand the transformer to a co-located trainer that trains it in place (one copy of the weights).

        With ``autograd_stochastic_steps`` (default: on accelerators) the stochastic steps of a rollout run the
        transformer with autograd enabled, exactly as the trainer's replay runs it, so both execute the same kernels
        (compiled autograd graphs and GPU attention kernels differ from inference ones) and the replayed log-probs
        equal the rollout's. On the CPU the eager kernels do not depend on autograd, and inference mode is faster.
        The trainer changes the weights only inside
        :meth:`modify_weights`. In-memory syncs (:meth:`update_weights`) are refused from then on: the trainer
        owns the weights.
        """
        check_role_serves(self._role, "weights", self._modules)
        if self._lora is not None or self._full is not None:
            raise RuntimeError("attach_trainer() must come before any update_weights(): the engine already holds synced weights")
        if autograd_stochastic_steps is None:
            autograd_stochastic_steps = self.device.type != "cpu"
        self.pipe.stochastic_steps_with_grad = bool(autograd_stochastic_steps)
        self._trainer_attached = True
        return self.pipe.transformer

    @contextlib.contextmanager
    def modify_weights(self) -> Iterator[None]:
        """Exclusive access for an in-place change of the weights (an attached trainer's update): waits for running
        generations, blocks new ones, and on success bumps :attr:`weight_version`."""
        with self._lock.write():
            yield
            self._version += 1

    def sleep(self) -> None:
        """Move every weight (and LoRA bookkeeping) to the CPU and free the accelerator memory."""
        with self._lock.write():
            if self._sleeping:
                return
            if self.pipe.prompt_cache is not None:  # cached embeddings live on the device
                self.pipe.prompt_cache.clear()
            if self.device.type != "cpu":
                self._move_to(torch.device("cpu"))
                torch.cuda.empty_cache()
            self._sleeping = True

    def wake_up(self) -> None:
        """Bring the weights back to the engine's device."""
        with self._lock.write():
            if not self._sleeping:
                return
            if self.device.type != "cpu":
                self._move_to(self.device)
            self._sleeping = False

    def weights_checksum(self, module_names: Sequence[str] | None = None) -> dict[str, str]:
        """SHA-256 of the live parameters of the pipeline's modules (``transformer``, ``vae``, ``text_encoder``...),
        merged LoRA included, taken under the read lock so no update lands halfway."""
        with self._lock.read():
            modules = {name: m for name, m in self.pipe.components.items() if isinstance(m, torch.nn.Module)}
            names = list(modules) if module_names is None else list(module_names)
            return {
                name: weights_sha256(modules[name].named_parameters()) if name in modules else "not_found"
                for name in names
            }

    def _move_to(self, device: torch.device) -> None:
        self.pipe.to(device)
        if self._lora is not None:
            self._lora.to(device)

    def close(self) -> None:
        with self._lock.write():
            self._lora = None
            self._full = None
            self.pipe = None
            if self.device.type == "cuda":
                torch.cuda.empty_cache()


def _check_sampling(sampling: DiffusionSamplingConfig | None) -> DiffusionSamplingConfig:
    sampling = sampling or DiffusionSamplingConfig()
    if not isinstance(sampling, DiffusionSamplingConfig):
        raise ValueError(f"sampling must be a DiffusionSamplingConfig, got {type(sampling).__name__}")
    return sampling
