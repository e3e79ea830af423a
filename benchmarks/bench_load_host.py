"""Host cost of loading one adapter, stage by stage, and how much loads slow a forward's host work.

A served model spends host time (Python and kernel dispatch, under the interpreter lock) on every
forward pass; adapter loads run in worker threads of the same process and compete for that lock.
This measures, for one adapter of ``--layers`` wrapped ``Linear(hidden, hidden)`` layers:

* per stage, the median wall time and the number of torch calls made from Python (counted with a
  ``TorchFunctionMode``; each one holds the interpreter lock for its dispatch):
    - ``read``: ``read_peft_directory`` (into page-locked memory on CUDA),
    - ``validate``: ``prepare_adapter`` + ``stage_weights`` (what the CPU tier keeps),
    - ``write``: ``write_slot`` (on CUDA: issued on a side stream, then waited for);
* interference: a loop of small torch calls on the main thread (the host side of a forward pass of
  many layers) timed alone and while another thread loads adapters back to back, as the prefetcher
  does; ``slowdown`` = loop time with loads / loop time alone - 1.

Usage::

    python benchmarks/bench_load_host.py                  # 224 layers (a 7B Llama's 32 x 7), hidden 1024, rank 16
    python benchmarks/bench_load_host.py --quick --json out.json
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from polylora_async import MultiLoraModel, WrapConfig, read_peft_directory
from polylora_async.store._cpu_tier import stage_weights

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class CountCalls(TorchFunctionMode):
    """Counts torch functions and tensor methods called from Python while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.calls += 1
        return func(*args, **(kwargs or {}))


def write_adapters(root: Path, args: argparse.Namespace) -> list[Path]:
    g = torch.Generator().manual_seed(0)
    dtype = DTYPES[args.file_dtype]
    paths = []
    for i in range(args.count):
        tensors = {}
        for layer in range(args.layers):
            a, b = torch.randn(args.rank, args.hidden, generator=g), torch.randn(args.hidden, args.rank, generator=g)
            tensors[f"base_model.model.{layer}.lora_A.weight"] = a.to(dtype)
            tensors[f"base_model.model.{layer}.lora_B.weight"] = b.to(dtype)
        path = root / f"a{i}"
        path.mkdir()
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": args.rank, "lora_alpha": 2 * args.rank, "target_modules": ["0"]}
        (path / "adapter_config.json").write_text(json.dumps(config))
        paths.append(path)
    return paths


class Loader:
    """The store's load path without its bookkeeping: read, validate + stage, write a slot."""

    def __init__(self, model: MultiLoraModel, device: torch.device) -> None:
        self.model = model
        self.pin = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.pin else None
        # Older versions of the package read and validated without a pin_memory option: decided once
        # here, not in the timed calls.
        def pin_option(fn: Any) -> dict[str, bool]:
            return {"pin_memory": True} if self.pin and "pin_memory" in inspect.signature(fn).parameters else {}

        self.read_options = pin_option(read_peft_directory)
        self.validate_options = pin_option(model.prepare_adapter)

    def read(self, path: Path) -> Any:
        return read_peft_directory("x", path, **self.read_options)

    def validate(self, raw: Any) -> Any:
        weights = self.model.prepare_adapter("x", raw, **self.validate_options)
        return stage_weights(weights, pin=self.pin)

    def write(self, weights: Any) -> None:
        if self.stream is None:
            self.model.write_slot(1, weights)
            return
        with torch.cuda.stream(self.stream):
            self.model.write_slot(1, weights)
        self.stream.synchronize()

    def load(self, path: Path) -> None:
        self.write(self.validate(self.read(path)))


