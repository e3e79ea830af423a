"""Host functions of the Triton SGMV path: check shapes, pick a launch plan, launch.

Runtime code calls :func:`lora_apply_triton_` (through :func:`polylora_async.kernels.lora_apply_`),
or, from a layer that already guarantees the arguments, :func:`lora_apply_triton_unchecked_`.
Both pick a plan per shape class (:func:`_apply_plan`, from the table in :mod:`._configs`):

* prefill / encoder shapes (>= 16 tokens per row), stacks up to rank 128: ONE fused kernel (shrink
  and expand in one launch, the rank-r projection kept in registers, y streamed once);
* decode shapes (< 16 tokens per row) and wider stacks: the two halves, :func:`lora_shrink` (split-K
  over ``in``, so a few columns of every adapter's A are read by many programs at once) then
  :func:`lora_expand_`. At decode the fused kernel loses: each program must reduce a whole A
  (128 KiB at 4096 x r16) before its first output, 18 us against 14 us for the halves on an H200.

Host cost per call is kept small on purpose: on small models a LoRA layer's GPU work takes a few
microseconds, so Python time per layer is what users see. Everything derived from shapes (grid,
sizes, meta-parameters) is computed once per shape class and cached (:func:`_apply_plan`), and
kernels are launched through :class:`~._launch.FastLauncher`, which skips triton's per-call
argument binding once a specialisation is compiled.

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
from typing import Any

import torch

from ._configs import (
    DECODE_MAX_TOKENS_PER_ROW,
    FUSED_MAX_RANK,
    SUPPORTED_DTYPES,
    Op,
    SgmvConfig,
    _cdiv,
    _next_pow2,
    launch_config,
)
from ._launch import FastLauncher
from .metadata import LoraBatchMeta

__all__ = [
    "SgmvConfig",
    "launch_config",
    "lora_apply_triton_",
    "lora_apply_triton_unchecked_",
    "lora_expand_",
    "lora_shrink",
    "triton_available",
]


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


_FUSED = FastLauncher(lambda: _require_kernels()._sgmv_fused_kernel)
_SHRINK = FastLauncher(lambda: _require_kernels()._sgmv_shrink_kernel)
_EXPAND = FastLauncher(lambda: _require_kernels()._sgmv_expand_kernel)


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
    if _shape(buffer) != (5, num_rows) or not buffer.is_contiguous() or buffer.dtype != torch.int32:
        raise ValueError("`meta` has no segment tables: build it with build_batch_meta()")
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


def _check_shrink(x: torch.Tensor, a_stack: torch.Tensor, ranks: torch.Tensor, meta: LoraBatchMeta) -> torch.Tensor:
    """Checks the shrink's arguments; returns the metadata's device buffer."""
    _check_activation("x", x, "in")
    device = x.device
    buffer = _check_meta(meta, device, x.shape[0])
    _check_stack("a_stack", a_stack, x.dtype, device, "in")
    if a_stack.shape[2] != x.shape[2]:
        raise ValueError(f"`a_stack` has in={a_stack.shape[2]}, but `x` has in={x.shape[2]}")
    _check_slot_table("ranks", ranks, a_stack.shape[0], torch.int32, device)
    _check_slots(meta, a_stack.shape[0])
    return buffer


def _check_expand(
    y: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    meta: LoraBatchMeta,
) -> torch.Tensor:
    """Checks the expand's arguments; returns the metadata's device buffer."""
    _check_activation("y", y, "out")
    device = y.device
    buffer = _check_meta(meta, device, y.shape[0])
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
    return buffer


# ---------------------------------------------------------------------------------------------------
# Plans: everything a launch needs that depends only on shapes, computed once per shape class
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


@dataclass(frozen=True, eq=False)
class _KernelPlan:
    """One launch: 1-D grid, the integer size arguments, the meta-parameters, (warps, stages)."""

    grid: int
    sizes: tuple[int, ...]
    constexprs: dict[str, Any]
    options: tuple[int, int]  # num_warps, num_stages


def _check_op_config(op: Op, config: SgmvConfig) -> SgmvConfig:
    needed = {"shrink": ("block_k",), "expand": ("block_n",), "fused": ("block_k", "block_n")}[op]
    for name in needed:
        if getattr(config, name) == 0:
            raise ValueError(f"a {op} config needs `{name}` > 0, got {config}")
    return config


def _config(
    op: Op, given: SgmvConfig | None, tokens: int, dtype: torch.dtype, features: int, max_rank: int
) -> SgmvConfig:
    if given is not None:
        return _check_op_config(op, given)
    return launch_config(op, tokens <= DECODE_MAX_TOKENS_PER_ROW, dtype, features, max_rank)


def _n_groups(out_features: int, config: SgmvConfig) -> tuple[int, int]:
    """(columns per program, programs per token tile) for the expand and fused kernels."""
    if config.n_tiles == 0:
        return _cdiv(out_features, config.block_n) * config.block_n, 1
    per_group = config.n_tiles * config.block_n
    return per_group, _cdiv(out_features, per_group)


@functools.lru_cache(maxsize=512)
def _fused_plan(
    num_rows: int, tokens: int, in_features: int, out_features: int, slots: int, max_rank: int, config: SgmvConfig
) -> _KernelPlan:
    if config.block_r < max_rank:
        raise ValueError(f"the fused kernel needs `block_r` >= max_rank {max_rank}, got {config}")
    n_per_group, n_groups = _n_groups(out_features, config)
    return _KernelPlan(
        grid=_num_m_tiles(num_rows, tokens, config.block_m, slots) * n_groups,
        sizes=(num_rows, tokens, in_features, out_features, max_rank, n_per_group, n_groups),
        constexprs={
            "BLOCK_M": config.block_m,
            "BLOCK_K": config.block_k,
            "BLOCK_N": config.block_n,
            "BLOCK_R": config.block_r,
            "BLOCK_S": _block_s(num_rows),
            "UPCAST_DOT": _require_kernels().INTERPRETING,
        },
        options=(config.num_warps, config.num_stages),
    )


@functools.lru_cache(maxsize=512)
def _shrink_plan(
    num_rows: int, tokens: int, in_features: int, slots: int, max_rank: int, config: SgmvConfig
) -> tuple[_KernelPlan, tuple[int, int, int]]:
    """The shrink's launch and the shape of its fp32 result."""
    # Splits of whole BLOCK_K tiles; drop splits that would start past `in` (small `in`).
    k_per_split = _cdiv(_cdiv(in_features, config.split_k), config.block_k) * config.block_k
    split_k = max(1, _cdiv(in_features, k_per_split))
    plan = _KernelPlan(
        grid=_num_m_tiles(num_rows, tokens, config.block_m, slots) * split_k,
        sizes=(num_rows, tokens, in_features, k_per_split, split_k, max_rank),
        constexprs={
            "BLOCK_M": config.block_m,
            "BLOCK_K": config.block_k,
            "BLOCK_R": config.block_r,
            "BLOCK_S": _block_s(num_rows),
            "UPCAST_DOT": _require_kernels().INTERPRETING,
        },
        options=(config.num_warps, config.num_stages),
    )
    return plan, (split_k, num_rows * tokens, max_rank)


