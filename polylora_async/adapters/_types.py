"""The adapter data types: what a source holds, what a model can place in a slot, layer shapes.

Identity, raw files and validated weights stay apart: :class:`RawAdapter` is what a source holds
(a PEFT config dict and its tensors), :class:`AdapterWeights` is what the model can place into a
slot (per wrapped layer: A, B and the scale), validated against that model's layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass(frozen=True)
class RawAdapter:
    """An adapter as its source holds it, before validation against a model.

    Attributes:
        config: the PEFT ``adapter_config.json`` content.
        tensors: the state dict, keyed as PEFT saves it (``base_model.model.<path>.lora_A.weight``).
        origin: where it came from, for error messages (a path, or a description).
    """

    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    origin: str
    buffer: torch.Tensor | None = None
    """When set: a 1-D uint8 tensor that ``tensors`` are views of and that they cover exactly (a
    safetensors file's data section, read in one piece), so checks and conversions can run once
    over the whole adapter instead of once per tensor."""


@dataclass(frozen=True)
class LayerLora:
    """One layer's LoRA factors: ``delta(x) = scale * (x @ a.T) @ b.T``.

    Attributes:
        a: ``[r, in_features]``.
        b: ``[out_features, r]``.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter for one wrapped model: per wrapped layer name, its LoRA factors.

    Layers the adapter does not cover are absent (rank 0 there: no work, base output unchanged).
    """

    adapter_id: str
    layers: Mapping[str, LayerLora]
    origin: str
    nbytes: int = field(default=0)
    storage: torch.Tensor | None = None
    """When set: a 1-D tensor of the weights' dtype that every ``a`` and ``b`` (and every head
    tensor) is a view of (:func:`pack_weights`). A slot write then moves the whole adapter to the
    device in one copy."""
    heads: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    """The adapter's own copies of whole modules (``modules_to_save``): wrapped head name -> its
    state dict (keys relative to the module). Counted in :attr:`nbytes`."""

    @property
    def max_rank(self) -> int:
        return max((lora.rank for lora in self.layers.values()), default=0)


@dataclass(frozen=True)
class LayerShape:
    in_features: int
    out_features: int
    conv1d: bool = False
    """The base layer is a GPT-2 style ``Conv1D`` (weight ``[in, out]``), not an ``nn.Linear``."""
