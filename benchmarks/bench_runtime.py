"""End-to-end runtime benchmark: throughput, latency under load, scheduler overhead, cold adapters.

Four measurements, in one run:

1. Saturation throughput of ``Runtime.submit`` under many concurrent clients, against the best
   offline static batching of the same requests (pre-collated, length-sorted batches of
   ``max_batch_size`` rows straight through ``MultiLoraModel.forward_slots``, adapters resident).
2. Latency (p50 / p99) under open-loop Poisson arrivals at 50% and 90% of that saturation rate.
3. Scheduler overhead per request with a trivial model (host cost of submit -> batch -> result,
   excluding the forward itself).
4. Cold adapters: hot-adapter latency while other requests need adapters that are not loaded
   (read from disk), with the prefetcher on and off, next to the same hot traffic alone.

On CUDA the model is the Llama-shaped one from the kernel benchmarks (bf16); on CPU a small
Llama-style model (fp32). Run:  python benchmarks/bench_runtime.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import synthetic_adapter
from benchmarks.bench_model import LLAMA_TARGETS, build_llama
from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, StoreConfig, WrapConfig


def build(device: str, quick: bool) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The Llama-shaped model of the model-level benchmark on CUDA; a small one on the CPU."""
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    if device == "cuda" and not quick:
        model = build_llama(quick=False)
        shape = {"lengths": (192, 256), "requests": 512, "adapters": 16, "rank": 16, "batch": 32}
    else:
        cfg = LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
        model = LlamaModel(cfg).eval()
        shape = {"lengths": (8, 32), "requests": 256 if quick else 768, "adapters": 16, "rank": 8, "batch": 16}
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype), shape


def make_requests(shape: dict[str, Any], vocab: int, seed: int) -> list[tuple[str, torch.Tensor]]:
    rng = random.Random(seed)
    lo, hi = shape["lengths"]
    out = []
    for _ in range(shape["requests"]):
        adapter = f"a{rng.randrange(shape['adapters'])}" if rng.random() > 0.1 else BASE_ADAPTER
        out.append((adapter, torch.randint(1, vocab, (rng.randint(lo, hi),))))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def offline_static(
    model: MultiLoraModel, slot_of: dict[str, int], requests: list[tuple[str, torch.Tensor]], batch: int, device: str
) -> float:
    """Requests per second of the best static batching: length-sorted, pre-collated, resident adapters."""
    order = sorted(requests, key=lambda r: len(r[1]))
    batches = []
    for i in range(0, len(order), batch):
        chunk = order[i : i + batch]
        width = max(len(ids) for _, ids in chunk)
        ids = torch.zeros(len(chunk), width, dtype=torch.long)
        mask = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, (_, row) in enumerate(chunk):
            ids[j, : len(row)] = row
            mask[j, : len(row)] = 1
        slots = [slot_of.get(a, 0) for a, _ in chunk]
        batches.append((slots, ids.to(device), mask.to(device)))
    with torch.inference_mode():
        for slots, ids, mask in batches[:2]:
            model.forward_slots(slots, input_ids=ids, attention_mask=mask)
        sync(device)
        t0 = time.perf_counter()
        for slots, ids, mask in batches:
            model.forward_slots(slots, input_ids=ids, attention_mask=mask)
        sync(device)
    return len(requests) / (time.perf_counter() - t0)


async def closed_loop(runtime: Runtime, requests: list[tuple[str, torch.Tensor]], clients: int) -> float:
    queue = list(reversed(requests))

    async def client() -> None:
        while queue:
            adapter, ids = queue.pop()
            await runtime.submit({"input_ids": ids}, adapter)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return len(requests) / (time.perf_counter() - t0)


