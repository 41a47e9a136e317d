"""In-memory weight sync from the trainer to the rollout's transformer: LoRA or full weights.

Every sync goes validate -> stage -> commit:

1. **validate + stage**: each ``(name, tensor)`` of the trainer's generator is checked (known name, shape,
   floating dtype) and copied into staging memory allocated once (the trainer may reuse its buffers between
   yields, so nothing is kept by reference); then the whole update is checked for missing names and NaN/Inf,
   and, for merged layers, for merged weights that would overflow the model's dtype. Any failure raises
   :class:`~verl_diffusion_rollout.lora.config.WeightUpdateError` naming the offending tensor; the model is
   untouched.
2. **commit**: the staged values are written in place into memory allocated at the first sync.

A LoRA lives in the transformer as the layers of :mod:`~verl_diffusion_rollout.lora.layer`, the very layers the
trainer trains: :class:`~verl_diffusion_rollout.lora.layer.MergedLoRALinear` (``LoRASyncConfig.merge``, default;
``W + s B A`` rounded once from float32 factors into a buffer beside the untouched ``W``) or peft's own ``Linear``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import LoRASpec, WeightUpdateError, canonical_name, is_lora_name
from .layer import MergedLoRALinear, float32_factors, lora_layer_config, merge_weight

__all__ = [
    "LoRASync",
    "FullWeightSync",
    "check_names_and_shapes",
    "validate_lora_tensors",
    "iter_with_first",
]

NamedTensors = Iterable[tuple[str, torch.Tensor]]


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


def _checked(item: Any, shapes: dict[str, tuple[int, ...]] | None, seen: set[str]) -> tuple[str, torch.Tensor]:
    """One ``(name, tensor)`` of an update, checked; returns ``(canonical name, tensor)``.

    With ``shapes`` the name must be one of its keys and the tensor that shape; without (no model at hand), the
    name must be a LoRA factor (``<module>.lora_A/lora_B.weight``) and the tensor 2-D. Either way the tensor must
    be floating and the name new to this update. Raises :class:`WeightUpdateError` naming the tensor.
    """
    if not (isinstance(item, tuple) and len(item) == 2):
        raise WeightUpdateError(f"weights must yield (name, tensor) pairs, got {type(item).__name__}")
    name, tensor = item
    if not isinstance(name, str):
        raise WeightUpdateError(f"weight names must be strings, got {name!r}")
    key = canonical_name(name)
    if shapes is None:
        if not is_lora_name(key) or not key.endswith(".weight"):
            raise WeightUpdateError(f"weight {name!r} is not a LoRA factor (<module>.lora_A/lora_B.weight)")
    elif key not in shapes:
        raise WeightUpdateError(f"unknown weight {name!r} (as {key!r}); the rollout model has no such tensor")
    if key in seen:
        raise WeightUpdateError(f"weight {name!r} appears twice in one update")
    if not isinstance(tensor, torch.Tensor):
        raise WeightUpdateError(f"weight {name!r} is a {type(tensor).__name__}, not a torch.Tensor")
    expected = shapes[key] if shapes is not None else None
    if expected is not None and tuple(tensor.shape) != tuple(expected):
        raise WeightUpdateError(f"weight {name!r} has shape {tuple(tensor.shape)}, expected {tuple(expected)}")
    if expected is None and tensor.ndim != 2:
        raise WeightUpdateError(f"weight {name!r} must be a 2-D LoRA factor, got shape {tuple(tensor.shape)}")
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


def validate_lora_tensors(weights: NamedTensors, rank: int) -> dict[str, torch.Tensor]:
    """Check a LoRA update without a model at hand (the vllm-omni engine's model lives in its workers).

    Every module needs both factors, ``lora_A`` ``[rank, in]`` and ``lora_B`` ``[out, rank]``, floating and finite.
    Returns CPU copies under canonical names (``<module>.lora_A.weight``); raises :class:`WeightUpdateError`
    naming the offending tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    for item in weights:
        key, tensor = _checked(item, None, set(tensors))
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
    _check_finite(tensors)
    return tensors


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
    """The one (dtype, device) of the targeted weights; refuses weights spread over several."""
    placements = {(layer.weight.dtype, layer.weight.device) for layer in layers.values()}
    if len(placements) != 1:
        raise WeightUpdateError(f"LoRA target weights span several dtypes/devices {sorted(map(str, placements))}")
    return next(iter(placements))


def _amax(tensors: Iterable[torch.Tensor]) -> float:
    values = [t.detach().abs().amax() for t in tensors if t.numel()]
    return float(torch.stack([v.float().cpu() for v in values]).max()) if values else 0.0


def _base_linear(module: nn.Module) -> nn.Module:
    """The ``nn.Linear`` a peft layer wraps (a previous sync's), or the module itself."""
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


class LoRASync:
    """A LoRA carried by peft layers in the transformer, written by validate -> stage -> commit.

    ``merged``: the layers are :class:`MergedLoRALinear` (sampling at the plain model's speed, one extra copy of
    every targeted weight); otherwise peft's ``Linear``. The factors are float32 masters either way, as the
    trainer's. The layers are injected at the first :meth:`commit`, after the first update has been validated,
    so a rejected first update leaves the model exactly as it was; ``replaces`` (the sync of a previous LoRA
    config) is unwrapped at that moment too, and not before.

    All or nothing: for merged layers :meth:`stage` also proves every ``W + s B A`` finite in the model's dtype.
    The proof is a bound, ``max|W| + |s| r max|A| max|B|`` below a quarter of the dtype's largest value (two
    reductions); only when it fails are the merged weights computed, one layer at a time, and checked.
    """

    ADAPTER = "default"

    def __init__(self, model: nn.Module, spec: LoRASpec, lora_config: Any, *, merged: bool = True,
                 replaces: LoRASync | None = None):
        self.model = model
        self.spec = spec
        self.merged = merged
        self.lora_config = lora_layer_config(lora_config, merged)
        self._replaces = replaces
        bases = {name: _base_linear(model.get_submodule(name)) for name in spec.modules}
        self.dtype, device = _single_placement(bases)
        self._base_amax = _amax(layer.weight for layer in bases.values()) if merged else 0.0
        self._pending = _FlatBuffer(spec.shapes, torch.float32, device)
        self._pending_amax = self._current_amax = 0.0
        self.layers: dict[str, nn.Module] = {}
        self.params: dict[str, torch.Tensor] = {}

    @property
    def extra_bytes(self) -> int:
        """Memory held beyond the base model: merged weights, the factors and the staging buffer."""
        merged = sum(_nbytes(layer.merged_weight) for layer in self.layers.values()
                     if getattr(layer, "merged_weight", None) is not None)
        return merged + sum(_nbytes(p) for p in self.params.values()) + _nbytes(self._pending.flat)

    def stage(self, weights: NamedTensors) -> int:
        """Validate ``weights`` into the staging buffer (float32) and, for merged layers, check that merging them
        gives finite weights; returns the number of tensors. The model is untouched."""
        count = _stage(weights, self.spec.shapes, self._pending.views)
        self._pending_amax = _finite_amax(self._pending)
        if self.merged and not self._bound_holds(self._base_amax, self._pending_amax):
            bases = {name: _base_linear(self.model.get_submodule(name)).weight for name in self.spec.modules}
            self._check_merge_finite(self._pending.views, bases, self._base_amax, self._pending_amax)
        return count

    def commit(self) -> int:
        """Write the staged LoRA into the layers (and re-merge); returns the number of modules written."""
        if not self.layers:
            self._inject()
        names = list(self.spec.shapes)
        with torch.no_grad():
            torch._foreach_copy_([self.params[n].data for n in names], [self._pending.views[n] for n in names])
        self._current_amax = self._pending_amax
        self.refresh()
        return len(self.spec.modules)

    def refresh(self) -> None:
        """Re-derive every merged weight from its base weight and the current factors (no-op unmerged)."""
        if self.merged:
            for layer in self.layers.values():
                layer.refresh_merged_weight()

    def check_rebase(self, new_bases: dict[str, torch.Tensor]) -> None:
        """Before a full-weight sync replaces base weights of merged modules: refuse (naming the module) if the
        current LoRA merged into them would not be finite. Writes nothing."""
        if self.merged and self.layers and new_bases:
            amax = max(self._base_amax, _amax(new_bases.values()))
            self._check_merge_finite(self.params, new_bases, amax, self._current_amax)

    def rebased(self, new_bases: dict[str, torch.Tensor]) -> None:
        """After a full-weight sync wrote ``new_bases`` (by module): re-merge the LoRA into them."""
        if new_bases:
            self._base_amax = max(self._base_amax, _amax(new_bases.values()))
        self.refresh()

    def remove(self) -> None:
        """Put the plain ``nn.Linear`` modules back in place of the LoRA layers (the LoRA is gone)."""
        for name, layer in self.layers.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent) if parent else self.model, child, layer.get_base_layer())
        if self.layers and hasattr(self.model, "peft_config"):
            del self.model.peft_config
        self.layers, self.params = {}, {}

    def to(self, device: torch.device) -> None:
        """The layers move with the model; only the staging buffer is ours to move (sleep / wake)."""
        self._pending.to(device)

    def _inject(self) -> None:
        from peft import inject_adapter_in_model

        if self._replaces is not None:
            self._replaces.remove()
            self._replaces = None
        inject_adapter_in_model(self.lora_config, self.model, adapter_name=self.ADAPTER)
        layers = {name: self.model.get_submodule(name) for name in self.spec.modules}
        kind = MergedLoRALinear if self.merged else BaseTunerLayer
        wrong = [name for name, layer in layers.items() if not isinstance(layer, kind)]
        if wrong:  # peft matched other modules than LoRASpec did: never sample from a half-applied LoRA
            raise RuntimeError(f"peft did not wrap {wrong[:3]} as {kind.__name__}")
        self.layers = layers
        for param in float32_factors(layers.values()):
            param.requires_grad_(False)  # the rollout samples; the trainer owns the gradients
        for name, layer in layers.items():
            self.params[f"{name}.lora_A.weight"] = layer.lora_A[self.ADAPTER].weight
            self.params[f"{name}.lora_B.weight"] = layer.lora_B[self.ADAPTER].weight

    def _bound_holds(self, base_amax: float, lora_amax: float) -> bool:
        bound = base_amax + abs(self.spec.scale) * self.spec.rank * lora_amax * lora_amax
        return math.isfinite(bound) and bound <= torch.finfo(self.dtype).max / 4

    @torch.no_grad()
    def _check_merge_finite(self, factors: dict[str, torch.Tensor], bases: dict[str, torch.Tensor],
                            base_amax: float, lora_amax: float) -> None:
        if self._bound_holds(base_amax, lora_amax):
            return
        for name, base in bases.items():
            a, b = factors[f"{name}.lora_A.weight"], factors[f"{name}.lora_B.weight"]
            merged = merge_weight(base.to(a.device), a, b, self.spec.scale)
            if not bool(torch.isfinite(merged).all()):
                raise WeightUpdateError(
                    f"merging the LoRA into {name!r} overflows {self.dtype} (scale {self.spec.scale:g}, "
                    f"max |lora| {lora_amax:g}); nothing was applied"
                )
            del merged


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class FullWeightSync:
    """Full (non-LoRA) weight updates: staged on the host, then copied in place into the parameters.

    With a LoRA synced in (``lora``), the base weights of its layers are written under their plain names
    (``<module>.weight``; peft's ``.base_layer.`` is dropped) and a merged LoRA is re-merged into them.
    """

    def __init__(self, model: nn.Module, lora: LoRASync | None = None):
        self.model = model
        self.lora = lora
        self.params: dict[str, torch.Tensor] = {}
        for name, param in model.named_parameters():
            if is_lora_name(name):
                continue
            self.params[canonical_name(name)] = param
        self.shapes = {name: tuple(p.shape) for name, p in self.params.items()}
        self._staged: dict[str, torch.Tensor] | None = None

    def _lora_bases(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``{module: new base weight}`` for the LoRA's modules among ``tensors`` (by canonical name)."""
        if self.lora is None:
            return {}
        return {m: tensors[f"{m}.weight"] for m in self.lora.spec.modules if f"{m}.weight" in tensors}

    def stage(self, weights: NamedTensors) -> dict[str, torch.Tensor]:
        """Validate and copy the update to host memory (one copy of the model on the CPU, allocated once); with a
        merged LoRA, also check that re-merging it into the new base weights stays finite. Model untouched."""
        if self._staged is None:
            self._staged = {n: torch.empty(s, dtype=self.params[n].dtype) for n, s in self.shapes.items()}
        _stage(weights, self.shapes, self._staged)
        _check_finite(self._staged)
        if self.lora is not None:
            self.lora.check_rebase(self._lora_bases(self._staged))
        return self._staged

    def commit(self, staged: dict[str, torch.Tensor]) -> int:
        with torch.no_grad():
            for name, value in staged.items():
                self.params[name].data.copy_(value)
        if self.lora is not None:
            self.lora.rebased(self._lora_bases(staged))
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
