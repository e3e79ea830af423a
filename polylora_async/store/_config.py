"""StoreConfig: how much each tier holds and how loads behave, validated when it is made."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .._config import check_int, check_seconds
from .._errors import ConfigError


@dataclass(frozen=True)
class StoreConfig:
    """How much each tier holds and how loads behave.

    Args:
        cpu_bytes: bound of the CPU tier in bytes of host memory: validated weights
            (``AdapterWeights.nbytes``), page-locked ones as the pinned allocator reserves them
            (rounded up to a power of two per adapter);
            0 disables caching there (in-memory adapters are still kept, see :class:`AdapterStore`).
        disk_dir: directory of the disk cache; None disables the disk tier.
        disk_bytes: bound of the disk cache in file bytes (None: unbounded).
        disk_entries: bound of the disk cache in entries (None: unbounded).
        min_residency_s: a GPU slot keeps a freshly loaded adapter at least this long, unless nothing
            else can be evicted (50 ms: a few batches, so a just-prefetched adapter gets used).
        thrash_window_s: a load within this time of the same adapter's eviction from that tier
            counts as a thrash reload.
        load_threads: worker threads that read and validate adapters.
        prefetch_cpu_ahead: how many adapters beyond those that can go to the GPU now one
            ``prefetch`` call warms in the CPU tier.
        pin_memory: keep CPU-tier weights in page-locked memory; None: when the model is on CUDA.
    """

    cpu_bytes: int = 2 * 1024**3
    disk_dir: str | os.PathLike[str] | None = None
    disk_bytes: int | None = None
    disk_entries: int | None = None
    min_residency_s: float = 0.05
    thrash_window_s: float = 5.0
    load_threads: int = 4
    prefetch_cpu_ahead: int = 8
    pin_memory: bool | None = None

    def __post_init__(self) -> None:
        check_int("cpu_bytes", self.cpu_bytes, 0)
        check_int("disk_bytes", self.disk_bytes, 1, optional=True)
        check_int("disk_entries", self.disk_entries, 1, optional=True)
        check_seconds("min_residency_s", self.min_residency_s)
        check_seconds("thrash_window_s", self.thrash_window_s)
        check_int("load_threads", self.load_threads, 1)
        check_int("prefetch_cpu_ahead", self.prefetch_cpu_ahead, 0)
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not os.fspath(self.disk_dir):
                raise ConfigError(f"`disk_dir` must be a non-empty path or None, got {self.disk_dir!r}")
        else:
            for name in ("disk_bytes", "disk_entries"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"`{name}`={getattr(self, name)!r} needs `disk_dir`, got disk_dir=None")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise ConfigError(f"`pin_memory` must be True, False or None, got {self.pin_memory!r}")
