"""Tiny T5 and BART encoder-decoders with PEFT LoRA adapters saved by PEFT, and their solo oracle.

Shared by tests/test_encoder_decoder.py and tests/gpu/test_encoder_decoder_gpu.py.
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
# family -> (LoRA targets, pad token id)
FAMILIES: dict[str, tuple[list[str], int]] = {
    "t5": (["q", "v", "wo"], 0),
    "bart": (["q_proj", "v_proj", "fc1"], 1),
}


def build(family: str, seed: int = 0) -> nn.Module:
    """The family's conditional-generation model, in evaluation mode."""
    import transformers as tf

    torch.manual_seed(seed)
    pad = FAMILIES[family][1]
    if family == "t5":
        config: Any = tf.T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=40, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=2,
        )  # fmt: skip
        model: nn.Module = tf.T5ForConditionalGeneration(config)
    else:
        config = tf.BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
            decoder_attention_heads=4, encoder_ffn_dim=40, decoder_ffn_dim=40, dropout=0.0, attention_dropout=0.0,
            activation_dropout=0.0, max_position_embeddings=64, pad_token_id=pad, bos_token_id=0, eos_token_id=2,
            decoder_start_token_id=2, forced_eos_token_id=None,
        )  # fmt: skip
        model = tf.BartForConditionalGeneration(config)
    return model.eval()


@dataclass
class Seq2SeqSet:
    """A base encoder-decoder, adapters saved by PEFT, and one PeftModel holding them all (the oracle)."""

    family: str
    base: nn.Module
    paths: dict[str, Path]
    peft: Any

    def solo(self, adapter: str, **inputs: torch.Tensor) -> Any:
        """One row alone (inputs without a batch axis) through PEFT with its adapter (or the base)."""
        batched = {k: v[None] for k, v in inputs.items()}
        with torch.no_grad():
            if adapter == "__base__":
                with self.peft.disable_adapter():
                    return self.peft(**batched)
            self.peft.set_adapter(adapter)
            return self.peft(**batched)


def save_adapters(family: str, ranks: dict[str, int], root: Path, seed: int = 1) -> Seq2SeqSet:
    """One PEFT ``SEQ_2_SEQ_LM`` LoRA adapter per name (random non-zero A and B), saved by PEFT."""
    base = build(family)
    specs = {
        name: {"r": r, "lora_alpha": 2 * r, "target_modules": FAMILIES[family][0], "task_type": "SEQ_2_SEQ_LM"}
        for name, r in ranks.items()
    }
    paths, oracle = write_peft_adapters(base, specs, root, seed)
    return Seq2SeqSet(family, base, paths, oracle)


def rows(plan: list[tuple[str, int, int]], pad: int, seed: int = 0) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """``(adapter, encoder length, decoder length)`` -> ``(adapter, inputs)``; decoder length 0: none given."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for adapter, n, m in plan:
        inputs = {"input_ids": torch.randint(pad + 1, VOCAB, (n,), generator=g)}
        if m:
            inputs["decoder_input_ids"] = torch.randint(pad + 1, VOCAB, (m,), generator=g)
        out.append((adapter, inputs))
    return out
