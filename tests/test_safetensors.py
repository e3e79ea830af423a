"""The safetensors reader accepts exactly what the reference reader accepts, and reads the same tensors.

A differential test: every file, crafted or fuzzed, goes to both ``read_safetensors`` and
``safetensors.safe_open`` (reading every tensor, as a load does). Both accept it or both refuse
it; when both accept it, the tensors agree in name, dtype, shape and bytes.
"""

from __future__ import annotations

import json
import random
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save

from polylora_async import AdapterLoadError
from polylora_async.adapters import read_safetensors

Tensors = dict[str, torch.Tensor]


def _reference(path: Path) -> Tensors | None:
    try:
        with safe_open(str(path), framework="pt") as file:
            return {name: file.get_tensor(name) for name in file.keys()}
    except Exception:  # the reference raises several types (SafetensorError, TypeError...): all refusals
        return None


def _ours(path: Path) -> Tensors | None:
    try:
        tensors, buffer = read_safetensors("fuzz", path)
    except AdapterLoadError:  # any other exception fails the test: refusals must be typed
        return None
    if buffer is not None:  # when a buffer is returned, every non-empty tensor is a view of it
        start, stop = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
        assert all(t.numel() == 0 or start <= t.data_ptr() < stop for t in tensors.values())
    return tensors


def _raw_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _check_same(path: Path, blob: bytes) -> bool:
    """Write ``blob`` to ``path``, read it both ways, assert they agree; True if both accepted it."""
    path.write_bytes(blob)
    reference, ours = _reference(path), _ours(path)
    shown = blob[:200]
    verdict = "refused" if reference is None else "accepted"
    assert (reference is None) == (ours is None), f"the reference {verdict} {shown!r}"
    if reference is None or ours is None:
        return False
    assert ours.keys() == reference.keys(), shown
    for name, tensor in reference.items():
        mine = ours[name]
        assert (mine.dtype, mine.shape) == (tensor.dtype, tensor.shape), (name, shown)
        if tensor.numel():
            assert _raw_bytes(mine) == _raw_bytes(tensor), (name, shown)
    return True


