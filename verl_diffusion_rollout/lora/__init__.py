"""In-memory LoRA for the rollout and the trainer, in peft's layout:

* :mod:`.config`: which peft ``LoraConfig`` is applied exactly (:func:`to_lora_config`), tensor names, the
  :class:`LoRASpec` derived once from a config and a model;
* :mod:`.layer`: the one merged-LoRA layer (:class:`MergedLoRALinear`, ``W + s B A`` rounded once from float32
  factors), shared by the rollout and the trainer;
* :mod:`.sync`: validate -> stage -> commit of LoRA and full-weight updates into a rollout's transformer.

The vllm-omni adapter-loader patch lives beside its engine, in
:mod:`verl_diffusion_rollout.engines.vllm_omni_lora`.
"""

from .config import LoRASpec, WeightUpdateError, canonical_name, is_lora_name, peft_config_dict, to_lora_config
from .layer import MergedLoRALinear, float32_factors, lora_layer_config, lora_layers, merge_weight
from .sync import FullWeightSync, LoRASync, check_names_and_shapes, iter_with_first, validate_lora_tensors

__all__ = [
    "LoRASpec",
    "WeightUpdateError",
    "canonical_name",
    "is_lora_name",
    "peft_config_dict",
    "to_lora_config",
    "MergedLoRALinear",
    "float32_factors",
    "lora_layer_config",
    "lora_layers",
    "merge_weight",
    "FullWeightSync",
    "LoRASync",
    "check_names_and_shapes",
    "iter_with_first",
    "validate_lora_tensors",
]
