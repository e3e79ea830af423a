"""The runtime's facade: :class:`Runtime`, what callers hold.

Owns the lifecycle (start, drain or cancel, close), ``submit`` / ``submit_nowait`` / ``stream``
with their timeouts and backpressure, adapter management (delegated to the store), request
bookkeeping when a future resolves, and the statistics snapshot. Inputs are checked by
:class:`Admission`, queued and batched by the :class:`Dispatcher`, run by the :class:`Worker`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from typing import Any, Literal

import torch

from .._catalog import Resolver
from .._config import BASE_ADAPTER
from .._errors import (
    ConfigError,
    InputValidationError,
    OverloadedError,
    RequestTimeoutError,
    RuntimeClosedError,
    StoreClosedError,
    WorkerCrashedError,
)
from .._metrics import RuntimeMetrics
from .._model import MultiLoraModel
from ..store import AdapterStore, StoreConfig
from ._admission import Admission, check_adapter_id, check_input_names, check_timeout
from ._decode import SamplingParams
from ._dispatch import Dispatcher
from ._generation import GenerationLoop, TokenStream
from ._stream import cancel_all, stream_results
from ._types import (
    OutputSelector,
    Request,
    RuntimeConfig,
    RuntimeStatistics,
    StreamResult,
    default_select_output,
)
from ._worker import Worker, crash_error, is_device_error

__all__ = ["Runtime", "RuntimeConfig", "RuntimeStatistics", "StreamResult", "default_select_output"]


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
            registered (the next request asks again). Resolved directories are copied into the
            disk cache when one is configured, so a catalog far larger than memory can be fetched
            on demand.

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
        self._admission = Admission(model.model, self.config.max_batch_tokens, self.config.per_token_inputs)
        # Padding never takes a batch past the positions the model can use (rows fit: Admission).
        self._worker = Worker(
            model, self.config, select_output or default_select_output, self.metrics,
            max_width=self._admission.max_positions,
        )  # fmt: skip
        self._dispatcher = Dispatcher(
            model,
            self.config,
            self.store,
            self.metrics,
            self._worker,
            running=self._running,
            on_crash=self._crashed,
        )
        pad = getattr(getattr(model.model, "config", None), "pad_token_id", None)
        self._generation = GenerationLoop(
            model, self.store, self.metrics, self._worker.run, self._crashed, is_device_error,
            pad_token_id=pad if isinstance(pad, int) and pad >= 0 else 0,
            max_sequences=self.config.max_sequences, max_batch_tokens=self.config.max_batch_tokens,
            kv_cache_bytes=self.config.kv_cache_bytes, starvation_limit=self.config.starvation_limit,
        )  # fmt: skip
        self._room = _Room(self._has_room)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # every other task the runtime starts
        self._state: Literal["new", "running", "closing", "closed", "crashed"] = "new"
        self._crash: BaseException | None = None
        self._stats = dict.fromkeys(("completed", "failed", "cancelled", "timed_out", "rejected"), 0)

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
        self._worker.start(self._loop)
        self._state = "running"
        self._dispatcher.start(self._loop)
        self._spawn(self._generation.run(), "polylora-generation")

    async def aclose(self, *, shutdown: Literal["drain", "cancel"] | None = None) -> None:
        """Stop taking requests, then drain or cancel the queue; every pending request resolves.

        Args:
            shutdown: overrides :attr:`RuntimeConfig.shutdown` for this call.
        """
        if self._state in ("new", "closed"):
            self._state = "closed"
            await cancel_all(list(self._tasks))
            await self.store.aclose()
            return
        mode = shutdown or self.config.shutdown
        if self._state == "running":
            self._state = "closing"
        if mode == "cancel":
            self._dispatcher.fail_pending(lambda: RuntimeClosedError("the runtime closed before this request ran"))
            self._generation.close()
        self._dispatcher.wake()
        await self._dispatcher.drain()
        if self._state != "crashed":
            await self._generation.drained.wait()
        await cancel_all([*self._dispatcher.watch_tasks(), *self._tasks])
        self._dispatcher.fail_pending(lambda: RuntimeClosedError("the runtime closed before this request ran"))
        if self._state != "crashed":
            self._state = "closed"
        self._worker.close()
        self._generation.close()
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
        check_adapter_id(adapter_id, "adapter_id")
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
        check_adapter_id(adapter_id, "adapter_id")
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
            check_adapter_id(adapter_id, "adapter_ids")
        self._spawn(_prefetch(self.store, ids), "polylora-prefetch")

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
        check_timeout(timeout)
        deadline = None if timeout is None else loop.time() + timeout
        self._check_open()
        check_adapter_id(adapter, "adapter")
        check_input_names(inputs)
        self._admission.check_dtypes_fit(inputs)
        tensors, length, decoder_length, group = self._admission.validate(inputs)
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
        if len(self._dispatcher.pending) >= self.config.max_queue or self._state != "running":
            try:
                await self._room.wait(deadline, self._timed_out_waiting)
                self._check_open()
            except BaseException:
                if ref is not None:
                    self.store.release_ref(ref)
                raise
        request = self._dispatcher.push(tensors, length, ref, group, decoder_length)
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
        check_adapter_id(adapter, "adapter")
        if len(self._dispatcher.pending) >= self.config.max_queue:
            self._stats["rejected"] += 1
            self.metrics.request_done("rejected", 0.0)
            raise OverloadedError(f"the queue is full ({self.config.max_queue} requests); retry later")
        check_input_names(inputs)
        self._admission.check_dtypes_fit(inputs)
        tensors, length, decoder_length, group = self._admission.validate(inputs)
        with _closed_as_runtime_closed():
            ref = None if adapter == BASE_ADAPTER else self.store.resolve_nowait(adapter)
        request = self._dispatcher.push(tensors, length, ref, group, decoder_length)
        # Nobody of ours awaits this future: its bookkeeping runs when it resolves.
        request.future.add_done_callback(functools.partial(self._on_done, request))
        return request.future

    def stream(
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
        return stream_results(self.submit, requests, self.config.max_queue)

    def generate(
        self,
        inputs: Mapping[str, torch.Tensor],
        adapter: str = BASE_ADAPTER,
        *,
        generation_config: Any = None,
        timeout: float | None = None,
        **sampling: Any,
    ) -> TokenStream:
        """Generate tokens after a prompt with ``adapter``; ``async for token in ...`` yields each id (``int``).

        Every step of generation runs the running sequences, whatever their adapters, as one batch
        (one token each) and admits waiting prompts; the stream ends at an eos token or after
        ``max_new_tokens``. Breaking out, ``aclose()``, the timeout or cancelling the consumer ends
        the sequence and frees its KV memory. Admission and the KV bound: :class:`RuntimeConfig`.

        Args:
            inputs: the prompt: ``{"input_ids": [P] or [1, P]}`` (an all-ones ``attention_mask`` may
                come with it); checked like :meth:`submit`'s inputs, at this call.
            adapter: an adapter id, or :data:`BASE_ADAPTER`.
            generation_config: a ``transformers.GenerationConfig`` whose ``max_new_tokens``,
                ``do_sample``, ``temperature``, ``top_k``, ``top_p`` and ``eos_token_id`` apply
                unless given here.
            timeout: seconds for the whole generation (:class:`RequestTimeoutError`).
            **sampling: ``max_new_tokens`` (required here or in the config), ``do_sample``,
                ``temperature``, ``top_k``, ``top_p``, ``eos_token_id`` (one id or a list),
                ``seed`` (the sequence's own generator: the same tokens whatever its batch).

        Raises:
            InputValidationError: at this call, for a bad prompt, argument or sampling value, a
                prompt that with ``max_new_tokens`` would pass the model's positions, or a model
                that takes no KV cache. From the iterator: the errors of :meth:`submit`'s
                resolution (:class:`AdapterNotFoundError`, :class:`AdapterLoadError`),
                :class:`RequestTimeoutError`, :class:`BatchFailedError` (a step failed: every
                sequence in it fails), :class:`RuntimeClosedError`, :class:`WorkerCrashedError`.
        """
        self._check_open()
        check_adapter_id(adapter, "adapter")
        check_timeout(timeout)
        check_input_names(inputs)
        params = SamplingParams.build(generation_config, **sampling)
        tensors, *_ = self._admission.validate(inputs)
        prompt = self._generation.prompt(tensors, params)
        begin = functools.partial(self._generation.begin, prompt, adapter, params, timeout, self._resolve)
        return TokenStream(begin, self._generation)

    async def _resolve(self, adapter: str) -> Any:
        self._check_open()
        with _closed_as_runtime_closed():
            return self.store.resolve_registered(adapter) or await self.store.resolve(adapter)

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
        check_adapter_id(adapter_id, "adapter_id")
        if not isinstance(pin, bool):
            raise InputValidationError(f"`pin` must be a bool, got {pin!r}")
        with _closed_as_runtime_closed():
            await self.store.preload([adapter_id], pin=pin)

    def statistics(self) -> RuntimeStatistics:
        """A frozen snapshot of counters (requests, batches, mixing, padding, tiers)."""
        return RuntimeStatistics(
            **self._stats,
            **self._dispatcher.stats,
            isolated_failures=self._worker.isolated_failures,
            queued=len(self._dispatcher.pending),
            split_batches=self.model.split_batches,
            store=self.store.statistics(),
            generated_tokens=self._generation.tokens,
            generation_steps=self._generation.steps,
            generations_running=len(self._generation.running),
            generations_waiting=len(self._generation.waiting),
        )

    # -- request plumbing -----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._state == "crashed":
            raise WorkerCrashedError("the runtime's worker failed; no more requests are accepted") from self._crash
        if self._state == "new":
            raise RuntimeClosedError("the runtime is not started: call `await start()` or use `async with`")
        if self._state != "running":
            raise RuntimeClosedError(f"the runtime is {self._state}; no more requests are accepted")

    def _running(self) -> bool:
        return self._state == "running"

    def _check_not_closed(self) -> None:
        """For adapter management, which also works before ``start()``."""
        if self._state in ("closing", "closed"):
            raise RuntimeClosedError(f"the runtime is {self._state}")

    def _has_room(self) -> bool:
        return len(self._dispatcher.pending) < self.config.max_queue or self._state != "running"

    def _timed_out_waiting(self, waited: float) -> None:
        self._stats["timed_out"] += 1
        self.metrics.request_done("timeout", waited)

    def _expire(self, request: Request, timeout: float) -> None:
        if not request.future.done():
            request.future.set_exception(RequestTimeoutError(f"no result within {timeout} s"))

    def _on_done(self, request: Request, _future: asyncio.Future[Any]) -> None:
        self._finished(request)

    def _finished(self, request: Request) -> None:
        """Bookkeeping when a request's future resolves, however it resolves."""
        self._dispatcher.unqueue(request)
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
        if self._room.waiters and self._loop is not None:
            self._spawn(self._room.notify(), "polylora-room")

    def _crashed(self, exc: BaseException) -> None:
        if self._state == "crashed":
            return
        self._state = "crashed"
        self._crash = exc
        self._dispatcher.fail_pending(lambda: crash_error(exc))
        self._generation.fail_all(lambda: crash_error(exc))
        self._dispatcher.wake()


@contextlib.contextmanager
def _closed_as_runtime_closed() -> Any:
    """The store closes with the runtime: callers see the runtime's documented error."""
    try:
        yield
    except StoreClosedError as exc:
        raise RuntimeClosedError(f"the runtime is closed: {exc}") from exc


class _Room:
    """Backpressure: ``submit`` waits here while the queue is full (``has_room`` false)."""

    def __init__(self, has_room: Callable[[], bool]) -> None:
        self._has_room = has_room
        self._condition: asyncio.Condition | None = None
        self.waiters = 0

    async def wait(self, deadline: float | None, on_timeout: Callable[[float], None]) -> None:
        """Until there is room, or RequestTimeoutError at ``deadline`` (``on_timeout`` gets the wait)."""
        if self._condition is None:
            self._condition = asyncio.Condition()
        self.waiters += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout_at(deadline), self._condition:
                await self._condition.wait_for(self._has_room)
        except TimeoutError:
            on_timeout(time.perf_counter() - started)
            raise RequestTimeoutError("no room in the queue before the request's timeout") from None
        finally:
            self.waiters -= 1

    async def notify(self) -> None:
        if self._condition is not None:
            async with self._condition:
                self._condition.notify_all()


async def _prefetch(store: AdapterStore, adapter_ids: list[str]) -> None:
    """:meth:`Runtime.prefetch`'s task: resolve what can be, hand it to the store's prefetcher."""
    refs = []
    try:
        for adapter_id in adapter_ids:
            with contextlib.suppress(Exception):
                refs.append(await store.resolve(adapter_id))
        with contextlib.suppress(StoreClosedError):  # closed meanwhile: nothing left to warm
            store.prefetch(refs)
    finally:
        for ref in refs:
            store.release_ref(ref)
