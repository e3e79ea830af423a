"""The demo: many concurrent clients, a skewed adapter mix, every result checked against PEFT.

``python -m polylora_async demo`` builds a small Llama-style model from a config (or loads a local
Hugging Face model directory), writes PEFT adapters to disk with PEFT itself, serves them through
the runtime to concurrent clients with a Zipf-skewed adapter mix, checks every result against a
solo PEFT run of the same row, and serves ``/metrics`` while it runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import math
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from prometheus_client import CollectorRegistry

from ._config import BASE_ADAPTER, WrapConfig
from ._errors import TargetModulesError
from ._exposition import MetricsServer, serve_metrics
from ._layer import conv1d_type, linear_features
from ._model import MultiLoraModel
from .runtime import Runtime, RuntimeConfig
from .store import StoreConfig, StoreStatistics

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]  # transformers' Conv1D layers (PEFT: fan_in_fan_out=True)
# Tolerance of a runtime row against the solo PEFT row, relative to the row's norm. fp32: only
# summation order differs. bf16/fp16: PEFT rounds the LoRA path to 16 bits after each matmul while
# the runtime accumulates it in fp32, so a few bf16 ulps (2^-8 = 0.4%) of difference are expected.
REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}
METRICS_HOST = "127.0.0.1"

_N = TypeVar("_N", int, float)


@dataclass
class _Done:
    adapter: str
    ids: torch.Tensor
    output: torch.Tensor
    latency: float


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options; each is checked while parsing (see also :func:`check_demo_arguments`)."""
    parser.add_argument(
        "--model",
        type=_model_dir,
        help="a local Hugging Face model directory holding a config.json; without it, a small Llama model "
        "is built from a config",
    )
    parser.add_argument("--adapters", type=_positive_int, default=24, help="PEFT adapters to write and serve")
    parser.add_argument("--clients", type=_positive_int, default=48, help="concurrent client coroutines")
    parser.add_argument("--requests", type=_positive_int, default=600, help="requests in total")
    parser.add_argument("--slots", type=_positive_int, default=8, help="adapters resident on the device at once")
    parser.add_argument("--zipf", type=_non_negative_float, default=1.1, help="skew of the adapter mix (Zipf exponent)")
    parser.add_argument("--base-share", type=_share, default=0.1, help="share of requests without an adapter")
    parser.add_argument(
        "--device", type=_device, default="auto", help="'cpu', 'cuda', 'cuda:N' or 'auto' (the GPU when present)"
    )
    parser.add_argument(
        "--metrics-port", type=_port, default=0, help="port for /metrics on 127.0.0.1 (0: any free one)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the model, the adapters and the request mix")


def check_demo_arguments(args: argparse.Namespace) -> None:
    """Checks that need the system rather than the text alone: the metrics port must be free.

    Raises:
        ValueError: naming the option and why, when an argument cannot work.
    """
    if args.metrics_port:
        # asyncio's servers set SO_REUSEADDR, so do the same: a port in TIME_WAIT is free for them too.
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((METRICS_HOST, args.metrics_port))
            except OSError as error:
                raise ValueError(_port_message(args.metrics_port, error)) from None


def _port_message(port: int, error: OSError) -> str:
    return f"argument --metrics-port: cannot listen on {METRICS_HOST}:{port}: {error.strerror or error}"


def _number(text: str, kind: type[_N]) -> _N:
    try:
        return kind(text)
    except ValueError:
        # argparse would name the converting function ("invalid _positive_int value") instead.
        raise argparse.ArgumentTypeError(f"not {'an integer' if kind is int else 'a number'}: {text!r}") from None


def _positive_int(text: str) -> int:
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text, float)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _share(text: str) -> float:
    value = _number(text, float)
    if not 0 <= value <= 1:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _port(text: str) -> int:
    value = _number(text, int)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value


