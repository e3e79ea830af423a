"""The adapter store on CUDA: slot writes on the copy stream are ordered by events, never by syncs.

Run on the GPU machine: ``pytest -m gpu tests/gpu``. Every test is marked ``gpu``; without CUDA the
module skips. The async parts run under ``asyncio.run`` so these tests need no pytest-asyncio.

The tests make the GPU slow on purpose (``torch.cuda._sleep`` inside the model, or on the copy
stream) so that a missing event wait would let a slot write and a batch overlap, and check every
output against an fp64 reference computed on the host from the generated tensors.
"""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)

from safetensors.torch import save_file
from torch import nn

from polylora_async import MultiLoraModel, WrapConfig
from polylora_async.store import AdapterStore, StoreConfig
from polylora_async.store._cpu_tier import stage_weights

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda")
HIDDEN = 256
TARGETS = ("0", "2")  # layer "1" is the sleeper
# ~50-100 ms on current GPUs: far longer than the host needs to issue the racing slot write.
SLEEP_CYCLES = 100_000_000
# fp32 on the GPU: cuBLAS and the Triton kernels may use TF32 (10-bit mantissa); relative error of the
# whole output, whose LoRA part is large by construction, stays far below 1e-2.
REL_TOL = 1e-2


class Sleeper(nn.Module):
    """Holds the compute stream between the two LoRA layers for ``cycles`` GPU clock cycles."""

    def __init__(self) -> None:
        super().__init__()
        self.cycles = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cycles:
            torch.cuda._sleep(self.cycles)
        return x


