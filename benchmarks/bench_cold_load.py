"""Cold-load cost of an adapter (disk -> CPU -> GPU), by adapter size, and how much prefetch hides.

Two measurements per LoRA rank, on a stack of ``--layers`` square ``nn.Linear(hidden, hidden)`` layers
(every layer wrapped; adapter bytes = layers * 2 * hidden * rank * dtype size):

1. **Cold load**: ``await store.ensure_gpu(ref)`` for adapters in none of the store's tiers, until
   the slot write has completed on the device. Split into *read + validate* (disk -> CPU: file read,
   checks, pinned staging, in a worker thread) and *CPU -> GPU* (a reload of adapters evicted from
   the GPU but still in the CPU tier). "Cold" means cold for the store: the files were just written,
   so the OS page cache probably holds them (dropping it needs root).
2. **Prefetch overlap**: ``--steps`` batches, each with an adapter never used before, the forward
   pass running in a worker thread (as the runtime's GPU worker does) and waited for:
     * compute only: the same resident adapter every step (the floor);
     * serial: each step first loads its adapter, then computes;
     * prefetch: each step prefetches the next steps' adapters before computing.
   ``hidden = (serial - prefetch) / (serial - compute)``: the share of the load time that prefetch
   moved behind compute (100%: loads cost nothing; 0%: no overlap). On CPU the "device" is the host
   itself: the forward gets ``--compute-threads`` (default 1) so the loads have a core of their own.

Usage::

    python benchmarks/bench_cold_load.py --quick                  # CPU smoke run, seconds
    python benchmarks/bench_cold_load.py --json out/cold.json     # CUDA defaults: hidden 4096, 32 layers, bf16

Prints a table; ``--json PATH`` also writes the rows and the machine description.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from polylora_async import MultiLoraModel, WrapConfig
from polylora_async._catalog import AdapterRef
from polylora_async.store import AdapterStore, StoreConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class StageTimes:
    """A StoreObserver that keeps the store's own per-stage load durations."""

    def __init__(self) -> None:
        self.durations: dict[tuple[str, str], list[float]] = {}

    def load_duration(self, source: str, target: str, seconds: float) -> None:
        self.durations.setdefault((source, target), []).append(seconds)

    def cache_hit(self, tier: str) -> None:
        pass

    def cache_miss(self, tier: str) -> None:
        pass

    def eviction(self, tier: str) -> None:
        pass

    def reload_after_eviction(self, tier: str) -> None:
        pass

    def set_resident(self, tier: str, count: int, nbytes: int) -> None:
        pass


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> MultiLoraModel:
    torch.manual_seed(0)
    layers = [nn.Linear(args.hidden, args.hidden, bias=False) for _ in range(args.layers)]
    base = nn.Sequential(*layers).to(device=device, dtype=dtype).eval()
    targets = [str(i) for i in range(args.layers)]
    return MultiLoraModel(base, WrapConfig(targets, max_rank=max(args.ranks), num_slots=2))


def write_adapters(root: Path, count: int, rank: int, args: argparse.Namespace, dtype: torch.dtype) -> list[Path]:
    g = torch.Generator().manual_seed(rank)
    paths = []
    for i in range(count):
        tensors = {}
        for layer in range(args.layers):
            a = torch.randn(rank, args.hidden, generator=g) / args.hidden**0.5
            b = torch.randn(args.hidden, rank, generator=g) / rank**0.5
            tensors[f"base_model.model.{layer}.lora_A.weight"] = a.to(dtype)
            tensors[f"base_model.model.{layer}.lora_B.weight"] = b.to(dtype)
        path = root / f"r{rank}-{i}"
        path.mkdir(parents=True)
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                  "target_modules": [str(i) for i in range(args.layers)]}
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def store_config() -> StoreConfig:
    # CPU tier big enough for every adapter of one rank; no minimum residency: each step needs a slot.
    return StoreConfig(cpu_bytes=64 * 1024**3, min_residency_s=0.0, load_threads=2, prefetch_cpu_ahead=2)


async def measure_cold(model: MultiLoraModel, paths: list[Path], device: torch.device) -> dict[str, float]:
    stages = StageTimes()
    async with AdapterStore(model, store_config(), stages) as store:
        refs = [store.register(f"cold-{i}", p) for i, p in enumerate(paths)]
        cold = []
        for ref in refs:
            start = time.perf_counter()
            await store.ensure_gpu(ref)
            await asyncio.to_thread(synchronize, device)
            cold.append(time.perf_counter() - start)
        # All are in the CPU tier now; the GPU holds the last two. Reload the others: CPU -> GPU only.
        to_gpu = []
        for ref in refs[: max(1, len(refs) - model.config.num_slots)]:
            start = time.perf_counter()
            await store.ensure_gpu(ref)
            await asyncio.to_thread(synchronize, device)
            to_gpu.append(time.perf_counter() - start)
    # The weights file (its header is a few KiB); the CPU tier's bytes count page-locked memory as
    # the pinned allocator rounds it, which is not the adapter's size.
    nbytes = (paths[0] / "adapter_model.safetensors").stat().st_size
    read = stages.durations.get(("source", "cpu"), [0.0])
    return {
        "adapter_mib": nbytes / 2**20,
        "read_validate_ms": 1e3 * statistics.median(read),
        "cpu_to_gpu_ms": 1e3 * statistics.median(to_gpu),
        "cold_total_ms": 1e3 * statistics.median(cold),
    }


