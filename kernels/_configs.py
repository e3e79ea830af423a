"""The SGMV kernels' launch-configuration table: one entry per shape class, never per live batch.

Every entry is memory-bound (rank <= 128 makes the MMAs tiny); the comments say why each was
chosen, with the sweep figures (H200, bf16, CUDA-graph replay, benchmarks/sweep_kernels.py; more
in benchmarks/notes_kernels.md).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["DECODE_MAX_TOKENS_PER_ROW", "FUSED_MAX_RANK", "SUPPORTED_DTYPES", "Op", "SgmvConfig", "launch_config"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Rows of at most this many tokens use the decode-like configs. Below 16 tokens per row a 64-token
# tile is mostly empty when adapters differ per row, and the work per adapter is too small to fill the
# GPU without splitting the reduction over `in` (split-K). 16 = the smallest tl.dot M tile.
DECODE_MAX_TOKENS_PER_ROW = 15

# The fused kernel keeps a [BLOCK_M, next_pow2(max_rank)] fp32 projection in registers; up to 128
# that costs at most 32 registers per thread at BLOCK_M=32 and 4 warps. Wider stacks use the halves.
FUSED_MAX_RANK = 128


Op = Literal["shrink", "expand", "fused"]


@dataclass(frozen=True)
class SgmvConfig:
    """Launch parameters of one SGMV kernel (one entry of :func:`launch_config`'s table).

    Attributes:
        block_m: tokens per program (>= 16, a power of two: tl.dot's smallest M tile).
        block_k: shrink and fused: reduction tile over ``in`` (>= 16 for 16-bit inputs on the GPU).
        block_n: expand and fused: tile over ``out``.
        block_r: rank tile (>= 16, a power of two); rank loops run up to the slot's true rank. The
            fused kernel needs ``block_r >= max_rank``.
        split_k: shrink only: programs sharing one tile's reduction over ``in``; the expand sums
            the partials. 1 for the expand and the fused kernel.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the inner loops.
        n_tiles: expand and fused: ``block_n`` tiles of ``out`` per program (programs of one token
            tile split ``out`` into groups of ``n_tiles * block_n`` columns); 0: all of ``out`` in
            one program.
    """

    block_m: int
    block_k: int
    block_n: int
    block_r: int
    split_k: int
    num_warps: int
    num_stages: int
    n_tiles: int = 0

    def __post_init__(self) -> None:
        for name in ("block_m", "block_k", "block_n", "block_r"):
            value = getattr(self, name)
            if value != 0 and (value < 16 or value & (value - 1)):
                raise ValueError(f"`{name}` must be 0 (unused) or a power of two >= 16, got {value}")
        for name in ("block_m", "block_r", "split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.n_tiles < 0:
            raise ValueError(f"`n_tiles` must be >= 0, got {self.n_tiles}")


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.lru_cache(maxsize=256)
def launch_config(op: Op, decode_like: bool, dtype: torch.dtype, features: int, max_rank: int) -> SgmvConfig:
    """THE launch-config table, keyed on shape class, never on the live batch size.

    Args:
        op: which kernel: ``"fused"`` (what :func:`lora_apply_triton_` runs for >= 16 tokens per
            row and stacks up to rank 128), or one of the halves ``"shrink"`` / ``"expand"``
            (decode shapes and wider stacks).
        decode_like: fewer than 16 tokens per row (see ``DECODE_MAX_TOKENS_PER_ROW``).
        dtype: the activations' dtype.
        features: ``in`` for the shrink (its reduction), ``out`` for the expand and the fused
            kernel (the columns they stream).
        max_rank: the slot stacks' rank capacity.

    Every entry is memory-bound (rank <= 128 makes the MMAs tiny). What matters is (a) few
    dependent round trips before a program's data loads, (b) enough bytes in flight per SM
    (~40 KB at 4.3 TB/s and ~1 us loaded latency), (c) reading x and y exactly once, and each
    adapter's A/B from HBM once (re-reads hit L2). Numbers: H200, bf16, CUDA-graph replay,
    benchmarks/sweep_kernels.py; see benchmarks/notes_kernels.md.
    """
    block_r = min(128, max(16, _next_pow2(max_rank)))
    wide = dtype == torch.float32  # 4-byte elements: half the tile width for the same bytes/stage
    if op == "fused":
        if decode_like:
            # Not the default at decode (see the module docstring): only for explicit use and tuning.
            # Decode 64 x 1, 4096^2, r16, 64 adapters: 18.2-18.7 us for column groups of 1024-2048.
            return SgmvConfig(
                block_m=16,
                block_k=128 if wide else 256,
                block_n=128 if wide else 256,
                block_r=block_r,
                split_k=1,
                num_warps=4,
                num_stages=3,
                n_tiles=4,
            )
        # Prefill / encoder: one program per 16-token tile streams its x rows (K loop, 256 wide) and
        # then ALL of its y columns (N loop, 128 wide, next y tile prefetched): x read once, y read +
        # written once, no intermediate in memory. Best of 12 on all three shapes swept (bf16, graph):
        # prefill 16x512 4096^2 r16: 65.6 us = 0.74 of copy bandwidth (32-token tiles: 86.6 us);
        # 64x128 768->3072 r8: 41.0 us (0.66); 64x128 3072->768: 26.5 us (0.68). More tokens per
        # tile means fewer programs (fewer loads in flight per SM) and lost to this every time.
        # Rank tiles of 64-128: half the K tile, or the A tile (block_r x block_k) alone fills the
        # registers (triton 3.6, sm_90, rank 128: 255 registers and spills at 256, none at 128).
        return SgmvConfig(
            block_m=16,
            block_k=128 if wide or block_r >= 64 else 256,
            block_n=64 if wide else 128,
            block_r=block_r,
            split_k=1,
            num_warps=4,
            num_stages=3,
            n_tiles=0,
        )
    if op == "shrink":
        if decode_like:
            # Split the `in` reduction so every program reads ~1024 columns of one A: 64 adapters x
            # split 4 -> 256 programs for in=4096. 6.0 us for 8 MiB of A (split 8 x 128: 6.1 us,
            # split 16: 7.9-9.4 us); the floor is ~2 us, the rest launch latency and the tail.
            return SgmvConfig(
                block_m=16,
                block_k=128 if wide else 256,
                block_n=0,
                block_r=block_r,
                split_k=max(1, min(4, features // 1024)),
                num_warps=4,
                num_stages=3,
            )
        # Prefill 16x512, in=4096: 20.8 us for 64 MiB of x (0.78 of copy bandwidth).
        return SgmvConfig(
            block_m=64,
            block_k=64 if wide else 128,
            block_n=0,
            block_r=block_r,
            split_k=2 if features >= 2048 else 1,
            num_warps=4,
            num_stages=3 if wide else 4,
        )
    if op == "expand":
        if decode_like:
            # 4 tiles of 256 columns per program (64 adapters x 4 groups = 256 programs): 8.4 us
            # alone for 8 MiB of B, against 11.6 us for one tile per program (1024 programs).
            return SgmvConfig(
                block_m=16,
                block_k=0,
                block_n=128 if wide else 256,
                block_r=block_r,
                split_k=1,
                num_warps=4,
                num_stages=2,
                n_tiles=4,
            )
        # 4 tiles of 256 columns per program: the metadata chain is paid once per 4 tiles and the
        # next y tile is always in flight. Prefill 52.5 us alone (64 x 128 x 8 tiles: 58.1 us).
        return SgmvConfig(
            block_m=32,
            block_k=0,
            block_n=128 if wide else 256,
            block_r=block_r,
            split_k=1,
            num_warps=4,
            num_stages=2,
            n_tiles=4,
        )
    raise ValueError(f"`op` must be 'shrink', 'expand' or 'fused', got {op!r}")
