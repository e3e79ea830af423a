"""The dispatcher: the request queue and the scheduling loop on the event loop.

Owns the queue (arrival order, queued requests per adapter for the store's demand), the look-ahead
prefetch, when to form a batch (``max_wait``, in-flight bounds), and each batch's life after it is
formed: its lease, the worker, results or errors to the futures. Which requests form the batch is
decided by :func:`form_batch` (``_scheduler``), a pure function of the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import Callable

import torch

from .._errors import BatchFailedError
from .._metrics import RuntimeMetrics
from .._model import MultiLoraModel
from ..store import AdapterRef, AdapterStore
from ._scheduler import form_batch
from ._types import Request, RuntimeConfig
from ._worker import Batch, Worker, crash_error, is_device_error, set_results


class Dispatcher:
    """Queues requests, forms batches from the queue and hands them to the worker.

    Args:
        running: whether the runtime still takes requests (False while closing or after a crash:
            the loop then forms batches without waiting for them to fill, and ends once the queue
            is empty).
        on_crash: called with the error when the loop or the worker machinery fails.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        config: RuntimeConfig,
        store: AdapterStore,
        metrics: RuntimeMetrics,
        worker: Worker,
        *,
        running: Callable[[], bool],
        on_crash: Callable[[BaseException], None],
    ) -> None:
        self.model = model
        self.config = config
        self.store = store
        self.metrics = metrics
        self._worker = worker
        self._running = running
        self._on_crash = on_crash
        self.pending: dict[int, Request] = {}  # insertion order = arrival order
        self._demand_counts: dict[object, int] = {}  # adapter key -> queued requests
        self._demand_dirty = False
        self._splits_reported = model.split_batches
        self._prefetched: set[object] = set()  # keys already handed to the prefetcher while queued
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self.inflight: set[asyncio.Task[None]] = set()
        self._watchers: dict[object, asyncio.Task[None]] = {}
        self._task: asyncio.Task[None] | None = None
        self.stats = dict.fromkeys(
            ("submitted", "batches", "mixed_batches", "max_adapters_in_batch", "rows", "padded_tokens", "real_tokens"),
            0,
        )

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Start the scheduling loop on ``loop``."""
        self._loop = loop
        self._wakeup = asyncio.Event()
        self._task = loop.create_task(self._schedule(), name="polylora-scheduler")

    async def drain(self) -> None:
        """Wait until the loop has ended (the queue emptied after ``running`` turned False) and the batches ran."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)
        if self.inflight:
            await asyncio.gather(*self.inflight, return_exceptions=True)

    def watch_tasks(self) -> list[asyncio.Task[None]]:
        """The tasks waiting for an oldest request's adapter (cancelled at close)."""
        return list(self._watchers.values())

    def push(
        self,
        tensors: dict[str, torch.Tensor],
        length: int,
        ref: AdapterRef | None,
        group: object = None,
        decoder_length: int = 0,
    ) -> Request:
        assert self._loop is not None
        request = Request(
            seq=next(self._seq),
            inputs=tensors,
            length=length,
            ref=ref,
            future=self._loop.create_future(),
            submitted=time.perf_counter(),
            key=None if ref is None else ref.key,
            group=group,
            decoder_length=decoder_length,
        )
        self.pending[request.seq] = request
        if ref is not None:
            self._demand_counts[request.key] = self._demand_counts.get(request.key, 0) + 1
            self._demand_dirty = True
            self.store.note_gpu_lookup(ref)  # per request: was its adapter resident on arrival?
        self.stats["submitted"] += 1
        self.wake()
        return request

    def unqueue(self, request: Request) -> None:
        """Take a request out of the queue (no-op if it already left), keeping demand counts."""
        if self.pending.pop(request.seq, None) is None or request.key is None:
            return
        left = self._demand_counts[request.key] - 1
        if left:
            self._demand_counts[request.key] = left
        else:
            del self._demand_counts[request.key]
            self._prefetched.discard(request.key)
        self._demand_dirty = True

    def fail_pending(self, make_error: Callable[[], BaseException]) -> None:
        for request in list(self.pending.values()):
            if not request.future.done():
                request.future.set_exception(make_error())
        self.pending.clear()
        self._demand_counts.clear()
        self._prefetched.clear()
        self._demand_dirty = True

    def wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    async def _schedule(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                self.metrics.set_queue_depth(len(self.pending))
                if not self.pending and not self._running():
                    return
                if not self.pending:
                    await self._wait_wakeup(None)
                    continue
                if self.config.prefetch:
                    self._watch_lookahead()
                elif await self._load_oldest_inline():
                    # The queue may have changed under the await (the request withdrawn, timed
                    # out, others added): decide again from the top.
                    continue
                if len(self.inflight) >= self.config.max_inflight_batches:
                    await self._wait_wakeup(None)
                    continue
                if self.inflight and self._running() and not self._queue_can_fill():
                    # The device is busy: let the queue grow into a full batch (or until the
                    # running batch completes) rather than queue a small batch behind it. Every
                    # batch has a fixed host cost; small batches behind a busy device only add up
                    # to queueing.
                    await self._wait_wakeup(None)
                    continue
                oldest = next(iter(self.pending.values()))
                deadline = oldest.submitted + self.config.max_wait
                now = time.perf_counter()
                if self._running() and now < deadline and not self._queue_can_fill():
                    await self._wait_wakeup(deadline - now)
                    continue
                batch = self._form_batch()
                if batch is None:
                    await self._wait_wakeup(None)
                    continue
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self.inflight.add(task)
                task.add_done_callback(self._batch_finished)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._on_crash(exc)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        # Wake the scheduler only once the batch has left the in-flight set, so it sees the room.
        self.inflight.discard(task)
        self.wake()

    async def _wait_wakeup(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()

    def _queue_can_fill(self) -> bool:
        return len(self.pending) >= self.config.max_batch_size

    def _watch_lookahead(self) -> None:
        """Prefetch for the queue's head; force-load only the oldest request's adapter.

        Adapters of the next batches (the first ``num_slots`` distinct ones in the queue) are
        loaded into GPU slots that hold nothing queued requests need; adapters further back are
        warmed into the CPU tier once. Only the oldest waiting request's adapter may evict an
        adapter that other queued requests still need: one forced load at a time guarantees
        progress, while forcing several at once would evict each other's fresh weights (thrash).
        """
        refs: dict[object, AdapterRef] = {}
        for request in itertools.islice(self.pending.values(), self.config.lookahead):
            if request.ref is not None and request.key not in refs:
                refs[request.key] = request.ref
        if self._demand_dirty:
            self.store.set_demand(dict(self._demand_counts))
            self._demand_dirty = False
        if not refs:
            return
        slots = self.model.config.num_slots
        near = [ref for ref in itertools.islice(refs.values(), slots) if not self.store.is_gpu_ready(ref)]
        if near:
            self.store.prefetch(near, warm_cpu=False)
        far = [ref for key, ref in refs.items() if key not in self._prefetched]
        if far:
            self.store.prefetch(far, gpu_items=0)  # once per queued adapter: into the CPU tier
            self._prefetched.update(ref.key for ref in far)
        oldest = next(iter(self.pending.values()))
        if oldest.ref is not None and oldest.key not in self._watchers and not self.store.is_gpu_ready(oldest.ref):
            self._watchers[oldest.key] = asyncio.get_running_loop().create_task(self._watch(oldest.ref))

    async def _load_oldest_inline(self) -> bool:
        """Load the oldest request's adapter now; True when it awaited (the queue may differ after)."""
        oldest = next(iter(self.pending.values()))
        if oldest.ref is None or self.store.is_gpu_ready(oldest.ref):
            return False
        try:
            await self.store.ensure_gpu(oldest.ref, count=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._fail_key(oldest.ref.key, exc)
        return True

    def _fail_key(self, key: object, exc: BaseException) -> None:
        for request in list(self.pending.values()):
            if request.key == key and not request.future.done():
                request.future.set_exception(exc)

    async def _watch(self, ref: AdapterRef) -> None:
        try:
            await self.store.ensure_gpu(ref, count=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # A failed load fails only the requests for that adapter version, with the cause.
            self._fail_key(ref.key, exc)
        finally:
            self._watchers.pop(ref.key, None)
            self.wake()

    def _form_batch(self) -> Batch | None:
        """The next batch from the queue (see :func:`form_batch`), its adapters leased, its requests dequeued."""
        plan = form_batch(
            self.pending.values(), self.config, self.store.is_gpu_ready, self.model.config.num_slots,
            self._worker.max_width,
        )  # fmt: skip
        if plan is None:
            return None
        chosen = plan.requests
        lease = self.store.lease(plan.refs)
        for request in plan.passed_over:
            request.passed_over += 1
        now = time.perf_counter()
        for request in chosen:
            self.unqueue(request)
            request.dispatched = now
        slots = [0 if r.ref is None else lease.slot_of(r.ref) for r in chosen]
        batch = Batch(requests=chosen, slots=slots, width=plan.width, lease=lease, decoder_width=plan.decoder_width)
        self.metrics.set_queue_depth(len(self.pending))
        return batch

    async def _run_batch(self, batch: Batch) -> None:
        lease = batch.lease
        distinct = len(set(batch.slots))
        self.stats["batches"] += 1
        self.stats["mixed_batches"] += distinct > 1
        self.stats["max_adapters_in_batch"] = max(self.stats["max_adapters_in_batch"], distinct)
        self.stats["rows"] += len(batch.requests)
        self.stats["padded_tokens"] += (batch.width + batch.decoder_width) * len(batch.requests)
        self.stats["real_tokens"] += sum(r.length + r.decoder_length for r in batch.requests)
        self.metrics.batch(len(batch.requests), batch.width * len(batch.requests), distinct)
        started = time.perf_counter()
        done_event = None
        try:
            outcome, payload, done_event = await self._worker.launch(batch)
        except BaseException as exc:  # the worker machinery (or the device) failed
            lease.release(None)
            self._on_crash(exc)
            for request in batch.requests:
                if not request.future.done():
                    request.future.set_exception(crash_error(exc))
            return
        lease.release(done_event)  # slot reuse is ordered after `done_event` on the device
        if outcome == "pending":
            # The forward was only launched: wait for the device and slice rows in the completion
            # thread, while the worker thread already launches the next batch.
            try:
                outcome, payload = await self._worker.complete(batch, payload)
            except BaseException as exc:
                self._on_crash(exc)
                for request in batch.requests:
                    if not request.future.done():
                        request.future.set_exception(crash_error(exc))
                return
        self.metrics.batch_duration(time.perf_counter() - started)
        while self._splits_reported < self.model.split_batches:  # run in adapter-homogeneous groups
            self._splits_reported += 1
            self.metrics.split_batch()
        if outcome == "ok":
            set_results(batch.requests, payload)
        elif outcome == "error":
            if is_device_error(payload):
                self._on_crash(payload)
            self._fail_batch(batch, payload)
        self.wake()

    def _fail_batch(self, batch: Batch, exc: BaseException) -> None:
        for request in batch.requests:
            if not request.future.done():
                error = BatchFailedError(f"the batch of {len(batch.requests)} rows failed: {exc!r}")
                error.__cause__ = exc
                request.future.set_exception(error)
