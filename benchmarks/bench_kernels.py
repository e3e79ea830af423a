"""Layer-level cost of the multi-LoRA kernels on CUDA: base nn.Linear alone vs base + lora_apply_.

For each serving shape it prints (and with ``--json`` writes):

* base ms (``F.linear`` in bf16), base + LoRA ms, overhead %, eagerly (``triton.testing.do_bench``:
  median, L2 flushed before every call) and inside a CUDA graph (``do_bench_cudagraph``: no host
  launch overhead; the only way decode-sized layers are not CPU-bound). "+lora" runs
  ``lora_apply_trusted_`` (what ``MultiLoraLinear`` calls); eagerly, "+lora chk" runs the checked
  ``lora_apply_``;
* the split path's two halves (shrink, expand; used for stacks wider than rank 128) on their own;
* the LoRA part's bytes floor -- x read once, y read + written once, each distinct adapter's A and B
  once (at their true rank) -- and the share of the measured device-copy bandwidth it achieves:
  ``floor_bytes / lora_seconds / copy_bandwidth`` (1.0 = as fast as a copy of the same bytes).

Every case is checked against the fp64 reference before it is timed. Inputs rotate among several
buffer sets so that the working set exceeds the 50-60 MB L2 (graph mode does not flush it).

Last, the host cost per call (``--host``, default on): wall time of 1000 eager calls on a tiny
shape, synchronised once at the end, for the checked and trusted entry points, the trusted one
with triton's own launch path instead of the cached launcher, and a whole ``MultiLoraLinear``
forward against the ``nn.Linear`` it wraps.

Usage::

    python benchmarks/bench_kernels.py [--quick] [--json results.json] [--case decode ...] [--no-host]
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from polylora_async.kernels import (
    LoraBatchMeta,
    build_batch_meta,
    lora_apply_,
    lora_apply_reference_,
    lora_apply_trusted_,
    lora_expand_,
    lora_shrink,
    sgmv,
)


@dataclass(frozen=True)
class BenchCase:
    name: str
    rows: int
    tokens: int
    in_features: int
    out_features: int
    rank: int
    adapters: int


CASES = [
    BenchCase("decode", rows=64, tokens=1, in_features=4096, out_features=4096, rank=16, adapters=64),
    BenchCase("prefill", rows=16, tokens=512, in_features=4096, out_features=4096, rank=16, adapters=16),
    BenchCase("encoder-768x768-a16", rows=64, tokens=128, in_features=768, out_features=768, rank=8, adapters=16),
    BenchCase("encoder-768x768-a64", rows=64, tokens=128, in_features=768, out_features=768, rank=8, adapters=64),
    BenchCase("encoder-768x3072-a16", rows=64, tokens=128, in_features=768, out_features=3072, rank=8, adapters=16),
    BenchCase("encoder-768x3072-a64", rows=64, tokens=128, in_features=768, out_features=3072, rank=8, adapters=64),
    BenchCase("encoder-3072x768-a16", rows=64, tokens=128, in_features=3072, out_features=768, rank=8, adapters=16),
]
TARGETS = {"decode": 100.0, "prefill": 20.0}  # overhead % the brief asks for
DTYPE = torch.bfloat16
L2_DEFEAT_BYTES = 240 * 2**20  # rotate buffer sets until the working set is >= 4x a 60 MB L2


@dataclass
class BufferSet:
    x: torch.Tensor  # [B, T, in]
    y: torch.Tensor  # [B, T, out], updated by the expand when it is timed alone
    weight: torch.Tensor  # [out, in]
    a_stack: torch.Tensor  # [slots, max_rank, in]
    b_stack: torch.Tensor  # [slots, max_rank, out]
    t: torch.Tensor  # shrink output, for timing the expand alone


def _bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_copy_bandwidth(quick: bool) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + written / time)."""
    import triton.testing

    n = 2 * 2**30 // 2  # 2 GiB of bf16 per side
    src = torch.empty(n, dtype=DTYPE, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=10, rep=50 if quick else 200, return_mode="median")
    return 2 * _bytes(src) / (ms * 1e-3)


