"""Triton SGMV kernels: the fused multi-LoRA update, and its two halves (shrink ``t = x @ A^T``, expand
``y += s * t @ B``) for stacks wider than one rank tile and for tuning.

Private: runtime code calls the host functions in :mod:`.sgmv`, never ``kernel[grid]``.

Work decomposition (shared by every kernel)
-------------------------------------------
The batch metadata groups rows by slot into *segments* (:mod:`.metadata`). A segment's tokens
(``count * T`` of them, rows in ``sorted_rows`` order, tokens in order) are cut into tiles of
``BLOCK_M`` tokens. Every program of one tile uses ONE adapter, so its A (or B) tile is loaded once
for ``BLOCK_M`` tokens instead of once per row -- that is what makes many rows sharing a few adapters
cheap, and it degenerates gracefully to one tile per row when every row has its own adapter.

The grid is 1-D: program ``pid`` works on token tile ``pid // GROUPS`` and on the ``pid % GROUPS``-th
group of output columns (the shrink: of split-K chunks), so the programs that share a tile's inputs
run next to each other and the second one reads them from L2.

The tile -> segment map depends on ``T`` and ``BLOCK_M`` (different per layer), so it is not stored:
each program recomputes it from the ``[B]`` segment sizes with a prefix sum (:func:`_segment_tile`).
All of its inputs come from ONE load of two rows of the metadata buffer, the slot's rank and the
tile's row numbers from a second (independent) round of loads, so the data loads start after two
L2 round trips (the first version needed five dependent ones; at decode sizes, where each program
moves only a few KiB, that chain was most of the kernel's time). The grid size is an upper bound
that depends only on ``B``, ``T``, the slot count and the shapes, never on which slot each row uses,
so launches need no device values and a CUDA graph captured for a batch shape stays valid after the
metadata is refilled in place. Programs past the real tile count exit at once.

Rank handling: ``ranks`` is a per-layer device table, so the true rank is only known on the device.
A program whose slot has rank 0 does nothing and stores nothing (base rows are in no segment at all),
which keeps those rows of ``y`` bit-identical. Loads along the rank dimension are masked to the true
rank, so a rank-8 adapter in a max-rank-64 stack moves 8 rows of A/B, not 64.

Streaming ``y``: the expand loops over ``BLOCK_N``-wide tiles of its column group and loads the
NEXT tile of ``y`` before it computes the current one, so a ``y`` load is always in flight while the
program waits on B and the MMA (the one-tile-per-program version waited for each ``y`` load after
its chain of metadata loads, reaching ~40% of copy bandwidth at prefill sizes).

Interpreter: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1`` (it multiplies raw bits), so the
host passes ``UPCAST_DOT=True`` only there and the shrink casts its tiles to fp32 before the dot.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction

# Rows of the [5, B] int32 metadata buffer (see .metadata): sorted_rows, segment_slots, segment_counts.
_META_SORTED_ROWS = tl.constexpr(1)
_META_SEGMENT_SLOTS = tl.constexpr(2)
_META_SEGMENT_COUNTS = tl.constexpr(4)


@triton.jit
def _segment_tile(
    meta_ptr,
    ranks_ptr,
    num_rows,
    tokens_per_row,
    max_rank,
    pid_m,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Map token tile ``pid_m`` to its slot, rank, rows and tokens.

    Returns (slot, rank, row, tok, mask_m, offs_p): ``row``/``tok`` are the ``[BLOCK_M]`` batch row
    and token of each tile position, ``mask_m`` says which positions exist, ``offs_p`` is each
    position's row in the segment-ordered intermediate ``t`` (the segment's tokens are consecutive
    there); ``rank`` is 0 for programs past the last tile (and for rank-0 slots), which then do
    nothing.
    """
    offs_s = tl.arange(0, BLOCK_S)
    mask_s = offs_s < num_rows
    # One round trip: both rows of the metadata buffer the prefix sum needs.
    counts = tl.load(meta_ptr + _META_SEGMENT_COUNTS * num_rows + offs_s, mask=mask_s, other=0).to(tl.int64)
    slots = tl.load(meta_ptr + _META_SEGMENT_SLOTS * num_rows + offs_s, mask=mask_s, other=0)
    seg_tokens_all = counts * tokens_per_row
    tiles = (seg_tokens_all + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    valid = pid_m < tl.sum(tiles, 0)
    # Segment index = number of segments that end at or before this tile.
    seg = tl.sum((ends <= pid_m).to(tl.int32), 0)
    before = offs_s < seg
    this = offs_s == seg
    first_tile = tl.sum(tl.where(before, tiles, 0), 0)
    # Segments are consecutive in sorted_rows: a segment starts after the rows of those before it.
    start = tl.sum(tl.where(before, counts, 0), 0)
    seg_tokens = tl.sum(tl.where(this, seg_tokens_all, 0), 0)
    slot = tl.sum(tl.where(this, slots, 0), 0).to(tl.int64)
    offs_i = (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)  # token index inside the segment
    # Past the last tile seg == BLOCK_S, so seg_tokens == 0 and no position exists.
    mask_m = offs_i < seg_tokens
    local_row = offs_i // tokens_per_row
    tok = offs_i - local_row * tokens_per_row
    # Second round trip, two independent loads: the slot's rank and the tile's rows.
    rank = tl.load(ranks_ptr + slot, mask=valid, other=0)
    row = tl.load(meta_ptr + _META_SORTED_ROWS * num_rows + start + local_row, mask=mask_m, other=0).to(tl.int64)
    # A rank above the stack's capacity means "all of it", as the reference's a_stack[s, :r] does.
    rank = tl.minimum(rank, max_rank)
    return slot, rank, row, tok, mask_m, start * tokens_per_row + offs_i


@triton.jit
def _project(
    x_rows,  # [BLOCK_M] pointers to each position's x row
    mask_m,
    a_slot,  # pointer to A[slot]
    offs_r,
    mask_r,
    k_start,
    k_stop,
    stride_x_k,
    stride_a_r,
    stride_a_k,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """sum over k in [k_start, k_stop) of x[:, k] * A[:r, k]: a [BLOCK_M, BLOCK_R] fp32 tile."""
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_start, k_stop, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < k_stop
        x_tile = tl.load(
            x_rows[:, None] + offs_k[None, :] * stride_x_k,
            mask=mask_m[:, None] & mask_k[None, :],
            other=0.0,
        )
        a_tile = tl.load(
            a_slot + offs_r[:, None] * stride_a_r + offs_k[None, :] * stride_a_k,
            mask=mask_r[:, None] & mask_k[None, :],
            other=0.0,
        )
        if UPCAST_DOT:
            x_tile = x_tile.to(tl.float32)
            a_tile = a_tile.to(tl.float32)
        acc += tl.dot(x_tile, tl.trans(a_tile))
    return acc


@triton.jit
def _load_y_tile(y_rows, mask_m, n0, n_end, stride_y_n, BLOCK_N: tl.constexpr):
    """The [BLOCK_M, BLOCK_N] tile of y at columns n0.. (masked past n_end: no memory traffic)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    return tl.load(
        y_rows[:, None] + offs_n[None, :] * stride_y_n,
        mask=mask_m[:, None] & (offs_n < n_end)[None, :],
        other=0.0,
    )


@triton.jit
def _add_projection(
    y_rows,  # [BLOCK_M] pointers to each position's y row
    y_first,  # the tile of y at n_begin, loaded by the caller as early as it could
    mask_m,
    t,  # [BLOCK_M, BLOCK_R] fp32: the positions' projections onto A (columns past the rank are 0)
    b_slot,  # pointer to B[slot]
    offs_r,
    mask_r,
    scale,
    n_begin,
    n_end,
    stride_y_n,
    stride_b_r,
    stride_b_n,
    BLOCK_N: tl.constexpr,
):
    """y[:, n_begin:n_end] = round(y + scale * t @ B[:r, n_begin:n_end]), one BLOCK_N tile at a time."""
    y_cur = y_first
    for n0 in range(n_begin, n_end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_end
        b_tile = tl.load(
            b_slot + offs_r[:, None] * stride_b_r + offs_n[None, :] * stride_b_n,
            mask=mask_r[:, None] & mask_n[None, :],
            other=0.0,
        ).to(tl.float32)
        # Issue the next tile's y load before this tile's MMA and store, so one y load is always in
        # flight while the program waits for B and the MMA.
        y_next = _load_y_tile(y_rows, mask_m, n0 + BLOCK_N, n_end, stride_y_n, BLOCK_N)
        # fp32 x fp32: tf32 tensor cores on the GPU (bf16 B is exact in tf32; t loses bits below
        # 2^-11, far under bf16/fp16 output rounding). The interpreter computes it in full fp32.
        acc = tl.dot(t, b_tile)
        # Scale and add in fp32, round once into y's dtype (the reference's order).
        tl.store(
            y_rows[:, None] + offs_n[None, :] * stride_y_n,
            (y_cur.to(tl.float32) + acc * scale).to(y_cur.dtype),
            mask=mask_m[:, None] & mask_n[None, :],
        )
        y_cur = y_next


# The row count is not specialised on (value 1, divisibility by 16): a server sees every batch size,
# and each new specialisation is a compilation of a second or more in the middle of serving; it
# only bounds masks. The per-row strides stay specialised: not specialising them (so the compiler
# cannot prove each row's 16-byte alignment) cost the Llama-shaped model +13.5% -> +21.2% on the
# H200 (GPU run of 2026-11-28, benchmarks/RESULTS.md). With the runtime's padding to multiples of 16 they keep one
# specialisation across batches.
@triton.jit(do_not_specialize=["num_rows"])
def _sgmv_fused_kernel(
    # Pointers
    y_ptr,  # [B, T, out], updated in place
    x_ptr,  # [B, T, in]
    a_ptr,  # [slots, max_rank, in]
    b_ptr,  # [slots, max_rank, out]
    ranks_ptr,  # [slots] int32
    scales_ptr,  # [slots] fp32
    meta_ptr,  # [5, B] int32 (LoraBatchMeta.device_buffer)
    # Sizes
    num_rows,
    tokens_per_row,
    in_features,
    out_features,
    max_rank,
    n_per_group,
    n_groups,
    # Strides
    stride_y_b,
    stride_y_t,
    stride_y_n,
    stride_x_b,
    stride_x_t,
    stride_x_k,
    stride_a_slot,
    stride_a_r,
    stride_a_k,
    stride_b_slot,
    stride_b_r,
    stride_b_n,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """y[row(p), tok(p), n-group] += scale * (x[row(p), tok(p)] @ A[slot, :r]^T) @ B[slot, :r, n-group].

    One program: one token tile and one group of ``n_per_group`` output columns. It reduces the whole
    ``in`` dimension itself (BLOCK_R >= max_rank, so the [BLOCK_M, BLOCK_R] projection stays in
    registers: no fp32 intermediate in memory, one launch), then streams its columns of ``y``.
    Programs of the same tile in different column groups recompute the projection, re-reading x and
    A from L2.
    """
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // n_groups
    pid_n = pid - pid_m * n_groups
    slot, rank, row, tok, mask_m, _offs_p = _segment_tile(
        meta_ptr, ranks_ptr, num_rows, tokens_per_row, max_rank, pid_m, BLOCK_M, BLOCK_S
    )
    if rank > 0:
        scale = tl.load(scales_ptr + slot)
        n_begin = pid_n * n_per_group
        n_end = tl.minimum(n_begin + n_per_group, out_features)
        # The first y tile does not depend on the projection: its load overlaps the whole K loop.
        y_rows = y_ptr + row * stride_y_b + tok * stride_y_t
        y_first = _load_y_tile(y_rows, mask_m, n_begin, n_end, stride_y_n, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        mask_r = offs_r < rank
        t = _project(
            x_ptr + row * stride_x_b + tok * stride_x_t, mask_m, a_ptr + slot * stride_a_slot, offs_r, mask_r,
            0, in_features, stride_x_k, stride_a_r, stride_a_k, BLOCK_M, BLOCK_K, BLOCK_R, UPCAST_DOT,
        )  # fmt: skip
        _add_projection(
            y_rows, y_first, mask_m, t, b_ptr + slot * stride_b_slot, offs_r, mask_r, scale, n_begin, n_end,
            stride_y_n, stride_b_r, stride_b_n, BLOCK_N,
        )  # fmt: skip


@triton.jit(do_not_specialize=["num_rows"])  # see _sgmv_fused_kernel
def _sgmv_shrink_kernel(
    # Pointers
    x_ptr,  # [B, T, in]
    a_ptr,  # [slots, max_rank, in]
    t_ptr,  # [split_k, B*T, max_rank] fp32, token rows in segment order
    ranks_ptr,  # [slots] int32
    meta_ptr,  # [5, B] int32 (LoraBatchMeta.device_buffer)
    # Sizes
    num_rows,
    tokens_per_row,
    in_features,
    k_per_split,
    split_k,
    max_rank,
    # Strides
    stride_x_b,
    stride_x_t,
    stride_x_k,
    stride_a_slot,
    stride_a_r,
    stride_a_k,
    stride_t_split,
    stride_t_m,
    stride_t_r,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
):
    """t[k_split, p, :r] = x[row(p), tok(p), k-range] @ A[slot, :r, k-range]^T for one token tile."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // split_k
    pid_k = pid - pid_m * split_k
    slot, rank, row, tok, mask_m, offs_p = _segment_tile(
        meta_ptr, ranks_ptr, num_rows, tokens_per_row, max_rank, pid_m, BLOCK_M, BLOCK_S
    )
    if rank > 0:
        t_rows = t_ptr + pid_k * stride_t_split + offs_p * stride_t_m
        k_start = pid_k * k_per_split
        k_stop = tl.minimum(k_start + k_per_split, in_features)
        x_rows = x_ptr + row * stride_x_b + tok * stride_x_t
        a_slot = a_ptr + slot * stride_a_slot
        # BLOCK_R covers max_rank (up to 128), so this loop runs once and x is read once; it only
        # loops (re-reading x, from L2) for stacks wider than 128.
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            acc = _project(
                x_rows, mask_m, a_slot, offs_r, mask_r, k_start, k_stop, stride_x_k, stride_a_r, stride_a_k,
                BLOCK_M, BLOCK_K, BLOCK_R, UPCAST_DOT,
            )  # fmt: skip
            tl.store(
                t_rows[:, None] + offs_r[None, :] * stride_t_r,
                acc,
                mask=mask_m[:, None] & mask_r[None, :],
            )


@triton.jit(do_not_specialize=["num_rows"])  # see _sgmv_fused_kernel
def _sgmv_expand_kernel(
    # Pointers
    y_ptr,  # [B, T, out], updated in place
    t_ptr,  # [split_k, B*T, max_rank] fp32, token rows in segment order
    b_ptr,  # [slots, max_rank, out]
    ranks_ptr,  # [slots] int32
    scales_ptr,  # [slots] fp32
    meta_ptr,  # [5, B] int32 (LoraBatchMeta.device_buffer)
    # Sizes
    num_rows,
    tokens_per_row,
    out_features,
    max_rank,
    n_per_group,
    n_groups,
    # Strides
    stride_y_b,
    stride_y_t,
    stride_y_n,
    stride_t_split,
    stride_t_m,
    stride_t_r,
    stride_b_slot,
    stride_b_r,
    stride_b_n,
    # Meta-parameters
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_S: tl.constexpr,
    SPLIT_K: tl.constexpr,
    ONE_RANK_TILE: tl.constexpr,
):
    """y[row(p), tok(p), n-group] += scale * (sum_k t[k, p, :r]) @ B[slot, :r, n-group], one rounding."""
    pid = tl.program_id(0).to(tl.int64)
    pid_m = pid // n_groups
    pid_n = pid - pid_m * n_groups
    slot, rank, row, tok, mask_m, offs_p = _segment_tile(
        meta_ptr, ranks_ptr, num_rows, tokens_per_row, max_rank, pid_m, BLOCK_M, BLOCK_S
    )
    if rank > 0:
        scale = tl.load(scales_ptr + slot)
        t_rows = t_ptr + offs_p * stride_t_m
        y_rows = y_ptr + row * stride_y_b + tok * stride_y_t
        b_slot = b_ptr + slot * stride_b_slot
        n_begin = pid_n * n_per_group
        n_end = tl.minimum(n_begin + n_per_group, out_features)
        if ONE_RANK_TILE:
            # max_rank <= BLOCK_R (every stack up to 128 wide): load t once, stream the column group.
            y_first = _load_y_tile(y_rows, mask_m, n_begin, n_end, stride_y_n, BLOCK_N)
            offs_r = tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            t = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            # Split-K partials of the shrink are summed here (deterministic, no atomics, no memset).
            for split in tl.static_range(SPLIT_K):
                t += tl.load(
                    t_rows[:, None] + split * stride_t_split + offs_r[None, :] * stride_t_r,
                    mask=mask_m[:, None] & mask_r[None, :],
                    other=0.0,
                )
            _add_projection(
                y_rows, y_first, mask_m, t, b_slot, offs_r, mask_r, scale, n_begin, n_end, stride_y_n,
                stride_b_r, stride_b_n, BLOCK_N,
            )  # fmt: skip
        else:
            # Wider stacks: accumulate rank tiles per column tile (t re-read from L1/L2 per tile).
            for n0 in range(n_begin, n_end, BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                mask_n = offs_n < n_end
                acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for r0 in range(0, rank, BLOCK_R):
                    offs_r = r0 + tl.arange(0, BLOCK_R)
                    mask_r = offs_r < rank
                    t_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
                    for split in tl.static_range(SPLIT_K):
                        t_tile += tl.load(
                            t_rows[:, None] + split * stride_t_split + offs_r[None, :] * stride_t_r,
                            mask=mask_m[:, None] & mask_r[None, :],
                            other=0.0,
                        )
                    b_tile = tl.load(
                        b_slot + offs_r[:, None] * stride_b_r + offs_n[None, :] * stride_b_n,
                        mask=mask_r[:, None] & mask_n[None, :],
                        other=0.0,
                    ).to(tl.float32)
                    acc += tl.dot(t_tile, b_tile)
                y_ptrs = y_rows[:, None] + offs_n[None, :] * stride_y_n
                mask = mask_m[:, None] & mask_n[None, :]
                y = tl.load(y_ptrs, mask=mask, other=0.0)
                tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y.dtype), mask=mask)


# @triton.jit decided interpreted vs compiled when this module was imported (TRITON_INTERPRET);
# asking the kernel object itself stays right whatever the environment says later.
INTERPRETING: bool = not isinstance(_sgmv_shrink_kernel, JITFunction)
