"""What the store counts and reports: per-tier hits, misses, loads, evictions and thrash reloads.

Hit/miss accounting (``statistics()`` and the observer): a *lookup* is counted when a tier is asked
to serve a need of the level above it. GPU lookups are :meth:`AdapterStore.ensure_gpu` calls (and
each distinct adapter of :meth:`AdapterStore.acquire_lease`); CPU lookups are GPU loads; disk
lookups are CPU loads of adapters the disk tier applies to. Prefetches count no lookups (they are
speculative) but their loads are counted as loads. So ``gpu.hits / (gpu.hits + gpu.misses)`` is
the share of needs that found their adapter already on the GPU.

A load of an adapter into a tier within ``thrash_window_s`` of its eviction from that tier is a
thrash reload; the times come from the store's clock. Counting it changes no decision, so the
table of recent evictions lives here, not with the victim policy.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

Tier = Literal["gpu", "cpu", "disk"]
TIERS: tuple[Tier, ...] = ("gpu", "cpu", "disk")

_EVICTIONS_KEPT = 4096
"""Past this many remembered evictions per tier, those older than the thrash window are dropped."""


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


@dataclass(frozen=True)
class TierStatistics:
    """Counters of one tier since the store was created, and what it holds now.

    Attributes:
        hits, misses: lookups (see :mod:`polylora_async.store` for what counts as one).
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


class Accounting:
    """The store's counters per tier, its thrash table, and what it tells the observer.

    Args:
        observer: optional :class:`StoreObserver`.
        thrash_window_s: see :class:`StoreConfig`.
        clock: the store's clock (monotonic seconds).
        residency: ``residency(tier) -> (count, nbytes)`` held by that tier now, for the observer.
    """

    def __init__(
        self,
        observer: StoreObserver | None,
        *,
        thrash_window_s: float,
        clock: Callable[[], float],
        residency: Callable[[Tier], tuple[int, int]],
    ) -> None:
        self._observer = observer
        self._thrash_window_s = thrash_window_s
        self._clock = clock
        self._residency = residency
        self._counters = {tier: _Counters() for tier in TIERS}
        self._evicted_at: dict[Tier, dict[Hashable, float]] = {tier: {} for tier in TIERS}
        self.load_failures = 0

    def lookup(self, tier: Tier, *, hit: bool) -> None:
        """One lookup in ``tier``, found (``hit``) or not."""
        if hit:
            self._counters[tier].hits += 1
            if self._observer is not None:
                self._observer.cache_hit(tier)
        else:
            self._counters[tier].misses += 1
            if self._observer is not None:
                self._observer.cache_miss(tier)

    def eviction(self, tier: Tier, key: Hashable | None) -> None:
        """A live adapter (``key``, if known) was evicted from ``tier``."""
        self._counters[tier].evictions += 1
        if self._observer is not None:
            self._observer.eviction(tier)
        if key is None:
            return
        evicted = self._evicted_at[tier]
        now = self._clock()
        evicted[key] = now
        if len(evicted) > _EVICTIONS_KEPT:  # keep the table bounded: only recent evictions can become thrash
            horizon = now - self._thrash_window_s
            for old in [k for k, t in evicted.items() if t < horizon]:
                del evicted[old]

    def cpu_evictions(self, evicted: Iterable[Hashable]) -> None:
        for key in evicted:
            self.eviction("cpu", key)

    def load(self, tier: Tier, key: Hashable, seconds: float, source: str) -> None:
        """``key`` was loaded into ``tier`` from ``source`` in ``seconds``; counts a thrash reload too."""
        self._counters[tier].loads += 1
        if self._observer is not None:
            self._observer.load_duration(source, tier, seconds)
        evicted_at = self._evicted_at[tier].pop(key, None)
        if evicted_at is not None and self._clock() - evicted_at <= self._thrash_window_s:
            self._counters[tier].reloads += 1
            if self._observer is not None:
                self._observer.reload_after_eviction(tier)

    def forget(self, key: Hashable) -> None:
        """A dead version: its evictions can no longer become reloads."""
        for tier in TIERS:
            self._evicted_at[tier].pop(key, None)

    def report_resident(self, tier: Tier) -> None:
        """Tell the observer what ``tier`` holds now."""
        if self._observer is None:
            return
        count, nbytes = self._residency(tier)
        self._observer.set_resident(tier, count, nbytes)

    def tier_statistics(self, tier: Tier) -> TierStatistics:
        c = self._counters[tier]
        count, nbytes = self._residency(tier)
        return TierStatistics(
            hits=c.hits,
            misses=c.misses,
            loads=c.loads,
            evictions=c.evictions,
            reloads_after_eviction=c.reloads,
            resident=count,
            resident_bytes=nbytes,
        )
