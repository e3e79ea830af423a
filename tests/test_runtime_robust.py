"""The runtime under hostile use: no crash when the queue changes under an await, streams that end,
bad requests that fail alone, and typed errors from every public method."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import polylora_async
from polylora_async import (
    BASE_ADAPTER,
    AdapterFormatError,
    BatchFailedError,
    InputValidationError,
    MultiLoraModel,
    PolyLoraError,
    RequestTimeoutError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    UnsupportedAdapterError,
    WorkerCrashedError,
    WrapConfig,
)
from tests._tiny import TARGETS, VOCAB, TinyModel, reference, write_adapter

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 model vs fp64 reference
pytestmark = pytest.mark.timeout(60)


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _runtime(tiny: TinyModel | None = None, **config: Any) -> tuple[Runtime, TinyModel]:
    tiny = tiny or TinyModel()
    model = MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=8, num_slots=4))
    return Runtime(model, RuntimeConfig(**config)), tiny


def _check(out: torch.Tensor, tiny: TinyModel, adapter: Path | None, ids: torch.Tensor) -> None:
    torch.testing.assert_close(out.double(), reference(tiny, adapter, ids), **TOL)


def _gate_wakeups(runtime: Runtime, when: Any) -> asyncio.Event:
    """An event set once the scheduler sleeps in a state ``when(runtime, timeout)`` accepts."""
    entered = asyncio.Event()
    original = runtime._dispatcher._wait_wakeup

    async def wait(timeout: float | None) -> None:
        if when(runtime, timeout):
            entered.set()
        if not runtime._dispatcher.pending:
            idle = getattr(runtime, "_test_idle", None)
            if idle is not None:
                idle.set()
        await original(timeout)

    runtime._dispatcher._wait_wakeup = wait  # type: ignore[method-assign]
    return entered


async def _scheduler_idle(runtime: Runtime) -> None:
    """Wake the scheduler and wait until it went round with the emptied queue (or crashed)."""
    idle = asyncio.Event()
    runtime._test_idle = idle  # type: ignore[attr-defined]
    runtime._dispatcher.wake()
    assert runtime._dispatcher._task is not None
    waiter = asyncio.ensure_future(idle.wait())
    await asyncio.wait([waiter, runtime._dispatcher._task], return_when=asyncio.FIRST_COMPLETED)
    waiter.cancel()
    assert runtime.state == "running"


async def _withdraw(task: asyncio.Task[Any], how: str) -> None:
    if how == "cancel":
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        with pytest.raises(RequestTimeoutError):
            await task


# -- the scheduler survives its queue changing under every await of batch formation -------------


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_request_withdrawn_during_inline_load(tmp_path: Path, how: str) -> None:
    path = write_adapter(tmp_path, "a", seed=1)
    runtime, tiny = _runtime(prefetch=False)
    gate, entered, left = asyncio.Event(), asyncio.Event(), asyncio.Event()
    original = runtime.store.ensure_gpu

    async def ensure_gpu(ref: Any, **kwargs: Any) -> Any:
        entered.set()
        await gate.wait()
        try:
            return await original(ref, **kwargs)
        finally:
            left.set()

    runtime.store.ensure_gpu = ensure_gpu  # type: ignore[method-assign]
    _gate_wakeups(runtime, lambda rt, timeout: False)  # only to see the scheduler go idle
    async with asyncio.timeout(30), runtime:
        runtime.register_adapter("a", path)
        timeout = 0.05 if how == "timeout" else None
        task = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 0)}, "a", timeout=timeout))
        await entered.wait()  # the scheduler now awaits the inline load
        await _withdraw(task, how)
        assert runtime.statistics().queued == 0
        gate.set()
        await left.wait()  # the scheduler ran on from the load with the queue empty
        await _scheduler_idle(runtime)
        out = await runtime.submit({"input_ids": _ids(5, 1)}, "a")
        assert runtime.state == "running"
    _check(out, tiny, path, _ids(5, 1))


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_request_withdrawn_while_its_batch_fills(how: str) -> None:
    runtime, tiny = _runtime(max_wait=30.0, max_batch_size=2)
    entered = _gate_wakeups(runtime, lambda rt, timeout: timeout is not None and rt._dispatcher.pending)
    async with asyncio.timeout(30), runtime:
        timeout = 0.05 if how == "timeout" else None
        task = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 0)}, timeout=timeout))
        await entered.wait()  # the scheduler waits for the batch to fill
        await _withdraw(task, how)
        await _scheduler_idle(runtime)
        outs = await asyncio.gather(*(runtime.submit({"input_ids": _ids(3, s)}) for s in (1, 2)))
        assert runtime.state == "running"
    for seed, out in zip((1, 2), outs, strict=True):
        _check(out, tiny, None, _ids(3, seed))


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_request_withdrawn_while_the_device_is_busy(how: str) -> None:
    runtime, tiny = _runtime(max_inflight_batches=1)
    async with asyncio.timeout(30), runtime:
        tiny.gate = threading.Event()
        first = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 9)}))
        await asyncio.to_thread(tiny.entered.wait, 30)
        entered = _gate_wakeups(
            runtime, lambda rt, timeout: rt._dispatcher.pending and len(rt._dispatcher.inflight) >= 1
        )
        timeout = 0.05 if how == "timeout" else None
        task = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 0)}, timeout=timeout))
        await entered.wait()  # the scheduler waits for the running batch
        await _withdraw(task, how)
        await _scheduler_idle(runtime)
        tiny.gate.set()
        _check(await first, tiny, None, _ids(4, 9))
        out = await runtime.submit({"input_ids": _ids(6, 2)})
        assert runtime.state == "running"
    _check(out, tiny, None, _ids(6, 2))


@pytest.mark.parametrize("how", ["cancel", "timeout"])
async def test_request_withdrawn_while_its_adapter_is_not_ready(tmp_path: Path, how: str) -> None:
    path = write_adapter(tmp_path, "a", seed=1)
    runtime, tiny = _runtime()
    ready = False
    original = runtime.store.is_gpu_ready
    runtime.store.is_gpu_ready = lambda ref: ready and original(ref)  # type: ignore[method-assign]
    entered = _gate_wakeups(runtime, lambda rt, timeout: timeout is None and rt._dispatcher.pending)
    async with asyncio.timeout(30), runtime:
        runtime.register_adapter("a", path)
        timeout = 0.05 if how == "timeout" else None
        task = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 0)}, "a", timeout=timeout))
        await entered.wait()  # no batch can form: the scheduler waits for the adapter
        await _withdraw(task, how)
        await _scheduler_idle(runtime)
        ready = True
        out = await runtime.submit({"input_ids": _ids(5, 3)}, "a")
        assert runtime.state == "running"
    _check(out, tiny, path, _ids(5, 3))


# -- stream() ---------------------------------------------------------------------------------------


async def test_stream_ends_with_the_error_of_a_raising_source() -> None:
    runtime, tiny = _runtime()

    def source() -> Iterator[tuple[int, dict[str, torch.Tensor], str]]:
        for i in range(3):
            yield i, {"input_ids": _ids(3, i)}, BASE_ADAPTER
        raise ValueError("source broke")

    seen: dict[int, torch.Tensor] = {}
    async with asyncio.timeout(30), runtime:
        with pytest.raises(ValueError, match="source broke"):
            async for item in runtime.stream(source()):
                assert item.error is None
                seen[item.key] = item.value
    assert sorted(seen) == [0, 1, 2]
    for i, out in seen.items():
        _check(out, tiny, None, _ids(3, i))


async def test_stream_ends_with_an_error_for_a_malformed_item() -> None:
    runtime, _ = _runtime()

    async def source() -> AsyncIterator[Any]:
        yield 0, {"input_ids": _ids(3, 0)}, BASE_ADAPTER
        yield "not a tuple"

    keys = []
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError, match="stream item 1"):
            async for item in runtime.stream(source()):
                keys.append(item.key)
    assert keys == [0]


async def test_stream_reads_the_source_only_as_far_as_the_queue_has_room() -> None:
    runtime, tiny = _runtime(max_queue=16)
    taken = 0

    def source() -> Iterator[tuple[int, dict[str, torch.Tensor], str]]:
        nonlocal taken
        for i in range(3000):
            taken += 1
            yield i, {"input_ids": _ids(2, i % 7)}, BASE_ADAPTER

    async with asyncio.timeout(30), runtime:
        tiny.gate = threading.Event()  # hold the device: nothing completes
        stream = runtime.stream(source())
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(tiny.entered.wait, 30)
        for _ in range(50):  # let the feeder run as far as it can
            await asyncio.sleep(0)
        assert taken <= 16, taken
        tiny.gate.set()
        item = await first
        assert item.error is None
        count = 1
        async for _ in stream:
            count += 1
            assert taken - count <= 16
    assert count == 3000


async def test_closing_the_consumer_cancels_what_the_stream_started() -> None:
    runtime, tiny = _runtime(max_inflight_batches=1, max_batch_size=1)

    def source() -> Iterator[tuple[int, dict[str, torch.Tensor], str]]:
        for i in range(10):
            yield i, {"input_ids": _ids(2, i)}, BASE_ADAPTER

    async with asyncio.timeout(30), runtime:
        tiny.gate = threading.Event()
        stream = runtime.stream(source())
        first = asyncio.ensure_future(anext(stream))
        await asyncio.to_thread(tiny.entered.wait, 30)
        assert runtime.statistics().submitted == 10
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        await stream.aclose()
        tiny.gate.set()
        stats = runtime.statistics()
        assert stats.queued == 0 and stats.cancelled >= 9, stats


# -- no fire-and-forget tasks ---------------------------------------------------------------------


async def test_prefetch_after_close_raises_and_leaves_no_task(tmp_path: Path) -> None:
    path = write_adapter(tmp_path, "a", seed=1)
    runtime, _ = _runtime()
    async with asyncio.timeout(30):
        async with runtime:
            runtime.register_adapter("a", path)
            runtime.prefetch(["a", "unknown"])
            assert runtime._tasks  # owned by the runtime, ended by aclose()
        assert not runtime._tasks
        with pytest.raises(RuntimeClosedError):
            runtime.prefetch(["a"])
        with pytest.raises(RuntimeClosedError):
            await runtime.load_adapter("a")
        with pytest.raises(RuntimeClosedError):
            runtime.register_adapter("b", path)
        with pytest.raises(RuntimeClosedError):
            await runtime.submit({"input_ids": _ids(3, 0)})
        with pytest.raises(RuntimeClosedError):
            runtime.submit_nowait({"input_ids": _ids(3, 0)})


# -- adapters refused at registration ------------------------------------------------------------


def _with_config(path: Path, **changes: Any) -> Path:
    config_path = path / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **changes}))
    return path


async def test_register_adapter_refuses_a_bad_directory_at_once(tmp_path: Path) -> None:
    good = write_adapter(tmp_path, "good", seed=1)
    dora = _with_config(write_adapter(tmp_path, "dora", seed=2), use_dora=True)
    wide = write_adapter(tmp_path, "wide", seed=3, rank=16)  # the runtime's max_rank is 8
    runtime, tiny = _runtime()
    async with asyncio.timeout(30), runtime:
        runtime.register_adapter("a", good)
        # A refused replacement leaves the registered version serving.
        with pytest.raises(UnsupportedAdapterError, match=r"adapter 'a' \(.*adapter_config\.json\): field `use_dora`"):
            runtime.register_adapter("a", dora)
        with pytest.raises(AdapterFormatError, match=r"adapter 'w' .*module '(up|down)' has rank 16, above .*=8"):
            runtime.register_adapter("w", wide)
        assert runtime.store.adapter_ids() == ["a"]
        _check(await runtime.submit({"input_ids": _ids(4, 0)}, "a"), tiny, good, _ids(4, 0))


async def test_a_resolved_adapter_refused_by_the_check_fails_its_request_typed(tmp_path: Path) -> None:
    bad = _with_config(write_adapter(tmp_path, "biased", seed=1), bias="all")
    good = write_adapter(tmp_path, "good", seed=2)

    async def resolver(adapter_id: str) -> Path | None:
        return {"biased": bad, "good": good}.get(adapter_id)

    tiny = TinyModel()
    runtime = Runtime(MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=8, num_slots=4)), resolver=resolver)
    async with asyncio.timeout(30), runtime:
        with pytest.raises(UnsupportedAdapterError, match=r"adapter 'biased' .*field `bias`='all'"):
            await runtime.submit({"input_ids": _ids(3, 0)}, "biased")
        _check(await runtime.submit({"input_ids": _ids(3, 1)}, "good"), tiny, good, _ids(3, 1))
        assert runtime.store.adapter_ids() == ["good"]
        assert runtime.statistics().store.load_failures == 0  # refused before any load was tried


# -- isolation ------------------------------------------------------------------------------------


async def test_bad_requests_fail_alone_and_neighbours_are_exact(tmp_path: Path) -> None:
    paths = {n: write_adapter(tmp_path, n, seed=i) for i, n in enumerate(("a", "b"))}
    runtime, tiny = _runtime(max_inflight_batches=1, max_batch_size=32, pad_to_multiple=1)
    plan = []
    for i in range(20):
        name = ("a", "b", BASE_ADAPTER)[i % 3]
        ids = torch.zeros(3, dtype=torch.long) if i in (4, 13) else _ids(2 + i % 5, i)
        plan.append((name, ids))
    async with asyncio.timeout(30), runtime:
        for name, path in paths.items():
            runtime.register_adapter(name, path)
        await runtime.load_adapter("a")
        await runtime.load_adapter("b")
        tiny.gate = threading.Event()
        first = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 99)}))
        await asyncio.to_thread(tiny.entered.wait, 30)
        tiny.poison_token = 0  # only in requests 4 and 13 (padding is none: same lengths within)
        tasks = [asyncio.ensure_future(runtime.submit({"input_ids": ids}, name)) for name, ids in plan]
        await asyncio.sleep(0)
        tiny.gate.set()
        await first
        results = await asyncio.gather(*tasks, return_exceptions=True)
        stats = runtime.statistics()
        from prometheus_client import generate_latest

        exposition = generate_latest(runtime.metrics.registry).decode()
    for i, ((name, ids), result) in enumerate(zip(plan, results, strict=True)):
        if i in (4, 13):
            assert isinstance(result, BatchFailedError), result
            assert isinstance(result.__cause__, RuntimeError) and "poisoned" in str(result.__cause__)
        else:
            assert isinstance(result, torch.Tensor), (i, result)
            _check(result, tiny, None if name == BASE_ADAPTER else paths[name], ids)
    assert stats.isolated_failures == 2 and stats.failed == 2 and stats.completed == 19
    assert "polylora_isolated_failures_total 2.0" in exposition


async def test_device_error_crashes_clearly_instead_of_bisecting() -> None:
    tiny = TinyModel()
    runtime, _ = _runtime(tiny, max_inflight_batches=1)
    original = tiny.forward
    broken = False

    def forward(input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if broken:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return original(input_ids, attention_mask)

    tiny.forward = forward  # type: ignore[method-assign]
    async with asyncio.timeout(30), runtime:
        tiny.gate = threading.Event()
        first = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 99)}))
        await asyncio.to_thread(tiny.entered.wait, 30)
        tasks = [asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, i)})) for i in range(8)]
        await asyncio.sleep(0)
        broken = True
        tiny.gate.set()
        await first
        forwards = tiny.forwards
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(r, WorkerCrashedError) for r in results), results
        assert tiny.forwards == forwards  # the failed batch was not re-run
        assert runtime.state == "crashed"
        with pytest.raises(WorkerCrashedError):
            await runtime.submit({"input_ids": _ids(3, 0)})


async def test_too_long_request_is_refused_at_submit() -> None:
    tiny = TinyModel()
    tiny.config = types.SimpleNamespace(max_position_embeddings=8)  # type: ignore[assignment]
    runtime, _ = _runtime(tiny)
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError, match="8 positions"):
            await runtime.submit({"input_ids": _ids(9, 0)})
        with pytest.raises(InputValidationError, match="8 positions"):
            runtime.submit_nowait({"input_ids": _ids(9, 0)})
        out = await runtime.submit({"input_ids": _ids(8, 1)})
    _check(out, tiny, None, _ids(8, 1))


async def test_float_inputs_of_another_dtype_are_refused_at_submit() -> None:
    runtime, _ = _runtime()
    bad = {"input_ids": _ids(3, 0), "inputs_embeds": torch.zeros(3, 16, dtype=torch.float16)}
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError, match="float16"):
            await runtime.submit(bad)
        with pytest.raises(InputValidationError, match="float16"):
            runtime.submit_nowait(bad)


# -- typed errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapter", [["a"], 123, "", None])
async def test_bad_adapter_argument_raises_the_same_type_from_both_submits(adapter: Any) -> None:
    runtime, _ = _runtime()
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError, match="adapter"):
            runtime.submit_nowait({"input_ids": _ids(3, 0)}, adapter)
        with pytest.raises(InputValidationError, match="adapter"):
            await runtime.submit({"input_ids": _ids(3, 0)}, adapter)
        assert runtime.statistics().queued == 0


async def test_non_string_input_name_is_an_input_error() -> None:
    runtime, _ = _runtime()
    async with asyncio.timeout(30), runtime:
        await runtime.submit({"input_ids": _ids(3, 0)})  # the schema is known: the mismatch path runs
        for call in (runtime.submit, runtime.submit_nowait):
            with pytest.raises(InputValidationError, match="names must be strings"):
                result = call({"input_ids": _ids(3, 0), 1: _ids(3, 0)})  # type: ignore[dict-item]
                if asyncio.iscoroutine(result):
                    await result


@pytest.mark.parametrize("timeout", ["1", math.nan, math.inf, 0, -1.0, True])
async def test_timeout_must_be_a_positive_finite_number(timeout: Any) -> None:
    runtime, _ = _runtime()
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError, match="timeout"):
            await runtime.submit({"input_ids": _ids(3, 0)}, timeout=timeout)
        assert runtime.statistics().submitted == 0


async def test_submit_before_start_says_not_started() -> None:
    runtime, _ = _runtime()
    with pytest.raises(RuntimeClosedError, match="not started"):
        await runtime.submit({"input_ids": _ids(3, 0)})
    with pytest.raises(RuntimeClosedError, match="not started"):
        runtime.submit_nowait({"input_ids": _ids(3, 0)})
    await runtime.aclose()


async def test_adapter_management_arguments_are_checked(tmp_path: Path) -> None:
    runtime, _ = _runtime()
    async with asyncio.timeout(30), runtime:
        with pytest.raises(InputValidationError):
            runtime.prefetch("a")  # a string, not a list of ids
        with pytest.raises(InputValidationError):
            runtime.prefetch([1])  # type: ignore[list-item]
        with pytest.raises(InputValidationError):
            await runtime.load_adapter(5)  # type: ignore[arg-type]
        with pytest.raises(InputValidationError):
            runtime.register_adapter(None, tmp_path)  # type: ignore[arg-type]


def test_every_error_class_is_exported() -> None:
    from polylora_async import _errors

    errors = {
        name
        for name, value in vars(_errors).items()
        if isinstance(value, type) and issubclass(value, PolyLoraError)
    }
    assert errors <= set(polylora_async.__all__), errors - set(polylora_async.__all__)
