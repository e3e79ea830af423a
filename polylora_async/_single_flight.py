"""Single flight: at most one call in flight per key, and every waiter shares its outcome.

The catalog resolves ids through it, and the store runs its CPU and GPU loads through it. A call's
outcome lives in a future that only the call (or a shutdown) completes, so a waiter that is
cancelled never cancels the shared work, and a shutdown fails the waiters with a clear error
instead of a ``CancelledError`` they did not ask for. A failure fails only that call's waiters
and is forgotten: the next need starts a new call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Hashable, Iterator
from typing import Any, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
C = TypeVar("C", bound="SharedCall")

Spawn = Callable[[Coroutine[Any, Any, None], str], "asyncio.Task[Any]"]
"""``spawn(coro, name) -> task``: how a call's task is started (default: ``loop.create_task``)."""


class SharedCall:
    """One in-flight operation that any number of waiters share; subclass it to carry job state."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.future: asyncio.Future[Any] = loop.create_future()
        # Mark the outcome as retrieved even if nobody waits (a prefetch), so asyncio does not log it.
        self.future.add_done_callback(_retrieve)
        self.task: asyncio.Task[Any] | None = None

    async def wait(self) -> Any:
        return await asyncio.shield(self.future)

    def succeed(self, value: Any) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def fail(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)

    @property
    def done(self) -> bool:
        return self.future.done()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class SingleFlight(Generic[K, C]):
    """The calls in flight, by key: :meth:`join` starts one or joins the one running.

    Args:
        new_call: makes the :class:`SharedCall` (or subclass) of a new call.
        cancelled: the error waiters get when the call's task is cancelled (a shutdown).
        spawn: starts a call's task (default: the running loop's ``create_task``).
        on_error: told of each failure once, before the waiters are (not of cancellations).
        on_done: told after every call ends, however it ended.
    """

    def __init__(
        self,
        new_call: Callable[[asyncio.AbstractEventLoop], C],
        *,
        cancelled: Callable[[K], BaseException],
        spawn: Spawn | None = None,
        on_error: Callable[[K, Exception], None] | None = None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        self._new_call = new_call
        self._cancelled = cancelled
        self._spawn = spawn
        self._on_error = on_error
        self._on_done = on_done
        self._calls: dict[K, C] = {}

    def get(self, key: K) -> C | None:
        return self._calls.get(key)

    def __contains__(self, key: object) -> bool:
        return key in self._calls

    def __len__(self) -> int:
        return len(self._calls)

    def __iter__(self) -> Iterator[K]:
        return iter(self._calls)

    def calls(self) -> list[C]:
        return list(self._calls.values())

    def join(self, key: K, work: Callable[[C], Awaitable[Any]], name: str) -> C:
        """The call in flight for ``key``, or a new one running ``work(call)``."""
        call = self._calls.get(key)
        return call if call is not None else self.start(key, work, name)

    def start(self, key: K, work: Callable[[C], Awaitable[Any]], name: str) -> C:
        """Start a call for ``key`` (none may be in flight); its task runs ``work(call)``, whose result it shares."""
        loop = asyncio.get_running_loop()
        call = self._new_call(loop)
        self._calls[key] = call
        coro = self._run(key, call, work)
        call.task = self._spawn(coro, name) if self._spawn is not None else loop.create_task(coro, name=name)
        return call

    async def _run(self, key: K, call: C, work: Callable[[C], Awaitable[Any]]) -> None:
        try:
            call.succeed(await work(call))
        except asyncio.CancelledError:
            call.fail(self._cancelled(key))
            raise
        except Exception as exc:
            if self._on_error is not None:
                self._on_error(key, exc)
            call.fail(exc)
        finally:
            if self._calls.get(key) is call:
                del self._calls[key]
            if self._on_done is not None:
                self._on_done()

    def close(self, error: BaseException | None = None) -> list[asyncio.Task[Any]]:
        """Fail every waiter (with ``error``, else each key's cancelled error) and cancel the calls.

        Returns:
            The cancelled tasks, to await.
        """
        tasks = []
        for key, call in list(self._calls.items()):
            call.fail(error if error is not None else self._cancelled(key))
            if call.task is not None:
                call.task.cancel()
                tasks.append(call.task)
        self._calls.clear()
        return tasks