def make_sets(case: BenchCase, slots: int, max_sets: int | None = None) -> list[BufferSet]:
    g = torch.Generator(device="cuda").manual_seed(0)
    dev = "cuda"
    b, t, k, n, r = case.rows, case.tokens, case.in_features, case.out_features, case.rank

    def one() -> BufferSet:
        a_stack = torch.randn(slots, r, k, generator=g, device=dev) / k**0.5
        b_stack = torch.randn(slots, r, n, generator=g, device=dev) / r**0.5
        a_stack[0] = 0.0
        b_stack[0] = 0.0
        return BufferSet(
            x=torch.randn(b, t, k, generator=g, device=dev).to(DTYPE),
            y=torch.zeros(b, t, n, dtype=DTYPE, device=dev),
            weight=(torch.randn(n, k, generator=g, device=dev) / k**0.5).to(DTYPE),
            a_stack=a_stack.to(DTYPE),
            b_stack=b_stack.to(DTYPE),
            t=torch.empty(0, device=dev),
        )

    first = one()
    per_set = sum(_bytes(v) for v in (first.x, first.y, first.weight, first.a_stack, first.b_stack))
    count = max(2, -(-L2_DEFEAT_BYTES // per_set))
    if max_sets is not None:
        count = min(count, max_sets)
    return [first] + [one() for _ in range(count - 1)]


def check_against_reference(s: BufferSet, ranks: torch.Tensor, scales: torch.Tensor, meta: LoraBatchMeta) -> float:
    """Relative error of the LoRA delta vs the fp64 reference (bf16 output: expect ~3e-3)."""
    y0 = F.linear(s.x, s.weight)
    y = y0.clone()
    lora_apply_(y, s.x, s.a_stack, s.b_stack, ranks, scales, meta)
    ref = y0.double()
    lora_apply_reference_(ref, s.x.double(), s.a_stack.double(), s.b_stack.double(), ranks, scales, meta)
    delta, delta_ref = y.double() - y0.double(), ref - y0.double()
    return float((delta - delta_ref).norm() / delta_ref.norm())


def bench(fn: Callable[[], object], graph: bool, quick: bool) -> float:
    import triton.testing

    if graph:
        return float(triton.testing.do_bench_cudagraph(fn, rep=20 if quick else 100, return_mode="median"))
    return float(
        triton.testing.do_bench(fn, warmup=10 if quick else 50, rep=30 if quick else 200, return_mode="median")
    )


def run_case(case: BenchCase, copy_bw: float, quick: bool) -> dict[str, Any]:
    slots = case.adapters + 1
    sets = make_sets(case, slots)
    ranks = torch.full((slots,), case.rank, dtype=torch.int32, device="cuda")
    ranks[0] = 0
    scales = torch.full((slots,), 2.0, dtype=torch.float32, device="cuda")
    row_slots = [1 + i % case.adapters for i in range(case.rows)]
    meta = build_batch_meta(row_slots, "cuda")
    error = check_against_reference(sets[0], ranks, scales, meta)
    for s in sets:
        s.t = lora_shrink(s.x, s.a_stack, ranks, meta)

    def rotating(body: Callable[[BufferSet], object]) -> Callable[[], object]:
        order = itertools.cycle(sets)
        return lambda: body(next(order))

    def base(s: BufferSet) -> object:
        return F.linear(s.x, s.weight)  # what nn.Linear(bias=False) runs

    def base_lora(s: BufferSet) -> object:
        y = F.linear(s.x, s.weight)
        lora_apply_trusted_(y, s.x, s.a_stack, s.b_stack, ranks, scales, meta)
        return y

    def base_lora_checked(s: BufferSet) -> object:
        y = F.linear(s.x, s.weight)
        lora_apply_(y, s.x, s.a_stack, s.b_stack, ranks, scales, meta)
        return y

    def lora_alone(s: BufferSet) -> object:
        lora_apply_trusted_(s.y, s.x, s.a_stack, s.b_stack, ranks, scales, meta)
        return None

    def shrink(s: BufferSet) -> object:
        return lora_shrink(s.x, s.a_stack, ranks, meta)

    def expand(s: BufferSet) -> object:
        lora_expand_(s.y, s.t, s.b_stack, ranks, scales, meta)
        return None

    distinct = len(set(row_slots))
    x_bytes = case.rows * case.tokens * case.in_features * 2
    y_bytes = case.rows * case.tokens * case.out_features * 2
    a_bytes = distinct * case.rank * case.in_features * 2
    b_bytes = distinct * case.rank * case.out_features * 2
    floor = x_bytes + 2 * y_bytes + a_bytes + b_bytes
    result: dict[str, Any] = {**asdict(case), "distinct_adapters": distinct, "rel_error": error}
    result["floor_bytes"] = floor
    result["floor_us_at_copy_bw"] = floor / copy_bw * 1e6
    for mode, graph in (("eager", False), ("graph", True)):
        base_ms = bench(rotating(base), graph, quick)
        total_ms = bench(rotating(base_lora), graph, quick)
        checked_ms = total_ms if graph else bench(rotating(base_lora_checked), graph, quick)
        alone_ms = bench(rotating(lora_alone), graph, quick)
        shrink_ms = bench(rotating(shrink), graph, quick)
        expand_ms = bench(rotating(expand), graph, quick)
        lora_ms = max(total_ms - base_ms, 1e-9)
        result[mode] = {
            "base_ms": base_ms,
            "base_lora_ms": total_ms,
            "base_lora_checked_ms": checked_ms,
            "overhead_pct": 100.0 * (total_ms - base_ms) / base_ms,
            "overhead_checked_pct": 100.0 * (checked_ms - base_ms) / base_ms,
            "lora_ms": lora_ms,
            "lora_copy_bw_share": floor / (lora_ms * 1e-3) / copy_bw,
            "lora_alone_ms": alone_ms,
            "lora_alone_copy_bw_share": floor / (alone_ms * 1e-3) / copy_bw,
            "shrink_ms": shrink_ms,
            "shrink_copy_bw_share": (x_bytes + a_bytes) / (shrink_ms * 1e-3) / copy_bw,
            "expand_ms": expand_ms,
            "expand_copy_bw_share": (2 * y_bytes + b_bytes) / (expand_ms * 1e-3) / copy_bw,
        }
    return result


HOST_CALLS = 1000


def _host_us(fn: Callable[[], object], calls: int) -> float:
    """Wall microseconds per call of ``calls`` eager calls, synchronised once at the end."""
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / calls * 1e6


def measure_host(extra: dict[str, Callable[[Any], Callable[[], object]]] | None = None) -> dict[str, float]:
    """Host cost per call on tiny shapes (4 rows, 64 -> 64, rank 16, 4 adapters), for 1 token per
    row (decode: the split path, shrink + expand) and 16 (the fused kernel).

    The GPU work per call is a few microseconds, so the wall time per call is the host's time (the
    launch queue never fills). ``extra`` maps a name to a factory that receives the T=1 inputs'
    namespace and returns a callable to time too (the sweep uses it for the old code).
    """
    from types import SimpleNamespace

    from polylora_async._batch import BatchContext, BatchState
    from polylora_async._layer import MultiLoraLinear
    from polylora_async.adapters import LayerLora

    dev, rows, hidden, rank, slots = "cuda", 4, 64, 16, 5
    g = torch.Generator(device=dev).manual_seed(0)
    a_stack = torch.randn(slots, rank, hidden, generator=g, device=dev).to(DTYPE)
    b_stack = torch.randn(slots, rank, hidden, generator=g, device=dev).to(DTYPE)
    ranks = torch.full((slots,), rank, dtype=torch.int32, device=dev)
    ranks[0] = 0
    scales = torch.full((slots,), 0.5, dtype=torch.float32, device=dev)
    meta = build_batch_meta([1, 2, 3, 4], dev)
    linear = torch.nn.Linear(hidden, hidden, bias=False, device=dev, dtype=DTYPE)
    state = BatchState()
    layer = MultiLoraLinear(linear, "bench", slots, rank, state)
    for slot in range(1, slots):
        layer.write_slot(slot, LayerLora(a=a_stack[slot], b=b_stack[slot].t(), scale=0.5))
    state.current = BatchContext(meta)
    launchers = (sgmv._FUSED, sgmv._SHRINK, sgmv._EXPAND)
    results: dict[str, float] = {}
    first_inputs = None
    for tokens in (1, 16):
        x = torch.randn(rows, tokens, hidden, generator=g, device=dev).to(DTYPE)
        y = torch.randn(rows, tokens, hidden, generator=g, device=dev).to(DTYPE)
        first_inputs = first_inputs or SimpleNamespace(
            x=x, y=y, a_stack=a_stack, b_stack=b_stack, ranks=ranks, scales=scales, meta=meta
        )

        def checked(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            lora_apply_(y, x, a_stack, b_stack, ranks, scales, meta)

        def trusted(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            lora_apply_trusted_(y, x, a_stack, b_stack, ranks, scales, meta)

        path = "split: shrink + expand" if tokens <= sgmv.DECODE_MAX_TOKENS_PER_ROW else "fused"
        tag = f"T={tokens} ({path})"
        results[f"{tag} lora_apply_ (checked)"] = _host_us(checked, HOST_CALLS)
        results[f"{tag} lora_apply_trusted_"] = _host_us(trusted, HOST_CALLS)
        saved = [launcher._enabled for launcher in launchers]
        try:
            for launcher in launchers:
                launcher._enabled = False
            results[f"{tag} lora_apply_trusted_, triton's kernel[grid]"] = _host_us(trusted, HOST_CALLS)
        finally:
            for launcher, enabled in zip(launchers, saved, strict=True):
                launcher._enabled = enabled
        with torch.inference_mode():
            results[f"{tag} nn.Linear forward"] = _host_us(lambda x=x: linear(x), HOST_CALLS)
            results[f"{tag} MultiLoraLinear forward"] = _host_us(lambda x=x: layer(x), HOST_CALLS)
    for name, factory in (extra or {}).items():
        results[name] = _host_us(factory(first_inputs), HOST_CALLS)
    return results


def print_host(host: dict[str, float]) -> None:
    print(f"host cost per call, {HOST_CALLS} eager calls, 4 rows x T tokens, 64 -> 64, r16:")
    for name, us in host.items():
        print(f"  {name:<74} {us:8.2f} us")
    for tag in sorted({name.split(" lora")[0].split(" nn.")[0].split(" Multi")[0] for name in host}):
        if f"{tag} MultiLoraLinear forward" in host:
            added = host[f"{tag} MultiLoraLinear forward"] - host[f"{tag} nn.Linear forward"]
            print(f"  {tag + ': the wrapper adds':<74} {added:8.2f} us per layer call")


def print_table(results: list[dict[str, Any]], copy_bw: float) -> None:
    print(f"device copy bandwidth: {copy_bw / 1e12:.2f} TB/s (bytes read + written / time)")
    header = (
        f"{'case':<22} {'mode':<5} {'base ms':>8} {'+lora ms':>9} {'ovh %':>7} {'chk ovh%':>8} {'target':>7} "
        f"{'floor MB':>9} {'lora ms':>8} {'bw share':>8} {'shrink ms':>9} {'expand ms':>9} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        for mode in ("eager", "graph"):
            m = r[mode]
            target = TARGETS.get(r["name"])
            print(
                f"{r['name']:<22} {mode:<5} {m['base_ms']:>8.4f} {m['base_lora_ms']:>9.4f} "
                f"{m['overhead_pct']:>7.1f} {m['overhead_checked_pct']:>8.1f} "
                f"{('<=' + str(int(target))) if target else '-':>7} "
                f"{r['floor_bytes'] / 1e6:>9.1f} {m['lora_alone_ms']:>8.4f} {m['lora_alone_copy_bw_share']:>8.2f} "
                f"{m['shrink_ms']:>9.4f} {m['expand_ms']:>9.4f} {r['rel_error']:>8.1e}"
            )
    print("lora ms / bw share: the LoRA update alone (lora_apply_trusted_ on the base output), vs its bytes floor")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter warm-up and repetitions")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    parser.add_argument(
        "--case",
        action="append",
        choices=[c.name for c in CASES],
        help="run only this case (repeatable); default: all",
    )
    parser.add_argument("--no-host", action="store_true", help="skip the host cost per call")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    copy_bw = measure_copy_bandwidth(args.quick)
    cases = [c for c in CASES if not args.case or c.name in args.case]
    results = []
    failed = []
    for case in cases:
        result = run_case(case, copy_bw, args.quick)
        torch.cuda.empty_cache()  # the case's buffer sets and graphs are garbage now
        # bf16 output, round-to-nearest: ~3e-3 expected (tests/gpu allow 1.5e-2).
        result["correct"] = result["rel_error"] <= 1.5e-2
        if not result["correct"]:
            failed.append(case.name)
            print(f"WRONG: {case.name}: relative error {result['rel_error']:.2e} vs the fp64 reference")
        results.append(result)
    print_table(results, copy_bw)
    host = {} if args.no_host else measure_host()
    if host:
        print_host(host)
    if args.json:
        payload = {
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "triton": triton.__version__,
            "python": platform.python_version(),
            "dtype": str(DTYPE),
            "copy_bandwidth_bytes_per_s": copy_bw,
            "quick": args.quick,
            "results": results,
            "host_us_per_call": host,
        }
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=2)
        print(f"wrote {args.json}")
    if failed:
        print(f"bench_kernels: wrong results for {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
