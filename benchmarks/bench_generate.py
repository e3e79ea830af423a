"""Decode-step cost of generation: the runtime's running batch over mixed adapters, against the base model.

One decode step of ``--rows`` sequences (one token each, after a ``--prompt``-token prefill, KV
cache in a transformers ``DynamicCache``), timed by the host clock after a device synchronisation
(steps include their host work, which is what a decode loop pays):

* ``hf_loop``: the base model in a hand-written loop (``model(input_ids, cache)``), the floor; run
  first and again last (``hf_loop_again``, through the wrapped layers with no batch set: each
  wrapped layer then runs its base layer alone), and the last run is the floor;
* ``engine_base``: the runtime's running batch (``RunningBatch.step``), every row ``__base__``;
* ``engine_mixed``: the same with ``--adapters`` adapters of rank ``--rank`` on all 7 projections,
  rows spread over them.

The Llama-shaped model of the other benchmarks (hidden 2048, 8 layers), bf16 on CUDA; with
``--quick`` a small one (fp32 on the CPU). Run:  python benchmarks/bench_generate.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import synthetic_adapter
from polylora_async import BASE_ADAPTER, MultiLoraModel, WrapConfig
from polylora_async.runtime._decode import GenSequence, RunningBatch, SamplingParams

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build(quick: bool, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    size: dict[str, Any] = (
        {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 2, "num_attention_heads": 4}
        if quick
        else {"hidden_size": 2048, "intermediate_size": 5504, "num_hidden_layers": 8, "num_attention_heads": 16}
    )
    torch.manual_seed(0)
    config = LlamaConfig(**size, num_key_value_heads=size["num_attention_heads"], vocab_size=32000, pad_token_id=0)
    return LlamaForCausalLM(config).to(device, dtype).eval()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(step: Any, device: str, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def hf_loop(model: torch.nn.Module, rows: int, prompt: int, steps: int, device: str) -> list[float]:
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 32000, (rows, prompt), generator=g).to(device)
    cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    with torch.inference_mode():
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{cache_arg: DynamicCache()})
        state = {"cache": getattr(out, cache_arg), "next": out.logits[:, -1].argmax(-1, keepdim=True)}

        def step() -> None:
            out = model(input_ids=state["next"], use_cache=True, **{cache_arg: state["cache"]})
            state["cache"] = getattr(out, cache_arg)
            state["next"] = out.logits[:, -1].argmax(-1, keepdim=True)

        return time_steps(step, device, warmup=5, iters=steps)


def engine(model: MultiLoraModel, rows: int, prompt: int, steps: int, device: str, adapters: list[str]) -> list[float]:
    g = torch.Generator().manual_seed(1)
    batch = RunningBatch(model, 0)
    params = SamplingParams(max_new_tokens=10_000)
    seqs = [
        GenSequence(torch.randint(1, 32000, (prompt,), generator=g), model.slot_of(adapters[i % len(adapters)]), params)
        for i in range(rows)
    ]
    batch.step(seqs, [])
    return time_steps(lambda: batch.step([], []), device, warmup=5, iters=steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build(args.quick, device, dtype)
    results: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **vars(args)}
    results.pop("json")
    timings = {"hf_loop": hf_loop(base, args.rows, args.prompt, args.steps, device)}
    model = MultiLoraModel(base, WrapConfig(TARGETS, max_rank=args.rank, num_slots=args.adapters))
    layers = {name: (layer.in_features, layer.out_features) for name, layer in model._layers.items()}
    names = [f"a{i}" for i in range(args.adapters)]
    for i, name in enumerate(names):
        model.load_adapter(name, synthetic_adapter(layers, args.rank, seed=i))
    timings["engine_base"] = engine(model, args.rows, args.prompt, args.steps, device, [BASE_ADAPTER])
    timings["engine_mixed"] = engine(model, args.rows, args.prompt, args.steps, device, names)
    # Once more after the others, on the same (unwrapped) layers: the first run also pays the
    # process's one-time device set-up, which the floor must not include.
    timings["hf_loop_again"] = hf_loop(model.model, args.rows, args.prompt, args.steps, device)
    floor = statistics.median(timings["hf_loop_again"])
    for name, times in timings.items():
        median = statistics.median(times)
        results[name] = {"median_ms": median, "min_ms": min(times), "vs_floor": median / floor - 1}
        change = 100 * (median / floor - 1)
        print(f"{name:13s} {median:8.2f} ms per decode step (min {min(times):.2f})  {change:+6.1f}%")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
