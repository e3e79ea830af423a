"""Loads: source or disk -> CPU tier -> GPU slot, each one single flight, and the prefetch budget.

* Reading and validating run in a small thread pool, never on the event loop. Slot writes are
  issued from one copy thread, on a dedicated CUDA stream (:class:`._gpu_tier.SlotWriter`).
* Every load is single flight (:class:`.._single_flight.SingleFlight`): concurrent needs of one
  version share one read and one slot write; a failure fails only that version's waiters and is
  forgotten (the next need retries).
* A GPU load takes the slot the victim policy picks (:mod:`._policy`); a prefetch (not urgent)
  that finds none stops at the CPU tier. A need raises its load's urgency while it runs.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

from .._catalog import AdapterCatalog, AdapterKey, AdapterRef
from .._errors import AdapterLoadError, AdapterNotFoundError, SlotsFullError, StoreClosedError
from .._model import MultiLoraModel
from .._single_flight import SharedCall, SingleFlight
from ..adapters import AdapterWeights, RawAdapter, read_peft_directory
from ._accounting import Accounting
from ._config import StoreConfig
from ._cpu_tier import CpuTier, stage_weights
from ._disk_policy import DiskPolicy, in_thread
from ._disk_tier import weights_to_raw
from ._gpu_tier import GpuSlot, GpuSlots, SlotState, SlotWriter
from ._lifecycle import Lifecycle
from ._policy import VictimPolicy

logger = logging.getLogger("polylora_async")


class _GpuJob(SharedCall):
    """One in-flight GPU load of one version; ``urgent`` may be raised while it runs."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.urgent = False
        self.reserved = False


def check_alive(catalog: AdapterCatalog, ref: AdapterRef) -> None:
    """Raises AdapterNotFoundError when ``ref``'s version is no longer registered or referenced."""
    if not catalog.is_alive(ref.key):
        raise AdapterNotFoundError(
            f"adapter {ref.adapter_id!r} version {ref.version} is no longer registered or referenced"
        )


def _load_cancelled(key: AdapterKey) -> StoreClosedError:
    return StoreClosedError(f"loading adapter {key[0]!r} was cancelled: the store closed")


