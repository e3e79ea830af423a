"""Model-level cost of multi-LoRA: base model alone vs the same model serving mixed adapters.

Cases (bf16 on CUDA):
  * Llama-shaped decoder from config (hidden 2048, intermediate 5504, 8 layers, 16 heads),
    32 rows x 256 tokens, 16 adapters of rank 16 on all 7 projections, every batch mixed;
    also HF PEFT's own mixed batch (``adapter_names=``) for scale.
  * DeBERTa-v3-base-shaped encoder (hidden 768, 12 layers, intermediate 3072, relative attention),
    64 rows x 128 tokens, 16 adapters of rank 8 on query/key/value/dense, every batch mixed.

Overhead = time(base + multi-LoRA) / time(base) - 1, medians of CUDA-event timings after warm-up
(>= 40 calls: DeBERTa's TorchScript helpers only get fast after that many).

Run:  python benchmarks/bench_model.py [--quick] [--json out.json] [--peft]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks._common import synthetic_adapter, time_cuda, time_host
from polylora_async import MultiLoraModel, WrapConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "dense"]


def build_llama(quick: bool) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaModel

    if quick:
        cfg = LlamaConfig(
            hidden_size=128,
            intermediate_size=344,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        )
    else:
        cfg = LlamaConfig(
            hidden_size=2048,
            intermediate_size=5504,
            num_hidden_layers=8,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
        )
    return LlamaModel(cfg).eval()


def build_deberta(quick: bool) -> torch.nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    size = (
        dict(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=384)
        if quick
        else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    )
    cfg = DebertaV2Config(
        **size,
        vocab_size=128100,
        max_position_embeddings=512,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        position_buckets=256,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        type_vocab_size=0,
    )
    return DebertaV2Model(cfg).eval()


def run_case(
    name: str,
    base: torch.nn.Module,
    targets: list[str],
    rows: int,
    tokens: int,
    adapters: int,
    rank: int,
    device: str,
    dtype: torch.dtype,
    warmup: int,
    iters: int,
    peft: bool,
) -> dict[str, object]:
    timer = time_cuda if device == "cuda" else time_host
    base = base.to(device=device, dtype=dtype)
    plain = copy.deepcopy(base)
    model = MultiLoraModel(base, WrapConfig(targets, max_rank=rank, num_slots=adapters))
    shapes = {n: (s.in_features, s.out_features) for n, s in model.layer_shapes().items()}
    for i in range(adapters):
        model.load_adapter(f"a{i}", synthetic_adapter(shapes, rank, seed=i))
    vocab = plain.config.vocab_size
    ids = torch.randint(0, vocab, (rows, tokens), device=device)
    mask = torch.ones(rows, tokens, dtype=torch.long, device=device)
    mixed = [f"a{i % adapters}" for i in range(rows)]
    result: dict[str, object] = {"case": name, "rows": rows, "tokens": tokens, "adapters": adapters, "rank": rank}
    with torch.inference_mode():
        result["base_ms"] = timer(lambda: plain(input_ids=ids, attention_mask=mask), warmup, iters)
        result["multi_lora_ms"] = timer(
            lambda: model(input_ids=ids, attention_mask=mask, adapter_ids=mixed), warmup, iters
        )
        result["base_rows_through_wrapper_ms"] = timer(
            lambda: model(input_ids=ids, attention_mask=mask, adapter_ids=["__base__"] * rows), warmup, iters
        )
        if peft:
            result["peft_mixed_ms"] = _peft_mixed(
                plain, targets, shapes, rows, adapters, rank, ids, mask, timer, warmup, iters
            )
    result["overhead_pct"] = 100.0 * (float(result["multi_lora_ms"]) / float(result["base_ms"]) - 1)  # type: ignore[arg-type]
    if "peft_mixed_ms" in result:
        result["peft_overhead_pct"] = 100.0 * (float(result["peft_mixed_ms"]) / float(result["base_ms"]) - 1)  # type: ignore[arg-type]
    result["split_batches"] = model.split_batches

    return result


def _peft_mixed(plain, targets, shapes, rows, adapters, rank, ids, mask, timer, warmup, iters):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(
        copy.deepcopy(plain), LoraConfig(r=rank, lora_alpha=16, target_modules=targets), adapter_name="a0"
    )
    for i in range(adapters):
        if i:
            peft_model.add_adapter(f"a{i}", LoraConfig(r=rank, lora_alpha=16, target_modules=targets))
        raw = synthetic_adapter(shapes, rank, seed=i)
        set_peft_model_state_dict(peft_model, dict(raw.tensors), adapter_name=f"a{i}")
    peft_model.to(device=ids.device, dtype=next(plain.parameters()).dtype).eval()
    names = [f"a{i % adapters}" for i in range(rows)]
    return timer(lambda: peft_model(input_ids=ids, attention_mask=mask, adapter_names=names), warmup, iters)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--json", type=Path, help="write results here")
    parser.add_argument("--peft", action="store_true", help="also time HF PEFT's mixed batch (Llama)")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=40)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    iters, warmup = (3, 2) if args.quick else (args.iters, args.warmup)
    torch.manual_seed(0)
    results = [
        run_case(
            "llama-shaped",
            build_llama(args.quick),
            LLAMA_TARGETS,
            32 if not args.quick else 4,
            256 if not args.quick else 16,
            16 if not args.quick else 4,
            16,
            device,
            dtype,
            warmup,
            iters,
            args.peft,
        ),
        run_case(
            "deberta-v3-base-shaped",
            build_deberta(args.quick),
            DEBERTA_TARGETS,
            64 if not args.quick else 4,
            128 if not args.quick else 16,
            16 if not args.quick else 4,
            8,
            device,
            dtype,
            warmup,
            iters,
            False,
        ),
    ]
    print(
        f"device={torch.cuda.get_device_name() if device == 'cuda' else 'cpu'} dtype={dtype} torch={torch.__version__}"
    )
    print(f"{'case':26} {'base ms':>9} {'multi ms':>9} {'overhead':>9} {'base-rows ms':>12} {'peft ms':>9}")
    for r in results:
        peft_ms = f"{r['peft_mixed_ms']:9.3f}" if "peft_mixed_ms" in r else f"{'-':>9}"
        print(
            f"{r['case']:26} {r['base_ms']:9.3f} {r['multi_lora_ms']:9.3f} {r['overhead_pct']:8.1f}% "
            f"{r['base_rows_through_wrapper_ms']:12.3f} {peft_ms}"
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
