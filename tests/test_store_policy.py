"""The store's victim policy and thrash accounting on their own: no model, no threads, a fake clock.

One test at the end drives a real store with a fake clock: residency and thrash windows follow the
injected clock, not wall time (no sleeps anywhere).
"""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

from polylora_async import MultiLoraModel, WrapConfig
from polylora_async.store import AdapterStore, StoreConfig
from polylora_async.store._accounting import Accounting
from polylora_async.store._gpu_tier import GpuSlots
from polylora_async.store._policy import VictimPolicy, cpu_eviction_order
from tests._tiny import TARGETS, TinyModel, write_adapter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _setup(
    num_slots: int, *, min_residency_s: float = 0.5, dead: frozenset[Hashable] = frozenset(),
    replaced: frozenset[Hashable] = frozenset(),
) -> tuple[GpuSlots, VictimPolicy, FakeClock]:
    clock = FakeClock()
    policy = VictimPolicy(
        min_residency_s=min_residency_s,
        clock=clock,
        alive=lambda key: key not in dead,
        is_current=lambda key: key not in replaced,
    )
    return GpuSlots(num_slots, clock), policy, clock


def _fill(slots: GpuSlots, clock: FakeClock, names: str) -> None:
    """Load one version of each name, one slot each, one clock second apart (first = least recent)."""
    for name, slot in zip(names, slots.slots, strict=False):
        slots.reserve(slot, (name, 1))
        slots.complete(slot, None, 10)
        clock.now += 1


def _victim(slots: GpuSlots, policy: VictimPolicy, *, urgent: bool = True) -> Any:
    slot = policy.choose_slot(slots.slots, urgent=urgent)
    return None if slot is None else (slot.index, slot.key)


def test_an_empty_slot_first_then_lru_among_unheld() -> None:
    slots, policy, clock = _setup(3)
    _fill(slots, clock, "ab")
    clock.now += 10
    assert _victim(slots, policy) == (3, None)  # the empty slot, before any resident adapter
    third = slots.slots[2]
    slots.reserve(third, ("c", 1))
    assert _victim(slots, policy) == (1, ("a", 1))  # a slot being written is nobody's victim; LRU
    slots.complete(third, None, 10)
    clock.now += 10
    slots.lease(slots.get(("a", 1)))  # type: ignore[arg-type]
    assert _victim(slots, policy) == (2, ("b", 1))  # leased: held by a batch
    policy.want([("b", 1)])
    assert _victim(slots, policy) == (3, ("c", 1))  # loaded for an acquire_lease not yet holding it
    policy.unwant([("b", 1)])
    assert _victim(slots, policy) == (2, ("b", 1))
    slots.unlease(slots.get(("a", 1)))  # type: ignore[arg-type]
    assert _victim(slots, policy) == (2, ("b", 1))  # a's lease counted as a use: b is now the LRU
    assert [s.key for s in policy.rank(slots.slots, urgent=True)] == [("b", 1), ("c", 1), ("a", 1)]


def test_a_pinned_adapter_is_never_chosen() -> None:
    slots, policy, clock = _setup(2)
    _fill(slots, clock, "ab")
    clock.now += 10
    policy.pinned.add("a")
    assert _victim(slots, policy) == (2, ("b", 1))  # a is the LRU, but pinned
    slots.lease(slots.get(("b", 1)))  # type: ignore[arg-type]
    assert _victim(slots, policy) is None  # even an urgent load never takes a pinned slot
    assert not policy.all_pinned(slots.slots)
    policy.pinned.add("b")
    assert policy.all_pinned(slots.slots)  # the store raises SlotsFullError for an urgent load then


def test_a_pin_covers_the_current_version_only() -> None:
    slots, policy, clock = _setup(2, replaced=frozenset({("a", 1)}))
    _fill(slots, clock, "ab")
    clock.now += 10
    policy.pinned.update({"a", "b"})
    assert _victim(slots, policy) == (1, ("a", 1))  # an old version of a pinned id is not pinned
    assert not policy.all_pinned(slots.slots)


def test_a_dead_version_goes_first() -> None:
    slots, policy, clock = _setup(2, dead=frozenset({("b", 1)}))
    _fill(slots, clock, "ab")
    policy.pinned.add("b")  # pinned, but dead: nobody can use it
    assert _victim(slots, policy, urgent=False) == (2, ("b", 1))


def test_minimum_residency_follows_the_clock() -> None:
    slots, policy, clock = _setup(2, min_residency_s=5.0)
    _fill(slots, clock, "ab")  # a loaded at 1000, b at 1001; now 1002
    assert _victim(slots, policy, urgent=False) is None  # a prefetch never takes a fresh slot
    assert _victim(slots, policy) == (1, ("a", 1))  # an urgent need does, LRU among the fresh ones
    clock.now = 1004.999
    slots.get(("a", 1)).last_used = clock.now  # type: ignore[union-attr]
    assert _victim(slots, policy) == (2, ("b", 1))  # both fresh: the least recently used
    clock.now = 1005.0  # a is 5 s resident, b is not yet
    assert _victim(slots, policy, urgent=False) == (1, ("a", 1))
    assert _victim(slots, policy) == (1, ("a", 1))  # past residency beats more recently used
    clock.now = 1006.0
    assert [s.key for s in policy.rank(slots.slots, urgent=False)] == [("b", 1), ("a", 1)]


