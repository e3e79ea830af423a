"""Reading PEFT LoRA adapters and validating them against the wrapped model.

Identity, raw files and validated weights stay apart: :class:`RawAdapter` is what a source holds
(a PEFT config dict and its tensors), :class:`AdapterWeights` is what the model can place into a
slot (per wrapped layer: A, B and the scale), validated against that model's layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import pickle
import re
import struct
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ._errors import (
    AdapterFormatError,
    AdapterLoadError,
    PolyLoraWarning,
    UnsupportedAdapterError,
)
from ._heads import HeadSpec, check_head, check_head_layout, split_head_key

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
PICKLE_FILE = "adapter_model.bin"

# Config keys whose presence (truthy value) changes the forward pass in ways this runtime does not
# implement: each is refused by name rather than silently served wrong. Serving one of them is
# removing its entry here (every other field of PEFT's LoraConfig is accepted: _lora_config_keys).
_UNSUPPORTED_FLAGS: dict[str, str] = {
    "use_dora": "DoRA (weight-decomposed LoRA)",
    "lora_bias": "LoRA bias on lora_B",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (`target_parameters`)",
    "trainable_token_indices": "trainable token embeddings",
    "alora_invocation_tokens": "activated LoRA (aLoRA)",
    "use_qalora": "QA-LoRA input pooling",
    "use_bdlora": "block-diagonal LoRA",
    "arrow_config": "Arrow routing",
    "velora_config": "VeLoRA",
    "monteclora_config": "MonteCLoRA",
    "kasa_config": "KaSA",
    "megatron_config": "Megatron parallel layers",
}

_warned_unknown_keys: set[frozenset[str]] = set()
_warned_fan_in_fan_out: set[tuple[str, bool]] = set()


@functools.cache
def _lora_config_keys() -> frozenset[str]:
    """The fields of PEFT's ``LoraConfig`` (those of its base config included).

    These are the keys a saved ``adapter_config.json`` holds. Those not refused by
    :data:`_UNSUPPORTED_FLAGS` (or `bias`) do not change what a loaded adapter computes at
    inference: initialisation, training-time settings, bookkeeping, or coverage that the saved
    weights already express. Any other key draws a warning. Imported on first use: importing
    PEFT takes seconds (it imports transformers), too much for ``import polylora_async``.
    """
    from peft import LoraConfig

    return frozenset(f.name for f in dataclasses.fields(LoraConfig))


@dataclass(frozen=True)
class RawAdapter:
    """An adapter as its source holds it, before validation against a model.

    Attributes:
        config: the PEFT ``adapter_config.json`` content.
        tensors: the state dict, keyed as PEFT saves it (``base_model.model.<path>.lora_A.weight``).
        origin: where it came from, for error messages (a path, or a description).
    """

    config: Mapping[str, Any]
    tensors: Mapping[str, torch.Tensor]
    origin: str
    buffer: torch.Tensor | None = None
    """When set: a 1-D uint8 tensor that ``tensors`` are views of and that they cover exactly (a
    safetensors file's data section, read in one piece), so checks and conversions can run once
    over the whole adapter instead of once per tensor."""


@dataclass(frozen=True)
class LayerLora:
    """One layer's LoRA factors: ``delta(x) = scale * (x @ a.T) @ b.T``.

    Attributes:
        a: ``[r, in_features]``.
        b: ``[out_features, r]``.
        scale: ``lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA).
    """

    a: torch.Tensor
    b: torch.Tensor
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])


@dataclass(frozen=True)
class AdapterWeights:
    """A validated adapter for one wrapped model: per wrapped layer name, its LoRA factors.

    Layers the adapter does not cover are absent (rank 0 there: no work, base output unchanged).
    """

    adapter_id: str
    layers: Mapping[str, LayerLora]
    origin: str
    nbytes: int = field(default=0)
    storage: torch.Tensor | None = None
    """When set: a 1-D tensor of the weights' dtype that every ``a`` and ``b`` (and every head
    tensor) is a view of (:func:`pack_weights`). A slot write then moves the whole adapter to the
    device in one copy."""
    heads: Mapping[str, Mapping[str, torch.Tensor]] = field(default_factory=dict)
    """The adapter's own copies of whole modules (``modules_to_save``): wrapped head name -> its
    state dict (keys relative to the module). Counted in :attr:`nbytes`."""

    @property
    def max_rank(self) -> int:
        return max((lora.rank for lora in self.layers.values()), default=0)


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------


def read_peft_directory(
    adapter_id: str, path: str | os.PathLike[str], *, pin_memory: bool = False
) -> RawAdapter:
    """Read a PEFT adapter directory (``adapter_config.json`` + weights) without validating it.

    ``adapter_model.safetensors`` is preferred and read in one piece into one buffer (page-locked
    with ``pin_memory``, so weights of the model's dtype never need another host copy);
    ``adapter_model.bin`` is read only through ``torch.load(weights_only=True)``, which refuses
    arbitrary pickled objects.

    Raises:
        AdapterLoadError: the directory or a file is missing, truncated or corrupt.
    """
    root = Path(path)
    config = _read_config(adapter_id, root)
    weights_path = _weights_file(adapter_id, root)
    buffer = None
    if weights_path.name == SAFETENSORS_FILE:
        tensors, buffer = read_safetensors(adapter_id, weights_path, pin_memory=pin_memory)
    else:
        tensors = _read_torch_pickle(adapter_id, weights_path)
    return RawAdapter(config=config, tensors=tensors, origin=str(root), buffer=buffer)


def _read_config(adapter_id: str, root: Path) -> dict[str, Any]:
    """The ``adapter_config.json`` of a PEFT directory, as a dict.

    Raises:
        AdapterLoadError: ``root`` is not a directory, or the file is missing or not a JSON object.
    """
    if not root.is_dir():
        raise AdapterLoadError(f"adapter {adapter_id!r}: {str(root)!r} is not a directory")
    config_path = root / CONFIG_FILE
    if not config_path.is_file():
        nested = sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}"))
        hint = f"; sub-folders holding one: {nested}" if nested else ""
        raise AdapterLoadError(f"adapter {adapter_id!r}: missing {str(config_path)!r}{hint}")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise AdapterLoadError(f"adapter {adapter_id!r}: cannot parse {str(config_path)!r}: {exc}") from exc
    if not isinstance(config, dict):
        raise AdapterLoadError(
            f"adapter {adapter_id!r}: {str(config_path)!r} must hold a JSON object, got {type(config).__name__}"
        )
    return config


def _weights_file(adapter_id: str, root: Path) -> Path:
    """``adapter_model.safetensors`` if the directory has one, else ``adapter_model.bin``.

    Raises:
        AdapterLoadError: it has neither.
    """
    for name in (SAFETENSORS_FILE, PICKLE_FILE):
        if (root / name).is_file():
            return root / name
    raise AdapterLoadError(
        f"adapter {adapter_id!r}: no weights in {str(root)!r} (expected {SAFETENSORS_FILE} or {PICKLE_FILE})"
    )


# safetensors dtype names (the format's own spelling) -> the torch dtype the reference reader gives
# and the bits per element: every dtype that ``safetensors.safe_open(framework="pt")`` reads. F4
# packs two elements per byte (torch's ``float4_e2m1fn_x2``: the last dimension is halved).
_SAFETENSORS_DTYPES: dict[str, tuple[torch.dtype, int]] = {
    "F64": (torch.float64, 64),
    "F32": (torch.float32, 32),
    "F16": (torch.float16, 16),
    "BF16": (torch.bfloat16, 16),
    "F8_E4M3": (torch.float8_e4m3fn, 8),
    "F8_E4M3FNUZ": (torch.float8_e4m3fnuz, 8),
    "F8_E5M2": (torch.float8_e5m2, 8),
    "F8_E5M2FNUZ": (torch.float8_e5m2fnuz, 8),
    "F8_E8M0": (torch.float8_e8m0fnu, 8),
    "F4": (torch.float4_e2m1fn_x2, 4),
    "C64": (torch.complex64, 64),
    "I64": (torch.int64, 64),
    "I32": (torch.int32, 32),
    "I16": (torch.int16, 16),
    "I8": (torch.int8, 8),
    "U64": (torch.uint64, 64),
    "U32": (torch.uint32, 32),
    "U16": (torch.uint16, 16),
    "U8": (torch.uint8, 8),
    "BOOL": (torch.bool, 8),
}
# The limits the reference reader applies: the header size; sizes and offsets are unsigned 64-bit
# integers (and torch shapes signed ones); its JSON parser nests at most 127 levels.
_MAX_HEADER_BYTES = 100_000_000
_MAX_USIZE = 2**64 - 1
_MAX_DIM = 2**63 - 1
_MAX_JSON_DEPTH = 127
_TENSOR_FIELDS = ("dtype", "shape", "data_offsets")


def read_safetensors(
    adapter_id: str, path: Path, *, pin_memory: bool = False
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read a safetensors file: its tensors, and the one uint8 buffer they are views of.

    The format is an 8-byte little-endian header length, a UTF-8 JSON header (tensor name ->
    dtype, shape and byte offsets into the data section; optionally ``__metadata__``, a string ->
    string map) and the data section. A file is accepted exactly when the reference reader
    (``safetensors.safe_open`` with torch) accepts it: a header of at most 100,000,000 bytes
    holding one JSON object, tensors whose byte ranges, sorted, tile the data section from its
    first byte to the end of the file, each exactly as long as its dtype and shape need (no gaps,
    no overlaps, no trailing bytes; zero-size tensors allowed). A name given twice means its last
    entry, as there. ``tests/test_safetensors.py`` compares the two over crafted and fuzzed files.

    The data section is read with one ``readinto`` straight into one buffer (page-locked with
    ``pin_memory``; no per-tensor allocation or copy, and the interpreter lock is released during
    the read), and every tensor is a view of it. The buffer is returned when every tensor is a
    view; a tensor at an offset that is not a multiple of its element size (legal, never written
    in practice) is a copy instead, and then the buffer is ``None``.

    Raises:
        AdapterLoadError: the file is missing, truncated, or not a valid safetensors file.
    """
    where = f"adapter {adapter_id!r}: cannot read {str(path)!r}"
    try:
        with open(path, "rb") as file:
            entries, data_len = _read_header(where, file)
            buffer = torch.empty(data_len, dtype=torch.uint8, pin_memory=pin_memory)
            view = memoryview(buffer.numpy())  # type: ignore[arg-type]
            done = 0
            while done < data_len:
                got = file.readinto(view[done:])
                if not got:
                    raise AdapterLoadError(f"{where}: the file shrank while it was read")
                done += got
    except OSError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from exc
    tensors: dict[str, torch.Tensor] = {}
    typed: dict[torch.dtype, torch.Tensor] = {}
    all_views = True
    for name, dtype, shape, begin in entries:
        tensors[name] = _tensor_view(buffer, typed, dtype, shape, begin)
        all_views = all_views and begin % dtype.itemsize == 0  # a misaligned tensor is a copy
    return tensors, (buffer if all_views else None)


@dataclass(frozen=True)
class TensorMeta:
    """One tensor as a safetensors header describes it: what shape and dtype checks need, no data.

    Like a tensor, it has ``shape`` and ``dtype`` (in torch's terms, as :func:`read_safetensors`
    would give the tensor), so one set of rules checks either.
    """

    shape: tuple[int, ...]
    dtype: torch.dtype


def read_safetensors_header(adapter_id: str, path: Path) -> dict[str, TensorMeta]:
    """The tensors of a safetensors file from its header alone: name -> shape and dtype.

    The header is checked exactly as :func:`read_safetensors` checks it, the tiling of the data
    section included (its length comes from the file's size), but no tensor data is read: a
    file whose values are corrupt passes here and fails when it is read.

    Raises:
        AdapterLoadError: the file is missing, truncated, or its header is not a valid safetensors header.
    """
    where = f"adapter {adapter_id!r}: cannot read {str(path)!r}"
    try:
        with open(path, "rb") as file:
            entries, _ = _read_header(where, file)
    except OSError as exc:
        raise AdapterLoadError(f"{where}: {exc}") from exc
    return {name: TensorMeta(shape, dtype) for name, dtype, shape, _ in entries}


def _read_header(where: str, file: Any) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    """Read a safetensors file's header from an open binary file: its checked entries and the data length.

    Leaves the file positioned at the start of the data section.
    """
    size = os.fstat(file.fileno()).st_size
    head = file.read(8)
    if len(head) < 8:
        raise AdapterLoadError(f"{where}: {size} bytes is too short for a safetensors file")
    (header_len,) = struct.unpack("<Q", head)
    if header_len > _MAX_HEADER_BYTES:
        raise AdapterLoadError(
            f"{where}: its header claims {header_len} bytes, above the format's limit of {_MAX_HEADER_BYTES}"
        )
    if header_len > size - 8:
        raise AdapterLoadError(
            f"{where}: its header claims {header_len} bytes but the file has {size} (truncated or not "
            "a safetensors file)"
        )
    header = _parse_safetensors_header(where, file.read(header_len))
    data_len = size - 8 - header_len
    return _safetensors_entries(where, header, data_len), data_len


class _JsonObject(dict[str, Any]):
    """A parsed JSON object that remembers which of its keys were given more than once."""

    repeated: frozenset[str] = frozenset()


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    result = _JsonObject(pairs)  # the last of repeated keys wins, as in the reference
    if len(result) != len(pairs):
        result.repeated = frozenset(k for k, _ in pairs if sum(1 for o, _ in pairs if o == k) > 1)
    return result


def _json_int(text: str) -> int | float:
    # The reference's parser reads "-0" and integers beyond 64 bits as floats (and refuses those
    # too large for a float): a float is no valid size or offset.
    value = int(text)
    if text == "-0" or not -(2**63) <= value <= _MAX_USIZE:
        return _json_float(text)
    return value


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} out of range")
    return value


