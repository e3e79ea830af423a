"""``Runtime.stream``: submit items from a source and yield their results as they complete.

Reading from the source follows the queue's room (a semaphore of ``max_queue``), so an endless
generator is read only as far as results are consumed; a failing source ends the stream with its
error after what was taken has been yielded; closing the consumer cancels what it started.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._errors import InputValidationError
from ._types import StreamResult


@dataclass(frozen=True)
class _SourceEnd:
    """The stream's source is exhausted (``error`` None) or failed."""

    error: BaseException | None


def _stream_item(item: object, index: int) -> tuple[Any, Mapping[str, torch.Tensor], str]:
    if not isinstance(item, tuple) or len(item) != 3:
        raise InputValidationError(f"stream item {index} must be a (key, inputs, adapter) tuple, got {item!r}")
    return item


async def stream_results(
    submit: Callable[[Mapping[str, torch.Tensor], str], Awaitable[Any]],
    requests: Iterable[tuple[Any, Mapping[str, torch.Tensor], str]] | AsyncIterator[Any],
    max_queue: int,
) -> AsyncIterator[StreamResult]:
    """:meth:`Runtime.stream`: at most ``max_queue`` items taken from ``requests`` and not yet yielded."""
    if not isinstance(requests, (Iterable, AsyncIterator)):
        raise InputValidationError(f"`requests` must be an iterable or async iterator, got {requests!r}")
    done: asyncio.Queue[StreamResult | _SourceEnd] = asyncio.Queue()
    room = asyncio.Semaphore(max_queue)
    started = 0

    async def run_one(key: Any, inputs: Mapping[str, torch.Tensor], adapter: str) -> None:
        try:
            result = StreamResult(key, value=await submit(inputs, adapter))
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
        await cancel_all([feeder, *tasks])


async def cancel_all(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel ``tasks`` and wait until each has ended."""
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.gather(*tasks, return_exceptions=True)
