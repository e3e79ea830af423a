"""polylora-async: many LoRA adapters over one shared PyTorch model, inside your asyncio app."""

from __future__ import annotations

from ._config import BASE_ADAPTER, WrapConfig
from ._errors import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterNotReadyError,
    BatchFailedError,
    BatchInputError,
    ConfigError,
    InputValidationError,
    OverloadedError,
    PolyLoraError,
    PolyLoraWarning,
    RequestTimeoutError,
    RuntimeClosedError,
    SlotsFullError,
    StoreClosedError,
    TargetModulesError,
    UnsupportedAdapterError,
    WorkerCrashedError,
)
from ._exposition import MetricsServer, metrics_asgi_app, serve_metrics
from ._layer import MultiLoraLinear
from ._metrics import RuntimeMetrics
from ._model import MultiLoraModel
from .adapters import AdapterWeights, LayerLora, RawAdapter, read_peft_directory
from .runtime import Runtime, RuntimeConfig, RuntimeStatistics, StreamResult, default_select_output
from .store import AdapterStore, BatchLease, StoreConfig, StoreStatistics

__version__ = "0.1.0"

__all__ = [
    "BASE_ADAPTER",
    "AdapterFormatError",
    "AdapterLoadError",
    "AdapterNotFoundError",
    "AdapterNotReadyError",
    "AdapterStore",
    "AdapterWeights",
    "BatchFailedError",
    "BatchInputError",
    "BatchLease",
    "ConfigError",
    "InputValidationError",
    "LayerLora",
    "MetricsServer",
    "MultiLoraLinear",
    "MultiLoraModel",
    "OverloadedError",
    "PolyLoraError",
    "PolyLoraWarning",
    "RawAdapter",
    "RequestTimeoutError",
    "Runtime",
    "RuntimeClosedError",
    "RuntimeConfig",
    "RuntimeMetrics",
    "RuntimeStatistics",
    "SlotsFullError",
    "StoreClosedError",
    "StoreConfig",
    "StoreStatistics",
    "StreamResult",
    "TargetModulesError",
    "UnsupportedAdapterError",
    "WorkerCrashedError",
    "WrapConfig",
    "__version__",
    "default_select_output",
    "metrics_asgi_app",
    "read_peft_directory",
    "serve_metrics",
]
