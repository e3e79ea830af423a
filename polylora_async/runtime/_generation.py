"""The event-loop side of generation: admission, one step at a time in the worker, tokens to their streams.

A :class:`GenerationLoop` keeps the waiting generations (FIFO) and the running ones. Each
iteration admits what fits, runs ONE step in the runtime's worker thread (drop what was given up,
decode one token for every running sequence, prefill the admitted prompts; see
:class:`._decode.RunningBatch`), and hands each new token to its stream at once.

Admission (between steps, oldest first): the sequence's adapter must have a GPU slot (a watcher
loads it meanwhile; a sequence passed over ``starvation_limit`` times holds the others back until
its adapter is in), the running rows stay within ``max_sequences``, the prompts of one step within
``max_batch_tokens``, and the KV memory the batch could reach before any sequence ends within
``kv_cache_bytes``: every running sequence is reserved its whole remaining length, so a sequence
once admitted always finishes and nothing is ever preempted. A running sequence holds a lease on
its adapter's slot until it ends.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .._config import BASE_ADAPTER
from .._errors import BatchFailedError, InputValidationError, RequestTimeoutError, RuntimeClosedError
from .._metrics import RuntimeMetrics
from .._model import MultiLoraModel
from ._admission import max_positions as _positions
from ._decode import GenSequence, RunningBatch, SamplingParams

_END = None  # put in a stream's queue after its last token


@dataclass(eq=False)
class Generation:
    """One generation as the event loop sees it."""

    seq: GenSequence
    ref: Any  # AdapterRef, or None for the base model
    queue: asyncio.Queue[int | BaseException | None]
    submitted: float
    deadline: float | None = None  # loop.time()
    state: Literal["waiting", "running", "done"] = "waiting"
    lease: Any = None
    passed_over: int = 0
    last_token_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    watcher: asyncio.Task[None] | None = field(default=None, repr=False)
    loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.get_running_loop, repr=False)


class GenerationLoop:
    """Admits generations, steps the running batch in the worker thread, streams the tokens."""

    def __init__(
        self,
        model: MultiLoraModel,
        store: Any,
        metrics: RuntimeMetrics,
        run_in_worker: Callable[..., Awaitable[Any]],
        on_device_error: Callable[[BaseException], None],
        is_device_error: Callable[[BaseException], bool],
        *,
        pad_token_id: int,
        max_sequences: int,
        max_batch_tokens: int,
        kv_cache_bytes: int | None,
        starvation_limit: int,
    ) -> None:
        self.model = model
        self.store = store
        self.metrics = metrics
        self._run_in_worker = run_in_worker
        self._on_device_error = on_device_error
        self._is_device_error = is_device_error
        self._pad_token_id = pad_token_id
        self.max_sequences = max_sequences
        self.max_batch_tokens = max_batch_tokens
        self.kv_cache_bytes = kv_cache_bytes
        self.starvation_limit = starvation_limit
        self.batch = RunningBatch(model, pad_token_id)
        self.waiting: list[Generation] = []
        self.running: list[Generation] = []
        self._drop: list[Generation] = []
        self._wake = asyncio.Event()
        self.drained = asyncio.Event()  # set while no generation waits, runs or holds a row
        self.drained.set()
        self.steps = 0
        self.tokens = 0
        params = inspect.signature(model.model.forward).parameters
        # Generation needs a causal LM: a KV cache (transformers renamed the argument in 5.2x) and a
        # language-model head that gives logits over the vocabulary.
        head = getattr(model.model, "get_output_embeddings", None)
        self.supported = ("cache" in params or "past_key_values" in params) and callable(head) and head() is not None
        self._max_positions = _positions(model.model)

    # -- from the runtime ---------------------------------------------------------------------------

    def prompt(self, tensors: dict[str, torch.Tensor], params: SamplingParams) -> torch.Tensor:
        """The prompt's ids from inputs :class:`Admission` normalised; what generation cannot take is refused."""
        if not self.supported:
            raise InputValidationError(
                f"{type(self.model.model).__name__} takes no KV cache or has no language-model head: generation "
                "needs a causal language model (a transformers *ForCausalLM or *LMHeadModel)"
            )
        extra = set(tensors) - {"input_ids", "attention_mask"}
        if "input_ids" not in tensors or extra:
            raise InputValidationError(
                f"a prompt is 'input_ids' (and an all-ones 'attention_mask'), not {sorted(tensors)}"
            )
        mask = tensors.get("attention_mask")
        if mask is not None and not bool(mask.all()):
            raise InputValidationError("a prompt's 'attention_mask' must be all ones: pass the prompt without padding")
        ids = tensors["input_ids"]
        if self._max_positions is not None and len(ids) + params.max_new_tokens > self._max_positions:
            raise InputValidationError(
                f"a prompt of {len(ids)} tokens plus `max_new_tokens`={params.max_new_tokens} would pass the "
                f"model's {self._max_positions} positions"
            )
        return ids.cpu()

    async def begin(
        self, prompt: torch.Tensor, adapter: str, params: SamplingParams, timeout: float | None, resolve: Any
    ) -> Generation:
        """Resolve the adapter (``resolve``: the store's resolution, counted against ``timeout``) and queue."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        ref = None
        if adapter != BASE_ADAPTER:
            try:
                async with asyncio.timeout_at(deadline):
                    ref = await resolve(adapter)
            except TimeoutError:
                raise RequestTimeoutError(f"adapter {adapter!r} was not resolved within {timeout} s") from None
        gen = Generation(GenSequence(prompt, 0, params), ref, asyncio.Queue(), time.perf_counter())
        if deadline is not None:
            assert timeout is not None
            gen.timer = loop.call_at(deadline, self.expire, gen, timeout)
        self.submit(gen)
        return gen

    def submit(self, gen: Generation) -> None:
        self.drained.clear()
        self.waiting.append(gen)
        if gen.ref is not None and not self.store.is_gpu_ready(gen.ref):
            self._watch(gen)
        self._report()
        self._wake.set()

    def cancel(self, gen: Generation, error: BaseException | None = None) -> None:
        """The stream was closed, timed out or cancelled: free what the generation holds at once."""
        if gen.state == "done":
            return
        if gen.state == "waiting":
            self.waiting.remove(gen)
            self._end(gen, error)
        else:  # its row leaves the batch at the next step, which frees its KV memory
            self.running.remove(gen)
            self._drop.append(gen)
            self._end(gen, error, release=False)
        self._report()
        self._wake.set()

    def fail_all(self, make_error: Callable[[], BaseException]) -> None:
        for gen in [*self.waiting, *self.running]:
            self.cancel(gen, make_error())

    @property
    def idle(self) -> bool:
        return not (self.waiting or self.running or self._drop)

    async def run(self) -> None:
        """The loop; ends when cancelled (the runtime's shutdown) or at a device error."""
        try:
            await self._run()
        except Exception as exc:  # a fault of the loop itself must not leave a stream waiting
            self._on_device_error(exc)
            raise

    async def _run(self) -> None:
        while True:
            if not self.running and not self._drop and not self._admissible():
                self._wake.clear()
                await self._wake.wait()
                continue
            admit = self._admit()
            drop, self._drop = self._drop, []
            if not admit and not drop and not self.running:
                continue
            try:
                result = await self._run_in_worker(self._step, admit, drop)
            except Exception as exc:  # the model failed the step: every sequence in it fails
                if self._is_device_error(exc):
                    self._on_device_error(exc)
                    return
                self._fail_step(admit, exc)
                continue
            self.steps += 1
            self._deliver(admit, drop, result)

    # -- admission ----------------------------------------------------------------------------------

    def _admissible(self) -> bool:
        return any(g.ref is None or self.store.is_gpu_ready(g.ref) for g in self.waiting)

    def _admit(self) -> list[Generation]:
        chosen: list[Generation] = []
        skipped: list[Generation] = []
        prompt_tokens = 0
        for gen in list(self.waiting):
            if len(self.running) + len(chosen) >= self.max_sequences:
                break
            if gen.ref is not None and not self.store.is_gpu_ready(gen.ref):
                self._watch(gen)
                if gen.passed_over >= self.starvation_limit:
                    break  # it waits for its adapter rather than be passed over again
                skipped.append(gen)
                continue
            length = len(gen.seq.prompt)
            if chosen and prompt_tokens + length > self.max_batch_tokens:
                break
            if not self._kv_fits([*self.running, *chosen, gen]):
                if not self.running and not chosen:  # alone it can never fit
                    self.waiting.remove(gen)
                    self._end(gen, InputValidationError(
                        f"a prompt of {length} tokens plus {gen.seq.params.max_new_tokens} new ones needs more "
                        f"KV memory than `kv_cache_bytes`={self.kv_cache_bytes}"
                    ))  # fmt: skip
                    continue
                break
            gen.lease = self.store.lease([gen.ref]) if gen.ref is not None else None
            gen.seq.slot = 0 if gen.lease is None else gen.lease.slot_of(gen.ref)
            self.waiting.remove(gen)
            chosen.append(gen)
            prompt_tokens += length
        for gen in skipped:
            if chosen and gen.submitted < chosen[-1].submitted:
                gen.passed_over += 1
        for gen in chosen:  # running from here on: a cancel now drops its row after the prefill
            gen.state = "running"
            self.running.append(gen)
        if chosen:
            self._report()
        return chosen

    def _kv_fits(self, gens: list[Generation]) -> bool:
        if self.kv_cache_bytes is None or not self.batch.bytes_per_token:
            return True
        # The widest the batch can get before any of these ends: today's width (or the longest new
        # prompt) plus the most tokens any of them may still add.
        width = max([self.batch.width] + [len(g.seq.prompt) for g in gens if g.state == "waiting"])
        remaining = max(g.seq.params.max_new_tokens - g.seq.generated for g in gens)
        return len(gens) * (width + remaining) * self.batch.bytes_per_token <= self.kv_cache_bytes

    def _watch(self, gen: Generation) -> None:
        """Load a waiting generation's adapter; wake the loop when it is in (or fail the generation)."""
        if gen.watcher is not None:
            return

        async def watch() -> None:
            try:
                await self.store.ensure_gpu(gen.ref, count=False)
            except Exception as exc:
                if gen.state == "waiting":
                    self.cancel(gen, exc)
                return
            self._wake.set()

        gen.watcher = asyncio.get_running_loop().create_task(watch(), name="polylora-generation-load")

    # -- one step -------------------------------------------------------------------------------------

    def _step(self, admit: list[Generation], drop: list[Generation]) -> Any:
        """In the worker thread."""
        for gen in admit:
            if gen.lease is not None:
                gen.lease.wait_copies()
        return self.batch.step([g.seq for g in admit], [g.seq for g in drop])

    def _deliver(self, admit: list[Generation], drop: list[Generation], result: Any) -> None:
        for gen in drop:  # their rows are gone from the batch
            self._release(gen)
        owners = {id(g.seq): g for g in [*self.running, *self._drop]}
        now = time.perf_counter()
        for seq, token in result.tokens:
            gen = owners[id(seq)]
            if gen.state == "done":
                continue
            if gen.last_token_at is None:
                self.metrics.first_token(now - gen.submitted)
            else:
                self.metrics.next_token(now - gen.last_token_at)
            gen.last_token_at = now
            self.tokens += 1
            gen.queue.put_nowait(token)
        for seq in result.finished:
            gen = owners[id(seq)]
            if gen in self._drop:  # cancelled during this step: its row already left
                self._drop.remove(gen)
            if gen.state != "done":
                self._end(gen, None)
            self._release(gen)
        self._report()

    def _fail_step(self, admit: list[Generation], exc: BaseException) -> None:
        # The running batch's cache may be half-updated: every sequence in it fails and it starts over.
        for gen in [*self.running, *self._drop]:
            error = BatchFailedError(f"a generation step of {len(self.batch.rows)} sequences failed: {exc!r}")
            error.__cause__ = exc
            if gen.state != "done":
                self._end(gen, error)
            self._release(gen)
        self.batch = RunningBatch(self.model, self._pad_token_id)
        self._drop.clear()
        self._report()

    # -- endings --------------------------------------------------------------------------------------

    def _end(self, gen: Generation, error: BaseException | None, *, release: bool = True) -> None:
        """The stream ends now (with ``error``, if any); slots are released unless the row is still in."""
        if gen.state == "done":
            return
        was_running = gen.state == "running"
        gen.state = "done"
        if gen.timer is not None:
            gen.timer.cancel()
        if gen.watcher is not None and not gen.watcher.done():
            gen.watcher.cancel()
        gen.queue.put_nowait(error if error is not None else _END)
        if release or not was_running:
            self._release(gen)
        self._report()

    def _release(self, gen: Generation) -> None:
        if gen in self.running:
            self.running.remove(gen)
        if gen.lease is not None:
            gen.lease.release()
            gen.lease = None
        if gen.ref is not None:
            self.store.release_ref(gen.ref)
            gen.ref = None

    def expire(self, gen: Generation, timeout: float) -> None:
        self.cancel(gen, RequestTimeoutError(f"the generation did not finish within {timeout} s"))

    def close(self) -> None:
        """After the loop task and the worker have stopped: end every stream, release every slot."""
        self.fail_all(lambda: RuntimeClosedError("the runtime closed before the generation finished"))
        for gen in self._drop:
            self._release(gen)
        self._drop.clear()
        self.batch = RunningBatch(self.model, self._pad_token_id)
        self._report()
        self.drained.set()

    def _report(self) -> None:
        """After every change of the sets: the gauges, and whether the loop is drained."""
        self.metrics.set_sequences(len(self.running), len(self.waiting), self.batch.kv_bytes)
        if self.idle:
            self.drained.set()


class TokenStream:
    """The tokens of one generation, as an async iterator of ``int`` (see :meth:`Runtime.generate`).

    The generation starts on the first ``__anext__``. Breaking out of the loop and dropping the
    stream, ``aclose()``, a timeout or cancelling the consumer ends it and frees its KV memory at
    the next step.
    """

    def __init__(self, start: Callable[[], Awaitable[Generation]], loop: GenerationLoop) -> None:
        self._start: Callable[[], Awaitable[Generation]] | None = start
        self._loop = loop
        self._gen: Generation | None = None
        self._done = False

    def __aiter__(self) -> TokenStream:
        return self

    async def __anext__(self) -> int:
        if self._done:
            raise StopAsyncIteration
        if self._gen is None:
            assert self._start is not None
            start, self._start = self._start, None
            try:
                self._gen = await start()
            except BaseException:
                self._done = True
                raise
        try:
            item = await self._gen.queue.get()
        except BaseException:  # the consumer was cancelled: the generation goes with it
            self._close()
            raise
        if isinstance(item, int):
            return item
        self._done = True
        if item is None:
            raise StopAsyncIteration
        raise item

    async def aclose(self) -> None:
        """End the generation now (no-op once it ended)."""
        self._close()

    def _close(self) -> None:
        self._done = True
        gen, self._gen = self._gen, None
        if gen is not None and gen.state != "done":
            self._loop.cancel(gen)

    def __del__(self) -> None:  # dropped without being exhausted or closed (e.g. `break` out of `async for`)
        gen = self._gen
        if gen is None or gen.state == "done":
            return
        try:
            owner = asyncio.get_running_loop()
        except RuntimeError:
            owner = None
        if owner is gen.loop:
            self._close()
        elif not gen.loop.is_closed():
            gen.loop.call_soon_threadsafe(self._loop.cancel, gen)
