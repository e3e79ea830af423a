"""Quickstart: two LoRA adapters over one small Llama, served from one asyncio program.

Run ``python examples/quickstart.py``: it builds everything locally, nothing is downloaded.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the model is built from a config: never ask a hub

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaModel

from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, WrapConfig

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([1, 17, 42, 99, 7, 128, 3, 250])  # one request: a row of token ids


def build_model() -> LlamaModel:
    """A small Llama with random weights (the same weights on every call)."""
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
    )
    return LlamaModel(config).eval()


def write_adapter(path: str, rank: int, seed: int) -> str:
    """Save a random LoRA adapter with PEFT, the way a fine-tuning run would."""
    torch.manual_seed(seed)
    lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False)
    get_peft_model(build_model(), lora).save_pretrained(path)
    return path


async def main() -> dict[str, torch.Tensor]:
    with tempfile.TemporaryDirectory() as tmp:
        adapters = {
            "support": write_adapter(f"{tmp}/support", rank=4, seed=1),
            "legal": write_adapter(f"{tmp}/legal", rank=8, seed=2),
        }
        model = MultiLoraModel(build_model(), WrapConfig(TARGETS, max_rank=8, num_slots=4))
        async with Runtime(model) as runtime:
            for name, path in adapters.items():
                runtime.register_adapter(name, path)
            names = [*adapters, BASE_ADAPTER]
            # Concurrent requests for different adapters are served together: one batch, one forward pass.
            hiddens = await asyncio.gather(*(runtime.submit({"input_ids": IDS}, name) for name in names))
    outputs = dict(zip(names, hiddens, strict=True))
    for name, hidden in outputs.items():
        change = (hidden - outputs[BASE_ADAPTER]).abs().max().item()
        print(f"{name:9s} hidden state {tuple(hidden.shape)}, max change from the base model {change:.3f}")
    return outputs


if __name__ == "__main__":
    asyncio.run(main())
