"""Whole-module copies per adapter (PEFT's ``modules_to_save``): classification heads and the like.

A PEFT adapter trained for a task such as ``SEQ_CLS`` or ``TOKEN_CLS`` saves a full copy of the
model's head (``classifier``, ``score``; any module listed in ``modules_to_save``). Here each such
module is wrapped once, at wrap time, in a :class:`MultiLoraHead` that keeps one copy of the
module's tensors per slot. In a batch every row runs through its slot's copy; a slot without a
copy (and the base slot 0) uses the model's own module.

A copy may differ from the model's module in its output size only (tenants have different label
sets): the output features of the module's last ``nn.Linear`` (its weight's and bias's dim 0).
When rows of one batch have heads of different widths, the head's output has the batch's largest
width along its last axis and narrower rows are padded with NaN.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._batch import BatchState
from ._errors import AdapterFormatError

DEFAULT_HEAD_NAMES = ("classifier", "score")
"""The modules PEFT adds to ``modules_to_save`` by itself for ``SEQ_CLS`` / ``TOKEN_CLS`` adapters."""


@dataclass(frozen=True)
class HeadSpec:
    """What an adapter's copy of one wrapped module must look like.

    Attributes:
        shapes: the module's state-dict keys (relative to the module) -> shapes.
        output_keys: keys whose dim 0 is the module's output width and may differ in a copy
            (weight and bias of the module's last ``nn.Linear``).
        width: the module's own output width (``None`` when it has no ``nn.Linear``).
    """

    shapes: Mapping[str, tuple[int, ...]]
    output_keys: frozenset[str]
    width: int | None


def head_spec(module: nn.Module) -> HeadSpec:
    """The :class:`HeadSpec` of a module as the model holds it."""
    shapes = {k: tuple(t.shape) for k, t in module.state_dict().items()}
    last: tuple[str, nn.Linear] | None = None
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Linear):
            last = (name, sub)
    if last is None:
        return HeadSpec(shapes, frozenset(), None)
    prefix = last[0] + "." if last[0] else ""
    keys = frozenset(k for k in (prefix + "weight", prefix + "bias") if k in shapes)
    return HeadSpec(shapes, keys, int(last[1].out_features))


def find_heads(model: nn.Module, names: Sequence[str] | None, skip: Sequence[str]) -> list[tuple[str, nn.Module]]:
    """The modules to wrap as heads: those whose name ends with ``n`` for ``n`` in ``names``
    (``None``: :data:`DEFAULT_HEAD_NAMES`), outermost matches only, none in ``skip``.

    A plain suffix, as PEFT matches ``modules_to_save``: DistilBERT's SEQ_CLS adapters save both
    ``pre_classifier`` and ``classifier`` for the name ``classifier``.
    """
    patterns = DEFAULT_HEAD_NAMES if names is None else tuple(names)
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if not name or not any(name.endswith(p) for p in patterns):
            continue
        if any(name.startswith(outer + ".") for outer, _ in found) or name in skip:
            continue
        found.append((name, module))
    return found


def split_head_key(key: str, heads: Mapping[str, HeadSpec]) -> tuple[str, str] | None:
    """``(head name, tensor key inside it)`` when ``key`` is a saved copy of a wrapped head.

    Accepts what PEFT saves (``base_model.model.classifier.weight``) and what a live PeftModel's
    ``state_dict()`` holds (``...classifier.modules_to_save.<adapter>.weight``).
    """
    name = key.removeprefix("base_model.model.")
    if ".modules_to_save." in name:
        outer, _, rest = name.partition(".modules_to_save.")
        name = outer + "." + rest.partition(".")[2]
    for head in heads:
        if name.startswith(head + "."):
            return head, name[len(head) + 1 :]
    return None


def check_head(where: str, head: str, spec: HeadSpec, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Check one adapter's copy of a wrapped head against the model's module (:func:`check_head_layout`).

    Returns the tensors (detached), in the module's order.

    Raises:
        AdapterFormatError: a key is missing or unknown, a shape or dtype does not fit.
    """
    check_head_layout(where, head, spec, tensors)
    return {key: tensors[key].detach() for key in spec.shapes}


def check_head_layout(where: str, head: str, spec: HeadSpec, tensors: Mapping[str, Any]) -> None:
    """The rules for a copy of a wrapped head, on anything with a ``shape`` and a torch ``dtype``.

    Tensors, or their safetensors header entries: every state-dict key of the module must be
    present, no other; each must be floating point; shapes must be equal except dim 0 of
    :attr:`HeadSpec.output_keys`, which must agree.

    Raises:
        AdapterFormatError: a key is missing or unknown, a shape or dtype does not fit.
    """
    missing = sorted(spec.shapes.keys() - tensors.keys())
    extra = sorted(tensors.keys() - spec.shapes.keys())
    if missing or extra:
        raise AdapterFormatError(
            f"{where}: its copy of module {head!r} does not have the module's structure: "
            f"missing tensors {missing[:5]}, unknown tensors {extra[:5]} (the module has {sorted(spec.shapes)[:8]})"
        )
    widths: set[int] = set()
    for key, expected in spec.shapes.items():
        tensor = tensors[key]
        dtype = getattr(tensor, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            kind = dtype if isinstance(dtype, torch.dtype) else type(tensor).__name__
            raise AdapterFormatError(f"{where}: {head}.{key} must be a floating-point tensor, got {kind}")
        shape = tuple(tensor.shape)
        fits = shape == expected
        if not fits and key in spec.output_keys:
            fits = len(shape) == len(expected) and shape[0] >= 1 and shape[1:] == expected[1:]
        if not fits:
            allowed = " (only the output size, dim 0, may differ)" if key in spec.output_keys else ""
            raise AdapterFormatError(
                f"{where}: module {head!r} tensor {key!r} has shape {shape}, but the model's has {expected}{allowed}"
            )
        if key in spec.output_keys:
            widths.add(shape[0])
    if len(widths) > 1:
        raise AdapterFormatError(
            f"{where}: module {head!r} has output tensors of different sizes {sorted(widths)} "
            f"({sorted(spec.output_keys)})"
        )


def head_width(spec: HeadSpec, tensors: Mapping[str, torch.Tensor]) -> int | None:
    for key in spec.output_keys:
        return int(tensors[key].shape[0])
    return spec.width


class MultiLoraHead(nn.Module):
    """A wrapped module whose rows run through per-slot copies of its tensors.

    Forward: the model's own module runs on every row (so base rows are bit-identical to the
    unwrapped model); rows of a slot with a copy are then recomputed through
    ``torch.func.functional_call`` with that copy and written over their rows. The module's
    output must be a tensor whose dim 0 is the batch row; widths differ along its last axis.
    """

    def __init__(self, base: nn.Module, name: str, num_slots: int, state: BatchState) -> None:
        super().__init__()
        self.base = base
        self.name = name
        self.spec = head_spec(base)
        self._state = state
        self._copies: list[dict[str, torch.Tensor] | None] = [None] * num_slots
        self._widths: list[int | None] = [self.spec.width] * num_slots
        self.probe = False
        """While set (see :meth:`MultiLoraModel.head_width_probe`), every row gets one extra NaN column."""

    def width_of(self, slot: int) -> int | None:
        return self._widths[slot]

    def set_slot(self, slot: int, tensors: dict[str, torch.Tensor] | None) -> None:
        """Place ``tensors`` (already on the module's device) as ``slot``'s copy; ``None``: base."""
        self._copies[slot] = tensors
        self._widths[slot] = self.spec.width if tensors is None else head_width(self.spec, tensors)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.base(*args, **kwargs)
        ctx = self._state.current
        if ctx is not None:
            slots = ctx.meta.row_slots_host
        else:  # called outside a MultiLoraModel forward: every row is a base row
            slots = (0,) * (out.shape[0] if isinstance(out, torch.Tensor) and out.dim() > 0 else 0)
        groups: dict[int, list[int]] = {}
        for row, slot in enumerate(slots):
            if self._copies[slot] is not None:
                groups.setdefault(slot, []).append(row)
        if not groups and not self.probe:
            return out
        if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != len(slots):
            raise AdapterFormatError(
                f"module {self.name!r} returned {type(out).__name__} "
                f"{tuple(out.shape) if isinstance(out, torch.Tensor) else ''}: a wrapped head must return one "
                "tensor with one row per batch row"
            )
        rows = len(slots)
        width = max([out.shape[-1]] + [int(self._widths[s] or 0) for s in groups]) + int(self.probe)
        if width != out.shape[-1]:
            merged = out.new_full((*out.shape[:-1], width), math.nan)
            merged[..., : out.shape[-1]] = out
        else:
            merged = out
        for slot, members in groups.items():
            copy = self._copies[slot]
            assert copy is not None
            index = torch.tensor(members, dtype=torch.long, device=out.device)
            g_args = tuple(_rows(a, rows, index) for a in args)
            g_kwargs = {k: _rows(v, rows, index) for k, v in kwargs.items()}
            g_out = torch.func.functional_call(self.base, copy, g_args, g_kwargs)
            if g_out.shape[-1] != width:
                padded = g_out.new_full((*g_out.shape[:-1], width), math.nan)
                padded[..., : g_out.shape[-1]] = g_out
                g_out = padded
            merged = merged.index_copy(0, index, g_out.to(merged.dtype))
        return merged


def _rows(value: Any, rows: int, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == rows:
        return value.index_select(0, index)
    return value


@contextlib.contextmanager
def width_probe(head: MultiLoraHead) -> Iterator[None]:
    head.probe = True
    try:
        yield
    finally:
        head.probe = False
