"""In-memory weight sync from the trainer to the rollout's transformer: LoRA or full weights.

Every sync goes validate -> stage -> commit:

1. **validate + stage**: each ``(name, tensor)`` of the trainer's generator is checked (known name, shape,
   floating dtype) and copied into pre-allocated staging memory (the trainer may reuse its buffers between
   yields, so nothing is kept by reference); then the whole update is checked for missing names and NaN/Inf.
   Any failure raises :class:`WeightUpdateError` naming the offending tensor, and the model is untouched.
2. **commit**: the staged values are written in place into memory allocated once at the first sync.

LoRA is applied in one of two ways (``LoRASyncConfig.merge``):

* :class:`MergedLoRA` (default): ``W = W_base + scale * B @ A`` written into the base weights, re-derived from a
  kept copy of ``W_base`` at every sync, so hundreds of syncs never drift and sampling runs at the speed of the
  plain model. Memory: one extra copy of every targeted weight.
* :class:`AdapterLoRA`: peft LoRA layers injected into the transformer (unmerged); a sync copies ``lora_A`` /
  ``lora_B`` in place. Sampling pays the LoRA matmuls, but runs the same kernels as a peft trainer.

For the vllm-omni engine, vllm-omni's ``DiffusionLoRAManager`` only loads adapters from a folder on disk.
:class:`VLLMOmniLoRAPatch` (explicit ``install()``/``uninstall()``, idempotent, version-checked) teaches its
``_load_adapter`` to build the adapter from a :class:`TensorLoRARequest` carrying the tensors and the peft config,
and hands every other request to the original method.

Names are accepted as peft writes them (``get_peft_model_state_dict`` or ``named_parameters``), with or without
the ``base_model.model.`` / ``transformer.`` prefixes and the adapter name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "TensorLoRARequest",
    "VLLMOmniLoRAPatch",
    "validate_lora_tensors",
    "peft_config_dict",
    "WeightUpdateError",
    "LoRASpec",
    "MergedLoRA",
    "AdapterLoRA",
    "FullWeightSync",
    "check_names_and_shapes",
    "canonical_name",
    "is_lora_name",
    "to_lora_config",
]

_PREFIXES = ("base_model.model.", "transformer.")
_ADAPTER_INFIX = re.compile(r"\.(lora_A|lora_B)\.(?!weight$)[^.]+\.weight$")
NamedTensors = Iterable[tuple[str, torch.Tensor]]


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

    from .config import LoRASyncConfig

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
        """Match ``lora_config.target_modules`` against ``model`` with peft's own matching rules."""
        from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists

        lora_config = _maybe_include_all_linear_layers(lora_config, model)
        modules, shapes = [], {}
        for name, module in model.named_modules():
            if not name or not isinstance(module, nn.Linear) or not check_target_module_exists(lora_config, name):
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


