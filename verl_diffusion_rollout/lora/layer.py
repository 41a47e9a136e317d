"""The LoRA layers the rollout and the trainer share: peft's ``Linear``, merged or not.

* :class:`MergedLoRALinear` (``rollout.lora.merge=true``, the default): peft's LoRA ``Linear`` that computes
  ``F.linear(x, W_merged)`` with ``W_merged = W + scale * B @ A`` from :func:`merge_weight`: float32 factors, the sum
  taken in float32 and rounded **once** into ``W``'s dtype. ``W`` itself is never written, so re-merging after
  every sync or optimizer step cannot drift. Sampling runs at the speed of the plain model; training gets LoRA's
  low-rank gradients for ``A`` and ``B`` through a custom backward.
* peft's own ``Linear`` (``merge=false``): ``W x + scale * B (A x)``, no extra weight memory, slower sampling.

The rollout's in-memory sync (:mod:`~verl_diffusion_rollout.lora.sync`) and the trainer's policy
(:mod:`~verl_diffusion_rollout.trainer.policy`) build their layers with :func:`lora_layer_config` and
:func:`float32_factors`, so a LoRA synced into a rollout computes bit for bit what the trainer's forward computes.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

__all__ = ["MergedLoRALinear", "merge_weight", "lora_layer_config", "float32_factors", "lora_layers"]


def merge_weight(base: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``base + scale * lora_b @ lora_a`` computed in float32, rounded once to ``base.dtype``.

    Args:
        base: ``[out, in]`` weight, any floating dtype.
        lora_a: ``[r, in]``; lora_b: ``[out, r]`` (float32 masters; other dtypes are upcast exactly).
        scale: ``alpha / r`` (``alpha / sqrt(r)`` with rslora).
    Returns:
        ``[out, in]`` in ``base.dtype`` on ``base.device``.
    """
    delta = (lora_b.float() @ lora_a.float()) * scale
    return (base.float() + delta).to(base.dtype)


class _MergedLoRAFunction(torch.autograd.Function):
    """``y = F.linear(x, merged, bias)``; backward: ``dx = dy @ merged`` and LoRA's low-rank ``dA``, ``dB``.

    The gradient passes straight through the rounding of the merge (``d merged / dA`` is taken as the exact
    ``scale * B`` term), as for any LoRA trained against a merged forward.
    """

    @staticmethod
    def forward(ctx, x, merged, bias, lora_a, lora_b, scale: float):  # noqa: D401
        ctx.scale = scale
        ctx.save_for_backward(x, merged, lora_a, lora_b)
        return F.linear(x, merged, bias)

    @staticmethod
    def backward(ctx, dy):
        x, merged, lora_a, lora_b = ctx.saved_tensors
        dx = dy.matmul(merged) if ctx.needs_input_grad[0] else None
        da = db = None
        if ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:
            # Low-rank products in the activations' dtype (bf16 on GPUs, as under autocast), results in the
            # LoRA parameters' dtype.
            x2 = x.reshape(-1, x.shape[-1])
            dy2 = dy.reshape(-1, dy.shape[-1])
            a = lora_a.to(x2.dtype)
            b = lora_b.to(x2.dtype)
            if ctx.needs_input_grad[4]:
                db = (dy2.t().matmul(x2.matmul(a.t())) * ctx.scale).to(lora_b.dtype)
            if ctx.needs_input_grad[3]:
                da = (dy2.matmul(b).t().matmul(x2) * ctx.scale).to(lora_a.dtype)
        return dx, None, None, da, db, None


class MergedLoRALinear(LoraLinear):
    """peft's LoRA ``Linear`` computing with a kept merged weight (see the module docstring).

    ``merged_weight`` (a non-persistent buffer, so it follows ``.to()`` and stays out of state dicts) holds
    :func:`merge_weight` of the base weight and the active adapter once :meth:`refresh_merged_weight` has run;
    until then, with adapters disabled, or with several adapters, the layer behaves exactly as peft's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("merged_weight", None, persistent=False)

    @torch.no_grad()
    def refresh_merged_weight(self) -> None:
        """Re-derive ``merged_weight`` from the base weight and the current ``A``, ``B``: one rounding, written in
        place once allocated."""
        (adapter,) = self.active_adapters
        weight = self.get_base_layer().weight
        merged = merge_weight(weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.scaling[adapter])
        if self.merged_weight is None or self.merged_weight.shape != merged.shape:
            self.merged_weight = merged
        else:
            self.merged_weight.copy_(merged)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if (
            self.merged_weight is None
            or self.disable_adapters
            or self.merged
            or kwargs.get("adapter_names") is not None
            or len(self.active_adapters) != 1
        ):
            return super().forward(x, *args, **kwargs)
        bias = self.get_base_layer().bias
        if not torch.is_grad_enabled():  # sampling: the plain model's kernel, no autograd bookkeeping
            return F.linear(x, self.merged_weight, bias)
        (adapter,) = self.active_adapters
        return _MergedLoRAFunction.apply(
            x, self.merged_weight, bias, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
        )


def lora_layer_config(lora_config, merged: bool):
    """A copy of a peft ``LoraConfig`` whose injected ``nn.Linear`` layers are :class:`MergedLoRALinear`
    (``merged``) or peft's own ``Linear``; the caller's config is left as it was."""
    config = copy.deepcopy(lora_config)
    if merged:
        config._register_custom_module({nn.Linear: MergedLoRALinear})
    return config


@torch.no_grad()
def float32_factors(layers: Iterable[LoraLinear]) -> list[nn.Parameter]:
    """Make every ``lora_A`` / ``lora_B`` weight of ``layers`` a float32 master (in place); returns them."""
    params = []
    for layer in layers:
        for factors in (layer.lora_A, layer.lora_B):
            for module in factors.values():
                module.weight.data = module.weight.data.float()
                params.append(module.weight)
    return params


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every peft LoRA ``Linear`` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}
