"""Leases: the slots of one batch's adapters, protected from eviction until the batch is done.

:class:`BatchLease` is what a GPU worker holds; it gets the two things it needs from the store (a
way to make a stream wait for the slot writes, and a release callback that is safe from any thread)
and nothing else. :class:`Leases` hands leases out: at once for adapters already on the GPU, or
after loading a whole batch's adapters together, and takes the slots back at release.
"""

from __future__ import annotations

import functools
import types
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from .._catalog import AdapterCatalog, AdapterKey, AdapterRef
from .._errors import AdapterNotFoundError, AdapterNotReadyError, BatchInputError, SlotsFullError
from ._accounting import Accounting
from ._gpu_tier import GpuSlot, GpuSlots, SlotState
from ._lifecycle import Lifecycle
from ._loads import Loads, _GpuJob, check_alive
from ._policy import VictimPolicy

ReleaseSlots = Callable[[Mapping[AdapterKey, GpuSlot], Any], None]
"""``release(slots, done_event)``: give a lease's slots back (callable from any thread)."""


class BatchLease:
    """The slots of the distinct adapters of one batch, protected from eviction until :meth:`release`.

    Usage by a GPU worker (in its thread)::

        lease.wait_copies()                 # compute stream waits for the slot writes (no host wait)
        out = model.forward_slots(lease.row_slots(refs), **inputs)
        done = torch.cuda.Event(); done.record()
        lease.release(done)                 # the next write of these slots waits for `done`

    On CPU, ``wait_copies`` does nothing and ``release()`` takes no event.

    Args:
        slots: the leased slot of each distinct adapter version.
        wait: ``wait(events, stream)``: make ``stream`` wait for ``events`` on the device.
        release: gives the slots back; called once, from whichever thread releases.
    """

    def __init__(
        self,
        slots: dict[AdapterKey, GpuSlot],
        wait: Callable[[Sequence[Any], Any], None],
        release: ReleaseSlots,
    ) -> None:
        self._slots = slots
        self._wait = wait
        self._release = release
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
        self._wait(self._copy_events, stream)

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
        self._release(self._slots, done_event)

    def __enter__(self) -> BatchLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Leases:
    """Hands out :class:`BatchLease` objects over the GPU slots and takes their slots back."""

    def __init__(
        self,
        *,
        gpu: GpuSlots,
        loads: Loads,
        policy: VictimPolicy,
        accounting: Accounting,
        catalog: AdapterCatalog,
        life: Lifecycle,
    ) -> None:
        self._gpu = gpu
        self._loads = loads
        self._policy = policy
        self._accounting = accounting
        self._catalog = catalog
        self._life = life
        self._wait = loads.writer.wait
        self._release_from_any_thread: ReleaseSlots = functools.partial(life.call_on_loop, self.release)

    def lease(self, refs: Iterable[AdapterRef]) -> BatchLease:
        """:meth:`AdapterStore.lease`: lease slots whose writes are issued."""
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
        return BatchLease(slots, self._wait, self._release_from_any_thread)

    async def acquire(self, refs: Iterable[AdapterRef]) -> BatchLease:
        """:meth:`AdapterStore.acquire_lease`: load a batch's adapters in parallel, holding each once written."""
        distinct: dict[AdapterKey, AdapterRef] = {}
        for ref in refs:
            if not ref.is_base:
                check_alive(self._catalog, ref)
                distinct.setdefault(ref.key, ref)
        num_slots = len(self._gpu.slots)
        if len(distinct) > num_slots:
            raise BatchInputError(f"a batch can use at most {num_slots} distinct adapters, got {len(distinct)}")
        pinned_elsewhere = sum(
            1
            for s in self._gpu.slots
            if s.key is not None
            and s.key not in distinct
            and s.state is not SlotState.EMPTY
            and self._policy.is_pinned(s.key)
        )
        if len(distinct) + pinned_elsewhere > num_slots:
            raise SlotsFullError(
                f"a batch of {len(distinct)} adapters does not fit: {pinned_elsewhere} of {num_slots} slots "
                "hold other pinned adapters"
            )
        for key in distinct:
            self._accounting.lookup("gpu", hit=self._gpu.is_ready(key))
        held: dict[AdapterKey, GpuSlot] = {}
        jobs: dict[AdapterKey, _GpuJob] = {}
        # Until held, a loaded adapter of this batch must not become some other load's victim.
        self._policy.want(distinct.keys())
        try:
            while True:
                for key in distinct:
                    slot = self._gpu.get(key)
                    if key not in held and slot is not None and slot.state is SlotState.READY:
                        self._gpu.lease(slot)
                        held[key] = slot
                if len(held) == len(distinct):
                    return BatchLease({key: held[key] for key in distinct}, self._wait, self._release_from_any_thread)
                self._life.check_open()
                changed = self._life.changed
                for key, ref in distinct.items():
                    if key in held:
                        continue
                    check_alive(self._catalog, ref)
                    job = jobs.get(key)
                    if job is not None and job.done:
                        exc = job.future.exception()
                        if exc is not None:
                            raise exc
                    jobs[key] = self._loads.urgent_gpu_job(ref)
                # Every job completion and every slot change notifies.
                await changed.wait()
        except BaseException:
            if held:
                self.release(held, None)
            raise
        finally:
            self._policy.unwant(distinct.keys())

    def release(self, slots: Mapping[AdapterKey, GpuSlot], done_event: Any) -> None:
        """On the loop: unlease ``slots`` (their next writes wait for ``done_event``); free dead versions."""
        changed = False
        for key, slot in slots.items():
            assert slot.key == key and slot.leases > 0, "lease released against a slot it does not hold"
            self._gpu.unlease(slot, done_event)
            if slot.leases == 0 and not self._catalog.is_alive(key):
                self._gpu.free(slot)
                changed = True
        if changed:
            self._accounting.report_resident("gpu")
        self._life.notify()