def _device(text: str) -> torch.device:
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (use cpu, cuda, cuda:N or auto)") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise argparse.ArgumentTypeError(f"the demo runs on cpu or cuda, got {text!r}")
    if not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but CUDA is not available here (use cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"{text!r} asked for, but only {torch.cuda.device_count()} GPU(s) are visible")
    return device


def _model_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'not a directory' if path.exists() else 'no such directory'}")
    if not (path / "config.json").is_file():
        raise argparse.ArgumentTypeError(f"{text}: no config.json in it (not a Hugging Face model directory)")
    return path


def run_demo(args: argparse.Namespace) -> int:
    try:
        return asyncio.run(_demo(args))
    except TargetModulesError as exc:  # e.g. a --model without any layer adapters can target
        print(f"polylora-async demo: {exc}", file=sys.stderr)
        return 2


def _build_model(args: argparse.Namespace) -> torch.nn.Module:
    from transformers import AutoModel, LlamaConfig, LlamaModel

    if args.model is not None:
        return AutoModel.from_pretrained(str(args.model), local_files_only=True).eval()
    torch.manual_seed(args.seed)
    config = LlamaConfig(
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=256,
    )
    return LlamaModel(config).eval()


def _write_adapters(base: torch.nn.Module, count: int, root: Path, seed: int) -> tuple[Any, dict[str, Path], list[str]]:
    """Write ``count`` adapters with PEFT (mixed ranks and targets); return the oracle PeftModel too."""
    from peft import LoraConfig, get_peft_model

    targets = pick_targets(base)
    conv1d = conv1d_type()
    # PEFT wants `fan_in_fan_out=True` for Conv1D layers (it warns and sets it otherwise).
    targeted = [m for n, m in base.named_modules() if any(n == t or n.endswith("." + t) for t in targets)]
    fan_in_fan_out = conv1d is not None and all(type(m) is conv1d for m in targeted)
    rng = random.Random(seed)
    peft_model = None
    names = []
    for i in range(count):
        rank = rng.choice([4, 8, 16])
        chosen = targets if i % 3 == 0 else rng.sample(targets, k=max(1, len(targets) // 2))
        config = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=chosen, fan_in_fan_out=fan_in_fan_out, init_lora_weights=False
        )
        name = f"adapter-{i:03d}"
        torch.manual_seed(seed * 1000 + i)
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        names.append(name)
    assert peft_model is not None
    peft_model.save_pretrained(str(root))  # one sub-folder per adapter
    paths = {n: root / n for n in names}
    return peft_model.eval(), paths, targets


def pick_targets(base: torch.nn.Module) -> list[str]:
    """Leaf names of the layers the demo's adapters target: a known family's, else up to four wrappable ones.

    Raises:
        TargetModulesError: the model has no layer that can be wrapped (``nn.Linear`` or ``Conv1D``).
    """
    names = [name for name, module in base.named_modules() if name and linear_features(module) is not None]
    for family in (LLAMA_TARGETS, GPT2_TARGETS):
        found = [t for t in family if any(n == t or n.endswith("." + t) for n in names)]
        if found:
            return found
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})[:4]
    if not leaves:
        raise TargetModulesError(
            f"{type(base).__name__} has no layer the demo can put adapters on (nn.Linear or transformers' Conv1D)"
        )
    return leaves


async def _demo(args: argparse.Namespace) -> int:
    registry = CollectorRegistry()
    try:
        # Bound first, before any work: the port was free when the arguments were checked, but
        # another process may have taken it since.
        server = await serve_metrics(registry, host=METRICS_HOST, port=args.metrics_port)
    except OSError as error:
        print(f"polylora-async demo: error: {_port_message(args.metrics_port, error)}", file=sys.stderr)
        return 2
    # The server stays up until the demo exits, through verification and the summary, so the
    # final counters can still be scraped.
    async with server:
        return await _run(args, registry, server)


