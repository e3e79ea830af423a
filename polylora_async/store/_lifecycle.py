"""What the store's parts share about its life: open or closed, the event loop it runs on, its
background tasks, and the one signal that wakes whoever waits for a slot, a job or a demand change."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from .._errors import StoreClosedError


class Lifecycle:
    """Open/closed state, the bound loop, background tasks and the change signal of one store."""

    def __init__(self) -> None:
        self.closed = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.tasks: set[asyncio.Task[Any]] = set()
        self._changed = asyncio.Event()

    def check_open(self) -> None:
        if self.closed:
            raise StoreClosedError("the adapter store is closed")

    def bind(self) -> bool:
        """Bind to the running loop the first time; True when this call bound it."""
        if self.loop is not None:
            return False
        self.loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        return True

    @property
    def loop_running(self) -> bool:
        return self.loop is not None and self.loop.is_running()

    def call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the store's loop: now if called there (or before/after it runs), else soon."""
        loop = self.loop
        if loop is None or threading.get_ident() == self._loop_thread or loop.is_closed():
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A background task that :meth:`drain` waits for and the store's close cancels."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    @property
    def changed(self) -> asyncio.Event:
        """The event the next :meth:`notify` sets: take it before checking, then wait on it."""
        return self._changed

    def notify(self) -> None:
        """Wake everything waiting for a slot, a job or a demand change."""
        self._changed.set()
        self._changed = asyncio.Event()

    async def drain(self) -> None:
        """Wait until no background task is running (including those started meanwhile)."""
        while True:
            pending = [task for task in self.tasks if not task.done()]
            if not pending:
                return
            await asyncio.wait(pending)