async def open_loop(
    runtime: Runtime, requests: list[tuple[str, torch.Tensor]], rate: float, seed: int, track: set[str] | None = None
) -> list[float]:
    """Poisson arrivals at ``rate`` per second; returns latencies (ms) of requests in ``track`` (all if None)."""
    rng = random.Random(seed)
    latencies: list[float] = []

    async def one(adapter: str, ids: torch.Tensor) -> None:
        t = time.perf_counter()
        await runtime.submit({"input_ids": ids}, adapter)
        if track is None or adapter in track:
            latencies.append((time.perf_counter() - t) * 1e3)

    tasks = []
    start = time.perf_counter()
    due = 0.0
    for adapter, ids in requests:
        due += rng.expovariate(rate)
        delay = start + due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(one(adapter, ids)))
    await asyncio.gather(*tasks)
    return latencies


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


async def saturation_and_latency(device: str, quick: bool) -> dict[str, Any]:
    base, shape = build(device, quick)
    model = MultiLoraModel(base, WrapConfig(LLAMA_TARGETS, max_rank=shape["rank"], num_slots=shape["adapters"]))
    layer_shapes = {n: (s.in_features, s.out_features) for n, s in model.layer_shapes().items()}
    requests = make_requests(shape, base.config.vocab_size, seed=1)
    result: dict[str, Any] = {"requests": len(requests), "batch": shape["batch"], "lengths": shape["lengths"]}
    config = RuntimeConfig(
        max_batch_size=shape["batch"],
        max_batch_tokens=shape["batch"] * shape["lengths"][1],
        max_wait=0.002,
        length_bucketing=False,
    )
    runtime = Runtime(model, config, store_config=StoreConfig())
    async with runtime:
        for i in range(shape["adapters"]):
            runtime.register_adapter(f"a{i}", synthetic_adapter(layer_shapes, shape["rank"], seed=i))
        await runtime.store.preload([f"a{i}" for i in range(shape["adapters"])], pin=True)
        # Warm-up over the whole request set: every padded length the measured runs will see.
        await closed_loop(runtime, requests, shape["batch"])
        resident = runtime.store.gpu_resident()
        slot_of = {}
        for i in range(shape["adapters"]):
            ref = await runtime.store.resolve(f"a{i}")
            slot_of[f"a{i}"] = resident[ref.key]
            runtime.store.release_ref(ref)
        result["static_rps"] = offline_static(model, slot_of, requests, shape["batch"], device)
        result["runtime_rps"] = await closed_loop(runtime, requests, clients=4 * shape["batch"])
        result["static_rps"] = max(
            result["static_rps"], offline_static(model, slot_of, requests, shape["batch"], device)
        )
        result["runtime_vs_static"] = result["runtime_rps"] / result["static_rps"]
        sat = result["runtime_rps"]
        # Partial batches have shapes the saturated runs never made (rows x padded length); the
        # first time each shape is seen costs allocations and library set-up. A server that has
        # run a while has seen them: warm them up before measuring.
        for share in (0.5, 0.9):
            await open_loop(runtime, requests, rate=share * sat, seed=99)
        for share in (0.5, 0.9):
            lat = await open_loop(runtime, requests, rate=share * sat, seed=int(share * 10))
            result[f"p50_ms_at_{int(share * 100)}"] = pct(lat, 50)
            result[f"p99_ms_at_{int(share * 100)}"] = pct(lat, 99)
        stats = runtime.statistics()
        result["mixed_batches"] = stats.mixed_batches
        result["batches"] = stats.batches
    return result


