"""LoRA configs and names: which peft ``LoraConfig`` the rollout applies exactly, and how tensors are named.

:func:`to_lora_config` validates a peft config (a ``LoraConfig``, a dict or our
:class:`~verl_diffusion_rollout.config.LoRASyncConfig`) and refuses, naming the key, every feature the merged or
unmerged layers would not apply exactly. :class:`LoRASpec` is derived once from a config and a model: the targeted
modules and the shape of every factor. Names are accepted as peft writes them (``get_peft_model_state_dict`` or
``named_parameters``), with or without the ``base_model.model.`` / ``transformer.`` prefixes and the adapter name.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from torch import nn

__all__ = [
    "WeightUpdateError",
    "LoRASpec",
    "canonical_name",
    "is_lora_name",
    "to_lora_config",
    "peft_config_dict",
    "MAX_LORA_SCALE",
]

_PREFIXES = ("base_model.model.", "transformer.")
_ADAPTER_INFIX = re.compile(r"\.(lora_A|lora_B)\.(?!weight$)[^.]+\.weight$")


class WeightUpdateError(ValueError):
    """A weight update was rejected before anything was written; the message names the offending tensor."""


def canonical_name(name: str) -> str:
    """``base_model.model.transformer_blocks.0.attn.to_q.lora_A.default.weight`` -> ``transformer_blocks.0.attn.to_q.lora_A.weight``.

    Also strips a ``transformer.`` prefix and peft's ``.base_layer`` wrapper (full weights of a peft model).
    """
    changed = True
    while changed:
        changed = False
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    name = _ADAPTER_INFIX.sub(r".\1.weight", name)
    return name.replace(".base_layer.", ".")


def is_lora_name(name: str) -> bool:
    """Whether a tensor name is a LoRA factor (``lora_A`` / ``lora_B``)."""
    return ".lora_A." in name or ".lora_B." in name


# LoraConfig fields the rollout applies exactly, and fields that only concern initialisation, training or
# bookkeeping (ignored whatever their value). Every other field must keep its default: DoRA, rank/alpha patterns,
# layer selection, extra trained modules... would change the function the trainer optimises, and a rollout that
# silently ignored them would sample from another model. They are refused instead, naming the key.
_APPLIED_FIELDS = frozenset({"r", "lora_alpha", "target_modules", "use_rslora"})
_INERT_FIELDS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision",
    "inference_mode", "lora_dropout", "init_lora_weights", "loftq_config", "eva_config", "corda_config",
    "lora_ga_config", "runtime_config", "megatron_core", "qalora_group_size",
})
_KEY_ALIASES = {"rank": "r", "lora_rank": "r", "alpha": "lora_alpha"}
MAX_LORA_SCALE = 1e4  # alpha / r; recipes use 0.5-4 (rslora: up to ~16). Larger scales only overflow.
MAX_TARGET_MODULES = 1024
_MODULE_NAME = re.compile(r"[A-Za-z0-9_]+(?:\.[A-Za-z0-9_]+)*")


def _unset(value: Any, default: Any) -> bool:
    """Whether a config value leaves a feature off (its default, or an empty/false value)."""
    if value is None or value is False or (isinstance(value, (dict, list, tuple, set)) and not value):
        return True
    try:
        return bool(value == default)
    except Exception:  # noqa: BLE001 - exotic types compare however they like
        return False


def _lora_defaults() -> dict[str, Any]:
    from dataclasses import fields

    from peft import LoraConfig

    reference = LoraConfig()
    return {f.name: getattr(reference, f.name) for f in fields(reference)}


def _check_values(r: Any, alpha: Any, use_rslora: Any) -> float:
    """Validate ``r``, ``lora_alpha`` and ``use_rslora``; returns the scale ``alpha / r`` (``/ sqrt(r)``)."""
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise WeightUpdateError(f"peft_config r (the LoRA rank) must be an int >= 1, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise WeightUpdateError(f"peft_config lora_alpha must be a finite number > 0, got {alpha!r}")
    if not isinstance(use_rslora, bool):
        raise WeightUpdateError(f"peft_config use_rslora must be true or false, got {use_rslora!r}")
    scale = alpha / (math.sqrt(r) if use_rslora else r)
    if not math.isfinite(scale) or scale > MAX_LORA_SCALE:
        raise WeightUpdateError(
            f"peft_config lora_alpha={alpha!r} with r={r} gives the LoRA scale {scale:g}; it must be at most "
            f"{MAX_LORA_SCALE:g} (larger scales overflow the merged weights or the activations)"
        )
    return scale


def _check_targets(targets: Any, from_client: bool) -> list[str] | str:
    """``target_modules``: a list of module names (or, from trusted callers only, a peft regex / 'all-linear')."""
    if isinstance(targets, str):
        if from_client:
            raise WeightUpdateError(
                f"peft_config target_modules must be a list of module names over HTTP, got the string {targets[:80]!r} "
                "(regular expressions are not accepted from clients)"
            )
        return targets
    if not isinstance(targets, (list, tuple, set, frozenset)) or not targets:
        raise WeightUpdateError(f"peft_config target_modules must be a non-empty list of module names, got {targets!r}")
    names = sorted(targets) if isinstance(targets, (set, frozenset)) else list(targets)
    if len(names) > MAX_TARGET_MODULES:
        raise WeightUpdateError(f"peft_config target_modules has {len(names)} names; at most {MAX_TARGET_MODULES}")
    for name in names:
        if not isinstance(name, str) or not name:
            raise WeightUpdateError(f"peft_config target_modules entries must be non-empty strings, got {name!r}")
        if from_client and (len(name) > 256 or not _MODULE_NAME.fullmatch(name)):
            raise WeightUpdateError(
                f"peft_config target_modules entry {name[:80]!r} is not a plain module name (letters, digits, '_' "
                "and '.' only; regular expressions are not accepted from clients)"
            )
    return names


def _check_unsupported(values: dict[str, Any], defaults: dict[str, Any]) -> None:
    for key, value in values.items():
        if key in _APPLIED_FIELDS or key in _INERT_FIELDS:
            continue
        if key not in defaults:
            raise WeightUpdateError(
                f"peft_config key {key!r} is not a peft LoraConfig field; known: {sorted(defaults)}"
            )
        if not _unset(value, defaults[key]):
            raise WeightUpdateError(
                f"peft_config {key}={value!r} is not supported by the rollout's LoRA sync, which applies r, "
                f"lora_alpha, target_modules and use_rslora exactly; refusing rather than sampling from a different "
                f"model (leave {key} at its default {defaults[key]!r})"
            )


def to_lora_config(peft_config: Any, default: Any = None, *, from_client: bool = False):
    """A validated peft ``LoraConfig`` from a ``LoraConfig``, a dict (``LoraConfig.to_dict()`` or our keys) or a
    :class:`~verl_diffusion_rollout.config.LoRASyncConfig`; ``None`` falls back to ``default``.

    ``r`` must be an int >= 1, ``lora_alpha`` finite and > 0 with ``alpha / r <= MAX_LORA_SCALE``; features the
    sync does not apply exactly (``use_dora``, ``rank_pattern``, ``alpha_pattern``, ``layers_to_transform``,
    ``exclude_modules``, ``modules_to_save``, ``lora_bias``, ...) must be left at their defaults. ``from_client``
    (HTTP): ``target_modules`` must be a list of plain module names, no regular expressions. Raises
    :class:`WeightUpdateError` naming the key.
    """
    from peft import LoraConfig

    from ..config import LoRASyncConfig

    cfg = peft_config if peft_config is not None else default
    if cfg is None:
        raise WeightUpdateError(
            "a LoRA update needs its config: pass peft_config= to update_weights or set rollout.lora.rank > 0"
        )
    if isinstance(cfg, LoraConfig):
        from dataclasses import fields

        defaults = _lora_defaults()
        _check_unsupported({f.name: getattr(cfg, f.name) for f in fields(cfg)}, defaults)
        _check_values(cfg.r, cfg.lora_alpha, cfg.use_rslora)
        _check_targets(cfg.target_modules, from_client)
        return cfg
    if isinstance(cfg, LoRASyncConfig):
        if cfg.rank <= 0:
            raise WeightUpdateError("rollout.lora.rank is 0; pass peft_config= with the trainer's LoRA config")
        _check_values(cfg.rank, cfg.alpha, cfg.use_rslora)
        return LoraConfig(
            r=cfg.rank, lora_alpha=cfg.alpha, target_modules=list(cfg.target_modules), use_rslora=cfg.use_rslora
        )
    if isinstance(cfg, dict):
        values: dict[str, Any] = {}
        for key, value in cfg.items():
            if not isinstance(key, str):
                raise WeightUpdateError(f"peft_config keys must be strings, got {key!r}")
            name = _KEY_ALIASES.get(key, key)
            if name in values:
                raise WeightUpdateError(f"peft_config gives {name!r} twice (as {key!r} too)")
            values[name] = value
        missing = [k for k in ("r", "lora_alpha", "target_modules") if values.get(k) is None]
        if missing:
            raise WeightUpdateError(f"peft_config needs r, lora_alpha and target_modules; missing {missing}")
        _check_unsupported(values, _lora_defaults())
        use_rslora = values.get("use_rslora", False)
        _check_values(values["r"], values["lora_alpha"], use_rslora)
        targets = _check_targets(values["target_modules"], from_client)
        return LoraConfig(r=values["r"], lora_alpha=values["lora_alpha"], target_modules=targets, use_rslora=use_rslora)
    raise WeightUpdateError(f"unsupported peft_config type {type(cfg).__name__}")


@dataclass(frozen=True)
class LoRASpec:
    """The LoRA a transformer expects, derived once from a peft config.

    Attributes:
        rank: LoRA rank ``r``.
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
        modules: names of the ``nn.Linear`` modules the LoRA wraps, in model order.
        shapes: ``{"<module>.lora_A.weight": (r, in), "<module>.lora_B.weight": (out, r)}``.
    """

    rank: int
    scale: float
    modules: tuple[str, ...]
    shapes: dict[str, tuple[int, ...]]
    target_modules: Any

    @classmethod
    def from_model(cls, model: nn.Module, lora_config: Any) -> LoRASpec:
        """Match ``lora_config.target_modules`` against ``model`` with peft's own matching rules.

        A module already wrapped by a peft LoRA layer (a previous sync) counts as the ``nn.Linear`` it wraps; the
        wrapper's own submodules (``base_layer``, ``lora_A``...) are never targets.
        """
        from peft.tuners.tuners_utils import BaseTunerLayer, _maybe_include_all_linear_layers, check_target_module_exists

        lora_config = _maybe_include_all_linear_layers(lora_config, model)
        modules, shapes, inside = [], {}, None
        for name, module in model.named_modules():  # pre-order: a wrapper's submodules follow it
            if not name or (inside is not None and name.startswith(inside)):
                continue
            if isinstance(module, BaseTunerLayer):
                inside = f"{name}."
                module = module.get_base_layer()
            if not isinstance(module, nn.Linear) or not check_target_module_exists(lora_config, name):
                continue
            modules.append(name)
            shapes[f"{name}.lora_A.weight"] = (lora_config.r, module.in_features)
            shapes[f"{name}.lora_B.weight"] = (module.out_features, lora_config.r)
        if not modules:
            raise WeightUpdateError(
                f"LoRA target_modules {lora_config.target_modules!r} match no nn.Linear in {type(model).__name__}"
            )
        r = lora_config.r
        scale = lora_config.lora_alpha / (r**0.5 if lora_config.use_rslora else r)
        targets = lora_config.target_modules
        targets = tuple(sorted(targets)) if isinstance(targets, (set, list, tuple)) else targets
        return cls(rank=r, scale=float(scale), modules=tuple(modules), shapes=shapes, target_modules=targets)


def peft_config_dict(peft_config: Any, default: Any = None) -> dict[str, Any]:
    """A JSON-able peft config dict (``r``, ``lora_alpha``, ``target_modules`` as a list...) for vLLM's PEFTHelper."""
    config = to_lora_config(peft_config, default)
    d = config.to_dict()
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, set):
            value = sorted(value)
        elif hasattr(value, "value") and type(value).__module__.startswith("peft"):
            value = value.value
        out[key] = value
    out["target_modules"] = sorted(config.target_modules) if isinstance(config.target_modules, set) else config.target_modules
    return out
