"""Validation of an adapter against the wrapped model, and packing it into :class:`AdapterWeights`.

One set of rules (:func:`_plan_adapter`) runs on tensors at load and on safetensors header entries at
registration, so what registration refuses and what a load refuses cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._errors import (
    AdapterFormatError,
    PolyLoraWarning,
    UnsupportedAdapterError,
)
from .._heads import HeadSpec, check_head, check_head_layout, split_head_key
from ._safetensors import TensorMeta, read_safetensors_header, view_at
from ._sources import CONFIG_FILE, SAFETENSORS_FILE, _read_config, _weights_file
from ._spec import _LoraSpec, _warned_fan_in_fan_out
from ._types import AdapterWeights, LayerLora, LayerShape, RawAdapter

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


def validate_adapter(
    adapter_id: str,
    raw: RawAdapter,
    layers: Mapping[str, LayerShape],
    max_rank: int,
    dtype: torch.dtype,
    *,
    pin_memory: bool = False,
    heads: Mapping[str, HeadSpec] | None = None,
) -> AdapterWeights:
    """Check a raw adapter against the wrapped layers and turn it into :class:`AdapterWeights`.

    The result is packed (:attr:`AdapterWeights.storage`): a safetensors buffer of the right dtype
    is kept as it is, any other is converted or gathered in one new storage.

    Args:
        adapter_id: the id the adapter is served under (named in every error).
        raw: the adapter as read.
        layers: wrapped layer name -> its shape.
        max_rank: the largest rank the model's slots hold.
        dtype: the dtype weights are converted to (the base layers' dtype).
        pin_memory: the storage must be page-locked (for asynchronous copies to a GPU).
        heads: wrapped head modules (``modules_to_save``) -> what a copy of each must look like;
            tensors of other saved modules are refused.

    Raises:
        UnsupportedAdapterError: a PEFT feature this runtime does not serve.
        AdapterFormatError: anything else that does not fit (names the module/field and value).
    """
    where = f"adapter {adapter_id!r} ({raw.origin})"
    spec = _LoraSpec.parse(where, raw.config)
    plan = _plan_adapter(where, spec, raw.config, raw.tensors, layers, max_rank, heads)
    tensors = raw.tensors
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    found: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = {}
    for layer_name, planned in plan.layers.items():
        a, b = tensors[planned.a_key], tensors[planned.b_key]
        pairs[planned.module] = {"lora_A": a, "lora_B": b}
        if a.requires_grad or b.requires_grad:  # a state dict taken from a model being trained
            a, b = a.detach(), b.detach()
        found[layer_name] = (a, b, planned.scale)
    head_tensors = {head: {k: tensors[key].detach() for k, key in keys.items()} for head, keys in plan.heads.items()}
    _check_fan_in_fan_out(where, spec.fan_in_fan_out, [layers[n] for n in found])
    packed_dtype = _packed_dtype(raw)
    whole = raw.buffer.view(packed_dtype) if raw.buffer is not None and packed_dtype is not None else None
    _check_finite(where, whole, {**pairs, **head_tensors})
    return _pack(adapter_id, raw, found, dtype, pin_memory, packed_dtype, head_tensors)


def check_source(
    adapter_id: str,
    source: str | os.PathLike[str] | RawAdapter | AdapterWeights,
    layers: Mapping[str, LayerShape],
    max_rank: int,
    heads: Mapping[str, HeadSpec] | None = None,
) -> None:
    """Refuse what can be refused without tensor data: what registration checks at once.

    The rules are those of :func:`validate_adapter` (and :func:`validate_weights`), applied to
    what is known before the weights are read: a directory's ``adapter_config.json`` and its
    safetensors header (tensor names, dtypes and shapes, :func:`read_safetensors_header`); an
    in-memory source's config and tensor shapes. Values are not looked at (NaN/Inf, data that does
    not match a valid header): the load still checks everything. For a directory with only
    ``adapter_model.bin`` the config is checked, the weights only at load (a pickle has no header).
    Unknown config keys are not reported here (the load warns about them).

    Raises:
        AdapterLoadError: the directory, its config or weights file is missing, unreadable or
            truncated (names the file).
        UnsupportedAdapterError: a PEFT feature this runtime does not serve (names the field or tensor).
        AdapterFormatError: a field, module, shape or rank that does not fit the wrapped model.
    """
    if isinstance(source, AdapterWeights):
        _check_weights_layout(f"adapter {adapter_id!r} ({source.origin})", source, layers, max_rank, heads)
        return
    if isinstance(source, RawAdapter):
        where = f"adapter {adapter_id!r} ({source.origin})"
        spec = _LoraSpec.parse(where, source.config, warn_unknown=False)
        _plan_adapter(where, spec, source.config, source.tensors, layers, max_rank, heads)
        return
    root = Path(source)
    config = _read_config(adapter_id, root)
    weights_path = _weights_file(adapter_id, root)
    entries = read_safetensors_header(adapter_id, weights_path) if weights_path.name == SAFETENSORS_FILE else None
    spec = _LoraSpec.parse(f"adapter {adapter_id!r} ({root / CONFIG_FILE})", config, warn_unknown=False)
    if entries is not None:
        _plan_adapter(f"adapter {adapter_id!r} ({weights_path})", spec, config, entries, layers, max_rank, heads)


@dataclass(frozen=True)
class _PlannedLayer:
    """Where one wrapped layer's factors are in an adapter's tensors, and its scale."""

    module: str
    a_key: str
    b_key: str
    scale: float


@dataclass(frozen=True)
class _Plan:
    layers: dict[str, _PlannedLayer]
    """Wrapped layer name -> its factors."""
    heads: dict[str, dict[str, str]]
    """Wrapped head name -> key inside the module -> the adapter's tensor key (in the module's order)."""


def _plan_adapter(
    where: str,
    spec: _LoraSpec,
    config: Mapping[str, Any],
    tensors: Mapping[str, Any],
    layers: Mapping[str, LayerShape],
    max_rank: int,
    heads: Mapping[str, HeadSpec] | None,
) -> _Plan:
    """Every rule on names, kinds, shapes and ranks: which tensor goes where, or why none fits.

    ``tensors`` are tensors or :class:`TensorMeta` (only ``shape`` and ``dtype`` are looked at), so
    the one set of rules serves a loaded adapter and a safetensors header alike.
    """
    pairs: dict[str, dict[str, str]] = {}
    saved: dict[str, dict[str, Any]] = {}
    saved_keys: dict[str, dict[str, str]] = {}
    for key, tensor in tensors.items():
        if ".original_module." in key:  # a live PeftModel's state_dict(): the base module's own copy
            continue
        match = _KEY.match(key)
        head = split_head_key(key, heads) if heads and match is None else None
        if head is not None:
            saved.setdefault(head[0], {})[head[1]] = tensor
            saved_keys.setdefault(head[0], {})[head[1]] = key
            continue
        if match is None and _listed_copy(key, config.get("modules_to_save")):
            raise UnsupportedAdapterError(
                f"{where}: tensor {key!r} belongs to a module the adapter saves whole (`modules_to_save`="
                f"{config.get('modules_to_save')!r}) that the model does not wrap as a head (wrapped heads: "
                f"{sorted(heads or ())}); name it in WrapConfig(modules_to_save=[...])"
            )
        module, part = _split_key(where, key, heads, match)
        pairs.setdefault(module, {})[part] = key
    if not pairs and not saved:
        raise AdapterFormatError(f"{where}: the weights hold no LoRA tensors")
    head_keys: dict[str, dict[str, str]] = {}
    if heads:
        for name, parts_of_head in saved.items():
            check_head_layout(where, name, heads[name], parts_of_head)
            head_keys[name] = {k: saved_keys[name][k] for k in heads[name].shapes}

    resolver = _NameResolver(layers)
    found: dict[str, _PlannedLayer] = {}
    for module, parts in pairs.items():
        missing = {"lora_A", "lora_B"} - parts.keys()
        if missing:
            raise AdapterFormatError(f"{where}: module {module!r} has no {sorted(missing)[0]} weight")
        layer_name = resolver.resolve(where, module)
        shape = layers[layer_name]
        a, b = tensors[parts["lora_A"]], tensors[parts["lora_B"]]
        _check_kind(where, f"{module}.lora_A", a)
        _check_kind(where, f"{module}.lora_B", b)
        rank = int(a.shape[0])
        if rank < 1 or a.shape[1] != shape.in_features:
            raise AdapterFormatError(
                f"{where}: {module}.lora_A has shape {tuple(a.shape)}, but layer {layer_name!r} needs "
                f"[r, {shape.in_features}]{_transposed_hint(a, b, shape)}"
            )
        if b.shape[0] != shape.out_features or b.shape[1] != rank:
            raise AdapterFormatError(
                f"{where}: {module}.lora_B has shape {tuple(b.shape)}, but layer {layer_name!r} needs "
                f"[{shape.out_features}, {rank}] (out_features, r){_transposed_hint(a, b, shape)}"
            )
        if rank > max_rank:
            raise AdapterFormatError(
                f"{where}: module {module!r} has rank {rank}, above the model's max_rank={max_rank}"
            )
        expected = spec.rank_for(module)
        if expected != rank:
            raise AdapterFormatError(
                f"{where}: module {module!r} has rank {rank} in its weights but {expected} in its config"
            )
        if layer_name in found:
            raise AdapterFormatError(f"{where}: two sets of weights map to layer {layer_name!r}")
        found[layer_name] = _PlannedLayer(module, parts["lora_A"], parts["lora_B"], spec.scale_for(module, rank))
    return _Plan(found, head_keys)


def _listed_copy(key: str, listed: object) -> bool:
    """Whether ``key`` lies inside a module named in a config's ``modules_to_save`` list."""
    if not isinstance(listed, (list, tuple)):
        return False
    parts = key.split(".")
    return any(name in parts[:-1] for name in listed if isinstance(name, str))


