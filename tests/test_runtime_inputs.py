"""Inputs as tokenizers produce them: [L] and [1, L], int32 and int64, optional masks, token types."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from polylora_async import (
    BASE_ADAPTER,
    InputValidationError,
    MultiLoraModel,
    Runtime,
    RuntimeConfig,
    WrapConfig,
)
from tests._models import AdapterSet, save_peft_adapters
from tests._tiny import HIDDEN, TARGETS, VOCAB, TinyModel, reference, write_adapter

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 model vs an fp64 or fp32 reference run alone


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


def _tiny_runtime(**config: object) -> tuple[Runtime, TinyModel]:
    tiny = TinyModel()
    model = MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=8, num_slots=4))
    return Runtime(model, RuntimeConfig(**config)), tiny  # type: ignore[arg-type]


def _as_tokenizer_gives(ids: torch.Tensor, layout: str, dtype: torch.dtype) -> torch.Tensor:
    return (ids[None] if layout == "[1, L]" else ids).to(dtype)


async def test_shapes_dtypes_and_masks_mixed_in_one_run(tmp_path: Path) -> None:
    adapters = {f"ad{i}": write_adapter(tmp_path, f"ad{i}", seed=i, rank=2 + i) for i in range(3)}
    runtime, tiny = _tiny_runtime(max_batch_size=32, max_wait=0.01)
    names = [*adapters, BASE_ADAPTER]
    plan = []
    for i in range(24):
        ids = _ids(3 + i % 7, seed=i)
        layout, dtype = ("[L]", "[1, L]")[i % 2], (torch.int64, torch.int32)[i // 2 % 2]
        inputs = {"input_ids": _as_tokenizer_gives(ids, layout, dtype)}
        if i % 3 == 1:
            inputs["attention_mask"] = torch.ones(1, len(ids), dtype=torch.int32)
        elif i % 3 == 2:
            inputs["attention_mask"] = torch.ones(len(ids), dtype=torch.bool)
        plan.append((names[i % len(names)], ids, inputs))
    async with asyncio.timeout(60), runtime:
        for name, path in adapters.items():
            runtime.register_adapter(name, path)
        # One at a time first: no request fixes what later requests may look like.
        first = [await runtime.submit(inputs, name) for name, _, inputs in plan[:4]]
        rest = await asyncio.gather(*(runtime.submit(inputs, name) for name, _, inputs in plan[4:]))
        stats = runtime.statistics()
    assert stats.batches < len(plan)  # rows with and without masks, of every layout, shared batches
    for (name, ids, _), out in zip(plan, [*first, *rest], strict=True):
        assert out.shape == (len(ids), HIDDEN)
        expected = reference(tiny, adapters.get(name), ids)
        torch.testing.assert_close(out.double(), expected, **TOL)


async def test_submit_nowait_normalises_as_submit_does() -> None:
    runtime, tiny = _tiny_runtime()
    ids = _ids(6, seed=3)
    async with asyncio.timeout(30), runtime:
        out = await runtime.submit_nowait({"input_ids": ids[None].int()})
    torch.testing.assert_close(out.double(), reference(tiny, None, ids), **TOL)


def _tiny_bert() -> nn.Module:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=40, vocab_size=VOCAB,
        max_position_embeddings=64, type_vocab_size=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    return BertModel(config).eval()


@pytest.fixture(scope="module")
def bert_set(tmp_path_factory: pytest.TempPathFactory) -> AdapterSet:
    specs: dict[str, dict[str, object]] = {
        "qv": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]},
        "kd": {"r": 2, "lora_alpha": 4, "target_modules": ["key", "dense"]},
    }
    return save_peft_adapters(_tiny_bert(), specs, tmp_path_factory.mktemp("bert"))


async def test_bert_token_types_and_optional_masks(bert_set: AdapterSet) -> None:
    model = MultiLoraModel(copy.deepcopy(bert_set.base), WrapConfig(["query", "key", "value", "dense"], max_rank=8))
    g = torch.Generator().manual_seed(5)
    names = [*bert_set.paths, BASE_ADAPTER]
    plan = []
    for i in range(12):
        length = 4 + (i * 5) % 11
        ids = torch.randint(1, VOCAB, (length,), generator=g)
        types = (torch.arange(length) >= length // 2).long()  # a sentence pair
        mask = None
        if i % 3 == 1:
            mask = torch.ones(length, dtype=torch.long)
            mask[-2:] = 0  # the caller's own padding inside the row
        elif i % 3 == 2:
            mask = torch.ones(length, dtype=torch.long)
        inputs: dict[str, torch.Tensor] = {"input_ids": ids[None].int() if i % 2 else ids}
        if i % 4 != 3:  # some requests leave token types out: the model's default (zeros) applies
            inputs["token_type_ids"] = types[None] if i % 2 else types.int()
        if mask is not None:
            inputs["attention_mask"] = mask[None] if i % 2 else mask
        plan.append((names[i % len(names)], ids, types if i % 4 != 3 else None, mask, inputs))
    async with asyncio.timeout(120), Runtime(model, RuntimeConfig(max_batch_size=16, max_wait=0.02)) as runtime:
        for name, path in bert_set.paths.items():
            runtime.register_adapter(name, path)
        outs = await asyncio.gather(*(runtime.submit(inputs, name) for name, *_, inputs in plan))
        stats = runtime.statistics()
    assert stats.batches < len(plan)
    for (name, ids, types, mask, _), out in zip(plan, outs, strict=True):
        alone = {"input_ids": ids[None]}
        if types is not None:
            alone["token_type_ids"] = types[None]
        if mask is not None:
            alone["attention_mask"] = mask[None]
        torch.testing.assert_close(out, bert_set.solo(name, **alone)[0], **TOL)


class _WithFeatures(TinyModel):
    """TinyModel with an optional per-token float input: absent and zero-padded differ."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Linear(3, HIDDEN)

    def forward(  # type: ignore[override]
        self, input_ids: torch.Tensor, features: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self.embed(input_ids)
        # Absent: a learnt offset per token, which zero features would not reproduce (bias only).
        hidden = hidden + (self.features.weight.sum(1) if features is None else self.features(features))
        return self.down(torch.nn.functional.gelu(self.up(hidden)))


async def test_requests_with_and_without_an_optional_input_are_batched_apart() -> None:
    plain = _WithFeatures()  # built twice from one seed: TinyModel holds events, which do not copy
    model = MultiLoraModel(_WithFeatures(), WrapConfig(TARGETS, max_rank=4))
    g = torch.Generator().manual_seed(2)
    plan = []
    for i in range(10):
        ids = _ids(2 + i % 5, seed=40 + i)
        inputs = {"input_ids": ids}
        if i % 2:
            inputs["features"] = torch.randn(len(ids), 3, generator=g)
        plan.append(inputs)
    async with asyncio.timeout(60), Runtime(model, RuntimeConfig(max_batch_size=16, max_wait=0.02)) as runtime:
        outs = await asyncio.gather(*(runtime.submit(inputs) for inputs in plan))
        stats = runtime.statistics()
    for inputs, out in zip(plan, outs, strict=True):
        with torch.no_grad():
            expected = plain(**{n: t[None] for n, t in inputs.items()})[0]
        torch.testing.assert_close(out, expected, **TOL)
    assert stats.batches >= 2


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"input_ids": _ids(4, 0), "token_type_ids": torch.zeros(4, dtype=torch.long)}, "'token_type_ids' is not an"),
        ({"input_ids": _ids(4, 0), "pixel_values": torch.zeros(4)}, "'pixel_values' is not an argument"),
        ({"input_ids": torch.ones(2, 4, dtype=torch.long)}, r"'input_ids' must have shape \[L\] or \[1, L\]"),
        ({"input_ids": torch.ones(1, 1, 4, dtype=torch.long)}, r"'input_ids' must have shape \[L\] or \[1, L\]"),
        ({"input_ids": torch.ones(4, dtype=torch.bool)}, "'input_ids' must be an integer tensor"),
        ({"input_ids": _ids(4, 0), "attention_mask": torch.ones(4)}, "'attention_mask' must be an integer tensor"),
        ({"input_ids": _ids(4, 0)[None], "attention_mask": torch.ones(1, 3, dtype=torch.long)}, "length 3"),
    ],
)
async def test_inputs_that_do_not_fit_the_model_are_refused_at_submit(
    inputs: dict[str, torch.Tensor], match: str
) -> None:
    runtime, tiny = _tiny_runtime()
    ids = _ids(5, seed=9)
    async with asyncio.timeout(30), runtime:
        for call in (runtime.submit, runtime.submit_nowait):
            with pytest.raises(InputValidationError, match=match):
                result = call(inputs)
                if asyncio.iscoroutine(result):
                    await result
        out = await runtime.submit({"input_ids": ids})  # the refusals changed nothing
        assert runtime.statistics().submitted == 1
    torch.testing.assert_close(out.double(), reference(tiny, None, ids), **TOL)


