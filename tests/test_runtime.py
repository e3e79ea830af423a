"""The async runtime: correctness under concurrency, and every failure path resolves every request."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch

from polylora_async import (
    BASE_ADAPTER,
    AdapterNotFoundError,
    BatchFailedError,
    InputValidationError,
    MultiLoraModel,
    OverloadedError,
    RequestTimeoutError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    WorkerCrashedError,
    WrapConfig,
)
from tests._models import LLAMA_TARGETS, tiny_llama
from tests._tiny import TARGETS, VOCAB, TinyModel, reference, write_adapter

TOL = {"rtol": 1e-5, "atol": 1e-5}  # fp32 model vs fp64 reference


def _ids(length: int, seed: int) -> torch.Tensor:
    return torch.randint(1, VOCAB, (length,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def adapters(tmp_path: Path) -> dict[str, Path]:
    return {f"ad{i}": write_adapter(tmp_path, f"ad{i}", seed=i, rank=1 + i % 8) for i in range(50)}


def _runtime(num_slots: int = 8, **config: object) -> tuple[Runtime, MultiLoraModel, TinyModel]:
    tiny = TinyModel()
    model = MultiLoraModel(tiny, WrapConfig(TARGETS, max_rank=8, num_slots=num_slots))
    return Runtime(model, RuntimeConfig(**config)), model, tiny  # type: ignore[arg-type]


async def test_thousand_concurrent_clients_over_fifty_adapters(adapters: dict[str, Path]) -> None:
    runtime, _, tiny = _runtime(num_slots=8, max_batch_size=32, max_wait=0.001)
    rng = random.Random(0)
    names = [*adapters, BASE_ADAPTER]
    plan = [(rng.choice(names), _ids(rng.randint(1, 12), seed=i)) for i in range(1000)]
    async with runtime:
        for name, path in adapters.items():
            runtime.register_adapter(name, path)
        results = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in plan))
        stats = runtime.statistics()
    for (name, ids), out in zip(plan, results, strict=True):
        expected = reference(tiny, None if name == BASE_ADAPTER else adapters[name], ids)
        assert out.shape == (len(ids), 16)
        torch.testing.assert_close(out.double(), expected, **TOL)
    assert stats.completed == 1000 and stats.failed == 0
    assert stats.mixed_batches > 0 and stats.max_adapters_in_batch > 2, stats
    assert stats.batches < 1000  # requests really were batched


async def test_results_stream_as_they_complete(adapters: dict[str, Path]) -> None:
    runtime, _, tiny = _runtime()
    async with runtime:
        runtime.register_adapter("ad1", adapters["ad1"])

        async def source() -> AsyncIterator[tuple[int, dict[str, torch.Tensor], str]]:
            for i in range(20):
                yield i, {"input_ids": _ids(3 + i % 4, seed=i)}, "ad1" if i % 2 else BASE_ADAPTER

        seen = {}
        async for item in runtime.stream(source()):
            assert item.error is None
            seen[item.key] = item.value
    assert sorted(seen) == list(range(20))
    for i, value in seen.items():
        expected = reference(tiny, adapters["ad1"] if i % 2 else None, _ids(3 + i % 4, seed=i))
        torch.testing.assert_close(value.double(), expected, **TOL)


async def _blocked(runtime: Runtime, tiny: TinyModel) -> asyncio.Task[object]:
    """Start a request whose forward pass holds the worker until ``tiny.gate`` is set."""
    import threading

    tiny.gate = threading.Event()
    tiny.entered.clear()
    task = asyncio.ensure_future(runtime.submit({"input_ids": _ids(4, 1)}))
    await asyncio.to_thread(tiny.entered.wait, 30)
    return task


async def test_cancelled_caller_is_dropped_without_harming_others() -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1)
    async with runtime:
        first = await _blocked(runtime, tiny)
        victim = asyncio.ensure_future(runtime.submit({"input_ids": _ids(5, 2)}))
        survivor = asyncio.ensure_future(runtime.submit({"input_ids": _ids(6, 3)}))
        await asyncio.sleep(0)  # let both enqueue
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        assert tiny.gate is not None
        tiny.gate.set()
        await first
        out = await survivor
        torch.testing.assert_close(out.double(), reference(tiny, None, _ids(6, 3)), **TOL)
        stats = runtime.statistics()
    assert stats.cancelled == 1 and stats.completed == 2 and stats.queued == 0


async def test_timeout_withdraws_the_request() -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1)
    async with runtime:
        first = await _blocked(runtime, tiny)
        with pytest.raises(RequestTimeoutError):
            await runtime.submit({"input_ids": _ids(5, 2)}, timeout=0.05)
        assert isinstance(RequestTimeoutError("x"), TimeoutError)
        assert tiny.gate is not None
        tiny.gate.set()
        await first
        out = await runtime.submit({"input_ids": _ids(5, 2)}, timeout=10)
        torch.testing.assert_close(out.double(), reference(tiny, None, _ids(5, 2)), **TOL)
        assert runtime.statistics().timed_out == 1


async def test_overload_is_reported_by_submit_nowait() -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1, max_queue=3)
    async with runtime:
        first = await _blocked(runtime, tiny)
        queued = [runtime.submit_nowait({"input_ids": _ids(3, i)}) for i in range(3)]
        with pytest.raises(OverloadedError, match="queue is full"):
            runtime.submit_nowait({"input_ids": _ids(3, 9)})
        # submit() waits for room instead of failing
        waiting = asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, 10)}))
        assert tiny.gate is not None
        tiny.gate.set()
        await asyncio.gather(first, *queued, waiting)
        assert runtime.statistics().rejected == 1


async def test_bad_inputs_are_refused_at_submit(adapters: dict[str, Path]) -> None:
    runtime, _, _ = _runtime()
    async with runtime:
        await runtime.submit({"input_ids": _ids(4, 0)})  # fixes the input schema
        with pytest.raises(InputValidationError, match="integer tensor"):
            await runtime.submit({"input_ids": torch.rand(4)})
        mismatch = "'attention_mask' has length 3, but input 'input_ids' has length 4"
        with pytest.raises(InputValidationError, match=mismatch):
            await runtime.submit({"input_ids": _ids(4, 0), "attention_mask": torch.ones(3, dtype=torch.long)})
        with pytest.raises(InputValidationError, match=r"per-token shape \[2\]"):
            await runtime.submit({"input_ids": torch.ones(4, 2, dtype=torch.long)})
        with pytest.raises(InputValidationError, match="empty"):
            await runtime.submit({"input_ids": torch.ones(0, dtype=torch.long)})
        with pytest.raises(InputValidationError, match="non-empty mapping"):
            await runtime.submit({})
        with pytest.raises(AdapterNotFoundError, match="nope"):
            await runtime.submit({"input_ids": _ids(4, 0)}, "nope")
        assert runtime.statistics().queued == 0


async def test_fault_in_a_batch_fails_only_the_request_that_causes_it() -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1, pad_to_multiple=1)  # padding is token 0 too
    async with runtime:
        first = await _blocked(runtime, tiny)
        tiny.poison_token = 0  # token 0 never occurs in _ids, only in this request
        poisoned = [
            asyncio.ensure_future(runtime.submit({"input_ids": torch.zeros(3, dtype=torch.long)})),
            asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, 5)})),
        ]
        assert tiny.gate is not None
        tiny.gate.set()
        await first
        bad, good = await asyncio.gather(*poisoned, return_exceptions=True)
        assert isinstance(bad, BatchFailedError)
        assert isinstance(bad.__cause__, RuntimeError) and "poisoned" in str(bad.__cause__)
        assert isinstance(good, torch.Tensor)  # its neighbour was re-run without it
        torch.testing.assert_close(good.double(), reference(tiny, None, _ids(3, 5)), **TOL)
        out = await runtime.submit({"input_ids": _ids(7, 6)})  # the runtime keeps serving
        torch.testing.assert_close(out.double(), reference(tiny, None, _ids(7, 6)), **TOL)


async def test_crashed_worker_fails_every_waiter(monkeypatch: pytest.MonkeyPatch) -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1)
    async with runtime:
        first = await _blocked(runtime, tiny)
        waiting = [asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, i)})) for i in range(5)]
        await asyncio.sleep(0)

        def broken(*_args: object) -> None:
            raise MemoryError("simulated worker failure")

        monkeypatch.setattr(runtime._worker, "_collate", broken)
        assert tiny.gate is not None
        tiny.gate.set()
        await first
        results = await asyncio.gather(*waiting, return_exceptions=True)
        assert all(isinstance(r, WorkerCrashedError) for r in results), results
        with pytest.raises(WorkerCrashedError):
            await runtime.submit({"input_ids": _ids(3, 0)})


@pytest.mark.parametrize("mode", ["drain", "cancel"])
async def test_shutdown_with_work_pending_resolves_everything(mode: str) -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1, shutdown=mode)
    await runtime.start()
    first = await _blocked(runtime, tiny)
    pending = [asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, i)})) for i in range(6)]
    await asyncio.sleep(0)
    closing = asyncio.ensure_future(runtime.aclose())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeClosedError):
        await runtime.submit({"input_ids": _ids(3, 0)})
    assert tiny.gate is not None
    tiny.gate.set()
    await closing
    await first
    results = await asyncio.gather(*pending, return_exceptions=True)
    if mode == "drain":
        assert all(isinstance(r, torch.Tensor) for r in results), results
    else:
        assert all(isinstance(r, RuntimeClosedError) for r in results), results


async def test_timeout_covers_waiting_for_room_in_a_full_queue() -> None:
    runtime, _, tiny = _runtime(max_inflight_batches=1, max_queue=1)
    async with runtime:
        first = await _blocked(runtime, tiny)
        queued = runtime.submit_nowait({"input_ids": _ids(3, 1)})
        with pytest.raises(RequestTimeoutError, match="no room"):
            await runtime.submit({"input_ids": _ids(3, 2)}, timeout=0.05)
        assert tiny.gate is not None
        tiny.gate.set()
        await asyncio.gather(first, queued)
        assert runtime.statistics().timed_out == 1 and runtime.statistics().queued == 0


async def test_state_and_explicit_adapter_load(adapters: dict[str, Path]) -> None:
    runtime, _, tiny = _runtime()
    assert runtime.state == "new"
    async with runtime:
        assert runtime.state == "running"
        runtime.register_adapter("ad3", adapters["ad3"])
        await runtime.load_adapter("ad3", pin=True)
        ref = await runtime.store.resolve("ad3")
        assert runtime.store.is_gpu_ready(ref)
        runtime.store.release_ref(ref)
        out = await runtime.submit({"input_ids": _ids(4, 4)}, "ad3")
        torch.testing.assert_close(out.double(), reference(tiny, adapters["ad3"], _ids(4, 4)), **TOL)
    assert runtime.state == "closed"


async def test_length_bucketing_cuts_padding_and_keeps_results(adapters: dict[str, Path]) -> None:
    rng = random.Random(3)
    plan = [(f"ad{i % 4}", _ids(rng.choice([2, 3, 30, 31]), seed=i)) for i in range(96)]
    padded = {}
    for bucketing in (False, True):
        runtime, _, tiny = _runtime(max_batch_size=16, pad_to_multiple=1, length_bucketing=bucketing, max_wait=0.05)
        async with runtime:
            for i in range(4):
                runtime.register_adapter(f"ad{i}", adapters[f"ad{i}"])
            await runtime.load_adapter("ad0")
            results = await asyncio.gather(*(runtime.submit({"input_ids": ids}, name) for name, ids in plan))
            stats = runtime.statistics()
        for (name, ids), out in zip(plan, results, strict=True):
            torch.testing.assert_close(out.double(), reference(tiny, adapters[name], ids), **TOL)
        padded[bucketing] = stats.padded_tokens / stats.real_tokens
    assert padded[True] < 0.8 * padded[False], padded


async def test_a_cold_adapter_is_not_passed_over_beyond_the_starvation_limit(adapters: dict[str, Path]) -> None:
    # One slot: a batch holds one adapter. "hot" keeps the queue full; loading "cold" is held back
    # (gated) so that hot batches keep passing it over. After `starvation_limit` of them the
    # scheduler must stop forming batches until cold is ready, then serve it first.
    limit = 3
    runtime, _, tiny = _runtime(num_slots=1, max_batch_size=4, starvation_limit=limit, max_inflight_batches=1)
    load_gate, starving = asyncio.Event(), asyncio.Event()
    ensure_gpu = runtime.store.ensure_gpu

    async def gated_ensure_gpu(ref, **kwargs):  # type: ignore[no-untyped-def]
        if ref.adapter_id == "cold":
            await load_gate.wait()
        return await ensure_gpu(ref, **kwargs)

    form_batch = runtime._dispatcher._form_batch

    def watched_form_batch():  # type: ignore[no-untyped-def]
        batch = form_batch()
        oldest = next(iter(runtime._dispatcher.pending.values()), None)
        if batch is None and oldest is not None and oldest.passed_over >= limit:
            starving.set()
        return batch

    runtime.store.ensure_gpu = gated_ensure_gpu  # type: ignore[method-assign]
    runtime._dispatcher._form_batch = watched_form_batch  # type: ignore[method-assign]
    async with runtime:
        runtime.register_adapter("hot", adapters["ad1"])
        runtime.register_adapter("cold", adapters["ad2"])
        await runtime.load_adapter("hot")
        first = await _blocked(runtime, tiny)  # hold the worker so the queue builds up in order
        cold = asyncio.ensure_future(runtime.submit({"input_ids": _ids(5, 99)}, "cold"))
        hot = [asyncio.ensure_future(runtime.submit({"input_ids": _ids(3, 10 + i)}, "hot")) for i in range(40)]
        await asyncio.sleep(0)
        assert tiny.gate is not None
        tiny.gate.set()
        await first
        before = runtime.statistics().batches
        await asyncio.wait_for(starving.wait(), timeout=30)
        passed_over = runtime.statistics().batches - before
        assert not cold.done()
        load_gate.set()
        out = await cold
        hot_left = sum(not h.done() for h in hot)
        await asyncio.gather(*hot)
    torch.testing.assert_close(out.double(), reference(tiny, adapters["ad2"], _ids(5, 99)), **TOL)
    assert passed_over == limit, passed_over  # exactly `limit` hot batches went ahead of it
    assert hot_left > 0  # and it was served while hot requests were still waiting


class _Recorder(torch.nn.Module):
    """A per-token model with a feature input; records every padded batch it is given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.proj = torch.nn.Linear(3, 4)
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def forward(self, input_ids: torch.Tensor, features: torch.Tensor, attention_mask: torch.Tensor) -> dict:
        self.batches.append((input_ids.clone(), features.clone(), attention_mask.clone()))
        hidden = self.proj(features) + input_ids.unsqueeze(-1)
        return {"last_hidden_state": hidden, "pooled": (hidden * attention_mask.unsqueeze(-1)).sum(1)}


