"""Host functions of the Triton SGMV path: check shapes, allocate, pick a launch config, launch.

Runtime code calls :func:`lora_apply_triton_` (through :func:`polylora_async.kernels.lora_apply_`);
:func:`lora_shrink` and :func:`lora_expand_` are its two halves, public for tests and benchmarks.

Nothing here reads a device value: the grid depends only on ``B``, ``T``, the tensor shapes and the
number of slots, so the calls never synchronise with the device and can be captured in a CUDA graph
for a fixed batch shape (see :func:`polylora_async.kernels.build_batch_meta` ``out=`` for refilling
the metadata in place between replays).

Importing this module does not import triton: the kernel module is imported on first use, after the
caller had its chance to set ``TRITON_INTERPRET`` (``@triton.jit`` reads it when it decorates).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import ModuleType
from typing import Literal

import torch

from .metadata import LoraBatchMeta

__all__ = [
    "SgmvConfig",
    "launch_config",
    "lora_apply_triton_",
    "lora_expand_",
    "lora_shrink",
    "triton_available",
]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Rows of at most this many tokens use the decode-like configs. Below 16 tokens per row a 64-token
# tile is mostly empty when adapters differ per row, and the work per adapter is too small to fill the
# GPU without splitting the reduction over `in` (split-K). 16 = the smallest tl.dot M tile.
DECODE_MAX_TOKENS_PER_ROW = 15


@dataclass(frozen=True)
class SgmvConfig:
    """Launch parameters of one SGMV kernel (one entry of :func:`launch_config`'s table).

    Attributes:
        block_m: tokens per program (>= 16, a power of two: tl.dot's smallest M tile).
        block_k: shrink only: reduction tile over ``in`` (>= 16 for 16-bit inputs on the GPU).
        block_n: expand only: tile over ``out``.
        block_r: rank tile (>= 16, a power of two); rank loops run up to the slot's true rank.
        split_k: shrink only: programs sharing one tile's reduction over ``in``; the expand sums
            the partials. 1 for the expand.
        num_warps: warps per program.
        num_stages: software-pipelining depth of the inner loop.
    """

    block_m: int
    block_k: int
    block_n: int
    block_r: int
    split_k: int
    num_warps: int
    num_stages: int

    def __post_init__(self) -> None:
        for name in ("block_m", "block_k", "block_n", "block_r"):
            value = getattr(self, name)
            if value != 0 and (value < 16 or value & (value - 1)):
                raise ValueError(f"`{name}` must be 0 (unused) or a power of two >= 16, got {value}")
        for name in ("block_m", "block_r", "split_k", "num_warps", "num_stages"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


def _next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(a // -b)


@functools.lru_cache(maxsize=256)
def launch_config(
    op: Literal["shrink", "expand"],
    decode_like: bool,
    dtype: torch.dtype,
    features: int,
    max_rank: int,
) -> SgmvConfig:
    """THE launch-config table, keyed on shape class, never on the live batch size.

    Args:
        op: which kernel.
        decode_like: fewer than 16 tokens per row (see ``DECODE_MAX_TOKENS_PER_ROW``).
        dtype: the activations' dtype.
        features: ``in`` for the shrink (its reduction), ``out`` for the expand (its N).
        max_rank: the slot stacks' rank capacity.

    These are PREDICTIONS for an H200 (132 SMs, ~4.3 TB/s, 50 MB L2), to be checked with
    ``benchmarks/bench_kernels.py``. Both kernels are memory-bound (rank <= 64 makes the MMAs tiny);
    what matters is (a) enough programs with enough loads in flight to saturate HBM, (b) reading x
    and y exactly once, (c) reading each adapter's A/B from HBM once (re-reads hit L2).

    Layer-level predictions (bf16, GPU time, e.g. under a CUDA graph):
      prefill 16 x 512, 4096 x 4096, r16, 16 adapters: base GEMM ~0.40 ms; LoRA floor 194 MB (x 64 +
        y 2 x 64 + adapters 4) = 45 us at copy bandwidth; expected ~55-60 us -> overhead ~14%.
      decode 64 x 1, 4096 x 4096, r16, 64 adapters: base GEMV ~9-10 us (32 MB of weight); LoRA floor
        16.8 MB (64 x A + B) = 4 us; two dependent launches add ~2 x 2 us of ramp/tail: expected
        ~6-8 us -> overhead 60-90%: the tightest target. Eager, the host side (~15 us of checks and
        two Triton launches on a slow CPU) can exceed the GPU time; serve decode under CUDA graphs.
      encoder 64 x 128, 768 x 768 / 768 x 3072, r8: LoRA floor 38 / 113 MB = 9 / 26 us vs a base GEMM
        of ~20 / ~60 us: expected overheads ~60% / ~50% (y read + write dominates).
    """
    block_r = min(128, max(16, _next_pow2(max_rank)))
    wide = dtype == torch.float32  # 4-byte elements: half the tile width for the same bytes/stage
    if op == "shrink":
        if decode_like:
            # Decode, 64 rows x 1 token, 64 adapters, in=4096, r16: the work is reading 64 A's
            # (64 x 128 KiB = 8 MiB). One program per segment = 64 programs, each streaming 128 KiB
            # serially: latency-bound on half the SMs. Split the `in` reduction so every program
            # reads ~512 columns: split 8 -> 512 programs (~4 per SM), ~16 KiB of A each.
            # Predicted ~2-3 us for the 8 MiB (HBM floor ~2 us).
            split_k = max(1, min(8, features // 512))
            return SgmvConfig(
                block_m=16,
                block_k=64 if wide else 128,
                block_n=0,
                block_r=block_r,
                split_k=split_k,
                num_warps=4,
                num_stages=3,
            )
        # Prefill, 16 x 512 tokens, in=4096: x is 64 MiB, read once. BLOCK_M=64 -> 128 tiles; split
        # 2 for in >= 2048 -> 256 programs (2 per SM) so HBM sees enough loads in flight
        # (4 stages x (64x128 bf16 x-tile + r x 128 A-tile) ~ 80 KiB per program). A (128 KiB at r16)
        # is re-read per tile from L2: 25% extra L2 traffic at r16, acceptable; BLOCK_M=128 would
        # halve that but leave 64 tiles (try it on the GPU). Predicted ~17 us (floor ~15 us).
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
            # Decode: per (segment tile, 256 outputs): B tile r x 256 (8 KiB at r16 bf16) + 1-16
            # rows of y. 64 segments x 16 N-tiles = 1024 programs for out=4096: plenty. The
            # 16-row tile is mostly masked rows when rows have distinct adapters; masked rows cost
            # no memory traffic. Predicted ~2-3 us for 64 B's (8 MiB).
            return SgmvConfig(
                block_m=16,
                block_k=0,
                block_n=128 if wide else 256,
                block_r=block_r,
                split_k=1,
                num_warps=4,
                num_stages=2,
            )
        # Prefill: y (64 MiB bf16 at 8192 x 4096) is read and written once; 64 x 128 tiles ->
        # 128 x 32 = 4096 programs, 16 KiB of y each: a copy-like kernel, predicted ~80-85% of copy
        # bandwidth (~35 us). No loop to pipeline (rank <= 128 is one iteration).
        return SgmvConfig(
            block_m=64,
            block_k=0,
            block_n=64 if wide else 128,
            block_r=block_r,
            split_k=1,
            num_warps=4,
            num_stages=2,
        )
    raise ValueError(f"`op` must be 'shrink' or 'expand', got {op!r}")


# ---------------------------------------------------------------------------------------------------
# Kernel module (imported lazily)
# ---------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _kernels() -> ModuleType | None:
    try:
        from . import _sgmv_triton
    except ImportError:
        return None
    return _sgmv_triton


def triton_available() -> bool:
    """Whether triton imports here (importing the kernel module on first call)."""
    return _kernels() is not None


def _require_kernels() -> ModuleType:
    module = _kernels()
    if module is None:
        raise RuntimeError("the Triton SGMV kernels need `triton`, which is not importable here")
    return module


# ---------------------------------------------------------------------------------------------------
# Checks (host attributes only; they never read device memory)
# ---------------------------------------------------------------------------------------------------


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def _check_meta(meta: LoraBatchMeta, device: torch.device, num_rows: int) -> torch.Tensor:
    if not isinstance(meta, LoraBatchMeta):
        raise ValueError(f"`meta` must be a LoraBatchMeta, got {type(meta).__name__}")
    buffer = meta.device_buffer
    if buffer is None:
        raise ValueError("`meta` has no segment tables: build it with build_batch_meta()")
    if buffer.device != device:
        raise ValueError(f"`meta` lives on {buffer.device}, but the activations are on {device}")
    if meta.num_rows != num_rows:
        raise ValueError(f"`meta` describes {meta.num_rows} rows, but the batch has {num_rows} rows")
    return buffer


def _check_activation(name: str, t: torch.Tensor, what: str) -> None:
    if t.dim() != 3:
        raise ValueError(f"`{name}` must be 3-D [B, T, {what}], got shape {_shape(t)}")
    if t.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"`{name}` must be float16, bfloat16 or float32, got {t.dtype}")


def _check_stack(name: str, t: torch.Tensor, dtype: torch.dtype, device: torch.device, what: str) -> None:
    if t.dim() != 3:
        raise ValueError(f"`{name}` must be 3-D [slots, max_rank, {what}], got shape {_shape(t)}")
    if t.dtype != dtype:
        raise ValueError(f"`{name}` must have the activations' dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"`{name}` must be on {device}, got {t.device}")


def _check_slot_table(name: str, t: torch.Tensor, slots: int, dtype: torch.dtype, device: torch.device) -> None:
    if t.dim() != 1 or t.shape[0] != slots:
        raise ValueError(f"`{name}` must have shape ({slots},) (one entry per slot), got {_shape(t)}")
    if t.dtype != dtype:
        raise ValueError(f"`{name}` must be {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"`{name}` must be on {device}, got {t.device}")


def _check_slots(meta: LoraBatchMeta, slots: int) -> None:
    if meta.max_slot >= slots:
        raise ValueError(f"`meta` uses slot {meta.max_slot}, but the stacks hold only {slots} slots")


def _check_shrink(x: torch.Tensor, a_stack: torch.Tensor, ranks: torch.Tensor, meta: LoraBatchMeta) -> None:
    _check_activation("x", x, "in")
    device = x.device
    _check_meta(meta, device, x.shape[0])
    _check_stack("a_stack", a_stack, x.dtype, device, "in")
    if a_stack.shape[2] != x.shape[2]:
        raise ValueError(f"`a_stack` has in={a_stack.shape[2]}, but `x` has in={x.shape[2]}")
    _check_slot_table("ranks", ranks, a_stack.shape[0], torch.int32, device)
    _check_slots(meta, a_stack.shape[0])


def _check_expand(
    y: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> None:
    _check_activation("y", y, "out")
    device = y.device
    _check_meta(meta, device, y.shape[0])
    _check_stack("b_stack", b_stack, y.dtype, device, "out")
    if b_stack.shape[2] != y.shape[2]:
        raise ValueError(f"`b_stack` has out={b_stack.shape[2]}, but `y` has out={y.shape[2]}")
    slots = b_stack.shape[0]
    _check_slot_table("ranks", ranks, slots, torch.int32, device)
    _check_slot_table("scales", scales, slots, torch.float32, device)
    _check_slots(meta, slots)
    for size, stride in zip(y.shape, y.stride(), strict=True):
        if stride == 0 and size > 1:
            raise ValueError(f"`y` is updated in place and must not overlap itself, got strides {y.stride()}")


# ---------------------------------------------------------------------------------------------------
# Launches
# ---------------------------------------------------------------------------------------------------


def _num_m_tiles(num_rows: int, tokens: int, block_m: int, slots: int) -> int:
    """Upper bound on the token tiles of all segments, from host sizes only (graph-safe).

    Segment s has c_s rows and ceil(c_s * T / BLOCK_M) tiles; summed over at most S = min(B, slots-1)
    segments that is < B*T/BLOCK_M + S, and <= sum c_s * ceil(T / BLOCK_M) = B * ceil(T / BLOCK_M).
    """
    max_segments = min(num_rows, slots - 1)
    return min(num_rows * _cdiv(tokens, block_m), _cdiv(num_rows * tokens, block_m) + max_segments)


def _block_s(num_rows: int) -> int:
    # Segment-table scan width; >= 16 so small batches share one compiled variant.
    return max(16, _next_pow2(num_rows))


def _launch_shrink(
    x: torch.Tensor,
    a_stack: torch.Tensor,
    ranks: torch.Tensor,
    meta: LoraBatchMeta,
    config: SgmvConfig,
    out: torch.Tensor | None,
) -> torch.Tensor:
    kernels = _require_kernels()
    num_rows, tokens, in_features = x.shape
    max_rank = a_stack.shape[1]
    # Splits of whole BLOCK_K tiles; drop splits that would start past `in` (small `in`).
    k_per_split = _cdiv(_cdiv(in_features, config.split_k), config.block_k) * config.block_k
    split_k = max(1, _cdiv(in_features, k_per_split))
    shape = (split_k, num_rows * tokens, max_rank)
    if out is None:
        t = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        if _shape(out) != shape or out.dtype != torch.float32 or out.device != x.device:
            raise ValueError(
                f"`out` must be a float32 tensor of shape {shape} on {x.device}, got "
                f"{out.dtype} {_shape(out)} on {out.device}"
            )
        t = out
    grid = (_num_m_tiles(num_rows, tokens, config.block_m, a_stack.shape[0]), split_k)
    kernels._sgmv_shrink_kernel[grid](
        x, a_stack, t, ranks, meta.sorted_rows, meta.segment_slots, meta.segment_starts, meta.segment_counts,
        num_rows, tokens, in_features, k_per_split, max_rank,
        *x.stride(),
        *a_stack.stride(),
        *t.stride(),
        BLOCK_M=config.block_m,
        BLOCK_K=config.block_k,
        BLOCK_R=config.block_r,
        BLOCK_S=_block_s(num_rows),
        UPCAST_DOT=kernels.INTERPRETING,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip
    return t


def _launch_expand(
    y: torch.Tensor,
    t: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
    config: SgmvConfig,
) -> None:
    kernels = _require_kernels()
    num_rows, tokens, out_features = y.shape
    grid = (
        _num_m_tiles(num_rows, tokens, config.block_m, b_stack.shape[0]),
        _cdiv(out_features, config.block_n),
    )
    kernels._sgmv_expand_kernel[grid](
        y, t, b_stack, ranks, scales,
        meta.sorted_rows, meta.segment_slots, meta.segment_starts, meta.segment_counts,
        num_rows, tokens, out_features, b_stack.shape[1],
        *y.stride(),
        *t.stride(),
        *b_stack.stride(),
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_R=config.block_r,
        BLOCK_S=_block_s(num_rows),
        SPLIT_K=t.shape[0],
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )  # fmt: skip


def _config(
    op: Literal["shrink", "expand"],
    given: SgmvConfig | None,
    tokens: int,
    dtype: torch.dtype,
    features: int,
    max_rank: int,
) -> SgmvConfig:
    if given is not None:
        needed = "block_k" if op == "shrink" else "block_n"
        if getattr(given, needed) == 0:
            raise ValueError(f"a {op} config needs `{needed}` > 0, got {given}")
        return given
    return launch_config(op, tokens <= DECODE_MAX_TOKENS_PER_ROW, dtype, features, max_rank)


# ---------------------------------------------------------------------------------------------------
# Public host functions
# ---------------------------------------------------------------------------------------------------


def lora_shrink(
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    ranks: torch.Tensor,  # [slots] int32
    meta: LoraBatchMeta,
    *,
    config: SgmvConfig | None = None,
    out: torch.Tensor | None = None,  # [split_k, B*T, max_rank] float32, optional
) -> torch.Tensor:
    """The first half of the LoRA update: project each token onto its adapter's A.

    Semantics: for each segment of ``meta`` (rows of one slot s, rank r = ranks[s] > 0), for each
    token p of the segment (rows in ``meta.sorted_rows`` order, tokens in order; p counts from
    ``segment_starts[i] * T``):
        t[:, p, :r] = partials over ``in`` that sum to x[row(p), tok(p)] @ a_stack[s, :r].T
    in fp32. Token rows of base rows or rank-0 slots, and columns past r, are NOT written.

    Args:
        x: the layer's input.
        a_stack: every slot's A (rows past a slot's rank are ignored).
        ranks: per-slot rank in this layer (0: the slot does nothing).
        meta: the batch's metadata (from :func:`build_batch_meta`).
        config: launch parameters; default: :func:`launch_config`'s entry for this shape class.
        out: preallocated result (its shape depends on the config's split-K).

    Returns:
        ``[split_k, B*T, max_rank]`` float32: split-K partials, token rows in segment order; sum
        over dim 0 to get ``t``. Feed it unchanged to :func:`lora_expand_`.

    Raises:
        ValueError: a shape, dtype or device does not match (the message names the argument).
    """
    _check_shrink(x, a_stack, ranks, meta)
    tokens, in_features = x.shape[1], x.shape[2]
    max_rank = a_stack.shape[1]
    cfg = _config("shrink", config, tokens, x.dtype, in_features, max_rank)
    if x.numel() == 0 or max_rank == 0:
        return torch.zeros((1, x.shape[0] * tokens, max_rank), dtype=torch.float32, device=x.device)
    return _launch_shrink(x, a_stack, ranks, meta, cfg, out)


def lora_expand_(
    y: torch.Tensor,  # [B, T, out], updated in place
    t: torch.Tensor,  # [split_k, B*T, max_rank] float32, from lora_shrink
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
    *,
    config: SgmvConfig | None = None,
) -> None:
    """The second half: add each token's scaled projection through its adapter's B into ``y``.

    Semantics: for each token p of a segment with slot s and rank r = ranks[s] > 0:
        y[row(p), tok(p)] = round(y[row(p), tok(p)] + scales[s] * sum(t[:, p, :r]) @ b_stack[s, :r])
    with fp32 accumulation and one rounding into y's dtype. Rows of base rows and rank-0 slots are
    not touched (bit-identical).

    Args:
        y: the base layer's output, updated in place; may be strided in B and T.
        t: :func:`lora_shrink`'s result for the same batch and metadata.
        b_stack: every slot's B, rank-major (rows past a slot's rank are ignored).
        ranks: per-slot rank in this layer.
        scales: per-slot LoRA scale (alpha / r).
        meta: the batch's metadata.
        config: launch parameters; default: :func:`launch_config`'s entry for this shape class.

    Raises:
        ValueError: a shape, dtype or device does not match (the message names the argument).
    """
    _check_expand(y, b_stack, ranks, scales, meta)
    num_rows, tokens, out_features = y.shape
    max_rank = b_stack.shape[1]
    if t.dim() != 3 or t.shape[1] != num_rows * tokens or t.shape[2] != max_rank or t.shape[0] < 1:
        raise ValueError(
            f"`t` must have shape (split_k, {num_rows * tokens}, {max_rank}) (B*T token rows, max_rank), "
            f"got {_shape(t)}"
        )
    if t.dtype != torch.float32 or t.device != y.device:
        raise ValueError(f"`t` must be float32 on {y.device}, got {t.dtype} on {t.device}")
    cfg = _config("expand", config, tokens, y.dtype, out_features, max_rank)
    if not meta.any_lora or y.numel() == 0 or max_rank == 0:
        return
    _launch_expand(y, t, b_stack, ranks, scales, meta, cfg)


def lora_apply_triton_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
    *,
    shrink_config: SgmvConfig | None = None,
    expand_config: SgmvConfig | None = None,
) -> None:
    """Add each row's LoRA update into ``y`` with the Triton shrink + expand kernels.

    Semantics (identical to :func:`lora_apply_reference_`): for each row b with slot s, r = ranks[s]:
        if r > 0: y[b] += scales[s] * (x[b] @ a_stack[s, :r].T) @ b_stack[s, :r]
    accumulated in fp32 and rounded once into y's dtype; rows with r == 0 stay bit-identical.

    Args:
        y: the base layer's output, updated in place; may be strided in B and T.
        x: the layer's input; may be strided in B and T (even stride 0 in B: a shared input).
        a_stack: every slot's A; rows past a slot's rank must be zero for the reference, and are
            never read here.
        b_stack: every slot's B, rank-major (``[slot, r, out]``).
        ranks: per-slot rank in this layer (0: the slot does nothing; slot 0 is the base model).
        scales: per-slot LoRA scale.
        meta: the batch's metadata (from :func:`build_batch_meta`).
        shrink_config: override :func:`launch_config`'s shrink entry (tests, tuning).
        expand_config: override :func:`launch_config`'s expand entry.

    Raises:
        ValueError: a shape, dtype or device does not match (the message names the argument).
    """
    _check_shrink(x, a_stack, ranks, meta)
    if y.dim() != 3 or _shape(y)[:2] != _shape(x)[:2]:
        raise ValueError(f"`y` must be [B, T, out] with `x`'s [B, T] {_shape(x)[:2]}, got {_shape(y)}")
    if y.dtype != x.dtype:
        raise ValueError(f"`y` must have `x`'s dtype {x.dtype}, got {y.dtype}")
    _check_expand(y, b_stack, ranks, scales, meta)
    if b_stack.shape[:2] != a_stack.shape[:2]:
        raise ValueError(
            f"`b_stack` must have `a_stack`'s [slots, max_rank] {_shape(a_stack)[:2]}, got {_shape(b_stack)[:2]}"
        )
    tokens, in_features = x.shape[1], x.shape[2]
    max_rank = a_stack.shape[1]
    if not meta.any_lora or y.numel() == 0 or in_features == 0 or max_rank == 0:
        return
    shrink_cfg = _config("shrink", shrink_config, tokens, x.dtype, in_features, max_rank)
    expand_cfg = _config("expand", expand_config, tokens, y.dtype, y.shape[2], max_rank)
    t = _launch_shrink(x, a_stack, ranks, meta, shrink_cfg, None)
    _launch_expand(y, t, b_stack, ranks, scales, meta, expand_cfg)
