"""Runtime.generate: continuous batching of generations over mixed adapters, checked against PEFT alone.

Every greedy sequence must equal PEFT's own ``generate`` for that prompt alone, whatever joined or
left its batch meanwhile; streams end, free their KV memory and fail with typed errors.
"""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from polylora_async import (
    BASE_ADAPTER,
    AdapterNotFoundError,
    InputValidationError,
    MultiLoraModel,
    RequestTimeoutError,
    Runtime,
    RuntimeClosedError,
    RuntimeConfig,
    WrapConfig,
)
from tests._causal import FAMILIES, CausalSet, prompts, save_adapters


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def causal(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> CausalSet:
    # Three ranks; `c` covers one of the family's target layers only.
    family = request.param
    subset = {"c": FAMILIES[family][:1]}
    return save_adapters(family, {"a": 4, "b": 8, "c": 2}, tmp_path_factory.mktemp(family), targets=subset)


@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> CausalSet:
    return save_adapters("llama", {"a": 4, "b": 8}, tmp_path_factory.mktemp("llama-rt"))


def _runtime(cset: CausalSet, **config: Any) -> Runtime:
    model = MultiLoraModel(copy.deepcopy(cset.base), WrapConfig(FAMILIES[cset.family], max_rank=8, num_slots=4))
    runtime = Runtime(model, RuntimeConfig(**config))
    return runtime


async def _collect(stream: Any, delay: float = 0.0) -> list[int]:
    await asyncio.sleep(delay)
    return [token async for token in stream]


async def test_concurrent_generations_match_peft_alone(causal: CausalSet) -> None:
    plan = [("a", 5, 0.0), (BASE_ADAPTER, 9, 0.0), ("b", 3, 0.01), ("c", 12, 0.02), ("a", 7, 0.03), ("b", 1, 0.0)]
    async with asyncio.timeout(120), _runtime(causal) as runtime:
        for name, path in causal.paths.items():
            runtime.register_adapter(name, path)
        streams = []
        for (name, _, delay), prompt in zip(plan, prompts([n for _, n, _ in plan], seed=5), strict=True):
            stream = runtime.generate({"input_ids": prompt[None].int()}, name, max_new_tokens=4 + len(prompt) % 5)
            streams.append((name, prompt, 4 + len(prompt) % 5, _collect(stream, delay)))
        outs = await asyncio.gather(*(c for *_, c in streams))
        stats = runtime.statistics()
    assert stats.generated_tokens == sum(len(o) for o in outs)
    assert stats.generation_steps < stats.generated_tokens  # sequences shared steps
    for (name, prompt, new, _), out in zip(streams, outs, strict=True):
        assert out == causal.generate(name, prompt, max_new_tokens=new, do_sample=False), name


async def test_generations_and_one_shot_requests_share_the_runtime(llama: CausalSet) -> None:
    async with asyncio.timeout(120), _runtime(llama) as runtime:
        for name, path in llama.paths.items():
            runtime.register_adapter(name, path)
        (p1, p2, q) = prompts([6, 4, 8], seed=6)
        gens = [_collect(runtime.generate({"input_ids": p}, n, max_new_tokens=8)) for p, n in ((p1, "a"), (p2, "b"))]
        one_shot = runtime.submit({"input_ids": q}, "b")
        out1, out2, logits = await asyncio.gather(*gens, one_shot)
    assert out1 == llama.generate("a", p1, max_new_tokens=8, do_sample=False)
    assert out2 == llama.generate("b", p2, max_new_tokens=8, do_sample=False)
    llama.peft.set_adapter("b")
    with torch.no_grad():
        torch.testing.assert_close(logits, llama.peft(input_ids=q[None]).logits[0], rtol=1e-4, atol=1e-5)


async def test_leaving_early_frees_the_sequence_and_spares_the_others(llama: CausalSet) -> None:
    async with asyncio.timeout(120), _runtime(llama) as runtime:
        for name, path in llama.paths.items():
            runtime.register_adapter(name, path)
        long_prompt, kept_prompt, closed_prompt, cancelled_prompt = prompts([20, 5, 6, 7], seed=7)
        kept = asyncio.ensure_future(_collect(runtime.generate({"input_ids": kept_prompt}, "a", max_new_tokens=24)))
        broken: list[int] = []
        async for token in runtime.generate({"input_ids": long_prompt}, "b", max_new_tokens=24):
            broken.append(token)
            if len(broken) == 2:
                break  # the stream is dropped here
        closing = runtime.generate({"input_ids": closed_prompt}, BASE_ADAPTER, max_new_tokens=24)
        await anext(closing)
        await closing.aclose()
        with pytest.raises(StopAsyncIteration):
            await anext(closing)
        cancelled = asyncio.ensure_future(
            _collect(runtime.generate({"input_ids": cancelled_prompt}, "b", max_new_tokens=24))
        )
        await asyncio.sleep(0.05)
        cancelled.cancel()
        out = await kept
        assert runtime.statistics().generations_running == 0
        value = runtime.metrics.registry.get_sample_value("polylora_kv_cache_bytes")
        assert value == 0
    assert broken == llama.generate("b", long_prompt, max_new_tokens=2, do_sample=False)
    assert out == llama.generate("a", kept_prompt, max_new_tokens=24, do_sample=False)


async def test_eos_and_a_generation_config(llama: CausalSet) -> None:
    from transformers import GenerationConfig

    (prompt,) = prompts([6], seed=8)
    free = llama.generate("a", prompt, max_new_tokens=10, do_sample=False)
    eos = free[4]
    config = GenerationConfig(max_new_tokens=10, do_sample=False, eos_token_id=eos)
    async with asyncio.timeout(60), _runtime(llama) as runtime:
        runtime.register_adapter("a", llama.paths["a"])
        out = await _collect(runtime.generate({"input_ids": prompt}, "a", generation_config=config))
        shorter = await _collect(
            runtime.generate({"input_ids": prompt}, "a", generation_config=config, max_new_tokens=3)
        )
    assert out == free[: free.index(eos) + 1]
    assert shorter == free[:3]


async def test_seeded_sampling_through_the_runtime_ignores_neighbours(llama: CausalSet) -> None:
    (prompt, *others) = prompts([7, 3, 9, 5], seed=9)
    sampling = {"max_new_tokens": 10, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 77}
    async with asyncio.timeout(60), _runtime(llama) as runtime:
        for name, path in llama.paths.items():
            runtime.register_adapter(name, path)
        alone = await _collect(runtime.generate({"input_ids": prompt}, "b", **sampling))
        crowd = [_collect(runtime.generate({"input_ids": p}, "a", max_new_tokens=12, do_sample=True)) for p in others]
        together, *_ = await asyncio.gather(_collect(runtime.generate({"input_ids": prompt}, "b", **sampling)), *crowd)
    assert together == alone


async def test_kv_bound_admits_what_fits_and_refuses_what_never_can(llama: CausalSet) -> None:
    p1, p2 = prompts([6, 6], seed=10)
    async with asyncio.timeout(60), _runtime(llama) as probe:
        probe.register_adapter("a", llama.paths["a"])
        await _collect(probe.generate({"input_ids": p1}, "a", max_new_tokens=1))
        per_token = probe._generation.batch.bytes_per_token
    # Room for one sequence of 6 + 10 tokens, not two.
    async with asyncio.timeout(60), _runtime(llama, kv_cache_bytes=16 * per_token + per_token // 2) as runtime:
        runtime.register_adapter("a", llama.paths["a"])
        runtime.register_adapter("b", llama.paths["b"])
        await _collect(runtime.generate({"input_ids": p1}, "a", max_new_tokens=1))  # learns the bytes per token
        seen: list[int] = []

        async def watch() -> None:
            while True:
                seen.append(runtime.statistics().generations_running)
                await asyncio.sleep(0)

        watcher = asyncio.ensure_future(watch())
        out = await asyncio.gather(
            _collect(runtime.generate({"input_ids": p1}, "a", max_new_tokens=10)),
            _collect(runtime.generate({"input_ids": p2}, "b", max_new_tokens=10)),
        )
        watcher.cancel()
        with pytest.raises(InputValidationError, match="needs more KV memory than `kv_cache_bytes`"):
            await _collect(runtime.generate({"input_ids": p1}, "a", max_new_tokens=40))
    assert max(seen) == 1
    assert out == [llama.generate(n, p, max_new_tokens=10, do_sample=False) for n, p in (("a", p1), ("b", p2))]


async def test_bad_generations_fail_with_typed_errors(llama: CausalSet) -> None:
    from transformers import BertConfig, BertModel

    (prompt,) = prompts([5], seed=11)
    async with asyncio.timeout(60), _runtime(llama) as runtime:
        with pytest.raises(InputValidationError, match="`max_new_tokens` is required"):
            runtime.generate({"input_ids": prompt})
        with pytest.raises(InputValidationError, match="`top_p` must be"):
            runtime.generate({"input_ids": prompt}, max_new_tokens=3, top_p=0)
        with pytest.raises(InputValidationError, match="'attention_mask' must be all ones"):
            runtime.generate({"input_ids": prompt, "attention_mask": torch.tensor([1, 1, 1, 1, 0])}, max_new_tokens=3)
        with pytest.raises(InputValidationError, match="would pass the model's 128 positions"):
            runtime.generate({"input_ids": prompt}, max_new_tokens=124)
        with pytest.raises(AdapterNotFoundError, match="nope"):
            await _collect(runtime.generate({"input_ids": prompt}, "nope", max_new_tokens=3))
        with pytest.raises(RequestTimeoutError):
            await _collect(runtime.generate({"input_ids": prompt}, max_new_tokens=100, timeout=1e-4))
    bert = BertModel(BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16))
    async with asyncio.timeout(60), Runtime(MultiLoraModel(bert, WrapConfig(["query"], max_rank=4))) as encoder:
        with pytest.raises(InputValidationError, match="takes no KV cache or has no language-model head"):
            encoder.generate({"input_ids": prompt}, max_new_tokens=3)


@pytest.mark.parametrize("mode", ["drain", "cancel"])
async def test_shutdown_drains_or_cancels_generations(llama: CausalSet, mode: str) -> None:
    (prompt,) = prompts([5], seed=12)
    runtime = _runtime(llama)
    async with asyncio.timeout(60):
        await runtime.start()
        runtime.register_adapter("a", llama.paths["a"])
        stream = runtime.generate({"input_ids": prompt}, "a", max_new_tokens=30)
        first = await anext(stream)
        closing = asyncio.ensure_future(runtime.aclose(shutdown=mode))  # type: ignore[arg-type]
        if mode == "drain":
            rest = await _collect(stream)
            assert [first, *rest] == llama.generate("a", prompt, max_new_tokens=30, do_sample=False)
        else:
            with pytest.raises(RuntimeClosedError):
                await _collect(stream)
        await closing
        with pytest.raises(RuntimeClosedError):
            runtime.generate({"input_ids": prompt}, max_new_tokens=3)


async def test_generation_metrics(llama: CausalSet) -> None:
    (prompt,) = prompts([4], seed=13)
    async with asyncio.timeout(60), _runtime(llama) as runtime:
        out = await _collect(runtime.generate({"input_ids": prompt}, max_new_tokens=5))
        registry = runtime.metrics.registry
        assert registry.get_sample_value("polylora_generated_tokens_total") == len(out) == 5
        assert registry.get_sample_value("polylora_time_to_first_token_seconds_count") == 1
        assert registry.get_sample_value("polylora_inter_token_seconds_count") == 4
        assert registry.get_sample_value("polylora_sequences", {"state": "running"}) == 0
        assert registry.get_sample_value("polylora_preemptions_total") == 0