def _refuse_json_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


# What makes Python's json read a header differently from the reference's parser: a "-0" (a float
# there), or an escape that may be an unpaired surrogate. Headers without either (all that writers
# produce) skip the slower exact checks. (Integers too large for a float, refused there, matter
# only in ignored fields: see _fits_reference_parser.)
_JSON_NEEDS_CARE = re.compile(rb"-0(?![.eE0-9])|\\u[dD][89a-fA-F]")


def _parse_safetensors_header(where: str, raw: bytes) -> _JsonObject:
    """The header's JSON object, parsed as strictly as the reference's parser.

    Python's ``json`` is looser in a few ways, each refused here: ``NaN``/``Infinity``, numbers
    out of a float's range, unpaired surrogate escapes in strings, and (in
    :func:`_tensor_fields`) nesting deeper than 127 levels.
    """
    careful = _JSON_NEEDS_CARE.search(raw) is not None
    try:
        header = json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_json_object,
            parse_int=_json_int if careful else None,
            parse_float=_json_float,
            parse_constant=_refuse_json_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise AdapterLoadError(f"{where}: its header is not valid JSON: {exc}") from exc
    if not isinstance(header, _JsonObject):
        raise AdapterLoadError(f"{where}: its header must be a JSON object, got {type(header).__name__}")
    level: list[Any] = [header] if careful else []
    while level:  # every string, for unpaired surrogates
        nested: list[Any] = []
        for item in level:
            for value in (*item.keys(), *item.values()) if isinstance(item, dict) else item:
                if isinstance(value, str):
                    _check_utf8(where, value)
                elif isinstance(value, (dict, list)):
                    nested.append(value)
        level = nested
    return header


