"""GPT-2 style ``Conv1D`` layers (weight ``[in, out]``): wrapped like nn.Linear, PEFT adapters exact per row."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from polylora_async import BASE_ADAPTER, MultiLoraModel, WrapConfig
from polylora_async._demo import _write_adapters, pick_targets
from polylora_async._errors import AdapterFormatError, PolyLoraWarning, TargetModulesError
from tests._models import AdapterSet, padded_batch, save_peft_adapters

GPT2_TARGETS = ["c_attn", "c_proj", "c_fc"]
FP32_TOL = {"rtol": 2e-4, "atol": 2e-5}
HIDDEN, INNER, LAYERS = 32, 48, 2

# Different ranks; one adapter covers only the attention input, one only the MLP (with a rank pattern).
GPT2_ADAPTERS: dict[str, dict[str, object]] = {
    "attn-r4": {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
    "all-r8": {"r": 8, "lora_alpha": 16, "target_modules": GPT2_TARGETS, "fan_in_fan_out": True},
    "mlp-r2": {
        "r": 2,
        "lora_alpha": 6,
        "target_modules": r".*\.mlp\.(c_fc|c_proj)",
        "rank_pattern": {"c_fc": 6},
        "fan_in_fan_out": True,
    },
}


def tiny_gpt2(lm_head: bool, seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

    torch.manual_seed(seed)
    config = GPT2Config(
        n_embd=HIDDEN,
        n_inner=INNER,
        n_layer=LAYERS,
        n_head=4,
        vocab_size=101,
        n_positions=64,
        attn_pdrop=0.0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
    )
    return (GPT2LMHeadModel(config) if lm_head else GPT2Model(config)).eval()


def _output(out: object, lm_head: bool) -> torch.Tensor:
    return out.logits if lm_head else out.last_hidden_state  # type: ignore[attr-defined]


def _solo(adapters: AdapterSet, adapter: str, lm_head: bool, **inputs: torch.Tensor) -> torch.Tensor:
    """One row alone through PEFT with its adapter (or with adapters disabled)."""
    with torch.no_grad():
        if adapter == BASE_ADAPTER:
            with adapters.peft.disable_adapter():
                return _output(adapters.peft(**inputs), lm_head)
        adapters.peft.set_adapter(adapter)
        return _output(adapters.peft(**inputs), lm_head)


@pytest.fixture(scope="module", params=[False, True], ids=["GPT2Model", "GPT2LMHeadModel"])
def gpt2_set(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[AdapterSet, bool]:
    lm_head = bool(request.param)
    adapters = save_peft_adapters(tiny_gpt2(lm_head), GPT2_ADAPTERS, tmp_path_factory.mktemp("gpt2"))
    return adapters, lm_head


def _wrap(base: nn.Module) -> MultiLoraModel:
    return MultiLoraModel(copy.deepcopy(base), WrapConfig(GPT2_TARGETS, max_rank=8, num_slots=4))


def _assert_rows_match_solo(
    model: MultiLoraModel, adapters: AdapterSet, lm_head: bool, rows: list[str], lengths: list[int]
) -> None:
    ids, mask = padded_batch(lengths, seed=len(rows))
    with torch.no_grad():
        out = _output(model(input_ids=ids, attention_mask=mask, adapter_ids=rows), lm_head)
        plain = _output(adapters.base(input_ids=ids, attention_mask=mask), lm_head)
    for i, (adapter, n) in enumerate(zip(rows, lengths, strict=True)):
        if adapter == BASE_ADAPTER:  # the Conv1D's own forward ran: not one bit may differ
            assert torch.equal(out[i], plain[i]), f"base row {i} differs from the unwrapped model"
        solo = _solo(adapters, adapter, lm_head, input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n])
        torch.testing.assert_close(
            out[i : i + 1, :n], solo, **FP32_TOL, msg=lambda m, a=adapter, i=i: f"row {i} ({a}): {m}"
        )


def test_conv1d_layers_are_wrapped_with_features_from_their_weight() -> None:
    from transformers.pytorch_utils import Conv1D

    base = tiny_gpt2(lm_head=False)
    expected = {n: tuple(m.weight.shape) for n, m in base.named_modules() if isinstance(m, Conv1D)}
    model = _wrap(base)
    assert set(model.layer_names) == set(expected) and len(expected) == 4 * LAYERS
    shapes = model.layer_shapes()
    for name, (fan_in, fan_out) in expected.items():  # Conv1D weight is [in, out]
        assert (shapes[name].in_features, shapes[name].out_features, shapes[name].conv1d) == (fan_in, fan_out, True)
    assert (shapes["h.0.attn.c_attn"].in_features, shapes["h.0.attn.c_attn"].out_features) == (HIDDEN, 3 * HIDDEN)
    assert (shapes["h.0.mlp.c_proj"].in_features, shapes["h.0.mlp.c_proj"].out_features) == (INNER, HIDDEN)


def test_peft_records_fan_in_fan_out_and_factor_layout(gpt2_set: tuple[AdapterSet, bool]) -> None:
    """What the loader relies on: PEFT saves Conv1D factors as [r, in] / [out, r] and the flag as true."""
    from safetensors.torch import load_file

    adapters, _ = gpt2_set
    path = adapters.paths["all-r8"]
    assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
    tensors = load_file(str(path / "adapter_model.safetensors"))
    a = next(t for k, t in tensors.items() if k.endswith("h.0.mlp.c_proj.lora_A.weight"))
    b = next(t for k, t in tensors.items() if k.endswith("h.0.mlp.c_proj.lora_B.weight"))
    assert tuple(a.shape) == (8, INNER) and tuple(b.shape) == (HIDDEN, 8)


def test_gpt2_mixed_batch_matches_solo_peft(gpt2_set: tuple[AdapterSet, bool]) -> None:
    adapters, lm_head = gpt2_set
    names = list(adapters.paths)
    ids, mask = padded_batch([7], seed=99)
    outs = {n: _solo(adapters, n, lm_head, input_ids=ids, attention_mask=mask) for n in [BASE_ADAPTER, *names]}
    keys = list(outs)
    for i, a in enumerate(keys):  # the oracle can fail: adapters differ from each other and from base
        for b in keys[i + 1 :]:
            assert (outs[a] - outs[b]).abs().max() > 1e-3, f"{a} and {b} give the same output"
    model = _wrap(adapters.base)
    for name, path in adapters.paths.items():
        model.load_adapter(name, path)
    rows = [names[1], BASE_ADAPTER, names[0], names[2], names[1], BASE_ADAPTER, names[2]]
    _assert_rows_match_solo(model, adapters, lm_head, rows, [5, 9, 3, 9, 1, 6, 8])
    assert model.split_batches == 0


def test_gpt2_peft_model_and_state_dict_sources(gpt2_set: tuple[AdapterSet, bool]) -> None:
    from peft import get_peft_model_state_dict

    adapters, lm_head = gpt2_set
    names = list(adapters.paths)
    model = _wrap(adapters.base)
    model.load_adapter("from-peft", adapters.peft, peft_adapter_name=names[1])
    state = get_peft_model_state_dict(adapters.peft, adapter_name=names[2])
    model.load_adapter("from-state", (state, adapters.peft.peft_config[names[2]]))
    lengths = [6, 4, 6]
    ids, mask = padded_batch(lengths, seed=4)
    rows = ["from-peft", BASE_ADAPTER, "from-state"]
    with torch.no_grad():
        out = _output(model(input_ids=ids, attention_mask=mask, adapter_ids=rows), lm_head)
    for i, adapter in enumerate([names[1], BASE_ADAPTER, names[2]]):
        n = lengths[i]
        solo = _solo(adapters, adapter, lm_head, input_ids=ids[i : i + 1, :n], attention_mask=mask[i : i + 1, :n])
        torch.testing.assert_close(out[i : i + 1, :n], solo, **FP32_TOL)


class _WithConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 8)
        self.conv = nn.Conv2d(1, 1, 3)
        self.proj = nn.Linear(8, 8)


@pytest.mark.parametrize(("target", "path", "kind"), [("embed", "embed", "Embedding"), ("conv", "conv", "Conv2d")])
def test_a_target_that_cannot_be_wrapped_is_named_with_its_type(target: str, path: str, kind: str) -> None:
    message = rf"not nn\.Linear .* or transformers' Conv1D, so they cannot be wrapped: {path} \(torch\.nn\..*\.{kind}\)"
    with pytest.raises(TargetModulesError, match=message):
        MultiLoraModel(_WithConv(), WrapConfig([target, "proj"]))


def test_gpt2_embedding_target_is_refused_with_its_path() -> None:
    with pytest.raises(TargetModulesError, match=r"wte \(torch\.nn\.modules\.sparse\.Embedding\)"):
        MultiLoraModel(tiny_gpt2(lm_head=False), WrapConfig(["wte", "c_attn"]))


def _copy_adapter(src: Path, dst: Path, **config_changes: object) -> Path:
    dst.mkdir()
    (dst / "adapter_model.safetensors").write_bytes((src / "adapter_model.safetensors").read_bytes())
    config = json.loads((src / "adapter_config.json").read_text())
    config.update(config_changes)
    (dst / "adapter_config.json").write_text(json.dumps(config))
    return dst


def test_fan_in_fan_out_must_be_a_bool(gpt2_set: tuple[AdapterSet, bool], tmp_path: Path) -> None:
    adapters, _ = gpt2_set
    path = _copy_adapter(adapters.paths["attn-r4"], tmp_path / "bad", fan_in_fan_out="yes")
    with pytest.raises(AdapterFormatError, match=r"`fan_in_fan_out` must be true or false, got 'yes'"):
        _wrap(adapters.base).load_adapter("bad", path)


def test_fan_in_fan_out_false_on_conv1d_loads_as_peft_does(gpt2_set: tuple[AdapterSet, bool], tmp_path: Path) -> None:
    """PEFT corrects the flag for Conv1D layers (with a warning); the same weights give the same rows."""
    adapters, lm_head = gpt2_set
    path = _copy_adapter(adapters.paths["all-r8"], tmp_path / "flag-false", fan_in_fan_out=False)
    model = _wrap(adapters.base)
    with pytest.warns(PolyLoraWarning, match=r"`fan_in_fan_out`=False but every layer it covers is Conv1D"):
        model.load_adapter("flag-false", path)
    ids, mask = padded_batch([5, 3], seed=7)
    with torch.no_grad():
        out = _output(model(input_ids=ids, attention_mask=mask, adapter_ids=["flag-false", BASE_ADAPTER]), lm_head)
    solo = _solo(adapters, "all-r8", lm_head, input_ids=ids[:1], attention_mask=mask[:1])
    torch.testing.assert_close(out[:1], solo, **FP32_TOL)


def test_fan_in_fan_out_true_on_linear_layers_warns() -> None:
    from polylora_async.adapters import LayerShape, RawAdapter, validate_adapter

    raw = RawAdapter(
        config={"r": 2, "lora_alpha": 2, "fan_in_fan_out": True},
        tensors={
            "base_model.model.q.lora_A.weight": torch.ones(2, 4),
            "base_model.model.q.lora_B.weight": torch.ones(3, 2),
        },
        origin="a test dict",
    )
    with pytest.warns(PolyLoraWarning, match=r"`fan_in_fan_out`=True but every layer it covers is nn\.Linear"):
        weights = validate_adapter("lin", raw, {"q": LayerShape(4, 3)}, 4, torch.float32)
    assert tuple(weights.layers["q"].a.shape) == (2, 4)


def test_transposed_conv1d_factors_are_refused_with_a_hint(gpt2_set: tuple[AdapterSet, bool]) -> None:
    from peft import get_peft_model_state_dict

    adapters, _ = gpt2_set
    state = get_peft_model_state_dict(adapters.peft, adapter_name="attn-r4")
    transposed = {k: v.t().contiguous() for k, v in state.items()}
    with pytest.raises(AdapterFormatError, match=r"c_attn\.lora_A has shape \(32, 4\).*look transposed"):
        _wrap(adapters.base).load_adapter("transposed", (transposed, adapters.peft.peft_config["attn-r4"]))


def test_demo_targets_gpt2_conv1d_layers() -> None:
    assert pick_targets(tiny_gpt2(lm_head=False)) == GPT2_TARGETS
    assert pick_targets(tiny_gpt2(lm_head=True)) == GPT2_TARGETS

    class EmbeddingsOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 8)

    with pytest.raises(TargetModulesError, match=r"EmbeddingsOnly has no layer .*nn\.Linear or transformers' Conv1D"):
        pick_targets(EmbeddingsOnly())


def test_demo_writes_gpt2_adapters_peft_accepts_without_warnings(tmp_path: Path) -> None:
    # Warnings are errors here: PEFT warns when `fan_in_fan_out` does not fit a Conv1D target.
    base = tiny_gpt2(lm_head=False)
    _, paths, targets = _write_adapters(base, 2, tmp_path, seed=0)
    assert targets == GPT2_TARGETS
    model = MultiLoraModel(copy.deepcopy(base), WrapConfig(targets, max_rank=16, num_slots=2))
    for name, path in paths.items():
        assert json.loads((path / "adapter_config.json").read_text())["fan_in_fan_out"] is True
        model.load_adapter(name, path)
    assert len(model.layer_names) == 4 * LAYERS
