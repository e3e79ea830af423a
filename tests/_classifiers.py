"""Tiny classification models and PEFT ``SEQ_CLS`` / ``TOKEN_CLS`` adapters saved by PEFT.

Shared by tests/test_heads.py and tests/gpu/test_heads_gpu.py. A family's base model and the
reference body of every adapter share one seeded body; each label count ``k`` gets its own
``num_labels=k`` model over that body (the reference PEFT runs the adapter on).
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch
from torch import nn

from tests._models import padded_batch

VOCAB = 101

# family -> (LoRA targets, pad token id)
FAMILIES: dict[str, tuple[list[str], int]] = {
    "bert": (["query", "value"], 0),
    "roberta": (["query", "value"], 1),
    "deberta-v3": (["query_proj", "key_proj", "value_proj"], 0),
    "llama": (["q_proj", "v_proj", "down_proj"], 7),
    "bert-token": (["query", "value"], 0),
}


def build(family: str, num_labels: int, seed: int = 0) -> nn.Module:
    """The family's classifier with ``num_labels`` labels; the body depends on ``seed`` only."""
    import transformers as tf

    common: dict[str, Any] = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 40,
        "vocab_size": VOCAB,
        "max_position_embeddings": 80,
        "num_labels": num_labels,
        "pad_token_id": FAMILIES[family][1],
    }
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}
    if family == "bert":
        cls, config = tf.BertForSequenceClassification, tf.BertConfig(**common, **dropout)
    elif family == "bert-token":
        cls, config = tf.BertForTokenClassification, tf.BertConfig(**common, **dropout)
    elif family == "roberta":
        cls, config = tf.RobertaForSequenceClassification, tf.RobertaConfig(**common, **dropout)
    elif family == "deberta-v3":
        cls = tf.DebertaV2ForSequenceClassification
        config = tf.DebertaV2Config(
            **common,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pooler_dropout=0.0,
            relative_attention=True,
            pos_att_type=["p2c", "c2p"],
            share_att_key=True,
            position_buckets=16,
            max_relative_positions=-1,
            norm_rel_ebd="layer_norm",
            type_vocab_size=0,
        )
    elif family == "llama":
        cls = tf.LlamaForSequenceClassification
        config = tf.LlamaConfig(**common, num_key_value_heads=1)
    else:
        raise ValueError(family)
    # The body comes from one seeded model whatever the label count (initialisation order may
    # depend on the head's size); the head is initialised from a seed of its own.
    torch.manual_seed(seed)
    body = cls(copy.deepcopy(config).__class__(**{**config.to_dict(), "num_labels": 2}))
    torch.manual_seed(seed + 1000 + num_labels)
    model = cls(config)
    names = {"classifier", "score"}
    state = {k: v for k, v in body.state_dict().items() if k.split(".")[0] not in names}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.split(".")[0] in names for k in missing), (missing, unexpected)
    return model.eval()


@dataclass
class ClassifierSet:
    """A base classifier and PEFT adapters (with their own heads) saved by ``save_pretrained``."""

    family: str
    base: nn.Module
    paths: dict[str, Path]
    labels: dict[str, int]
    references: dict[str, nn.Module] = field(default_factory=dict)

    def solo(self, adapter: str, ids: torch.Tensor) -> torch.Tensor:
        """One row alone (no padding) through PEFT with its adapter, or through the base model."""
        mask = torch.ones_like(ids)
        with torch.no_grad():
            model = self.base if adapter == "__base__" else self.references[adapter]
            return model(input_ids=ids[None], attention_mask=mask[None]).logits[0]


def save_classifier_adapters(family: str, labels: dict[str, int], root: Path, base_labels: int = 3) -> ClassifierSet:
    """One adapter per entry of ``labels`` (name -> label count), each saved by PEFT and reloaded
    from its directory into a PeftModel over a ``num_labels=k`` model of the same body."""
    from peft import LoraConfig, PeftModel, get_peft_model

    targets = FAMILIES[family][0]
    task = "TOKEN_CLS" if family.endswith("-token") else "SEQ_CLS"
    paths: dict[str, Path] = {}
    references: dict[str, nn.Module] = {}
    for i, (name, k) in enumerate(labels.items()):
        peft_model = get_peft_model(
            build(family, k),
            LoraConfig(task_type=task, r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False),
        )
        torch.manual_seed(100 + i)  # after build(), which seeds itself
        with torch.no_grad():  # distinct LoRA factors and heads per adapter
            for n, p in peft_model.named_parameters():
                if "lora_" in n or "modules_to_save" in n:
                    p.normal_(0.0, 0.3)
        path = root / name
        peft_model.save_pretrained(str(path))
        paths[name] = path
        oracle = PeftModel.from_pretrained(build(family, k), str(path), adapter_name=name)
        oracle.set_adapter(name)
        references[name] = oracle.eval()
    return ClassifierSet(family, build(family, base_labels), paths, dict(labels), references)


def padded(lengths: list[int], pad_id: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids (real tokens never equal ``pad_id``) and the attention mask."""
    return padded_batch(lengths, pad_id, VOCAB, seed)


def wrap(cset: ClassifierSet, **config: Any) -> Any:
    """A MultiLoraModel over a copy of the base with every adapter loaded from its directory."""
    from polylora_async import MultiLoraModel, WrapConfig

    wrap_config = WrapConfig(target_modules=FAMILIES[cset.family][0], max_rank=8, **config)
    model = MultiLoraModel(copy.deepcopy(cset.base), wrap_config)
    for name, path in cset.paths.items():
        model.load_adapter(name, path)
    return model