def _transposed_hint(a: torch.Tensor | TensorMeta, b: torch.Tensor | TensorMeta, shape: LayerShape) -> str:
    """A hint for factors saved transposed (``[in, r]`` / ``[r, out]``), e.g. in a Conv1D's weight layout."""
    if a.shape[0] == shape.in_features and b.shape[1] == shape.out_features and a.shape[1] == b.shape[0]:
        return (
            "; the factors look transposed: PEFT stores lora_A as [r, in] and lora_B as [out, r] for "
            "nn.Linear and Conv1D layers alike (`fan_in_fan_out` does not change that layout)"
        )
    return ""


def _check_fan_in_fan_out(where: str, fan_in_fan_out: bool, covered: Sequence[LayerShape]) -> None:
    """Warn when ``fan_in_fan_out`` contradicts every layer the adapter covers.

    The flag says the base weights are stored ``[in, out]`` (GPT-2's ``Conv1D``). PEFT uses it only
    to transpose a merged delta; the unmerged forward, and the factors' layout, are the same either
    way, so a contradicting flag changes nothing here. PEFT corrects such a flag per layer with a
    warning, and so does this (once per adapter source). A PEFT-saved adapter covering both kinds
    records one value, which fits some of its layers: no warning then.
    """
    if not covered or any(shape.conv1d == fan_in_fan_out for shape in covered):
        return
    key = (where, fan_in_fan_out)
    if key in _warned_fan_in_fan_out:
        return
    _warned_fan_in_fan_out.add(key)
    kind = "nn.Linear" if fan_in_fan_out else "Conv1D"
    warnings.warn(
        f"{where}: field `fan_in_fan_out`={fan_in_fan_out} but every layer it covers is {kind}; loaded as PEFT "
        f"loads it (as if `fan_in_fan_out`={not fan_in_fan_out}: the LoRA factors have the same layout either way)",
        PolyLoraWarning,
        stacklevel=4,
    )


