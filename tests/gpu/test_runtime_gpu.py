"""The runtime on CUDA: every row's result, with the output copied to the host on its own stream.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. Without CUDA the module skips. The async parts
run under ``asyncio.run`` so these tests need no pytest-asyncio.

The model sleeps on the GPU before its last layer, so the output is written long after the host
has queued the copy to pinned memory: a copy that did not wait for the forward would return stale
memory, which the fp64 reference below catches.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, WrapConfig
from tests._tiny import TARGETS, VOCAB, TinyModel, reference, write_adapter

pytestmark = pytest.mark.gpu
SLEEP_CYCLES = 20_000_000  # ~10-20 ms per forward on current GPUs
# fp32 on the GPU: cuBLAS and the Triton kernels may use TF32; relative error per row stays far below this.
REL_TOL = 1e-2


class SlowTiny(TinyModel):
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        hidden = torch.nn.functional.gelu(self.up(self.embed(input_ids)))
        torch.cuda._sleep(SLEEP_CYCLES)
        return self.down(hidden)


def _close(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double().cpu() - ref).norm() / ref.norm())


@pytest.mark.parametrize("results_on_cpu", [True, False])
def test_every_row_matches_its_reference(tmp_path: Path, results_on_cpu: bool) -> None:
    tiny = SlowTiny()
    reference_model = TinyModel()  # same seed: the same base weights, kept on the host
    paths = {f"ad{i}": write_adapter(tmp_path, f"ad{i}", seed=i, rank=2 + i % 3) for i in range(6)}
    model = MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=4, num_slots=4)).to("cuda")
    rng = random.Random(0)
    names = [*paths, BASE_ADAPTER]
    plan = [(rng.choice(names), torch.randint(1, VOCAB, (rng.randint(1, 20),))) for _ in range(200)]

    async def scenario() -> list[torch.Tensor]:
        config = RuntimeConfig(max_batch_size=16, max_wait=0.002, results_on_cpu=results_on_cpu)
        async with Runtime(model, config) as runtime:
            for name, path in paths.items():
                runtime.register_adapter(name, path)
            return await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in plan))

    results = asyncio.run(scenario())
    for (name, ids), out in zip(plan, results, strict=True):
        assert out.device.type == ("cpu" if results_on_cpu else "cuda")
        expected = reference(reference_model, None if name == BASE_ADAPTER else paths[name], ids)
        assert out.shape == expected.shape
        assert _close(out, expected) < REL_TOL, name
