"""Encoder-decoder models (T5, BART): decoder inputs padded along their own length, outputs cut along theirs.

Every check is against PEFT running the same row alone with the same adapter.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from polylora_async import (
    BASE_ADAPTER,
    ConfigError,
    InputValidationError,
    MultiLoraModel,
    Runtime,
    RuntimeConfig,
    WrapConfig,
)
from tests._seq2seq import FAMILIES, VOCAB, Seq2SeqSet, rows, save_adapters

TOL = {"rtol": 1e-4, "atol": 1e-5}
FAMILY_NAMES = sorted(FAMILIES)


@pytest.fixture(scope="module", params=FAMILY_NAMES)
def seq2seq(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Seq2SeqSet:
    family = request.param
    return save_adapters(family, {"a": 4, "b": 2, "c": 8}, tmp_path_factory.mktemp(family))


def _wrap(cset: Seq2SeqSet) -> MultiLoraModel:
    return MultiLoraModel(copy.deepcopy(cset.base), WrapConfig(FAMILIES[cset.family][0], max_rank=8, num_slots=4))


# (adapter, encoder length, decoder length): decoder lengths shorter, longer and equal to the
# encoder's, one equal to the batch's padded encoder width (16), and base rows among them.
PLAN = [
    ("a", 5, 3),
    (BASE_ADAPTER, 9, 1),
    ("b", 7, 16),
    ("c", 3, 3),
    ("a", 14, 11),
    (BASE_ADAPTER, 2, 6),
]


async def _serve(cset: Seq2SeqSet, requests: list[tuple[str, dict[str, torch.Tensor]]], **runtime: Any) -> list[Any]:
    async with asyncio.timeout(120), Runtime(_wrap(cset), **runtime) as rt:
        for name, path in cset.paths.items():
            rt.register_adapter(name, path)
        outs = await asyncio.gather(*(rt.submit(inputs, name) for name, inputs in requests))
        assert rt.statistics().batches < len(requests)  # rows of different lengths shared batches
    return outs


async def test_mixed_batch_logits_follow_the_decoder_length(seq2seq: Seq2SeqSet) -> None:
    requests = rows(PLAN, FAMILIES[seq2seq.family][1])
    outs = await _serve(seq2seq, requests)
    for (name, inputs), out in zip(requests, outs, strict=True):
        expected = seq2seq.solo(name, **inputs).logits[0]
        assert out.shape == (inputs["decoder_input_ids"].shape[0], VOCAB)
        torch.testing.assert_close(out, expected, **TOL)


async def test_encoder_outputs_follow_the_encoder_length(seq2seq: Seq2SeqSet) -> None:
    requests = rows(PLAN, FAMILIES[seq2seq.family][1], seed=1)
    outs = await _serve(seq2seq, requests, select_output=lambda outputs: outputs.encoder_last_hidden_state)
    for (name, inputs), out in zip(requests, outs, strict=True):
        expected = seq2seq.solo(name, **inputs).encoder_last_hidden_state[0]
        assert out.shape[0] == inputs["input_ids"].shape[0]
        torch.testing.assert_close(out, expected, **TOL)


async def test_tokenizer_shaped_decoder_inputs_with_masks(seq2seq: Seq2SeqSet) -> None:
    # [1, L] int32 ids as a tokenizer returns them, and a decoder mask on every request of the run.
    requests = []
    for name, inputs in rows(PLAN, FAMILIES[seq2seq.family][1], seed=2):
        inputs = {k: v[None].to(torch.int32) for k, v in inputs.items()}
        inputs["decoder_attention_mask"] = torch.ones_like(inputs["decoder_input_ids"])
        requests.append((name, inputs))
    outs = await _serve(seq2seq, requests)
    for (name, inputs), out in zip(requests, outs, strict=True):
        solo = {k: v[0].long() for k, v in inputs.items()}
        torch.testing.assert_close(out, seq2seq.solo(name, **solo).logits[0], **TOL)


async def test_bart_without_decoder_inputs_follows_the_encoder_length(tmp_path: Path) -> None:
    # BART builds its decoder inputs from input_ids (shifted right) when none are given.
    cset = save_adapters("bart", {"a": 4, "b": 2}, tmp_path)
    requests = rows([("a", 5, 0), ("b", 12, 0), (BASE_ADAPTER, 8, 0), ("a", 3, 0)], FAMILIES["bart"][1])
    outs = await _serve(cset, requests)
    for (name, inputs), out in zip(requests, outs, strict=True):
        torch.testing.assert_close(out, cset.solo(name, **inputs).logits[0], **TOL)


def test_multilora_model_mixed_padded_batch(seq2seq: Seq2SeqSet) -> None:
    pad = FAMILIES[seq2seq.family][1]
    requests = rows(PLAN, pad, seed=3)
    model = _wrap(seq2seq)
    for name, path in seq2seq.paths.items():
        model.load_adapter(name, path)
    n = max(r["input_ids"].shape[0] for _, r in requests)
    m = max(r["decoder_input_ids"].shape[0] for _, r in requests)
    ids = torch.full((len(requests), n), pad)
    mask = torch.zeros(len(requests), n, dtype=torch.long)
    decoder_ids = torch.full((len(requests), m), pad)
    for row, (_, inputs) in enumerate(requests):
        length, decoder_length = inputs["input_ids"].shape[0], inputs["decoder_input_ids"].shape[0]
        ids[row, :length], mask[row, :length] = inputs["input_ids"], 1
        decoder_ids[row, :decoder_length] = inputs["decoder_input_ids"]
    with torch.no_grad():
        out = model(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, adapter_ids=[a for a, _ in requests]
        )
    for row, (name, inputs) in enumerate(requests):
        expected = seq2seq.solo(name, **inputs)
        decoder_length = inputs["decoder_input_ids"].shape[0]
        torch.testing.assert_close(out.logits[row, :decoder_length], expected.logits[0], **TOL)


async def test_decoder_input_checks_name_the_input(tmp_path: Path) -> None:
    cset = save_adapters("t5", {"a": 4}, tmp_path)
    ids = torch.randint(1, VOCAB, (6,))
    bad = [
        ({"input_ids": ids, "decoder_input_ids": ids[:3], "decoder_attention_mask": torch.ones(4, dtype=torch.long)},
         "'decoder_attention_mask' has length 4, but input 'decoder_input_ids' has length 3"),
        ({"decoder_input_ids": ids}, "the encoder's inputs"),
        ({"input_ids": ids, "decoder_input_ids": ids[:0]}, "'decoder_input_ids' has length 0"),
        ({"input_ids": ids, "decoder_input_ids": torch.tensor([1, VOCAB])}, f"holds token id {VOCAB}"),
    ]  # fmt: skip
    async with asyncio.timeout(60), Runtime(_wrap(cset), RuntimeConfig(max_wait=0)) as rt:
        for inputs, message in bad:
            with pytest.raises(InputValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
                await rt.submit(inputs, "a" if "a" in rt.store.adapter_ids() else BASE_ADAPTER)
        # the runtime still serves after the refusals
        out = await rt.submit({"input_ids": ids, "decoder_input_ids": ids[:2]})
        expected = cset.solo(BASE_ADAPTER, input_ids=ids, decoder_input_ids=ids[:2]).logits[0]
        torch.testing.assert_close(out, expected, **TOL)


def test_decoder_classifier_without_pad_id_is_refused_at_start() -> None:
    from transformers import LlamaConfig, LlamaForSequenceClassification

    config = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=40, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, num_labels=3, pad_token_id=None,
    )  # fmt: skip
    model = MultiLoraModel(LlamaForSequenceClassification(config), WrapConfig(["q_proj"], max_rank=4))
    with pytest.raises(ConfigError, match=r"needs `config.pad_token_id`.*set `model\.config\.pad_token_id`"):
        Runtime(model)