class Loads:
    """The store's CPU and GPU load jobs, the threads they run in, and prefetching.

    Args:
        model: the wrapped model (validates adapters, owns the slots written into).
        config: the store's config.
        catalog, gpu, cpu, policy, accounting, life: the store's other parts.
        pin: stage CPU-tier weights in page-locked memory.
        clock: the store's clock, for load durations.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        config: StoreConfig,
        *,
        catalog: AdapterCatalog,
        gpu: GpuSlots,
        cpu: CpuTier,
        policy: VictimPolicy,
        accounting: Accounting,
        life: Lifecycle,
        pin: bool,
        clock: Callable[[], float],
    ) -> None:
        self._model = model
        self._config = config
        self._catalog = catalog
        self._gpu = gpu
        self._cpu = cpu
        self._policy = policy
        self._accounting = accounting
        self._life = life
        self._pin = pin
        self._clock = clock
        self.writer = SlotWriter(model)
        self._load_pool = ThreadPoolExecutor(config.load_threads, thread_name_prefix="polylora-load")
        self._copy_pool = ThreadPoolExecutor(1, thread_name_prefix="polylora-copy")
        self.disk = DiskPolicy(
            config,
            catalog=catalog,
            accounting=accounting,
            life=life,
            read_pool=self._load_pool,
            validate=self._validate,
            pin=pin,
            on_spilled=self._on_spilled,
            clock=clock,
        )
        self.gpu_jobs: SingleFlight[AdapterKey, _GpuJob] = SingleFlight(
            _GpuJob, cancelled=_load_cancelled, spawn=life.spawn, on_done=life.notify
        )
        self.cpu_jobs: SingleFlight[AdapterKey, SharedCall] = SingleFlight(
            SharedCall, cancelled=_load_cancelled, spawn=life.spawn, on_error=self._cpu_failed, on_done=life.notify
        )

    @property
    def in_flight(self) -> int:
        """Versions with a load running (to the CPU tier, or on to the GPU)."""
        return len(set(self.gpu_jobs) | set(self.cpu_jobs))

    # -- GPU loads ---------------------------------------------------------------------------------

    def urgent_gpu_job(self, ref: AdapterRef) -> _GpuJob:
        """Start or join ``ref``'s GPU load, which a need is now waiting for."""
        job = self.gpu_jobs.get(ref.key)
        if job is None:
            return self._start_gpu_job(ref, urgent=True)
        if not job.urgent:
            job.urgent = True
            self._life.notify()
        return job

    async def wait_gpu(self, ref: AdapterRef) -> int:
        """Wait until ``ref`` has a slot whose write is issued (loading it if needed); returns the slot."""
        key = ref.key
        while True:
            slot = self._gpu.get(key)
            if slot is not None and slot.state is SlotState.READY:
                return slot.index
            self._life.check_open()
            check_alive(self._catalog, ref)
            await self.urgent_gpu_job(ref).wait()

    def _start_gpu_job(self, ref: AdapterRef, *, urgent: bool) -> _GpuJob:
        name = f"polylora-gpu-load:{ref.adapter_id[:64]}"
        job = self.gpu_jobs.start(ref.key, lambda job: self._run_gpu_job(ref, job), name)
        job.urgent = urgent
        return job

    async def _run_gpu_job(self, ref: AdapterRef, job: _GpuJob) -> int | None:
        key = ref.key
        weights = await self._cpu_weights(ref)
        slot = await self._acquire_slot(ref, job)
        if slot is None:  # a prefetch that found no slot it may take: it stays in the CPU tier
            return None
        await self._write_slot(slot, key, weights)
        if not self._catalog.is_alive(key):
            if slot.leases == 0:
                self._gpu.free(slot)
                self._accounting.report_resident("gpu")
            check_alive(self._catalog, ref)
        return slot.index

    async def _acquire_slot(self, ref: AdapterRef, job: _GpuJob) -> GpuSlot | None:
        while True:
            self._life.check_open()
            check_alive(self._catalog, ref)
            changed = self._life.changed
            victim = self._policy.choose_slot(self._gpu.slots, urgent=job.urgent)
            if victim is not None:
                previous = self._gpu.reserve(victim, ref.key)
                job.reserved = True
                if previous is not None:
                    if self._catalog.is_alive(previous):  # type: ignore[arg-type]
                        self._accounting.eviction("gpu", previous)
                    self._accounting.report_resident("gpu")
                return victim
            if not job.urgent:
                return None
            if self._policy.all_pinned(self._gpu.slots):
                raise SlotsFullError(
                    f"cannot load adapter {ref.adapter_id!r}: every slot holds a pinned adapter "
                    f"({sorted(self._policy.pinned)})"
                )
            await changed.wait()

    async def _write_slot(self, slot: GpuSlot, key: AdapterKey, weights: AdapterWeights) -> None:
        after = list(slot.read_events)
        start = self._clock()
        try:
            event = await in_thread(self._copy_pool, self.writer.write, slot.index, weights, after)
        except BaseException as exc:
            if slot.state is SlotState.WRITING and slot.key == key:
                self._gpu.free(slot)
            if not isinstance(exc, asyncio.CancelledError):
                self._accounting.load_failures += 1
            raise
        self._gpu.complete(slot, event, weights.nbytes)
        self._accounting.load("gpu", key, self._clock() - start, "cpu")
        self._accounting.report_resident("gpu")

    # -- CPU loads ---------------------------------------------------------------------------------

    async def _cpu_weights(self, ref: AdapterRef) -> AdapterWeights:
        weights = self._cpu.get(ref.key)
        if weights is not None:
            self._accounting.lookup("cpu", hit=True)
            return weights
        self._accounting.lookup("cpu", hit=False)
        result = await self._join_cpu_job(ref).wait()
        assert isinstance(result, AdapterWeights)
        return result

    def _join_cpu_job(self, ref: AdapterRef) -> SharedCall:
        name = f"polylora-cpu-load:{ref.adapter_id[:64]}"
        return self.cpu_jobs.join(ref.key, lambda _: self._load_into_cpu(ref), name)

    def _cpu_failed(self, key: AdapterKey, exc: Exception) -> None:
        if not isinstance(exc, AdapterNotFoundError):  # a version that died meanwhile did not fail
            self._accounting.load_failures += 1
            # Once per failed load (waiters share this job), so a background failure is not silent.
            logger.warning("adapter %r version %d failed to load: %s", key[0], key[1], exc)

    async def _load_into_cpu(self, ref: AdapterRef) -> AdapterWeights:
        """Disk cache (if it applies) or source -> validated, staged weights in the CPU tier."""
        key = ref.key
        disk = self.disk
        mode = disk.mode(ref)
        token: str | None = None
        weights: AdapterWeights | None = None
        raw: RawAdapter | None = None
        disk_error: Exception | None = None
        from_disk = False
        if mode is not None:
            token = await disk.token(ref, mode)
            # An in-memory adapter is on disk only once its spill completed: no lookup before that.
            if token is not None and (mode == "cache" or disk.is_spilled(key)):
                start = self._clock()
                try:
                    weights = await disk.read(ref, token)
                except AdapterLoadError as exc:
                    disk_error = exc
                    logger.warning("adapter %r: dropped an unreadable disk-cache entry: %s", ref.adapter_id, exc)
                self._accounting.lookup("disk", hit=weights is not None)
                if weights is not None:
                    from_disk = True
                    self._accounting.load("cpu", key, self._clock() - start, "disk")
        if weights is None:
            if ref.source is None:
                raise AdapterLoadError(
                    f"adapter {ref.adapter_id!r} version {ref.version}: its only copy (spilled to the disk "
                    f"cache) could not be read"
                ) from disk_error
            start = self._clock()
            raw, weights = await in_thread(self._load_pool, self._read_source, ref)
            self._accounting.load("cpu", key, self._clock() - start, "source")
        assert weights is not None
        check_alive(self._catalog, ref)
        spilled = disk.is_spilled(key)
        sticky = ref.kind == "memory" and not spilled
        result = self._cpu.put(key, weights, sticky=sticky)
        self._accounting.cpu_evictions(result.evicted)
        self._accounting.report_resident("cpu")
        if sticky:
            # The CPU tier now holds this version's only copy: the source object can go.
            self._catalog.drop_source(ref)
        if mode is not None and token is not None and not from_disk and not spilled:
            # Write-behind: a resolver's source may be slow or temporary; a spill is the durable copy.
            disk.write_behind(ref, token, raw if raw is not None else weights_to_raw(weights), mode)
        return weights

    def _on_spilled(self, key: AdapterKey) -> None:
        """The disk holds a copy now: the CPU-tier entry becomes evictable."""
        self._accounting.cpu_evictions(self._cpu.set_sticky(key, False))
        self._accounting.report_resident("cpu")

    def _validate(self, adapter_id: str, source: RawAdapter | AdapterWeights) -> AdapterWeights:
        """Worker thread: the model's validation of an adapter (tensors staged as ``pin`` asks)."""
        return self._model.prepare_adapter(adapter_id, source, pin_memory=self._pin)

    def _read_source(self, ref: AdapterRef) -> tuple[RawAdapter | None, AdapterWeights]:
        """Worker thread: read + validate + stage from the ref's source."""
        source = ref.source
        if source is None:
            raise AdapterLoadError(f"adapter {ref.adapter_id!r} version {ref.version}: its in-memory source is gone")
        raw: RawAdapter | None
        if isinstance(source, AdapterWeights):
            raw = None
            weights = self._validate(ref.adapter_id, source)
        else:
            raw = (
                source
                if isinstance(source, RawAdapter)
                else read_peft_directory(ref.adapter_id, source, pin_memory=self._pin)
            )
            weights = self._validate(ref.adapter_id, raw)
        return raw, stage_weights(weights, pin=self._pin)

    # -- prefetch ----------------------------------------------------------------------------------

    def prefetch(self, items: Iterable[AdapterRef | str], *, gpu_items: int | None, warm_cpu: bool) -> int:
        """:meth:`AdapterStore.prefetch`: start GPU loads while a prefetch may take a slot, then warm the CPU tier."""
        refs: dict[AdapterKey, AdapterRef] = {}
        for item in items:
            if isinstance(item, AdapterRef):
                ref = item
            else:
                current = self._catalog.current(item)
                if current is None:
                    if not self._catalog.has_resolver:
                        raise AdapterNotFoundError(f"adapter {item!r} is not registered")
                    self._life.spawn(self._resolve_then_prefetch(item), f"polylora-prefetch-resolve:{item[:64]}")
                    continue
                ref = current
            if ref.is_base or not self._catalog.is_alive(ref.key):
                continue
            refs.setdefault(ref.key, ref)
        # The GPU budget: slots a prefetch may take now, less those that loads already started will take.
        unreserved = sum(1 for job in self.gpu_jobs.calls() if not job.reserved)
        gpu_budget = len(self._policy.rank(self._gpu.slots, urgent=False)) - unreserved
        cpu_budget = self._config.prefetch_cpu_ahead
        started = 0
        for position, (key, ref) in enumerate(refs.items()):
            if self._gpu.get(key) is not None or key in self.gpu_jobs:
                continue
            if gpu_budget > 0 and (gpu_items is None or position < gpu_items):
                self._start_gpu_job(ref, urgent=False)
                gpu_budget -= 1
                started += 1
            elif (
                warm_cpu
                and cpu_budget > 0
                and self._config.cpu_bytes > 0
                and key not in self._cpu
                and key not in self.cpu_jobs
            ):
                self._join_cpu_job(ref)
                cpu_budget -= 1
                started += 1
        return started

    async def _resolve_then_prefetch(self, adapter_id: str) -> None:
        try:
            ref = await self._catalog.resolve(adapter_id, acquire=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # speculative: the next real need reports it
            logger.debug("prefetch of %r: resolution failed: %s", adapter_id, exc)
            return
        if not self._life.closed:
            self.prefetch([ref], gpu_items=None, warm_cpu=True)

    # -- shutdown ----------------------------------------------------------------------------------

    def close(self, error: BaseException) -> list[asyncio.Task[object]]:
        """Fail every pending load with ``error`` and cancel it; returns the tasks to await."""
        return [*self.gpu_jobs.close(error), *self.cpu_jobs.close(error)]

    async def shutdown_threads(self) -> None:
        """Release the worker threads; returns once no slot write can still be running."""
        for pool in (self._load_pool, self._copy_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        self.disk.shutdown_pool()
        await asyncio.to_thread(self._copy_pool.shutdown, True)
