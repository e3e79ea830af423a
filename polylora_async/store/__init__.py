"""The adapter store: where adapter weights live, from their source to a GPU slot.

The data path of one adapter version (an :class:`AdapterRef`), one module per step::

    source (PEFT dir / memory) --+--> [disk cache] --> CPU tier (validated, pinned) --> GPU slot --> batch lease
                                 '------------------------^      (worker threads)      (copy stream)

    _disk_tier.py   the directory cache          _disk_policy.py  what is spilled / cached, under which token
    _cpu_tier.py    byte-bounded LRU in RAM      _loads.py        single-flight loads and the prefetch budget
    _gpu_tier.py    slots, slot writes           _policy.py       which slot / CPU entry to evict
    _leases.py      slots held by a batch        _accounting.py   counters, thrash, statistics
    _facade.py      AdapterStore: lifecycle and the public methods, delegating to the above
    _config.py      StoreConfig                  _lifecycle.py    open/closed, loop, tasks, change signal

* The catalog (:mod:`.._catalog`) maps ids to versioned refs. A request keeps its ref until it is
  done, so replacing an adapter never changes the weights of requests already queued.
* Eviction resists thrash: the scheduler reports its queue through :meth:`AdapterStore.set_demand`;
  an adapter with queued requests is never evicted for one without, a fresh slot keeps its adapter
  for ``min_residency_s`` unless nothing else can go, and reloads shortly after an eviction are
  counted as thrash. Every duration and deadline comes from the store's one clock (``clock=``).
"""

from __future__ import annotations

from .._catalog import BASE_REF, AdapterRef
from ._accounting import StoreObserver, StoreStatistics, TierStatistics
from ._config import StoreConfig
from ._facade import AdapterStore
from ._leases import BatchLease

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