async def _run(args: argparse.Namespace, registry: CollectorRegistry, server: MetricsServer) -> int:
    device: torch.device = args.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    # Building the model, writing adapters and verifying take seconds of CPU each: in threads,
    # so the event loop keeps answering /metrics meanwhile.
    base = await asyncio.to_thread(_build_model, args)
    with tempfile.TemporaryDirectory(prefix="polylora-demo-") as tmp:
        oracle, paths, targets = await asyncio.to_thread(
            _write_adapters, base, args.adapters, Path(tmp) / "adapters", args.seed
        )
        oracle.to(device=device, dtype=dtype)
        max_rank = 16
        model = MultiLoraModel(
            copy.deepcopy(base).to(device=device, dtype=dtype),
            WrapConfig(targets, max_rank=max_rank, num_slots=args.slots),
        )
        vocab = int(getattr(base.config, "vocab_size", 512))
        print(
            f"polylora-async demo: {type(base).__name__} on {device} ({dtype}), {len(model.layer_names)} wrapped "
            f"layers, {args.adapters} PEFT adapters in {paths[next(iter(paths))].parent}, {args.slots} slots"
        )
        async def fetch(adapter_id: str) -> Path | None:
            # Stands in for a remote adapter store: ids are fetched on first use, not registered up
            # front, and the store copies what it fetched into its disk cache.
            await asyncio.sleep(0)
            return paths.get(adapter_id)

        runtime = Runtime(
            model,
            RuntimeConfig(max_batch_size=32, max_wait=0.002),
            registry,
            store_config=StoreConfig(cpu_bytes=_cpu_budget(paths), disk_dir=Path(tmp) / "cache"),
            resolver=fetch,
        )
        done: list[_Done] = []
        async with runtime:
            print(f"serving Prometheus metrics at {server.url}", flush=True)
            await _warm_up(runtime, next(iter(paths)), vocab, device)
            t0 = time.perf_counter()
            async with _progress("requests", "req/s", lambda: len(done), args.requests):
                await _clients(runtime, args, list(paths), vocab, done)
            elapsed = time.perf_counter() - t0
            stats = runtime.statistics()
        checked = _Tally()
        async with _progress("verified", "rows/s", lambda: checked.count, len(done)):
            mismatches = await asyncio.to_thread(_verify, oracle, done, device, dtype, checked)
    _summary(args, done, elapsed, stats, mismatches, time.perf_counter() - started)
    return 1 if mismatches else 0


async def _warm_up(runtime: Runtime, adapter: str, vocab: int, device: torch.device) -> None:
    """One mixed batch per padded length, so kernel compilation stays out of the measured run."""
    if device.type == "cuda":
        print("warming up (compiling GPU kernels for each padded length) ...")
    requests = [
        runtime.submit({"input_ids": torch.randint(1, vocab, (length,))}, name)
        for length in (4, 20, 40, 48)
        for name in (adapter, BASE_ADAPTER)
    ]
    await asyncio.gather(*requests)


def _cpu_budget(paths: dict[str, Path]) -> int:
    """Room for about half the catalog in the CPU tier, so the demo shows all three tiers working."""
    sizes = [(p / "adapter_model.safetensors").stat().st_size for p in paths.values()]
    return max(sizes) * max(2, len(sizes) // 2)


async def _clients(runtime: Runtime, args: argparse.Namespace, names: list[str], vocab: int, done: list[_Done]) -> None:
    rng = random.Random(args.seed)
    weights = [1.0 / (rank + 1) ** args.zipf for rank in range(len(names))]
    plan = []
    for _ in range(args.requests):
        adapter = BASE_ADAPTER if rng.random() < args.base_share else rng.choices(names, weights)[0]
        length = rng.randint(4, 48)
        plan.append(
            (adapter, torch.randint(1, vocab, (length,), generator=torch.Generator().manual_seed(rng.randrange(2**31))))
        )
    queue: asyncio.Queue[tuple[str, torch.Tensor]] = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)

    async def client() -> None:
        while not queue.empty():
            adapter, ids = queue.get_nowait()
            t = time.perf_counter()
            output = await runtime.submit({"input_ids": ids}, adapter)
            done.append(_Done(adapter, ids, output, time.perf_counter() - t))

    await asyncio.gather(*(client() for _ in range(args.clients)))


