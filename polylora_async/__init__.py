"""polylora-async: many LoRA adapters over one shared PyTorch model, inside your asyncio app."""

from __future__ import annotations

from ._adapters import AdapterWeights, LayerLora, RawAdapter, read_peft_directory
from ._config import BASE_ADAPTER, WrapConfig
from ._errors import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    BatchInputError,
    ConfigError,
    PolyLoraError,
    PolyLoraWarning,
    SlotsFullError,
    TargetModulesError,
    UnsupportedAdapterError,
)
from ._layer import MultiLoraLinear
from ._model import MultiLoraModel

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER",
    "AdapterFormatError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterWeights",
    "BatchInputError",
    "ConfigError",
    "LayerLora",
    "MultiLoraLinear",
    "MultiLoraModel",
    "PolyLoraError",
    "PolyLoraWarning",
    "RawAdapter",
    "SlotsFullError",
    "TargetModulesError",
    "UnsupportedAdapterError",
    "WrapConfig",
    "__version__",
    "read_peft_directory",
]
