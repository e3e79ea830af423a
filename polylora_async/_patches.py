"""Per-architecture patches for layers that run on tensors all rows share.

DeBERTa-v2/v3 with relative attention projects the relative-position embeddings (one tensor of
batch dimension 1) through the same ``query_proj``/``key_proj`` layers the tokens use. With a
different adapter per row, each row needs its own projected positions. The patch below replaces
``DisentangledSelfAttention.disentangled_attention_bias`` on each instance by a version that asks
the wrapped projections for per-row results (base once, each distinct adapter's update once, then
indexed per row) instead of tiling one shared result, so a mixed batch stays one forward pass.

Architectures without a patch still get exact results: the wrapper re-runs such batches in
adapter-homogeneous groups (slower, counted, warned once).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ._batch import BatchContext, BatchState

Patch = Callable[[nn.Module, BatchState], bool]


def apply_patches(model: nn.Module, state: BatchState) -> list[str]:
    """Install every known patch on ``model``'s submodules; returns the names of patched modules."""
    patched = []
    for name, module in model.named_modules():
        for patch in _PATCHES:
            if patch(module, state):
                patched.append(name)
                break
    return patched


# ---------------------------------------------------------------------------------------------
# DeBERTa-v2 / v3 disentangled attention
# ---------------------------------------------------------------------------------------------

_DEBERTA_ATTRS = ("num_attention_heads", "pos_ebd_size", "share_att_key", "pos_att_type", "transpose_for_scores")


def _patch_deberta_v2(module: nn.Module, state: BatchState) -> bool:
    cls = type(module)
    if cls.__name__ != "DisentangledSelfAttention" or not cls.__module__.endswith("deberta_v2.modeling_deberta_v2"):
        return False
    helpers = sys.modules.get(cls.__module__)
    if (
        helpers is None
        or not all(hasattr(module, a) for a in _DEBERTA_ATTRS)
        or not hasattr(helpers, "build_relative_position")
        or not hasattr(helpers, "build_rpos")
        or "disentangled_attention_bias" in module.__dict__
    ):
        return False
    original: Callable[..., Any] = module.disentangled_attention_bias  # type: ignore[assignment]

    def disentangled_attention_bias(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        ctx = state.current
        if ctx is None or len(ctx.meta.distinct_slots) + (0 in ctx.meta.row_slots_host) <= 1:
            return original(*args, **kwargs)  # one adapter for every row: the library's own code
        ctx.expand_shared = True
        try:
            return _deberta_bias_per_row(ctx, self, helpers, *args, **kwargs)
        finally:
            ctx.expand_shared = False
            ctx.shared_rows = None

    setattr(module, "disentangled_attention_bias", types.MethodType(disentangled_attention_bias, module))  # noqa: B010
    return True


def _deberta_bias_per_row(
    ctx: BatchContext,
    attn: Any,
    helpers: Any,
    query_layer: torch.Tensor,  # [rows * heads, q_len, head_dim]
    key_layer: torch.Tensor,  # [rows * heads, k_len, head_dim]
    relative_pos: torch.Tensor | None,
    rel_embeddings: torch.Tensor,  # [positions, hidden]
    scale_factor: int,
) -> torch.Tensor:
    """DeBERTa's content<->position attention bias with per-row position projections.

    The same math as the library's method, except that each projection of the position embeddings
    comes back once per adapter group when rows use different adapters, and each row takes its
    group's block instead of a tiled copy of one shared result.
    """
    heads = attn.num_attention_heads
    if relative_pos is None:
        relative_pos = helpers.build_relative_position(
            query_layer, key_layer, bucket_size=attn.position_buckets, max_position=attn.max_relative_positions
        )
    while relative_pos.dim() < 4:
        relative_pos = relative_pos.unsqueeze(0 if relative_pos.dim() == 2 else 1)
    if relative_pos.dim() != 4:
        raise ValueError(f"relative position ids must have 2, 3 or 4 dimensions, got {relative_pos.dim()}")
    span = attn.pos_ebd_size
    relative_pos = relative_pos.to(device=query_layer.device, dtype=torch.long)
    positions = rel_embeddings[: 2 * span, :].unsqueeze(0)
    rows_x_heads = query_layer.size(0)

    def project(layer: nn.Module) -> torch.Tensor:
        # -> [rows * heads, 2 * span, head_dim], each row's block projected with its own adapter.
        ctx.shared_rows = None
        per_head = attn.transpose_for_scores(layer(positions), heads)  # [(1 or groups) * heads, ...]
        rows_to_group = ctx.shared_rows
        if rows_to_group is None:  # every row uses this layer's one result
            return per_head.repeat(rows_x_heads // per_head.size(0), 1, 1)
        # Row b's heads are group g's heads: one gather, the same bytes the library's repeat writes.
        index = ctx.derived(
            ("deberta-heads", id(rows_to_group), heads),
            per_head.device,
            lambda: (rows_to_group[:, None] * heads + torch.arange(heads, device=per_head.device)).reshape(-1),
        )
        assert isinstance(index, torch.Tensor)
        return per_head.index_select(0, index)

    pos_key = pos_query = None
    if attn.share_att_key:
        pos_query, pos_key = project(attn.query_proj), project(attn.key_proj)
    else:
        if "c2p" in attn.pos_att_type:
            pos_key = project(attn.pos_key_proj)
        if "p2c" in attn.pos_att_type:
            pos_query = project(attn.pos_query_proj)

    score: torch.Tensor | int = 0
    if "c2p" in attn.pos_att_type:
        assert pos_key is not None
        c2p_index = torch.clamp(relative_pos + span, 0, 2 * span - 1).squeeze(0)
        c2p = torch.bmm(query_layer, pos_key.transpose(-1, -2))
        c2p = torch.gather(
            c2p, dim=-1, index=c2p_index.expand(rows_x_heads, query_layer.size(1), relative_pos.size(-1))
        )
        score = score + c2p / _scale(pos_key, scale_factor).to(dtype=c2p.dtype)
    if "p2c" in attn.pos_att_type:
        assert pos_query is not None
        # Same argument order as the library's own call, so both agree on every input.
        r_pos = helpers.build_rpos(
            query_layer, key_layer, relative_pos, attn.max_relative_positions, attn.position_buckets
        )
        p2c_index = torch.clamp(-r_pos + span, 0, 2 * span - 1).squeeze(0)
        p2c = torch.bmm(key_layer, pos_query.transpose(-1, -2))
        k_len = key_layer.size(-2)
        p2c = torch.gather(p2c, dim=-1, index=p2c_index.expand(rows_x_heads, k_len, k_len)).transpose(-1, -2)
        score = score + p2c / _scale(pos_query, scale_factor).to(dtype=p2c.dtype)
    assert isinstance(score, torch.Tensor)
    return score


def _scale(layer: torch.Tensor, scale_factor: int) -> torch.Tensor:
    return torch.sqrt(torch.tensor(layer.size(-1), dtype=torch.float) * scale_factor)


_PATCHES: tuple[Patch, ...] = (_patch_deberta_v2,)
