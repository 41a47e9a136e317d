"""Configuration dataclasses without verl: sampling, LoRA sync and server limits, and the attention backends.

``DiffusionSamplingConfig``, ``LoRASyncConfig`` and ``ServerLimits`` are plain dataclasses, so the sampler core
(``sde``, ``scheduler``, ``pipelines``, ``engines``) imports without verl. The rollout and model configs,
``DiffusionRolloutConfig`` and ``DiffusionModelConfig``, subclass verl's own ``RolloutConfig`` and ``HFModelConfig``
(every verl code path that reads those keeps working) and are registered in Hydra's ConfigStore; they live in
:mod:`verl_diffusion_rollout.verl_config`, which imports this module (never the other way round). Invalid values
raise ``ValueError`` naming the key, at construction time.
"""

from __future__ import annotations

import json
import math
import os
import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, Optional

from .sde import SDE_TYPES, default_log_prob_no_const

__all__ = [
    "ATTENTION_BACKENDS",
    "DiffusionSamplingConfig",
    "LoRASyncConfig",
    "ServerLimits",
    "QWEN_IMAGE_ATTENTION_MODULES",
    "attention_heads",
    "check_heads",
]

# ``rollout.attention_backend``: which scaled-dot-product-attention kernels the transformer may use
# (:func:`verl_diffusion_rollout.pipelines.loop.attention_backend` applies it).
ATTENTION_BACKENDS: tuple[str, ...] = ("auto", "default", "cudnn", "flash", "efficient", "math")

# The 8 attention projections of a Qwen-Image double-stream block (image and text streams).
QWEN_IMAGE_ATTENTION_MODULES: list[str] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
]


