"""AdapterStore: the adapter tiers under the model wrapper, and the prefetch pipeline.

The data path of one adapter version (an :class:`AdapterRef`)::

    source (PEFT dir / memory) --+--> [disk cache] --> CPU tier (validated, pinned) --> GPU slot
                                 '------------------------^      (worker threads)      (copy stream)

* The catalog (:mod:`._catalog`) maps ids to versioned refs. A request keeps its ref until it is
  done, so replacing an adapter never changes the weights of requests already queued.
* Reading and validating run in a small thread pool, never on the event loop. Slot writes are
  issued from one copy thread, on a dedicated CUDA stream (:mod:`._gpu_tier`).
* Every load is single flight: concurrent needs of one version share one read and one slot write;
  a failure fails only that version's waiters and is forgotten (the next need retries).
* Eviction resists thrash: the scheduler reports its queue through :meth:`AdapterStore.set_demand`;
  an adapter with queued requests is never evicted for one without, a fresh slot keeps its adapter
  for ``min_residency_s`` unless nothing else can go, and reloads shortly after an eviction are
  counted as thrash.

Hit/miss accounting (``statistics()`` and the observer): a *lookup* is counted when a tier is asked
to serve a need of the level above it. GPU lookups are :meth:`AdapterStore.ensure_gpu` calls (and
each distinct adapter of :meth:`AdapterStore.acquire_lease`); CPU lookups are GPU loads; disk
lookups are CPU loads of adapters the disk tier applies to. Prefetches count no lookups (they are
speculative) but their loads are counted as loads. So ``gpu.hits / (gpu.hits + gpu.misses)`` is
the share of needs that found their adapter already on the GPU.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import math
import os
import threading
import time
import types
import uuid
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar

import torch

from ._adapters import (
    CONFIG_FILE,
    PICKLE_FILE,
    SAFETENSORS_FILE,
    AdapterWeights,
    RawAdapter,
    check_source,
    read_peft_directory,
)
from ._catalog import BASE_REF, AdapterCatalog, AdapterKey, AdapterRef, Resolver
from ._config import check_adapter_id
from ._errors import (
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterNotReadyError,
    BatchInputError,
    ConfigError,
    SlotsFullError,
    StoreClosedError,
)
from ._model import MultiLoraModel
from ._single_flight import SharedCall
from .store._cpu_tier import CpuTier, stage_weights
from .store._disk_tier import DiskCache, DiskStats, weights_to_raw
from .store._gpu_tier import GpuSlot, GpuSlots, SlotState, SlotWriter

logger = logging.getLogger("polylora_async")

Tier = Literal["gpu", "cpu", "disk"]
_T = TypeVar("_T")
_TIERS: tuple[Tier, ...] = ("gpu", "cpu", "disk")


class StoreObserver(Protocol):
    """What the store reports to a metrics backend (e.g. Prometheus counters and gauges).

    Every method is called on the event loop, synchronously, and must be cheap. Label values are
    bounded: ``tier`` is ``"gpu"``, ``"cpu"`` or ``"disk"``; ``source`` is ``"source"``, ``"disk"`` or
    ``"cpu"``; ``target`` is ``"disk"``, ``"cpu"`` or ``"gpu"``. Adapter ids are never passed.
    """

    def cache_hit(self, tier: str) -> None:
        """A lookup in ``tier`` found the adapter."""

    def cache_miss(self, tier: str) -> None:
        """A lookup in ``tier`` did not find the adapter."""

    def load_duration(self, source: str, target: str, seconds: float) -> None:
        """One load from ``source`` into ``target`` took ``seconds`` (for ``cpu->gpu``: issuing the copy)."""

    def eviction(self, tier: str) -> None:
        """A live adapter was evicted from ``tier`` to make room."""

    def reload_after_eviction(self, tier: str) -> None:
        """An adapter was loaded into ``tier`` again within ``thrash_window_s`` of its eviction."""

    def set_resident(self, tier: str, count: int, nbytes: int) -> None:
        """``tier`` now holds ``count`` adapters taking ``nbytes``."""


# ---------------------------------------------------------------------------------------------
# Configuration and statistics
# ---------------------------------------------------------------------------------------------


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
        _check_int("cpu_bytes", self.cpu_bytes, 0)
        _check_int("disk_bytes", self.disk_bytes, 1, optional=True)
        _check_int("disk_entries", self.disk_entries, 1, optional=True)
        _check_seconds("min_residency_s", self.min_residency_s)
        _check_seconds("thrash_window_s", self.thrash_window_s)
        _check_int("load_threads", self.load_threads, 1)
        _check_int("prefetch_cpu_ahead", self.prefetch_cpu_ahead, 0)
        if self.disk_dir is not None:
            if not isinstance(self.disk_dir, (str, os.PathLike)) or not os.fspath(self.disk_dir):
                raise ConfigError(f"`disk_dir` must be a non-empty path or None, got {self.disk_dir!r}")
        else:
            for name in ("disk_bytes", "disk_entries"):
                if getattr(self, name) is not None:
                    raise ConfigError(f"`{name}`={getattr(self, name)!r} needs `disk_dir`, got disk_dir=None")
        if self.pin_memory is not None and not isinstance(self.pin_memory, bool):
            raise ConfigError(f"`pin_memory` must be True, False or None, got {self.pin_memory!r}")


def _check_int(name: str, value: object, minimum: int, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"`{name}` must be an integer{' or None' if optional else ''}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"`{name}` must be >= {minimum}, got {value}")


def _check_seconds(name: str, value: object) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ConfigError(f"`{name}` must be a finite number of seconds, got {value!r}")
    if value < 0:
        raise ConfigError(f"`{name}` must be >= 0, got {value}")


@dataclass(frozen=True)
class TierStatistics:
    """Counters of one tier since the store was created, and what it holds now.

    Attributes:
        hits, misses: lookups (see the module docstring for what counts as one).
        loads: adapters loaded into this tier (read + validated for the CPU tier, slot writes
            issued for the GPU tier, entries written for the disk tier).
        evictions: live adapters evicted to make room (dropping a dead version is not counted).
        reloads_after_eviction: loads within ``thrash_window_s`` of the same adapter's eviction.
        resident, resident_bytes: adapters held now, and their bytes.
    """

    hits: int = 0
    misses: int = 0
    loads: int = 0
    evictions: int = 0
    reloads_after_eviction: int = 0
    resident: int = 0
    resident_bytes: int = 0


@dataclass(frozen=True)
class StoreStatistics:
    """A snapshot of the store (:meth:`AdapterStore.statistics`).

    Attributes:
        gpu, cpu, disk: per-tier counters (``disk`` is None without a disk tier).
        gpu_slots: the number of adapter slots; gpu_leased: slots leased by batches now.
        cpu_capacity_bytes: the CPU bound; cpu_sticky_bytes: bytes of in-memory adapters that
            have no other copy (kept even beyond the bound).
        disk_dropped_at_open: incomplete or unlisted entries the disk cache dropped when it opened.
        load_failures: loads that failed (each failure is reported to that adapter's waiters).
        loads_in_flight: adapter versions with a load running now (to the CPU tier, or on to the GPU).
        registered: ids in the catalog; live_versions: versions current or still referenced.
        pinned: ids pinned to the GPU.
    """

    gpu: TierStatistics
    cpu: TierStatistics
    disk: TierStatistics | None
    gpu_slots: int
    gpu_leased: int
    cpu_capacity_bytes: int
    cpu_sticky_bytes: int
    disk_dropped_at_open: int
    load_failures: int
    loads_in_flight: int
    registered: int
    live_versions: int
    pinned: tuple[str, ...]


class _Counters:
    __slots__ = ("evictions", "hits", "loads", "misses", "reloads")

    def __init__(self) -> None:
        self.hits = self.misses = self.loads = self.evictions = self.reloads = 0


class _GpuJob:
    """One in-flight GPU load of one version; ``urgent`` may be raised while it runs."""

    __slots__ = ("call", "ref", "reserved", "urgent")

    def __init__(self, ref: AdapterRef, urgent: bool, call: SharedCall) -> None:
        self.ref = ref
        self.urgent = urgent
        self.call = call
        self.reserved = False


# ---------------------------------------------------------------------------------------------
# Leases
# ---------------------------------------------------------------------------------------------


class BatchLease:
    """The slots of the distinct adapters of one batch, protected from eviction until :meth:`release`.

    Usage by a GPU worker (in its thread)::

        lease.wait_copies()                 # compute stream waits for the slot writes (no host wait)
        out = model.forward_slots(lease.row_slots(refs), **inputs)
        done = torch.cuda.Event(); done.record()
        lease.release(done)                 # the next write of these slots waits for `done`

    On CPU, ``wait_copies`` does nothing and ``release()`` takes no event.
    """

    def __init__(self, store: AdapterStore, slots: dict[AdapterKey, GpuSlot]) -> None:
        self._store = store
        self._slots = slots
        self._indices = types.MappingProxyType({key: slot.index for key, slot in slots.items()})
        self._copy_events = tuple(s.copy_event for s in slots.values() if s.copy_event is not None)
        self._released = False

    @property
    def slots(self) -> Mapping[AdapterKey, int]:
        """Slot of each distinct adapter version (``ref.key``) of the batch; base rows use slot 0."""
        return self._indices

    @property
    def copy_events(self) -> tuple[Any, ...]:
        """CUDA events of the slot writes the batch must run after (empty on CPU)."""
        return self._copy_events

    @property
    def released(self) -> bool:
        return self._released

    def slot_of(self, ref: AdapterRef | AdapterKey) -> int:
        """The slot serving ``ref`` (0 for the base model).

        Raises:
            AdapterNotFoundError: the version is not part of this lease.
        """
        if isinstance(ref, AdapterRef):
            if ref.is_base:
                return 0
            key = ref.key
        else:
            key = ref
        try:
            return self._indices[key]
        except KeyError:
            raise AdapterNotFoundError(f"adapter {key[0]!r} version {key[1]} is not part of this lease") from None

    def row_slots(self, refs: Sequence[AdapterRef]) -> list[int]:
        """One slot per batch row, for ``MultiLoraModel.forward_slots``."""
        return [self.slot_of(ref) for ref in refs]

    def wait_copies(self, stream: Any = None) -> None:
        """Make ``stream`` (default: the current CUDA stream) wait for this batch's slot writes.

        Device-side only (``stream.wait_event``); the host never blocks. No-op on CPU.
        """
        self._store._writer.wait(self._copy_events, stream)

    def release(self, done_event: Any = None) -> None:
        """End the lease; idempotent. Safe to call from the GPU worker thread.

        Args:
            done_event: a CUDA event recorded on the compute stream after the batch's last kernel.
                Writes into these slots wait for it on the device. Pass None only when the batch
                has completed (or on CPU).
        """
        if self._released:
            return
        self._released = True
        self._store._call_on_loop(self._store._release_slots, self._slots, done_event)

    def __enter__(self) -> BatchLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# The store
# ---------------------------------------------------------------------------------------------


class AdapterStore:
    """Adapter tiers and prefetching under a :class:`MultiLoraModel`; used by a scheduler on one event loop.

    The store owns the model's slots 1..``num_slots`` (don't also call ``model.load_adapter``).
    All methods must be called on the event loop thread, except :meth:`BatchLease.release` and
    :meth:`BatchLease.wait_copies`, which the GPU worker thread may call.

    A scheduler's cycle::

        ref = await store.resolve(adapter_id)          # at submit: unknown id -> AdapterNotFoundError
        store.set_demand({r.key: n for r, n in queued_counts.items()})
        store.prefetch(look_ahead_refs)                # non-blocking
        lease = await store.acquire_lease(batch_refs)  # or: await ensure_gpu(r) for each, then lease()
        ... worker runs the batch, then lease.release(done_event) ...
        store.release_ref(ref)                         # when the request is done

    In-memory sources (PeftModel snapshots, state dicts, RawAdapter, AdapterWeights) are read once,
    at the version's first load; the store then holds the only copy: it stays in the CPU tier
    (counted in ``cpu_bytes`` but never evicted) until the disk tier, if configured, holds a spilled
    copy, after which it is an ordinary evictable CPU entry that reloads from disk. Adapters a
    resolver returned are also written to the disk cache (write-behind), keyed by a fingerprint
    of their files, so later loads need not touch the (maybe slow or temporary) source. Directories
    registered up front are read from where they are.

    Args:
        model: the wrapped model; its device decides CUDA streams and pinned memory.
        config: tier bounds and load behaviour.
        metrics: optional :class:`StoreObserver`.
        resolver: optional ``async def resolver(adapter_id) -> source | None`` for unregistered ids.
        clock: monotonic seconds; replace it in tests to control residency and thrash windows.

    Raises:
        ConfigError: the model already has adapters loaded with ``load_adapter``, another open store
            owns its slots, or ``pin_memory`` is set without CUDA.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        config: StoreConfig | None = None,
        metrics: StoreObserver | None = None,
        *,
        resolver: Resolver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not isinstance(model, MultiLoraModel):
            raise TypeError(f"`model` must be a MultiLoraModel, got {type(model).__name__}")
        config = config if config is not None else StoreConfig()
        if not isinstance(config, StoreConfig):
            raise ConfigError(f"`config` must be a StoreConfig, got {type(config).__name__}")
        if config.pin_memory and not torch.cuda.is_available():
            raise ConfigError("`pin_memory`=True needs CUDA, but torch.cuda.is_available() is False")
        model.claim_slots(self)  # aclose() gives them back (or this store's end, if never closed)
        self.model = model
        self.config = config
        self._metrics = metrics
        self._clock = clock
        self._pin = config.pin_memory if config.pin_memory is not None else model.device.type == "cuda"
        # What registration checks a source against (the wrapped layers and heads never change).
        self._layer_shapes = model.layer_shapes()
        self._head_specs = model.head_specs()
        self.catalog = AdapterCatalog(resolver, on_version_dead=self._on_version_dead, check=self._check_source)
        self._writer = SlotWriter(model)
        self._gpu = GpuSlots(model.config.num_slots, config.min_residency_s, clock)
        self._cpu = CpuTier(config.cpu_bytes, demand_of=self._demand_of)
        self._disk = (
            DiskCache(config.disk_dir, max_bytes=config.disk_bytes, max_entries=config.disk_entries)
            if config.disk_dir is not None
            else None
        )
        self._disk_stats = DiskStats(0, 0, 0, 0)
        self._load_pool = ThreadPoolExecutor(config.load_threads, thread_name_prefix="polylora-load")
        self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="polylora-copy")
        self._disk_pool = ThreadPoolExecutor(1, thread_name_prefix="polylora-disk") if self._disk else None
        self._demand: dict[AdapterKey, int] = {}
        self._pinned: set[str] = set()
        self._wanted: Counter[AdapterKey] = Counter()  # keys an acquire_lease is waiting to hold
        self._gpu_jobs: dict[AdapterKey, _GpuJob] = {}
        self._cpu_jobs: dict[AdapterKey, SharedCall] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._disk_tokens: dict[AdapterKey, str] = {}
        self._token_keys: dict[tuple[str, str], AdapterKey] = {}
        self._spilled: set[AdapterKey] = set()
        self._counters = {tier: _Counters() for tier in _TIERS}
        self._evicted_at: dict[Tier, dict[Hashable, float]] = {tier: {} for tier in _TIERS}
        self._load_failures = 0
        self._changed = asyncio.Event()
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None

    # -- catalog ------------------------------------------------------------------------------------

    def register(self, adapter_id: str, source: Any, *, peft_adapter_name: str | None = None) -> AdapterRef:
        """Register (or replace with a new version) an adapter; returns the new current ref (not acquired).

        See :meth:`AdapterCatalog.register` for the accepted sources. The source is checked now
        against the wrapped model, without reading tensor data: for a directory, its
        ``adapter_config.json`` and its safetensors header (a few KB, read on the calling thread);
        for an in-memory source, its config and tensor shapes. What that shows to be unusable is
        refused here, with the error a load would raise; the values themselves (NaN/Inf, data that
        does not match a valid header) are checked at the version's first load, which re-checks
        everything. A refused source registers nothing: a previous version stays current.
        Adapters a resolver returns get the same check (see :meth:`resolve`).

        Raises:
            AdapterLoadError: the directory, its ``adapter_config.json`` or its weights file is
                missing, unreadable or truncated.
            UnsupportedAdapterError: a PEFT feature this runtime does not serve (DoRA, LoRA bias, a
                ``peft_type`` other than LORA, ...).
            AdapterFormatError: a field, module, shape or rank that does not fit the wrapped model
                (a module that is not wrapped, a rank above ``max_rank``, config and weights disagreeing).
            StoreClosedError: the store is closed.
            ValueError, TypeError: a bad id or source type.
        """
        self._check_open()
        return self.catalog.register(adapter_id, source, peft_adapter_name=peft_adapter_name)

    def _check_source(self, adapter_id: str, source: Path | RawAdapter | AdapterWeights) -> None:
        check_source(adapter_id, source, self._layer_shapes, self.model.config.max_rank, self._head_specs)

    def unregister(self, adapter_id: str) -> None:
        """Forget an id; refs already resolved keep their version (and its placements) until released.

        Raises:
            AdapterNotFoundError: the id is not registered.
        """
        self._check_open()
        self.catalog.unregister(adapter_id)

    def adapter_ids(self) -> list[str]:
        """Registered and resolved ids, sorted."""
        return self.catalog.adapter_ids()

    async def resolve(self, adapter_id: str) -> AdapterRef:
        """The current version of ``adapter_id``, held until :meth:`release_ref`.

        :data:`BASE_ADAPTER` gives the base ref (slot 0; releasing it is a no-op).

        An adapter the resolver returns is checked as :meth:`register` checks it before it is
        registered; a refused one is not registered (the next resolution asks the resolver again).

        Raises:
            AdapterNotFoundError: unknown id (and the resolver, if any, does not know it).
            AdapterLoadError: the resolver failed, or its answer is unreadable (see :meth:`register`).
            AdapterFormatError, UnsupportedAdapterError: the resolver's answer does not fit the model.
            StoreClosedError: the store is closed.
        """
        self._check_open()
        self._bind_loop()
        return await self.catalog.resolve(adapter_id)

    def resolve_registered(self, adapter_id: str) -> AdapterRef | None:
        """:meth:`resolve` without awaiting for an id registered now; ``None`` for any other id.

        The submit path's fast case: no coroutine, no resolver. Call it on the event loop.

        Raises:
            StoreClosedError: the store is closed.
        """
        self._check_open()
        ref = self.catalog.current(adapter_id)
        if ref is None:
            return None
        self._bind_loop()
        self.catalog.acquire(ref)
        return ref

    def resolve_nowait(self, adapter_id: str) -> AdapterRef:
        """Like :meth:`resolve` for registered ids, without awaiting; held until :meth:`release_ref`.

        Raises:
            AdapterNotFoundError: the id is not registered (the resolver is not asked: that needs
                ``await resolve()``).
            StoreClosedError: the store is closed.
        """
        self._check_open()
        ref = self.catalog.current(adapter_id)
        if ref is None:
            hint = "; await resolve() to ask the resolver" if self.catalog.has_resolver else ""
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered{hint}")
        self.catalog.acquire(ref)
        return ref

    def release_ref(self, ref: AdapterRef) -> None:
        """The holder of ``ref`` is done; an old version is dropped from every tier with its last holder."""
        self.catalog.release(ref)

    # -- scheduler input --------------------------------------------------------------------------

    def set_demand(self, demand: Mapping[Any, int]) -> None:
        """Replace the table of queued requests per adapter version (the scheduler's queue).

        Keys are refs, ``ref.key`` tuples, or ids (their current version; unknown ids are ignored); counts are
        queued requests (0 or absent: none). Eviction never takes an adapter with queued requests
        for a prefetch, and prefers adapters without queued requests for every load.

        Raises:
            ValueError: a negative or non-integer count.
        """
        table: dict[AdapterKey, int] = {}
        for item, count in demand.items():
            if not isinstance(count, int) or isinstance(count, bool) or count < 0:
                raise ValueError(f"demand counts must be integers >= 0, got {count!r} for {item!r}")
            if count == 0:
                continue
            key = self._key_of(item)
            if key is not None:
                table[key] = table.get(key, 0) + count
        self._demand = table
        self._notify()

    def pin(self, adapter_id: str) -> None:
        """Never evict ``adapter_id`` (its current version) from the GPU once loaded; see :meth:`preload`.

        Raises:
            SlotsFullError: every slot is already pinned.
        """
        check_adapter_id(adapter_id)
        if adapter_id not in self._pinned and len(self._pinned) >= self.model.config.num_slots:
            raise SlotsFullError(
                f"cannot pin {adapter_id!r}: all {self.model.config.num_slots} slots are pinned "
                f"({sorted(self._pinned)})"
            )
        self._pinned.add(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self._pinned.discard(adapter_id)
        self._notify()

    async def preload(self, adapter_ids: Iterable[str], *, pin: bool = False) -> list[AdapterRef]:
        """Load adapters onto the GPU now (optionally pinning them); returns their refs (not acquired).

        Raises:
            AdapterNotFoundError, AdapterLoadError: as :meth:`resolve` and :meth:`ensure_gpu`.
            SlotsFullError: pinning more adapters than there are slots.
        """
        refs = []
        for adapter_id in adapter_ids:
            if pin:
                self.pin(adapter_id)
            self._check_open()
            self._bind_loop()
            ref = await self.catalog.resolve(adapter_id, acquire=False)
            await self.ensure_gpu(ref)
            refs.append(ref)
        return refs

    # -- GPU readiness ----------------------------------------------------------------------------

    def is_gpu_ready(self, ref: AdapterRef) -> bool:
        """Whether ``ref``'s slot write has been issued (host-side state; the copy event orders the batch)."""
        return ref.is_base or self._gpu.is_ready(ref.key)

    def gpu_resident(self) -> dict[AdapterKey, int]:
        """``ref.key`` -> slot of every version whose slot write was issued."""
        return {key: index for key, index in self._gpu.resident().items() if isinstance(key, tuple)}

    def prefetch(
        self, items: Iterable[AdapterRef | str], *, gpu_items: int | None = None, warm_cpu: bool = True
    ) -> int:
        """Start loads for adapters that will be needed soon, in priority order; never waits.

        For each item not already on the GPU (or loading): while the GPU tier has a slot that a
        prefetch may take (empty, dead, or an unpinned, unleased adapter without queued requests
        past its minimum residency), a full load disk -> CPU -> GPU starts; after that, up to
        ``prefetch_cpu_ahead`` more items are only warmed into the CPU tier. Failures are not
        raised here (the same load is retried by the next need, which gets the error).

        Args:
            items: refs, or ids (their current version; unregistered ids go to the resolver).
            gpu_items: only the first this many distinct items may start GPU loads; the rest are
                only warmed into the CPU tier. A scheduler passes the adapters of its next batch
                here, so loads for requests far back in the queue never evict adapters that the
                next batches need (which would then be loaded again: thrash).
            warm_cpu: also warm items without a GPU load into the CPU tier (a scheduler that calls
                again on every pass turns this off after the first call for an item).

        Returns:
            The number of loads started.

        Raises:
            AdapterNotFoundError: an id is not registered and there is no resolver.
            RuntimeError: called without a running event loop.
        """
        self._check_open()
        self._bind_loop()
        refs: dict[AdapterKey, AdapterRef] = {}
        for item in items:
            if isinstance(item, AdapterRef):
                ref = item
            else:
                current = self.catalog.current(item)
                if current is None:
                    if not self.catalog.has_resolver:
                        raise AdapterNotFoundError(f"adapter {item!r} is not registered")
                    self._spawn(self._resolve_then_prefetch(item), f"polylora-prefetch-resolve:{item[:64]}")
                    continue
                ref = current
            if ref.is_base or not self.catalog.is_alive(ref.key):
                continue
            refs.setdefault(ref.key, ref)
        unreserved = sum(1 for job in self._gpu_jobs.values() if not job.reserved)
        gpu_budget = self._count_prefetch_victims() - unreserved
        cpu_budget = self.config.prefetch_cpu_ahead
        started = 0
        for position, (key, ref) in enumerate(refs.items()):
            if self._gpu.get(key) is not None or key in self._gpu_jobs:
                continue
            if gpu_budget > 0 and (gpu_items is None or position < gpu_items):
                self._start_gpu_job(ref, urgent=False)
                gpu_budget -= 1
                started += 1
            elif (
                warm_cpu
                and cpu_budget > 0
                and self.config.cpu_bytes > 0
                and key not in self._cpu
                and key not in self._cpu_jobs
            ):
                self._start_cpu_job(ref)
                cpu_budget -= 1
                started += 1
        return started

    async def _resolve_then_prefetch(self, adapter_id: str) -> None:
        try:
            ref = await self.catalog.resolve(adapter_id, acquire=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # speculative: the next real need reports it
            logger.debug("prefetch of %r: resolution failed: %s", adapter_id, exc)
            return
        if not self._closed:
            self.prefetch([ref])

    def note_gpu_lookup(self, ref: AdapterRef) -> bool:
        """Count one need for ``ref`` as a GPU-tier hit (resident now) or miss; returns which.

        For schedulers that count per request when it arrives, then wait with
        ``ensure_gpu(ref, count=False)`` so the same need is not counted twice.
        """
        if ref.is_base:
            return True
        hit = self.is_gpu_ready(ref)
        self._count("gpu", hit=hit)
        return hit

    async def ensure_gpu(self, ref: AdapterRef, *, count: bool = True) -> int:
        """Wait until ``ref`` has a slot whose write is issued; returns the slot.

        ``count=False`` leaves the GPU hit/miss counters alone (see :meth:`note_gpu_lookup`).

        Starts (or joins, single flight) its load, evicting another adapter if needed, and waits
        for a slot if all are leased. Leasing right after is safe from the event loop's point of
        view only until the next ``await``: prefer :meth:`acquire_lease` for a whole batch.

        Raises:
            AdapterLoadError (and subclasses): reading or validating failed (the next call retries).
            AdapterNotFoundError: the version is no longer alive (released and replaced).
            SlotsFullError: every slot holds a pinned adapter.
            StoreClosedError: the store closed while waiting.
        """
        self._check_open()
        if ref.is_base:
            return 0
        self._bind_loop()
        self._check_alive(ref)
        key = ref.key
        slot = self._gpu.get(key)
        if slot is not None and slot.state is SlotState.READY:
            if count:
                self._count("gpu", hit=True)
            slot.last_used = self._clock()
            return slot.index
        if count:
            self._count("gpu", hit=False)
        while True:
            slot = self._gpu.get(key)
            if slot is not None and slot.state is SlotState.READY:
                return slot.index
            self._check_open()
            self._check_alive(ref)
            job = self._gpu_jobs.get(key)
            if job is None:
                job = self._start_gpu_job(ref, urgent=True)
            elif not job.urgent:
                job.urgent = True
                self._notify()
            await job.call.wait()

    def lease(self, refs: Iterable[AdapterRef]) -> BatchLease:
        """Lease the slots of a batch's adapters (all must be GPU-ready); base refs need no slot.

        Raises:
            AdapterNotReadyError: an adapter's slot write has not been issued.
        """
        self._check_open()
        self._bind_loop()
        slots: dict[AdapterKey, GpuSlot] = {}
        for ref in refs:
            if ref.is_base or ref.key in slots:
                continue
            slot = self._gpu.get(ref.key)
            if slot is None or slot.state is not SlotState.READY:
                raise AdapterNotReadyError(
                    f"adapter {ref.adapter_id!r} version {ref.version} is not on the GPU; "
                    "await ensure_gpu() first, or use acquire_lease()"
                )
            slots[ref.key] = slot
        for slot in slots.values():
            self._gpu.lease(slot)
        return BatchLease(self, slots)

    async def acquire_lease(self, refs: Iterable[AdapterRef]) -> BatchLease:
        """Load every adapter of a batch (in parallel) and lease their slots together.

        Each adapter's slot is held as soon as its write is issued, so loading the batch's other
        adapters can never evict it. Call it for one batch at a time.

        Raises:
            BatchInputError: more distinct adapters than slots.
            SlotsFullError: pinned adapters leave too few slots for the batch.
            AdapterLoadError, AdapterNotFoundError, StoreClosedError: as :meth:`ensure_gpu`
                (nothing stays held).
        """
        self._check_open()
        self._bind_loop()
        distinct: dict[AdapterKey, AdapterRef] = {}
        for ref in refs:
            if not ref.is_base:
                self._check_alive(ref)
                distinct.setdefault(ref.key, ref)
        num_slots = self.model.config.num_slots
        if len(distinct) > num_slots:
            raise BatchInputError(f"a batch can use at most {num_slots} distinct adapters, got {len(distinct)}")
        pinned_elsewhere = sum(
            1
            for s in self._gpu.slots
            if s.key is not None and s.key not in distinct and s.state is not SlotState.EMPTY and self._protected(s.key)
        )
        if len(distinct) + pinned_elsewhere > num_slots:
            raise SlotsFullError(
                f"a batch of {len(distinct)} adapters does not fit: {pinned_elsewhere} of {num_slots} slots "
                "hold other pinned adapters"
            )
        for key in distinct:
            self._count("gpu", hit=self._gpu.is_ready(key))
        held: dict[AdapterKey, GpuSlot] = {}
        jobs: dict[AdapterKey, _GpuJob] = {}
        # Until held, a loaded adapter of this batch must not become some other load's victim.
        self._wanted.update(distinct.keys())
        try:
            while True:
                for key in distinct:
                    slot = self._gpu.get(key)
                    if key not in held and slot is not None and slot.state is SlotState.READY:
                        self._gpu.lease(slot)
                        held[key] = slot
                if len(held) == len(distinct):
                    return BatchLease(self, {key: held[key] for key in distinct})
                self._check_open()
                changed = self._changed
                for key, ref in distinct.items():
                    if key in held:
                        continue
                    self._check_alive(ref)
                    job = jobs.get(key)
                    if job is not None and job.call.done:
                        exc = job.call.future.exception()
                        if exc is not None:
                            raise exc
                    job = self._gpu_jobs.get(key)
                    if job is None:
                        job = self._start_gpu_job(ref, urgent=True)
                    elif not job.urgent:
                        job.urgent = True
                        self._notify()
                    jobs[key] = job
                # Every job completion and every slot change notifies.
                await changed.wait()
        except BaseException:
            if held:
                self._release_slots(held, None)
            raise
        finally:
            self._wanted.subtract(distinct.keys())
            for key in distinct:
                if self._wanted[key] <= 0:
                    del self._wanted[key]

    # -- statistics, shutdown ---------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        """A consistent snapshot of counters and residency (host-side, cheap)."""
        c = self._counters
        gpu = self._tier_stats("gpu", self._gpu.resident_count, self._gpu.resident_bytes)
        cpu = self._tier_stats("cpu", len(self._cpu), self._cpu.nbytes)
        disk = None
        if self._disk is not None:
            d = self._disk_stats
            disk = TierStatistics(
                hits=c["disk"].hits,
                misses=c["disk"].misses,
                loads=c["disk"].loads,
                evictions=c["disk"].evictions,
                reloads_after_eviction=c["disk"].reloads,
                resident=d.entries,
                resident_bytes=d.nbytes,
            )
        return StoreStatistics(
            gpu=gpu,
            cpu=cpu,
            disk=disk,
            gpu_slots=self.model.config.num_slots,
            gpu_leased=sum(1 for s in self._gpu.slots if s.leases > 0),
            cpu_capacity_bytes=self._cpu.capacity_bytes,
            cpu_sticky_bytes=self._cpu.sticky_bytes,
            disk_dropped_at_open=self._disk_stats.dropped_at_open,
            load_failures=self._load_failures,
            loads_in_flight=len(self._gpu_jobs.keys() | self._cpu_jobs.keys()),
            registered=len(self.catalog),
            live_versions=len(self.catalog.live_versions()),
            pinned=tuple(sorted(self._pinned)),
        )

    def _tier_stats(self, tier: Tier, resident: int, nbytes: int) -> TierStatistics:
        c = self._counters[tier]
        return TierStatistics(
            hits=c.hits,
            misses=c.misses,
            loads=c.loads,
            evictions=c.evictions,
            reloads_after_eviction=c.reloads,
            resident=resident,
            resident_bytes=nbytes,
        )

    async def drain(self) -> None:
        """Wait until every load, resolution and disk-cache write in flight has finished.

        Work started meanwhile (a load's write-behind) is waited for too. Failures are not raised
        here: each load reports its own to its waiters. A load waiting for a slot that only a lease
        release can free keeps this waiting until that release.
        """
        while True:
            pending = [task for task in self._tasks if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending)

    @property
    def copy_stream(self) -> Any:
        """The CUDA stream slot writes run on (None on CPU)."""
        return self._writer.stream

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        """Stop: pending loads and resolutions fail with :class:`StoreClosedError`, background work is
        cancelled, worker threads are released. Idempotent; nothing waits on a running file read."""
        if self._closed:
            return
        self._closed = True
        error = StoreClosedError("the adapter store was closed")
        for job in list(self._gpu_jobs.values()):
            job.call.fail(error)
        for call in list(self._cpu_jobs.values()):
            call.fail(error)
        tasks = [*self._tasks, *self.catalog.close()]
        for task in tasks:
            task.cancel()
        self._notify()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for pool in (self._load_pool, self._copy_pool, self._disk_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        # The slots go back to the model only once no slot write can still be running.
        await asyncio.to_thread(self._copy_pool.shutdown, True)
        self.model.release_slots(self)
        if self._disk is not None:
            await asyncio.to_thread(self._disk.close)

    async def __aenter__(self) -> AdapterStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals: bookkeeping -------------------------------------------------------------------

    def _bind_loop(self) -> None:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            if self._disk is not None and self._disk_pool is not None:
                # Open (and repair) the disk cache now, off the loop, rather than at the first lookup.
                self._spawn(self._disk_op(self._disk_pool, self._disk.open), "polylora-disk-open")

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _notify(self) -> None:
        """Wake everything waiting for a slot, a job or a demand change."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the adapter store is closed")

    def _check_alive(self, ref: AdapterRef) -> None:
        if not self.catalog.is_alive(ref.key):
            raise AdapterNotFoundError(
                f"adapter {ref.adapter_id!r} version {ref.version} is no longer registered or referenced"
            )

    def _key_of(self, item: Any) -> AdapterKey | None:
        if isinstance(item, AdapterRef):
            return None if item.is_base else item.key
        if isinstance(item, str):
            ref = self.catalog.current(item)
            return None if ref is None or ref.is_base else ref.key
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int):
            return (item[0], item[1])
        raise TypeError(f"demand keys must be AdapterRef, (adapter_id, version) or an id, got {item!r}")

    def _demand_of(self, key: Hashable) -> int:
        return self._demand.get(key, 0)  # type: ignore[call-overload]

    def _protected(self, key: Hashable) -> bool:
        """Pinned: the current version of a pinned id."""
        assert isinstance(key, tuple)
        return key[0] in self._pinned and self.catalog.is_current(key)

    def _not_a_victim(self, key: Hashable) -> bool:
        """Pinned, or loaded for an ``acquire_lease`` that has not taken hold of it yet."""
        return self._wanted.get(key, 0) > 0 or self._protected(key)  # type: ignore[call-overload]

    def _alive(self, key: Hashable) -> bool:
        assert isinstance(key, tuple)
        return self.catalog.is_alive(key)

    def _count_prefetch_victims(self) -> int:
        return self._gpu.count_victims(
            urgent=False, demand_of=self._demand_of, protected=self._not_a_victim, alive=self._alive
        )

    def _count(self, tier: Tier, *, hit: bool) -> None:
        if hit:
            self._counters[tier].hits += 1
            if self._metrics is not None:
                self._metrics.cache_hit(tier)
        else:
            self._counters[tier].misses += 1
            if self._metrics is not None:
                self._metrics.cache_miss(tier)

    def _note_eviction(self, tier: Tier, key: Hashable | None) -> None:
        self._counters[tier].evictions += 1
        if self._metrics is not None:
            self._metrics.eviction(tier)
        if key is None:
            return
        evicted = self._evicted_at[tier]
        now = self._clock()
        evicted[key] = now
        if len(evicted) > 4096:  # keep the table bounded: only recent evictions can become thrash
            horizon = now - self.config.thrash_window_s
            for old in [k for k, t in evicted.items() if t < horizon]:
                del evicted[old]

    def _note_load(self, tier: Tier, key: Hashable, seconds: float, source: str) -> None:
        self._counters[tier].loads += 1
        if self._metrics is not None:
            self._metrics.load_duration(source, tier, seconds)
        evicted_at = self._evicted_at[tier].pop(key, None)
        if evicted_at is not None and self._clock() - evicted_at <= self.config.thrash_window_s:
            self._counters[tier].reloads += 1
            if self._metrics is not None:
                self._metrics.reload_after_eviction(tier)

    def _report_resident(self, tier: Tier) -> None:
        if self._metrics is None:
            return
        if tier == "gpu":
            self._metrics.set_resident("gpu", self._gpu.resident_count, self._gpu.resident_bytes)
        elif tier == "cpu":
            self._metrics.set_resident("cpu", len(self._cpu), self._cpu.nbytes)
        else:
            self._metrics.set_resident("disk", self._disk_stats.entries, self._disk_stats.nbytes)

    def _note_cpu_evictions(self, evicted: Iterable[Hashable]) -> None:
        for key in evicted:
            self._note_eviction("cpu", key)

    def _release_slots(self, slots: Mapping[AdapterKey, GpuSlot], done_event: Any) -> None:
        changed = False
        for key, slot in slots.items():
            assert slot.key == key and slot.leases > 0, "lease released against a slot it does not hold"
            self._gpu.unlease(slot, done_event)
            if slot.leases == 0 and not self.catalog.is_alive(key):
                self._gpu.free(slot)
                changed = True
        if changed:
            self._report_resident("gpu")
        self._notify()

    def _on_version_dead(self, ref: AdapterRef) -> None:
        """A version nobody can use any more: drop it from every tier (leased slots: at release)."""
        key = ref.key
        self._demand.pop(key, None)
        slot = self._gpu.get(key)
        if slot is not None and slot.state is SlotState.READY and slot.leases == 0:
            self._gpu.free(slot)
            self._report_resident("gpu")
        if self._cpu.remove(key):
            self._report_resident("cpu")
        for tier in _TIERS:
            self._evicted_at[tier].pop(key, None)
        token = self._disk_tokens.pop(key, None)
        if token is not None:
            self._token_keys.pop((ref.adapter_id, token), None)
            # A spill is that version's private copy; a resolver-source cache entry is kept for
            # later versions (or runs) with the same files.
            loop_running = self._loop is not None and self._loop.is_running()
            if ref.kind == "memory" and self._disk is not None and not self._closed and loop_running:
                self._spawn(self._disk_remove(ref.adapter_id, token), "polylora-disk-remove")
        self._spilled.discard(key)
        self._notify()

    # -- internals: loads -------------------------------------------------------------------------

    async def _in_thread(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

    def _start_gpu_job(self, ref: AdapterRef, *, urgent: bool) -> _GpuJob:
        job = _GpuJob(ref, urgent, SharedCall(asyncio.get_running_loop()))
        self._gpu_jobs[ref.key] = job
        job.call.task = self._spawn(self._run_gpu_job(job), f"polylora-gpu-load:{ref.adapter_id[:64]}")
        return job

    async def _run_gpu_job(self, job: _GpuJob) -> None:
        ref = job.ref
        key = ref.key
        try:
            weights = await self._cpu_weights(ref)
            slot = await self._acquire_slot(job)
            if slot is None:  # a prefetch that found no slot it may take: it stays in the CPU tier
                job.call.succeed(None)
                return
            await self._write_slot(slot, key, weights)
            if not self.catalog.is_alive(key):
                if slot.leases == 0:
                    self._gpu.free(slot)
                    self._report_resident("gpu")
                self._check_alive(ref)
            job.call.succeed(slot.index)
        except asyncio.CancelledError:
            job.call.fail(StoreClosedError(f"loading adapter {ref.adapter_id!r} was cancelled: the store closed"))
            raise
        except Exception as exc:
            job.call.fail(exc)
        finally:
            if self._gpu_jobs.get(key) is job:
                del self._gpu_jobs[key]
            self._notify()

    async def _acquire_slot(self, job: _GpuJob) -> GpuSlot | None:
        ref = job.ref
        while True:
            self._check_open()
            self._check_alive(ref)
            changed = self._changed
            victim = self._gpu.choose_victim(
                urgent=job.urgent, demand_of=self._demand_of, protected=self._not_a_victim, alive=self._alive
            )
            if victim is not None:
                previous = self._gpu.reserve(victim, ref.key)
                job.reserved = True
                if previous is not None:
                    if self.catalog.is_alive(previous):  # type: ignore[arg-type]
                        self._note_eviction("gpu", previous)
                    self._report_resident("gpu")
                return victim
            if not job.urgent:
                return None
            if self._gpu.all_protected(self._protected):
                raise SlotsFullError(
                    f"cannot load adapter {ref.adapter_id!r}: every slot holds a pinned adapter "
                    f"({sorted(self._pinned)})"
                )
            await changed.wait()

    async def _write_slot(self, slot: GpuSlot, key: AdapterKey, weights: AdapterWeights) -> None:
        after = list(slot.read_events)
        start = time.perf_counter()
        try:
            event = await self._in_thread(self._copy_pool, self._writer.write, slot.index, weights, after)
        except BaseException as exc:
            if slot.state is SlotState.WRITING and slot.key == key:
                self._gpu.free(slot)
            if not isinstance(exc, asyncio.CancelledError):
                self._load_failures += 1
            raise
        self._gpu.complete(slot, event, weights.nbytes)
        self._note_load("gpu", key, time.perf_counter() - start, "cpu")
        self._report_resident("gpu")

    async def _cpu_weights(self, ref: AdapterRef) -> AdapterWeights:
        weights = self._cpu.get(ref.key)
        if weights is not None:
            self._count("cpu", hit=True)
            return weights
        self._count("cpu", hit=False)
        call = self._cpu_jobs.get(ref.key)
        if call is None:
            call = self._start_cpu_job(ref)
        result = await call.wait()
        assert isinstance(result, AdapterWeights)
        return result

    def _start_cpu_job(self, ref: AdapterRef) -> SharedCall:
        call = SharedCall(asyncio.get_running_loop())
        self._cpu_jobs[ref.key] = call
        call.task = self._spawn(self._run_cpu_job(ref, call), f"polylora-cpu-load:{ref.adapter_id[:64]}")
        return call

    async def _run_cpu_job(self, ref: AdapterRef, call: SharedCall) -> None:
        try:
            call.succeed(await self._load_into_cpu(ref))
        except asyncio.CancelledError:
            call.fail(StoreClosedError(f"loading adapter {ref.adapter_id!r} was cancelled: the store closed"))
            raise
        except Exception as exc:
            if not isinstance(exc, AdapterNotFoundError):  # a version that died meanwhile did not fail
                self._load_failures += 1
                # Once per failed load (waiters share this job), so a background failure is not silent.
                logger.warning("adapter %r version %d failed to load: %s", ref.adapter_id, ref.version, exc)
            call.fail(exc)
        finally:
            if self._cpu_jobs.get(ref.key) is call:
                del self._cpu_jobs[ref.key]
            self._notify()

    def _disk_policy(self, ref: AdapterRef) -> Literal["spill", "cache"] | None:
        if self._disk is None:
            return None
        if ref.kind == "memory":
            return "spill"
        if ref.origin == "resolved":
            return "cache"
        return None

    async def _load_into_cpu(self, ref: AdapterRef) -> AdapterWeights:
        """Disk cache (if it applies) or source -> validated, staged weights in the CPU tier."""
        key = ref.key
        policy = self._disk_policy(ref)
        token: str | None = None
        weights: AdapterWeights | None = None
        raw: RawAdapter | None = None
        disk_error: Exception | None = None
        from_disk = False
        if policy is not None:
            token = await self._disk_token(ref, policy)
            # An in-memory adapter is on disk only once its spill completed: no lookup before that.
            if token is not None and (policy == "cache" or key in self._spilled):
                start = time.perf_counter()
                try:
                    weights = await self._disk_op(self._load_pool, self._read_disk, ref, token)
                except AdapterLoadError as exc:
                    disk_error = exc
                    logger.warning("adapter %r: dropped an unreadable disk-cache entry: %s", ref.adapter_id, exc)
                self._count("disk", hit=weights is not None)
                if weights is not None:
                    from_disk = True
                    self._note_load("cpu", key, time.perf_counter() - start, "disk")
        if weights is None:
            if ref.source is None:
                raise AdapterLoadError(
                    f"adapter {ref.adapter_id!r} version {ref.version}: its only copy (spilled to the disk "
                    f"cache) could not be read"
                ) from disk_error
            start = time.perf_counter()
            raw, weights = await self._in_thread(self._load_pool, self._read_source, ref)
            self._note_load("cpu", key, time.perf_counter() - start, "source")
        assert weights is not None
        self._check_alive(ref)
        sticky = ref.kind == "memory" and key not in self._spilled
        result = self._cpu.put(key, weights, sticky=sticky)
        self._note_cpu_evictions(result.evicted)
        self._report_resident("cpu")
        if sticky:
            # The CPU tier now holds this version's only copy: the source object can go.
            self.catalog.drop_source(ref)
        if policy is not None and token is not None and not from_disk and key not in self._spilled:
            # Write-behind: a resolver's source may be slow or temporary; a spill is the durable copy.
            payload = raw if raw is not None else weights_to_raw(weights)
            self._spawn(self._disk_write(ref, token, payload, policy), "polylora-disk-write")
        return weights

    async def _disk_token(self, ref: AdapterRef, policy: Literal["spill", "cache"]) -> str | None:
        token = self._disk_tokens.get(ref.key)
        if token is not None:
            return token
        if policy == "spill":
            token = f"mem:{uuid.uuid4().hex}"
        else:
            source = ref.source
            if not isinstance(source, Path):
                return None
            token = await self._in_thread(self._load_pool, _fingerprint_directory, source)
            if token is None:
                return None
        if self.catalog.is_alive(ref.key):
            self._disk_tokens[ref.key] = token
            self._token_keys[(ref.adapter_id, token)] = ref.key
        return token

    async def _disk_op(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a disk-tier call in ``pool`` and refresh the tier's statistics snapshot afterwards."""
        disk = self._disk
        assert disk is not None

        def run() -> tuple[_T | None, Exception | None, DiskStats]:
            try:
                return fn(*args), None, disk.stats()
            except Exception as exc:
                return None, exc, disk.stats()

        result, error, stats = await self._in_thread(pool, run)
        self._disk_stats = stats
        self._report_resident("disk")
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    async def _disk_write(self, ref: AdapterRef, token: str, raw: RawAdapter, policy: str) -> None:
        assert self._disk is not None and self._disk_pool is not None
        key = ref.key
        spill = policy == "spill"
        start = time.perf_counter()
        try:
            write = functools.partial(self._disk.write, durable=spill, ephemeral=spill)
            result = await self._disk_op(self._disk_pool, write, ref.adapter_id, token, raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a full or broken disk: the CPU tier keeps (sticky) what it has
            logger.warning("adapter %r: could not write the disk cache: %s", ref.adapter_id, exc)
            return
        for evicted in result.evicted:
            self._note_eviction("disk", self._token_keys.get(evicted))
        if not result.written:
            return
        self._note_load("disk", key, time.perf_counter() - start, "cpu")
        if not spill:
            return
        if not self.catalog.is_alive(key):
            await self._disk_remove(ref.adapter_id, token)
            return
        self._spilled.add(key)
        self._note_cpu_evictions(self._cpu.set_sticky(key, False))
        self._report_resident("cpu")

    async def _disk_remove(self, adapter_id: str, token: str) -> None:
        assert self._disk is not None and self._disk_pool is not None
        try:
            await self._disk_op(self._disk_pool, self._disk.remove, adapter_id, token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("adapter %r: could not remove its disk-cache entry: %s", adapter_id, exc)

    # -- internals: worker-thread functions -------------------------------------------------------

    def _read_source(self, ref: AdapterRef) -> tuple[RawAdapter | None, AdapterWeights]:
        """Worker thread: read + validate + stage from the ref's source."""
        source = ref.source
        if source is None:
            raise AdapterLoadError(f"adapter {ref.adapter_id!r} version {ref.version}: its in-memory source is gone")
        raw: RawAdapter | None
        if isinstance(source, AdapterWeights):
            raw = None
            weights = self.model.prepare_adapter(ref.adapter_id, source, pin_memory=self._pin)
        else:
            raw = (
                source
                if isinstance(source, RawAdapter)
                else read_peft_directory(ref.adapter_id, source, pin_memory=self._pin)
            )
            weights = self.model.prepare_adapter(ref.adapter_id, raw, pin_memory=self._pin)
        return raw, stage_weights(weights, pin=self._pin)

    def _read_disk(self, ref: AdapterRef, token: str) -> AdapterWeights | None:
        """Worker thread: the disk-cache copy, validated and staged; None if not cached."""
        assert self._disk is not None
        raw = self._disk.read(ref.adapter_id, token, pin_memory=self._pin)
        if raw is None:
            return None
        try:
            weights = self.model.prepare_adapter(ref.adapter_id, raw, pin_memory=self._pin)
        except AdapterLoadError:
            self._disk.remove(ref.adapter_id, token)
            raise
        return stage_weights(weights, pin=self._pin)


def _fingerprint_directory(path: Path) -> str | None:
    """Worker thread: a content token for a PEFT directory (real path, file sizes and mtimes)."""
    try:
        real = path.resolve(strict=True)
        parts = [str(real)]
        for name in (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE):
            try:
                st = (real / name).stat()
            except FileNotFoundError:
                continue
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return "dir:" + hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()


__all__ = [
    "BASE_REF",
    "AdapterRef",
    "AdapterStore",
    "BatchLease",
    "StoreConfig",
    "StoreObserver",
    "StoreStatistics",
    "TierStatistics",
]
