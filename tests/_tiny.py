"""A tiny per-token model and PEFT-format adapters with an fp64 reference, for runtime tests."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

VOCAB, HIDDEN, INNER = 61, 16, 24
TARGETS = ["up", "down"]


class TinyModel(nn.Module):
    """Embedding -> up -> GELU -> down, per token; optional hooks to block or fail a forward."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        self.up = nn.Linear(HIDDEN, INNER)
        self.down = nn.Linear(INNER, HIDDEN)
        self.gate: threading.Event | None = None  # when set: forward waits for it
        self.entered = threading.Event()
        self.poison_token: int | None = None  # a batch holding this token raises
        self.forwards = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.forwards += 1
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(timeout=30), "test gate never opened"
        if self.poison_token is not None and bool((input_ids == self.poison_token).any()):
            raise RuntimeError("poisoned batch")
        hidden = self.down(torch.nn.functional.gelu(self.up(self.embed(input_ids))))
        return hidden


def write_adapter(root: Path, name: str, seed: int, rank: int = 4, targets: list[str] | None = None) -> Path:
    """A LoRA adapter in PEFT's on-disk format (as ``save_pretrained`` writes it)."""
    g = torch.Generator().manual_seed(seed)
    targets = targets or TARGETS
    shapes = {"up": (HIDDEN, INNER), "down": (INNER, HIDDEN)}
    tensors = {}
    for t in targets:
        fan_in, fan_out = shapes[t]
        tensors[f"base_model.model.{t}.lora_A.weight"] = torch.randn(rank, fan_in, generator=g) * 0.3
        tensors[f"base_model.model.{t}.lora_B.weight"] = torch.randn(fan_out, rank, generator=g) * 0.3
    path = root / name
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": targets}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


def reference(model: TinyModel, adapter_dir: Path | None, ids: torch.Tensor) -> torch.Tensor:
    """fp64 output of one row alone: base weights plus scale * B @ A, computed independently."""
    from safetensors.torch import load_file

    deltas: dict[str, torch.Tensor] = {}
    if adapter_dir is not None:
        config = json.loads((adapter_dir / "adapter_config.json").read_text())
        scale = config["lora_alpha"] / config["r"]
        tensors = load_file(str(adapter_dir / "adapter_model.safetensors"))
        for t in config["target_modules"]:
            a = tensors[f"base_model.model.{t}.lora_A.weight"].double()
            b = tensors[f"base_model.model.{t}.lora_B.weight"].double()
            deltas[t] = scale * (b @ a)

    def linear(name: str, x: torch.Tensor) -> torch.Tensor:
        layer = getattr(model, name)
        base = layer.base if hasattr(layer, "base") else layer
        weight = base.weight.double() + deltas.get(name, 0)
        return x @ weight.T + base.bias.double()

    with torch.no_grad():
        x = model.embed.weight.double()[ids]
        return linear("down", torch.nn.functional.gelu(linear("up", x)))
