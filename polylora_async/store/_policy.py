"""The victim policy: which GPU slot a load takes, and which CPU entries go first.

Decisions only, no I/O, no model: the ranking is a pure function of the tiers' state, the demand
table (queued requests per version, from the scheduler), pins and the clock, so it is tested on its
own (``tests/test_store_policy.py``).

Victim order, for a load that needs a slot (:func:`rank_slots`):
  1. an empty slot, then a slot holding a dead version (nobody can use it any more);
  2. never: a slot being written, leased by a batch, or *held* (a pinned adapter, or one loaded
     for an ``acquire_lease`` that has not taken hold of it yet);
  3. among the rest, the smallest ``(has_demand, within_min_residency, last_used)``: adapters
     with no queued requests first, then those resident longer than ``min_residency_s``, then
     least recently used.
A non-urgent load (a prefetch) never takes a slot whose adapter has queued requests or that is
still within its minimum residency; an urgent one (``ensure_gpu``) may, as a last resort. When no
slot may be taken, a prefetch gives up (its adapter stays in the CPU tier) and an urgent load waits
for a slot to change, unless every slot is pinned (:meth:`VictimPolicy.all_pinned`: the store
raises ``SlotsFullError``).

The CPU tier evicts in LRU order, entries nobody queued a request for first
(:func:`cpu_eviction_order`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Sequence

from .._catalog import AdapterKey
from ._gpu_tier import GpuSlot, SlotState


def rank_slots(
    slots: Iterable[GpuSlot],
    *,
    now: float,
    min_residency_s: float,
    urgent: bool,
    demand_of: Callable[[Hashable], int],
    held: Callable[[Hashable], bool],
    alive: Callable[[Hashable], bool],
) -> list[GpuSlot]:
    """The slots a load may take, best victim first (see the module docstring for the order)."""
    ranked = []
    for slot in slots:
        if slot.state is SlotState.WRITING or slot.leases > 0:
            continue
        if slot.state is SlotState.EMPTY:
            ranked.append(((-2, 0, 0.0, slot.index), slot))
            continue
        assert slot.key is not None
        if not alive(slot.key):
            ranked.append(((-1, 0, slot.last_used, slot.index), slot))
            continue
        if held(slot.key):
            continue
        demanded = demand_of(slot.key) > 0
        recent = now - slot.loaded_at < min_residency_s
        if not urgent and (demanded or recent):
            continue
        ranked.append(((int(demanded), int(recent), slot.last_used, slot.index), slot))
    ranked.sort(key=lambda item: item[0])
    return [slot for _, slot in ranked]


def cpu_eviction_order(lru_keys: Sequence[Hashable], demand_of: Callable[[Hashable], int]) -> list[Hashable]:
    """Evictable CPU entries (given least recently used first) in the order they go: two LRU passes,
    entries nobody is waiting for first, then demanded ones."""
    order = [k for k in lru_keys if demand_of(k) <= 0]
    order += [k for k in lru_keys if demand_of(k) > 0]
    return order


class VictimPolicy:
    """The store's eviction rules and the state they read: demand, pins, and versions held for a lease.

    Args:
        min_residency_s: see :class:`StoreConfig`.
        clock: the store's clock (monotonic seconds): residency is measured against it.
        alive: whether a version can still be used (the catalog's ``is_alive``).
        is_current: whether a version is its id's current one (a pin covers the current version only).
    """

    def __init__(
        self,
        *,
        min_residency_s: float,
        clock: Callable[[], float],
        alive: Callable[[AdapterKey], bool],
        is_current: Callable[[AdapterKey], bool],
    ) -> None:
        self.min_residency_s = min_residency_s
        self._clock = clock
        self._alive = alive
        self._is_current = is_current
        self.demand: dict[AdapterKey, int] = {}
        """Queued requests per version (absent: none), replaced by the scheduler's ``set_demand``."""
        self.pinned: set[str] = set()
        """Ids whose current version is never evicted from the GPU."""
        self._wanted: Counter[AdapterKey] = Counter()  # keys an acquire_lease is waiting to hold

    def demand_of(self, key: Hashable) -> int:
        return self.demand.get(key, 0)  # type: ignore[call-overload]

    def is_pinned(self, key: Hashable) -> bool:
        """Pinned: the current version of a pinned id."""
        assert isinstance(key, tuple)
        return key[0] in self.pinned and self._is_current(key)

    def is_held(self, key: Hashable) -> bool:
        """Pinned, or loaded for an ``acquire_lease`` that has not taken hold of it yet."""
        return self._wanted.get(key, 0) > 0 or self.is_pinned(key)  # type: ignore[call-overload]

    def want(self, keys: Iterable[AdapterKey]) -> None:
        """An ``acquire_lease`` waits to hold ``keys``: none of them is a victim meanwhile."""
        self._wanted.update(keys)

    def unwant(self, keys: Iterable[AdapterKey]) -> None:
        for key in keys:
            self._wanted[key] -= 1
            if self._wanted[key] <= 0:
                del self._wanted[key]

    def rank(self, slots: Iterable[GpuSlot], *, urgent: bool) -> list[GpuSlot]:
        return rank_slots(
            slots,
            now=self._clock(),
            min_residency_s=self.min_residency_s,
            urgent=urgent,
            demand_of=self.demand_of,
            held=self.is_held,
            alive=self._is_alive,
        )

    def choose_slot(self, slots: Iterable[GpuSlot], *, urgent: bool) -> GpuSlot | None:
        """The slot a new load should take, or None if none may be taken now."""
        ranked = self.rank(slots, urgent=urgent)
        return ranked[0] if ranked else None

    def all_pinned(self, slots: Iterable[GpuSlot]) -> bool:
        """True when every slot holds a pinned adapter: nothing else can ever be loaded."""
        return all(s.state is not SlotState.EMPTY and s.key is not None and self.is_pinned(s.key) for s in slots)

    def _is_alive(self, key: Hashable) -> bool:
        assert isinstance(key, tuple)
        return self._alive(key)
