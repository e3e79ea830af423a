"""MultiLoraLinear: a linear layer whose every batch row can carry its own LoRA adapter."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batch import BatchContext, BatchState, MixedSharedInputError
from .adapters import LayerLora
from .kernels import lora_apply_trusted_


def conv1d_type() -> type[nn.Module] | None:
    """transformers' GPT-2 style ``Conv1D`` (``y = x @ W + b``, weight ``[in, out]``), if loaded.

    Looked up among imported modules only: a model holding a ``Conv1D`` has imported it, and
    transformers stays an optional dependency that this package never imports itself.
    """
    module = sys.modules.get("transformers.pytorch_utils")
    found = getattr(module, "Conv1D", None)
    return found if isinstance(found, type) else None


def linear_features(module: nn.Module) -> tuple[int, int] | None:
    """``(in_features, out_features)`` of a layer this package can wrap, else None.

    ``nn.Linear`` and its subclasses (e.g. Falcon's ``FalconLinear``), as PEFT wraps them: the LoRA
    delta is added to whatever the layer's own forward returns. Their weight must be floating point
    (a quantized layer stores integers and is not served). ``nn.Linear`` stores its weight
    ``[out, in]``; GPT-2's ``Conv1D`` (exactly that type) stores it ``[in, out]``.
    """
    if isinstance(module, nn.Linear):
        return (module.in_features, module.out_features) if module.weight.is_floating_point() else None
    conv1d = conv1d_type()
    if conv1d is not None and type(module) is conv1d:
        weight = module.weight
        assert isinstance(weight, torch.Tensor)
        return int(weight.shape[0]), int(weight.shape[1])
    return None


@dataclass
class SlotWritePlan:
    """The copies, zero-fills and table entries of one layer's slot write (see ``plan_slot_write``)."""

    targets: list[torch.Tensor]  # slot views to copy into
    sources: list[torch.Tensor]  # what to copy, one per target
    stale: list[torch.Tensor]  # slot views past the new rank, to zero
    rank_entry: torch.Tensor  # one-element view of the device rank table
    scale_entry: torch.Tensor  # one-element view of the device scale table


class MultiLoraLinear(nn.Module):
    """Replaces one targeted ``nn.Linear`` or GPT-2 ``Conv1D``; holds every slot's LoRA factors for it.

    The base layer's own forward computes the base output (so base rows stay bit-identical); the
    LoRA delta is added to it. A ``Conv1D``'s LoRA factors have the same layout as a Linear's
    (PEFT stores them so too; its ``fan_in_fan_out`` only transposes merged weights).

    Slot storage (slot 0 is the base model, rank 0, never written):
      * ``lora_a``: ``[slots, max_rank, in_features]`` (PEFT's ``lora_A.weight`` layout per slot),
      * ``lora_b``: ``[slots, max_rank, out_features]`` (``lora_B.weight`` transposed, so both
        factors are contiguous along the hidden dimension the kernels stream),
      * per-slot true rank and scale, kept in fp32 whatever the model's dtype.

    Rows of a batch read their slot from the shared batch context; the layer itself holds no
    per-batch state.
    """

    lora_a: torch.Tensor
    lora_b: torch.Tensor

    def __init__(self, base: nn.Module, name: str, num_slots: int, max_rank: int, state: BatchState) -> None:
        super().__init__()
        features = linear_features(base)
        if features is None:
            raise TypeError(f"layer {name!r}: {type(base).__name__} is neither nn.Linear nor Conv1D")
        self.base = base
        self.layer_name = name
        self.in_features, self.out_features = features
        self.is_conv1d = not isinstance(base, nn.Linear)
        self.max_rank = max_rank
        self._state = state
        weight = base.weight
        assert isinstance(weight, torch.Tensor)
        self.register_buffer(
            "lora_a",
            torch.zeros(num_slots, max_rank, self.in_features, dtype=weight.dtype, device=weight.device),
            persistent=False,
        )
        self.register_buffer(
            "lora_b",
            torch.zeros(num_slots, max_rank, self.out_features, dtype=weight.dtype, device=weight.device),
            persistent=False,
        )
        # Host copies decide control flow without reading the device; device copies feed kernels.
        self.slot_ranks: list[int] = [0] * num_slots
        # Which slots do work in this layer; keys the per-batch shared-input plans.
        self._active: tuple[bool, ...] = (False,) * num_slots
        self.slot_scales: list[float] = [0.0] * num_slots
        self._ranks_dev = torch.zeros(num_slots, dtype=torch.int32, device=weight.device)
        self._scales_dev = torch.zeros(num_slots, dtype=torch.float32, device=weight.device)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's weight: model code reads it through the wrapper (e.g. T5 casts inputs to its dtype)."""
        weight = self.base.weight
        assert isinstance(weight, torch.Tensor)
        return weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (``None`` if it has none)."""
        bias = self.base.bias
        assert bias is None or isinstance(bias, torch.Tensor)
        return bias

    # -- slot management (called by the model wrapper between batches) -------------------------

    @torch.no_grad()
    def write_slot(self, slot: int, lora: LayerLora | None) -> None:
        """Place one adapter's factors for this layer into ``slot`` (None: rank 0 here).

        For one layer at a time (tests, benchmarks); the model writes a whole adapter into every
        layer at once with :meth:`MultiLoraModel.write_slot`, batching the same plan's copies.
        """
        plan = self.plan_slot_write(slot, lora)
        for target, source in zip(plan.targets, plan.sources, strict=True):
            target.copy_(source, non_blocking=True)
        for stale in plan.stale:
            stale.zero_()
        # fill_ with a Python number is a kernel on the current (copy) stream; item assignment
        # (`t[slot] = value`) may copy a host scalar instead, which waits for the stream's work.
        plan.rank_entry.fill_(self.slot_ranks[slot])
        plan.scale_entry.fill_(self.slot_scales[slot])

    def plan_slot_write(
        self, slot: int, lora: LayerLora | None, a: torch.Tensor | None = None, b: torch.Tensor | None = None
    ) -> SlotWritePlan:
        """What writing ``lora`` into ``slot`` takes, for the caller to issue; records the rank on the host.

        ``a`` / ``b``: where to copy the factors from (default ``lora.a`` / ``lora.b``; e.g. their
        copies already on the device).
        """
        r = 0 if lora is None else lora.rank
        targets: list[torch.Tensor] = []
        sources: list[torch.Tensor] = []
        if lora is not None:
            targets = [self.lora_a[slot, :r], self.lora_b[slot, :r]]
            sources = [lora.a if a is None else a, (lora.b if b is None else b).t()]
        stale = [self.lora_a[slot, r:], self.lora_b[slot, r:]] if r < self.max_rank else []
        rank_entry, scale_entry = self.set_slot_rank(slot, r, 0.0 if lora is None else lora.scale)
        return SlotWritePlan(targets, sources, stale, rank_entry, scale_entry)

    def set_slot_rank(self, slot: int, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Record ``slot``'s rank and scale on the host; returns the device table entries to fill.

        The caller writes the factors and fills the two returned one-element views (on the copy
        stream) before any batch uses the slot.
        """
        assert slot != 0, "slot 0 is the base model"
        self.slot_ranks[slot] = rank
        self.slot_scales[slot] = scale if rank else 0.0
        # Straight into the instance dict: nn.Module.__setattr__ (which looks for parameters,
        # buffers and submodules first) cost more than the rest of this method.
        self.__dict__["_active"] = tuple(r > 0 for r in self.slot_ranks)
        return self._ranks_dev[slot : slot + 1], self._scales_dev[slot : slot + 1]

    def _apply(self, fn: Any, recurse: bool = True) -> MultiLoraLinear:
        # The rank/scale tables are not buffers (a dtype cast of the model must not touch them:
        # int32 ranks, fp32 scales), but they must follow the module's device moves, so a slot
        # write never races with a lazy move in a forward pass.
        super()._apply(fn, recurse)
        device = self.lora_a.device
        self._ranks_dev = self._ranks_dev.to(device)
        self._scales_dev = self._scales_dev.to(device)
        return self

    def _slot_tables(self, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The device rank/scale tables, on ``like``'s device (ints compared: cheap on the hot path)."""
        if self._ranks_dev.get_device() != like.get_device():
            self._ranks_dev = self._ranks_dev.to(like.device)
            self._scales_dev = self._scales_dev.to(like.device)
        return self._ranks_dev, self._scales_dev

    # -- forward --------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        ctx = self._state.current
        if ctx is None:
            return y
        meta = ctx.meta
        if not meta.any_lora:
            return y
        num_rows = meta.num_rows
        if x.dim() >= 2 and x.shape[0] == num_rows:
            # Per-row hot path, once per wrapped layer per forward: keep host work minimal. The
            # arguments are this layer's own buffers and the batch's metadata, valid by construction,
            # so the kernels' argument checks are skipped (lora_apply_trusted_). A [B, T, H] input
            # (the usual case) is passed as it is, without new views.
            ranks, scales = self._slot_tables(y)
            if x.dim() == 3:
                lora_apply_trusted_(y, x, self.lora_a, self.lora_b, ranks, scales, meta)
            else:
                lora_apply_trusted_(
                    y.view(num_rows, -1, self.out_features),
                    x.reshape(num_rows, -1, self.in_features),
                    self.lora_a,
                    self.lora_b,
                    ranks,
                    scales,
                    meta,
                )
            return y
        return self._forward_shared(x, y, ctx)

    def _forward_shared(self, x: torch.Tensor, y: torch.Tensor, ctx: BatchContext) -> torch.Tensor:
        """A tensor whose leading dimension is not the batch's: all rows share it.

        If every row uses the same adapter in this layer, that adapter applies to the shared tensor.
        If rows differ, one tensor cannot hold every row's answer: inside a model patch that
        understands per-group results (``ctx.expand_shared``) the layer returns one result per
        adapter group, ``[groups, ...]``, and sets ``ctx.shared_rows`` (row -> group); anywhere
        else it raises, and the model re-runs the batch in homogeneous groups.
        """
        plan = ctx.shared_plan(self._active, y.device)
        if not plan.distinct:
            return y
        ranks, scales = self._slot_tables(y)
        if plan.rows_to_group is None:  # one adapter for every row in this layer
            lora_apply_trusted_(
                y.view(1, -1, self.out_features),
                x.reshape(1, -1, self.in_features),
                self.lora_a,
                self.lora_b,
                ranks,
                scales,
                plan.meta,
            )
            return y
        if not ctx.expand_shared or x.dim() < 2 or x.shape[0] != 1:
            raise MixedSharedInputError(self.layer_name)
        # One result per adapter group (group 0: the base output), computed once each; the patch
        # that asked for this maps rows to groups with `ctx.shared_rows`, in its own layout.
        groups = len(plan.distinct) + 1
        per_group = y.expand(groups, *y.shape[1:]).clone()
        lora_apply_trusted_(
            per_group[1:].view(groups - 1, -1, self.out_features),
            x.reshape(1, -1, self.in_features).expand(groups - 1, -1, -1),
            self.lora_a,
            self.lora_b,
            ranks,
            scales,
            plan.meta,
        )
        ctx.shared_rows = plan.rows_to_group
        return per_group

    def extra_repr(self) -> str:
        return (
            f"name={self.layer_name!r}, in_features={self.in_features}, out_features={self.out_features}, "
            f"slots={self.lora_a.shape[0]}, max_rank={self.max_rank}"
        )
