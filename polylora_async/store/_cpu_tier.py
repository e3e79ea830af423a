"""The CPU tier: validated adapter weights in (pinned) host memory, an LRU bounded in bytes.

Pure bookkeeping, no I/O and no asyncio: the store calls it on the event loop and does the reading
and validating in worker threads. :func:`stage_weights` (run in a worker thread) lays the tensors
out for fast, asynchronous host->device copies.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from ..adapters import AdapterWeights, pack_weights
from ._policy import cpu_eviction_order


def stage_weights(weights: AdapterWeights, *, pin: bool) -> AdapterWeights:
    """Host-side layout of validated weights, ready for slot writes.

    With ``pin`` the weights end up as views of ONE page-locked storage (:func:`pack_weights`; the
    validation of a safetensors file read with ``pin_memory`` already produced exactly that, so
    this is free then), and a slot write copies the whole adapter to the device with one
    asynchronous copy. Pinning every tensor by itself cost one page-locked allocation per tensor
    and a host-side transpose of every ``b``. Without ``pin``, CPU weights are returned as they
    are and weights elsewhere are gathered into one CPU storage.
    """
    if not pin and all(lora.a.device.type == "cpu" and lora.b.device.type == "cpu" for lora in weights.layers.values()):
        return weights
    return pack_weights(weights, pin_memory=pin)


def host_bytes(weights: AdapterWeights) -> int:
    """Host memory the weights take: ``nbytes``, or for page-locked storage what the allocator
    really reserves for it. PyTorch's pinned-memory allocator rounds every allocation up to a power
    of two (a 33 MiB adapter takes 64 MiB), and page-locked memory is the scarce kind: the CPU
    tier's byte bound counts what is really taken."""
    storage = weights.storage
    if storage is None or not storage.is_pinned():
        return weights.nbytes
    return max(weights.nbytes, _power_of_two_ceil(storage.numel() * storage.element_size()))


def _power_of_two_ceil(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass
class _CpuEntry:
    weights: AdapterWeights
    sticky: bool
    nbytes: int


@dataclass(frozen=True)
class CpuPutResult:
    """What :meth:`CpuTier.put` did.

    Attributes:
        stored: False when the entry could not fit without exceeding the byte bound (it is then
            only passed through to the GPU, not cached). A sticky entry is always stored.
        evicted: keys evicted to make room, oldest first.
    """

    stored: bool
    evicted: tuple[Hashable, ...]


class CpuTier:
    """Validated weights in host memory; LRU bounded in bytes (:func:`host_bytes` of each entry).

    *Sticky* entries are the only copy of an adapter registered from memory (not yet spilled to
    the disk cache): they count toward the bound but are never evicted. Invariant after every
    call: ``nbytes <= max(capacity_bytes, sticky_bytes)``.

    Among evictable entries the victim is the least recently used one that nobody queued a request
    for (``demand_of(key) == 0``); only if there is none, the least recently used demanded one
    (:func:`._policy.cpu_eviction_order`).

    Args:
        capacity_bytes: the bound; 0 disables caching (sticky entries are still kept).
        demand_of: queued requests per key (the store's demand table).
    """

    def __init__(self, capacity_bytes: int, demand_of: Callable[[Hashable], int] | None = None) -> None:
        if capacity_bytes < 0:
            raise ValueError(f"`capacity_bytes` must be >= 0, got {capacity_bytes}")
        self.capacity_bytes = capacity_bytes
        self._demand_of = demand_of if demand_of is not None else (lambda key: 0)
        self._entries: OrderedDict[Hashable, _CpuEntry] = OrderedDict()
        self.nbytes = 0
        self.sticky_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def keys(self) -> list[Hashable]:
        """Keys from least to most recently used."""
        return list(self._entries)

    def get(self, key: Hashable) -> AdapterWeights | None:
        """The weights (and mark them most recently used), or None."""
        entry = self._entries.get(key)
        if entry is None:
            return None
        self._entries.move_to_end(key)
        return entry.weights

    def peek(self, key: Hashable) -> AdapterWeights | None:
        entry = self._entries.get(key)
        return None if entry is None else entry.weights

    def put(self, key: Hashable, weights: AdapterWeights, *, sticky: bool = False) -> CpuPutResult:
        """Insert (or replace) an entry as most recently used, evicting others to stay in bounds."""
        self.remove(key)
        size = host_bytes(weights)
        # A sticky entry is stored whatever it takes (evicting everything evictable if needed).
        evicted = self._make_room(size, partial=sticky)
        if evicted is None:
            return CpuPutResult(stored=False, evicted=())
        self._entries[key] = _CpuEntry(weights, sticky, size)
        self.nbytes += size
        if sticky:
            self.sticky_bytes += size
        return CpuPutResult(stored=True, evicted=evicted)

    def set_sticky(self, key: Hashable, sticky: bool) -> tuple[Hashable, ...]:
        """Change an entry's stickiness; making it evictable may evict entries (itself included)."""
        entry = self._entries.get(key)
        if entry is None or entry.sticky == sticky:
            return ()
        entry.sticky = sticky
        size = entry.nbytes
        self.sticky_bytes += size if sticky else -size
        if sticky:
            return ()
        evicted = self._make_room(0, partial=True)
        return evicted if evicted is not None else ()

    def remove(self, key: Hashable) -> bool:
        entry = self._entries.pop(key, None)
        if entry is None:
            return False
        self.nbytes -= entry.nbytes
        if entry.sticky:
            self.sticky_bytes -= entry.nbytes
        return True

    def _make_room(self, size: int, *, partial: bool = False) -> tuple[Hashable, ...] | None:
        """Evict until ``size`` more bytes fit.

        If that is impossible: None and nothing evicted, or with ``partial`` every evictable entry
        (sticky entries alone then exceed the bound).
        """
        excess = self.nbytes + size - self.capacity_bytes
        if excess <= 0:
            return ()
        evictable = [(k, e) for k, e in self._entries.items() if not e.sticky]
        if not partial and sum(e.nbytes for _, e in evictable) < excess:
            return None
        evicted = []
        for key in cpu_eviction_order([k for k, _ in evictable], self._demand_of):
            if excess <= 0:
                break
            entry = self._entries.pop(key)
            self.nbytes -= entry.nbytes
            excess -= entry.nbytes
            evicted.append(key)
        return tuple(evicted)
