"""The batch context: which adapter slot serves each row, shared by every wrapped layer."""

from __future__ import annotations

from collections.abc import Callable
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

    def derived(self, key: object, device: torch.device, build: Callable[[], object]) -> object:
        """Cache a value derived from host data for the rest of this batch."""
        full_key = (key, str(device))
        if full_key not in self._derived:
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

    def shared_plan(self, active: tuple[bool, ...], device: torch.device) -> SharedPlan:
        """The plan for layers whose active slots are ``active``; built once per batch."""

        def build() -> SharedPlan:
            effective = tuple(s if active[s] else 0 for s in self.meta.row_slots_host)
            distinct = tuple(dict.fromkeys(s for s in effective if s != 0))
            if not distinct:
                return SharedPlan((), None, None)
            meta = self.meta_for(distinct, device)
            if len(distinct) == 1 and 0 not in effective:
                return SharedPlan(distinct, meta, None)
            groups = (0, *distinct)
            rows = self.index_tensor(("rows", effective), [groups.index(s) for s in effective], device)
            return SharedPlan(distinct, meta, rows)

        plan = self.derived(("shared", active), device, build)
        assert isinstance(plan, SharedPlan)
        return plan

    def meta_for(self, slots: tuple[int, ...], device: torch.device) -> LoraBatchMeta:
        value = self.derived(("meta", slots), device, lambda: build_batch_meta(slots, device))
        assert isinstance(value, LoraBatchMeta)
        return value


@dataclass(frozen=True)
class SharedPlan:
    """How a layer answers a tensor shared by all rows, for one batch and one set of active slots.

    Attributes:
        distinct: the adapter slots that do work here, in first-seen row order.
        meta: batch metadata with one row per distinct slot.
        rows_to_group: ``[rows]`` int64, row -> group (0 = base, i = ``distinct[i - 1]``); ``None``
            when every row uses the same adapter here (the shared tensor takes it directly).
    """

    distinct: tuple[int, ...]
    meta: LoraBatchMeta | None
    rows_to_group: torch.Tensor | None


class BatchState:
    """The one mutable holder every wrapped layer of a model reads the current batch from."""

    def __init__(self) -> None:
        self.current: BatchContext | None = None