class _FlatBuffer:
    """One contiguous allocation holding many named tensors (views), so a whole update is checked in one kernel."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, device: torch.device):
        self.shapes = shapes
        self._bind(torch.zeros(sum(_numel(s) for s in shapes.values()), dtype=dtype, device=device))

    def _bind(self, flat: torch.Tensor) -> None:
        self.flat = flat
        self.views: dict[str, torch.Tensor] = {}
        offset = 0
        for name, shape in self.shapes.items():
            n = _numel(shape)
            self.views[name] = flat[offset : offset + n].view(shape)
            offset += n

    def to(self, device: torch.device) -> None:
        self._bind(self.flat.to(device))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _checked(item: Any, shapes: dict[str, tuple[int, ...]], seen: set[str]) -> tuple[str, torch.Tensor]:
    """One ``(name, tensor)`` of an update, checked against ``shapes``; returns ``(canonical name, tensor)``."""
    if not (isinstance(item, tuple) and len(item) == 2):
        raise WeightUpdateError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}")
    name, tensor = item
    if not isinstance(name, str):
        raise WeightUpdateError(f"weight names must be strings, got {name!r}")
    key = canonical_name(name)
    if key not in shapes:
        raise WeightUpdateError(f"unknown weight {name!r} (as {key!r}); the rollout model has no such tensor")
    if key in seen:
        raise WeightUpdateError(f"weight {name!r} appears twice in one update")
    if not isinstance(tensor, torch.Tensor):
        raise WeightUpdateError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    if tuple(tensor.shape) != tuple(shapes[key]):
        raise WeightUpdateError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(shapes[key])}")
    if not tensor.dtype.is_floating_point:
        raise WeightUpdateError(f"weight {name!r} has dtype {tensor.dtype}, which is not a floating dtype")
    seen.add(key)
    return key, tensor


def _check_complete(seen: set[str], shapes: dict[str, tuple[int, ...]]) -> None:
    missing = [k for k in shapes if k not in seen]
    if missing:
        raise WeightUpdateError(
            f"update is missing {len(missing)} of {len(shapes)} weights, e.g. {missing[:3]}; nothing was applied"
        )


def check_names_and_shapes(weights: Iterable[tuple[str, torch.Tensor]], shapes: dict[str, tuple[int, ...]]) -> None:
    """Check an already materialised update (a list) against ``shapes`` without copying anything.

    Engines call it before allocating staging memory for a new LoRA config, so a request cannot make the rollout
    allocate more than the tensors it actually brings.
    """
    seen: set[str] = set()
    for item in weights:
        _checked(item, shapes, seen)
    _check_complete(seen, shapes)


def _stage(weights: NamedTensors, shapes: dict[str, tuple[int, ...]], dest: dict[str, torch.Tensor]) -> int:
    """Validate each named tensor and copy it into ``dest[name]``; raise on the first bad one or on missing names."""
    seen: set[str] = set()
    for item in weights:
        key, tensor = _checked(item, shapes, seen)
        dest[key].copy_(tensor)
    _check_complete(seen, shapes)
    return len(seen)


def _check_finite(views: dict[str, torch.Tensor], flat: torch.Tensor | None = None) -> None:
    """One reduction over the staged update; only on failure are tensors scanned one by one for the name."""
    tensors = [flat] if flat is not None else list(views.values())
    if all(bool(torch.isfinite(t).all()) for t in tensors):
        return
    _raise_nonfinite(views)


def _raise_nonfinite(views: dict[str, torch.Tensor]) -> None:
    bad = next(name for name, v in views.items() if not bool(torch.isfinite(v).all()))
    raise WeightUpdateError(f"weight {bad!r} contains NaN or Inf; nothing was applied")


def _finite_amax(buffer: _FlatBuffer) -> float:
    """``max |x|`` over a staged update (one reduction, one sync); raises naming the tensor on NaN/Inf."""
    amax = float(buffer.flat.abs().amax()) if buffer.flat.numel() else 0.0
    if not math.isfinite(amax):
        _raise_nonfinite(buffer.views)
    return amax


def _single_placement(layers: dict[str, nn.Linear]) -> tuple[torch.dtype, torch.device]:
    placements = {(layer.weight.dtype, layer.weight.device) for layer in layers.values()}
    if len(placements) != 1:
        raise WeightUpdateError(f"LoRA target weights span several dtypes/devices {sorted(map(str, placements))}")
    return next(iter(placements))


def _amax(tensors: Iterable[torch.Tensor]) -> float:
    values = [t.detach().abs().amax() for t in tensors if t.numel()]
    return float(torch.stack([v.float().cpu() for v in values]).max()) if values else 0.0


class MergedLoRA:
    """LoRA merged into the base weights, re-derived from kept base copies at every commit (no drift).

    All or nothing: :meth:`stage` validates the update and proves that every merged weight ``W_base + s B A`` will
    be finite before :meth:`commit` writes anything. The proof is a bound, ``max|W_base| + |s| r max|A| max|B|``
    below a quarter of the dtype's largest value (two reductions, no extra memory); only when the bound fails are
    the merged weights computed, one layer at a time into a scratch buffer, and checked (one layer of transient
    memory). :meth:`commit` then writes with no way left to fail on the values.
    """

    def __init__(self, model: nn.Module, spec: LoRASpec, base_weights: dict[str, torch.Tensor] | None = None):
        """Allocate staging memory and keep the base weights; writes nothing to ``model``.

        Args:
            model: the transformer.
            spec: the LoRA it receives.
            base_weights: un-merged weights by module name, from a previous :class:`MergedLoRA` (whose merged
                values are in the model); the others are copied from the model.
        """
        self.spec = spec
        self.layers = {name: model.get_submodule(name) for name in spec.modules}
        dtype, device = _single_placement(self.layers)
        self.dtype = dtype
        base_weights = base_weights or {}
        self.base = {
            name: base_weights[name] if name in base_weights else layer.weight.detach().clone()
            for name, layer in self.layers.items()
        }
        self._base_amax = _amax(self.base.values())
        self._pending = _FlatBuffer(spec.shapes, dtype, device)
        self._current = _FlatBuffer(spec.shapes, dtype, device)
        self._pending_amax = 0.0
        self._current_amax = 0.0

    @property
    def extra_bytes(self) -> int:
        """Memory held beyond the model: base copies and two staging buffers."""
        base = sum(t.numel() * t.element_size() for t in self.base.values())
        return base + 2 * self._pending.flat.numel() * self._pending.flat.element_size()

    def stage(self, weights: NamedTensors) -> int:
        """Validate ``weights`` into the pending buffer and check that merging them gives finite weights; returns
        the number of tensors. The model is untouched; raises :class:`WeightUpdateError`."""
        count = _stage(weights, self.spec.shapes, self._pending.views)
        self._pending_amax = _finite_amax(self._pending)
        self._check_merge_finite(self._pending.views, self._base_amax, self._pending_amax, self.base)
        return count

    def commit(self) -> int:
        """Merge the staged LoRA into the weights; returns the number of modules written."""
        written = self._merge(self._pending.views)
        self._pending, self._current = self._current, self._pending
        self._pending_amax, self._current_amax = self._current_amax, self._pending_amax
        return written

    def _bound_holds(self, base_amax: float, lora_amax: float) -> bool:
        bound = base_amax + abs(self.spec.scale) * self.spec.rank * lora_amax * lora_amax
        return math.isfinite(bound) and bound <= torch.finfo(self.dtype).max / 4

    def _check_merge_finite(
        self, views: dict[str, torch.Tensor], base_amax: float, lora_amax: float, bases: dict[str, torch.Tensor]
    ) -> None:
        if self._bound_holds(base_amax, lora_amax):
            return
        for name in bases:
            layer = self.layers[name]
            base = bases[name].to(layer.weight.device)
            merged = torch.addmm(base, views[f"{name}.lora_B.weight"], views[f"{name}.lora_A.weight"], alpha=self.spec.scale)
            if not bool(torch.isfinite(merged).all()):
                raise WeightUpdateError(
                    f"merging the LoRA into {name!r} overflows {self.dtype} (scale {self.spec.scale:g}, "
                    f"max |lora| {lora_amax:g}); nothing was applied"
                )
            del merged

    def _merge(self, views: dict[str, torch.Tensor]) -> int:
        written = 0
        with torch.no_grad():
            for name, layer in self.layers.items():
                a = views[f"{name}.lora_A.weight"]
                b = views[f"{name}.lora_B.weight"]
                torch.addmm(self.base[name], b, a, alpha=self.spec.scale, out=layer.weight.data)
                written += 1
        return written

    def restore(self, modules: Iterable[str] | None = None) -> None:
        """Put the base weights back (the LoRA is removed) in ``modules`` (default: all)."""
        with torch.no_grad():
            for name in self.layers if modules is None else modules:
                self.layers[name].weight.data.copy_(self.base[name])

    def to(self, device: torch.device) -> None:
        """Move the base copies and buffers (with the engine's weights, for sleep/wake)."""
        self.base = {name: t.to(device) for name, t in self.base.items()}
        self._pending.to(device)
        self._current.to(device)

    def check_rebase(self, new_bases: dict[str, torch.Tensor]) -> None:
        """Before a full-weight sync replaces base weights of merged modules: refuse (naming the module) if the
        current LoRA merged into them would not be finite. Writes nothing."""
        if new_bases:
            amax = max(self._base_amax, _amax(new_bases.values()))
            self._check_merge_finite(self._current.views, amax, self._current_amax, new_bases)

    def set_base(self, module: str, weight: torch.Tensor) -> None:
        """Replace a module's base weight (full-weight sync of a LoRA-targeted layer) and re-merge it."""
        with torch.no_grad():
            self.base[module].copy_(weight)
            self._base_amax = max(self._base_amax, float(weight.detach().abs().amax()))
            layer = self.layers[module]
            a = self._current.views[f"{module}.lora_A.weight"]
            b = self._current.views[f"{module}.lora_B.weight"]
            torch.addmm(self.base[module], b, a, alpha=self.spec.scale, out=layer.weight.data)


class AdapterLoRA:
    """LoRA as peft adapter layers in the transformer (unmerged); commits copy ``lora_A``/``lora_B`` in place.

    The adapter layers are injected at the first :meth:`commit`, after the first update has been validated, so a
    rejected first update leaves the model exactly as it was.
    """

    ADAPTER = "default"

    def __init__(self, model: nn.Module, spec: LoRASpec, lora_config: Any):
        self.spec = spec
        self.model = model
        self.lora_config = lora_config
        dtype, device = _single_placement({n: model.get_submodule(n) for n in spec.modules})
        self._pending = _FlatBuffer(spec.shapes, dtype, device)
        self.params: dict[str, torch.Tensor] = {}

    def _inject(self) -> None:
        from peft import inject_adapter_in_model

        inject_adapter_in_model(self.lora_config, self.model, adapter_name=self.ADAPTER)
        for name in self.spec.modules:
            layer = self.model.get_submodule(name)
            self.params[f"{name}.lora_A.weight"] = layer.lora_A[self.ADAPTER].weight
            self.params[f"{name}.lora_B.weight"] = layer.lora_B[self.ADAPTER].weight

    @property
    def extra_bytes(self) -> int:
        lora = sum(p.numel() * p.element_size() for p in self.params.values())
        return lora + self._pending.flat.numel() * self._pending.flat.element_size()

    def to(self, device: torch.device) -> None:
        """The adapter weights move with the model; only the staging buffer is ours to move."""
        self._pending.to(device)

    def stage(self, weights: NamedTensors) -> int:
        count = _stage(weights, self.spec.shapes, self._pending.views)
        _finite_amax(self._pending)
        return count

    def commit(self) -> int:
        if not self.params:
            self._inject()
        names = list(self.spec.shapes)
        with torch.no_grad():
            torch._foreach_copy_([self.params[n].data for n in names], [self._pending.views[n] for n in names])
        return len(self.spec.modules)


class FullWeightSync:
    """Full (non-LoRA) weight updates: staged on the host, then copied in place into the parameters."""

    def __init__(self, model: nn.Module, lora: MergedLoRA | AdapterLoRA | None = None):
        self.model = model
        self.lora = lora
        self.params: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if is_lora_name(name):
                continue
            self.params[canonical_name(name)] = param
        self.shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self._staged: dict[str, torch.Tensor] | None = None

    def stage(self, weights: NamedTensors) -> dict[str, torch.Tensor]:
        """Validate and copy the update to host memory (one copy of the model on the CPU, allocated once); with a
        merged LoRA, also check that re-merging it into the new base weights stays finite. Model untouched."""
        if self._staged is None:
            self._staged = {n: torch.empty(s, dtype=self.params[n].dtype) for n, s in self.shapes.items()}
        _stage(weights, self.shapes, self._staged)
        _check_finite(self._staged)
        if isinstance(self.lora, MergedLoRA):
            merged = set(self.lora.spec.modules)
            self.lora.check_rebase({
                name.rsplit(".", 1)[0]: value for name, value in self._staged.items()
                if name.endswith(".weight") and name.rsplit(".", 1)[0] in merged
            })
        return self._staged

    def commit(self, staged: dict[str, torch.Tensor]) -> int:
        merged_modules = set(self.lora.spec.modules) if isinstance(self.lora, MergedLoRA) else set()
        with torch.no_grad():
            for name, value in staged.items():
                module = name.rsplit(".", 1)[0]
                if module in merged_modules and name.endswith(".weight"):
                    self.lora.set_base(module, value.to(self.params[name].device))
                else:
                    self.params[name].data.copy_(value)
        return len(staged)


def iter_with_first(weights: NamedTensors) -> tuple[tuple[str, torch.Tensor] | None, Iterator]:
    """Peek at the first item of a (possibly one-shot) generator; returns it and an iterator over everything."""
    it = iter(weights)
    first = next(it, None)
    if first is None:
        return None, iter(())

    def chained():
        yield first
        yield from it

    return first, chained()


# -- vllm-omni ------------------------------------------------------------------------------------------------------


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


def validate_lora_tensors(weights: NamedTensors, rank: int) -> dict[str, torch.Tensor]:
    """Check a LoRA update without a model at hand (the vllm-omni engine's model lives in its workers).

    Every module needs both factors, ``lora_A`` ``[rank, in]`` and ``lora_B`` ``[out, rank]``, floating and finite.
    Returns CPU copies under canonical names (``<module>.lora_A.weight``); raises :class:`WeightUpdateError`
    naming the offending tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    for item in weights:
        if not (isinstance(item, tuple) and len(item) == 2):
            raise WeightUpdateError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        key = canonical_name(name)
        if not is_lora_name(key) or not key.endswith(".weight"):
            raise WeightUpdateError(f"weight {name!r} is not a LoRA factor (<module>.lora_A/lora_B.weight)")
        if key in tensors:
            raise WeightUpdateError(f"weight {name!r} appears twice in one update")
        if not isinstance(tensor, torch.Tensor) or not tensor.dtype.is_floating_point or tensor.ndim != 2:
            raise WeightUpdateError(f"weight {name!r} must be a 2-D floating tensor, got {getattr(tensor, 'shape', tensor)}")
        tensors[key] = tensor.detach().to("cpu", copy=True)
    if not tensors:
        raise WeightUpdateError("empty weight update: the generator yielded no tensors")
    modules = {k.rsplit(".lora_", 1)[0] for k in tensors}
    for module in sorted(modules):
        a, b = tensors.get(f"{module}.lora_A.weight"), tensors.get(f"{module}.lora_B.weight")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            raise WeightUpdateError(f"module {module!r} has no {missing} in the update")
        if a.shape[0] != rank or b.shape[1] != rank:
            raise WeightUpdateError(
                f"module {module!r}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not have rank {rank}"
            )
    for key, tensor in tensors.items():
        if not bool(torch.isfinite(tensor).all()):
            raise WeightUpdateError(f"weight {key!r} contains NaN or Inf; nothing was applied")
    return tensors


_TENSOR_REQUEST_CLASS = None


def _tensor_lora_request_class():
    """``TensorLoRARequest``, defined on first use (it subclasses vLLM's ``LoRARequest``)."""
    global _TENSOR_REQUEST_CLASS
    if _TENSOR_REQUEST_CLASS is None:
        import msgspec
        from vllm.lora.request import LoRARequest

        class TensorLoRARequest(LoRARequest):
            """A vLLM ``LoRARequest`` whose adapter travels in memory: the peft config and the tensors.

            ``lora_path`` is only a label (``vdr://memory/...``); nothing is read from disk.
            """

            peft_config: dict | None = msgspec.field(default=None)
            lora_tensors: dict | None = msgspec.field(default=None)

        TensorLoRARequest.__module__ = __name__
        _TENSOR_REQUEST_CLASS = TensorLoRARequest
    return _TENSOR_REQUEST_CLASS


def __getattr__(name: str) -> Any:
    if name == "TensorLoRARequest":
        return _tensor_lora_request_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class VLLMOmniLoRAPatch:
    """Teaches vllm-omni's ``DiffusionLoRAManager._load_adapter`` to load a :class:`TensorLoRARequest`.

    ``install()`` swaps in :meth:`_load_adapter` (it builds the adapter with vLLM's own ``PEFTHelper.from_dict`` and
    ``LoRAModel.from_lora_tensors`` and refuses adapters whose modules the pipeline cannot take); requests that are
    not ``TensorLoRARequest`` go to the original method untouched. ``uninstall()`` restores the original.
    Both are idempotent, and the class works as a context manager. The patch checks the installed vllm-omni
    version and the signature of the method it replaces, and refuses to patch anything it does not know.
    """

    SUPPORTED_VERSIONS: tuple[str, ...] = ("0.30.",)
    EXPECTED_PARAMETERS: tuple[str, ...] = ("self", "lora_request")
    _original = None

    @classmethod
    def check_compatible(cls, versions: tuple[str, ...] | None = None) -> None:
        """Raise ``RuntimeError`` unless the installed vllm-omni is one this patch was written for."""
        import inspect

        import vllm_omni
        from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

        version = getattr(vllm_omni, "__version__", "unknown")
        allowed = cls.SUPPORTED_VERSIONS if versions is None else versions
        if not any(version.startswith(v) for v in allowed):
            raise RuntimeError(
                f"vllm-omni {version} is not a version the in-memory LoRA patch supports ({list(allowed)}); "
                "pin vllm-omni==0.30.0 (see README, 'Choosing an engine')"
            )
        target = cls._original or DiffusionLoRAManager._load_adapter
        params = tuple(inspect.signature(target).parameters)
        if params != cls.EXPECTED_PARAMETERS:
            raise RuntimeError(
                f"vllm-omni {version}: DiffusionLoRAManager._load_adapter{params} is not the expected "
                f"{cls.EXPECTED_PARAMETERS}; refusing to patch"
            )

    @classmethod
    def installed(cls) -> bool:
        return cls._original is not None

    @classmethod
    def install(cls, versions: tuple[str, ...] | None = None) -> None:
        """Patch ``DiffusionLoRAManager._load_adapter`` (no-op when already installed)."""
        if cls._original is not None:
            return
        cls.check_compatible(versions)
        from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

        cls._original = DiffusionLoRAManager._load_adapter
        DiffusionLoRAManager._load_adapter = cls._load_adapter

    @classmethod
    def uninstall(cls) -> None:
        """Restore the original ``_load_adapter`` (no-op when not installed)."""
        if cls._original is None:
            return
        from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

        DiffusionLoRAManager._load_adapter = cls._original
        cls._original = None

    def __enter__(self) -> VLLMOmniLoRAPatch:
        self.install()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()

    @staticmethod
    def _load_adapter(manager: Any, lora_request: Any):
        """The patched ``DiffusionLoRAManager._load_adapter(self, lora_request)``."""
        if not isinstance(lora_request, _tensor_lora_request_class()):
            return VLLMOmniLoRAPatch._original(manager, lora_request)
        from vllm.lora.lora_model import LoRAModel
        from vllm.lora.peft_helper import PEFTHelper

        expected = getattr(manager, "_expected_lora_modules", None)
        if not expected:
            raise WeightUpdateError("the diffusion pipeline has no module that can take a LoRA")
        tensors = dict(lora_request.lora_tensors or {})
        modules = sorted({canonical_name(k).rsplit(".lora_", 1)[0] for k in tensors})
        unsupported = [m for m in modules if m.rsplit(".", 1)[-1] not in expected]
        if not modules or unsupported:
            raise WeightUpdateError(
                f"LoRA update names modules the pipeline cannot take: {unsupported[:3] or '(none at all)'}; "
                f"supported module names: {sorted(expected)}"
            )
        # The same refusals as every other path (DoRA, rank/alpha patterns...): vLLM would apply some and not others.
        to_lora_config(dict(lora_request.peft_config or {}))
        peft_helper = PEFTHelper.from_dict(dict(lora_request.peft_config or {}))
        # Copies: vLLM scales lora_B in place (optimize()), which must not touch the sender's tensors.
        lora_model = LoRAModel.from_lora_tensors(
            lora_model_id=lora_request.lora_int_id,
            tensors={canonical_name(k): v.detach().to("cpu", copy=True) for k, v in tensors.items()},
            peft_helper=peft_helper,
            device="cpu",
            dtype=manager.dtype,
            model_vocab_size=None,
            weights_mapper=None,
        )
        if len(lora_model.loras) != len(modules):
            raise WeightUpdateError(
                f"LoRA model holds {len(lora_model.loras)} modules for the {len(modules)} the update names"
            )
        for lora in lora_model.loras.values():
            lora.optimize()
        return lora_model, peft_helper