def _packed_dtype(raw: RawAdapter) -> torch.dtype | None:
    """The one dtype of every tensor when ``raw.buffer`` backs them all, else None."""
    if raw.buffer is None:
        return None
    dtypes = {t.dtype for t in raw.tensors.values()}
    return dtypes.pop() if len(dtypes) == 1 else None


def validate_weights(
    adapter_id: str,
    weights: AdapterWeights,
    layers: Mapping[str, LayerShape],
    max_rank: int,
    dtype: torch.dtype,
    *,
    pin_memory: bool = False,
    heads: Mapping[str, HeadSpec] | None = None,
) -> AdapterWeights:
    """Check ready-made :class:`AdapterWeights` (built by hand, or for another model) like a read adapter.

    Every layer must be a wrapped layer with factors of its shape, ranks within ``max_rank``,
    finite scales and finite weights; every head copy must fit a wrapped head of ``heads``. The
    result is packed in ``dtype`` on the CPU
    (:func:`pack_weights`; weights that already are come back as they are) under ``adapter_id``.

    Raises:
        AdapterFormatError: a layer, shape, rank, scale or value that does not fit (names the layer).
    """
    where = f"adapter {adapter_id!r} ({weights.origin})"
    pairs = _check_weights_layout(where, weights, layers, max_rank, heads)
    _check_finite(where, _backing_storage(weights), pairs)
    packed = pack_weights(weights, pin_memory=pin_memory, dtype=dtype)
    # Hand-built weights that already fit come back as they are: give them this id and a true size.
    nbytes = sum(t.numel() for parts in pairs.values() for t in parts.values()) * dtype.itemsize
    if packed.adapter_id != adapter_id or packed.nbytes != nbytes:
        packed = dataclasses.replace(packed, adapter_id=adapter_id, nbytes=nbytes)
    return packed