@pytest.mark.parametrize("pooled", [False, True])
async def test_collation_pads_every_input_and_returns_each_rows_own_slice(pooled: bool) -> None:
    recorder = _Recorder()
    model = MultiLoraModel(recorder, WrapConfig(["proj"], max_rank=2, num_slots=2))
    config = RuntimeConfig(
        max_batch_size=8, max_wait=0.01, pad_to_multiple=4, pad_values={"input_ids": 7}, per_token_inputs=["features"]
    )
    select = (lambda out: out["pooled"]) if pooled else None
    rng = random.Random(1)
    requests = []
    for i in range(13):
        length = rng.randint(1, 9)
        ids = _ids(length, seed=100 + i)
        features = torch.randn(length, 3, generator=torch.Generator().manual_seed(i))
        requests.append({"input_ids": ids, "features": features})
    async with Runtime(model, config, select_output=select) as runtime:
        results = await asyncio.gather(*(runtime.submit(r) for r in requests))
    by_ids = {tuple(r["input_ids"].tolist()): r for r in requests}
    # Right after the first batch, the runtime ran one row alone at two lengths, unpadded: the probe
    # that finds which output axes follow the sequence (once for the runtime's life).
    probes = recorder.batches[1:3]
    assert [b[0].shape[1] for b in probes] in ([n, n + 1] for n in range(1, 9))
    assert all(b[0].shape[0] == 1 and b[2].all() for b in probes)
    batches = [recorder.batches[0], *recorder.batches[3:]]
    for ids, features, mask in batches:  # what the model saw: right padding, the right mask
        assert ids.shape[1] % 4 == 0 and features.shape == (*ids.shape, 3)
        for row in range(ids.shape[0]):
            length = int(mask[row].sum())
            assert mask[row, :length].all() and not mask[row, length:].any()
            request = by_ids[tuple(ids[row, :length].tolist())]
            assert torch.equal(features[row, :length], request["features"])
            assert (ids[row, length:] == 7).all() and (features[row, length:] == 0).all()
    assert len(batches) < len(requests)  # batched, so padding really happened
    with torch.no_grad():
        for request, out in zip(requests, results, strict=True):
            expected = recorder.proj(request["features"]) + request["input_ids"].unsqueeze(-1)
            expected = expected.sum(0) if pooled else expected
            torch.testing.assert_close(out, expected)
            assert out.untyped_storage().nbytes() == out.numel() * out.element_size()  # its own storage


async def test_token_ids_outside_the_vocabulary_are_refused_at_submit() -> None:
    model = MultiLoraModel(tiny_llama(), WrapConfig(LLAMA_TARGETS, max_rank=4, num_slots=2))
    vocab = model.model.get_input_embeddings().num_embeddings
    async with Runtime(model) as runtime:
        good = await runtime.submit({"input_ids": torch.tensor([1, vocab - 1])})  # fixes the schema
        assert good.shape[0] == 2
        for bad in (vocab, -1):
            with pytest.raises(InputValidationError, match=rf"token id {bad}, outside .*\[0, {vocab}\)"):
                await runtime.submit({"input_ids": torch.tensor([3, bad, 4])})
            with pytest.raises(InputValidationError, match=f"token id {bad}"):
                runtime.submit_nowait({"input_ids": torch.tensor([bad])})
        stats = runtime.statistics()
    assert stats.queued == 0 and stats.failed == 0 and stats.submitted == 1