def measure_stages(loader: Loader, paths: list[Path]) -> dict[str, dict[str, float]]:
    """Median wall time per stage (timed without counting), and the torch calls of one load."""
    times: dict[str, list[float]] = {"read": [], "validate": [], "write": []}

    def timed(stage: str, run: Any, *args: Any) -> Any:
        start = time.perf_counter()
        result = run(*args)
        times[stage].append(time.perf_counter() - start)
        return result

    loader.load(paths[0])  # warm-up: allocator, first-call set-up
    for path in paths:
        timed("write", loader.write, timed("validate", loader.validate, timed("read", loader.read, path)))
    calls: dict[str, int] = {}
    value: Any = paths[0]
    for stage in ("read", "validate", "write"):
        counter = CountCalls()  # counting slows every call down: a separate pass
        with counter:
            value = getattr(loader, stage)(value)
        calls[stage] = counter.calls
    return {s: {"ms": 1e3 * statistics.median(t), "torch_calls": calls[s]} for s, t in times.items()}


def host_loop(iters: int) -> float:
    """Seconds for ``iters`` small torch calls on the calling thread (a forward pass's host side)."""
    x = torch.zeros(16)
    start = time.perf_counter()
    for _ in range(iters):
        x.add_(1.0)
    return time.perf_counter() - start


def measure_interference(loader: Loader, paths: list[Path], iters: int, repeats: int) -> dict[str, float]:
    alone = statistics.median(host_loop(iters) for _ in range(repeats))
    stop = threading.Event()
    loads = 0

    def keep_loading() -> None:
        nonlocal loads
        while not stop.is_set():
            loader.load(paths[loads % len(paths)])
            loads += 1

    thread = threading.Thread(target=keep_loading, daemon=True)
    thread.start()
    try:
        time.sleep(0.05)
        start = time.perf_counter()
        loaded = loads
        busy = statistics.median(host_loop(iters) for _ in range(repeats))
        loads_per_s = (loads - loaded) / (time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
    return {
        "host_loop_ms_alone": 1e3 * alone,
        "host_loop_ms_while_loading": 1e3 * busy,
        "slowdown_pct": 100 * (busy / alone - 1),
        "loads_per_s_meanwhile": loads_per_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=224)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--count", type=int, default=8, help="distinct adapters (files) to load")
    parser.add_argument("--dtype", choices=DTYPES, default=None, help="model dtype (default: bf16 on CUDA, else fp32)")
    parser.add_argument("--file-dtype", choices=DTYPES, default=None, help="dtype in the files (default: the model's)")
    parser.add_argument("--iters", type=int, default=20000, help="torch calls in the host loop")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    args.file_dtype = args.file_dtype or args.dtype
    if args.quick:
        args.layers, args.hidden, args.count, args.iters, args.repeats = 32, 256, 3, 5000, 3
    torch.manual_seed(0)
    base = nn.Sequential(*(nn.Linear(args.hidden, args.hidden, bias=False) for _ in range(args.layers)))
    base = base.to(device=device, dtype=DTYPES[args.dtype]).eval()
    model = MultiLoraModel(base, WrapConfig([str(i) for i in range(args.layers)], max_rank=args.rank, num_slots=1))
    loader = Loader(model, device)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_adapters(Path(tmp), args)
        mib = sum(p.stat().st_size for p in paths[0].iterdir()) / 2**20
        stages = measure_stages(loader, paths)
        interference = measure_interference(loader, paths, args.iters, args.repeats)
    out = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "shape": {k: getattr(args, k) for k in ("hidden", "layers", "rank", "dtype", "file_dtype")},
        "adapter_file_mib": mib,
        "stages": stages,
        "interference": interference,
    }
    print(f"device {out['device']}; {args.layers} layers {args.hidden}x{args.hidden}, rank {args.rank}, "
          f"{args.file_dtype} file ({mib:.1f} MiB) -> {args.dtype} model")
    for stage, values in stages.items():
        print(f"  {stage:8} {values['ms']:8.2f} ms  {values['torch_calls']:6d} torch calls from Python")
    i = interference
    print(f"  host loop alone {i['host_loop_ms_alone']:.1f} ms, while loading {i['host_loop_ms_while_loading']:.1f} ms "
          f"({i['slowdown_pct']:+.1f}%, {i['loads_per_s_meanwhile']:.1f} loads/s meanwhile)")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
