"""The batch context: which adapter slot serves each row, shared by every wrapped layer."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .kernels import LoraBatchMeta, build_batch_meta


class MixedSharedInputError(Exception):
    """Raised inside a forward pass when a layer sees a tensor shared by rows of different adapters.

    Internal: the model wrapper catches it and re-runs the batch in adapter-homogeneous groups.
    """

    def __init__(self, layer_name: str) -> None:
        super().__init__(layer_name)
        self.layer_name = layer_name


@dataclass
class BatchContext:
    """Everything a wrapped layer needs about the current batch, computed once per batch."""

    meta: LoraBatchMeta
    # True inside a region where a model patch can consume per-group outputs for shared inputs.
    expand_shared: bool = False
    # Set by a layer that answered a shared input per adapter group: row -> group index ([rows]).
    shared_rows: torch.Tensor | None = None
    # Small per-batch caches for the shared-input path, keyed by host tuples.
    _derived: dict[object, object] = field(default_factory=dict)

    @property
    def num_rows(self) -> int:
        return self.meta.num_rows

    def derived(self, key: object, device: torch.device, build: object) -> object:
        """Cache a value derived from host data for the rest of this batch."""
        full_key = (key, str(device))
        if full_key not in self._derived:
            assert callable(build)
            self._derived[full_key] = build()
        return self._derived[full_key]

    def index_tensor(self, key: object, values: list[int], device: torch.device) -> torch.Tensor:
        """A cached int64 device tensor of host values, uploaded without waiting for the device."""

        def build() -> torch.Tensor:
            host = torch.tensor(values, dtype=torch.long)
            if device.type == "cuda":
                host = host.pin_memory()
            return host.to(device, non_blocking=True)

        value = self.derived(("index", key), device, build)
        assert isinstance(value, torch.Tensor)
        return value

    def meta_for(self, slots: tuple[int, ...], device: torch.device) -> LoraBatchMeta:
        value = self.derived(("meta", slots), device, lambda: build_batch_meta(slots, device))
        assert isinstance(value, LoraBatchMeta)
        return value


class BatchState:
    """The one mutable holder every wrapped layer of a model reads the current batch from."""

    def __init__(self) -> None:
        self.current: BatchContext | None = None
