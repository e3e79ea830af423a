"""Multi-LoRA kernels: batch metadata, the torch reference, and the dispatching host function."""

from __future__ import annotations

import torch

from .metadata import LoraBatchMeta, build_batch_meta
from .reference import lora_apply_reference_

__all__ = ["LoraBatchMeta", "build_batch_meta", "lora_apply_", "lora_apply_reference_"]


def lora_apply_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
) -> None:
    """Add each row's LoRA update into ``y`` in place; see :func:`lora_apply_reference_` for the math."""
    lora_apply_reference_(y, x, a_stack, b_stack, ranks, scales, meta)
