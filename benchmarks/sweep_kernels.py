"""Launch-config sweep for the SGMV kernels on CUDA: the fused kernel and the split path's halves.

For each case it times the LoRA update alone (``y += lora(x)`` on an existing ``y``) in CUDA-graph
replay (host launch cost excluded), rotating buffer sets so the working set exceeds the L2, for:

* the fused kernel (``lora_apply_triton_(fused_config=...)``) over a list of candidate configs;
* the split path's shrink and expand over their candidates, each timed alone;
* the current table entries (marked ``*``).

Every candidate is checked against the fp64 reference first (a wrong one is reported, not timed).
Compilation runs first in ``--jobs`` worker processes that fill triton's on-disk cache, so the
device time goes to timing, not to ptxas.

Run:  python benchmarks/sweep_kernels.py [--json out.json] [--case decode ...] [--jobs 8] [--host | --host-only]
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import sys
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from polylora_async.kernels import (
    SgmvConfig,
    build_batch_meta,
    launch_config,
    lora_apply_reference_,
    lora_apply_triton_,
    lora_expand_,
    lora_shrink,
)
from polylora_async.kernels.sgmv import DECODE_MAX_TOKENS_PER_ROW

from benchmarks.bench_kernels import CASES, BenchCase, BufferSet, make_sets, measure_copy_bandwidth

Candidate = tuple[str, str, SgmvConfig | None]  # (label, kind: fused | shrink | expand, config)


def _fused(bm: int, bk: int, bn: int, n_tiles: int, warps: int, stages: int) -> SgmvConfig:
    return SgmvConfig(bm, bk, bn, 16, 1, warps, stages, n_tiles)


def candidates(case: BenchCase) -> list[Candidate]:
    decode = case.tokens <= DECODE_MAX_TOKENS_PER_ROW
    dtype = torch.bfloat16
    table = {
        op: launch_config(op, decode, dtype, case.in_features if op == "shrink" else case.out_features, case.rank)
        for op in ("fused", "shrink", "expand")
    }
    out: list[Candidate] = [("*fused", "fused", table["fused"]), ("*shrink", "shrink", table["shrink"])]
    out += [("*expand", "expand", table["expand"])]
    if decode:
        fused = [
            (16, 256, 256, 8, 4, 3), (16, 512, 256, 8, 4, 3), (16, 512, 256, 16, 4, 3), (16, 256, 256, 2, 4, 3),
            (16, 512, 256, 4, 8, 3), (16, 128, 256, 4, 4, 4), (16, 1024, 256, 8, 8, 2), (16, 256, 128, 4, 4, 3),
            (16, 512, 512, 4, 8, 3), (16, 256, 256, 16, 4, 3), (16, 512, 256, 2, 4, 3),
        ]  # fmt: skip
        shrink = [(16, 256, 8, 4, 2), (16, 128, 16, 4, 3), (16, 256, 4, 4, 3), (16, 512, 8, 4, 1), (16, 64, 16, 4, 3)]
        expand = [(16, 128, 1, 4, 2), (16, 256, 2, 4, 2), (16, 512, 1, 4, 2), (16, 256, 4, 4, 2), (16, 128, 2, 4, 3)]
    else:
        fused = [
            (32, 128, 256, 0, 4, 3), (64, 128, 128, 0, 4, 3), (64, 128, 128, 0, 8, 3), (64, 64, 256, 0, 8, 3),
            (16, 128, 256, 0, 4, 3), (32, 128, 128, 0, 8, 4), (64, 128, 256, 0, 8, 3), (32, 128, 128, 16, 4, 3),
            (128, 64, 128, 0, 8, 3), (32, 64, 128, 0, 4, 4), (16, 256, 128, 0, 4, 3),
        ]  # fmt: skip
        shrink = [(64, 128, 1, 4, 4), (128, 128, 2, 8, 3)]
        expand = [
            (32, 128, 8, 4, 2), (64, 128, 4, 4, 2), (64, 128, 16, 4, 2), (64, 256, 4, 8, 2), (32, 256, 4, 4, 2),
            (128, 128, 8, 8, 2), (64, 128, 0, 4, 2),
        ]  # fmt: skip
    out += [(f"fused {c}", "fused", _fused(*c)) for c in fused]
    out += [(f"shrink {c}", "shrink", SgmvConfig(c[0], c[1], 0, 16, c[2], c[3], c[4])) for c in shrink]
    out += [(f"expand {c}", "expand", SgmvConfig(c[0], 0, c[1], 16, 1, c[3], c[4], c[2])) for c in expand]
    return out


class Bench:
    """One case's inputs and the callables that run each candidate on one buffer set."""

    def __init__(self, case: BenchCase, max_sets: int | None) -> None:
        self.case = case
        self.slots = case.adapters + 1
        self.sets = make_sets(case, self.slots, max_sets)
        self.ranks = torch.full((self.slots,), case.rank, dtype=torch.int32, device="cuda")
        self.ranks[0] = 0
        self.scales = torch.full((self.slots,), 2.0, dtype=torch.float32, device="cuda")
        self.rows = [1 + i % case.adapters for i in range(case.rows)]
        self.meta = build_batch_meta(self.rows, "cuda")
        for s in self.sets:
            s.t = lora_shrink(s.x, s.a_stack, self.ranks, self.meta)

    def body(self, kind: str, cfg: SgmvConfig | None) -> Callable[[BufferSet], object]:
        ranks, scales, meta = self.ranks, self.scales, self.meta
        if kind == "fused":
            return lambda s: lora_apply_triton_(s.y, s.x, s.a_stack, s.b_stack, ranks, scales, meta, fused_config=cfg)
        if kind == "shrink":
            return lambda s: lora_shrink(s.x, s.a_stack, ranks, meta, config=cfg)
        if kind == "expand":
            return lambda s: lora_expand_(s.y, s.t, s.b_stack, ranks, scales, meta, config=cfg)
        raise ValueError(kind)

    def error(self, kind: str, cfg: SgmvConfig | None) -> float | None:
        """Relative error of the update vs the fp64 reference (None for a half on its own)."""
        if kind != "fused":
            return None
        s = self.sets[0]
        y0 = torch.randn_like(s.y)
        y = y0.clone()
        saved, s.y = s.y, y
        try:
            self.body(kind, cfg)(s)
        finally:
            s.y = saved
        ref = y0.double()
        lora_apply_reference_(
            ref, s.x.double(), s.a_stack.double(), s.b_stack.double(), self.ranks, self.scales, self.meta
        )
        delta, delta_ref = y.double() - y0.double(), ref - y0.double()
        return float((delta - delta_ref).norm() / delta_ref.norm())

    def bytes_moved(self, kind: str) -> int:
        c = self.case
        distinct = len(set(self.rows))
        x_bytes = c.rows * c.tokens * c.in_features * 2
        y_bytes = c.rows * c.tokens * c.out_features * 2
        a_bytes = distinct * c.rank * c.in_features * 2
        b_bytes = distinct * c.rank * c.out_features * 2
        if kind == "shrink":
            return x_bytes + a_bytes
        if kind == "expand":
            return 2 * y_bytes + b_bytes
        return x_bytes + 2 * y_bytes + a_bytes + b_bytes


