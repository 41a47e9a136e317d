"""The rollout and model configs, subclasses of verl's own ``RolloutConfig`` and ``HFModelConfig``.

Import them from :mod:`verl_diffusion_rollout.config`; this module is separate because it needs verl.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig
from verl.workers.config import HFModelConfig, RolloutConfig

from .config import (
    ATTENTION_BACKENDS,
    QWEN_IMAGE_ATTENTION_MODULES,
    DiffusionSamplingConfig,
    LoRASyncConfig,
    ServerLimits,
    _plain,
    _set,
)

__all__ = ["DiffusionRolloutConfig", "DiffusionModelConfig", "register_configs", "ENGINES", "DTYPES"]


ENGINES: tuple[str, ...] = ("diffusers", "vllm_omni")
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")


@dataclass
class DiffusionRolloutConfig(RolloutConfig):
    """verl's ``RolloutConfig`` plus what a diffusion rollout needs (``actor_rollout_ref.rollout``).

    Attributes (beyond verl's):
        engine: ``"diffusers"`` (embedded, CPU and GPU) or ``"vllm_omni"`` (optional, GPU).
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``...; ``None`` picks CUDA when available.
        sampling: the default :class:`DiffusionSamplingConfig`; a batch may override fields in ``meta_info``.
        lora: the LoRA the trainer syncs (see :class:`LoRASyncConfig`).
        progress_bar: show diffusers' per-step progress bar while sampling.
        compile: ``torch.compile`` the transformer blocks (regional compile; GPU).
        attention_backend: attention kernels on CUDA: ``auto`` (cuDNN first: 1.5-2.8x faster than PyTorch's pick for
            Qwen-Image's masked joint attention on Hopper), ``default`` (PyTorch's), or ``cudnn``/``flash``/...
        fast_attention: Qwen-Image joint attention with real-valued RoPE (same function; fuses under compile).
        server_host, server_port: where the HTTP rollout server of a replica listens (port 0: any free port).
        server_api_key: the key the replica's server requires (``Authorization: Bearer <key>``) and its clients
            send; ``None`` falls back to the ``VDR_API_KEY`` environment variable of the driver. Never printed.
        server_allow_unauthenticated: serve a non-loopback ``server_host`` without a key (trusted networks only).
        server_limits: request bounds of the server (:class:`~verl_diffusion_rollout.config.ServerLimits`).
    """

    name: Optional[str] = "diffusion"
    tensor_model_parallel_size: int = 1
    dtype: str = "bfloat16"
    engine: str = "diffusers"
    device: Optional[str] = None
    sampling: DiffusionSamplingConfig = field(default_factory=DiffusionSamplingConfig)
    lora: LoRASyncConfig = field(default_factory=LoRASyncConfig)
    progress_bar: bool = False
    compile: bool = False
    attention_backend: str = "auto"
    fast_attention: bool = True
    server_host: str = "127.0.0.1"
    server_port: int = 0
    server_api_key: Optional[str] = field(default=None, repr=False)
    server_allow_unauthenticated: bool = False
    server_limits: ServerLimits = field(default_factory=ServerLimits)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.engine not in ENGINES:
            raise ValueError(f"rollout.engine must be one of {list(ENGINES)}, got {self.engine!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"rollout.dtype must be one of {list(DTYPES)}, got {self.dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"rollout.attention_backend must be one of {list(ATTENTION_BACKENDS)}, got {self.attention_backend!r}"
            )
        if self.n < 1:
            raise ValueError(f"rollout.n must be >= 1, got {self.n}")
        if self.server_api_key is not None and (not isinstance(self.server_api_key, str) or not self.server_api_key):
            raise ValueError("rollout.server_api_key must be a non-empty string or null")
        if not isinstance(self.server_allow_unauthenticated, bool):
            raise ValueError(
                f"rollout.server_allow_unauthenticated must be true or false, got {self.server_allow_unauthenticated!r}"
            )
        for name, cls in (("sampling", DiffusionSamplingConfig), ("lora", LoRASyncConfig), ("server_limits", ServerLimits)):
            value = getattr(self, name)
            if isinstance(value, (dict, DictConfig)):
                value = _plain(value)
                value.pop("_target_", None)
                try:
                    value = cls(**value)
                except TypeError as err:  # unknown key
                    raise ValueError(f"rollout.{name}: {err}") from err
                _set(self, name, value)
            elif not isinstance(value, cls):
                raise ValueError(f"rollout.{name} must be a {cls.__name__} or a dict, got {type(value).__name__}")


@dataclass
class DiffusionModelConfig(HFModelConfig):
    """verl's model config for a diffusers checkpoint folder (``actor_rollout_ref.model``).

    verl's ``HFModelConfig`` loads a transformers ``config.json`` and tokenizer from ``path``; a diffusers folder has
    a ``model_index.json`` instead. This subclass reads that index (``hf_config`` holds it as a dict and
    ``architectures`` the pipeline class), loads the tokenizer from its ``tokenizer/`` subfolder, and keeps every
    other field (LoRA rank/alpha/target modules...) with verl's meaning.
    """

    target_modules: Optional[Any] = field(default_factory=lambda: list(QWEN_IMAGE_ATTENTION_MODULES))
    lora_alpha: int = 64
    # Components actually used from the folder, checked at load time.
    pipeline_class: Optional[str] = None

    _mutable_fields = HFModelConfig._mutable_fields | {"pipeline_class", "share_embeddings_and_output_weights"}

    def __post_init__(self) -> None:
        from verl.utils.fs import copy_to_local
        from verl.utils.import_utils import import_external_libs

        import_external_libs(self.external_lib)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"model.path must be a diffusers model folder, got {self.path!r}")
        self.local_path = copy_to_local(self.path, use_shm=self.use_shm)
        index_path = os.path.join(self.local_path, "model_index.json")
        if not os.path.isfile(index_path):
            raise ValueError(
                f"model.path {self.path!r} is not a diffusers model folder (no model_index.json in {self.local_path!r})"
            )
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
        self.hf_config = index
        self.hf_config_path = self.path
        self.local_hf_config_path = self.local_path
        self.architectures = [index.get("_class_name", "DiffusionPipeline")]
        self.pipeline_class = self.architectures[0]
        self.share_embeddings_and_output_weights = False
        tokenizer_dir = os.path.join(self.local_path, "tokenizer")
        if self.load_tokenizer and os.path.isdir(tokenizer_dir):
            from transformers import AutoTokenizer

            self.tokenizer_path = tokenizer_dir
            self.local_tokenizer_path = tokenizer_dir
            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir, trust_remote_code=self.trust_remote_code)
        if self.target_modules is not None:
            modules = _plain(self.target_modules)
            if not isinstance(modules, (str, list)):
                raise ValueError(f"model.target_modules must be a string or a list, got {type(modules).__name__}")
            _set(self, "target_modules", modules)


def register_configs() -> None:
    """Register the schemas in Hydra's ConfigStore (group ``rollout``: ``diffusion_schema``...). Idempotent."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(group="rollout", name="diffusion_schema", node=DiffusionRolloutConfig)
    cs.store(group="model", name="diffusion_model_schema", node=DiffusionModelConfig)
    cs.store(group="sampling", name="diffusion_sampling_schema", node=DiffusionSamplingConfig)