class Lora:
    def __init__(self, seed: int, rank: int = 4) -> None:
        g = torch.Generator().manual_seed(seed)
        self.rank = rank
        self.alpha = 2.0 * rank
        self.factors = {
            t: (torch.randn(rank, HIDDEN, generator=g) / HIDDEN**0.5, torch.randn(HIDDEN, rank, generator=g))
            for t in TARGETS
        }

    def write(self, path: Path) -> Path:
        path.mkdir(parents=True)
        tensors = {}
        for name, (a, b) in self.factors.items():
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
        save_file(tensors, str(path / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": self.rank, "lora_alpha": self.alpha, "target_modules": list(TARGETS)}
        (path / "adapter_config.json").write_text(json.dumps(config))
        return path


class Setup:
    def __init__(self, num_slots: int) -> None:
        torch.manual_seed(0)
        self.sleeper = Sleeper()
        first, last = nn.Linear(HIDDEN, HIDDEN), nn.Linear(HIDDEN, HIDDEN)
        base = nn.Sequential(first, self.sleeper, last)
        self.weights = {n: (m.weight.detach().double().clone(), m.bias.detach().double().clone())
                        for n, m in zip(TARGETS, (first, last), strict=True)}
        self.model = MultiLoraModel(base.to(DEVICE), WrapConfig(list(TARGETS), max_rank=8, num_slots=num_slots))

    def reference(self, lora: Lora | None, x: torch.Tensor) -> torch.Tensor:
        h = x.double().cpu()
        for name in TARGETS:
            w, b = self.weights[name]
            y = h @ w.T + b
            if lora is not None:
                a, bb = (t.double() for t in lora.factors[name])
                y = y + (lora.alpha / lora.rank) * (h @ a.T) @ bb.T
            h = y
        return h


def _close(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.detach().double().cpu() - ref).norm() / ref.norm())


def test_staged_weights_are_one_pinned_storage(tmp_path: Path) -> None:
    setup = Setup(num_slots=1)
    path = Lora(1).write(tmp_path / "a")
    for weights in (setup.model.prepare_adapter("a", path), setup.model.prepare_adapter("a", path, pin_memory=True)):
        staged = stage_weights(weights, pin=True)
        storage = staged.storage
        assert storage is not None and storage.is_pinned()  # the slot write: one asynchronous copy
        start, size = storage.data_ptr(), storage.numel() * storage.element_size()
        for lora in staged.layers.values():
            for t in (lora.a, lora.b):
                assert t.is_pinned() and start <= t.data_ptr() < start + size
    read_pinned = setup.model.prepare_adapter("a", path, pin_memory=True)
    assert stage_weights(read_pinned, pin=True) is read_pinned  # read straight into pinned memory


def test_slot_is_not_overwritten_while_a_batch_still_reads_it(tmp_path: Path) -> None:
    setup = Setup(num_slots=1)
    la, lb = Lora(1), Lora(2)
    x = torch.randn(8, HIDDEN, device=DEVICE)
    ref_a, ref_b = setup.reference(la, x), setup.reference(lb, x)
    assert _close(ref_a.float(), ref_b) > 10 * REL_TOL  # the check below can fail

    async def scenario() -> tuple[torch.Tensor, torch.Tensor, bool]:
        async with AdapterStore(setup.model, StoreConfig(min_residency_s=0.0)) as store:
            a = store.register("a", la.write(tmp_path / "a"))
            b = store.register("b", lb.write(tmp_path / "b"))
            # Warm up (lazy initialisation, kernel compilation) with a finished batch.
            with await store.acquire_lease([a]) as warm:
                warm.wait_copies()
                setup.model.forward_slots(warm.row_slots([a] * 8), x)
            torch.cuda.synchronize()
            lease = await store.acquire_lease([a])
            store.prefetch([b])  # the only slot is leased: b waits in (pinned) CPU memory
            await store.drain()
            lease.wait_copies()
            setup.sleeper.cycles = SLEEP_CYCLES  # layer "2" reads the slot only after a long sleep
            out_a = setup.model.forward_slots(lease.row_slots([a] * 8), x)
            setup.sleeper.cycles = 0
            done = torch.cuda.Event()
            done.record()
            lease.release(done)
            await store.ensure_gpu(b)  # reuses the slot at once: the write must wait for `done`
            still_running = not done.query()
            lease_b = store.lease([b])
            lease_b.wait_copies()
            out_b = setup.model.forward_slots(lease_b.row_slots([b] * 8), x)
            done_b = torch.cuda.Event()
            done_b.record()
            lease_b.release(done_b)
            torch.cuda.synchronize()
            return out_a, out_b, still_running

    out_a, out_b, still_running = asyncio.run(scenario())
    assert still_running, "the batch finished before the slot was rewritten: raise SLEEP_CYCLES"
    assert _close(out_a, ref_a) < REL_TOL, "the batch read a slot overwritten under it"
    assert _close(out_b, ref_b) < REL_TOL


def test_batch_waits_for_its_slot_copies(tmp_path: Path) -> None:
    setup = Setup(num_slots=1)
    la, lb = Lora(3), Lora(4)
    x = torch.randn(4, HIDDEN, device=DEVICE)

    async def scenario() -> tuple[torch.Tensor, bool]:
        async with AdapterStore(setup.model, StoreConfig(min_residency_s=0.0)) as store:
            a = store.register("a", la.write(tmp_path / "a"))
            b = store.register("b", lb.write(tmp_path / "b"))
            await store.ensure_gpu(a)
            torch.cuda.synchronize()
            with torch.cuda.stream(store.copy_stream):
                torch.cuda._sleep(SLEEP_CYCLES)  # the next slot write queues behind this
            await store.ensure_gpu(b)
            lease = store.lease([b])
            copy_pending = not lease.copy_events[0].query()
            lease.wait_copies()
            out = setup.model.forward_slots(lease.row_slots([b] * 4), x)
            done = torch.cuda.Event()
            done.record()
            lease.release(done)
            torch.cuda.synchronize()
            return out, copy_pending

    out, copy_pending = asyncio.run(scenario())
    assert copy_pending, "the slot write finished before the batch launched: raise SLEEP_CYCLES"
    assert _close(out, setup.reference(lb, x)) < REL_TOL, "the batch ran before its slot write"


def test_many_adapters_cycle_through_few_slots_without_syncs(tmp_path: Path) -> None:
    setup = Setup(num_slots=4)
    loras = [Lora(100 + i, rank=1 + i % 8) for i in range(48)]
    rng = random.Random(0)
    plans = [[rng.randrange(len(loras)) for _ in range(6)] for _ in range(60)]

    async def scenario() -> list[tuple[list[int], torch.Tensor, torch.Tensor]]:
        results = []
        config = StoreConfig(cpu_bytes=1 << 20, min_residency_s=0.0)  # ~16 of the 48 adapters
        async with AdapterStore(setup.model, config) as store:
            refs = [store.register(f"a{i}", lora.write(tmp_path / f"a{i}")) for i, lora in enumerate(loras)]
            for t, plan in enumerate(plans):
                distinct = list(dict.fromkeys(plan))[:4]
                plan = [p if p in distinct else distinct[0] for p in plan]
                if t + 1 < len(plans):
                    store.prefetch([refs[i] for i in plans[t + 1]])
                rows = [refs[i] for i in plan]
                lease = await store.acquire_lease(rows)
                lease.wait_copies()
                setup.sleeper.cycles = SLEEP_CYCLES // 20 if t % 3 == 0 else 0
                x = torch.randn(len(rows), HIDDEN, device=DEVICE)
                out = setup.model.forward_slots(lease.row_slots(rows), x)
                done = torch.cuda.Event()
                done.record()
                lease.release(done)  # no synchronisation: the next loads overlap this batch
                results.append((plan, x, out))
            setup.sleeper.cycles = 0
            torch.cuda.synchronize()
            assert store.statistics().gpu.evictions > 0
        return results

    for plan, x, out in asyncio.run(scenario()):
        for row, i in enumerate(plan):
            ref = setup.reference(loras[i], x[row : row + 1])
            assert _close(out[row : row + 1], ref) < REL_TOL, f"row {row} (adapter {i})"


def test_store_moves_slot_tables_to_the_device_up_front() -> None:
    # A lazy move in the first forward could race with a slot write issued from the copy thread.
    setup = Setup(num_slots=2)
    store = AdapterStore(setup.model)
    for layer in setup.model.iter_layers():
        assert layer._ranks_dev.device.type == "cuda" and layer._scales_dev.device.type == "cuda"
    assert store.copy_stream is not None and store.copy_stream != torch.cuda.current_stream()
