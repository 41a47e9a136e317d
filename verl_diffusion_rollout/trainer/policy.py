"""The trained policy: the rollout engine's own transformer with a trainable LoRA, shared by sampling and training.

One transformer serves both jobs, so nothing is copied between a rollout copy and a trainer copy. Two ways to
carry the LoRA (``rollout.lora.merge``):

* merged (default): every targeted ``nn.Linear`` becomes a :class:`MergedLoRALinear`, which computes
  ``F.linear(x, W_merged)`` with ``W_merged = W + scale * B @ A`` rounded once to ``W``'s dtype and kept next to
  the untouched base weight ``W``. Sampling runs at the speed of the plain model; training gets LoRA's low-rank
  gradients for ``A`` and ``B`` through a custom backward. The merged weights are re-derived from ``W`` after
  every optimizer step (no drift), at the cost of one extra copy of the targeted weights.
* unmerged: peft's own LoRA layers (``base(x) + scale * B(A(x))``); no extra weight memory, slower sampling.

Either way the rollout and the trainer's replay evaluate the same module on the same tensors, so the replayed
log-probs equal the rollout's. The reference policy (KL) is the same module with its adapters disabled.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear
from torch import nn

from .checkpoint import check_lora_keys

__all__ = ["MergedLoRALinear", "SharedPolicy", "lora_layers"]


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
    ``W + scale * B @ A`` in ``W``'s dtype once :meth:`refresh_merged_weight` has run; until then, with adapters
    disabled, or with several adapters, the layer behaves exactly as peft's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("merged_weight", None, persistent=False)

    @torch.no_grad()
    def refresh_merged_weight(self) -> None:
        """Re-derive ``merged_weight`` from the base weight and the current ``A``, ``B`` (one rounding)."""
        (adapter,) = self.active_adapters
        weight = self.get_base_layer().weight
        delta = self.get_delta_weight(adapter)
        merged = (weight.to(delta.dtype) + delta).to(weight.dtype)
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
        (adapter,) = self.active_adapters
        return _MergedLoRAFunction.apply(
            x,
            self.merged_weight,
            self.get_base_layer().bias,
            self.lora_A[adapter].weight,
            self.lora_B[adapter].weight,
            float(self.scaling[adapter]),
        )


def lora_layers(model: nn.Module) -> dict[str, LoraLinear]:
    """Every peft LoRA ``Linear`` of ``model`` by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLinear)}


class SharedPolicy:
    """A transformer given a trainable LoRA in place; the same module keeps sampling.

    Args:
        transformer: the rollout engine's transformer (``DiffusersEngine.attach_trainer()``).
        lora_config: a peft ``LoraConfig`` (vanilla LoRA: no DoRA, no dropout, no bias, no rank/alpha patterns).
        merged: carry the LoRA as :class:`MergedLoRALinear` (default) or as peft's unmerged layers.
        gradient_checkpointing: recompute each block's activations in the backward pass.
        seed: seeds the LoRA initialisation (``A`` random, ``B`` zero: the first policy is the base model).
        config_key: the config key naming ``lora_config.target_modules``, for error messages.
    """

    def __init__(
        self,
        transformer: nn.Module,
        lora_config,
        *,
        merged: bool = True,
        gradient_checkpointing: bool = False,
        seed: int = 0,
        config_key: str = "actor_rollout_ref.model.target_modules",
    ):
        _check_vanilla_lora(lora_config)
        targets = lora_config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        self.transformer = transformer
        self.lora_config = lora_config
        self.merged = merged
        if merged:
            lora_config._register_custom_module({nn.Linear: MergedLoRALinear})
        transformer.requires_grad_(False)
        with torch.random.fork_rng(devices=_cuda_devices(transformer)):
            torch.manual_seed(seed)
            try:
                transformer.add_adapter(lora_config)
            except ValueError as err:  # peft: "Target modules ... not found in the base model"
                raise ValueError(f"{config_key}={targets!r} match no module of "
                                 f"{type(transformer).__name__}: {err}") from err
        self.layers = lora_layers(transformer)
        if not self.layers:
            raise ValueError(f"{config_key}={targets!r} match no nn.Linear of "
                             f"{type(transformer).__name__}")
        # Trainable master weights in float32 whatever the model dtype.
        self.named_params: dict[str, nn.Parameter] = {
            name: p for name, p in transformer.named_parameters() if p.requires_grad
        }
        for p in self.named_params.values():
            p.data = p.data.float()
        self.params = list(self.named_params.values())
        if gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.eval()  # no dropout anywhere: sampling and training compute the same function
        self.refresh()

    # -- the LoRA as the sampler sees it ------------------------------------------------------------------------

    @torch.no_grad()
    def refresh(self) -> None:
        """Re-derive the merged weights from the base weights and the current LoRA (after an optimizer step)."""
        if self.merged:
            for layer in self.layers.values():
                layer.refresh_merged_weight()

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """The reference policy: the same transformer with its LoRA switched off."""
        self.transformer.disable_adapters()
        try:
            yield
        finally:
            self.transformer.enable_adapters()

    @property
    def extra_bytes(self) -> int:
        """Memory held for the LoRA beyond the base model: merged weights and the LoRA parameters."""
        merged = sum(
            layer.merged_weight.numel() * layer.merged_weight.element_size()
            for layer in self.layers.values()
            if getattr(layer, "merged_weight", None) is not None
        )
        return merged + sum(p.numel() * p.element_size() for p in self.params)

    # -- state ------------------------------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The LoRA tensors named as peft's ``get_peft_model_state_dict`` names them (detached, on their device)."""
        from peft import get_peft_model_state_dict

        return {k: v.detach() for k, v in get_peft_model_state_dict(self.transformer).items()}

    def expected_shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: tuple(v.shape) for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], source: str = "the update") -> None:
        """Set the LoRA from ``state`` (peft names); every name and shape is checked before anything is written."""
        current = self.state_dict()
        check_lora_keys({k: v.shape for k, v in current.items()}, state, source)
        bad = [k for k, v in state.items() if not torch.isfinite(v).all()]
        if bad:
            raise ValueError(f"{source}: LoRA tensor {bad[0]!r} contains NaN or Inf")
        for key, value in current.items():
            value.copy_(state[key])
        self.refresh()

    def checksum(self) -> str:
        """SHA-256 of the LoRA parameters' bytes (equal on every worker when they hold identical weights)."""
        digest = hashlib.sha256()
        for name in sorted(self.named_params):
            digest.update(name.encode())
            digest.update(self.named_params[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()


def _cuda_devices(model: nn.Module) -> list[int]:
    return sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})


def _check_vanilla_lora(config) -> None:
    """The policy supports plain LoRA; anything else is refused rather than trained wrongly."""
    problems = []
    if getattr(config, "use_dora", False):
        problems.append("use_dora=True")
    if getattr(config, "lora_dropout", 0.0):
        problems.append(f"lora_dropout={config.lora_dropout} (sampling and training must compute the same function)")
    if getattr(config, "bias", "none") != "none":
        problems.append(f"bias={config.bias!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        if getattr(config, key, None):
            problems.append(f"{key}={getattr(config, key)!r}")
    if problems:
        raise ValueError("the FlowGRPO policy trains plain LoRA; unsupported: " + ", ".join(problems))
