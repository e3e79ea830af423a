"""Tiny causal LMs (Llama, Qwen2, Mistral, GPT-2) with PEFT ``CAUSAL_LM`` adapters saved by PEFT.

Shared by the generation tests (CPU and GPU). The oracle for a sequence is PEFT's own
``generate`` on that prompt alone, with the same adapter.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

from tests._models import write_peft_adapters

VOCAB = 101
PAD = 0
# family -> LoRA targets
FAMILIES: dict[str, list[str]] = {
    "llama": ["q_proj", "v_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "o_proj"],
    "mistral": ["v_proj", "gate_proj", "up_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
}


def build(family: str, seed: int = 0) -> nn.Module:
    import transformers as tf

    torch.manual_seed(seed)
    small: dict[str, Any] = {
        "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "pad_token_id": PAD,
        "bos_token_id": None, "eos_token_id": None,  # no stop token: sequences run to max_new_tokens unless given one
    }  # fmt: skip
    if family == "llama":
        model: nn.Module = tf.LlamaForCausalLM(tf.LlamaConfig(**small))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**small))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**small, sliding_window=None))
    elif family == "gpt2":
        config = tf.GPT2Config(
            vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0,
            attn_pdrop=0.0, pad_token_id=PAD, bos_token_id=None, eos_token_id=None,
        )  # fmt: skip
        model = tf.GPT2LMHeadModel(config)
    else:
        raise ValueError(family)
    return model.eval()


@dataclass
class CausalSet:
    family: str
    base: nn.Module
    paths: dict[str, Path]
    peft: Any

    def generate(self, adapter: str, prompt: torch.Tensor, **kwargs: Any) -> list[int]:
        """PEFT's own generation for one prompt alone (``[P]`` int64); the new tokens only."""
        batched = {"input_ids": prompt[None], "attention_mask": torch.ones(1, len(prompt), dtype=torch.long)}
        with torch.no_grad():
            if adapter == "__base__":
                with self.peft.disable_adapter():
                    out = self.peft.generate(**batched, pad_token_id=PAD, **kwargs)
            else:
                self.peft.set_adapter(adapter)
                out = self.peft.generate(**batched, pad_token_id=PAD, **kwargs)
        return [int(t) for t in out[0, len(prompt) :]]


def save_adapters(
    family: str, ranks: dict[str, int], root: Path, seed: int = 1, targets: dict[str, list[str]] | None = None
) -> CausalSet:
    """One PEFT ``CAUSAL_LM`` LoRA adapter per name (random non-zero A and B), saved by PEFT.

    Each covers the family's targets, or ``targets[name]`` (a subset) where given.
    """
    base = build(family)
    specs = {
        name: {
            "r": r, "lora_alpha": 2 * r, "target_modules": (targets or {}).get(name, FAMILIES[family]),
            "task_type": "CAUSAL_LM", "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D layers
        }
        for name, r in ranks.items()
    }  # fmt: skip
    paths, oracle = write_peft_adapters(base, specs, root, seed)
    return CausalSet(family, base, paths, oracle)


def prompts(lengths: list[int], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, VOCAB, (n,), generator=g) for n in lengths]
