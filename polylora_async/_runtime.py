"""The async runtime: ``await runtime.submit(inputs, adapter)`` from any number of coroutines.

Data path of one request::

    submit() -> validate inputs, resolve the adapter (unknown id: error now) -> queue
    scheduler (event loop) -> look-ahead prefetch -> mixed-adapter batch of GPU-ready adapters
    GPU worker (one thread) -> collate with right padding -> forward -> slice each row -> futures

The event loop never blocks: file reads happen in the store's worker threads, the forward pass
and every device synchronisation happen in the worker thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import inspect
import itertools
import logging
import math
import time
import typing
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ._catalog import Resolver
from ._config import BASE_ADAPTER
from ._errors import (
    BatchFailedError,
    ConfigError,
    InputValidationError,
    OverloadedError,
    RequestTimeoutError,
    RuntimeClosedError,
    StoreClosedError,
    WorkerCrashedError,
)
from ._metrics import RuntimeMetrics
from ._model import MultiLoraModel
from .store import AdapterRef, AdapterStore, BatchLease, StoreConfig, StoreStatistics

OutputSelector = Callable[[Any], torch.Tensor]
_log = logging.getLogger("polylora_async")


def default_select_output(outputs: Any) -> torch.Tensor:
    """``last_hidden_state`` if the model returns one, else ``logits``, else the output tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for name in ("last_hidden_state", "logits"):
        value = getattr(outputs, name, None)
        if value is None and isinstance(outputs, Mapping):
            value = outputs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot pick a tensor from a {type(outputs).__name__}; pass `select_output`")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime batches and bounds work.

    Args:
        max_batch_size: rows per batch.
        max_batch_tokens: padded tokens per batch (rows x longest row).
        max_wait: seconds the oldest queued request may wait for its batch to fill.
        max_queue: requests waiting at most; ``submit`` then waits for room, ``submit_nowait``
            raises :class:`OverloadedError` (backpressure).
        starvation_limit: batches that may pass over a request (its adapter is cold or rare)
            before the scheduler waits for that adapter instead of forming other batches.
        length_bucketing: batch requests of similar length together (lengths within a factor of
            two of the oldest request's) to waste less compute on padding.
        lookahead: queued requests whose adapters are prefetched ahead of batch formation.
        max_inflight_batches: batches handed to the worker at once (2: the next batch is launched
            while the device still runs the current one). A second batch is only formed when the
            queue can fill it; otherwise the queue keeps filling until the running batch completes.
        pad_to_multiple: batches are padded to a length that is a multiple of this (16: fewer
            distinct shapes for the model's kernels, at most 15 padding tokens per row).
        pad_values: padding value per input name (default: the model's ``config.pad_token_id`` for
            ``input_ids`` and ``decoder_input_ids``, 0 for everything else).
        attention_mask: add an ``attention_mask`` input when requests carry none; ``None``
            means "if the model's forward accepts one".
        results_on_cpu: copy each row's result to CPU memory (in the worker thread).
        shutdown: what ``aclose()`` does with queued requests: ``"drain"`` serves them,
            ``"cancel"`` fails them with :class:`RuntimeClosedError`.
        prefetch: load adapters for queued requests in the background while other batches run.
            ``False`` loads an adapter only when its request is the oldest one waiting, holding
            back batch formation meanwhile (what a server without a prefetcher does; kept for
            comparison in benchmarks).
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_wait: float = 0.002
    max_queue: int = 4096
    starvation_limit: int = 8
    length_bucketing: bool = False
    lookahead: int = 256
    max_inflight_batches: int = 2
    pad_to_multiple: int = 16
    pad_values: Mapping[str, int | float] = field(default_factory=dict)
    attention_mask: bool | None = None
    results_on_cpu: bool = True
    shutdown: Literal["drain", "cancel"] = "drain"
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue",
            "lookahead",
            "max_inflight_batches",
            "pad_to_multiple",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"`{name}` must be an integer >= 1, got {value!r}")
        if not isinstance(self.starvation_limit, int) or self.starvation_limit < 0:
            raise ConfigError(f"`starvation_limit` must be an integer >= 0, got {self.starvation_limit!r}")
        if not isinstance(self.max_wait, (int, float)) or not 0 <= self.max_wait < math.inf:
            raise ConfigError(f"`max_wait` must be a finite number of seconds >= 0, got {self.max_wait!r}")
        if self.shutdown not in ("drain", "cancel"):
            raise ConfigError(f"`shutdown` must be 'drain' or 'cancel', got {self.shutdown!r}")


@dataclass(frozen=True)
class RuntimeStatistics:
    """A snapshot of what the runtime has done (see :meth:`Runtime.statistics`)."""

    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    rejected: int
    queued: int
    batches: int
    mixed_batches: int
    max_adapters_in_batch: int
    rows: int
    padded_tokens: int
    real_tokens: int
    split_batches: int
    store: StoreStatistics
    isolated_failures: int = 0


@dataclass(frozen=True)
class StreamResult:
    """One completed request of :meth:`Runtime.stream`: ``error`` is set when it failed."""

    key: Any
    value: Any = None
    error: BaseException | None = None


@dataclass(eq=False)
class _Request:
    seq: int
    inputs: dict[str, torch.Tensor]
    length: int  # of the (encoder) inputs
    ref: AdapterRef | None  # None: base model
    future: asyncio.Future[Any]
    submitted: float
    key: object = None  # the adapter version's key (None: base model)
    group: object = None  # requests batch together only with the same group (see _input_group)
    passed_over: int = 0
    dispatched: float | None = None  # when it was placed in a batch
    decoder_length: int = 0  # of an encoder-decoder model's decoder inputs (0: none given)


@dataclass
class _Batch:
    requests: list[_Request]
    slots: list[int]
    width: int
    lease: BatchLease
    decoder_width: int = 0  # the decoder inputs' padded length
    # Set by the worker: where each row's slice of the output ends (see _OutputLayout).
    layout: _OutputLayout | None = None
    head_widths: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class _OutputLayout:
    """Which axes of the selected output a row's slice is cut along, learnt from the model.

    ``sequence_axes`` follow the padded length (cut to the row's length), ``decoder_axes`` the
    decoder inputs' padded length (an encoder-decoder's per-token outputs); ``head_axes`` map a
    wrapped head whose width varies per adapter to the axis that follows its width (cut to the
    row's head width). Axes are of the whole batch output (axis 0 = rows).
    """

    sequence_axes: tuple[int, ...]
    head_axes: dict[str, int] = field(default_factory=dict)
    decoder_axes: tuple[int, ...] = ()  # follow the decoder inputs' padded length


class Runtime:
    """Serves many LoRA adapters over one model to any number of coroutines.

    Example::

        async with Runtime(model) as rt:
            rt.register_adapter("support", "/adapters/support")
            hidden = await rt.submit({"input_ids": ids}, "support")

    Args:
        model: the wrapped model (its slots become the GPU tier).
        config: batching and queue bounds.
        registry: a ``prometheus_client.CollectorRegistry`` for the runtime's metrics (default:
            a fresh one, see :attr:`metrics`).
        store_config: adapter tier bounds (CPU bytes, disk cache, ...).
        select_output: picks the per-row tensor from the model's output (default
            :func:`default_select_output`); each row gets its slice, cut to its own length.
        resolver: ``async def resolver(adapter_id) -> source | None`` for ids not registered up
            front: a PEFT directory, a PeftModel or a ``(state_dict, config)`` tuple; ``None``
            means unknown (:class:`AdapterNotFoundError`), a raising resolver fails that request
            with :class:`AdapterLoadError`. An answer gets the check :meth:`register_adapter`
            makes; one it refuses fails that request with the same typed error and is not
            registered (the next request asks again). Resolved directories are copied into the disk cache
            when one is configured, so a catalog far larger than memory can be fetched on demand.

    The runtime puts ``model`` in evaluation mode (``model.eval()``): rows must not depend on
    dropout. Put it back in training mode only after the runtime is closed.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        config: RuntimeConfig | None = None,
        registry: Any = None,
        *,
        store_config: StoreConfig | None = None,
        select_output: OutputSelector | None = None,
        resolver: Resolver | None = None,
    ) -> None:
        if resolver is not None and not callable(resolver):
            raise ConfigError(f"`resolver` must be an async callable id -> source, got {type(resolver).__name__}")
        self.model = model
        self.config = config or RuntimeConfig()
        self.metrics = RuntimeMetrics(registry)
        self.store = AdapterStore(
            model, config=store_config or StoreConfig(), metrics=self.metrics, resolver=resolver
        )
        # Serving is inference: dropout (and anything else a module does in training mode) would make
        # rows random. A model built from a config starts in training mode, so the runtime switches it.
        model.eval()
        # Token ids are padded with the model's own pad id: a decoder classifier finds each row's
        # last real token by looking for it, so padding with another id would move that token.
        self._pad_values = {**_default_pad_values(model.model), **self.config.pad_values}
        _check_pad_id(model.model)
        self._select = select_output or default_select_output
        self._add_mask = self.config.attention_mask
        if self._add_mask is None:
            params = inspect.signature(model.model.forward).parameters
            self._add_mask = "attention_mask" in params
        # The input names the model's forward takes (None: it takes **kwargs, so any name).
        self._accepted = _accepted_inputs(model.model)
        # Input layouts already checked, by name tuple: a cache for the fast path of _validate, not
        # a rule. A request laid out otherwise takes the thorough path and is accepted if valid.
        # Per input: dtype, per-token shape, whether it is a token input (see _TOKEN_INPUTS), and
        # which length it follows (0: the inputs', 1: the decoder inputs').
        self._layouts: dict[tuple[str, ...], tuple[tuple[_InputSpec, ...], object]] = {}
        # Token ids must index the model's embedding table: one id out of range would fail its
        # whole batch (and on CUDA an out-of-range gather is a device assert that ends the process's
        # CUDA context), so submit() refuses it up front.
        self._vocab_size = _vocab_size(model.model)
        # Likewise a row longer than the position table, or floats of another dtype than the
        # weights, fail in the model; refused at submit instead (see _check_length_fits, _check_dtypes_fit).
        self._max_positions = _max_positions(model.model)
        self._float_dtype = _float_dtype(model.model)
        self._pending: dict[int, _Request] = {}  # insertion order = arrival order
        self._demand_counts: dict[object, int] = {}  # adapter key -> queued requests
        self._demand_dirty = False
        self._room_waiters = 0
        self._splits_reported = model.split_batches
        self._prefetched: set[object] = set()  # keys already handed to the prefetcher while queued
        self._seq = itertools.count()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wakeup: asyncio.Event | None = None
        self._room: asyncio.Condition | None = None
        self._inflight: set[asyncio.Task[None]] = set()
        self._watchers: dict[object, asyncio.Task[None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()  # every other task the runtime starts
        self._output_layouts: dict[object, _OutputLayout] = {}  # worker thread only
        self._probe_failed = False
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._completer: concurrent.futures.ThreadPoolExecutor | None = None
        self._copy_out: Any = None  # CUDA stream for output copies to the host (worker thread only)
        self._scheduler_task: asyncio.Task[None] | None = None
        self._state: Literal["new", "running", "closing", "closed", "crashed"] = "new"
        self._crash: BaseException | None = None
        self._stats = dict.fromkeys(
            (
                "submitted",
                "completed",
                "failed",
                "cancelled",
                "timed_out",
                "rejected",
                "batches",
                "mixed_batches",
                "max_adapters_in_batch",
                "rows",
                "padded_tokens",
                "real_tokens",
                "isolated_failures",
            ),
            0,
        )

    # -- lifecycle ----------------------------------------------------------------------------------

    async def __aenter__(self) -> Runtime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the scheduler and the worker thread (``async with`` does this)."""
        if self._state != "new":
            raise RuntimeClosedError(f"the runtime cannot start: it is {self._state}")
        self._loop = asyncio.get_running_loop()
        self._wakeup = asyncio.Event()
        self._room = asyncio.Condition()
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polylora-gpu")
        self._completer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polylora-done")
        self._state = "running"
        self._scheduler_task = self._loop.create_task(self._scheduler(), name="polylora-scheduler")

    async def aclose(self, *, shutdown: Literal["drain", "cancel"] | None = None) -> None:
        """Stop taking requests, then drain or cancel the queue; every pending request resolves.

        Args:
            shutdown: overrides :attr:`RuntimeConfig.shutdown` for this call.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            await _cancel_all(list(self._tasks))
            await self.store.aclose()
            return
        mode = shutdown or self.config.shutdown
        if self._state == "running":
            self._state = "closing"
        if mode == "cancel":
            self._fail_pending(lambda: RuntimeClosedError("the runtime closed before this request ran"))
        self._wake()
        if self._scheduler_task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._scheduler_task)
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        await _cancel_all([*self._watchers.values(), *self._tasks])
        self._fail_pending(lambda: RuntimeClosedError("the runtime closed before this request ran"))
        if self._state != "crashed":
            self._state = "closed"
        for pool in (self._executor, self._completer):
            if pool is not None:
                pool.shutdown(wait=True)
        await self.store.aclose()

    # -- adapters ---------------------------------------------------------------------------------

    def register_adapter(self, adapter_id: str, source: Any, *, peft_adapter_name: str | None = None) -> None:
        """Make an adapter servable (a PEFT directory, a PeftModel, or a (state_dict, config) tuple).

        Registering an id again replaces it: requests already submitted finish on the old version.
        The source is checked now against the wrapped model without reading tensor data (a
        directory's ``adapter_config.json`` and safetensors header; an in-memory source's config
        and shapes; see :meth:`AdapterStore.register`): what that shows to be unusable is refused
        here, and nothing is registered (a previous version keeps serving). Values (NaN/Inf) are
        checked when the first request loads it.

        Raises:
            InputValidationError: ``adapter_id`` is not a non-empty string.
            AdapterLoadError: the directory, its ``adapter_config.json`` or its weights file is
                missing, unreadable or truncated.
            UnsupportedAdapterError: a PEFT feature not served (a ``peft_type`` other than LORA,
                DoRA, LoRA bias, ...).
            AdapterFormatError: a module that is not wrapped, a shape that does not fit its layer,
                a rank above ``max_rank`` or other than the config's.
            RuntimeClosedError: the runtime is closing or closed.
        """
        self._check_not_closed()
        _check_adapter_id(adapter_id, "adapter_id")
        with _closed_as_runtime_closed():
            self.store.register(adapter_id, source, peft_adapter_name=peft_adapter_name)

    def unregister_adapter(self, adapter_id: str) -> None:
        """Forget an adapter; requests already submitted for it finish.

        Raises:
            InputValidationError: ``adapter_id`` is not a non-empty string.
            AdapterNotFoundError: unknown id.
            RuntimeClosedError: the runtime is closing or closed.
        """
        self._check_not_closed()
        _check_adapter_id(adapter_id, "adapter_id")
        with _closed_as_runtime_closed():
            self.store.unregister(adapter_id)

    def prefetch(self, adapter_ids: Iterable[str]) -> None:
        """Start loading adapters towards the GPU tier before requests for them arrive.

        The load runs in a task the runtime owns (``aclose()`` cancels it); unknown ids are skipped.

        Raises:
            InputValidationError: ``adapter_ids`` is a string or not an iterable of non-empty strings.
            RuntimeClosedError: the runtime is closing or closed.
        """
        self._check_not_closed()
        if isinstance(adapter_ids, (str, bytes)) or not isinstance(adapter_ids, Iterable):
            raise InputValidationError(f"`adapter_ids` must be an iterable of adapter ids, got {adapter_ids!r}")
        ids = list(adapter_ids)
        for adapter_id in ids:
            _check_adapter_id(adapter_id, "adapter_ids")
        self._spawn(self._prefetch_ids(ids), "polylora-prefetch")

    async def _prefetch_ids(self, adapter_ids: list[str]) -> None:
        refs = []
        try:
            for adapter_id in adapter_ids:
                with contextlib.suppress(Exception):
                    refs.append(await self.store.resolve(adapter_id))
            with contextlib.suppress(StoreClosedError):  # closed meanwhile: nothing left to warm
                self.store.prefetch(refs)
        finally:
            for ref in refs:
                self.store.release_ref(ref)

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[None]:
        """A task the runtime keeps until it ends, so none is lost and ``aclose()`` can end them all."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # -- submitting ---------------------------------------------------------------------------------

    async def submit(
        self, inputs: Mapping[str, torch.Tensor], adapter: str = BASE_ADAPTER, *, timeout: float | None = None
    ) -> Any:
        """Run one row through the model with ``adapter`` and return its output.

        Args:
            inputs: per-request tensors of the request's own length ``L`` (e.g.
                ``{"input_ids": LongTensor[L]}``, or a tokenizer's ``[1, L]`` of any integer
                dtype); names are the model's ``forward`` arguments. The runtime normalises,
                pads and batches (the rules: README, "Inputs as tokenizers produce them").
            adapter: an adapter id, or :data:`BASE_ADAPTER`.
            timeout: seconds until :class:`RequestTimeoutError`, counted from the call (waiting for
                room in a full queue included); the request is withdrawn.

        Raises:
            AdapterNotFoundError: unknown adapter id (raised before queueing).
            InputValidationError: empty inputs, mismatched lengths, a name the model's ``forward``
                does not take, wrong dtype or shape, token ids outside the model's vocabulary, a
                row longer than the model's positions; an
                ``adapter`` that is not a non-empty string; a ``timeout`` that is not a positive
                finite number or None.
            RuntimeClosedError: the runtime is closing or closed.
            WorkerCrashedError: the runtime broke.
            BatchFailedError: this request fails the model (its batch was re-run without it and
                its neighbours got their results); the cause is chained.
            AdapterLoadError: the adapter could not be loaded.
        """
        # One coroutine frame per request: the awaits below are taken only on slow paths (an id
        # the resolver must find, a full queue) and for the result itself.
        loop = asyncio.get_running_loop()
        _check_timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        self._check_open()
        _check_adapter_id(adapter, "adapter")
        _check_input_names(inputs)
        self._check_dtypes_fit(inputs)
        tensors, length, decoder_length, group = self._validate(inputs)
        if adapter == BASE_ADAPTER:
            ref = None
        else:
            with _closed_as_runtime_closed():
                ref = self.store.resolve_registered(adapter)
                if ref is None:  # the resolver's fetch counts against the request's timeout too
                    try:
                        async with asyncio.timeout_at(deadline):
                            ref = await self.store.resolve(adapter)
                    except TimeoutError:
                        self._stats["timed_out"] += 1
                        self.metrics.request_done("timeout", timeout or 0.0)
                        raise RequestTimeoutError(f"adapter {adapter!r} was not resolved within {timeout} s") from None
        if len(self._pending) >= self.config.max_queue or self._state != "running":
            try:
                await self._wait_for_room(deadline)
                self._check_open()
            except BaseException:
                if ref is not None:
                    self.store.release_ref(ref)
                raise
        request = self._push(tensors, length, ref, group, decoder_length)
        # From here on this coroutine owns the request's bookkeeping, however it ends (result,
        # error, timeout, or the caller's cancellation, which cancels the future with it and so
        # withdraws a queued request): cheaper than a done-callback on every future.
        timer = None
        if timeout is not None and deadline is not None:
            timer = loop.call_at(deadline, self._expire, request, timeout)
        try:
            return await request.future
        finally:
            if timer is not None:
                timer.cancel()
            self._finished(request)

    def submit_nowait(self, inputs: Mapping[str, torch.Tensor], adapter: str = BASE_ADAPTER) -> asyncio.Future[Any]:
        """Queue a request without waiting for room; returns a future of its result.

        The adapter must already be registered (it is resolved without awaiting a resolver).
        Arguments are checked as :meth:`submit` checks them and raise the same errors.

        Raises:
            OverloadedError: the queue holds ``max_queue`` requests.
        """
        self._check_open()
        _check_adapter_id(adapter, "adapter")
        if len(self._pending) >= self.config.max_queue:
            self._stats["rejected"] += 1
            self.metrics.request_done("rejected", 0.0)
            raise OverloadedError(f"the queue is full ({self.config.max_queue} requests); retry later")
        _check_input_names(inputs)
        self._check_dtypes_fit(inputs)
        tensors, length, decoder_length, group = self._validate(inputs)
        with _closed_as_runtime_closed():
            ref = None if adapter == BASE_ADAPTER else self.store.resolve_nowait(adapter)
        request = self._push(tensors, length, ref, group, decoder_length)
        # Nobody of ours awaits this future: its bookkeeping runs when it resolves.
        request.future.add_done_callback(functools.partial(self._on_done, request))
        return request.future

    async def stream(
        self, requests: Iterable[tuple[Any, Mapping[str, torch.Tensor], str]] | AsyncIterator[Any]
    ) -> AsyncIterator[StreamResult]:
        """Submit ``(key, inputs, adapter)`` items and yield their results as they complete.

        Reading from the source follows the queue's room: at most ``max_queue`` items are taken
        and not yet yielded. A failed request yields a result whose ``error`` is set instead of
        ending the stream. A source that raises (or yields an item that is not a 3-tuple) ends the
        stream with that error once the requests already taken have been yielded. Closing or
        cancelling the consumer cancels the requests it started.

        Raises:
            InputValidationError: ``requests`` is not an iterable, or an item is malformed.
        """
        if not isinstance(requests, (Iterable, AsyncIterator)):
            raise InputValidationError(f"`requests` must be an iterable or async iterator, got {requests!r}")
        done: asyncio.Queue[StreamResult | _SourceEnd] = asyncio.Queue()
        room = asyncio.Semaphore(self.config.max_queue)
        started = 0

        async def run_one(key: Any, inputs: Mapping[str, torch.Tensor], adapter: str) -> None:
            try:
                result = StreamResult(key, value=await self.submit(inputs, adapter))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                result = StreamResult(key, error=exc)
            done.put_nowait(result)

        async def feed() -> None:
            nonlocal started
            error: BaseException | None = None
            try:
                source = requests if isinstance(requests, AsyncIterator) else iter(requests)
                while True:
                    await room.acquire()  # released when the consumer takes a result
                    try:
                        item = await anext(source) if isinstance(source, AsyncIterator) else next(source)
                    except (StopIteration, StopAsyncIteration):
                        break
                    key, inputs, adapter = _stream_item(item, started)
                    started += 1
                    task = asyncio.get_running_loop().create_task(run_one(key, inputs, adapter))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                error = exc
            done.put_nowait(_SourceEnd(error))

        tasks: set[asyncio.Task[None]] = set()
        feeder = asyncio.get_running_loop().create_task(feed())
        yielded = 0
        end: _SourceEnd | None = None
        try:
            while end is None or yielded < started:
                item = await done.get()
                if isinstance(item, _SourceEnd):
                    end = item
                    continue
                yielded += 1
                room.release()
                yield item
            if end.error is not None:
                raise end.error
        finally:
            await _cancel_all([feeder, *tasks])

    @property
    def state(self) -> Literal["new", "running", "closing", "closed", "crashed"]:
        """``"running"`` while requests are accepted (for health checks)."""
        return self._state

    async def load_adapter(self, adapter_id: str, *, pin: bool = False) -> None:
        """Load an adapter onto the device now and wait until it is there (``pin``: keep it there).

        Raises:
            InputValidationError: ``adapter_id`` is not a non-empty string or ``pin`` not a bool.
            AdapterNotFoundError: unknown id. AdapterLoadError: the adapter cannot be loaded.
            RuntimeClosedError: the runtime is closing or closed.
        """
        self._check_not_closed()
        _check_adapter_id(adapter_id, "adapter_id")
        if not isinstance(pin, bool):
            raise InputValidationError(f"`pin` must be a bool, got {pin!r}")
        with _closed_as_runtime_closed():
            await self.store.preload([adapter_id], pin=pin)

    def statistics(self) -> RuntimeStatistics:
        """A frozen snapshot of counters (requests, batches, mixing, padding, tiers)."""
        return RuntimeStatistics(
            **self._stats,
            queued=len(self._pending),
            split_batches=self.model.split_batches,
            store=self.store.statistics(),
        )

    # -- request plumbing -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "crashed":
            raise WorkerCrashedError("the runtime's worker failed; no more requests are accepted") from self._crash
        if self._state == "new":
            raise RuntimeClosedError("the runtime is not started: call `await start()` or use `async with`")
        if self._state != "running":
            raise RuntimeClosedError(f"the runtime is {self._state}; no more requests are accepted")

    def _check_not_closed(self) -> None:
        """For adapter management, which also works before ``start()``."""
        if self._state in ("closing", "closed"):
            raise RuntimeClosedError(f"the runtime is {self._state}")

    def _check_length_fits(self, length: int, decoder_length: int) -> None:
        """Refuse a row longer than the model's position table: it would fail its whole batch."""
        if self._max_positions is None:
            return
        for what, value in (("inputs have", length), ("decoder inputs have", decoder_length)):
            if value > self._max_positions:
                raise InputValidationError(
                    f"{what} length {value}, above the model's {self._max_positions} positions"
                )

    def _check_dtypes_fit(self, inputs: Mapping[str, Any]) -> None:
        """Refuse float vectors of another dtype than the weights (checked before inputs are normalised)."""
        if self._float_dtype is None or not isinstance(inputs, Mapping):
            return
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            # Per-token vectors (embeddings) meet the weights directly; a float mask is converted.
            if value.is_floating_point() and value.dim() >= 2 and value.dtype != self._float_dtype:
                raise InputValidationError(
                    f"input {name!r} is {value.dtype}, but the model computes in {self._float_dtype}"
                )

    def _has_room(self) -> bool:
        return len(self._pending) < self.config.max_queue or self._state != "running"

    async def _wait_for_room(self, deadline: float | None) -> None:
        assert self._room is not None
        self._room_waiters += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline), self._room:
                await self._room.wait_for(self._has_room)
        except TimeoutError:
            self._stats["timed_out"] += 1
            self.metrics.request_done("timeout", time.perf_counter() - started)
            raise RequestTimeoutError("no room in the queue before the request's timeout") from None
        finally:
            self._room_waiters -= 1

    def _push(
        self,
        tensors: dict[str, torch.Tensor],
        length: int,
        ref: AdapterRef | None,
        group: object = None,
        decoder_length: int = 0,
    ) -> _Request:
        assert self._loop is not None
        request = _Request(
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
        self._pending[request.seq] = request
        if ref is not None:
            self._demand_counts[request.key] = self._demand_counts.get(request.key, 0) + 1
            self._demand_dirty = True
            self.store.note_gpu_lookup(ref)  # per request: was its adapter resident on arrival?
        self._stats["submitted"] += 1
        self._wake()
        return request

    def _expire(self, request: _Request, timeout: float) -> None:
        if not request.future.done():
            request.future.set_exception(RequestTimeoutError(f"no result within {timeout} s"))

    def _on_done(self, request: _Request, _future: asyncio.Future[Any]) -> None:
        self._finished(request)

    def _finished(self, request: _Request) -> None:
        """Bookkeeping when a request's future resolves, however it resolves."""
        self._unqueue(request)
        if request.ref is not None:
            self.store.release_ref(request.ref)
        elapsed = time.perf_counter() - request.submitted
        if request.future.cancelled():
            outcome = "cancelled"
            self._stats["cancelled"] += 1
        elif isinstance(request.future.exception(), RequestTimeoutError):
            outcome = "timeout"
            self._stats["timed_out"] += 1
        elif request.future.exception() is not None:
            outcome = "error"
            self._stats["failed"] += 1
        else:
            outcome = "ok"
            self._stats["completed"] += 1
        queue_wait = None if request.dispatched is None else request.dispatched - request.submitted
        self.metrics.request_done(outcome, elapsed, queue_wait)
        if self._room_waiters and self._loop is not None:
            self._spawn(self._notify_room(), "polylora-room")

    async def _notify_room(self) -> None:
        assert self._room is not None
        async with self._room:
            self._room.notify_all()

    def _validate(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, int, object]:
        """Normalised inputs, their length, the decoder inputs' length (0: none) and the batching group."""
        # Once per request on the event loop: the common case (a layout already seen: same names,
        # dtypes and per-token shapes, token inputs int64 [L], or a tokenizer's [1, L] / int32 of
        # them) is a dict lookup and a few comparisons per input; anything else takes the thorough
        # path, which normalises or names the problem.
        if type(inputs) is dict:
            cached = self._layouts.get(tuple(inputs))
            if cached is not None:
                specs, group = cached
                tensors: dict[str, torch.Tensor] = {}
                lengths = [-1, -1]  # inputs, decoder inputs
                for (name, value), (dtype, trailing, token, axis) in zip(inputs.items(), specs, strict=True):
                    if type(value) is not torch.Tensor:
                        break
                    shape = value.shape
                    if token and len(shape) == 2 and shape[0] == 1:
                        value = value[0]
                        shape = value.shape
                    if not shape or shape[1:] != trailing:
                        break
                    if value.dtype != dtype:
                        if not (token and value.dtype == torch.int32):
                            break
                        value = value.long()
                    if lengths[axis] < 0:
                        lengths[axis] = shape[0]
                    elif shape[0] != lengths[axis]:
                        break
                    tensors[name] = value
                else:
                    length, decoder_length = lengths[0], max(lengths[1], 0)
                    if 0 < length and decoder_length + length <= self.config.max_batch_tokens:
                        self._check_token_ids(tensors)
                        self._check_length_fits(length, decoder_length)
                        return tensors, length, decoder_length, group
        return self._validate_thoroughly(inputs)

    def _check_token_ids(self, inputs: Mapping[str, torch.Tensor]) -> None:
        if self._vocab_size is None:
            return
        for name in ("input_ids", "decoder_input_ids"):
            ids = inputs.get(name)
            if ids is None or ids.device.type != "cpu":  # a device tensor: no sync here
                continue
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= self._vocab_size:
                bad = int(low) if int(low) < 0 else int(high)
                raise InputValidationError(
                    f"input {name!r} holds token id {bad}, outside the model's vocabulary [0, {self._vocab_size})"
                )

    def _validate_thoroughly(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, int, object]:
        """Check and normalise one request's inputs against the model (not against other requests).

        Rules: every name must be a parameter of the model's forward (any name if it takes
        ``**kwargs``). Token-level integer inputs (ids, masks, token types, positions) are ``[L]``
        or ``[1, L]`` (what a tokenizer returns with ``return_tensors="pt"``) of any integer dtype
        (masks may be bool too) and become int64 ``[L]``; ``inputs_embeds`` is ``[L, H]`` or
        ``[1, L, H]``; other inputs are taken as given, ``[L, ...]``. All share the length ``L``,
        except an encoder-decoder's decoder inputs (names starting with ``decoder_``), which share
        a length of their own. There must be inputs other than decoder inputs.
        """
        if not isinstance(inputs, Mapping) or not inputs:
            raise InputValidationError("`inputs` must be a non-empty mapping of name -> tensor")
        tensors: dict[str, torch.Tensor] = {}
        lengths: dict[bool, tuple[str, int]] = {}  # decoder input? -> (first name, its length)
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                raise InputValidationError(f"input {name!r} must be a tensor, got {type(value).__name__}")
            if self._accepted is not None and name not in self._accepted:
                raise InputValidationError(
                    f"input {name!r} is not an argument of the model's forward, which takes {sorted(self._accepted)}"
                )
            if value.dim() == 0:
                raise InputValidationError(f"input {name!r} must have a length dimension, got a scalar")
            if name in _TOKEN_INPUTS:
                value = self._token_input(name, value)
            elif name == "inputs_embeds" and value.dim() == 3 and value.shape[0] == 1:
                value = value[0]
            decoder = _is_decoder_input(name)
            first, length = lengths.setdefault(decoder, (name, value.shape[0]))
            if value.shape[0] != length:
                raise InputValidationError(
                    f"input {name!r} has length {value.shape[0]}, but input {first!r} has length {length}"
                    + (" (decoder inputs share one length of their own)" if decoder else "")
                )
            tensors[name] = value
        if False not in lengths:
            raise InputValidationError(
                f"inputs {sorted(tensors)} are all decoder inputs; the encoder's inputs (e.g. 'input_ids') are missing"
            )
        length = lengths[False][1]
        decoder_length = lengths[True][1] if True in lengths else 0
        if length == 0 or (True in lengths and decoder_length == 0):
            raise InputValidationError(f"inputs are empty (input {lengths[length > 0][0]!r} has length 0)")
        if length + decoder_length > self.config.max_batch_tokens:
            raise InputValidationError(
                f"inputs have {length + decoder_length} tokens, above `max_batch_tokens`={self.config.max_batch_tokens}"
            )
        self._check_token_ids(tensors)
        self._check_length_fits(length, decoder_length)
        specs = tuple(
            (t.dtype, tuple(t.shape[1:]), n in _TOKEN_INPUTS, int(_is_decoder_input(n))) for n, t in tensors.items()
        )
        group = _input_group(tensors)
        if len(self._layouts) < _MAX_LAYOUTS:
            self._layouts[tuple(tensors)] = (specs, group)
        return tensors, length, decoder_length, group

    @staticmethod
    def _token_input(name: str, value: torch.Tensor) -> torch.Tensor:
        """An integer per-token input as int64 ``[L]``, from ``[L]`` or ``[1, L]``."""
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise InputValidationError(
                f"input {name!r} must have shape [L] or [1, L], got {list(value.shape)} "
                f"(per-token shape {list(value.shape[1:])})"
            )
        if value.is_floating_point() or value.is_complex() or (value.dtype == torch.bool and name.endswith("_ids")):
            raise InputValidationError(f"input {name!r} must be an integer tensor, got {value.dtype}")
        return value if value.dtype == torch.int64 else value.long()

    def _unqueue(self, request: _Request) -> None:
        """Take a request out of the queue (no-op if it already left), keeping demand counts."""
        if self._pending.pop(request.seq, None) is None or request.key is None:
            return
        left = self._demand_counts[request.key] - 1
        if left:
            self._demand_counts[request.key] = left
        else:
            del self._demand_counts[request.key]
            self._prefetched.discard(request.key)
        self._demand_dirty = True

    def _fail_pending(self, make_error: Callable[[], BaseException]) -> None:
        for request in list(self._pending.values()):
            if not request.future.done():
                request.future.set_exception(make_error())
        self._pending.clear()
        self._demand_counts.clear()
        self._prefetched.clear()
        self._demand_dirty = True

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    # -- scheduling -------------------------------------------------------------------------------

    async def _scheduler(self) -> None:
        assert self._wakeup is not None
        try:
            while True:
                self.metrics.set_queue_depth(len(self._pending))
                if not self._pending and self._state != "running":
                    return
                if not self._pending:
                    await self._wait_wakeup(None)
                    continue
                if self.config.prefetch:
                    self._watch_lookahead()
                elif await self._load_oldest_inline():
                    # The queue may have changed under the await (the request withdrawn, timed
                    # out, others added): decide again from the top.
                    continue
                if len(self._inflight) >= self.config.max_inflight_batches:
                    await self._wait_wakeup(None)
                    continue
                if self._inflight and self._state == "running" and not self._queue_can_fill():
                    # The device is busy: let the queue grow into a full batch (or until the
                    # running batch completes) rather than queue a small batch behind it. Every
                    # batch has a fixed host cost; small batches behind a busy device only add up
                    # to queueing.
                    await self._wait_wakeup(None)
                    continue
                oldest = next(iter(self._pending.values()))
                deadline = oldest.submitted + self.config.max_wait
                now = time.perf_counter()
                if self._state == "running" and now < deadline and not self._queue_can_fill():
                    await self._wait_wakeup(deadline - now)
                    continue
                batch = self._form_batch()
                if batch is None:
                    await self._wait_wakeup(None)
                    continue
                task = asyncio.get_running_loop().create_task(self._run_batch(batch))
                self._inflight.add(task)
                task.add_done_callback(self._batch_finished)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._crashed(exc)

    def _batch_finished(self, task: asyncio.Task[None]) -> None:
        # Wake the scheduler only once the batch has left the in-flight set, so it sees the room.
        self._inflight.discard(task)
        self._wake()

    async def _wait_wakeup(self, timeout: float | None) -> None:
        assert self._wakeup is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._wakeup.wait()
        self._wakeup.clear()

    def _queue_can_fill(self) -> bool:
        return len(self._pending) >= self.config.max_batch_size

    def _ready(self, request: _Request) -> bool:
        return request.ref is None or self.store.is_gpu_ready(request.ref)

    def _watch_lookahead(self) -> None:
        """Prefetch for the queue's head; force-load only the oldest request's adapter.

        Adapters of the next batches (the first ``num_slots`` distinct ones in the queue) are
        loaded into GPU slots that hold nothing queued requests need; adapters further back are
        warmed into the CPU tier once. Only the oldest waiting request's adapter may evict an
        adapter that other queued requests still need: one forced load at a time guarantees
        progress, while forcing several at once would evict each other's fresh weights (thrash).
        """
        refs: dict[object, AdapterRef] = {}
        for request in itertools.islice(self._pending.values(), self.config.lookahead):
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
        oldest = next(iter(self._pending.values()))
        if oldest.ref is not None and oldest.key not in self._watchers and not self.store.is_gpu_ready(oldest.ref):
            self._watchers[oldest.key] = asyncio.get_running_loop().create_task(self._watch(oldest.ref))

    async def _load_oldest_inline(self) -> bool:
        """Load the oldest request's adapter now; True when it awaited (the queue may differ after)."""
        oldest = next(iter(self._pending.values()))
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
        for request in list(self._pending.values()):
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
            self._wake()

    def _form_batch(self) -> _Batch | None:
        """Oldest first: ready requests, bounded by rows, padded tokens and distinct adapters."""
        cfg = self.config
        oldest = next(iter(self._pending.values()))
        if oldest.passed_over >= cfg.starvation_limit and not self._ready(oldest):
            return None  # wait for the starving request's adapter rather than pass it over again
        slots_free = self.model.config.num_slots
        chosen: list[_Request] = []
        keys: dict[object, AdapterRef] = {}
        width = decoder_width = 0
        anchor = None
        skipped: list[_Request] = []
        for request in self._pending.values():
            if len(chosen) >= cfg.max_batch_size:
                break
            if request.future.done():
                continue
            if chosen and request.group != chosen[0].group:
                continue  # other input names or layouts: a batch of their own
            if not self._ready(request) or (
                request.key is not None and request.key not in keys and len(keys) >= slots_free
            ):
                skipped.append(request)
                continue
            if cfg.length_bucketing:
                anchor = anchor or request.length
                if not anchor / 2 < request.length <= anchor * 2:
                    continue
            new_width = max(width, self._padded(request.length))
            new_decoder_width = max(decoder_width, self._padded(request.decoder_length))
            if (new_width + new_decoder_width) * (len(chosen) + 1) > cfg.max_batch_tokens:
                continue
            chosen.append(request)
            width, decoder_width = new_width, new_decoder_width
            if request.ref is not None:
                keys.setdefault(request.key, request.ref)
        if not chosen:
            return None
        lease = self.store.lease(list(keys.values()))
        last = chosen[-1].seq
        for request in skipped:
            if request.seq < last:
                request.passed_over += 1
        now = time.perf_counter()
        for request in chosen:
            self._unqueue(request)
            request.dispatched = now
        slots = [0 if r.ref is None else lease.slot_of(r.ref) for r in chosen]
        batch = _Batch(requests=chosen, slots=slots, width=width, lease=lease, decoder_width=decoder_width)
        self.metrics.set_queue_depth(len(self._pending))
        return batch

    async def _run_batch(self, batch: _Batch) -> None:
        assert self._loop is not None and self._executor is not None
        lease = batch.lease
        distinct = len(set(batch.slots))
        self._stats["batches"] += 1
        self._stats["mixed_batches"] += distinct > 1
        self._stats["max_adapters_in_batch"] = max(self._stats["max_adapters_in_batch"], distinct)
        self._stats["rows"] += len(batch.requests)
        self._stats["padded_tokens"] += (batch.width + batch.decoder_width) * len(batch.requests)
        self._stats["real_tokens"] += sum(r.length + r.decoder_length for r in batch.requests)
        self.metrics.batch(len(batch.requests), batch.width * len(batch.requests), distinct)
        started = time.perf_counter()
        done_event = None
        try:
            outcome, payload, done_event = await self._loop.run_in_executor(self._executor, self._execute, batch)
            if outcome == "error" and _is_device_error(payload):
                raise payload  # the device is broken: every later batch would fail too
            if outcome == "error" and len(batch.requests) > 1:
                await self._isolate(batch, payload)  # the slots are still leased for the re-runs
                outcome, payload = "isolated", None
        except BaseException as exc:  # the worker machinery (or the device) failed
            lease.release(None)
            self._crashed(exc)
            for request in batch.requests:
                if not request.future.done():
                    request.future.set_exception(_crash_error(exc))
            return
        lease.release(done_event)  # slot reuse is ordered after `done_event` on the device
        if outcome == "pending":
            # The forward was only launched: wait for the device and slice rows in the completion
            # thread, while the worker thread already launches the next batch.
            assert self._completer is not None
            try:
                outcome, payload = await self._loop.run_in_executor(self._completer, self._complete, batch, payload)
            except BaseException as exc:
                self._crashed(exc)
                for request in batch.requests:
                    if not request.future.done():
                        request.future.set_exception(_crash_error(exc))
                return
        self.metrics.batch_duration(time.perf_counter() - started)
        while self._splits_reported < self.model.split_batches:  # run in adapter-homogeneous groups
            self._splits_reported += 1
            self.metrics.split_batch()
        if outcome == "ok":
            _set_results(batch.requests, payload)
        elif outcome == "error":
            if _is_device_error(payload):
                self._crashed(payload)
            self._fail_batch(batch, payload)
        self._wake()

    def _fail_batch(self, batch: _Batch, exc: BaseException) -> None:
        for request in batch.requests:
            if not request.future.done():
                error = BatchFailedError(f"the batch of {len(batch.requests)} rows failed: {exc!r}")
                error.__cause__ = exc
                request.future.set_exception(error)

    async def _isolate(self, batch: _Batch, exc: BaseException) -> None:
        """Re-run a failed batch in halves until each failure is one request's own.

        A failure that depends on the rows (one bad request) then fails only that request, with
        the cause; the others get their results. The lease is still held, so the slots are the
        batch's. ``log2(rows)`` rounds of forwards at most, run only after a failure.
        """
        assert self._loop is not None and self._executor is not None and self._completer is not None
        live = [i for i, r in enumerate(batch.requests) if not r.future.done()]
        if not live:
            return
        if len(live) == 1 or len(batch.requests) == 1:
            request = batch.requests[live[0]]
            error = BatchFailedError(f"this request failed alone when its batch was re-run: {exc!r}")
            error.__cause__ = exc
            request.future.set_exception(error)
            self._stats["isolated_failures"] += 1
            self.metrics.isolated_failure()
            return
        half = len(live) // 2
        for part in (live[:half], live[half:]):
            requests = [batch.requests[i] for i in part]
            sub = _Batch(
                requests=requests,
                slots=[batch.slots[i] for i in part],
                width=max(self._padded(r.length) for r in requests),
                lease=batch.lease,
                decoder_width=max(self._padded(r.decoder_length) for r in requests),
            )
            outcome, payload, _computed = await self._loop.run_in_executor(self._executor, self._execute, sub)
            if outcome == "pending":
                outcome, payload = await self._loop.run_in_executor(self._completer, self._complete, sub, payload)
            if outcome == "ok":
                _set_results(requests, payload)
            elif _is_device_error(payload):
                raise payload
            else:
                await self._isolate(sub, payload)

    def _padded(self, length: int) -> int:
        cfg = self.config
        return min(-(-length // cfg.pad_to_multiple) * cfg.pad_to_multiple, cfg.max_batch_tokens)

    # -- the worker thread --------------------------------------------------------------------------

    def _execute(self, batch: _Batch) -> tuple[str, Any, Any]:
        """Runs in the worker thread: collate, order after slot copies, launch the forward.

        On CUDA it returns as soon as the forward and the copy of its output into pinned host
        memory are queued ("pending"), so this thread can launch the next batch while the device
        works; :meth:`_complete` waits for the device in another thread. On the CPU the forward is
        already done and the rows are sliced here.

        Returns ``(outcome, payload, computed)``: ``computed`` is recorded on the compute stream
        right after the forward (the batch's slots may be rewritten after it), the payload's event
        after the output's copy to the host, which runs on a stream of its own: on the compute
        stream it would hold the next batch's forward back for the whole copy (32 MiB, a
        32 x 256 x 2048 bf16 output, is over 1 ms at PCIe speeds, against a ~24 ms forward).
        """
        inputs = self._collate(batch)
        batch.lease.wait_copies()
        try:
            with torch.inference_mode():
                batch.head_widths = self.model.head_widths(batch.slots) if self.model.head_names else {}
                outputs = self.model.forward_slots(batch.slots, **inputs)
                selected = self._select(outputs)
                _check_rows(selected, batch)
                batch.layout = self._layout(batch, selected)
                if not selected.is_cuda:
                    return "ok", self._split_rows(selected, batch), None
                computed = torch.cuda.Event()
                computed.record()
                if not self.config.results_on_cpu:
                    return "pending", (selected, computed), computed
                stream = self._output_stream(selected.device)
                host = torch.empty(selected.shape, dtype=selected.dtype, pin_memory=True)
                with torch.cuda.stream(stream):
                    stream.wait_event(computed)
                    host.copy_(selected, non_blocking=True)
                    # `selected` belongs to the compute stream's memory pool: without this, the
                    # next batch could be given its memory while the copy still reads it.
                    selected.record_stream(stream)
                    copied = torch.cuda.Event()
                    copied.record(stream)
                return "pending", (host, copied), computed
        except Exception as exc:  # the model or the output hook failed: this batch only
            return "error", exc, None

    def _layout(self, batch: _Batch, selected: torch.Tensor) -> _OutputLayout:
        """The output layout for this batch's input names (probed once per set of names and heads).

        Which output axes follow the sequence cannot be read off one batch: a hidden size or a
        label count may equal the padded width by coincidence. So one row runs alone, base model,
        at two lengths: an axis whose size is that length both times follows the sequence. A head
        whose width varies per adapter is found the same way, with the head made one column wider
        (:meth:`MultiLoraModel.head_width_probe`). If probing fails, the batch keeps the old rule
        (axis 1 is cut when its size is the padded width) and a warning is logged once.
        """
        names = tuple(batch.requests[0].inputs)
        key = (names, tuple(sorted(batch.head_widths)))
        layout = self._output_layouts.get(key)
        if layout is not None:
            return layout
        try:
            layout = self._probe_layout(batch)
        except Exception as exc:  # the batch itself ran: keep its rows, cut along axis 1 if it is the width
            if not self._probe_failed:
                self._probe_failed = True
                _log.warning("output layout probe failed (%r); axis 1 is cut if it has the padded width", exc)
            return _OutputLayout((1,) if selected.dim() >= 2 and selected.shape[1] == batch.width else ())
        self._output_layouts[key] = layout
        return layout

    def _probe_layout(self, batch: _Batch) -> _OutputLayout:
        # Two lengths of the first request's own tokens (no padding: a model may treat padding
        # specially): its first n positions, and those plus the n-th once more; decoder inputs,
        # if any, are lengthened separately (m and m + 1), so either length can be told apart.
        first = batch.requests[0]
        n, m = min(first.length, 8), min(first.decoder_length, 8)

        def probe(extra: int, decoder_extra: int) -> _Request:
            inputs = {}
            for name, value in first.inputs.items():
                keep, more = (m, decoder_extra) if _is_decoder_input(name) else (n, extra)
                inputs[name] = torch.cat([value[:keep], value[keep - 1 : keep].expand(more, *value.shape[1:])])
            return dataclasses.replace(first, inputs=inputs, length=n + extra, decoder_length=m + decoder_extra)

        short = probe(0, 0)
        shape = self._probe_shape(short, batch.lease)

        def grows(other: tuple[int, ...], size: int | None) -> tuple[int, ...]:
            # The axes one longer in `other` (of size `size` in the short probe, if given).
            if len(other) != len(shape):
                return ()
            return tuple(
                a for a in range(1, len(shape)) if other[a] == shape[a] + 1 and (size is None or shape[a] == size)
            )

        sequence_axes = grows(self._probe_shape(probe(1, 0), batch.lease), n)
        decoder_axes = grows(self._probe_shape(probe(0, 1), batch.lease), m) if m else ()
        head_axes: dict[str, int] = {}
        for name in sorted(batch.head_widths):
            with self.model.head_width_probe(name):
                grown = grows(self._probe_shape(short, batch.lease), None)
            if len(grown) == 1:
                head_axes[name] = grown[0]
        return _OutputLayout(sequence_axes, head_axes, decoder_axes)

    def _probe_shape(self, request: _Request, lease: BatchLease) -> tuple[int, ...]:
        probe = _Batch(
            requests=[request], slots=[0], width=request.length, lease=lease, decoder_width=request.decoder_length
        )
        selected = self._select(self.model.forward_slots([0], **self._collate(probe)))
        return tuple(selected.shape)

    def _output_stream(self, device: torch.device) -> Any:
        """The worker's stream for copying outputs to the host (created on first use)."""
        if self._copy_out is None:
            self._copy_out = torch.cuda.Stream(device)
        return self._copy_out

    def _complete(self, batch: _Batch, pending: tuple[torch.Tensor, Any]) -> tuple[str, Any]:
        """Runs in the completion thread: wait for the batch's device work, then slice rows."""
        selected, done = pending
        try:
            done.synchronize()
            with torch.inference_mode():
                return "ok", self._split_rows(selected, batch)
        except Exception as exc:  # a device error surfaced by the wait: this batch only
            return "error", exc

    def _collate(self, batch: _Batch) -> dict[str, torch.Tensor]:
        """Right-pad every input into one ``[rows, width, ...]`` tensor (pinned on CUDA), then upload.

        Token-level inputs (``[L]``: ids, masks, positions) take a constant number of torch calls
        whatever the row count: one boolean mask of the real tokens places all rows at once
        (row-major order of the mask = the rows concatenated). Copying row by row cost ~26 us per
        row on a 2-core development CPU, and this runs in the worker thread, whose Python time the
        event loop waits for. Inputs with per-token vectors (``[L, ...]``, e.g. embeddings) are
        copied row by row: there the bytes dominate, and the one-call path copies them twice.
        """
        device = self.model.device
        requests = batch.requests
        rows, width = len(requests), batch.width
        pin = device.type == "cuda"
        real = _token_mask([r.length for r in requests], width)
        if batch.decoder_width:  # an encoder-decoder's decoder inputs: padded along their own length
            decoder_real = _token_mask([r.decoder_length for r in requests], batch.decoder_width)
        out: dict[str, torch.Tensor] = {}
        # Requests of one batch have the same inputs (see _input_group), except that some may
        # lack an attention mask: those rows get ones over their real tokens below.
        masked = [r for r in requests if "attention_mask" in r.inputs]
        if masked and len(masked) < rows:
            for request in requests:
                if "attention_mask" not in request.inputs:
                    request.inputs["attention_mask"] = torch.ones(request.length, dtype=torch.long)
        for name, sample in (masked[0] if masked else requests[0]).inputs.items():
            decoder = _is_decoder_input(name)
            padded = torch.full(
                (rows, batch.decoder_width if decoder else width, *sample.shape[1:]),
                self._pad_values.get(name, 0),
                dtype=sample.dtype,
                pin_memory=pin,
            )
            if sample.dim() == 1:
                padded[decoder_real if decoder else real] = torch.cat([_on_cpu(r.inputs[name]) for r in requests])
            else:
                for row, request in zip(padded.unbind(0), requests, strict=True):
                    row[: request.decoder_length if decoder else request.length] = request.inputs[name]
            out[name] = padded.to(device, non_blocking=True)
        if self._add_mask and "attention_mask" not in out:
            mask = torch.empty(rows, width, dtype=torch.long, pin_memory=pin)
            mask.copy_(real)  # pinned: the upload below is queued, not waited for
            out["attention_mask"] = mask.to(device, non_blocking=True)
        return out

    def _split_rows(self, selected: torch.Tensor, batch: _Batch) -> list[torch.Tensor]:
        """Each request's slice of the batch output, in its own storage (no row keeps the batch alive).

        One copy per row, straight from the batch output: gathering the real tokens first and then
        cloning each row (fewer calls) copies everything twice, which cost 4x more for a
        32 x 256 x 2048 bf16 output on the development CPU.
        """
        if self.config.results_on_cpu and selected.device.type != "cpu":
            selected = selected.to("cpu")
        rows = selected.unbind(0)
        layout = batch.layout
        if layout is None or not (layout.sequence_axes or layout.head_axes or layout.decoder_axes):  # one per row
            return [row.clone() for row in rows]
        if layout.sequence_axes == (1,) and not (layout.head_axes or layout.decoder_axes):  # [rows, length, ...]
            return [row[: r.length].clone() for row, r in zip(rows, batch.requests, strict=True)]
        out = []
        for i, (row, request) in enumerate(zip(rows, batch.requests, strict=True)):
            for axis in layout.sequence_axes:
                row = row.narrow(axis - 1, 0, request.length)
            for axis in layout.decoder_axes:
                row = row.narrow(axis - 1, 0, request.decoder_length)
            for name, axis in layout.head_axes.items():
                row = row.narrow(axis - 1, 0, batch.head_widths[name][i])
            out.append(row.clone())
        return out

    def _crashed(self, exc: BaseException) -> None:
        if self._state == "crashed":
            return
        self._state = "crashed"
        self._crash = exc
        self._fail_pending(lambda: _crash_error(exc))
        self._wake()


@dataclass(frozen=True)
class _SourceEnd:
    """The stream's source is exhausted (``error`` None) or failed."""

    error: BaseException | None


def _stream_item(item: object, index: int) -> tuple[Any, Mapping[str, torch.Tensor], str]:
    if not isinstance(item, tuple) or len(item) != 3:
        raise InputValidationError(f"stream item {index} must be a (key, inputs, adapter) tuple, got {item!r}")
    return item


def _set_results(requests: list[_Request], rows: list[Any]) -> None:
    for request, row in zip(requests, rows, strict=True):
        if not request.future.done():  # a cancelled caller's result is discarded
            request.future.set_result(row)


def _is_device_error(exc: BaseException) -> bool:
    """A failure of the accelerator itself (not of one batch's data): re-running cannot isolate it."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if type(exc).__module__.startswith("torch.cuda"):
        return True
    return "CUDA error" in str(exc) or "CUDA-capable device" in str(exc)


def _check_timeout(timeout: object) -> None:
    if timeout is None:
        return
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InputValidationError(f"`timeout` must be a positive finite number of seconds or None, got {timeout!r}")


def _check_adapter_id(adapter: object, name: str) -> None:
    if not isinstance(adapter, str) or not adapter:
        raise InputValidationError(f"`{name}` must be a non-empty string, got {adapter!r}")


def _check_input_names(inputs: object) -> None:
    if isinstance(inputs, Mapping):
        for name in inputs:
            if not isinstance(name, str):
                raise InputValidationError(f"input names must be strings, got {name!r}")


@contextlib.contextmanager
def _closed_as_runtime_closed() -> Any:
    """The store closes with the runtime: callers see the runtime's documented error."""
    try:
        yield
    except StoreClosedError as exc:
        raise RuntimeClosedError(f"the runtime is closed: {exc}") from exc


async def _cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)


def _max_positions(model: torch.nn.Module) -> int | None:
    """Positions the model's position embeddings hold (Hugging Face config fields), if known."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _token_mask(lengths: list[int], width: int) -> torch.Tensor:
    """``[rows, width]`` bool on the CPU: True where a row (of length ``lengths[row]``) has a real token."""
    return torch.arange(width) < torch.tensor(lengths)[:, None]


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _default_pad_values(model: torch.nn.Module) -> dict[str, int]:
    """``input_ids`` (and ``decoder_input_ids``) padded with ``config.pad_token_id`` when the model has one."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
        return {"input_ids": pad, "decoder_input_ids": pad}
    return {}


def _check_pad_id(model: torch.nn.Module) -> None:
    """Refuse a model that needs ``config.pad_token_id`` to batch rows but has none.

    Decoder classifiers (``LlamaForSequenceClassification``, ``GPT2ForSequenceClassification``, ...)
    read each row at its last token that is not the pad id, and refuse batches of more than one row
    without one; their ``forward`` reads ``config.pad_token_id``, which is how they are recognised.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "pad_token_id", 0) is not None:
        return
    try:
        source = inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return
    if "pad_token_id" in source:
        raise ConfigError(
            f"{type(model).__name__} needs `config.pad_token_id` to batch rows of different lengths (it reads "
            "each row at its last token that is not the pad id), and its config has none: set "
            "`model.config.pad_token_id` before wrapping, e.g. to the tokenizer's pad id, or to its eos id "
            "as is usual for Llama-style models"
        )


def _vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding table (Hugging Face's ``get_input_embeddings``), if it has one."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else None


def _check_rows(selected: torch.Tensor, batch: _Batch) -> None:
    if selected.dim() == 0 or selected.shape[0] != len(batch.requests):
        raise TypeError(
            f"the selected output has shape {tuple(selected.shape)}; its first dimension must be the "
            f"batch's {len(batch.requests)} rows"
        )


def _crash_error(exc: BaseException) -> WorkerCrashedError:
    error = WorkerCrashedError(f"the runtime's worker failed: {exc!r}")
    error.__cause__ = exc
    return error


# Token-level integer inputs: [L] per request (a tokenizer's [1, L] squeezed), normalised to int64.
_TOKEN_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask"}
)
_InputSpec = tuple[torch.dtype, tuple[int, ...], bool, int]  # see Runtime._layouts
_MAX_LAYOUTS = 64  # distinct input layouts remembered for the fast path; more still work, slower


def _accepted_inputs(model: torch.nn.Module) -> frozenset[str] | None:
    """Names the model's forward takes as keywords, or None when it takes any (or is opaque).

    ``**kwargs`` accepts any name, unless it is typed ``Unpack[SomeTypedDict]`` (as Hugging Face
    models type theirs): then it takes that dict's keys.
    """
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in kinds}
    for param in params:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            annotation = param.annotation
            if typing.get_origin(annotation) is not typing.Unpack:
                return None
            (typed,) = typing.get_args(annotation)
            required = getattr(typed, "__required_keys__", None)
            optional = getattr(typed, "__optional_keys__", None)
            if not isinstance(required, frozenset) or not isinstance(optional, frozenset):
                return None  # not a TypedDict: take any name
            names |= required | optional
    return frozenset(names)


def _is_decoder_input(name: str) -> bool:
    """An encoder-decoder's decoder input (``decoder_input_ids``, ``decoder_attention_mask``, ...): own length."""
    return name.startswith("decoder_")


def _input_group(tensors: Mapping[str, torch.Tensor]) -> object:
    """Requests with equal groups batch together: the same input names, dtypes and per-token shapes.

    ``attention_mask`` is left out: a request without one gets an all-ones mask in a batch with
    requests that have one (see _collate), which is what the model does for it alone. Any other
    input present on some requests and absent on others keeps them in separate batches: padding
    cannot stand in for an input the model would otherwise default.
    """
    return tuple(
        sorted((n, str(t.dtype), tuple(t.shape[1:])) for n, t in tensors.items() if n != "attention_mask")
    )
