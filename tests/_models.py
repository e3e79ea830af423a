"""Tiny transformers models built from configs, PEFT adapters saved by PEFT, and padded batches.

Imported by test modules (``from tests._models import ...``); the pytest fixtures over them are in
tests/conftest.py.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEBERTA_TARGETS = ["query_proj", "key_proj", "value_proj", "dense"]


def tiny_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=128,
    )
    return LlamaModel(config).eval()


def tiny_deberta_v3(seed: int = 0) -> nn.Module:
    from transformers import DebertaV2Config, DebertaV2Model

    torch.manual_seed(seed)
    config = DebertaV2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        vocab_size=101,
        max_position_embeddings=128,
        relative_attention=True,
        pos_att_type=["p2c", "c2p"],
        share_att_key=True,
        position_buckets=16,
        max_relative_positions=-1,
        norm_rel_ebd="layer_norm",
        type_vocab_size=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return DebertaV2Model(config).eval()


@dataclass
class AdapterSet:
    """A base model, adapters saved to disk by PEFT, and a PeftModel holding all of them (the oracle)."""

    base: nn.Module
    paths: dict[str, Path]
    peft: nn.Module

    def solo(self, adapter: str, **inputs: torch.Tensor) -> torch.Tensor:
        """One row alone through PEFT with its adapter (or the base model)."""
        with torch.no_grad():
            if adapter == "__base__":
                with self.peft.disable_adapter():
                    return self.peft(**inputs).last_hidden_state
            self.peft.set_adapter(adapter)
            return self.peft(**inputs).last_hidden_state


def write_peft_adapters(
    base: nn.Module, specs: dict[str, dict[str, Any]], root: Path, seed: int = 1
) -> tuple[dict[str, Path], Any]:
    """One PEFT LoRA adapter per spec (``LoraConfig`` fields; random, clearly non-zero A and B), each
    saved by ``save_pretrained`` under ``root``; returns the paths and one PeftModel holding them all."""
    from peft import LoraConfig, PeftModel, get_peft_model

    paths = {}
    for i, (name, spec) in enumerate(specs.items()):
        torch.manual_seed(seed + i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **spec))
        with torch.no_grad():  # distinct per adapter
            for n, p in peft_model.named_parameters():
                if "lora_" in n:
                    p.normal_(0.0, 0.3)
        paths[name] = root / name
        peft_model.save_pretrained(str(paths[name]))
    names = list(specs)
    oracle = PeftModel.from_pretrained(copy.deepcopy(base), str(paths[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        oracle.load_adapter(str(paths[name]), adapter_name=name)
    return paths, oracle.eval()


def save_peft_adapters(base: nn.Module, specs: dict[str, dict[str, Any]], root: Path, seed: int = 1) -> AdapterSet:
    """PEFT adapters for ``base`` (see :func:`write_peft_adapters`) with the solo-run oracle."""
    paths, oracle = write_peft_adapters(base, specs, root, seed)
    return AdapterSet(base=base, paths=paths, peft=oracle)


LLAMA_ADAPTERS: dict[str, dict[str, object]] = {
    "qv-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]},
    "all-r8-rslora": {"r": 8, "lora_alpha": 16, "use_rslora": True, "target_modules": LLAMA_TARGETS},
    "patterns": {
        "r": 2,
        "lora_alpha": 4,
        "target_modules": r".*\.(k_proj|o_proj|down_proj)",
        "rank_pattern": {"k_proj": 6},
        "alpha_pattern": {"o_proj": 3},
    },
}

DEBERTA_ADAPTERS: dict[str, dict[str, object]] = {
    "qk-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["query_proj", "key_proj"]},
    "all-r8": {"r": 8, "lora_alpha": 16, "target_modules": DEBERTA_TARGETS},
    "vd-r2": {"r": 2, "lora_alpha": 2, "target_modules": ["value_proj", "dense"], "rank_pattern": {"dense": 3}},
}


def padded_batch(
    lengths: list[int], pad_id: int = 0, vocab: int = 101, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded random token ids (real tokens never equal ``pad_id``) and the attention mask."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(pad_id + 1, vocab, (n,), generator=g)
        mask[i, :n] = 1
    return ids, mask
