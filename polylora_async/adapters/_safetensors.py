"""A strict safetensors reader: the header checked as the format's reference checks it, the data read in one piece."""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .._errors import (
    AdapterLoadError,
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