def _check_weights_layout(
    where: str,
    weights: AdapterWeights,
    layers: Mapping[str, LayerShape],
    max_rank: int,
    heads: Mapping[str, HeadSpec] | None,
) -> dict[str, dict[str, torch.Tensor]]:
    """:func:`validate_weights`' rules on layers, shapes, ranks and scales (values not looked at).

    Returns every tensor by layer or head name, for the finite check.
    """
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for name, lora in weights.layers.items():
        shape = layers.get(name)
        if shape is None:
            raise AdapterFormatError(f"{where}: layer {name!r} is not a wrapped layer of this model")
        _check_kind(where, f"{name}.a", lora.a)
        _check_kind(where, f"{name}.b", lora.b)
        rank = lora.rank
        if not 1 <= rank <= max_rank:
            raise AdapterFormatError(f"{where}: layer {name!r} has rank {rank}, outside [1, max_rank={max_rank}]")
        if tuple(lora.a.shape) != (rank, shape.in_features) or tuple(lora.b.shape) != (shape.out_features, rank):
            raise AdapterFormatError(
                f"{where}: layer {name!r} has a {tuple(lora.a.shape)} and b {tuple(lora.b.shape)}, needs "
                f"a ({rank}, {shape.in_features}) and b ({shape.out_features}, {rank})"
            )
        if isinstance(lora.scale, bool) or not isinstance(lora.scale, (int, float)) or not math.isfinite(lora.scale):
            raise AdapterFormatError(f"{where}: layer {name!r} has scale {lora.scale!r}, not a finite number")
        pairs[name] = {"a": lora.a, "b": lora.b}
    for name, tensors in weights.heads.items():
        spec = None if heads is None else heads.get(name)
        if spec is None:
            raise AdapterFormatError(f"{where}: module {name!r} is not a wrapped head of this model")
        pairs[name] = check_head(where, name, spec, tensors)
    if not weights.layers and not weights.heads:
        raise AdapterFormatError(f"{where}: the weights hold no layers")
    return pairs


def _backing_storage(weights: AdapterWeights) -> torch.Tensor | None:
    """``weights.storage`` when every factor lies inside it (so one reduction checks them all), else None."""
    storage = weights.storage
    if storage is None or storage.dim() != 1:
        return None
    factors = [t for lora in weights.layers.values() for t in (lora.a, lora.b)]
    factors += [t for tensors in weights.heads.values() for t in tensors.values()]
    begin = storage.data_ptr()
    end = begin + storage.numel() * storage.element_size()
    inside = all(
        t.dtype == storage.dtype
        and t.device == storage.device
        and t.is_contiguous()
        and begin <= t.data_ptr()
        and t.data_ptr() + t.numel() * t.element_size() <= end
        for t in factors
    )
    return storage if inside else None


