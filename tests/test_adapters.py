"""Every kind of bad adapter is refused with a precise error, and leaves loaded adapters intact."""

from __future__ import annotations

import copy
import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polylora_async import (
    AdapterFormatError,
    AdapterLoadError,
    AdapterNotFoundError,
    BatchInputError,
    ConfigError,
    MultiLoraModel,
    PolyLoraWarning,
    TargetModulesError,
    UnsupportedAdapterError,
    WrapConfig,
)
from tests.conftest import LLAMA_TARGETS, AdapterSet, padded_batch

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
        ("modules_to_save", ["lm_head"], "modules_to_save"),
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


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(served, llama_set: AdapterSet, tmp_path: Path, bad: float) -> None:  # type: ignore[no-untyped-def]
    path = _variant(llama_set, tmp_path)
    key = "base_model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def poison(t: dict[str, torch.Tensor]) -> None:
        t[key] = t[key].clone()
        t[key][1, 3] = bad

    _edit_tensors(path, poison)
    _refused(served, path, AdapterFormatError, "layers.0.self_attn.q_proj.lora_A", "NaN/Inf")


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
    with pytest.raises(ConfigError, match="`max_rank` must be an integer >= 1, got 0"):
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