class _TakesAnything(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = TinyModel()

    def forward(self, input_ids: torch.Tensor, **kwargs: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids) + kwargs["extra"].unsqueeze(-1)


async def test_a_forward_with_kwargs_accepts_any_input_name() -> None:
    plain = _TakesAnything()
    model = MultiLoraModel(_TakesAnything(), WrapConfig(["up"], max_rank=4))
    ids = _ids(5, seed=1)
    extra = torch.arange(5, dtype=torch.float32)
    async with asyncio.timeout(30), Runtime(model, RuntimeConfig(attention_mask=False)) as runtime:
        out = await runtime.submit({"input_ids": ids, "extra": extra})
    with torch.no_grad():
        torch.testing.assert_close(out, plain(ids[None], extra=extra[None])[0], **TOL)


class _Recording(TinyModel):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[torch.dtype, torch.dtype | None, int]] = []

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        self.seen.append((input_ids.dtype, None if attention_mask is None else attention_mask.dtype, input_ids.dim()))
        return super().forward(input_ids, attention_mask)


async def test_the_model_gets_int64_rows_whatever_the_caller_sent() -> None:
    recording = _Recording()
    model = MultiLoraModel(recording, WrapConfig(TARGETS, max_rank=4))
    ids = _ids(4, seed=7)
    variants = [ids, ids[None], ids.int(), ids[None].int()]
    async with asyncio.timeout(30), Runtime(model) as runtime:
        for variant in [*variants, *variants]:  # the second round takes the path for known layouts
            out = await runtime.submit({"input_ids": variant, "attention_mask": torch.ones_like(variant)})
            torch.testing.assert_close(out.double(), reference(recording, None, ids), **TOL)
    # Every forward (the runtime may add a few of its own to learn the output's layout) saw [rows, width] int64.
    assert len(recording.seen) >= 2 * len(variants)
    assert set(recording.seen) == {(torch.int64, torch.int64, 2)}


async def test_a_name_bert_does_not_take_is_refused(bert_set: AdapterSet) -> None:
    # BertModel.forward takes **kwargs typed with a TypedDict: its keys are accepted, nothing else.
    model = MultiLoraModel(copy.deepcopy(bert_set.base), WrapConfig(["query", "value"], max_rank=8))
    ids = _ids(5, seed=2)
    async with asyncio.timeout(60), Runtime(model) as runtime:
        with pytest.raises(InputValidationError, match="'pixel_values' is not an argument"):
            await runtime.submit({"input_ids": ids, "pixel_values": torch.zeros(5)})
        out = await runtime.submit({"input_ids": ids, "position_ids": torch.arange(5, dtype=torch.int32)[None]})
    torch.testing.assert_close(out, bert_set.solo(BASE_ADAPTER, input_ids=ids[None])[0], **TOL)