def _fits_reference_parser(value: Any, depth: int) -> bool:
    """Whether the reference's parser reads ``value``, found at nesting ``depth``: at most 127 levels,
    no integer beyond a float's range."""
    level: list[Any] = [value]
    while level:
        depth += 1
        if depth > _MAX_JSON_DEPTH:
            return False
        nested: list[Any] = []
        for container in level:
            for item in container.values() if isinstance(container, dict) else container:
                if isinstance(item, (dict, list)):
                    nested.append(item)
                elif isinstance(item, int) and abs(item) > _MAX_USIZE:
                    try:
                        float(item)
                    except OverflowError:
                        return False
        level = nested
    return True


def _check_utf8(where: str, text: str) -> None:
    # An escaped unpaired surrogate ("\ud800") parses to a str that has no UTF-8 form.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise AdapterLoadError(f"{where}: its header holds an unpaired surrogate in {text!r}") from exc


def _is_usize(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_USIZE


def _safetensors_entries(
    where: str, header: _JsonObject, data_len: int
) -> list[tuple[str, torch.dtype, tuple[int, ...], int]]:
    """The header's tensors sorted by offset, (name, torch dtype, torch shape, begin), all checked."""
    if "__metadata__" in header.repeated:
        raise AdapterLoadError(f"{where}: its header gives `__metadata__` twice")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise AdapterLoadError(f"{where}: its `__metadata__` must map strings to strings, got {metadata!r}")
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        fields = _tensor_fields(where, name, info)
        kind = _SAFETENSORS_DTYPES.get(fields[0]) if isinstance(fields[0], str) else None
        if kind is None:
            raise AdapterLoadError(f"{where}: tensor {name!r} has unsupported dtype {fields[0]!r}")
        dtype, bits = kind
        shape, offsets = fields[1], fields[2]
        if not (isinstance(shape, list) and all(_is_usize(d) for d in shape)):
            raise AdapterLoadError(f"{where}: tensor {name!r} has an invalid shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_usize(o) for o in offsets)):
            raise AdapterLoadError(f"{where}: tensor {name!r} has invalid data_offsets {offsets!r}")
        count = 1
        for extent in (*shape, bits):  # the element count, then its bits: 64-bit, as in the reference
            count *= extent
            if count > _MAX_USIZE:
                raise AdapterLoadError(f"{where}: tensor {name!r} has a shape {shape} too large to address")
        torch_shape = list(shape)
        if bits < 8:  # two elements per byte: the last dimension holds pairs
            if not shape or shape[-1] % 2:
                raise AdapterLoadError(f"{where}: tensor {name!r} of dtype {fields[0]} needs an even last dimension")
            torch_shape[-1] //= 2
        if any(d > _MAX_DIM for d in torch_shape):
            raise AdapterLoadError(f"{where}: tensor {name!r} has a shape {shape} too large for torch")
        entries.append((name, dtype, tuple(torch_shape), offsets[0], offsets[1], count // 8))
    entries.sort(key=lambda e: (e[3], e[4]))
    covered = 0
    for name, _, _, begin, end, nbytes in entries:
        if begin != covered or end < begin:
            problem = "overlaps the tensor before it" if begin < covered else f"leaves bytes {covered}..{begin} unused"
            raise AdapterLoadError(
                f"{where}: tensor {name!r} has data_offsets {[begin, end]}, which "
                f"{'ends before it begins' if end < begin else problem} (tensors must tile the data section)"
            )
        if end - begin != nbytes:
            raise AdapterLoadError(
                f"{where}: tensor {name!r} needs {nbytes} bytes for its dtype and shape, but its data_offsets "
                f"are {[begin, end]}"
            )
        covered = end
    if covered != data_len:
        raise AdapterLoadError(
            f"{where}: its tensors cover {covered} bytes of a {data_len}-byte data section (truncated file or "
            "trailing bytes)"
        )
    return [(name, dtype, shape, begin) for name, dtype, shape, begin, _, _ in entries]


def _tensor_fields(where: str, name: str, info: object) -> tuple[object, object, object]:
    """(dtype, shape, data_offsets) of a header entry: an object, or a 3-element array in that order."""
    if isinstance(info, list) and len(info) == 3:
        return info[0], info[1], info[2]
    if isinstance(info, _JsonObject) and all(key in info for key in _TENSOR_FIELDS):
        twice = info.repeated.intersection(_TENSOR_FIELDS)
        if twice:
            raise AdapterLoadError(f"{where}: tensor {name!r} gives `{min(twice)}` twice")
        if len(info) > len(_TENSOR_FIELDS):
            # Unknown fields are ignored, but the reference still parses them. Nesting counts from
            # the header (1) and this entry (2); accepted fields hold no nesting beyond 3.
            for key, value in info.items():
                if key in _TENSOR_FIELDS:
                    continue
                if not _fits_reference_parser([value], 1):
                    raise AdapterLoadError(
                        f"{where}: tensor {name!r} has a field {key!r} nested deeper than {_MAX_JSON_DEPTH} levels "
                        "or holding a number out of range"
                    )
        return info["dtype"], info["shape"], info["data_offsets"]
    raise AdapterLoadError(f"{where}: tensor {name!r} needs a dtype, a shape and data_offsets, got {info!r:.200}")


def _tensor_view(
    buffer: torch.Tensor, typed: dict[torch.dtype, torch.Tensor], dtype: torch.dtype, shape: tuple[int, ...], begin: int
) -> torch.Tensor:
    """The tensor at byte ``begin`` of ``buffer``: one ``as_strided`` call on a per-dtype view of it."""
    size = dtype.itemsize
    if math.prod(shape) == 0:  # nothing to view (and a huge empty shape has no addressable strides)
        return torch.empty(shape, dtype=dtype)
    if begin % size:  # a misaligned offset (legal in the format, never written in practice): a copy
        return buffer[begin : begin + math.prod(shape) * size].clone().view(dtype).view(shape)
    whole = typed.get(dtype)
    if whole is None:
        whole = typed[dtype] = buffer[: buffer.numel() // size * size].view(dtype)
    return view_at(whole, begin // size, shape)


def view_at(flat: torch.Tensor, offset: int, shape: Sequence[int]) -> torch.Tensor:
    """A contiguous ``shape`` view of the 1-D ``flat`` starting at element ``offset`` (one call)."""
    if len(shape) == 2:  # every LoRA factor
        strides: tuple[int, ...] = (max(shape[1], 1), 1)
    else:
        reverse = []
        step = 1
        for extent in reversed(shape):
            reverse.append(step)
            step *= max(extent, 1)
        strides = tuple(reversed(reverse))
    return flat.as_strided(tuple(shape), strides, flat.storage_offset() + offset)


def _read_torch_pickle(adapter_id: str, path: Path) -> dict[str, torch.Tensor]:
    try:
        loaded = torch.load(str(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, ValueError) as exc:
        raise AdapterLoadError(
            f"adapter {adapter_id!r}: cannot read {str(path)!r} with the safe loader: {exc}"
        ) from exc
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise AdapterLoadError(f"adapter {adapter_id!r}: {str(path)!r} does not hold a dict of tensors")
    return loaded


def raw_from_peft_model(adapter_id: str, peft_model: Any, adapter_name: str | None = None) -> RawAdapter:
    """Take one named adapter out of an in-memory ``peft.PeftModel`` (weights copied to CPU)."""
    from peft import get_peft_model_state_dict

    configs = getattr(peft_model, "peft_config", None)
    if not isinstance(configs, Mapping):
        raise AdapterFormatError(f"adapter {adapter_id!r}: {type(peft_model).__name__} is not a PeftModel")
    name = adapter_name if adapter_name is not None else getattr(peft_model, "active_adapter", "default")
    if name not in configs:
        raise AdapterFormatError(
            f"adapter {adapter_id!r}: the PeftModel has no adapter named {name!r} (it has {sorted(configs)})"
        )
    config = configs[name].to_dict()
    state = get_peft_model_state_dict(peft_model, adapter_name=name)
    tensors = {k: v.detach().to("cpu", copy=True) for k, v in state.items()}
    return RawAdapter(config=config, tensors=tensors, origin=f"PeftModel adapter {name!r}")


def raw_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], config: Mapping[str, Any] | Any, origin: str = "state dict"
) -> RawAdapter:
    """Wrap a PEFT-style state dict and its config (a dict or a ``peft.LoraConfig``)."""
    if not isinstance(config, Mapping):
        to_dict = getattr(config, "to_dict", None)
        if to_dict is None:
            raise AdapterFormatError(f"{origin}: config must be a mapping or a peft.LoraConfig")
        config = to_dict()
    return RawAdapter(config=dict(config), tensors=dict(state_dict), origin=origin)


# ---------------------------------------------------------------------------------------------
# Validation against a model
# ---------------------------------------------------------------------------------------------

_KEY = re.compile(r"^(?P<module>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<name>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LayerShape:
    in_features: int
    out_features: int
    conv1d: bool = False
    """The base layer is a GPT-2 style ``Conv1D`` (weight ``[in, out]``), not an ``nn.Linear``."""


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


@dataclass(frozen=True)
class _LoraSpec:
    r: int
    alpha: float
    use_rslora: bool
    rank_pattern: Mapping[str, int]
    alpha_pattern: Mapping[str, float]
    fan_in_fan_out: bool = False

    @classmethod
    def parse(cls, where: str, config: Mapping[str, Any], *, warn_unknown: bool = True) -> _LoraSpec:
        """The config's LoRA settings; refuses unsupported features and malformed fields.

        ``warn_unknown``: warn (once per set of keys) about keys PEFT's ``LoraConfig`` does not
        have; that needs PEFT imported (seconds), which a registration-time check avoids.
        """
        raw_type = config.get("peft_type", "LORA")
        peft_type = str(getattr(raw_type, "value", raw_type))  # an enum when taken from a live PeftModel
        if peft_type.upper() != "LORA":
            raise UnsupportedAdapterError(f"{where}: field `peft_type` is {peft_type!r}; only 'LORA' is served")
        for key, feature in _UNSUPPORTED_FLAGS.items():
            value = config.get(key)
            if value not in (None, False, [], {}, ()):
                raise UnsupportedAdapterError(f"{where}: field `{key}`={value!r}: {feature} is not supported")
        bias = config.get("bias", "none")
        if bias != "none":
            raise UnsupportedAdapterError(f"{where}: field `bias`={bias!r}: LoRA bias is not supported")
        unknown = frozenset(config) - _lora_config_keys() if warn_unknown else frozenset()
        if unknown and unknown not in _warned_unknown_keys:
            _warned_unknown_keys.add(unknown)
            warnings.warn(
                f"{where}: ignoring unknown adapter_config keys {sorted(unknown)}", PolyLoraWarning, stacklevel=4
            )
        r = config.get("r", 8)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise AdapterFormatError(f"{where}: field `r` must be an integer >= 1, got {r!r}")
        alpha = config.get("lora_alpha", 8)
        if not isinstance(alpha, (int, float)) or isinstance(alpha, bool) or not math.isfinite(alpha):
            raise AdapterFormatError(f"{where}: field `lora_alpha` must be a finite number, got {alpha!r}")
        rank_pattern = config.get("rank_pattern") or {}
        alpha_pattern = config.get("alpha_pattern") or {}
        for name, pattern in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
            if not isinstance(pattern, Mapping):
                raise AdapterFormatError(f"{where}: field `{name}` must be a mapping, got {pattern!r}")
            for key, value in pattern.items():
                if not isinstance(value, (int, float)) or isinstance(value, bool):
                    raise AdapterFormatError(f"{where}: field `{name}`[{key!r}] must be a number, got {value!r}")
        fan_in_fan_out = config.get("fan_in_fan_out", False)
        if not isinstance(fan_in_fan_out, bool):
            raise AdapterFormatError(f"{where}: field `fan_in_fan_out` must be true or false, got {fan_in_fan_out!r}")
        return cls(
            r=r,
            alpha=float(alpha),
            use_rslora=bool(config.get("use_rslora", False)),
            rank_pattern=rank_pattern,
            alpha_pattern=alpha_pattern,
            fan_in_fan_out=fan_in_fan_out,
        )

    def rank_for(self, module: str) -> int:
        return int(_pattern_value(self.rank_pattern, module, self.r))

    def scale_for(self, module: str, rank: int) -> float:
        alpha = float(_pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(rank) if self.use_rslora else alpha / rank


def _pattern_value(pattern: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's rule: the first key that matches a dotted suffix of the module path (as a regex)."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default
