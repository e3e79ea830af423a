"""What asyncio's and anyio's primitives cost per use on this machine: the reason the runtime stays on asyncio.

The runtime completes every request through an asyncio future and hands every batch to its worker
thread with ``run_in_executor``. anyio's portable equivalents (an ``Event`` per request,
``to_thread.run_sync`` per batch) would let it run under trio too; this measures what each costs,
in one process, alternating, 5 runs of each. Run:  python benchmarks/bench_event_primitives.py
"""

import asyncio
import statistics
import time

import anyio

N = 20000


async def asyncio_futures():
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    for _ in range(N):
        f = loop.create_future()
        loop.call_soon(f.set_result, 1)
        await f
    return (time.perf_counter() - t) / N * 1e6


async def anyio_events():
    t = time.perf_counter()
    for _ in range(N):
        e = anyio.Event()
        asyncio.get_running_loop().call_soon(e.set)
        await e.wait()
    return (time.perf_counter() - t) / N * 1e6


async def anyio_memory_stream():
    send, recv = anyio.create_memory_object_stream(1)
    t = time.perf_counter()
    async with send, recv:
        for _ in range(N):
            send.send_nowait(1)
            await recv.receive()
    return (time.perf_counter() - t) / N * 1e6


async def executor_hop():
    loop = asyncio.get_running_loop()
    n = 2000
    t = time.perf_counter()
    for _ in range(n):
        await loop.run_in_executor(None, int)
    a = (time.perf_counter() - t) / n * 1e6
    t = time.perf_counter()
    for _ in range(n):
        await anyio.to_thread.run_sync(int)
    b = (time.perf_counter() - t) / n * 1e6
    return a, b


async def main():
    res = {k: [] for k in ("future", "anyio.Event", "memstream", "run_in_executor", "to_thread")}
    for _ in range(5):
        res["future"].append(await asyncio_futures())
        res["anyio.Event"].append(await anyio_events())
        res["memstream"].append(await anyio_memory_stream())
        a, b = await executor_hop()
        res["run_in_executor"].append(a)
        res["to_thread"].append(b)
    for k, v in res.items():
        print(f"{k}: median {statistics.median(v):.2f} us (runs {min(v):.2f}-{max(v):.2f})")


asyncio.run(main())
