"""The runtime's input and output handling on CUDA in bf16: classifiers, tokenizer inputs, encoder-decoders.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. The cases of tests/test_runtime_tasks.py,
tests/test_runtime_inputs.py and tests/test_encoder_decoder.py, through the runtime on a bf16
model: every row against PEFT running it alone in fp32 on the host. The bound is the dtype's on
that model: a row may be off by twice the largest error PEFT's own bf16 runs of the same rows
have (each alone, same device), and never needs to be closer than the bf16 kernels' 1.5%
(tests/gpu/test_kernels_gpu.py). One row's own PEFT error is too noisy a bound: it may be
small by luck. Each test runs
under ``asyncio.run`` with a timeout, so this needs no pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import copy
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

# POLYLORA_TEST_DEVICE=cpu runs these checks on the host in bf16 (a dry run of the test itself).
if os.environ.get("POLYLORA_TEST_DEVICE", "cuda") == "cuda" and not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, WrapConfig
from tests import _classifiers, _seq2seq

pytestmark = pytest.mark.gpu
DEVICE = torch.device(os.environ.get("POLYLORA_TEST_DEVICE", "cuda"))
FLOOR = 1.5e-2
ERRORS: list[tuple[str, float, float]] = []  # (case, ours, PEFT's own bf16 error), printed at the end


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float().cpu(), ref.float().cpu()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-12))


class _Rows:
    """Collects one model's rows, then checks them all against the bound."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []

    def add(self, case: str, ours: torch.Tensor, ref: torch.Tensor, peft_bf16: torch.Tensor) -> None:
        assert ours.shape == ref.shape, (case, tuple(ours.shape), tuple(ref.shape))
        self.rows.append((case, _rel(ours, ref), _rel(peft_bf16, ref)))

    def check(self) -> None:
        ERRORS.extend(self.rows)
        bound = max(FLOOR, 2 * max(peft for _, _, peft in self.rows))
        worst = max(self.rows, key=lambda row: row[1])
        assert worst[1] <= bound, f"{worst[0]}: relative error {worst[1]:.3g} > {bound:.3g} ({self.rows})"


def _bf16(module: torch.nn.Module) -> torch.nn.Module:
    return copy.deepcopy(module).to(DEVICE, torch.bfloat16).eval()


