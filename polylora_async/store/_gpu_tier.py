"""The GPU tier: the model's fixed adapter slots, their leases, and ordered slot writes.

:class:`GpuSlots` is pure host-side bookkeeping (which version sits in which slot, who leases it);
:class:`SlotWriter` performs the writes. On CUDA a write runs on a dedicated copy
stream, after the completion events of every batch that read the slot since its previous write, and
records its own event that the next batch's stream waits for. No device-wide synchronisation
anywhere: ordering is expressed with events only. On CPU the same code runs without streams/events.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import torch

from ..adapters import AdapterWeights


class SlotState(Enum):
    EMPTY = "empty"
    WRITING = "writing"  # reserved for a key; its write has not been issued yet
    READY = "ready"  # the write was issued; batches may use the slot after waiting on copy_event


@dataclass
class GpuSlot:
    """One adapter slot of the model (1..num_slots; slot 0 is the base model and never managed).

    Attributes:
        read_events: completion events of leased batches that read this slot since its last write;
            the next write waits for all of them (pruned as they complete).
        copy_event: recorded on the copy stream after the last write (None on CPU).
    """

    index: int
    key: Hashable | None = None
    state: SlotState = SlotState.EMPTY
    leases: int = 0
    loaded_at: float = 0.0
    last_used: float = 0.0
    nbytes: int = 0
    copy_event: Any = None
    read_events: list[Any] = field(default_factory=list)


class GpuSlots:
    """Which adapter version sits in which slot, its leases and its times (from ``clock``).

    Which slot a load takes is the victim policy's decision (:mod:`._policy`), made from these slots.
    """

    def __init__(self, num_slots: int, clock: Callable[[], float]) -> None:
        self.slots = [GpuSlot(i) for i in range(1, num_slots + 1)]
        self._clock = clock
        self._by_key: dict[Hashable, GpuSlot] = {}

    def get(self, key: Hashable) -> GpuSlot | None:
        return self._by_key.get(key)

    def is_ready(self, key: Hashable) -> bool:
        slot = self._by_key.get(key)
        return slot is not None and slot.state is SlotState.READY

    def resident(self) -> dict[Hashable, int]:
        """Key -> slot of every slot whose write was issued."""
        return {s.key: s.index for s in self.slots if s.state is SlotState.READY}

    @property
    def resident_count(self) -> int:
        return sum(1 for s in self.slots if s.state is SlotState.READY)

    @property
    def resident_bytes(self) -> int:
        return sum(s.nbytes for s in self.slots if s.state is SlotState.READY)

    def reserve(self, slot: GpuSlot, key: Hashable) -> Hashable | None:
        """Claim ``slot`` for ``key`` (state WRITING); returns the key it held before, if any.

        The slot keeps its ``read_events``: the write must still wait for those batches.
        """
        assert slot.state is not SlotState.WRITING and slot.leases == 0
        previous = slot.key if slot.state is SlotState.READY else None
        if slot.key is not None and self._by_key.get(slot.key) is slot:
            del self._by_key[slot.key]
        slot.key = key
        slot.state = SlotState.WRITING
        slot.nbytes = 0
        slot.copy_event = None
        self._by_key[key] = slot
        return previous

    def complete(self, slot: GpuSlot, copy_event: Any, nbytes: int) -> None:
        """The write into ``slot`` was issued: batches may lease it (after waiting on ``copy_event``)."""
        assert slot.state is SlotState.WRITING
        now = self._clock()
        slot.state = SlotState.READY
        slot.copy_event = copy_event
        slot.nbytes = nbytes
        slot.loaded_at = now
        slot.last_used = now
        slot.read_events.clear()

    def free(self, slot: GpuSlot) -> None:
        """Empty a slot (its write failed, or its version died). Pending read events are kept."""
        assert slot.leases == 0
        if slot.key is not None and self._by_key.get(slot.key) is slot:
            del self._by_key[slot.key]
        slot.key = None
        slot.state = SlotState.EMPTY
        slot.nbytes = 0
        slot.copy_event = None

    def lease(self, slot: GpuSlot) -> None:
        assert slot.state is SlotState.READY
        slot.leases += 1
        slot.last_used = self._clock()

    def unlease(self, slot: GpuSlot, done_event: Any = None) -> None:
        assert slot.leases > 0
        slot.leases -= 1
        if done_event is not None:
            # Keep only batches still running: a slot used by a million batches must not hold a
            # million events. ``query()`` is a host-side check, it does not wait.
            slot.read_events = [e for e in slot.read_events if not e.query()]
            slot.read_events.append(done_event)


class SlotWriter:
    """Writes validated weights into the model's slots; on CUDA on a dedicated copy stream.

    ``write`` is blocking Python (it issues the copies) and is meant for ONE worker thread, so
    writes are issued in order; on CUDA it only *issues* asynchronous copies from pinned memory.
    """

    def __init__(self, model: Any) -> None:
        self._model = model
        self.device: torch.device = model.device
        self.stream: Any = None
        if self.device.type == "cuda" and torch.cuda.is_available():
            self.stream = torch.cuda.Stream(device=self.device)

    def write(self, slot: int, weights: AdapterWeights, after: Sequence[Any]) -> Any:
        """Write ``weights`` into ``slot`` after every event in ``after``; returns the copy event (CUDA) or None."""
        if self.stream is None:
            self._model.write_slot(slot, weights)
            return None
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for event in after:
                self.stream.wait_event(event)
            self._model.write_slot(slot, weights)
            event = torch.cuda.Event()
            event.record(self.stream)
        return event

    def wait(self, events: Sequence[Any], stream: Any = None) -> None:
        """Make ``stream`` (default: the current stream) wait for ``events`` on the device; no host wait."""
        if self.stream is None or not events:
            return
        target = stream if stream is not None else torch.cuda.current_stream(self.device)
        for event in events:
            if event is not None:
                target.wait_event(event)
