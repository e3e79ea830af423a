"""The catalog: ids -> versioned refs, reference counts, replacement, and the async resolver."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from torch import nn

from polylora_async import (
    BASE_ADAPTER,
    AdapterLoadError,
    AdapterNotFoundError,
    AdapterWeights,
    PolyLoraError,
    RawAdapter,
)
from polylora_async._catalog import BASE_REF, AdapterCatalog, AdapterRef
from polylora_async._errors import StoreClosedError


def _raw(tag: float = 1.0) -> RawAdapter:
    return RawAdapter(config={"r": 1}, tensors={"x.lora_A.weight": torch.full((1, 2), tag)}, origin="test")


class _DeadLog:
    def __init__(self) -> None:
        self.keys: list[tuple[str, int]] = []

    def __call__(self, ref: AdapterRef) -> None:
        self.keys.append(ref.key)


def test_register_list_unregister_and_versions(tmp_path: Path) -> None:
    dead = _DeadLog()
    catalog = AdapterCatalog(on_version_dead=dead)
    a1 = catalog.register("a", tmp_path / "a")
    raw = _raw()
    b1 = catalog.register("b", raw)
    assert catalog.adapter_ids() == ["a", "b"] and len(catalog) == 2 and "a" in catalog
    assert (a1.key, a1.kind, a1.origin) == (("a", 1), "directory", "registered")
    assert isinstance(a1.source, Path) and a1.source == (tmp_path / "a").absolute() and a1.source.is_absolute()
    assert b1.kind == "memory" and b1.source is raw
    a2 = catalog.register("a", tmp_path / "a2")
    assert a2.key == ("a", 2) and catalog.current("a") is a2
    assert dead.keys == [("a", 1)]  # nobody held version 1
    catalog.unregister("a")
    assert catalog.adapter_ids() == ["b"] and catalog.current("a") is None
    assert dead.keys == [("a", 1), ("a", 2)]
    a3 = catalog.register("a", tmp_path / "a")
    assert a3.version == 3  # versions are never reused, so old placements can never be mistaken for new
    with pytest.raises(AdapterNotFoundError, match="'zzz' is not registered") as info:
        catalog.unregister("zzz")
    assert isinstance(info.value, KeyError)
    assert catalog.current(BASE_ADAPTER) is BASE_REF


def test_refs_compare_by_version() -> None:
    catalog = AdapterCatalog()
    ref = catalog.register("a", _raw())
    twin = AdapterRef("a", 1, "memory", "registered", ref._holder)
    assert ref == twin and hash(ref) == hash(twin) and {ref: 1}[twin] == 1
    assert ref != catalog.register("a", _raw())
    assert BASE_REF.is_base and BASE_REF.key == (BASE_ADAPTER, 0) and BASE_REF.source is None


async def test_old_version_lives_while_a_ref_holds_it() -> None:
    dead = _DeadLog()
    catalog = AdapterCatalog(on_version_dead=dead)
    first = _raw(1.0)
    catalog.register("a", first)
    held = await catalog.resolve("a")
    also_held = await catalog.resolve("a")
    assert held is also_held and catalog.refcount(held) == 2
    catalog.register("a", _raw(2.0))  # replace while requests hold version 1
    new = await catalog.resolve("a")
    assert new.version == 2 and held.version == 1
    assert catalog.is_alive(held.key) and held.source is first  # the old weights stay reachable
    assert sorted(r.key for r in catalog.live_versions()) == [("a", 1), ("a", 2)]
    catalog.release(held)
    assert dead.keys == []
    catalog.release(also_held)
    assert dead.keys == [("a", 1)] and not catalog.is_alive(held.key)
    with pytest.raises(AdapterNotFoundError, match="version 1 is no longer"):
        catalog.acquire(held)
    with pytest.raises(ValueError, match="released more often"):
        catalog.release(held)
    # Unregistering keeps a held version too.
    catalog.unregister("a")
    assert catalog.is_alive(new.key) and dead.keys == [("a", 1)]
    catalog.release(new)
    assert dead.keys == [("a", 1), ("a", 2)]
    catalog.release(BASE_REF)  # the base ref is never counted


async def test_unknown_id_without_resolver() -> None:
    catalog = AdapterCatalog()
    with pytest.raises(AdapterNotFoundError) as info:
        await catalog.resolve("nope")
    assert str(info.value) == "adapter 'nope' is not registered"
    assert await catalog.resolve(BASE_ADAPTER) is BASE_REF


@pytest.mark.parametrize("bad", ["", BASE_ADAPTER, 3, None])
def test_bad_ids_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match=r"must be a non-empty string \(adapter ids are\)|reserved"):
        AdapterCatalog().register(bad, _raw())  # type: ignore[arg-type]


def test_bad_sources_are_refused(tmp_path: Path) -> None:
    catalog = AdapterCatalog()
    with pytest.raises(TypeError, match="unsupported source int"):
        catalog.register("a", 3)
    with pytest.raises(TypeError, match="`peft_adapter_name` applies only to a PeftModel"):
        catalog.register("a", tmp_path, peft_adapter_name="x")
    with pytest.raises(ValueError, match="source path is empty"):
        catalog.register("a", "")
    assert len(catalog) == 0


def test_in_memory_sources_are_normalised() -> None:
    catalog = AdapterCatalog()
    state = {"base_model.model.0.lora_A.weight": torch.ones(1, 2)}
    ref = catalog.register("sd", (state, {"r": 1, "lora_alpha": 1}))
    assert isinstance(ref.source, RawAdapter) and ref.kind == "memory"
    assert ref.source.config == {"r": 1, "lora_alpha": 1} and ref.source.tensors.keys() == state.keys()
    weights = AdapterWeights("w", {}, "test")
    assert catalog.register("w", weights).source is weights
    catalog.drop_source(ref)
    assert ref.source is None  # the store took over the only copy


def test_peft_model_is_snapshotted_at_registration() -> None:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    peft_model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))
    ref = AdapterCatalog().register("p", peft_model)
    assert isinstance(ref.source, RawAdapter)
    key = "base_model.model.0.lora_A.weight"
    before = ref.source.tensors[key].clone()
    with torch.no_grad():  # "training" the PeftModel afterwards does not change this version
        for name, param in peft_model.named_parameters():
            if "lora_A" in name:
                param.add_(1.0)
    assert torch.equal(ref.source.tensors[key], before)


async def test_concurrent_resolutions_share_one_resolver_call(tmp_path: Path) -> None:
    calls: list[str] = []
    gate = asyncio.Event()
    both_called = asyncio.Event()

    async def resolver(adapter_id: str) -> object:
        calls.append(adapter_id)
        if len(calls) == 2:
            both_called.set()
        await gate.wait()
        return tmp_path / adapter_id

    catalog = AdapterCatalog(resolver)
    tasks = [asyncio.create_task(catalog.resolve("r")) for _ in range(5)]
    other = asyncio.create_task(catalog.resolve("s"))
    await both_called.wait()
    gate.set()
    refs = await asyncio.gather(*tasks)
    assert calls == ["r", "s"]
    assert all(r is refs[0] for r in refs) and refs[0].origin == "resolved" and refs[0].kind == "directory"
    assert catalog.refcount(refs[0]) == 5 and (await other).key == ("s", 1)
    assert await catalog.resolve("r") is refs[0] and calls == ["r", "s"]  # registered from now on
    assert catalog.adapter_ids() == ["r", "s"]


async def test_resolver_none_and_failures_are_not_cached(tmp_path: Path) -> None:
    answers: list[object] = [None, RuntimeError("remote down"), tmp_path / "ok"]

    async def resolver(adapter_id: str) -> object:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    catalog = AdapterCatalog(resolver)
    with pytest.raises(AdapterNotFoundError, match="resolver does not know it"):
        await catalog.resolve("x")
    with pytest.raises(AdapterLoadError, match="the resolver failed: RuntimeError") as info:
        await catalog.resolve("x")
    assert isinstance(info.value.__cause__, RuntimeError)
    ref = await catalog.resolve("x")  # the failures did not poison the id
    assert ref.key == ("x", 1) and answers == []


async def test_resolver_errors_of_the_library_pass_through() -> None:
    async def resolver(adapter_id: str) -> object:
        raise AdapterNotFoundError(f"custom: {adapter_id}")

    with pytest.raises(AdapterNotFoundError, match="custom: x"):
        await AdapterCatalog(resolver).resolve("x")


async def test_explicit_registration_during_resolution_wins(tmp_path: Path) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def resolver(adapter_id: str) -> object:
        entered.set()
        await gate.wait()
        return tmp_path / "from-resolver"

    catalog = AdapterCatalog(resolver)
    task = asyncio.create_task(catalog.resolve("a"))
    await entered.wait()
    explicit = catalog.register("a", tmp_path / "explicit")
    gate.set()
    assert await task is explicit and catalog.current("a") is explicit


async def test_resolver_may_return_a_peft_model() -> None:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(nn.Sequential(nn.Linear(4, 4)), LoraConfig(r=2, target_modules=["0"]))

    async def resolver(adapter_id: str) -> object:
        return peft_model

    ref = await AdapterCatalog(resolver).resolve("p")
    assert isinstance(ref.source, RawAdapter) and ref.kind == "memory" and ref.origin == "resolved"


async def test_close_fails_pending_resolutions_and_refuses_work(tmp_path: Path) -> None:
    entered = asyncio.Event()

    async def resolver(adapter_id: str) -> object:
        entered.set()
        await asyncio.Event().wait()  # never answers
        return None

    catalog = AdapterCatalog(resolver)
    waiter = asyncio.create_task(catalog.resolve("slow"))
    await entered.wait()
    tasks = catalog.close()
    await asyncio.gather(*tasks, return_exceptions=True)
    with pytest.raises(StoreClosedError, match="closed"):
        await waiter
    assert isinstance(StoreClosedError("x"), PolyLoraError)
    with pytest.raises(StoreClosedError):
        catalog.register("a", tmp_path)
    with pytest.raises(StoreClosedError):
        await catalog.resolve("a")


async def test_cancelled_waiter_does_not_cancel_the_shared_resolution(tmp_path: Path) -> None:
    gate = asyncio.Event()
    entered = asyncio.Event()

    async def resolver(adapter_id: str) -> object:
        entered.set()
        await gate.wait()
        return tmp_path

    catalog = AdapterCatalog(resolver)
    first = asyncio.create_task(catalog.resolve("a"))
    second = asyncio.create_task(catalog.resolve("a"))
    await entered.wait()
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    gate.set()
    ref = await second
    assert ref.key == ("a", 1) and catalog.refcount(ref) == 1