def _check_finite(where: str, whole: torch.Tensor | None, pairs: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
    """No NaN/Inf anywhere: one reduction over ``whole`` (memory every tensor is a view of), else one per tensor."""
    if whole is not None:
        # One call for the whole adapter (~0.1 ms for 8 MB on one CPU core) instead of ~10 us of
        # Python and dispatch per tensor while holding the interpreter lock (256 tensors: ~3 ms).
        if _sum_is_finite(whole):
            return
    for module, parts in pairs.items():
        for part, tensor in parts.items():
            if not _sum_is_finite(tensor):
                bad = int((~torch.isfinite(tensor)).sum())
                if bad:
                    raise AdapterFormatError(f"{where}: {module}.{part} holds {bad} NaN/Inf values")


def _sum_is_finite(tensor: torch.Tensor) -> bool:
    # One reduction instead of a full boolean mask (12x faster on a CPU core): a NaN or Inf makes
    # the sum non-finite. A non-finite sum of finite values (overflow) makes the caller count
    # exactly, which then finds nothing.
    total = tensor.sum(dtype=torch.float64 if tensor.dtype == torch.float64 else torch.float32)
    return bool(torch.isfinite(total))


def _pack(
    adapter_id: str,
    raw: RawAdapter,
    found: Mapping[str, tuple[torch.Tensor, torch.Tensor, float]],
    dtype: torch.dtype,
    pin_memory: bool,
    source_dtype: torch.dtype | None,
    heads: Mapping[str, Mapping[str, torch.Tensor]],
) -> AdapterWeights:
    """Validated factors as views of one storage of ``dtype`` (see :attr:`AdapterWeights.storage`).

    ``source_dtype``: :func:`_packed_dtype` of ``raw``.
    """
    buffer = raw.buffer
    if buffer is None or source_dtype is None:
        layers = {n: LayerLora(a, b, s) for n, (a, b, s) in found.items()}
        return pack_weights(
            AdapterWeights(adapter_id, layers, raw.origin, heads=heads),
            pin_memory=pin_memory,
            dtype=dtype,
        )
    # The file's data section holds exactly these tensors: keep it (same dtype, and pinned if
    # asked: no copy at all), or convert it with one call; each factor keeps its place in it.
    source = buffer.view(source_dtype)
    if source_dtype == dtype and (buffer.is_pinned() or not pin_memory):
        # The factors already are views of this memory: nothing to copy, nothing to re-view.
        layers = {n: LayerLora(a, b, s) for n, (a, b, s) in found.items()}
        nbytes = source.numel() * dtype.itemsize
        return AdapterWeights(adapter_id, layers, raw.origin, nbytes=nbytes, storage=source, heads=heads)
    storage = torch.empty(source.numel(), dtype=dtype, pin_memory=pin_memory)
    storage.copy_(source)
    base, itemsize = buffer.data_ptr(), source_dtype.itemsize

    def moved(tensor: torch.Tensor) -> torch.Tensor:
        return view_at(storage, (tensor.data_ptr() - base) // itemsize, tensor.shape)

    layers = {n: LayerLora(moved(a), moved(b), s) for n, (a, b, s) in found.items()}
    placed = {h: {k: moved(t) for k, t in tensors.items()} for h, tensors in heads.items()}
    nbytes = storage.numel() * dtype.itemsize
    return AdapterWeights(adapter_id, layers, raw.origin, nbytes=nbytes, storage=storage, heads=placed)


def pack_weights(weights: AdapterWeights, *, pin_memory: bool, dtype: torch.dtype | None = None) -> AdapterWeights:
    """The same weights as views of one new contiguous CPU storage (page-locked with ``pin_memory``).

    Each factor keeps its layout (``a`` ``[r, in]``, ``b`` ``[out, r]``, both row-major), in layer order.
    Weights that already have a fitting storage are returned as they are.
    """
    dtype = dtype or next((lora.a.dtype for lora in weights.layers.values()), torch.float32)
    current = weights.storage
    if current is not None and current.dtype == dtype and current.device.type == "cpu":
        if current.is_pinned() or not pin_memory:
            return weights
    total = sum(lora.a.numel() + lora.b.numel() for lora in weights.layers.values())
    total += sum(t.numel() for tensors in weights.heads.values() for t in tensors.values())
    storage = torch.empty(total, dtype=dtype, pin_memory=pin_memory)
    offset = 0

    def place(tensor: torch.Tensor) -> torch.Tensor:
        nonlocal offset
        view = view_at(storage, offset, tensor.shape)
        view.copy_(tensor.detach())
        offset += tensor.numel()
        return view

    layers = {name: LayerLora(place(lora.a), place(lora.b), lora.scale) for name, lora in weights.layers.items()}
    heads = {h: {k: place(t) for k, t in tensors.items()} for h, tensors in weights.heads.items()}
    nbytes = total * storage.element_size()
    return AdapterWeights(weights.adapter_id, layers, weights.origin, nbytes=nbytes, storage=storage, heads=heads)


_LORA_B_BIAS = re.compile(r"\.lora_B(\.[^.]+)?\.bias$")


def _split_key(
    where: str, key: str, heads: Mapping[str, HeadSpec] | None = None, match: re.Match[str] | None = None
) -> tuple[str, str]:
    """``(module path, "lora_A" | "lora_B")`` of a LoRA tensor key; ``match``: ``_KEY.match(key)`` if known."""
    if "lora_magnitude_vector" in key:
        raise UnsupportedAdapterError(f"{where}: DoRA weights are not supported (tensor {key!r})")
    if "modules_to_save" in key:
        wrapped = sorted(heads or ())
        raise UnsupportedAdapterError(
            f"{where}: tensor {key!r} is a saved copy of a module (`modules_to_save`) that the model does not "
            f"wrap as a head (wrapped heads: {wrapped}); name the module in WrapConfig(modules_to_save=[...])"
        )
    if "lora_embedding_" in key:
        raise UnsupportedAdapterError(f"{where}: LoRA on embedding layers is not supported (tensor {key!r})")
    if match is None and _LORA_B_BIAS.search(key):  # (a key that matches _KEY ends in ".weight")
        raise UnsupportedAdapterError(f"{where}: LoRA bias is not supported (tensor {key!r})")
    match = match or _KEY.match(key)
    if match is None:
        raise AdapterFormatError(
            f"{where}: tensor {key!r} is not a LoRA weight (expected '...lora_A.weight') nor a tensor of a "
            f"wrapped head module (`modules_to_save`; wrapped heads: {sorted(heads or ())})"
        )
    module = match["module"]
    for prefix in ("base_model.model.",):
        if module.startswith(prefix):
            module = module[len(prefix) :]
    return module, match["part"]


def _check_kind(where: str, name: str, tensor: torch.Tensor | TensorMeta) -> None:
    if not isinstance(tensor, (torch.Tensor, TensorMeta)) or len(tensor.shape) != 2:
        shape = tuple(tensor.shape) if isinstance(tensor, (torch.Tensor, TensorMeta)) else type(tensor).__name__
        raise AdapterFormatError(f"{where}: {name} must be a 2-D tensor, got {shape}")
    if not tensor.dtype.is_floating_point:
        raise AdapterFormatError(f"{where}: {name} must be floating point, got {tensor.dtype}")


class _NameResolver:
    """Maps an adapter's module paths to wrapped layer names.

    Exact names first; otherwise one dotted-suffix relation, so an adapter trained on
    ``LlamaModel`` (``layers.0...``) also fits a wrapped ``LlamaForCausalLM`` (``model.layers.0...``).
    """

    def __init__(self, layers: Mapping[str, LayerShape]) -> None:
        self._names = list(layers)
        self._exact = set(layers)

    def resolve(self, where: str, module: str) -> str:
        if module in self._exact:
            return module
        found = [n for n in self._names if n.endswith("." + module) or module.endswith("." + n)]
        if len(found) == 1:
            return found[0]
        if not found:
            raise AdapterFormatError(
                f"{where}: weights for module {module!r}, which is not a wrapped layer "
                f"(wrapped layers look like {self._names[:3]})"
            )
        raise AdapterFormatError(f"{where}: module {module!r} matches several wrapped layers: {found[:4]}")