def test_demand_protects_from_prefetches_and_goes_last_for_needs() -> None:
    slots, policy, clock = _setup(3)
    _fill(slots, clock, "abc")
    clock.now += 10
    policy.demand = {("a", 1): 2, ("b", 1): 1}
    assert _victim(slots, policy, urgent=False) == (3, ("c", 1))
    policy.demand[("c", 1)] = 1
    assert _victim(slots, policy, urgent=False) is None  # a prefetch never evicts queued work
    assert _victim(slots, policy) == (1, ("a", 1))  # a need does, as a last resort: LRU among demanded


def test_nothing_evictable_gives_no_victim() -> None:
    slots, policy, clock = _setup(2)
    _fill(slots, clock, "ab")
    clock.now += 10
    for slot in slots.slots:
        slots.lease(slot)
    assert _victim(slots, policy) is None and _victim(slots, policy, urgent=False) is None
    assert policy.rank(slots.slots, urgent=True) == []
    assert not policy.all_pinned(slots.slots)  # an urgent load waits for a release instead


def test_cpu_eviction_order_is_lru_undemanded_first() -> None:
    demand = {"b": 1, "d": 3}
    order = cpu_eviction_order(["a", "b", "c", "d", "e"], lambda key: demand.get(key, 0))  # type: ignore[call-overload]
    assert order == ["a", "c", "e", "b", "d"]


def test_thrash_reloads_follow_the_clock() -> None:
    clock = FakeClock()
    seen: list[tuple[str, tuple[Any, ...]]] = []

    class Observer:
        def __getattr__(self, name: str) -> Any:
            return lambda *args: seen.append((name, args))

    acct = Accounting(Observer(), thrash_window_s=5.0, clock=clock, residency=lambda tier: (0, 0))  # type: ignore[arg-type]
    acct.eviction("gpu", "a")
    acct.eviction("gpu", "b")
    clock.now += 5.0
    acct.load("gpu", "a", 0.25, "cpu")  # exactly at the window's end: a thrash reload
    clock.now += 0.001
    acct.load("gpu", "b", 0.5, "cpu")  # just past it: an ordinary load
    acct.load("gpu", "a", 0.5, "cpu")  # a's eviction was consumed by its reload
    acct.eviction("cpu", "a")
    acct.forget("a")  # a dead version's evictions never become reloads
    acct.load("cpu", "a", 0.0, "source")
    gpu, cpu = acct.tier_statistics("gpu"), acct.tier_statistics("cpu")
    assert (gpu.loads, gpu.evictions, gpu.reloads_after_eviction) == (3, 2, 1)
    assert (cpu.loads, cpu.evictions, cpu.reloads_after_eviction) == (1, 1, 0)
    assert [args for name, args in seen if name == "reload_after_eviction"] == [("gpu",)]
    assert [args for name, args in seen if name == "load_duration"] == [
        ("cpu", "gpu", 0.25), ("cpu", "gpu", 0.5), ("cpu", "gpu", 0.5), ("source", "cpu", 0.0)]


async def test_the_store_times_residency_thrash_and_loads_with_its_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    durations: list[float] = []

    class Observer:
        def load_duration(self, source: str, target: str, seconds: float) -> None:
            durations.append(seconds)

        def __getattr__(self, name: str) -> Any:
            return lambda *args: None

    model = MultiLoraModel(TinyModel(), WrapConfig(TARGETS, max_rank=4, num_slots=1))
    config = StoreConfig(min_residency_s=10.0, thrash_window_s=30.0)
    async with AdapterStore(model, config, Observer(), clock=clock) as store:  # type: ignore[arg-type]
        a = store.register("a", write_adapter(tmp_path, "a", 1))
        b = store.register("b", write_adapter(tmp_path, "b", 2))
        await store.ensure_gpu(a)
        clock.now += 9.0  # a is still within its minimum residency
        assert store.prefetch([b]) == 1  # only warms b in the CPU tier
        await store.drain()
        assert set(store.gpu_resident()) == {a.key}
        clock.now += 1.0  # 10 s: a may go for a prefetch now
        assert store.prefetch([b]) == 1
        await store.drain()
        assert set(store.gpu_resident()) == {b.key}
        clock.now += 30.0  # a reload exactly at the end of the thrash window still counts
        await store.ensure_gpu(a)
        stats = store.statistics()
        assert (stats.gpu.loads, stats.gpu.evictions, stats.gpu.reloads_after_eviction) == (3, 2, 1)
    # Every load was timed with the store's clock, which did not move while it ran.
    assert durations and set(durations) == {0.0}