def _compile_worker(jobs: list[tuple[str, str, SgmvConfig | None]]) -> list[str]:
    """Run each (case, kind, config) once, so triton compiles it into its on-disk cache."""
    problems = []
    by_case: dict[str, Bench] = {}
    for case_name, kind, cfg in jobs:
        case = next(c for c in CASES if c.name == case_name)
        try:
            bench = by_case.setdefault(case_name, Bench(case, 1))
            bench.body(kind, cfg)(bench.sets[0])
            torch.cuda.synchronize()
        except Exception as exc:  # a config the compiler rejects (e.g. shared memory)
            problems.append(f"{case_name} {kind} {cfg}: {type(exc).__name__}: {str(exc)[:120]}")
    return problems


def precompile(cases: list[BenchCase], jobs: int) -> None:
    work = [(case.name, kind, cfg) for case in cases for _, kind, cfg in candidates(case)]
    chunks = [work[i::jobs] for i in range(jobs)]
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        for problems in pool.map(_compile_worker, chunks):
            for p in problems:
                print(f"  compile: {p}")
    print(f"precompiled {len(work)} launches in {jobs} processes: {time.perf_counter() - t0:.1f} s", flush=True)


def _time(fn: Callable[[], object], rep: int) -> float:
    import triton.testing

    return float(triton.testing.do_bench_cudagraph(fn, rep=rep, return_mode="median"))