@functools.lru_cache(maxsize=512)
def _expand_plan(
    num_rows: int,
    tokens: int,
    out_features: int,
    slots: int,
    max_rank: int,
    split_k: int,
    config: SgmvConfig,
) -> _KernelPlan:
    n_per_group, n_groups = _n_groups(out_features, config)
    return _KernelPlan(
        grid=_num_m_tiles(num_rows, tokens, config.block_m, slots) * n_groups,
        sizes=(num_rows, tokens, out_features, max_rank, n_per_group, n_groups),
        constexprs={
            "BLOCK_M": config.block_m,
            "BLOCK_N": config.block_n,
            "BLOCK_R": config.block_r,
            "BLOCK_S": _block_s(num_rows),
            "SPLIT_K": split_k,
            "ONE_RANK_TILE": max_rank <= config.block_r,
        },
        options=(config.num_warps, config.num_stages),
    )


@dataclass(frozen=True, eq=False)
class _ApplyPlan:
    """The whole update: ONE fused launch, or the shrink (into a fresh fp32 ``t``) then the expand."""

    fused: _KernelPlan | None
    shrink: _KernelPlan | None = None
    t_shape: tuple[int, int, int] = (0, 0, 0)
    expand: _KernelPlan | None = None


@functools.lru_cache(maxsize=512)
def _apply_plan(
    dtype: torch.dtype,
    num_rows: int,
    tokens: int,
    in_features: int,
    out_features: int,
    slots: int,
    max_rank: int,
    fused_config: SgmvConfig | None,
    shrink_config: SgmvConfig | None,
    expand_config: SgmvConfig | None,
) -> _ApplyPlan | None:
    """None when there is nothing to launch (an empty dimension)."""
    if num_rows * tokens == 0 or in_features == 0 or out_features == 0 or max_rank == 0:
        return None
    split_requested = shrink_config is not None or expand_config is not None
    if fused_config is not None and split_requested:
        raise ValueError("pass either `fused_config` or `shrink_config`/`expand_config`, not both")
    decode_like = tokens <= DECODE_MAX_TOKENS_PER_ROW
    # fp32 takes the two halves: on the H200 (triton 3.6) the fused kernel's fp32 (tf32) variant
    # failed with "misaligned address" at rank 64 (GPU run of 2026-11-28), the halves did not.
    fused_ok = dtype != torch.float32 and max_rank <= FUSED_MAX_RANK
    if fused_config is not None or (not split_requested and not decode_like and fused_ok):
        cfg = _config("fused", fused_config, tokens, dtype, out_features, max_rank)
        return _ApplyPlan(fused=_fused_plan(num_rows, tokens, in_features, out_features, slots, max_rank, cfg))
    shrink_cfg = _config("shrink", shrink_config, tokens, dtype, in_features, max_rank)
    expand_cfg = _config("expand", expand_config, tokens, dtype, out_features, max_rank)
    shrink, t_shape = _shrink_plan(num_rows, tokens, in_features, slots, max_rank, shrink_cfg)
    expand = _expand_plan(num_rows, tokens, out_features, slots, max_rank, t_shape[0], expand_cfg)
    return _ApplyPlan(fused=None, shrink=shrink, t_shape=t_shape, expand=expand)