async def asyncio_floor(n: int) -> float:
    """Microseconds per request of asyncio alone in the same pattern: ``n`` gathered coroutines, each
    awaiting a future that a batch of 64 resolves. No runtime can be cheaper than this on the machine."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[int]] = []

    async def one() -> int:
        future = loop.create_future()
        waiting.append(future)
        return await future

    async def resolver() -> None:
        done = 0
        while done < n:
            await asyncio.sleep(0)
            batch, waiting[:] = waiting[:64], waiting[64:]
            for future in batch:
                future.set_result(1)
            done += len(batch)

    t0 = time.perf_counter()
    await asyncio.gather(resolver(), *(one() for _ in range(n)))
    return (time.perf_counter() - t0) / n * 1e6


async def scheduler_overhead(quick: bool, repeats: int = 5) -> dict[str, Any]:
    """Host cost per request with a model that does almost nothing (CPU); medians of ``repeats`` runs."""

    class Trivial(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.forward_seconds = 0.0

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            t = time.perf_counter()
            out = self.proj(input_ids.unsqueeze(-1).float().expand(-1, -1, 4))
            self.forward_seconds += time.perf_counter() - t
            return out

    n = 2000 if quick else 20000
    ids = [torch.randint(0, 9, (random.randint(1, 8),)) for _ in range(n)]
    requests = [("a" if i % 2 else BASE_ADAPTER, x) for i, x in enumerate(ids)]
    runs = []
    closed = []
    for _ in range(1 if quick else repeats):
        trivial = Trivial()
        model = MultiLoraModel(trivial, WrapConfig(["proj"], max_rank=4, num_slots=4))
        runtime = Runtime(model, RuntimeConfig(max_batch_size=64, max_wait=0.0005, max_queue=n))
        async with runtime:
            runtime.register_adapter("a", synthetic_adapter({"proj": (4, 4)}, 4, seed=0))
            await runtime.store.preload(["a"], pin=True)
            await asyncio.gather(*(runtime.submit({"input_ids": x}, "a") for x in ids[:256]))
            # A burst: every request submitted at once (the queue holds all of them).
            trivial.forward_seconds = 0.0
            t0 = time.perf_counter()
            await asyncio.gather(*(runtime.submit({"input_ids": x}, adapter) for adapter, x in requests))
            wall = time.perf_counter() - t0
            runs.append((wall, trivial.forward_seconds, await asyncio_floor(n)))
            # A steady load: 256 clients, each sending its next request when the last one returns.
            trivial.forward_seconds = 0.0
            t0 = time.perf_counter()
            await closed_loop(runtime, requests, clients=256)
            closed.append((time.perf_counter() - t0 - trivial.forward_seconds) / n * 1e6)
    runs.sort(key=lambda run: run[0] - run[1])
    wall, forward_s, floor = runs[len(runs) // 2]  # the run of median overhead
    return {
        "requests": n,
        "runs": len(runs),
        "wall_s": wall,
        "forward_s": forward_s,
        "overhead_us_per_request": (wall - forward_s) / n * 1e6,
        "total_us_per_request": wall / n * 1e6,
        "overhead_us_per_request_all_runs": sorted((w - f) / n * 1e6 for w, f, _ in runs),
        "asyncio_floor_us_per_request": floor,
        "closed_loop_256_overhead_us_per_request": statistics.median(closed),
        "closed_loop_256_all_runs": sorted(closed),
    }


async def cold_adapters(device: str, quick: bool) -> dict[str, Any]:
    """Hot-adapter latency while cold adapters load from disk, with and without the prefetcher."""
    from safetensors.torch import save_file

    base, shape = build(device, quick)
    template = copy.deepcopy(base)
    layer_shapes = {
        n: (m.in_features, m.out_features)
        for n, m in template.named_modules()
        if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in LLAMA_TARGETS
    }
    hot = [f"hot{i}" for i in range(4)]
    cold = [f"cold{i}" for i in range(24)]
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(hot + cold):
            raw = synthetic_adapter(layer_shapes, shape["rank"], seed=100 + i)
            path = Path(tmp) / name
            path.mkdir()
            save_file({k: v.contiguous() for k, v in raw.tensors.items()}, str(path / "adapter_model.safetensors"))
            (path / "adapter_config.json").write_text(json.dumps(dict(raw.config)))
        rng = random.Random(5)
        lo, hi = shape["lengths"]
        n = shape["requests"]
        hot_only = [(rng.choice(hot), torch.randint(1, 500, (rng.randint(lo, hi),))) for _ in range(n)]
        mixed = [(rng.choice(cold) if i % 8 == 7 else a, ids) for i, (a, ids) in enumerate(hot_only)]
        for label, traffic, prefetch in (
            ("hot_only", hot_only, True),
            ("cold_prefetch", mixed, True),
            ("cold_no_prefetch", mixed, False),
        ):
            model = MultiLoraModel(
                copy.deepcopy(template), WrapConfig(LLAMA_TARGETS, max_rank=shape["rank"], num_slots=8)
            )
            config = RuntimeConfig(
                max_batch_size=shape["batch"], max_batch_tokens=shape["batch"] * hi, max_wait=0.002, prefetch=prefetch
            )
            runtime = Runtime(model, config, store_config=StoreConfig(cpu_bytes=0))
            async with runtime:
                for name in hot + cold:
                    runtime.register_adapter(name, Path(tmp) / name)
                await runtime.store.preload(hot, pin=True)
                await closed_loop(runtime, hot_only, shape["batch"])  # warm-up: every padded length
                sat = await closed_loop(runtime, hot_only[: 4 * shape["batch"]], 2 * shape["batch"])
                await open_loop(runtime, hot_only, rate=0.5 * sat, seed=4)  # warm partial-batch shapes
                lat = await open_loop(runtime, traffic, rate=0.5 * sat, seed=3, track=set(hot))
                stats = runtime.statistics()
            results[label] = {
                "hot_p50_ms": pct(lat, 50),
                "hot_p99_ms": pct(lat, 99),
                "rate_rps": 0.5 * sat,
                "batches": stats.batches,
                "gpu_loads": stats.store.gpu.loads,
                "gpu_evictions": stats.store.gpu.evictions,
            }
            del model
    base_p99 = results["hot_only"]["hot_p99_ms"]
    for label in ("cold_prefetch", "cold_no_prefetch"):
        results[label]["p99_rise_pct"] = 100 * (results[label]["hot_p99_ms"] / base_p99 - 1)
    return results


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu"}
    out["saturation"] = await saturation_and_latency(device, args.quick)
    out["scheduler_overhead_cpu"] = await scheduler_overhead(args.quick)
    out["cold_adapters"] = await cold_adapters(device, args.quick)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = asyncio.run(main_async(args))
    sat = out["saturation"]
    print(f"device {out['device']}")
    print(
        f"saturation: runtime {sat['runtime_rps']:.1f} req/s vs offline static {sat['static_rps']:.1f} req/s "
        f"= {100 * sat['runtime_vs_static']:.1f}% ({sat['batches']} batches, {sat['mixed_batches']} mixed)"
    )
    for share in (50, 90):
        print(
            f"latency at {share}% of saturation: p50 {sat[f'p50_ms_at_{share}']:.1f} ms, "
            f"p99 {sat[f'p99_ms_at_{share}']:.1f} ms"
        )
    so = out["scheduler_overhead_cpu"]
    print(
        f"scheduler overhead (trivial model): {so['overhead_us_per_request']:.1f} us/request "
        f"({so['total_us_per_request']:.1f} us/request in total, {so['requests']} requests, median of "
        f"{so['runs']} runs; asyncio alone in the same pattern: {so['asyncio_floor_us_per_request']:.1f} us/request)"
    )
    print(
        f"scheduler overhead, 256 closed-loop clients: {so['closed_loop_256_overhead_us_per_request']:.1f} us/request "
        f"(median of {so['runs']} runs)"
    )
    for label, values in out["cold_adapters"].items():
        rise = f", p99 {values['p99_rise_pct']:+.1f}% vs hot only" if "p99_rise_pct" in values else ""
        print(
            f"cold adapters, {label:17}: hot p50 {values['hot_p50_ms']:.1f} ms, p99 {values['hot_p99_ms']:.1f} ms{rise}"
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
