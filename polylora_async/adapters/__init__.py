"""PEFT LoRA adapters: reading their sources, validating them against a wrapped model, their types.

* :mod:`._types`: :class:`RawAdapter` (what a source holds), :class:`AdapterWeights` (what a slot
  takes), :class:`LayerLora`, :class:`LayerShape`;
* :mod:`._sources`: PEFT directories, live PeftModels and state dicts into :class:`RawAdapter`;
* :mod:`._safetensors`: the strict safetensors reader (header only, or data in one read);
* :mod:`._spec`: what a PEFT ``LoraConfig`` means for serving (refused features, ranks, scales);
* :mod:`._validate`: one set of rules, run on tensors at load and on header entries at
  registration, and packing into one storage per adapter.
"""

from ._safetensors import TensorMeta, read_safetensors, read_safetensors_header, view_at
from ._sources import (
    CONFIG_FILE,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    raw_from_peft_model,
    raw_from_state_dict,
    read_peft_directory,
)
from ._types import AdapterWeights, LayerLora, LayerShape, RawAdapter
from ._validate import check_source, pack_weights, validate_adapter, validate_weights

__all__ = [
    "CONFIG_FILE",
    "PICKLE_FILE",
    "SAFETENSORS_FILE",
    "AdapterWeights",
    "LayerLora",
    "LayerShape",
    "RawAdapter",
    "TensorMeta",
    "check_source",
    "pack_weights",
    "raw_from_peft_model",
    "raw_from_state_dict",
    "read_peft_directory",
    "read_safetensors",
    "read_safetensors_header",
    "validate_adapter",
    "validate_weights",
    "view_at",
]
