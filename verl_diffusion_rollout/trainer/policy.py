"""The trained policy: the rollout engine's own transformer with a trainable LoRA, shared by sampling and training.

One transformer serves both jobs, so nothing is copied between a rollout copy and a trainer copy. Two ways to
carry the LoRA (``rollout.lora.merge``):

* merged (default): every targeted ``nn.Linear`` becomes a :class:`~verl_diffusion_rollout.lora.layer.MergedLoRALinear`
  (the layer the rollout's in-memory sync uses too), which computes
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
from typing import Any

import torch
from torch import nn

from ..lora.layer import MergedLoRALinear, float32_factors, lora_layer_config, lora_layers
from .block_checkpointing import DEFAULT_CHECKPOINT_MEMORY_FRACTION, BlockCheckpointing, MemoryPlan
from .checkpoint import check_lora_keys

__all__ = ["MergedLoRALinear", "SharedPolicy", "lora_layers"]


class SharedPolicy:
    """A transformer given a trainable LoRA in place; the same module keeps sampling.

    Args:
        transformer: the rollout engine's transformer (``DiffusersEngine.attach_trainer()``).
        lora_config: a peft ``LoraConfig`` (vanilla LoRA: no DoRA, no dropout, no bias, no rank/alpha patterns).
        merged: carry the LoRA as :class:`MergedLoRALinear` (default) or as peft's unmerged layers.
        gradient_checkpointing: recompute blocks' activations in the backward pass instead of keeping them.
        checkpoint_blocks: with ``gradient_checkpointing``, how many of ``transformer.transformer_blocks`` are
            recomputed (the first ones); the others keep their activations, trading memory for the recompute's
            time. ``None``: every block. ``"auto"`` (CUDA only): at every forward, as few as keep the peak under
            ``checkpoint_memory_fraction`` of the device's memory (:class:`~.block_checkpointing.MemoryPlan`).
        checkpoint_memory_fraction: with ``checkpoint_blocks="auto"``, the share of the device's memory a forward
            and its backward may fill.
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
        checkpoint_blocks: int | str | None = None,
        checkpoint_memory_fraction: float = DEFAULT_CHECKPOINT_MEMORY_FRACTION,
        seed: int = 0,
        config_key: str = "actor_rollout_ref.model.target_modules",
    ):
        _check_vanilla_lora(lora_config)
        blocks = list(getattr(transformer, "transformer_blocks", []))
        if checkpoint_blocks == "auto":
            # before the adapter: a CPU policy or one without blocks is refused with nothing changed
            if not blocks:
                raise ValueError(f"actor_rollout_ref.actor.checkpoint_blocks=auto plans transformer_blocks; "
                                 f"{type(transformer).__name__} has none")
            device = next(transformer.parameters()).device
            plan = MemoryPlan.for_device(device, len(blocks), checkpoint_memory_fraction)
        elif checkpoint_blocks is not None and not 0 <= checkpoint_blocks <= len(blocks):
            raise ValueError(f"actor_rollout_ref.actor.checkpoint_blocks={checkpoint_blocks} is not in "
                             f"[0, {len(blocks)}]: {type(transformer).__name__} has {len(blocks)} transformer blocks")
        targets = lora_config.target_modules
        targets = sorted(targets) if isinstance(targets, (set, list, tuple)) else targets
        self.transformer = transformer
        self.lora_config = lora_config
        self.merged = merged
        transformer.requires_grad_(False)
        with torch.random.fork_rng(devices=_cuda_devices(transformer)):
            torch.manual_seed(seed)
            try:
                transformer.add_adapter(lora_layer_config(lora_config, merged))
            except ValueError as err:  # peft: "Target modules ... not found in the base model"
                raise ValueError(f"{config_key}={targets!r} match no module of "
                                 f"{type(transformer).__name__}: {err}") from err
        self.layers = lora_layers(transformer)
        if not self.layers:
            raise ValueError(f"{config_key}={targets!r} match no nn.Linear of "
                             f"{type(transformer).__name__}")
        float32_factors(self.layers.values())  # trainable master weights in float32 whatever the model dtype
        self.named_params: dict[str, nn.Parameter] = {
            name: p for name, p in transformer.named_parameters() if p.requires_grad
        }
        self.params = list(self.named_params.values())
        # which blocks recompute (None: diffusers' own checkpointing of every block)
        self.checkpointing: BlockCheckpointing | None = None
        if gradient_checkpointing:
            if checkpoint_blocks == "auto":
                self.checkpointing = BlockCheckpointing(blocks, len(blocks), plan)
            elif checkpoint_blocks is not None and checkpoint_blocks != len(blocks):
                self.checkpointing = BlockCheckpointing(blocks, checkpoint_blocks)
            transformer.enable_gradient_checkpointing(self.checkpointing)
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
