"""Per-batch metadata shared by every LoRA layer of one forward pass.

Built once per batch on the host from the rows' slot numbers (host integers, so building it never
waits on the device), uploaded once, and then read by every layer's kernels.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoraBatchMeta:
    """Which GPU slot serves each row of a batch.

    Attributes:
        num_rows: rows in the batch (``B``).
        row_slots: ``[B]`` int32 on the batch's device; slot 0 is the base model (no LoRA).
        row_slots_host: the same numbers as a tuple, for host-side decisions that must not sync.
        any_lora: False when every row is a base row, so layers can skip LoRA work entirely.
        distinct_slots: the distinct non-base slots in the batch, in first-seen order.
    """

    num_rows: int
    row_slots: torch.Tensor
    row_slots_host: tuple[int, ...]
    any_lora: bool
    distinct_slots: tuple[int, ...]


def build_batch_meta(row_slots: Sequence[int], device: torch.device | str) -> LoraBatchMeta:
    """Build the metadata for one batch.

    Args:
        row_slots: the slot of each row (0 for a base row).
        device: where the batch's activations live.
    """
    host = tuple(int(s) for s in row_slots)
    if not host:
        raise ValueError("a batch needs at least one row")
    if min(host) < 0:
        raise ValueError(f"slot numbers must be >= 0, got {min(host)}")
    distinct = tuple(dict.fromkeys(s for s in host if s != 0))
    slots = torch.tensor(host, dtype=torch.int32, device=device)
    return LoraBatchMeta(
        num_rows=len(host),
        row_slots=slots,
        row_slots_host=host,
        any_lora=bool(distinct),
        distinct_slots=distinct,
    )