# ---------------------------------------------------------------------------------------------------
# Launches (no checks: the public functions check, the layer's fast path is trusted)
# ---------------------------------------------------------------------------------------------------


def _run_shrink(
    plan: _KernelPlan,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    t: torch.Tensor,
    ranks: torch.Tensor,
    buffer: torch.Tensor,
) -> None:
    _SHRINK.launch(
        plan.grid,
        (x, a_stack, t, ranks, buffer),
        plan.sizes + x.stride() + a_stack.stride() + t.stride(),
        plan.constexprs,
        plan.options,
        x.dtype,
    )


def _run_expand(
    plan: _KernelPlan,
    y: torch.Tensor,
    t: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    buffer: torch.Tensor,
) -> None:
    _EXPAND.launch(
        plan.grid,
        (y, t, b_stack, ranks, scales, buffer),
        plan.sizes + y.stride() + t.stride() + b_stack.stride(),
        plan.constexprs,
        plan.options,
        y.dtype,
    )


def _apply(
    y: torch.Tensor,
    x: torch.Tensor,
    a_stack: torch.Tensor,
    b_stack: torch.Tensor,
    ranks: torch.Tensor,
    scales: torch.Tensor,
    buffer: torch.Tensor,
    fused_config: SgmvConfig | None = None,
    shrink_config: SgmvConfig | None = None,
    expand_config: SgmvConfig | None = None,
) -> None:
    num_rows, tokens, out_features = y.shape
    slots, max_rank, in_features = a_stack.shape
    plan = _apply_plan(
        y.dtype, num_rows, tokens, in_features, out_features, slots, max_rank, fused_config, shrink_config,
        expand_config,
    )  # fmt: skip
    if plan is None:
        return
    fused = plan.fused
    if fused is not None:
        _FUSED.launch(
            fused.grid,
            (y, x, a_stack, b_stack, ranks, scales, buffer),
            fused.sizes + y.stride() + x.stride() + a_stack.stride() + b_stack.stride(),
            fused.constexprs,
            fused.options,
            y.dtype,
        )
        return
    assert plan.shrink is not None and plan.expand is not None
    t = torch.empty(plan.t_shape, dtype=torch.float32, device=y.device)
    _run_shrink(plan.shrink, x, a_stack, t, ranks, buffer)
    _run_expand(plan.expand, y, t, b_stack, ranks, scales, buffer)


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
    buffer = _check_shrink(x, a_stack, ranks, meta)
    num_rows, tokens, in_features = x.shape
    slots, max_rank = a_stack.shape[0], a_stack.shape[1]
    cfg = _config("shrink", config, tokens, x.dtype, in_features, max_rank)
    if x.numel() == 0 or max_rank == 0:
        return torch.zeros((1, num_rows * tokens, max_rank), dtype=torch.float32, device=x.device)
    plan, shape = _shrink_plan(num_rows, tokens, in_features, slots, max_rank, cfg)
    if out is None:
        t = torch.empty(shape, dtype=torch.float32, device=x.device)
    else:
        if _shape(out) != shape or out.dtype != torch.float32 or out.device != x.device:
            raise ValueError(
                f"`out` must be a float32 tensor of shape {shape} on {x.device}, got "
                f"{out.dtype} {_shape(out)} on {out.device}"
            )
        t = out
    _run_shrink(plan, x, a_stack, t, ranks, buffer)
    return t


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
    buffer = _check_expand(y, b_stack, ranks, scales, meta)
    num_rows, tokens, out_features = y.shape
    slots, max_rank = b_stack.shape[0], b_stack.shape[1]
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
    plan = _expand_plan(num_rows, tokens, out_features, slots, max_rank, t.shape[0], cfg)
    _run_expand(plan, y, t, b_stack, ranks, scales, buffer)