def _serve(
    model: MultiLoraModel,
    paths: dict[str, Path],
    requests: list[tuple[str, dict[str, torch.Tensor]]],
    select: Callable[[Any], torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    async def run() -> list[torch.Tensor]:
        async with asyncio.timeout(300):
            config = RuntimeConfig(max_wait=0.05)
            async with Runtime(model, config, select_output=select) as runtime:
                for name, path in paths.items():
                    runtime.register_adapter(name, path)
                outs = await asyncio.gather(*(runtime.submit(inputs, name) for name, inputs in requests))
                assert runtime.statistics().mixed_batches >= 1
                return list(outs)

    return asyncio.run(run())


@pytest.mark.parametrize("family", list(_classifiers.FAMILIES))
def test_classifier_adapters_through_the_runtime(family: str, tmp_path: Path) -> None:
    # Heads of 3 and 7 labels over a 16-label base head: each row gets its own head's width.
    cset = _classifiers.save_classifier_adapters(family, {"three": 3, "seven": 7}, tmp_path, base_labels=16)
    targets, pad = _classifiers.FAMILIES[family]
    model = MultiLoraModel(_bf16(cset.base), WrapConfig(targets, max_rank=8))
    g = torch.Generator().manual_seed(3)
    plan = [("three", 3), (BASE_ADAPTER, 7), ("seven", 12), ("three", 16), (BASE_ADAPTER, 1), ("seven", 5)]
    requests = [
        (name, {"input_ids": torch.randint(pad + 1, _classifiers.VOCAB, (n,), generator=g)}) for name, n in plan
    ]
    outs = _serve(model, cset.paths, requests)
    checked = _Rows()
    for (name, inputs), out in zip(requests, outs, strict=True):
        ids = inputs["input_ids"]
        reference = cset.base if name == BASE_ADAPTER else cset.references[name]
        with torch.no_grad():
            peft_bf16 = _bf16(reference)(input_ids=ids[None].to(DEVICE)).logits[0]
        checked.add(f"{family}/{name}/{len(ids)}", out, cset.solo(name, ids), peft_bf16)
    checked.check()


def test_tokenizer_inputs_and_a_pooler_as_wide_as_the_batch() -> None:
    # [1, L] int32 and [L] int64 ids, masks on some requests only, token types; BERT's pooler
    # output (hidden 64) in batches padded to 64 stays whole.
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48, vocab_size=101,
        max_position_embeddings=80, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )  # fmt: skip
    bert = BertModel(config).eval()
    model = MultiLoraModel(_bf16(bert), WrapConfig(["query", "value"], max_rank=4))
    g = torch.Generator().manual_seed(2)
    requests = []
    for i, n in enumerate((5, 10, 60, 33, 1, 47)):
        ids = torch.randint(1, 101, (n,), generator=g)
        inputs = {"input_ids": ids[None].int() if i % 2 else ids, "token_type_ids": (torch.arange(n) >= n // 2).long()}
        if i % 3 == 0:
            inputs["attention_mask"] = torch.ones(1, n, dtype=torch.int32)
        requests.append((BASE_ADAPTER, inputs))
    requests.append(requests[0])  # mixed_batches counts batches of >1 slot; base rows only here

    async def run() -> list[torch.Tensor]:
        async with (
            asyncio.timeout(300),
            Runtime(model, RuntimeConfig(max_wait=0.05), select_output=lambda o: o.pooler_output) as rt,
        ):
            return list(await asyncio.gather(*(rt.submit(inputs) for _, inputs in requests)))

    outs = asyncio.run(run())
    checked = _Rows()
    for i, ((_, inputs), out) in enumerate(zip(requests, outs, strict=True)):
        alone = {k: (v if v.dim() == 2 else v[None]).long() for k, v in inputs.items()}
        with torch.no_grad():
            ref = bert(**alone).pooler_output[0]
            peft_bf16 = _bf16(bert)(**{k: v.to(DEVICE) for k, v in alone.items()}).pooler_output[0]
        assert out.shape == (64,)
        checked.add(f"bert-pooler/{i}", out, ref, peft_bf16)
    checked.check()


@pytest.mark.parametrize("family", sorted(_seq2seq.FAMILIES))
def test_encoder_decoder_mixed_batches(family: str, tmp_path: Path) -> None:
    cset = _seq2seq.save_adapters(family, {"a": 4, "b": 2, "c": 8}, tmp_path)
    targets, pad = _seq2seq.FAMILIES[family]
    plan = [("a", 5, 3), (BASE_ADAPTER, 9, 1), ("b", 7, 16), ("c", 3, 3), ("a", 14, 11), (BASE_ADAPTER, 2, 6)]
    requests = _seq2seq.rows(plan, pad)
    model = MultiLoraModel(_bf16(cset.base), WrapConfig(targets, max_rank=8, num_slots=4))
    outs = _serve(model, cset.paths, requests)
    peft_bf16 = _bf16(cset.peft)
    checked = _Rows()
    for (name, inputs), out in zip(requests, outs, strict=True):
        ref = cset.solo(name, **inputs).logits[0]
        batched = {k: v[None].to(DEVICE) for k, v in inputs.items()}
        with torch.no_grad():
            if name == BASE_ADAPTER:
                with peft_bf16.disable_adapter():  # type: ignore[operator]
                    own = peft_bf16(**batched).logits[0]
            else:
                peft_bf16.set_adapter(name)  # type: ignore[operator]
                own = peft_bf16(**batched).logits[0]
        shape = f"{inputs['input_ids'].shape[0]}x{inputs['decoder_input_ids'].shape[0]}"
        checked.add(f"{family}/{name}/{shape}", out, ref, own)
    checked.check()


def test_zz_print_errors() -> None:
    """Prints every row's error (for RESULTS.md); runs last in this module."""
    assert ERRORS, "no rows were checked"
    worst = max(ERRORS, key=lambda e: e[1])
    print(f"\n{len(ERRORS)} rows; worst {worst[0]}: ours {worst[1]:.3g}, PEFT bf16 {worst[2]:.3g}")
    for case, ours, peft in ERRORS:
        print(f"  {case}: ours {ours:.3g}, PEFT bf16 {peft:.3g}")
