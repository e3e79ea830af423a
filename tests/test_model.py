"""Mixed-adapter batches through real transformers models match per-row solo PEFT runs."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from polylora_async import BASE_ADAPTER, MultiLoraModel, TargetModulesError, WrapConfig
from tests._models import DEBERTA_TARGETS, LLAMA_TARGETS, AdapterSet, padded_batch, save_peft_adapters

# fp32 end to end; the only differences from PEFT are summation order (fp32 accumulate everywhere).
FP32_TOL = {"rtol": 2e-4, "atol": 2e-5}


def _wrap(adapters: AdapterSet, targets: list[str], num_slots: int = 4) -> MultiLoraModel:
    model = MultiLoraModel(copy.deepcopy(adapters.base), WrapConfig(targets, max_rank=8, num_slots=num_slots))
    for name, path in adapters.paths.items():
        model.load_adapter(name, path)
    return model


def _assert_rows_match_solo(model: MultiLoraModel, adapters: AdapterSet, rows: list[str], lengths: list[int]) -> None:
    ids, mask = padded_batch(lengths, seed=len(rows))
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_ids=rows).last_hidden_state
    for i, (adapter, n) in enumerate(zip(rows, lengths, strict=True)):
        solo = adapters.solo(adapter, input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n])
        torch.testing.assert_close(
            out[i : i + 1, :n], solo, **FP32_TOL, msg=lambda m, a=adapter, i=i: f"row {i} ({a}): {m}"
        )


def _assert_adapters_distinct(adapters: AdapterSet, names: list[str]) -> None:
    """The oracle must be able to fail: every adapter changes the output, and differently."""
    ids, mask = padded_batch([7], seed=99)
    outs = {n: adapters.solo(n, input_ids=ids, attention_mask=mask) for n in [BASE_ADAPTER, *names]}
    keys = list(outs)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, f"{a} and {b} give the same output"


def test_llama_mixed_batch_matches_solo_peft(llama_set: AdapterSet) -> None:
    names = list(llama_set.paths)
    _assert_adapters_distinct(llama_set, names)
    model = _wrap(llama_set, LLAMA_TARGETS)
    rows = [names[0], BASE_ADAPTER, names[1], names[2], names[0], BASE_ADAPTER, names[2]]
    _assert_rows_match_solo(model, llama_set, rows, [5, 9, 3, 9, 1, 6, 8])
    assert model.split_batches == 0


def test_deberta_v3_mixed_batch_matches_solo_peft(deberta_set: AdapterSet) -> None:
    names = list(deberta_set.paths)
    _assert_adapters_distinct(deberta_set, names)
    model = _wrap(deberta_set, DEBERTA_TARGETS)
    assert model.patched_modules, "DeBERTa attention should get the per-row position patch"
    rows = [names[1], BASE_ADAPTER, names[0], names[2], names[1], names[0]]
    _assert_rows_match_solo(model, deberta_set, rows, [6, 11, 4, 11, 2, 7])
    # One forward pass, no fallback to splitting.
    assert model.split_batches == 0


def test_deberta_v3_without_patch_falls_back_to_exact_groups(deberta_set: AdapterSet) -> None:
    names = list(deberta_set.paths)
    model = _wrap(deberta_set, DEBERTA_TARGETS)
    for module in model.modules():  # remove the patch: the generic fallback must still be exact
        module.__dict__.pop("disentangled_attention_bias", None)
    rows = [names[1], BASE_ADAPTER, names[0], names[1]]
    with pytest.warns(UserWarning, match="adapter-homogeneous groups"):
        _assert_rows_match_solo(model, deberta_set, rows, [5, 8, 8, 3])
    assert model.split_batches == 1


def test_homogeneous_batch_uses_shared_input_directly(deberta_set: AdapterSet) -> None:
    names = list(deberta_set.paths)
    model = _wrap(deberta_set, DEBERTA_TARGETS)
    _assert_rows_match_solo(model, deberta_set, [names[0]] * 3, [4, 7, 2])
    assert model.split_batches == 0


@pytest.mark.parametrize("family", ["llama", "deberta"])
def test_base_only_batch_is_bit_identical_to_unwrapped(
    family: str, llama_set: AdapterSet, deberta_set: AdapterSet
) -> None:
    adapters, targets = (llama_set, LLAMA_TARGETS) if family == "llama" else (deberta_set, DEBERTA_TARGETS)
    model = _wrap(adapters, targets)
    ids, mask = padded_batch([6, 3, 6])
    with torch.no_grad():
        wrapped = model(input_ids=ids, attention_mask=mask, adapter_ids=[BASE_ADAPTER] * 3).last_hidden_state
        plain = adapters.base(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(wrapped, plain)


def test_base_rows_in_a_mixed_batch_match_the_base_model(llama_set: AdapterSet) -> None:
    names = list(llama_set.paths)
    model = _wrap(llama_set, LLAMA_TARGETS)
    ids, mask = padded_batch([6, 6, 6], seed=3)
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, adapter_ids=[names[1], BASE_ADAPTER, names[0]])
        plain = llama_set.base(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(mixed.last_hidden_state[1], plain.last_hidden_state[1], rtol=0, atol=0)


def test_in_memory_peft_model_and_state_dict_sources(llama_set: AdapterSet) -> None:
    from peft import get_peft_model_state_dict

    names = list(llama_set.paths)
    model = MultiLoraModel(copy.deepcopy(llama_set.base), WrapConfig(LLAMA_TARGETS, max_rank=8, num_slots=4))
    model.load_adapter("from-peft", llama_set.peft, peft_adapter_name=names[1])
    state = get_peft_model_state_dict(llama_set.peft, adapter_name=names[2])
    model.load_adapter("from-state", (state, llama_set.peft.peft_config[names[2]]))
    ids, mask = padded_batch([5, 5], seed=4)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_ids=["from-peft", "from-state"]).last_hidden_state
    torch.testing.assert_close(
        out[0:1], llama_set.solo(names[1], input_ids=ids[:1], attention_mask=mask[:1]), **FP32_TOL
    )
    torch.testing.assert_close(
        out[1:2], llama_set.solo(names[2], input_ids=ids[1:], attention_mask=mask[1:]), **FP32_TOL
    )


def test_slot_tables_follow_device_moves_and_keep_their_dtypes(llama_set: AdapterSet) -> None:
    model = _wrap(llama_set, LLAMA_TARGETS)
    model.to(torch.float64)
    for layer in model.iter_layers():
        assert layer.lora_a.dtype == torch.float64
        ranks, scales = layer._slot_tables(layer.lora_a)
        assert ranks.dtype == torch.int32 and scales.dtype == torch.float32
        assert ranks.device == layer.lora_a.device


def test_linear_subclasses_are_wrapped_as_peft_wraps_them(tmp_path: Path) -> None:
    # Falcon's projections are FalconLinear, an nn.Linear subclass with its own forward.
    from transformers import FalconConfig, FalconModel

    torch.manual_seed(0)
    config = FalconConfig(
        vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, new_decoder_architecture=True,
        num_kv_heads=2, attention_dropout=0.0, hidden_dropout=0.0,
    )  # fmt: skip
    base = FalconModel(config).eval()
    assert type(base.h[0].self_attention.query_key_value).__name__ == "FalconLinear"
    targets = ["query_key_value", "dense_h_to_4h"]
    specs: dict[str, dict[str, object]] = {n: {"r": r, "target_modules": targets} for n, r in (("a", 4), ("b", 2))}
    adapters = save_peft_adapters(base, specs, tmp_path)
    model = MultiLoraModel(copy.deepcopy(base), WrapConfig(targets, max_rank=4))
    for name, path in adapters.paths.items():
        model.load_adapter(name, path)
    rows = ["a", "__base__", "b"]
    ids, mask = padded_batch([5, 7, 3], seed=2)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, adapter_ids=rows).last_hidden_state
    for i, (name, n) in enumerate(zip(rows, [5, 7, 3], strict=True)):
        expected = adapters.solo(name, input_ids=ids[i : i + 1, :n])[0]
        torch.testing.assert_close(out[i, :n], expected, rtol=1e-4, atol=1e-5)


def test_quantized_linear_layers_are_refused_with_their_type() -> None:
    class Int8Linear(torch.nn.Linear):
        def __init__(self) -> None:
            super().__init__(8, 8)
            self.weight = torch.nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)

    model = torch.nn.Sequential(Int8Linear())
    with pytest.raises(TargetModulesError, match=r"0 \(.*Int8Linear\)"):
        MultiLoraModel(model, WrapConfig(["0"], max_rank=4))
