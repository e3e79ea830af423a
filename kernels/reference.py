"""Torch reference for the multi-LoRA update: the CPU path and the oracle the Triton kernels match."""

from __future__ import annotations

import torch

from .metadata import LoraBatchMeta


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 inputs accumulate in fp64; every other dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def lora_apply_reference_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
) -> None:
    """Add each row's LoRA update into ``y``, vectorised over rows (no Python loop per row).

    Semantics: for each row b with slot s = meta.row_slots[b] and rank r = ranks[s]:
        if r > 0: y[b] += scales[s] * (x[b] @ a_stack[s, :r].T) @ b_stack[s, :r]
    accumulated in fp32 (fp64 for fp64 inputs) and rounded once into y's dtype. Rows with r == 0
    are left bit-identical. Slot rows past a slot's rank must hold zeros.
    """
    if not meta.any_lora:
        return
    acc = accumulation_dtype(y.dtype)
    slots = meta.row_slots.long()
    a = a_stack.index_select(0, slots).to(acc)  # [B, R, in]
    b = b_stack.index_select(0, slots).to(acc)  # [B, R, out]
    shrunk = torch.bmm(x.to(acc), a.transpose(1, 2))  # [B, T, R]
    delta = torch.bmm(shrunk, b) * scales.index_select(0, slots).to(acc).view(-1, 1, 1)
    active = (ranks.index_select(0, slots) > 0).view(-1, 1, 1)
    y.copy_(torch.where(active, (y.to(acc) + delta).to(y.dtype), y))
