"""Where the multi-LoRA time goes at model level: per-variant timings and a profiler summary.

Variants on the DeBERTa-v3-base-shaped encoder (or the Llama-shaped decoder with ``--llama``):
base model, all rows one adapter (no per-row position path), mixed adapters, and mixed with host
synchronisations reported (``torch.cuda.set_sync_debug_mode``).

Run:  python benchmarks/profile_model.py [--llama] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import synthetic_adapter, time_cuda, time_host
from benchmarks.bench_model import DEBERTA_TARGETS, LLAMA_TARGETS, build_deberta, build_llama
from polylora_async import MultiLoraModel, WrapConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--llama", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device, dtype = ("cuda", torch.bfloat16) if cuda else ("cpu", torch.float32)
    timer = time_cuda if cuda else time_host
    if args.llama:
        base, targets, rows, tokens, rank = build_llama(args.quick), LLAMA_TARGETS, 32, 256, 16
    else:
        base, targets, rows, tokens, rank = build_deberta(args.quick), DEBERTA_TARGETS, 64, 128, 8
    if args.quick:
        rows, tokens = 4, 16
    base = base.to(device=device, dtype=dtype)
    plain = copy.deepcopy(base)
    model = MultiLoraModel(base, WrapConfig(targets, max_rank=rank, num_slots=16))
    shapes = {n: (s.in_features, s.out_features) for n, s in model.layer_shapes().items()}
    for i in range(16):
        model.load_adapter(f"a{i}", synthetic_adapter(shapes, rank, seed=i))
    ids = torch.randint(0, 1000, (rows, tokens), device=device)
    mask = torch.ones(rows, tokens, dtype=torch.long, device=device)
    mixed = [f"a{i % 16}" for i in range(rows)]
    warm, iters = (2, 3) if args.quick else (40, 20)
    variants = {
        "base model": lambda: plain(input_ids=ids, attention_mask=mask),
        "wrapped, base rows": lambda: model(input_ids=ids, attention_mask=mask, adapter_ids=["__base__"] * rows),
        "one adapter for all rows": lambda: model(input_ids=ids, attention_mask=mask, adapter_ids=["a3"] * rows),
        "mixed, 16 adapters": lambda: model(input_ids=ids, attention_mask=mask, adapter_ids=mixed),
    }
    with torch.inference_mode():
        for name, fn in variants.items():
            print(f"{name:28} {timer(fn, warm, iters):8.3f} ms")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                variants["mixed, 16 adapters"]()
                torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            print(f"host synchronisations in one mixed forward: {len(syncs)}")
            for line in sorted(set(syncs))[:5]:
                print("   ", line[:150])
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                variants["mixed, 16 adapters"]()
            if cuda:
                torch.cuda.synchronize()
    sort = "cuda_time_total" if cuda else "cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=18, max_name_column_width=50))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
