"""Per-batch metadata shared by every LoRA layer of one forward pass.

Built once per batch on the host from the rows' slot numbers (host integers, so building it never
waits on the device), uploaded once, and then read by every layer's kernels.

Besides the row -> slot map, the metadata groups rows by slot for the SGMV kernels: the rows of each
distinct non-base slot form one *segment*, so a kernel program can stream that adapter's weights once
for many tokens. All device tensors live in ONE int32 buffer of fixed size ``[5, B]`` (one upload per
batch, and :func:`build_batch_meta` with ``out=`` refills it in place so a CUDA graph captured for a
batch of ``B`` rows can be replayed with new slots).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch

# Rows of LoraBatchMeta.device_buffer.
_ROW_SLOTS, _SORTED_ROWS, _SEGMENT_SLOTS, _SEGMENT_STARTS, _SEGMENT_COUNTS = range(5)
_BUFFER_ROWS = 5


@dataclass(frozen=True)
class LoraBatchMeta:
    """Which GPU slot serves each row of a batch.

    Attributes:
        num_rows: rows in the batch (``B``).
        row_slots: ``[B]`` int32 on the batch's device; slot 0 is the base model (no LoRA).
        row_slots_host: the same numbers as a tuple, for host-side decisions that must not sync.
        any_lora: False when every row is a base row, so layers can skip LoRA work entirely.
        distinct_slots: the distinct non-base slots in the batch, in first-seen order.
        sorted_rows: ``[B]`` int32: the batch rows grouped by slot: segment 0's rows (ascending),
            then segment 1's, ..., then the base rows (which belong to no segment).
        segment_slots: ``[B]`` int32: slot of segment ``i`` (``distinct_slots[i]``); 0 past the end.
        segment_starts: ``[B]`` int32: index in ``sorted_rows`` of segment ``i``'s first row.
        segment_counts: ``[B]`` int32: rows in segment ``i``; 0 past ``num_segments``, so padded
            segments own no work and kernels can scan all ``B`` entries without knowing the count.
        segment_counts_host: the segment sizes as a tuple (``len`` = number of segments).
        max_slot: the largest slot number in the batch (host check against the slot stacks' size).
        device_buffer: ``[5, B]`` int32, the one tensor behind every device field above (rows:
            row_slots, sorted_rows, segment_slots, segment_starts, segment_counts). ``None`` only
            for metadata built by hand without the segment fields.
    """

    num_rows: int
    row_slots: torch.Tensor
    row_slots_host: tuple[int, ...]
    any_lora: bool
    distinct_slots: tuple[int, ...]
    # Segment fields, for the SGMV kernels. Defaults keep hand-built metadata (tests, the reference
    # path) working; the Triton host functions raise a clear error when they are missing.
    sorted_rows: torch.Tensor | None = None
    segment_slots: torch.Tensor | None = None
    segment_starts: torch.Tensor | None = None
    segment_counts: torch.Tensor | None = None
    segment_counts_host: tuple[int, ...] = ()
    max_slot: int = 0
    device_buffer: torch.Tensor | None = None

    @property
    def num_segments(self) -> int:
        """Distinct non-base slots in the batch (one segment each)."""
        return len(self.segment_counts_host)


def _host_slots(row_slots: Sequence[int] | torch.Tensor) -> tuple[int, ...]:
    if isinstance(row_slots, torch.Tensor):
        if row_slots.device.type != "cpu":
            # Reading a device tensor would wait for the device: the point of this metadata is not to.
            raise ValueError(
                f"`row_slots` must be host integers (a sequence or a CPU tensor), got a tensor on {row_slots.device}"
            )
        if row_slots.dim() != 1:
            raise ValueError(f"`row_slots` must be 1-D, got shape {tuple(row_slots.shape)}")
        if row_slots.dtype.is_floating_point or row_slots.dtype.is_complex or row_slots.dtype == torch.bool:
            raise ValueError(f"`row_slots` must hold integers, got dtype {row_slots.dtype}")
        return tuple(int(s) for s in row_slots.tolist())
    host = []
    for i, s in enumerate(row_slots):
        if isinstance(s, bool):
            raise ValueError(f"`row_slots[{i}]` must be an integer slot number, got {s!r}")
        try:
            host.append(operator.index(s))
        except TypeError:
            raise ValueError(f"`row_slots[{i}]` must be an integer slot number, got {s!r}") from None
    return tuple(host)


def _segment_layout(host: tuple[int, ...]) -> tuple[tuple[int, ...], list[int], tuple[int, ...]]:
    """Distinct slots, the packed ``[5 * B]`` buffer contents, and the segment sizes."""
    num_rows = len(host)
    rows_of: dict[int, list[int]] = {}
    base_rows = []
    for row, slot in enumerate(host):
        if slot == 0:
            base_rows.append(row)
        else:
            rows_of.setdefault(slot, []).append(row)
    distinct = tuple(rows_of)
    sorted_rows: list[int] = []
    starts: list[int] = []
    counts: list[int] = []
    for slot in distinct:
        starts.append(len(sorted_rows))
        counts.append(len(rows_of[slot]))
        sorted_rows.extend(rows_of[slot])
    sorted_rows.extend(base_rows)
    pad = [0] * (num_rows - len(distinct))
    # Padded segments: slot 0, start 0, count 0 -> they own no tiles in any kernel.
    packed = [*host, *sorted_rows, *distinct, *pad, *starts, *pad, *counts, *pad]
    return distinct, packed, tuple(counts)


def build_batch_meta(
    row_slots: Sequence[int] | torch.Tensor,
    device: torch.device | str,
    *,
    out: LoraBatchMeta | None = None,
) -> LoraBatchMeta:
    """Build the metadata for one batch.

    Args:
        row_slots: the slot of each row (0 for a base row): host integers (a sequence, or a CPU
            tensor).
        device: where the batch's activations live.
        out: metadata of an earlier batch with the same number of rows, built by this function.
            Its device tensors are refilled IN PLACE (one host->device copy on the current stream)
            and the returned metadata shares them. A CUDA graph that captured a call with ``out``'s
            tensors then replays correctly for the new rows. Capture with a batch that has at
            least one LoRA row: on an all-base batch (``any_lora`` False) layers skip the kernels
            on the host, so nothing would be captured.

    Returns:
        The batch's metadata.

    Raises:
        ValueError: empty batch, a slot that is not a non-negative integer, ``row_slots`` on a
            device, or an ``out`` that does not fit (different row count or device, or not built
            by this function).
    """
    host = _host_slots(row_slots)
    if not host:
        raise ValueError("a batch needs at least one row")
    if min(host) < 0:
        raise ValueError(f"slot numbers must be >= 0, got {min(host)}")
    distinct, packed, counts = _segment_layout(host)
    num_rows = len(host)
    values = torch.tensor(packed, dtype=torch.int32).view(_BUFFER_ROWS, num_rows)
    if torch.device(device).type == "cuda":
        # From pageable memory a host->device copy first waits for all queued device work; from
        # pinned memory it is queued like a kernel, so building the next batch's metadata never
        # stalls on the batch still running. (The caching host allocator keeps the pinned block
        # alive until the copy has run.)
        values = values.pin_memory()
    if out is None:
        buffer = values.to(device, non_blocking=True)
    else:
        buffer = _refill(out, values, num_rows, device)
    return LoraBatchMeta(
        num_rows=num_rows,
        row_slots=buffer[_ROW_SLOTS],
        row_slots_host=host,
        any_lora=bool(distinct),
        distinct_slots=distinct,
        sorted_rows=buffer[_SORTED_ROWS],
        segment_slots=buffer[_SEGMENT_SLOTS],
        segment_starts=buffer[_SEGMENT_STARTS],
        segment_counts=buffer[_SEGMENT_COUNTS],
        segment_counts_host=counts,
        max_slot=max(host),
        device_buffer=buffer,
    )


def _refill(out: LoraBatchMeta, values: torch.Tensor, num_rows: int, device: torch.device | str) -> torch.Tensor:
    buffer = out.device_buffer
    if buffer is None:
        raise ValueError("`out` has no device buffer: pass metadata returned by build_batch_meta")
    if out.num_rows != num_rows:
        raise ValueError(
            f"`out` holds metadata for {out.num_rows} rows, got {num_rows} rows: a refill keeps the "
            f"batch size (a captured CUDA graph's grid depends on it)"
        )
    wanted = torch.device(device)
    if wanted.type != buffer.device.type or (wanted.index is not None and wanted != buffer.device):
        raise ValueError(f"`out` lives on {buffer.device}, but `device` is {wanted}")
    buffer.copy_(values, non_blocking=True)
    return buffer
