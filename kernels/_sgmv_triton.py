"""Triton SGMV kernels: the multi-LoRA shrink (``t = x @ A^T``) and expand (``y += s * t @ B``).

Private: runtime code calls the host functions in :mod:`.sgmv`, never ``kernel[grid]``.

Work decomposition (shared by both kernels)
-------------------------------------------
The batch metadata groups rows by slot into *segments* (:mod:`.metadata`). A segment's tokens
(``count * T`` of them, rows in ``sorted_rows`` order, tokens in order) are cut into tiles of
``BLOCK_M`` tokens; tile ``i`` of segment ``s`` is one program along grid axis 0. Every program of one
tile uses ONE adapter, so its A (or B) tile is loaded once for ``BLOCK_M`` tokens instead of once per
row -- that is what makes many rows sharing a few adapters cheap, and it degenerates gracefully to one
tile per row when every row has its own adapter (decode with 64 adapters).

The tile -> segment map depends on ``T`` and ``BLOCK_M`` (different per layer), so it is not stored:
each program recomputes it from the ``[B]`` segment sizes with a prefix sum (``_locate_tile``:
one ``[BLOCK_S]`` int load from L2 and a cumsum; negligible next to the tile's HBM traffic). The
grid size is an upper bound that depends only on ``B``, ``T`` and the number of slots, never on which
slot each row uses, so the launch needs no device values and a CUDA graph captured for a batch shape
stays valid after the metadata is refilled in place. Programs past the real tile count exit at once.

Rank handling: ``ranks`` is a per-layer device table, so the true rank is only known on the device.
A program whose slot has rank 0 does nothing and stores nothing (base rows are in no segment at all),
which keeps those rows of ``y`` bit-identical. Loads along the rank dimension are masked to the true
rank, and the rank loops run ``range(0, rank, BLOCK_R)``, so a rank-8 adapter in a max-rank-64 stack
moves 8 rows of A/B, not 64.

Interpreter: bf16 ``tl.dot`` is wrong under ``TRITON_INTERPRET=1`` (it multiplies raw bits), so the
host passes ``UPCAST_DOT=True`` only there and the shrink casts its tiles to fp32 before the dot.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.runtime.jit import JITFunction


@triton.jit
def _locate_tile(
    seg_counts_ptr,
    num_rows,
    tokens_per_row,
    pid_m,
    BLOCK_M: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """Map program ``pid_m`` to (segment, tile index in it, tokens in the segment, valid)."""
    offs_s = tl.arange(0, BLOCK_S)
    counts = tl.load(seg_counts_ptr + offs_s, mask=offs_s < num_rows, other=0).to(tl.int64)
    seg_tokens_all = counts * tokens_per_row
    tiles = (seg_tokens_all + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(tiles, 0)
    valid = pid_m < tl.sum(tiles, 0)
    # Segment index = number of segments that end at or before this tile.
    seg = tl.sum((ends <= pid_m).to(tl.int32), 0)
    seg = tl.where(valid, seg, 0)
    first_tile = tl.sum(tl.where(offs_s < seg, tiles, 0), 0)
    seg_tokens = tl.sum(tl.where(offs_s == seg, seg_tokens_all, 0), 0)
    return seg, pid_m - first_tile, seg_tokens, valid


@triton.jit
def _sgmv_shrink_kernel(
    # Pointers
    x_ptr,  # [B, T, in]
    a_ptr,  # [slots, max_rank, in]
    t_ptr,  # [split_k, B*T, max_rank] fp32, token rows in segment order
    ranks_ptr,  # [slots] int32
    sorted_rows_ptr,  # [B] int32
    seg_slots_ptr,  # [B] int32
    seg_starts_ptr,  # [B] int32
    seg_counts_ptr,  # [B] int32
    # Sizes
    num_rows,
    tokens_per_row,
    in_features,
    k_per_split,
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
    pid_m = tl.program_id(0).to(tl.int64)
    pid_k = tl.program_id(1).to(tl.int64)
    seg, tile, seg_tokens, valid = _locate_tile(seg_counts_ptr, num_rows, tokens_per_row, pid_m, BLOCK_M, BLOCK_S)
    slot = tl.load(seg_slots_ptr + seg, mask=valid, other=0).to(tl.int64)
    # A rank above the stack's capacity means "all of it", as the reference's a_stack[s, :r] does.
    rank = tl.minimum(tl.load(ranks_ptr + slot, mask=valid, other=0), max_rank)
    if rank > 0:
        start = tl.load(seg_starts_ptr + seg, mask=valid, other=0).to(tl.int64)
        offs_i = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # token index inside the segment
        mask_m = offs_i < seg_tokens
        local_row = offs_i // tokens_per_row
        tok = offs_i - local_row * tokens_per_row
        row = tl.load(sorted_rows_ptr + start + local_row, mask=mask_m, other=0).to(tl.int64)
        x_rows = x_ptr + row * stride_x_b + tok * stride_x_t  # [BLOCK_M] row pointers (a gather)
        a_slot = a_ptr + slot * stride_a_slot
        # Segment tokens are consecutive in t: row p = start * T + offs_i.
        t_rows = t_ptr + pid_k * stride_t_split + (start * tokens_per_row + offs_i) * stride_t_m
        k_start = pid_k * k_per_split
        # BLOCK_R covers max_rank (up to 128), so this loop runs once and x is read once; it only
        # loops (re-reading x, from L2) for stacks wider than 128.
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            # k_per_split is a multiple of BLOCK_K, so splits never overlap; the last split's tail
            # (odd hidden sizes) is masked by in_features.
            for k0 in range(0, k_per_split, BLOCK_K):
                offs_k = k_start + k0 + tl.arange(0, BLOCK_K)
                mask_k = offs_k < in_features
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
            tl.store(
                t_rows[:, None] + offs_r[None, :] * stride_t_r,
                acc,
                mask=mask_m[:, None] & mask_r[None, :],
            )


@triton.jit
def _sgmv_expand_kernel(
    # Pointers
    y_ptr,  # [B, T, out], updated in place
    t_ptr,  # [split_k, B*T, max_rank] fp32, token rows in segment order
    b_ptr,  # [slots, max_rank, out]
    ranks_ptr,  # [slots] int32
    scales_ptr,  # [slots] fp32
    sorted_rows_ptr,  # [B] int32
    seg_slots_ptr,  # [B] int32
    seg_starts_ptr,  # [B] int32
    seg_counts_ptr,  # [B] int32
    # Sizes
    num_rows,
    tokens_per_row,
    out_features,
    max_rank,
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
):
    """y[row(p), tok(p), n-tile] += scale * (sum_k t[k, p, :r]) @ B[slot, :r, n-tile], one rounding."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    seg, tile, seg_tokens, valid = _locate_tile(seg_counts_ptr, num_rows, tokens_per_row, pid_m, BLOCK_M, BLOCK_S)
    slot = tl.load(seg_slots_ptr + seg, mask=valid, other=0).to(tl.int64)
    # A rank above the stack's capacity means "all of it", as the reference's a_stack[s, :r] does.
    rank = tl.minimum(tl.load(ranks_ptr + slot, mask=valid, other=0), max_rank)
    if rank > 0:
        start = tl.load(seg_starts_ptr + seg, mask=valid, other=0).to(tl.int64)
        offs_i = tile * BLOCK_M + tl.arange(0, BLOCK_M)
        mask_m = offs_i < seg_tokens
        local_row = offs_i // tokens_per_row
        tok = offs_i - local_row * tokens_per_row
        row = tl.load(sorted_rows_ptr + start + local_row, mask=mask_m, other=0).to(tl.int64)
        t_rows = t_ptr + (start * tokens_per_row + offs_i) * stride_t_m
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_n = offs_n < out_features
        b_slot = b_ptr + slot * stride_b_slot
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            mask_r = offs_r < rank
            t_tile = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            # Split-K partials of the shrink are summed here (deterministic, no atomics, no memset).
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
            # fp32 x fp32: tf32 tensor cores on the GPU (bf16 B is exact in tf32; t loses bits below
            # 2^-11, far under bf16/fp16 output rounding). The interpreter computes it in full fp32.
            acc += tl.dot(t_tile, b_tile)
        scale = tl.load(scales_ptr + slot, mask=valid, other=0.0)
        y_ptrs = (y_ptr + row * stride_y_b + tok * stride_y_t)[:, None] + offs_n[None, :] * stride_y_n
        mask = mask_m[:, None] & mask_n[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0)
        # Scale and add in fp32, round once into y's dtype (the reference's order).
        tl.store(y_ptrs, (y.to(tl.float32) + acc * scale).to(y_ptr.dtype.element_ty), mask=mask)


# @triton.jit decided interpreted vs compiled when this module was imported (TRITON_INTERPRET);
# asking the kernel object itself stays right whatever the environment says later.
INTERPRETING: bool = not isinstance(_sgmv_shrink_kernel, JITFunction)