def lora_apply_triton_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
    *,
    fused_config: SgmvConfig | None = None,
    shrink_config: SgmvConfig | None = None,
    expand_config: SgmvConfig | None = None,
) -> None:
    """Add each row's LoRA update into ``y`` with the Triton kernels.

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
        fused_config: override :func:`launch_config`'s fused entry (tests, tuning).
        shrink_config: run the two halves, with this shrink config (tests, tuning).
        expand_config: run the two halves, with this expand config.

    Raises:
        ValueError: a shape, dtype or device does not match (the message names the argument).
    """
    buffer = _check_shrink(x, a_stack, ranks, meta)
    if y.dim() != 3 or _shape(y)[:2] != _shape(x)[:2]:
        raise ValueError(f"`y` must be [B, T, out] with `x`'s [B, T] {_shape(x)[:2]}, got {_shape(y)}")
    if y.dtype != x.dtype:
        raise ValueError(f"`y` must have `x`'s dtype {x.dtype}, got {y.dtype}")
    _check_expand(y, b_stack, ranks, scales, meta)
    if b_stack.shape[:2] != a_stack.shape[:2]:
        raise ValueError(
            f"`b_stack` must have `a_stack`'s [slots, max_rank] {_shape(a_stack)[:2]}, got {_shape(b_stack)[:2]}"
        )
    if not meta.any_lora:
        return
    _apply(y, x, a_stack, b_stack, ranks, scales, buffer, fused_config, shrink_config, expand_config)


def lora_apply_triton_unchecked_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
) -> None:
    """:func:`lora_apply_triton_` without its argument checks: for callers that guarantee them.

    Semantics: as :func:`lora_apply_triton_`. The caller guarantees what that function checks:
    3-D ``y``/``x`` with the same ``[B, T]``, one supported dtype for ``y``, ``x`` and both
    stacks, ``[slots, max_rank, in|out]`` stacks, int32 ``ranks`` and float32 ``scales`` of
    ``slots`` entries, everything on one CUDA device, ``meta`` from :func:`build_batch_meta` for
    ``B`` rows and slots below ``slots``, and a ``y`` that does not overlap itself. A layer owns
    its stacks and tables, so it meets this by construction; per call the checks cost about as much
    host time as the launch itself (figures: benchmarks/notes_kernels.md, "host cost per call").
    """
    if meta.any_lora:
        _apply(y, x, a_stack, b_stack, ranks, scales, meta.device_buffer)  # type: ignore[arg-type]
