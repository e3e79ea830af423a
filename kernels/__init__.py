"""Multi-LoRA kernels: batch metadata, the torch reference, the Triton SGMV path and the dispatchers.

:func:`lora_apply_` is the checked entry point; :func:`lora_apply_trusted_` is the same dispatch
without the argument checks, for a layer that guarantees them (its hot path). Both pick:

* CUDA tensors -> the Triton kernels (:func:`lora_apply_triton_`), or the reference when triton is
  not importable or the dtype has no kernel (float64);
* CPU tensors -> the torch reference, unless ``TRITON_INTERPRET=1`` AND ``POLYLORA_KERNELS=triton``
  are set, in which case the Triton kernels run in triton's interpreter (how CI tests them).
"""

from __future__ import annotations

import os

import torch

from .metadata import LoraBatchMeta, build_batch_meta
from .reference import lora_apply_reference_
from .sgmv import (
    SUPPORTED_DTYPES,
    SgmvConfig,
    launch_config,
    lora_apply_triton_,
    lora_apply_triton_unchecked_,
    lora_expand_,
    lora_shrink,
    triton_available,
)

__all__ = [
    "LoraBatchMeta",
    "SgmvConfig",
    "build_batch_meta",
    "launch_config",
    "lora_apply_",
    "lora_apply_reference_",
    "lora_apply_triton_",
    "lora_apply_triton_unchecked_",
    "lora_apply_trusted_",
    "lora_expand_",
    "lora_shrink",
    "triton_available",
]


def _cpu_uses_triton() -> bool:
    # Read per call (cheap, CPU path only) so a test can set the variables after this import.
    return os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get("POLYLORA_KERNELS") == "triton"


def lora_apply_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
) -> None:
    """Add each row's LoRA update into ``y`` in place; see :func:`lora_apply_reference_` for the math.

    Semantics: for each row b with slot s = meta.row_slots[b] and r = ranks[s]:
        if r > 0: y[b] += scales[s] * (x[b] @ a_stack[s, :r].T) @ b_stack[s, :r]
    accumulated in fp32, rounded once into y's dtype; rows with r == 0 stay bit-identical.
    """
    # float64 (tests, CPU oracles) has no Triton path: the reference handles it anywhere.
    if (y.is_cuda or _cpu_uses_triton()) and y.dtype in SUPPORTED_DTYPES and triton_available():
        lora_apply_triton_(y, x, a_stack, b_stack, ranks, scales, meta)
    else:
        lora_apply_reference_(y, x, a_stack, b_stack, ranks, scales, meta)


def lora_apply_trusted_(
    y: torch.Tensor,  # [B, T, out], updated in place
    x: torch.Tensor,  # [B, T, in]
    a_stack: torch.Tensor,  # [slots, max_rank, in]
    b_stack: torch.Tensor,  # [slots, max_rank, out]
    ranks: torch.Tensor,  # [slots] int32
    scales: torch.Tensor,  # [slots] float32
    meta: LoraBatchMeta,
) -> None:
    """:func:`lora_apply_` for callers that guarantee its arguments (a layer's per-call hot path).

    Semantics: as :func:`lora_apply_`. On CUDA it skips the argument checks
    (:func:`lora_apply_triton_unchecked_` lists what the caller guarantees); everywhere else it
    is :func:`lora_apply_`, checks included. The few checks that guard against silently wrong
    results in a layer (the dtypes agree -- autocast can make them differ -- and the metadata
    lives on the activations' device) stay: they cost well under a microsecond.
    """
    dtype = y.dtype
    buffer = meta.device_buffer
    if (
        y.is_cuda
        and dtype in SUPPORTED_DTYPES
        and x.dtype == dtype
        and a_stack.dtype == dtype
        and b_stack.dtype == dtype
        and buffer is not None
        and buffer.get_device() == y.get_device()
        and triton_available()
    ):
        lora_apply_triton_unchecked_(y, x, a_stack, b_stack, ranks, scales, meta)
    else:
        lora_apply_(y, x, a_stack, b_stack, ranks, scales, meta)
