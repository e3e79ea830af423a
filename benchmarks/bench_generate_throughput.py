"""Generation throughput at saturation: the runtime against base-model baselines, on the same requests.

``--requests`` prompts (lengths uniform in ``--prompt``), each generating ``--new`` tokens greedily
(no stop token), all submitted at once; tokens per second of wall time:

* ``hf_static``: the base model, ``generate`` in static batches of ``--batch`` (left-padded);
* ``hf_continuous``: the base model, transformers' continuous batching (``generate_batch``), where
  this transformers has it;
* ``runtime_base``: ``Runtime.generate`` for every request, all ``__base__``;
* ``runtime_mixed``: the same over ``--adapters`` adapters of rank ``--rank`` on all 7 projections,
  requests spread over them (every step mixes adapters).

The Llama-shaped model (hidden 2048, 8 layers), bf16 on CUDA; ``--quick``: a small one on the
CPU. Run:  python benchmarks/bench_generate_throughput.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks._common import synthetic_adapter
from benchmarks.bench_generate import TARGETS, build, sync
from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, WrapConfig


def requests(n: int, lengths: tuple[int, int], seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 32000) for _ in range(rng.randint(*lengths))] for _ in range(n)]


def hf_static(model: torch.nn.Module, prompts: list[list[int]], new: int, batch: int, device: str) -> float:
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync(device)
    t0 = time.perf_counter()
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=device)
        with torch.inference_mode():
            model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    sync(device)
    return len(prompts) * new / (time.perf_counter() - t0)


def hf_continuous(model: torch.nn.Module, prompts: list[list[int]], new: int, device: str) -> float | None:
    from transformers import GenerationConfig

    if not hasattr(model, "generate_batch"):
        return None
    config = GenerationConfig(max_new_tokens=new, do_sample=False, pad_token_id=0, eos_token_id=None)
    sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        model.generate_batch(inputs=prompts, generation_config=config)
    sync(device)
    return len(prompts) * new / (time.perf_counter() - t0)


async def runtime_rate(
    model: MultiLoraModel, prompts: list[list[int]], new: int, sources: dict[str, Any] | None = None
) -> float:
    """Tokens per second of ``Runtime.generate`` over every prompt at once (adapters: ``sources``, else base)."""
    config = RuntimeConfig(max_sequences=len(prompts), max_batch_tokens=1 << 20)
    adapters = list(sources) if sources else [BASE_ADAPTER]
    async with Runtime(model, config) as runtime:
        for name, source in (sources or {}).items():
            runtime.register_adapter(name, source)
            await runtime.load_adapter(name)

        async def one(i: int, prompt: list[int]) -> int:
            stream = runtime.generate(
                {"input_ids": torch.tensor(prompt)}, adapters[i % len(adapters)], max_new_tokens=new
            )
            return len([token async for token in stream])

        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        elapsed = time.perf_counter() - t0
    return sum(counts) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt", type=int, nargs=2, default=(64, 512))
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--skip-continuous", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() and not args.quick else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = build(args.quick, device, dtype)
    prompts = requests(args.requests, tuple(args.prompt))
    warm = prompts[: min(8, len(prompts))]
    hf_static(base, warm, 4, args.batch, device)  # the process's one-time set-up, outside the timings
    out: dict[str, Any] = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", **vars(args)}
    out.pop("json")
    out["hf_static_tok_s"] = hf_static(base, prompts, args.new, args.batch, device)
    out["hf_continuous_tok_s"] = None if args.skip_continuous else hf_continuous(base, prompts, args.new, device)
    model = MultiLoraModel(base, WrapConfig(TARGETS, max_rank=args.rank, num_slots=args.adapters))
    layers = {name: (layer.in_features, layer.out_features) for name, layer in model._layers.items()}
    sources = {f"a{i}": synthetic_adapter(layers, args.rank, seed=i) for i in range(args.adapters)}
    asyncio.run(runtime_rate(model, warm, 4))
    out["runtime_base_tok_s"] = asyncio.run(runtime_rate(model, prompts, args.new))
    out["runtime_mixed_tok_s"] = asyncio.run(runtime_rate(model, prompts, args.new, sources))
    for key, value in out.items():
        if key.endswith("_tok_s"):
            print(f"{key:22s} {'-' if value is None else f'{value:10.1f}'} tok/s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
