"""AdapterStore: the facade over the adapter tiers and the prefetch pipeline.

It owns the store's lifecycle and its public methods (register / resolve, demand and pins,
``ensure_gpu``, leases, prefetch, statistics, shutdown) and delegates the work to its parts:
loads (:mod:`._loads`), the victim policy (:mod:`._policy`), leases (:mod:`._leases`), the disk
policy (:mod:`._disk_policy`) and accounting (:mod:`._accounting`), over the tiers
(:mod:`._cpu_tier`, :mod:`._gpu_tier`, :mod:`._disk_tier`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from .._catalog import AdapterCatalog, AdapterKey, AdapterRef, Resolver
from .._config import check_adapter_id
from .._errors import AdapterNotFoundError, ConfigError, SlotsFullError, StoreClosedError
from .._model import MultiLoraModel
from ..adapters import AdapterWeights, RawAdapter, check_source
from ._accounting import Accounting, StoreObserver, StoreStatistics, Tier
from ._config import StoreConfig
from ._cpu_tier import CpuTier
from ._gpu_tier import GpuSlots, SlotState
from ._leases import BatchLease, Leases
from ._lifecycle import Lifecycle
from ._loads import Loads, check_alive
from ._policy import VictimPolicy


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
        clock: monotonic seconds; every duration and deadline of the store comes from it (minimum
            residency, thrash windows, load durations). Replace it in tests to control them.

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
        self._clock = clock
        pin = config.pin_memory if config.pin_memory is not None else model.device.type == "cuda"
        # What registration checks a source against (the wrapped layers and heads never change).
        self._layer_shapes = model.layer_shapes()
        self._head_specs = model.head_specs()
        self.catalog = AdapterCatalog(resolver, on_version_dead=self._on_version_dead, check=self._check_source)
        self._life = Lifecycle()
        self._gpu = GpuSlots(model.config.num_slots, clock)
        self._policy = VictimPolicy(
            min_residency_s=config.min_residency_s,
            clock=clock,
            alive=self.catalog.is_alive,
            is_current=self.catalog.is_current,
        )
        self._cpu = CpuTier(config.cpu_bytes, demand_of=self._policy.demand_of)
        self._accounting = Accounting(
            metrics, thrash_window_s=config.thrash_window_s, clock=clock, residency=self._residency
        )
        self._loads = Loads(
            model,
            config,
            catalog=self.catalog,
            gpu=self._gpu,
            cpu=self._cpu,
            policy=self._policy,
            accounting=self._accounting,
            life=self._life,
            pin=pin,
            clock=clock,
        )
        self._disk = self._loads.disk
        self._leases = Leases(
            gpu=self._gpu,
            loads=self._loads,
            policy=self._policy,
            accounting=self._accounting,
            catalog=self.catalog,
            life=self._life,
        )

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
        self._policy.demand = table
        self._life.notify()

    def pin(self, adapter_id: str) -> None:
        """Never evict ``adapter_id`` (its current version) from the GPU once loaded; see :meth:`preload`.

        Raises:
            SlotsFullError: every slot is already pinned.
        """
        check_adapter_id(adapter_id)
        pinned = self._policy.pinned
        if adapter_id not in pinned and len(pinned) >= self.model.config.num_slots:
            raise SlotsFullError(
                f"cannot pin {adapter_id!r}: all {self.model.config.num_slots} slots are pinned ({sorted(pinned)})"
            )
        pinned.add(adapter_id)

    def unpin(self, adapter_id: str) -> None:
        self._policy.pinned.discard(adapter_id)
        self._life.notify()

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
        return self._loads.prefetch(items, gpu_items=gpu_items, warm_cpu=warm_cpu)

    def note_gpu_lookup(self, ref: AdapterRef) -> bool:
        """Count one need for ``ref`` as a GPU-tier hit (resident now) or miss; returns which.

        For schedulers that count per request when it arrives, then wait with
        ``ensure_gpu(ref, count=False)`` so the same need is not counted twice.
        """
        if ref.is_base:
            return True
        hit = self.is_gpu_ready(ref)
        self._accounting.lookup("gpu", hit=hit)
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
        check_alive(self.catalog, ref)
        key = ref.key
        slot = self._gpu.get(key)
        if slot is not None and slot.state is SlotState.READY:
            if count:
                self._accounting.lookup("gpu", hit=True)
            slot.last_used = self._clock()
            return slot.index
        if count:
            self._accounting.lookup("gpu", hit=False)
        return await self._loads.wait_gpu(ref)

    def lease(self, refs: Iterable[AdapterRef]) -> BatchLease:
        """Lease the slots of a batch's adapters (all must be GPU-ready); base refs need no slot.

        Raises:
            AdapterNotReadyError: an adapter's slot write has not been issued.
        """
        self._check_open()
        self._bind_loop()
        return self._leases.lease(refs)

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
        return await self._leases.acquire(refs)

    # -- statistics, shutdown ---------------------------------------------------------------------

    def statistics(self) -> StoreStatistics:
        """A consistent snapshot of counters and residency (host-side, cheap)."""
        acct = self._accounting
        return StoreStatistics(
            gpu=acct.tier_statistics("gpu"),
            cpu=acct.tier_statistics("cpu"),
            disk=acct.tier_statistics("disk") if self._disk.enabled else None,
            gpu_slots=self.model.config.num_slots,
            gpu_leased=sum(1 for s in self._gpu.slots if s.leases > 0),
            cpu_capacity_bytes=self._cpu.capacity_bytes,
            cpu_sticky_bytes=self._cpu.sticky_bytes,
            disk_dropped_at_open=self._disk.stats.dropped_at_open,
            load_failures=acct.load_failures,
            loads_in_flight=self._loads.in_flight,
            registered=len(self.catalog),
            live_versions=len(self.catalog.live_versions()),
            pinned=tuple(sorted(self._policy.pinned)),
        )

    async def drain(self) -> None:
        """Wait until every load, resolution and disk-cache write in flight has finished.

        Work started meanwhile (a load's write-behind) is waited for too. Failures are not raised
        here: each load reports its own to its waiters. A load waiting for a slot that only a lease
        release can free keeps this waiting until that release.
        """
        await self._life.drain()

    @property
    def copy_stream(self) -> Any:
        """The CUDA stream slot writes run on (None on CPU)."""
        return self._loads.writer.stream

    @property
    def closed(self) -> bool:
        return self._life.closed

    async def aclose(self) -> None:
        """Stop: pending loads and resolutions fail with :class:`StoreClosedError`, background work is
        cancelled, worker threads are released. Idempotent; nothing waits on a running file read."""
        if self._life.closed:
            return
        self._life.closed = True
        tasks = [*self._loads.close(StoreClosedError("the adapter store was closed")), *self.catalog.close()]
        tasks += self._life.tasks
        for task in tasks:
            task.cancel()
        self._life.notify()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        # The slots go back to the model only once no slot write can still be running.
        await self._loads.shutdown_threads()
        self.model.release_slots(self)
        await self._disk.close()

    async def __aenter__(self) -> AdapterStore:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- internals -----------------------------------------------------------------------------------

    def _bind_loop(self) -> None:
        if self._life.loop is None and self._life.bind():
            self._disk.open_in_background()

    def _check_open(self) -> None:
        if self._life.closed:
            raise StoreClosedError("the adapter store is closed")

    def _key_of(self, item: Any) -> AdapterKey | None:
        if isinstance(item, AdapterRef):
            return None if item.is_base else item.key
        if isinstance(item, str):
            ref = self.catalog.current(item)
            return None if ref is None or ref.is_base else ref.key
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str) and isinstance(item[1], int):
            return (item[0], item[1])
        raise TypeError(f"demand keys must be AdapterRef, (adapter_id, version) or an id, got {item!r}")

    def _residency(self, tier: Tier) -> tuple[int, int]:
        """What ``tier`` holds now: (adapters, bytes)."""
        if tier == "gpu":
            return self._gpu.resident_count, self._gpu.resident_bytes
        if tier == "cpu":
            return len(self._cpu), self._cpu.nbytes
        return self._disk.stats.entries, self._disk.stats.nbytes

    def _on_version_dead(self, ref: AdapterRef) -> None:
        """A version nobody can use any more: drop it from every tier (leased slots: at release)."""
        key = ref.key
        self._policy.demand.pop(key, None)
        slot = self._gpu.get(key)
        if slot is not None and slot.state is SlotState.READY and slot.leases == 0:
            self._gpu.free(slot)
            self._accounting.report_resident("gpu")
        if self._cpu.remove(key):
            self._accounting.report_resident("cpu")
        self._accounting.forget(key)
        self._disk.forget(ref)
        self._life.notify()
