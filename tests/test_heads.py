"""Adapters that carry their own heads (PEFT ``modules_to_save``), checked row by row against PEFT.

Every adapter is a PEFT ``SEQ_CLS`` / ``TOKEN_CLS`` LoRA adapter saved by ``save_pretrained``; the
reference for a row is PEFT running that row alone over a model whose head has the adapter's
label count (same body), or the unwrapped base model for ``__base__`` rows.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from polylora_async import (
    AdapterFormatError,
    AdapterStore,
    MultiLoraModel,
    StoreConfig,
    UnsupportedAdapterError,
    WrapConfig,
)
from polylora_async.adapters import raw_from_peft_model
from tests._classifiers import FAMILIES, ClassifierSet, padded, save_classifier_adapters, wrap

LABELS = {"three": 3, "seven": 7, "three-b": 3}
ROWS = ["three", "__base__", "seven", "three-b", "__base__", "seven"]
LENGTHS = [5, 9, 3, 7, 4, 6]
FAMILY_NAMES = list(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def cset(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> ClassifierSet:
    family = request.param
    return save_classifier_adapters(family, LABELS, tmp_path_factory.mktemp(family))


def _row(cset: ClassifierSet, logits: torch.Tensor, length: int) -> torch.Tensor:
    """A row of a model output, cut to its real tokens for a token classifier."""
    return logits[:length] if cset.family.endswith("-token") else logits


def _solos(cset: ClassifierSet, ids: torch.Tensor) -> list[torch.Tensor]:
    return [cset.solo(a, ids[i, :n]) for i, (a, n) in enumerate(zip(ROWS, LENGTHS, strict=True))]


def _check_mixed(cset: ClassifierSet, logits: torch.Tensor, ids: torch.Tensor) -> None:
    solos = _solos(cset, ids)
    widest = max([*LABELS.values(), cset.base.config.num_labels])
    assert logits.shape[-1] == widest
    for i, (adapter, n) in enumerate(zip(ROWS, LENGTHS, strict=True)):
        got = _row(cset, logits[i], n)
        k = solos[i].shape[-1]
        assert k == (cset.base.config.num_labels if adapter == "__base__" else LABELS[adapter])
        torch.testing.assert_close(got[..., :k], solos[i], rtol=1e-4, atol=1e-5, msg=f"row {i} ({adapter})")
        assert torch.isnan(got[..., k:]).all(), f"row {i}: columns past its head's width must be NaN"


def test_adapters_differ_from_each_other_and_from_base(cset: ClassifierSet) -> None:
    ids, _ = padded([6], FAMILIES[cset.family][1], seed=3)
    outputs = {a: cset.solo(a, ids[0]) for a in ["__base__", *LABELS]}
    three = outputs["three"]
    assert not torch.allclose(three, outputs["three-b"], atol=1e-3)
    assert not torch.allclose(three, outputs["__base__"], atol=1e-3)
    assert outputs["seven"].shape[-1] == 7


def test_mixed_batch_matches_solo_peft_rows(cset: ClassifierSet) -> None:
    model = wrap(cset)
    ids, mask = padded(LENGTHS, FAMILIES[cset.family][1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
    _check_mixed(cset, logits, ids)
    head = "score" if cset.family == "llama" else "classifier"
    assert model.head_names == [head]
    slots = [model.slot_of(a) for a in ROWS]
    base_k = cset.base.config.num_labels
    assert model.head_widths(slots) == {head: [base_k if a == "__base__" else LABELS[a] for a in ROWS]}
    assert model.head_widths([model.slot_of("three"), 0]) == {}


def test_base_rows_and_base_batches_are_bit_identical(cset: ClassifierSet) -> None:
    model = wrap(cset)
    ids, mask = padded(LENGTHS, FAMILIES[cset.family][1])
    with torch.no_grad():
        expected = cset.base(input_ids=ids, attention_mask=mask).logits
        mixed = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
        base_only = model(input_ids=ids, attention_mask=mask, adapter_ids=["__base__"] * len(ROWS)).logits
    assert torch.equal(base_only, expected)
    k = expected.shape[-1]
    for i, adapter in enumerate(ROWS):
        if adapter == "__base__":
            assert torch.equal(mixed[i][..., :k], expected[i])


def test_split_fallback_matches_solo_rows(cset: ClassifierSet) -> None:
    model = wrap(cset)
    model._split_mode = True  # what a shared-input layer without a patch switches on
    ids, mask = padded(LENGTHS, FAMILIES[cset.family][1])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
    assert model.split_batches == 1
    _check_mixed(cset, logits, ids)


def test_head_width_probe_adds_one_column(cset: ClassifierSet) -> None:
    model = wrap(cset)
    head = model.head_names[0]
    ids, mask = padded(LENGTHS, FAMILIES[cset.family][1])
    with torch.no_grad():
        normal = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
        with model.head_width_probe(head):
            probed = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
            base_probed = model(input_ids=ids, attention_mask=mask, adapter_ids=["__base__"] * len(ROWS)).logits
        after = model(input_ids=ids, attention_mask=mask, adapter_ids=ROWS).logits
    assert probed.shape == (*normal.shape[:-1], normal.shape[-1] + 1)
    assert base_probed.shape[-1] == cset.base.config.num_labels + 1
    torch.testing.assert_close(probed[..., :-1], normal, equal_nan=True, rtol=0, atol=0)
    assert torch.isnan(probed[..., -1]).all()
    assert torch.equal(after.nan_to_num(0.5), normal.nan_to_num(0.5))
    with pytest.raises(KeyError, match="not a wrapped head"):
        with model.head_width_probe("nope"):
            pass


# ---------------------------------------------------------------------------------------------
# Sources, refusals and byte accounting (BERT only: the rules do not depend on the family)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory) -> ClassifierSet:
    return save_classifier_adapters("bert", LABELS, tmp_path_factory.mktemp("bert-src"))


def _fresh(cset: ClassifierSet, **config: object) -> MultiLoraModel:
    wrap_config = WrapConfig(target_modules=FAMILIES["bert"][0], max_rank=8, **config)  # type: ignore[arg-type]
    return MultiLoraModel(copy.deepcopy(cset.base), wrap_config)


def test_in_memory_peft_model_and_state_dict_give_the_same_heads(bert: ClassifierSet) -> None:
    from peft import get_peft_model_state_dict

    model = _fresh(bert)
    peft_model = bert.references["seven"]
    from_dir = model.prepare_adapter("a", bert.paths["seven"])
    from_peft = model.prepare_adapter("b", peft_model, peft_adapter_name="seven")
    state = get_peft_model_state_dict(peft_model, adapter_name="seven")
    from_state = model.prepare_adapter("c", (state, peft_model.peft_config["seven"]))
    # A live model's own state dict holds the copy under `modules_to_save.<adapter>` and the base
    # module's tensors under `original_module`.
    live = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k or "classifier" in k}
    from_live = model.prepare_adapter("d", (live, peft_model.peft_config["seven"]))
    saved = load_file(str(bert.paths["seven"] / "adapter_model.safetensors"))
    for weights in (from_dir, from_peft, from_state, from_live):
        assert set(weights.heads) == {"classifier"}
        for key in ("weight", "bias"):
            assert torch.equal(weights.heads["classifier"][key], saved[f"base_model.model.classifier.{key}"])
    assert raw_from_peft_model("x", peft_model, "seven").tensors.keys() == saved.keys()
    model.load_adapter("seven", from_peft)
    ids, mask = padded([4, 6], 0, seed=5)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_ids=["seven", "__base__"]).logits
    torch.testing.assert_close(logits[0], bert.solo("seven", ids[0, :4]), rtol=1e-4, atol=1e-5)


def _variant(cset: ClassifierSet, tmp_path: Path, edit: object) -> Path:
    import shutil

    path = tmp_path / "variant"
    shutil.copytree(cset.paths["three"], path)
    tensors = load_file(str(path / "adapter_model.safetensors"))
    edit(tensors)  # type: ignore[operator]
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


_BAD_HEADS = [
    (lambda t: t.pop("base_model.model.classifier.bias"), AdapterFormatError, ["'classifier'", "missing", "bias"]),
    (
        lambda t: t.__setitem__("base_model.model.classifier.extra", torch.zeros(3)),
        AdapterFormatError,
        ["'classifier'", "unknown", "extra"],
    ),
    (
        lambda t: t.__setitem__("base_model.model.classifier.weight", torch.zeros(3, 31)),
        AdapterFormatError,
        ["'classifier'", "'weight'", "(3, 31)", "(3, 32)"],
    ),
    (
        lambda t: t.__setitem__("base_model.model.classifier.bias", torch.zeros(4)),
        AdapterFormatError,
        ["'classifier'", "different sizes", "[3, 4]"],
    ),
    (
        lambda t: t.__setitem__("base_model.model.classifier.weight", torch.full((3, 32), math.nan)),
        AdapterFormatError,
        ["classifier.weight", "NaN"],
    ),
]


@pytest.mark.parametrize(("edit", "error", "needles"), _BAD_HEADS)
def test_heads_that_do_not_fit_are_refused(
    bert: ClassifierSet, tmp_path: Path, edit: object, error: type[Exception], needles: list[str]
) -> None:
    model = _fresh(bert)
    path = _variant(bert, tmp_path, edit)
    with pytest.raises(error) as info:
        model.load_adapter("bad", path)
    for needle in ("'bad'", *needles):
        assert needle in str(info.value), f"{needle!r} not in {info.value}"
    assert model.loaded_adapters == []


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("edit", "error", "needles"), _BAD_HEADS[:-1])  # the last one is in the values
async def test_heads_that_do_not_fit_are_refused_at_registration(
    bert: ClassifierSet, tmp_path: Path, edit: object, error: type[Exception], needles: list[str]
) -> None:
    path = _variant(bert, tmp_path, edit)
    async with asyncio.timeout(30), AdapterStore(_fresh(bert)) as store:
        with pytest.raises(error) as info:
            store.register("bad", path)
        for needle in ("'bad'", "adapter_model.safetensors", *needles):
            assert needle in str(info.value), f"{needle!r} not in {info.value}"
        assert store.adapter_ids() == []


def test_a_saved_module_the_model_does_not_wrap_is_refused(bert: ClassifierSet) -> None:
    model = _fresh(bert, modules_to_save=())
    assert model.head_names == []
    with pytest.raises(UnsupportedAdapterError, match=r"classifier.*modules_to_save"):
        model.load_adapter("three", bert.paths["three"])


def test_modules_to_save_names_are_checked_at_wrap_time(bert: ClassifierSet) -> None:
    from polylora_async import TargetModulesError

    with pytest.raises(TargetModulesError, match="pooler_x"):
        _fresh(bert, modules_to_save=["classifier", "pooler_x"])
    with pytest.raises(TargetModulesError, match="LoRA targets"):
        config = WrapConfig(target_modules=["query", "dense"], modules_to_save=["pooler"])
        MultiLoraModel(copy.deepcopy(bert.base), config)


def _file_bytes(path: Path) -> tuple[int, int]:
    """(LoRA bytes, head bytes) of a saved adapter, from the file (fp32 model)."""
    tensors = load_file(str(path / "adapter_model.safetensors"))
    lora = sum(t.numel() * 4 for k, t in tensors.items() if "lora_" in k)
    heads = sum(t.numel() * 4 for k, t in tensors.items() if "lora_" not in k)
    return lora, heads


@pytest.mark.timeout(60)
async def test_store_tiers_count_head_bytes(bert: ClassifierSet) -> None:
    model = _fresh(bert)
    expected = {}
    for name, path in bert.paths.items():
        lora, heads = _file_bytes(path)
        assert heads > 0
        expected[name] = lora + heads
    async with asyncio.timeout(50):
        async with AdapterStore(model, StoreConfig(min_residency_s=0.0)) as store:
            slot_of = {"__base__": 0}
            for name, path in bert.paths.items():
                slot_of[name] = await store.ensure_gpu(store.register(name, path))
            stats = store.statistics()
            assert stats.cpu.resident_bytes == sum(expected.values())
            assert stats.gpu.resident_bytes == sum(expected.values())
            ids, mask = padded(LENGTHS, 0)
            slots = [slot_of[a] for a in ROWS]
            with torch.no_grad():
                logits = model.forward_slots(slots, input_ids=ids, attention_mask=mask).logits
    _check_mixed(bert, logits, ids)


def test_config_lists_heads_as_peft_saves_them(bert: ClassifierSet) -> None:
    config = json.loads((bert.paths["three"] / "adapter_config.json").read_text())
    assert "classifier" in config["modules_to_save"]
    saved = load_file(str(bert.paths["three"] / "adapter_model.safetensors"))
    assert any(k.startswith("base_model.model.classifier.") for k in saved)


def test_weights_validated_elsewhere_keep_their_heads(bert: ClassifierSet) -> None:
    from polylora_async.store._disk_tier import weights_to_raw

    donor = _fresh(bert)
    weights = donor.prepare_adapter("seven", bert.paths["seven"])
    model = _fresh(bert)
    # What the disk tier writes and reads back for an adapter it only has in memory.
    again = model.prepare_adapter("seven", weights_to_raw(weights))
    for key, tensor in weights.heads["classifier"].items():
        assert torch.equal(again.heads["classifier"][key], tensor)
    assert again.nbytes == weights.nbytes
    model.load_adapter("seven", again)
    ids, mask = padded([6, 3], 0, seed=9)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, adapter_ids=["__base__", "seven"]).logits
    torch.testing.assert_close(logits[1], bert.solo("seven", ids[1, :3]), rtol=1e-4, atol=1e-5)


@pytest.mark.timeout(60)
async def test_store_takes_weights_validated_by_another_model(bert: ClassifierSet) -> None:
    weights = _fresh(bert).prepare_adapter("seven", bert.paths["seven"])
    model = _fresh(bert)
    async with asyncio.timeout(50):
        async with AdapterStore(model, StoreConfig(min_residency_s=0.0)) as store:
            slot = await store.ensure_gpu(store.register("seven", weights))
            assert store.statistics().gpu.resident_bytes == sum(_file_bytes(bert.paths["seven"]))
            ids, mask = padded([5, 8], 0, seed=4)
            with torch.no_grad():
                logits = model.forward_slots([slot, 0], input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(logits[0], bert.solo("seven", ids[0, :5]), rtol=1e-4, atol=1e-5)
    assert torch.isnan(logits[1, 3:]).all()