async def measure_overlap(
    model: MultiLoraModel, paths: list[Path], args: argparse.Namespace, device: torch.device, dtype: torch.dtype
) -> dict[str, float]:
    x = torch.randn(args.batch, args.hidden, device=device, dtype=dtype)

    def run(lease: Any, ref: AdapterRef) -> Any:
        """The GPU worker's part: wait for the slot copies on the device, compute, wait for the result."""
        lease.wait_copies()
        with torch.inference_mode():
            model.forward_slots(lease.row_slots([ref] * args.batch), x)
        done = torch.cuda.Event() if device.type == "cuda" else None
        if done is not None:
            done.record()
        synchronize(device)
        return done

    async def steps(mode: str) -> float:
        async with AdapterStore(model, store_config()) as store:
            refs = [store.register(f"{mode}-{i}", p) for i, p in enumerate(paths)]
            warm = refs[0]
            lease = await store.acquire_lease([warm])
            for _ in range(3):  # warm-up: kernels, allocator
                await asyncio.to_thread(run, lease, warm)
            lease.release()
            start = time.perf_counter()
            for step in range(args.steps):
                ref = warm if mode == "compute" else refs[1 + step]
                lease = await store.acquire_lease([ref])
                if mode == "prefetch":
                    store.prefetch(refs[2 + step : 2 + step + args.prefetch_ahead])
                done = await asyncio.to_thread(run, lease, ref)
                lease.release(done)
            elapsed = time.perf_counter() - start
        return elapsed / args.steps

    compute = await steps("compute")
    serial = await steps("serial")
    prefetch = await steps("prefetch")
    load = serial - compute
    hidden = (serial - prefetch) / load if load > 0 else float("nan")
    return {
        "compute_ms": 1e3 * compute,
        "serial_ms": 1e3 * serial,
        "prefetch_ms": 1e3 * prefetch,
        "hidden_pct": 100.0 * max(0.0, min(1.0, hidden)) if hidden == hidden else float("nan"),
    }


COLUMNS = [
    ("rank", "rank", "{:d}"),
    ("adapter_mib", "MiB", "{:.2f}"),
    ("read_validate_ms", "disk->CPU ms", "{:.2f}"),
    ("cpu_to_gpu_ms", "CPU->GPU ms", "{:.2f}"),
    ("cold_total_ms", "cold ms", "{:.2f}"),
    ("compute_ms", "compute ms/step", "{:.2f}"),
    ("serial_ms", "serial ms/step", "{:.2f}"),
    ("prefetch_ms", "prefetch ms/step", "{:.2f}"),
    ("hidden_pct", "hidden %", "{:.0f}"),
]


def print_table(rows: list[dict[str, Any]]) -> None:
    cells = [[fmt.format(row[key]) for key, _, fmt in COLUMNS] for row in rows]
    widths = [max(len(title), *(len(c[i]) for c in cells)) for i, (_, title, _) in enumerate(COLUMNS)]
    print("  ".join(title.rjust(w) for (_, title, _), w in zip(COLUMNS, widths, strict=True)))
    for c in cells:
        print("  ".join(v.rjust(w) for v, w in zip(c, widths, strict=True)))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a CPU smoke run in seconds")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 on CUDA, fp32 on CPU")
    parser.add_argument("--ranks", default=None, help="comma-separated LoRA ranks")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--layers", type=int, default=None)
    parser.add_argument(
        "--batch", type=int, default=None,
        help="rows per batch, i.e. the compute per step (default: 64 with --quick, 2048 on CUDA, 256 on CPU)",
    )
    parser.add_argument("--steps", type=int, default=None, help="batches per overlap measurement")
    parser.add_argument("--adapters", type=int, default=None, help="adapters per rank for the cold-load median")
    parser.add_argument("--prefetch-ahead", type=int, default=2)
    parser.add_argument(
        "--compute-threads", type=int, default=None,
        help="torch intra-op threads for a CPU forward (default 1: the loads need a core, as they would "
        "next to a GPU); ignored on CUDA",
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    quick = args.quick
    defaults = {
        "ranks": "4,16" if quick else "8,16,64,128",
        "hidden": 256 if quick else 4096,
        "layers": 4 if quick else 32,
        "batch": None,  # set once the device is known
        "steps": 6 if quick else 16,
        "adapters": 6 if quick else 12,
    }
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.ranks = [int(r) for r in str(args.ranks).split(",") if r]
    return args


async def main_async(args: argparse.Namespace) -> list[dict[str, Any]]:
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    args.resolved_device, args.resolved_dtype = str(device), str(dtype).removeprefix("torch.")
    if args.batch is None:
        # On CUDA, 2048 rows x 32 layers of 4096^2 in bf16 take a few ms per step: the same order as
        # loading a rank-16..128 adapter, which is where hiding the load matters.
        args.batch = 64 if args.quick else (2048 if device.type == "cuda" else 256)
    if device.type == "cpu":
        args.compute_threads = args.compute_threads or 1
        torch.set_num_threads(args.compute_threads)
    model = build_model(args, device, dtype)
    rows = []
    with tempfile.TemporaryDirectory(prefix="polylora-bench-") as tmp:
        for rank in args.ranks:
            count = max(args.adapters, args.steps + 2 + args.prefetch_ahead)
            paths = write_adapters(Path(tmp), count, rank, args, dtype)
            row: dict[str, Any] = {"rank": rank}
            row |= await measure_cold(model, paths[: args.adapters], device)
            row |= await measure_overlap(model, paths, args, device, dtype)
            rows.append(row)
            print(f"rank {rank}: done", file=sys.stderr, flush=True)
    return rows


def describe_machine(device: str) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = asyncio.run(main_async(args))
    print(
        f"\ncold load and prefetch overlap: device={args.resolved_device} dtype={args.resolved_dtype} "
        f"hidden={args.hidden} layers={args.layers} batch={args.batch} steps={args.steps}"
    )
    print_table(rows)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {
            "benchmark": "cold_load",
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "machine": describe_machine(args.resolved_device),
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
