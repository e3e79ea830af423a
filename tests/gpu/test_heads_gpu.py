"""Classification adapters (``modules_to_save`` heads) on CUDA in bf16, against fp32 PEFT on the host.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. The same cases as tests/test_heads.py: mixed
batches of base rows and adapters whose heads have 3 and 7 labels, right-padded rows of different
lengths, directly through MultiLoraModel and through the adapter store (page-locked CPU tier).
"""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from polylora_async import AdapterStore, MultiLoraModel, StoreConfig, WrapConfig
from tests._classifiers import FAMILIES, ClassifierSet, padded, save_classifier_adapters

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")
LABELS = {"three": 3, "seven": 7, "three-b": 3}
ROWS = ["three", "__base__", "seven", "three-b", "__base__", "seven"]
LENGTHS = [5, 9, 3, 7, 4, 6]
# bf16 keeps 8 mantissa bits (relative rounding 2^-9 per op); two tiny layers and a head stay within
# a few percent of the output's scale.
REL_TOL = 3e-2


def _gpu_model(cset: ClassifierSet) -> MultiLoraModel:
    base = copy.deepcopy(cset.base).to(DEVICE, torch.bfloat16)
    return MultiLoraModel(base, WrapConfig(target_modules=FAMILIES[cset.family][0], max_rank=8))


def _check(cset: ClassifierSet, logits: torch.Tensor, ids: torch.Tensor) -> None:
    logits = logits.float().cpu()
    for i, (adapter, n) in enumerate(zip(ROWS, LENGTHS, strict=True)):
        ref = cset.solo(adapter, ids[i, :n])
        got = logits[i, :n] if cset.family.endswith("-token") else logits[i]
        k = ref.shape[-1]
        err = float((got[..., :k] - ref).abs().max())
        assert err <= REL_TOL * max(1.0, float(ref.abs().max())), f"row {i} ({adapter}): error {err}"
        assert torch.isnan(got[..., k:]).all()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_mixed_heads_bf16(family: str, tmp_path: Path) -> None:
    cset = save_classifier_adapters(family, LABELS, tmp_path)
    model = _gpu_model(cset)
    for name, path in cset.paths.items():
        model.load_adapter(name, path)
    ids, mask = padded(LENGTHS, FAMILIES[family][1])
    with torch.no_grad():
        logits = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), adapter_ids=ROWS).logits
        base = model(input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE), adapter_ids=["__base__"] * 6).logits
        plain = copy.deepcopy(cset.base).to(DEVICE, torch.bfloat16)(
            input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)
        ).logits
    _check(cset, logits, ids)
    assert torch.equal(base, plain)


def test_store_on_cuda_counts_heads(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    cset = save_classifier_adapters("bert", LABELS, tmp_path)
    model = _gpu_model(cset)
    # bf16 model: every saved fp32 tensor takes 2 bytes per element in the tiers.
    expected = sum(
        t.numel() * 2 for p in cset.paths.values() for t in load_file(str(p / "adapter_model.safetensors")).values()
    )

    async def run() -> tuple[int, torch.Tensor]:
        async with asyncio.timeout(120):
            async with AdapterStore(model, StoreConfig(min_residency_s=0.0)) as store:
                slots = {"__base__": 0}
                for name, path in cset.paths.items():
                    slots[name] = await store.ensure_gpu(store.register(name, path))
                ids, mask = padded(LENGTHS, 0)
                with torch.no_grad():
                    out = model.forward_slots(
                        [slots[a] for a in ROWS], input_ids=ids.to(DEVICE), attention_mask=mask.to(DEVICE)
                    ).logits
                torch.cuda.synchronize()
                return store.statistics().gpu.resident_bytes, out

    gpu_bytes, logits = asyncio.run(run())
    assert gpu_bytes == expected
    _check(cset, logits, padded(LENGTHS, 0)[0])
