"""GPT-2 ``Conv1D`` targets on CUDA in bf16: every row against an fp32 solo PEFT run, base rows bit-exact.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. Without CUDA the module skips. The runtime part
runs under ``asyncio.run`` so this needs no pytest-asyncio.
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, WrapConfig
from tests._models import padded_batch, save_peft_adapters
from tests.test_conv1d import GPT2_ADAPTERS, GPT2_TARGETS, tiny_gpt2

pytestmark = pytest.mark.gpu
# bf16 against an fp32 reference, relative to the row's norm. Every layer rounds to bf16 (2^-8) and
# the random adapters are large, so the error compounds through the blocks: PEFT's own bf16 rows of
# these adapters were up to 4.3% off the fp32 ones, the runtime's up to 6.7% (CPU bf16, same test).
# A row may be off by twice PEFT's own bf16 error of it, and never needs to be closer than 8%.
REL_TOL = 8e-2


def _rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.float().cpu() - ref.float().cpu()).norm() / ref.float().cpu().norm())


def _bound(peft_bf16: torch.Tensor, ref: torch.Tensor) -> float:
    return max(REL_TOL, 2.0 * _rel(peft_bf16, ref))


def _peft_row(peft: torch.nn.Module, adapter: str, **inputs: torch.Tensor) -> object:
    with torch.no_grad():
        if adapter == BASE_ADAPTER:
            with peft.disable_adapter():  # type: ignore[operator]
                return peft(**inputs)
        peft.set_adapter(adapter)  # type: ignore[operator]
        return peft(**inputs)


@pytest.mark.parametrize("lm_head", [False, True], ids=["GPT2Model", "GPT2LMHeadModel"])
def test_gpt2_bf16_rows_match_fp32_peft(tmp_path: Path, lm_head: bool) -> None:
    adapters = save_peft_adapters(tiny_gpt2(lm_head), GPT2_ADAPTERS, tmp_path)
    names = list(adapters.paths)
    base_bf16 = copy.deepcopy(adapters.base).to(device="cuda", dtype=torch.bfloat16)
    model = MultiLoraModel(copy.deepcopy(base_bf16), WrapConfig(GPT2_TARGETS, max_rank=8, num_slots=4))
    for name, path in adapters.paths.items():
        model.load_adapter(name, path)

    def pick(out: object) -> torch.Tensor:
        return out.logits if lm_head else out.last_hidden_state  # type: ignore[attr-defined]

    rows = [names[1], BASE_ADAPTER, names[0], names[2], names[1], BASE_ADAPTER]
    lengths = [5, 9, 3, 9, 1, 6]
    ids, mask = padded_batch(lengths, seed=5)
    with torch.no_grad():
        out = pick(model(input_ids=ids.cuda(), attention_mask=mask.cuda(), adapter_ids=rows))
        plain = pick(base_bf16(input_ids=ids.cuda(), attention_mask=mask.cuda()))
    peft_bf16 = copy.deepcopy(adapters.peft).to(device="cuda", dtype=torch.bfloat16)
    for i, (adapter, n) in enumerate(zip(rows, lengths, strict=True)):
        if adapter == BASE_ADAPTER:
            assert torch.equal(out[i], plain[i]), f"base row {i} differs from the unwrapped bf16 model"
        row = {"input_ids": ids[i : i + 1, :n], "attention_mask": mask[i : i + 1, :n]}
        ref = pick(_peft_row(adapters.peft, adapter, **row))
        low = pick(_peft_row(peft_bf16, adapter, **{k: v.cuda() for k, v in row.items()}))
        error, bound = _rel(out[i : i + 1, :n], ref), _bound(low, ref)
        assert error < bound, f"row {i} ({adapter}): {error:.2e} >= {bound:.2e}"
        # The adapter moves the row by more than the bound: the check above can fail.
        if adapter != BASE_ADAPTER:
            assert _rel(pick(_peft_row(adapters.peft, BASE_ADAPTER, **row)), ref) > 2 * bound, adapter


def test_gpt2_runtime_on_cuda_matches_fp32_peft(tmp_path: Path) -> None:
    adapters = save_peft_adapters(tiny_gpt2(lm_head=False), GPT2_ADAPTERS, tmp_path)
    names = list(adapters.paths)
    model = MultiLoraModel(
        copy.deepcopy(adapters.base).to(device="cuda", dtype=torch.bfloat16),
        WrapConfig(GPT2_TARGETS, max_rank=8, num_slots=2),
    )
    g = torch.Generator().manual_seed(0)
    plan = [
        (names[i % 3] if i % 4 else BASE_ADAPTER, torch.randint(1, 101, (3 + i % 11,), generator=g)) for i in range(24)
    ]

    async def scenario() -> list[torch.Tensor]:
        async with asyncio.timeout(120):
            async with Runtime(model, RuntimeConfig(max_batch_size=8, max_wait=0.002)) as runtime:
                for name, path in adapters.paths.items():
                    runtime.register_adapter(name, path)
                return await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in plan))

    results = asyncio.run(scenario())
    peft_bf16 = copy.deepcopy(adapters.peft).to(device="cuda", dtype=torch.bfloat16)
    for (name, ids), out in zip(plan, results, strict=True):
        ref = _peft_row(adapters.peft, name, input_ids=ids[None]).last_hidden_state[0]  # type: ignore[attr-defined]
        low = _peft_row(peft_bf16, name, input_ids=ids[None].cuda()).last_hidden_state[0]  # type: ignore[attr-defined]
        error, bound = _rel(out, ref), _bound(low, ref)
        assert error < bound, f"{name}: {error:.2e} >= {bound:.2e}"