@dataclass
class _Tally:
    """Rows verified so far: written by the verifying thread, read by the progress line."""

    count: int = 0


@contextlib.asynccontextmanager
async def _progress(label: str, unit: str, count: Callable[[], int], total: int) -> AsyncIterator[None]:
    """A progress line on stderr, refreshed every 0.5 s while the body runs, finished with its final count."""
    t0 = time.perf_counter()

    def show() -> None:
        rate = count() / max(time.perf_counter() - t0, 1e-9)
        print(f"\r  {label} {count():5d}/{total}  {rate:7.1f} {unit}", end="", file=sys.stderr, flush=True)

    async def refresh() -> None:
        while True:
            await asyncio.sleep(0.5)
            show()

    task = asyncio.create_task(refresh())
    try:
        yield
    finally:
        task.cancel()
        # gather, not suppress: the task's own CancelledError is a result here, while a
        # cancellation of the demo itself still propagates.
        await asyncio.gather(task, return_exceptions=True)
        show()
        print(file=sys.stderr, flush=True)


def _verify(oracle: Any, done: list[_Done], device: torch.device, dtype: torch.dtype, checked: _Tally) -> int:
    """Every row against the same row run alone through PEFT with its adapter; counts into ``checked``."""
    tol = REL_TOL[dtype]
    bad = 0
    with torch.inference_mode():
        for item in sorted(done, key=lambda d: d.adapter):
            ids = item.ids.to(device).unsqueeze(0)
            if item.adapter == BASE_ADAPTER:
                with oracle.disable_adapter():
                    expected = oracle(input_ids=ids).last_hidden_state[0]
            else:
                oracle.set_adapter(item.adapter)
                expected = oracle(input_ids=ids).last_hidden_state[0]
            got = item.output.to(device=device, dtype=torch.float32)
            error = (got - expected.float()).norm() / expected.float().norm()
            if not bool(error <= tol):
                bad += 1
                if bad <= 5:
                    print(f"MISMATCH {item.adapter}: relative error {float(error):.2e} > {tol:.0e}")
            checked.count += 1
    return bad


def _summary(
    args: argparse.Namespace, done: list[_Done], elapsed: float, stats: Any, mismatches: int, total: float
) -> None:
    latencies = sorted(d.latency * 1e3 for d in done)

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))]

    print(
        f"requests     {len(done)} in {elapsed:.2f} s = {len(done) / elapsed:.1f} req/s "
        f"({args.clients} clients, Zipf s={args.zipf})"
    )
    print(
        f"latency ms   p50 {pct(50):.1f}  p90 {pct(90):.1f}  p99 {pct(99):.1f}  max {latencies[-1]:.1f}"
        f"  (mean {statistics.fmean(latencies):.1f})"
    )
    print(
        f"batches      {stats.batches}, {stats.rows / max(stats.batches, 1):.1f} rows each, "
        f"{stats.mixed_batches} mixed, up to {stats.max_adapters_in_batch} adapters in one; "
        f"padding {100 * (1 - stats.real_tokens / max(stats.padded_tokens, 1)):.0f}% of tokens"
    )
    for line in _tier_lines(stats.store):
        print(line)
    verdict = "all verified" if not mismatches else f"{mismatches} MISMATCHED"
    print(f"results      {len(done)} checked against solo PEFT runs: {verdict}; demo took {total:.1f} s")


def _tier_lines(store_stats: StoreStatistics) -> list[str]:
    lines = []
    for name, tier in (("gpu", store_stats.gpu), ("cpu", store_stats.cpu), ("disk", store_stats.disk)):
        if tier is None:  # no disk tier configured
            continue
        rate = 100.0 * tier.hits / max(tier.hits + tier.misses, 1)
        lines.append(f"tier {name:4s}    hits {tier.hits:5d}  misses {tier.misses:5d}  hit rate {rate:5.1f}%")
    return lines


os.environ.setdefault("HF_HUB_OFFLINE", "1")
