"""Helpers shared by the benchmark programs: synthetic adapters and timing."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

from polylora_async import RawAdapter


def synthetic_adapter(
    layers: dict[str, tuple[int, int]], rank: int, seed: int, targets: Sequence[str] | None = None, alpha: float = 16.0
) -> RawAdapter:
    """A random LoRA adapter in PEFT's key layout for the given layers (name -> (in, out))."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    chosen = [n for n in layers if targets is None or any(n.endswith("." + t) or n == t for t in targets)]
    for name in chosen:
        fan_in, fan_out = layers[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) / fan_in**0.5
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) / rank**0.5
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "target_modules": sorted({n.rsplit(".", 1)[-1] for n in chosen}),
    }
    return RawAdapter(config=config, tensors=tensors, origin=f"synthetic seed {seed}")


def time_cuda(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs, timed with CUDA events after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def time_host(fn: Callable[[], object], warmup: int, iters: int) -> float:
    """Median milliseconds of ``fn`` by the host clock (for CPU runs)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