def sweep_case(case: BenchCase, copy_bw: float, rep: int) -> list[dict[str, Any]]:
    bench = Bench(case, None)
    rows = []
    for label, kind, cfg in candidates(case):
        entry: dict[str, Any] = {"case": case.name, "label": label, "kind": kind, "config": cfg and cfg.__dict__}
        try:
            entry["rel_error"] = bench.error(kind, cfg)
            if entry["rel_error"] is not None and not entry["rel_error"] <= 1.5e-2:
                entry["status"] = "WRONG"
                rows.append(entry)
                continue
            order = itertools.cycle(bench.sets)
            body = bench.body(kind, cfg)
            ms = _time(lambda body=body, order=order: body(next(order)), rep)
        except Exception as exc:
            entry["status"] = f"{type(exc).__name__}: {str(exc)[:100]}"
            rows.append(entry)
            continue
        entry["us"] = ms * 1e3
        entry["bw_share"] = bench.bytes_moved(kind) / (ms * 1e-3) / copy_bw
        rows.append(entry)
    del bench
    torch.cuda.empty_cache()
    return rows


def print_case(rows: list[dict[str, Any]]) -> None:
    case = rows[0]["case"]
    print(f"--- {case}")
    for kind in ("fused", "shrink", "expand"):
        ok = sorted((r for r in rows if r["kind"] == kind and "us" in r), key=lambda r: r["us"])
        for r in ok[:4]:
            err = f"{r['rel_error']:.1e}" if r.get("rel_error") is not None else "-"
            print(f"  {r['label']:<40} {r['us']:8.1f} us  bw {r['bw_share']:.2f}  err {err}")
        table = [r for r in rows if r["kind"] == kind and r["label"].startswith("*") and "us" in r]
        if table and ok and table[0] not in ok[:4]:
            print(f"  {table[0]['label']:<40} {table[0]['us']:8.1f} us  (table entry)")
    for r in rows:
        if "status" in r:
            print(f"  {r['label']:<40} {r['status']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--case", action="append", choices=[c.name for c in CASES])
    parser.add_argument("--jobs", type=int, default=8, help="compile processes (0: compile while timing)")
    parser.add_argument("--rep", type=int, default=40, help="ms of graph replays per candidate")
    parser.add_argument("--host", action="store_true", help="also the host cost per call")
    parser.add_argument("--host-only", action="store_true", help="only the host cost per call")
    args = parser.parse_args()
    cases = [] if args.host_only else [c for c in CASES if not args.case or c.name in args.case]
    if args.jobs > 0 and cases:
        try:
            precompile(cases, args.jobs)
        except Exception as exc:  # the timing below compiles what is missing, only slower
            print(f"precompile failed ({type(exc).__name__}: {exc}); compiling while timing", flush=True)
    copy_bw = measure_copy_bandwidth(quick=True) if cases else float("nan")
    if cases:
        print(f"copy bandwidth {copy_bw / 1e12:.2f} TB/s")
    results: dict[str, Any] = {"copy_bandwidth": copy_bw, "rows": []}
    for case in cases:
        rows = sweep_case(case, copy_bw, args.rep)
        print_case(rows)
        results["rows"] += rows
    if args.host or args.host_only:
        from benchmarks.bench_kernels import measure_host, print_host

        results["host_us_per_call"] = measure_host()
        print_host(results["host_us_per_call"])
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
