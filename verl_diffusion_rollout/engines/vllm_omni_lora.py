"""vllm-omni's adapter loader taught to take a LoRA from memory: :class:`TensorLoRARequest` and its patch.

vllm-omni's ``DiffusionLoRAManager`` only loads adapters from a folder on disk. :class:`VLLMOmniLoRAPatch`
(explicit ``install()`` / ``uninstall()``, idempotent, version-checked) teaches its ``_load_adapter`` to build the
adapter from a :class:`TensorLoRARequest` carrying the tensors and the peft config, and hands every other request
to the original method. Verified against vllm-omni 0.26.0 and 0.30.0 (with vllm 0.26.0 / 0.30.0): the patched
method is ``DiffusionLoRAManager._load_adapter(self, lora_request)`` in both, reading ``self.dtype`` and
``self._expected_lora_modules``, and vLLM's ``PEFTHelper.from_dict`` / ``LoRAModel.from_lora_tensors`` take the
arguments used here.

This module imports vLLM / vllm-omni only inside the functions that need them.
"""

from __future__ import annotations

from typing import Any

from ..lora.config import WeightUpdateError, canonical_name, to_lora_config

__all__ = ["TensorLoRARequest", "VLLMOmniLoRAPatch", "SUPPORTED_VLLM_OMNI_VERSIONS", "check_vllm_omni_version"]

SUPPORTED_VLLM_OMNI_VERSIONS: tuple[str, ...] = ("0.26.", "0.30.")


def check_vllm_omni_version(version: str, allowed: tuple[str, ...] = SUPPORTED_VLLM_OMNI_VERSIONS) -> None:
    """Raise ``RuntimeError`` naming ``version`` unless it is one of the ``allowed`` release series
    (``"0.26."``: any 0.26.x)."""
    if not isinstance(version, str) or not any(version.startswith(v) for v in allowed):
        raise RuntimeError(
            f"vllm-omni {version} is not a version the in-memory LoRA patch supports "
            f"({', '.join(v + 'x' for v in allowed)}); pin vllm-omni==0.30.0 or 0.26.0 (see README, 'Choosing an engine')"
        )


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

    SUPPORTED_VERSIONS: tuple[str, ...] = SUPPORTED_VLLM_OMNI_VERSIONS
    EXPECTED_PARAMETERS: tuple[str, ...] = ("self", "lora_request")
    _original = None

    @classmethod
    def check_compatible(cls, versions: tuple[str, ...] | None = None) -> None:
        """Raise ``RuntimeError`` unless the installed vllm-omni is one this patch was written for."""
        import inspect

        import vllm_omni
        from vllm_omni.diffusion.lora.manager import DiffusionLoRAManager

        version = getattr(vllm_omni, "__version__", "unknown")
        check_vllm_omni_version(version, cls.SUPPORTED_VERSIONS if versions is None else versions)
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