def _file(header: object, data: bytes = b"", *, length: int | None = None) -> bytes:
    text = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def _entry(dtype: Any, shape: Any, begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def _valid_files() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    return [
        save(
            {
                "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 6, generator=g),
                "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(5, 4, generator=g),
            },
            metadata={"format": "pt"},
        ),
        save(
            {
                "h": torch.randn(3, 2, generator=g).to(torch.bfloat16),
                "b": torch.tensor([True, False, True]),
                "i": torch.arange(7, dtype=torch.int64),
                "z": torch.zeros(0, 3),
                "s": torch.tensor(1.5, dtype=torch.float16),
            }
        ),
        save({}),
    ]


_U8 = _entry("U8", [2], 0, 2)
_CRAFTED: dict[str, bytes] = {
    "empty file": b"",
    "short length": b"\x01\x02\x03",
    "length only": _file(b"", length=0),
    "empty object": _file("{}"),
    "object padded with spaces": _file("{}      "),
    "length past the end": _file({"t": _U8}, b"12", length=10_000),
    "length of 100,000,000 (the limit)": _file("{}", length=100_000_000),
    "length above the limit": _file("{}", length=100_000_001),
    "length of 100 MiB": _file("{}", length=100 * 1024 * 1024),
    "length of 2**64-1": _file("{}", length=2**64 - 1),
    "header truncated": _file({"t": _U8}, b"12")[:20],
    "data truncated": _file({"t": _U8}, b"1"),
    "trailing bytes": _file({"t": _U8}, b"123"),
    "trailing bytes, no tensors": _file("{}", b"x"),
    "gap at the start": _file({"t": _entry("U8", [2], 1, 3)}, b"123"),
    "gap between tensors": _file({"a": _entry("U8", [1], 0, 1), "b": _entry("U8", [1], 2, 3)}, b"123"),
    "overlap": _file({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 1, 3)}, b"123"),
    "same range twice": _file({"a": _entry("U8", [2], 0, 2), "b": _entry("U8", [2], 0, 2)}, b"12"),
    "offsets out of order in the header": _file({"b": _entry("U8", [1], 1, 2), "a": _entry("U8", [1], 0, 1)}, b"12"),
    "end before begin": _file({"t": _entry("U8", [0], 2, 0)}, b"12"),
    "zero-size tensors around another": _file(
        {"z0": _entry("F32", [0, 3], 0, 0), "t": _U8, "z1": _entry("U8", [0], 2, 2)}, b"12"
    ),
    "scalar": _file({"t": _entry("F32", [], 0, 4)}, b"\0\0\x80?"),
    "shape too small for its bytes": _file({"t": _entry("F32", [1], 0, 8)}, b"\0" * 8),
    "shape too big for its bytes": _file({"t": _entry("F32", [3], 0, 8)}, b"\0" * 8),
    "negative shape": _file({"t": _entry("U8", [-2], 0, 2)}, b"12"),
    "float shape": _file({"t": _entry("U8", [2.0], 0, 2)}, b"12"),
    "exponent shape": _file('{"t":{"dtype":"U8","shape":[2e0],"data_offsets":[0,2]}}', b"12"),
    "minus zero shape": _file('{"t":{"dtype":"U8","shape":[-0],"data_offsets":[0,0]}}'),
    "boolean shape": _file({"t": _entry("U8", [True], 0, 1)}, b"1"),
    "string shape": _file({"t": _entry("U8", ["2"], 0, 2)}, b"12"),
    "shape not a list": _file({"t": _entry("U8", 2, 0, 2)}, b"12"),
    "negative offset": _file({"t": _entry("U8", [0], -1, -1)}),
    "float offset": _file({"t": _entry("U8", [2], 0.0, 2)}, b"12"),
    "three offsets": _file({"t": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2, 2]}}, b"12"),
    "offsets beyond 64 bits": _file({"t": _entry("U8", [0], 2**64, 2**64)}),
    "shape product overflows 64 bits": _file({"t": _entry("U8", [2**32, 2**32, 0], 0, 0)}),
    "shape product overflows with the element size": _file({"t": _entry("F64", [2**62, 0], 0, 0)}),
    "empty shape with a 2**63 dimension": _file({"t": _entry("U8", [0, 2**63], 0, 0)}),
    "empty shape with a 2**63-1 dimension": _file({"t": _entry("U8", [2**63 - 1, 0], 0, 0)}),
    "unknown dtype": _file({"t": _entry("Q7", [2], 0, 2)}, b"12"),
    "lower-case dtype": _file({"t": _entry("f32", [1], 0, 4)}, b"1234"),
    "dtype not a string": _file({"t": _entry(4, [1], 0, 4)}, b"1234"),
    "every dtype": _file(
        {
            name: _entry(name, [2], 16 * i, 16 * i + size * 2)
            for i, (name, size) in enumerate([("F64", 8), ("C64", 8), ("I64", 8), ("U64", 8)])
        },
        b"\1" * 64,
    ),
    "16-bit dtypes": _file(
        {n: _entry(n, [1], 2 * i, 2 * i + 2) for i, n in enumerate(["F16", "BF16", "I16", "U16"])}, b"\1\2" * 4
    ),
    "32-bit dtypes": _file(
        {n: _entry(n, [1], 4 * i, 4 * i + 4) for i, n in enumerate(["F32", "I32", "U32"])}, b"\0\0\x80?" * 3
    ),
    "8-bit dtypes": _file(
        {
            n: _entry(n, [1], i, i + 1)
            for i, n in enumerate(["F8_E4M3", "F8_E4M3FNUZ", "F8_E5M2", "F8_E5M2FNUZ", "F8_E8M0", "I8", "U8", "BOOL"])
        },
        b"\1" * 8,
    ),
    "F4, an even last dimension": _file({"t": _entry("F4", [3, 2], 0, 3)}, b"123"),
    "F4, an odd last dimension": _file({"t": _entry("F4", [2, 3], 0, 3)}, b"123"),
    "F4, a scalar": _file({"t": _entry("F4", [], 0, 0)}),
    "F6, not read by torch": _file({"t": _entry("F6_E2M3", [4], 0, 3)}, b"123"),
    "misaligned F32": _file({"h": _entry("BF16", [1], 0, 2), "f": _entry("F32", [1], 2, 6)}, b"\1\2\0\0\x80?"),
    "tensor as an array": _file('{"t":["U8",[2],[0,2]]}', b"12"),
    "tensor as a short array": _file('{"t":["U8",[2]]}', b"12"),
    "tensor as a long array": _file('{"t":["U8",[2],[0,2],1]}', b"12"),
    "tensor missing its shape": _file({"t": {"dtype": "U8", "data_offsets": [0, 2]}}, b"12"),
    "tensor with an unknown field": _file({"t": {**_U8, "extra": [[{"x": 1}]]}}, b"12"),
    "tensor with a field twice": _file('{"t":{"dtype":"U8","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    "tensor with an unknown field twice": _file(
        '{"t":{"x":1,"x":2,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"
    ),
    "tensor null": _file('{"t":null}'),
    "tensor a number": _file('{"t":3}'),
    "name twice, the last one fits": _file(
        '{"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
        b"12",
    ),
    "name twice, the first one fits": _file(
        '{"t":{"dtype":"U8","shape":[2],"data_offsets":[0,2]},"t":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
        b"12",
    ),
    "metadata": _file({"__metadata__": {"format": "pt", "x": ""}, "t": _U8}, b"12"),
    "metadata only": _file({"__metadata__": {"a": "b"}}),
    "metadata null": _file({"__metadata__": None, "t": _U8}, b"12"),
    "metadata empty": _file({"__metadata__": {}, "t": _U8}, b"12"),
    "metadata with a number": _file({"__metadata__": {"a": 1}, "t": _U8}, b"12"),
    "metadata nested": _file({"__metadata__": {"a": {"b": "c"}}, "t": _U8}, b"12"),
    "metadata a list": _file({"__metadata__": ["a"], "t": _U8}, b"12"),
    "metadata a string": _file({"__metadata__": "a", "t": _U8}, b"12"),
    "metadata twice": _file('{"__metadata__":{"a":"b"},"__metadata__":{"a":"c"}}'),
    "metadata key twice": _file('{"__metadata__":{"a":"1","a":"2"}}'),
    "top level an array": _file("[]"),
    "top level a string": _file('"x"'),
    "top level null": _file("null"),
    "not JSON": _file("{no}"),
    "trailing text after the object": _file('{}x'),
    "trailing NUL after the object": _file("{}\0"),
    "leading whitespace": _file(" \n\t{}"),
    "UTF-8 byte order mark": _file("\ufeff{}"),
    "not UTF-8": _file(b'{"\xff":' + json.dumps(_U8).encode() + b"}", b"12"),
    "UTF-8 name": _file({"poids é ✓": _U8}, b"12"),
    "unpaired surrogate in a name": _file('{"\\ud800":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    "unpaired surrogate in an unknown field": _file(
        '{"t":{"x":["\\udc00"],"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"
    ),
    "surrogate pair": _file('{"t":{"x":"\\ud83d\\ude00","dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    "control character in a name": _file('{"t\x01":{"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    "NaN in an unknown field": _file('{"t":{"x":NaN,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    "float overflow in an unknown field": _file(
        '{"t":{"x":1e400,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"
    ),
    "huge integer in an unknown field": _file(
        '{"t":{"x":' + "9" * 400 + ',"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"
    ),
    "minus zero in an unknown field": _file('{"t":{"x":-0,"dtype":"U8","shape":[2],"data_offsets":[0,2]}}', b"12"),
    **{
        f"nesting {depth} deep": _file(
            '{"t":{"x":' + "[" * (depth - 2) + "]" * (depth - 2) + ',"dtype":"U8","shape":[2],"data_offsets":[0,2]}}',
            b"12",
        )
        for depth in (127, 128, 2000)
    },
}


@pytest.mark.parametrize("name", list(_CRAFTED))
def test_crafted_file(tmp_path: Path, name: str) -> None:
    _check_same(tmp_path / "f.safetensors", _CRAFTED[name])


def test_valid_files_are_read_as_views_of_one_buffer(tmp_path: Path) -> None:
    for blob in _valid_files():
        path = tmp_path / "v.safetensors"
        assert _check_same(path, blob)
        tensors, buffer = read_safetensors("v", path)
        assert buffer is not None and buffer.numel() == sum(t.numel() * t.element_size() for t in tensors.values())


def _mutate_header(rng: random.Random, header: dict[str, Any]) -> None:
    """One structural edit of a parsed header: the changes a careless or hostile writer makes."""
    names = [n for n in header if n != "__metadata__"]
    if not names:
        header[str(rng.random())] = _entry("F32", [1], 0, 4)
        return
    name = rng.choice(names)
    info = header[name]
    if not (isinstance(info, dict) and {"dtype", "shape", "data_offsets"} <= info.keys()):
        header[name] = _entry("U8", [0], 0, 0)  # an earlier edit broke it: a fresh one to edit next time
        return
    if not (isinstance(info["shape"], list) and isinstance(info["data_offsets"], list)) or len(
        info["data_offsets"]
    ) != 2:
        info["shape"], info["data_offsets"] = [1], [0, 1]
        return
    choice = rng.randrange(9)
    if choice == 0:
        info["dtype"] = rng.choice(["F32", "F16", "BF16", "F64", "U8", "I64", "BOOL", "F4", "F8_E4M3", "X", 3, None])
    elif choice == 1 and info["shape"]:
        i = rng.randrange(len(info["shape"]))
        info["shape"][i] = rng.choice([0, 1, info["shape"][i] + 1, info["shape"][i] - 1, -1, 2.0, 2**64, True])
    elif choice == 2:
        info["shape"] = info["shape"] + [rng.choice([0, 1, 2])] if rng.random() < 0.5 else info["shape"][:-1]
    elif choice == 3:
        j = rng.randrange(2)
        info["data_offsets"][j] += rng.choice([-4, -2, -1, 1, 2, 4, 10**6])
    elif choice == 4:
        delta = rng.choice([-2, -1, 1, 2])
        info["data_offsets"] = [info["data_offsets"][0] + delta, info["data_offsets"][1] + delta]
    elif choice == 5:
        del info[rng.choice(["dtype", "shape", "data_offsets"])]
    elif choice == 6:
        header["__metadata__"] = rng.choice([{"a": "b"}, {"a": 1}, None, [], "x"])
    elif choice == 7:
        header[rng.choice(names)] = rng.choice([None, 1, [], [info["dtype"], info["shape"], info["data_offsets"]]])
    else:
        info["data_offsets"] = [float(o) for o in info["data_offsets"]] if rng.random() < 0.5 else [-1, 0]


def _mutate(rng: random.Random, blob: bytes) -> bytes:
    (length,) = struct.unpack("<Q", blob[:8])
    header, data = blob[8 : 8 + length], blob[8 + length :]
    choice = rng.randrange(8)
    if choice == 0:  # flip a byte anywhere
        at = rng.randrange(len(blob))
        return blob[:at] + bytes([blob[at] ^ (1 << rng.randrange(8))]) + blob[at + 1 :]
    if choice == 1:  # truncate
        return blob[: rng.randrange(len(blob))]
    if choice == 2:  # append bytes
        return blob + bytes(rng.randrange(1, 9))
    if choice == 3:  # a wrong header length
        return struct.pack("<Q", max(0, length + rng.choice([-8, -1, 1, 8, 2**40]))) + blob[8:]
    if choice == 4:  # insert or remove a byte in the data section
        at = 8 + length + rng.randrange(len(data) + 1)
        return blob[:at] + b"\0" + blob[at:] if rng.random() < 0.5 else blob[:at] + blob[at + 1 :]
    if choice == 5 and header:  # a random character of the JSON text
        text = bytearray(header)
        text[rng.randrange(len(text))] = ord(rng.choice('{}[]",:0123456789-.e \\'))
        return _file(bytes(text), data)
    try:
        parsed = json.loads(header)
    except ValueError:  # an earlier mutation broke the JSON: nothing structural left to edit
        return blob + b" "
    if not isinstance(parsed, dict):
        return blob[:-1]
    for _ in range(rng.randrange(1, 3)):
        _mutate_header(rng, parsed)
    return _file(parsed, data)


def test_fuzzed_files_are_judged_like_the_reference(tmp_path: Path) -> None:
    rng = random.Random(20261202)
    seeds = _valid_files()
    path = tmp_path / "fuzz.safetensors"
    accepted = 0
    for _ in range(600):
        blob = rng.choice(seeds)
        for _ in range(rng.randrange(1, 3)):
            blob = _mutate(rng, blob) if len(blob) > 8 else blob
        accepted += _check_same(path, blob)
    # The mutations must exercise both answers, or the comparison proves little.
    assert 20 < accepted < 580, accepted
