"""Every kind of bad adapter is refused with a precise error, and leaves loaded adapters intact."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from polylora_async import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterWeights,
    BatchInputError,
    ConfigError,
    LayerLora,
    MultiLoraModel,
    PolyLoraWarning,
    TargetModulesError,
    UnsupportedAdapterError,
    WrapConfig,
)
from tests._models import LLAMA_TARGETS, AdapterSet, padded_batch

GOOD = "qv-r4"


@pytest.fixture
def served(llama_set: AdapterSet) -> tuple[MultiLoraModel, Callable[[], torch.Tensor]]:
    """A model serving two adapters, and a probe that returns its current mixed-batch output."""
    model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(LLAMA_TARGETS, max_rank=8, num_slots=4))
    model.load_adapter("a", llama_set.paths["qv-r4"])
    model.load_adapter("b", llama_set.paths["all-r8-rslora"])
    ids, mask = padded_batch([5, 3, 5], seed=11)

    def probe() -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=ids, attention_mask=mask, adapter_ids=["a", "__base__", "b"]).last_hidden_state

    return model, probe


def _variant(llama_set: AdapterSet, tmp_path: Path, name: str = GOOD) -> Path:
    """A writable copy of a good adapter directory."""
    dst = tmp_path / f"variant-{name}"
    shutil.copytree(llama_set.paths[name], dst)
    return dst


def _edit_config(path: Path, **changes: object) -> None:
    config_path = path / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def _edit_tensors(path: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def _refused(
    served: tuple[MultiLoraModel, Callable[[], torch.Tensor]],
    source: object,
    error: type[Exception],
    *needles: str,
    adapter_id: str = "bad",
) -> None:
    model, probe = served
    before = probe()
    with pytest.raises(error) as info:
        model.load_adapter(adapter_id, source)
    message = str(info.value)
    for needle in (repr(adapter_id), *needles):
        assert needle in message, f"{needle!r} not in error message: {message}"
    assert adapter_id not in model.loaded_adapters
    assert torch.equal(probe(), before), "a failed load changed what loaded adapters compute"


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("use_dora", True, "DoRA"),
        ("lora_bias", True, "LoRA bias"),
        ("bias", "all", "`bias`"),
        ("peft_type", "IA3", "peft_type"),
        ("layer_replication", [[0, 1]], "layer_replication"),
    ],
)
def test_unsupported_features_are_refused_by_name(
    served: tuple[MultiLoraModel, Callable[[], torch.Tensor]],
    llama_set: AdapterSet,
    tmp_path: Path,
    field: str,
    value: object,
    needle: str,
) -> None:
    path = _variant(llama_set, tmp_path)
    _edit_config(path, **{field: value})
    _refused(served, path, UnsupportedAdapterError, needle)


def test_dora_magnitude_tensor_is_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    key = "base_model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _edit_tensors(path, lambda t: t.__setitem__(key, torch.ones(64)))
    _refused(served, path, UnsupportedAdapterError, "DoRA", key)


def test_real_non_lora_peft_adapter_is_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import IA3Config, get_peft_model

    ia3 = get_peft_model(
        copy.deepcopy(llama_set.base),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    ia3.save_pretrained(str(tmp_path / "ia3"))
    _refused(served, tmp_path / "ia3", UnsupportedAdapterError, "IA3")


def test_weights_for_unwrapped_module_are_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)

    def add(t: dict[str, torch.Tensor]) -> None:
        t["base_model.model.embed_proj.lora_A.weight"] = torch.randn(4, 64)
        t["base_model.model.embed_proj.lora_B.weight"] = torch.randn(64, 4)

    _edit_tensors(path, add)
    _refused(served, path, AdapterFormatError, "'embed_proj'", "not a wrapped layer")


def test_shape_mismatch_is_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    key = "base_model.model.layers.1.self_attn.v_proj.lora_B.weight"
    _edit_tensors(path, lambda t: t.__setitem__(key, torch.randn(48, 4)))
    _refused(served, path, AdapterFormatError, "layers.1.self_attn.v_proj.lora_B", "(48, 4)")


def test_rank_above_max_rank_is_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    _edit_config(path, r=16)

    def widen(t: dict[str, torch.Tensor]) -> None:
        for k in list(t):
            t[k] = torch.randn(16, t[k].shape[1]) if "lora_A" in k else torch.randn(t[k].shape[0], 16)

    _edit_tensors(path, widen)
    _refused(served, path, AdapterFormatError, "rank 16", "max_rank=8")


def test_rank_disagreeing_with_config_is_refused(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    _edit_config(path, r=6)
    _refused(served, path, AdapterFormatError, "rank 4 in its weights but 6 in its config")


_POISONED = "layers.0.self_attn.q_proj"
_SOURCE_KINDS = ["directory", "peft_model", "state_dict", "adapter_weights", "packed_adapter_weights"]


def _poisoned_source(llama_set: AdapterSet, tmp_path: Path, kind: str, bad: float) -> object:
    """A source of ``kind`` whose q_proj lora_A of layer 0 holds one ``bad`` value."""
    from peft import PeftModel

    if kind in ("adapter_weights", "packed_adapter_weights"):
        model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(LLAMA_TARGETS, max_rank=8, num_slots=1))
        weights = model.prepare_adapter("good", llama_set.paths[GOOD])
        if kind == "packed_adapter_weights":  # one storage behind every factor: poison it there
            assert weights.storage is not None
            weights.layers[_POISONED].a[1, 3] = bad
            return weights
        layers = {n: LayerLora(lora.a.clone(), lora.b.clone(), lora.scale) for n, lora in weights.layers.items()}
        layers[_POISONED].a[1, 3] = bad
        return AdapterWeights("good", layers, "built by hand")
    path = _variant(llama_set, tmp_path)
    key = f"base_model.model.{_POISONED}.lora_A.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][1, 3] = bad

    _edit_tensors(path, poison)
    if kind == "directory":
        return path
    if kind == "peft_model":
        return PeftModel.from_pretrained(copy.deepcopy(llama_set.base), str(path))
    config = json.loads((path / "adapter_config.json").read_text())
    return load_file(str(path / "adapter_model.safetensors")), config


@pytest.mark.parametrize("kind", _SOURCE_KINDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_from_every_source(  # type: ignore[no-untyped-def]
    served, llama_set: AdapterSet, tmp_path: Path, kind: str, bad: float
) -> None:
    source = _poisoned_source(llama_set, tmp_path, kind, bad)
    _refused(served, source, AdapterFormatError, _POISONED, "NaN/Inf")


def test_hand_built_weights_are_checked_against_the_model(served, llama_set: AdapterSet) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    weights = model.prepare_adapter("good", llama_set.paths[GOOD])
    lora = weights.layers[_POISONED]
    wrong_shape = {_POISONED: LayerLora(lora.a[:, :-1].clone(), lora.b.clone(), lora.scale)}
    _refused(served, AdapterWeights("x", wrong_shape, "hand"), AdapterFormatError, _POISONED, "needs a")
    bad_scale = {_POISONED: LayerLora(lora.a.clone(), lora.b.clone(), float("nan"))}
    _refused(served, AdapterWeights("x", bad_scale, "hand"), AdapterFormatError, _POISONED, "scale nan")
    # Accepted ones are served under the id they are loaded with, in the model's dtype, with their size.
    fitted = model.prepare_adapter("renamed", AdapterWeights("x", {_POISONED: lora}, "hand"))
    assert fitted.adapter_id == "renamed" and fitted.layers[_POISONED].a.dtype == model.dtype
    assert fitted.nbytes == (lora.a.numel() + lora.b.numel()) * model.dtype.itemsize


def test_config_keys_are_peft_lora_config_fields(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from peft import LoraConfig

    # Every field PEFT writes, at its default, loads without a warning (warnings are errors here).
    model, _ = served
    path = _variant(llama_set, tmp_path)
    defaults = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]).to_dict()
    _edit_config(path, **{k: v for k, v in defaults.items() if k not in ("r", "lora_alpha", "target_modules")})
    model.load_adapter("every-field", path)
    model.unload_adapter("every-field")


def test_missing_directory_config_and_weights(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _refused(served, tmp_path / "nowhere", AdapterLoadError, "is not a directory")
    no_config = _variant(llama_set, tmp_path)
    (no_config / "adapter_config.json").unlink()
    _refused(served, no_config, AdapterLoadError, "adapter_config.json")
    no_weights = _variant(llama_set, tmp_path, "patterns")
    (no_weights / "adapter_model.safetensors").unlink()
    _refused(served, no_weights, AdapterLoadError, "no weights", "adapter_model.safetensors")


def test_truncated_weights_file(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    file = path / "adapter_model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _refused(served, path, AdapterLoadError, "adapter_model.safetensors")


def test_corrupt_weights_and_config(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    (path / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 64)
    _refused(served, path, AdapterLoadError, "adapter_model.safetensors")
    path2 = _variant(llama_set, tmp_path, "patterns")
    (path2 / "adapter_config.json").write_text("{not json")
    _refused(served, path2, AdapterLoadError, "adapter_config.json")


def test_bin_weights_load_only_through_the_safe_loader(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    path = _variant(llama_set, tmp_path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    (path / "adapter_model.safetensors").unlink()
    torch.save(tensors, str(path / "adapter_model.bin"))
    model.load_adapter("from-bin", path)  # plain tensors: accepted
    assert "from-bin" in model.loaded_adapters

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("pwned",))

    evil = _variant(llama_set, tmp_path, "patterns")
    (evil / "adapter_model.safetensors").unlink()
    (evil / "adapter_model.bin").write_bytes(pickle.dumps({"x": Exploit()}, protocol=2))
    _refused(served, evil, AdapterLoadError, "safe loader", adapter_id="evil")


def test_unknown_config_keys_warn_once_listing_them(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    path = _variant(llama_set, tmp_path)
    _edit_config(path, shiny_new_option=1, another_one="x")
    with pytest.warns(PolyLoraWarning, match=r"\['another_one', 'shiny_new_option'\]"):
        model.load_adapter("unknown-keys", path)
    model.unload_adapter("unknown-keys")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.load_adapter("unknown-keys", path)  # the second load stays quiet


def test_lora_dropout_and_fan_in_fan_out_are_accepted(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    path = _variant(llama_set, tmp_path)
    _edit_config(path, lora_dropout=0.3, fan_in_fan_out=False)
    model.load_adapter("dropout", path)
    assert "dropout" in model.loaded_adapters


def test_bad_wrap_configs(llama_set: AdapterSet) -> None:
    with pytest.raises(TargetModulesError, match="matches no module"):
        MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(["nope_proj"]))
    with pytest.raises(TargetModulesError, match="not nn\\.Linear"):
        MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(["self_attn"]))
    with pytest.raises(ConfigError, match="`max_rank` must be >= 1, got 0"):
        WrapConfig(["q_proj"], max_rank=0)
    with pytest.raises(ConfigError, match="`num_slots`"):
        WrapConfig(["q_proj"], num_slots=-1)
    with pytest.raises(ConfigError, match="not a valid regular expression"):
        WrapConfig("(unclosed")


def test_regex_target_modules(llama_set: AdapterSet) -> None:
    model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(r".*\.self_attn\.(q|v)_proj"))
    assert sorted(model.layer_names) == [
        "layers.0.self_attn.q_proj",
        "layers.0.self_attn.v_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]


def test_bad_batches(served) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    ids, mask = padded_batch([4, 4])
    with pytest.raises(AdapterNotFoundError, match="'missing' is not loaded"):
        model(input_ids=ids, attention_mask=mask, adapter_ids=["a", "missing"])
    with pytest.raises(BatchInputError, match="3 entries"):
        model(input_ids=ids, attention_mask=mask, adapter_ids=["a", "a", "b"])
    with pytest.raises(BatchInputError, match="empty"):
        model(input_ids=ids, attention_mask=mask, adapter_ids=[])


def test_replacing_an_adapter_serves_the_new_version(served, llama_set: AdapterSet) -> None:  # type: ignore[no-untyped-def]
    model, probe = served
    before = probe()
    model.load_adapter("a", llama_set.paths["patterns"])  # same id, new weights
    after = probe()
    assert torch.equal(after[1], before[1]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[0], before[0])


def test_huge_but_finite_weights_are_accepted(served, llama_set: AdapterSet, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, _ = served
    path = _variant(llama_set, tmp_path)
    key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def huge(t: dict[str, torch.Tensor]) -> None:  # finite values whose sum overflows float32
        t[key] = torch.full_like(t[key], 3e38)

    _edit_tensors(path, huge)
    model.load_adapter("huge", path)
    assert "huge" in model.loaded_adapters


# ---------------------------------------------------------------------------------------------
# The safetensors reader and packed weights
# ---------------------------------------------------------------------------------------------


def _handmade_safetensors(path: Path, header: object, data: bytes) -> Path:
    """A file laid out by hand (header length, JSON header, data), for cases no writer produces."""
    import struct

    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def test_reader_gives_what_the_safetensors_library_gives(tmp_path: Path) -> None:
    from polylora_async.adapters import read_safetensors

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w32": torch.randn(3, 5, generator=g),
        "w16": torch.randn(7, generator=g).to(torch.bfloat16),  # an odd byte count before others
        "h16": torch.randn(2, 3, 1, generator=g).to(torch.float16),
        "empty": torch.zeros(0, 4),
        "w64": torch.randn(1, 1, generator=g).double(),
        "ints": torch.arange(5, dtype=torch.int64),
        "scalar": torch.tensor(2.5),
    }
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    ours, buffer = read_safetensors("x", path)
    reference = load_file(str(path))
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        assert ours[name].dtype == tensor.dtype and ours[name].shape == tensor.shape, name
        assert torch.equal(ours[name], tensor), name
    # One buffer behind every tensor, covered exactly.
    assert buffer is not None and buffer.dtype == torch.uint8
    start, stop = buffer.data_ptr(), buffer.data_ptr() + buffer.numel()
    assert sum(t.numel() * t.element_size() for t in ours.values()) == buffer.numel()
    assert all(t.numel() == 0 or start <= t.data_ptr() < stop for t in ours.values())


def test_reader_copes_with_a_misaligned_tensor(tmp_path: Path) -> None:
    from polylora_async.adapters import read_safetensors

    half = torch.tensor([1.5], dtype=torch.bfloat16)
    full = torch.tensor([3.25, -2.0])
    header = {
        "h": {"dtype": "BF16", "shape": [1], "data_offsets": [0, 2]},
        "f": {"dtype": "F32", "shape": [2], "data_offsets": [2, 10]},  # starts at byte 2: not a 4-byte boundary
    }
    data = half.view(torch.uint8).numpy().tobytes() + full.view(torch.uint8).numpy().tobytes()
    tensors, buffer = read_safetensors("x", _handmade_safetensors(tmp_path / "m.safetensors", header, data))
    assert torch.equal(tensors["h"], half) and torch.equal(tensors["f"], full)
    assert buffer is None  # "f" is a copy, so the buffer does not back every tensor


@pytest.mark.parametrize(
    ("header", "data", "message"),
    [
        ({"t": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "unsupported dtype 'Q7'"),
        ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, b"\0" * 4, "needs 8 bytes"),
        ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "invalid shape"),
        ({"t": {"dtype": "F32", "shape": [1], "data_offsets": [4]}}, b"\0" * 4, "invalid data_offsets"),
        ({"t": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "truncated file"),
        (
            {
                "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
            },
            b"\0" * 12,
            "overlap",
        ),
        ([1, 2], b"", "must be a JSON object"),
        ({"t": 3}, b"", "needs a dtype, a shape and data_offsets"),
    ],
)
def test_reader_refuses_broken_headers(tmp_path: Path, header: object, data: bytes, message: str) -> None:
    from polylora_async.adapters import read_safetensors

    path = _handmade_safetensors(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(AdapterLoadError, match=message) as info:
        read_safetensors("x", path)
    assert str(path) in str(info.value) and "'x'" in str(info.value)


def test_reader_refuses_truncated_and_foreign_files(tmp_path: Path) -> None:
    from polylora_async.adapters import read_safetensors

    short = tmp_path / "short.safetensors"
    short.write_bytes(b"\x01\x02")
    with pytest.raises(AdapterLoadError, match="too short"):
        read_safetensors("x", short)
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(AdapterLoadError, match="header claims"):
        read_safetensors("x", huge)
    text = tmp_path / "text.safetensors"
    text.write_bytes((4).to_bytes(8, "little") + b"{no}")
    with pytest.raises(AdapterLoadError, match="not valid JSON"):
        read_safetensors("x", text)


def _layer_views(weights: Any) -> list[torch.Tensor]:
    return [t for lora in weights.layers.values() for t in (lora.a, lora.b)]


@pytest.mark.parametrize("file_dtype", [torch.float32, torch.bfloat16])
def test_validated_weights_are_packed_in_one_storage(
    llama_set: AdapterSet, tmp_path: Path, file_dtype: torch.dtype
) -> None:
    from polylora_async import read_peft_directory

    path = _variant(llama_set, tmp_path, "all-r8-rslora")
    _edit_tensors(path, lambda t: t.update({k: v.to(file_dtype) for k, v in t.items()}))
    model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(LLAMA_TARGETS, max_rank=8, num_slots=2))
    raw = read_peft_directory("p", path)
    weights = model.prepare_adapter("p", raw)
    storage = weights.storage
    assert storage is not None and storage.dtype == model.dtype == torch.float32
    views = _layer_views(weights)
    assert sum(v.numel() for v in views) == storage.numel() and weights.nbytes == storage.numel() * 4
    start = storage.data_ptr()
    assert all(start <= v.data_ptr() < start + storage.numel() * 4 and v.is_contiguous() for v in views)
    if file_dtype == model.dtype:
        assert storage.data_ptr() == raw.buffer.data_ptr()  # type: ignore[union-attr]  # the file's buffer, no copy
    reference = load_file(str(path / "adapter_model.safetensors"))
    for name, lora in weights.layers.items():
        key = f"base_model.model.{name}"
        assert torch.equal(lora.a, reference[f"{key}.lora_A.weight"].float())
        assert torch.equal(lora.b, reference[f"{key}.lora_B.weight"].float())
    # Slot writes from packed and from unpacked weights place the same numbers.
    copies = {name: LayerLora(lora.a.clone(), lora.b.clone(), lora.scale) for name, lora in weights.layers.items()}
    unpacked = AdapterWeights(weights.adapter_id, copies, "copy")
    model.write_slot(1, weights)
    model.write_slot(2, unpacked)
    for layer in model.iter_layers():
        assert torch.equal(layer.lora_a[1], layer.lora_a[2]) and torch.equal(layer.lora_b[1], layer.lora_b[2])


def test_a_smaller_adapter_leaves_nothing_of_the_slots_previous_one(llama_set: AdapterSet) -> None:
    model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(LLAMA_TARGETS, max_rank=8, num_slots=1))
    big = model.prepare_adapter("big", llama_set.paths["all-r8-rslora"])
    small = model.prepare_adapter("small", llama_set.paths["qv-r4"])
    model.write_slot(1, big)
    model.write_slot(1, small)
    for name, layer in zip(model.layer_names, model.iter_layers(), strict=True):
        lora = small.layers.get(name)
        r = 0 if lora is None else lora.rank
        assert layer.slot_ranks[1] == r and int(layer._ranks_dev[1]) == r
        assert float(layer._scales_dev[1]) == pytest.approx(0.0 if lora is None else lora.scale)
        assert not layer.lora_a[1, r:].any() and not layer.lora_b[1, r:].any()
        if lora is not None:
            assert torch.equal(layer.lora_a[1, :r], lora.a) and torch.equal(layer.lora_b[1, :r], lora.b.t())