def _plain(value: Any) -> Any:
    """OmegaConf containers to plain Python lists/dicts (configs arrive from Hydra as DictConfig/ListConfig)."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# Upper bounds of the sampling values. FlowGRPO samples SD3/Qwen-Image with noise_level 0.7 (up to ~1.2 in its
# other recipes), and for cps the std sigma'*sin(eta*pi/2) repeats itself beyond eta = 1; a bound one order of
# magnitude above keeps every experiment possible while refusing values that only overflow (1e308 -> NaN).
# Guidance scales in the recipes are 1-10 (Qwen-Image 4, SD3 4.5-7).
MAX_NOISE_LEVEL = 10.0
MAX_GUIDANCE_SCALE = 100.0


def _set(obj: Any, name: str, value: Any) -> None:
    """Normalize a field inside ``__post_init__`` (also on verl's BaseConfig, which freezes fields once set)."""
    object.__setattr__(obj, name, value)


def attention_heads(model_path: str) -> int:
    """The transformer's attention heads, from ``model_path/transformer/config.json`` (no weights are read)."""
    path = os.path.join(str(model_path), "transformer", "config.json")
    if not os.path.isfile(path):
        raise ValueError(f"{str(model_path)!r} has no transformer/config.json")
    with open(path, encoding="utf-8") as f:
        heads = json.load(f).get("num_attention_heads")
    if not _is_int(heads) or heads < 1:
        raise ValueError(f"{path} has no valid num_attention_heads (got {heads!r})")
    return heads


def check_heads(size: int, heads: int, key: str = "sequence parallel size") -> None:
    """``ValueError`` naming both numbers unless the sequence-parallel ``size`` divides the attention ``heads``
    (Ulysses attention gives each rank ``heads / size`` of them)."""
    if not _is_int(size) or size < 1:
        raise ValueError(f"{key} must be an int >= 1, got {size!r}")
    if heads % size:
        raise ValueError(
            f"{key}={size} does not divide the transformer's {heads} attention heads (Ulysses attention gives each "
            f"rank heads / {size}); use a divisor of {heads}"
        )


@dataclass
class DiffusionSamplingConfig:
    """How one rollout batch is sampled.

    Attributes:
        height, width: image size in pixels (multiples of the VAE factor times 2; 16 for Qwen-Image).
        num_steps: number of denoising steps ``T``.
        guidance_scale: true classifier-free guidance scale; 1.0 turns CFG off.
        negative_prompt: the negative prompt used when ``guidance_scale > 1``.
        sde_type: ``"sde"``, ``"cps"`` or ``"ode"``.
        noise_level: ``eta`` of the stochastic steps.
        sde_window: explicit step indices that are stochastic; ``None`` uses ``sde_window_size``.
        sde_window_size: when > 0 and ``sde_window`` is None, this many consecutive stochastic steps starting at a
            random index drawn from ``sde_window_range`` (FlowGRPO's window); 0 means every step but the last.
        sde_window_range: ``[lo, hi]``: the window lies inside steps ``lo .. hi - 1``.
        log_prob_no_const: drop the Gaussian constants from log-probs; ``None`` follows FlowGRPO per sde_type.
        return_debug: also return ``prev_sample_mean``, ``noise_std``, ``variance_noise``, ``model_output``.
        max_sequence_length: prompt tokens kept after the chat template (Qwen-Image: at most 1024).
        batch_cfg: run the conditional and unconditional passes in one batched forward.
        text_token_multiple: the transformer sees the text tokens right-padded (masked) to a multiple of this many;
            the rollout and the replay pad alike. 8 puts every prompt length on one side of the compiler's
            ``% 8`` alignment guards, so a compiled run cannot split its graphs by text length. 1: no padding.
            Families with a fixed text length (SD3) are unaffected.
    """

    _target_: str = ""  # lets Hydra YAML name the class (as verl's BaseConfig does)
    height: int = 512
    width: int = 512
    num_steps: int = 10
    guidance_scale: float = 4.0
    negative_prompt: str = " "
    sde_type: str = "sde"
    noise_level: float = 0.7
    sde_window: Optional[list[int]] = None
    sde_window_size: int = 0
    sde_window_range: Optional[list[int]] = None
    log_prob_no_const: Optional[bool] = None
    return_debug: bool = False
    max_sequence_length: int = 512
    batch_cfg: bool = True
    text_token_multiple: int = 1

    def __post_init__(self) -> None:
        prefix = "sampling."
        for name in ("height", "width", "num_steps", "sde_window_size", "max_sequence_length", "text_token_multiple"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{prefix}{name} must be an int, got {value!r}")
        for name in ("noise_level", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{prefix}{name} must be a number, got {value!r}")
        # Booleans must be booleans: the string "false" is truthy and would silently mean True.
        for name in ("return_debug", "batch_cfg"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{prefix}{name} must be true or false, got {getattr(self, name)!r}")
        if self.log_prob_no_const is not None and not isinstance(self.log_prob_no_const, bool):
            raise ValueError(
                f"{prefix}log_prob_no_const must be true, false or null, got {self.log_prob_no_const!r}"
            )
        if not isinstance(self.sde_type, str):
            raise ValueError(f"{prefix}sde_type must be one of {list(SDE_TYPES)}, got {self.sde_type!r}")
        if self.height < 1 or self.width < 1:
            raise ValueError(f"{prefix}height and {prefix}width must be >= 1, got {self.height}x{self.width}")
        if self.num_steps < 1:
            raise ValueError(f"{prefix}num_steps must be >= 1, got {self.num_steps}")
        if self.sde_type not in SDE_TYPES:
            raise ValueError(f"{prefix}sde_type must be one of {list(SDE_TYPES)}, got {self.sde_type!r}")
        if not math.isfinite(self.noise_level) or self.noise_level < 0:
            raise ValueError(f"{prefix}noise_level must be finite and >= 0, got {self.noise_level}")
        if self.noise_level > MAX_NOISE_LEVEL:
            raise ValueError(
                f"{prefix}noise_level must be <= {MAX_NOISE_LEVEL} (FlowGRPO samples with 0.7-1.2; cps repeats "
                f"itself beyond 1), got {self.noise_level}"
            )
        if not math.isfinite(self.guidance_scale) or self.guidance_scale < 1:
            raise ValueError(f"{prefix}guidance_scale must be >= 1 (1 disables CFG), got {self.guidance_scale}")
        if self.guidance_scale > MAX_GUIDANCE_SCALE:
            raise ValueError(
                f"{prefix}guidance_scale must be <= {MAX_GUIDANCE_SCALE} (recipes use 1-10), got {self.guidance_scale}"
            )
        if not 1 <= self.text_token_multiple <= 1024:
            raise ValueError(f"{prefix}text_token_multiple must be in 1..1024, got {self.text_token_multiple}")
        if not 1 <= self.max_sequence_length <= 1024:
            raise ValueError(f"{prefix}max_sequence_length must be in 1..1024, got {self.max_sequence_length}")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"{prefix}negative_prompt must be a string, got {self.negative_prompt!r}")
        window = _plain(self.sde_window)
        if window is not None:
            if not isinstance(window, (list, tuple)) or not all(_is_int(i) for i in window):
                raise ValueError(f"{prefix}sde_window must be a list of step indices (ints), got {self.sde_window!r}")
            window = sorted({int(i) for i in window})
            if not window or window[0] < 0 or window[-1] >= self.num_steps:
                raise ValueError(
                    f"{prefix}sde_window must be non-empty step indices in 0..{self.num_steps - 1}, "
                    f"got {self.sde_window!r}"
                )
            _set(self, "sde_window", window)
        if self.sde_window_size < 0 or self.sde_window_size > self.num_steps:
            raise ValueError(f"{prefix}sde_window_size must be in 0..{self.num_steps}, got {self.sde_window_size}")
        window_range = _plain(self.sde_window_range)
        if window_range is not None:
            if not isinstance(window_range, (list, tuple)) or not all(_is_int(i) for i in window_range):
                raise ValueError(f"{prefix}sde_window_range must be [lo, hi] (ints), got {self.sde_window_range!r}")
            window_range = [int(i) for i in window_range]
            if len(window_range) != 2 or not 0 <= window_range[0] < window_range[1] <= self.num_steps:
                raise ValueError(
                    f"{prefix}sde_window_range must be [lo, hi] with 0 <= lo < hi <= {self.num_steps}, "
                    f"got {self.sde_window_range!r}"
                )
            if self.sde_window_size > window_range[1] - window_range[0]:
                raise ValueError(
                    f"{prefix}sde_window_size {self.sde_window_size} does not fit in sde_window_range {window_range}"
                )
            _set(self, "sde_window_range", window_range)

    def replace(self, **overrides: Any) -> DiffusionSamplingConfig:
        """A validated copy with some fields changed; unknown keys raise ``ValueError`` naming them."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown sampling keys {unknown}; known keys: {sorted(known - {'_target_'})}")
        return replace(self, **overrides)

    def stochastic_steps(self, window_seed: int = 0) -> list[int]:
        """Indices of the steps sampled stochastically (empty for ``sde_type == "ode"``).

        Explicit ``sde_window`` wins; else a ``sde_window_size`` window whose start is drawn from
        ``sde_window_range`` with ``random.Random(window_seed)``; else every step but the last (the last step lands
        on the clean image, where the Gaussian is too peaked to train on), or step 0 when ``num_steps == 1``.
        """
        if self.sde_type == "ode":
            return []
        if self.sde_window is not None:
            return list(self.sde_window)
        if self.sde_window_size > 0:
            lo, hi = self.sde_window_range or [0, self.num_steps]
            start = random.Random(window_seed).randint(lo, hi - self.sde_window_size)
            return list(range(start, start + self.sde_window_size))
        return list(range(max(self.num_steps - 1, 1)))

    def resolved_log_prob_no_const(self) -> bool:
        """``log_prob_no_const`` with ``None`` resolved to FlowGRPO's convention for ``sde_type``."""
        if self.log_prob_no_const is None:
            return default_log_prob_no_const(self.sde_type)
        return bool(self.log_prob_no_const)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of the fields (for ``meta_info`` and JSON)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_target_"}


@dataclass
class LoRASyncConfig:
    """The LoRA the rollout expects from the trainer when ``update_weights`` brings no peft config.

    Attributes:
        rank: LoRA rank ``r``; 0 means the rollout receives full weights.
        alpha: LoRA alpha; the update is scaled by ``alpha / rank`` (``alpha / sqrt(rank)`` with rslora).
        target_modules: module-name suffixes the LoRA wraps (peft semantics).
        use_rslora: rank-stabilised scaling.
        merge: sample with ``W + s B A`` kept beside the untouched base weight ``W`` (one rounding from float32
            factors at every sync, so it never drifts; :class:`~verl_diffusion_rollout.lora.layer.MergedLoRALinear`);
            ``False`` keeps peft LoRA layers unmerged (slower sampling, identical kernels
            to a peft trainer).
    """

    _target_: str = ""
    rank: int = 0
    alpha: float = 16.0
    target_modules: list[str] = field(default_factory=lambda: list(QWEN_IMAGE_ATTENTION_MODULES))
    use_rslora: bool = False
    merge: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            raise ValueError(f"lora.rank must be an int >= 0, got {self.rank!r}")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)):
            raise ValueError(f"lora.alpha must be a number, got {self.alpha!r}")
        if not math.isfinite(self.alpha) or self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        for name in ("use_rslora", "merge"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"lora.{name} must be true or false, got {getattr(self, name)!r}")
        modules = _plain(self.target_modules)
        if isinstance(modules, str):
            modules = [modules]
        if not modules or not all(isinstance(m, str) and m for m in modules):
            raise ValueError(f"lora.target_modules must be a non-empty list of names, got {self.target_modules!r}")
        _set(self, "target_modules", list(modules))


@dataclass
class ServerLimits:
    """Bounds of one request to the HTTP rollout server, checked before any work starts (``rollout.server_limits``,
    or the server's command-line flags named in :attr:`FLAGS`).

    The defaults fit the recipes (512-1328 px, groups of 8-24 samples, 10-50 steps) with room to spare.

    Attributes:
        max_request_mb: largest body of a generate (or any non-upload) request, enforced while the body streams in.
        max_update_mb: largest body of ``POST /update_weights`` (a rank-32 Qwen-Image LoRA is 180 MiB in bf16).
        max_samples: most samples per generate request (``len(prompts) * n``).
        max_pixels: most pixels per image (``height * width``); 2**21 admits 1328x1328 and 1664x928, Qwen-Image's
            native sizes.
        max_prompt_chars: longest prompt or negative prompt, in characters (Qwen-Image keeps at most 1024 tokens).
        max_steps: most denoising steps per request.
    """

    _target_: str = ""
    max_request_mb: float = 8.0
    max_update_mb: float = 2048.0
    max_samples: int = 64
    max_pixels: int = 2**21
    max_prompt_chars: int = 4096
    max_steps: int = 100

    FLAGS = {
        "max_request_mb": "--max-request-mb",
        "max_update_mb": "--max-update-mb",
        "max_samples": "--max-samples",
        "max_pixels": "--max-pixels",
        "max_prompt_chars": "--max-prompt-chars",
        "max_steps": "--max-steps",
    }

    def __post_init__(self) -> None:
        for name in ("max_request_mb", "max_update_mb"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"server_limits.{name} must be a number > 0, got {value!r}")
        for name in ("max_samples", "max_pixels", "max_prompt_chars", "max_steps"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"server_limits.{name} must be an int >= 1, got {value!r}")

    @property
    def request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)

    @property
    def update_bytes(self) -> int:
        return int(self.max_update_mb * 2**20)

    def flag(self, name: str) -> str:
        """The server's command-line flag (and the config key) that sets limit ``name``."""
        return f"{self.FLAGS[name]} / rollout.server_limits.{name}"
