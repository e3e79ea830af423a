"""The three tiers on their own: CPU byte-bounded LRU, GPU slot bookkeeping, the disk directory cache."""

from __future__ import annotations

import enum
import functools
import json
import os
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest
import torch

from polylora_async import AdapterLoadError
from polylora_async.adapters import AdapterWeights, LayerLora, LayerShape, RawAdapter, validate_adapter
from polylora_async.store._cpu_tier import CpuTier, host_bytes, stage_weights
from polylora_async.store._disk_tier import (
    ENTRIES_DIR,
    MANIFEST_FILE,
    TMP_DIR,
    DiskCache,
    _jsonable,
    entry_name,
    weights_to_raw,
)
from polylora_async.store._gpu_tier import GpuSlots, SlotState, SlotWriter
from polylora_async.store._policy import rank_slots

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _weights(name: str, nbytes: int) -> AdapterWeights:
    lora = LayerLora(a=torch.zeros(1, 1), b=torch.zeros(1, 1), scale=1.0)
    return AdapterWeights(adapter_id=name, layers={"l": lora}, origin="test", nbytes=nbytes)


def _raw(seed: int, rank: int = 2) -> RawAdapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {
        "base_model.model.0.lora_A.weight": torch.randn(rank, 8, generator=g),
        "base_model.model.0.lora_B.weight": torch.randn(8, rank, generator=g),
    }
    return RawAdapter(config={"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}, tensors=tensors, origin="t")


def _same_raw(a: RawAdapter, b: RawAdapter) -> bool:
    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


class _FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------
# CPU tier
# ---------------------------------------------------------------------------------------------


def _check_bound(tier: CpuTier) -> None:
    held = [tier.peek(k) for k in tier.keys()]
    assert tier.nbytes == sum(host_bytes(w) for w in held if w is not None) and None not in held
    assert tier.nbytes <= max(tier.capacity_bytes, tier.sticky_bytes)


def test_cpu_lru_in_bytes_scripted() -> None:
    tier = CpuTier(100)
    script = [  # (op, key, nbytes) -> expected evictions, expected keys LRU->MRU
        ("put", "a", 40, (), ["a"]),
        ("put", "b", 40, (), ["a", "b"]),
        ("get", "a", 0, (), ["b", "a"]),
        ("put", "c", 30, ("b",), ["a", "c"]),
        ("put", "d", 60, ("a",), ["c", "d"]),
        ("put", "e", 100, ("c", "d"), ["e"]),
        ("put", "f", 1, ("e",), ["f"]),
        ("put", "f", 50, (), ["f"]),  # replacing an entry re-counts its bytes
        ("put", "g", 50, (), ["f", "g"]),
    ]
    for op, key, size, evicted, keys in script:
        if op == "put":
            result = tier.put(key, _weights(key, size))
            assert result.stored and result.evicted == evicted, (op, key)
        else:
            assert tier.get(key) is not None
        assert tier.keys() == keys, (op, key)
        _check_bound(tier)
    assert tier.nbytes == 100
    assert tier.get("zzz") is None


def test_cpu_oversize_is_passed_through_not_cached() -> None:
    tier = CpuTier(100)
    tier.put("a", _weights("a", 60))
    result = tier.put("big", _weights("big", 101))
    assert not result.stored and result.evicted == ()
    assert tier.keys() == ["a"]  # nothing was evicted for an entry that could not fit anyway
    assert not CpuTier(0).put("x", _weights("x", 1)).stored


def test_cpu_prefers_evicting_entries_without_demand() -> None:
    demand: dict[Hashable, int] = {"a": 2}
    tier = CpuTier(100, demand_of=lambda k: demand.get(k, 0))
    tier.put("a", _weights("a", 40))
    tier.put("b", _weights("b", 40))
    assert tier.put("c", _weights("c", 40)).evicted == ("b",)  # not "a", the LRU one: it has queued requests
    demand.clear()
    assert tier.put("d", _weights("d", 40)).evicted == ("a",)
    demand.update(c=1, d=1)
    assert tier.put("e", _weights("e", 40)).evicted == ("c",)  # only demanded ones left: LRU among them


def test_cpu_sticky_entries_are_never_evicted_and_bound_holds() -> None:
    tier = CpuTier(100)
    tier.put("m1", _weights("m1", 70), sticky=True)
    _check_bound(tier)
    assert tier.put("a", _weights("a", 20)).stored
    assert tier.put("b", _weights("b", 20)).evicted == ("a",)
    sticky_put = tier.put("m2", _weights("m2", 70), sticky=True)  # over the bound: sticky bytes only
    assert sticky_put.stored and sticky_put.evicted == ("b",)
    _check_bound(tier)
    assert tier.keys() == ["m1", "m2"] and tier.nbytes == 140
    assert not tier.put("c", _weights("c", 10)).stored
    # Made evictable while the sticky bytes alone exceed the bound: it goes at once.
    assert tier.set_sticky("m2", False) == ("m2",)
    _check_bound(tier)
    assert tier.keys() == ["m1"] and tier.sticky_bytes == 70
    assert tier.set_sticky("m1", False) == ()
    assert tier.sticky_bytes == 0
    assert tier.remove("m1") and not tier.remove("m1")
    assert tier.nbytes == 0


def test_stage_weights_without_pinning_is_free() -> None:
    w = _weights("a", 8)
    assert stage_weights(w, pin=False) is w


# ---------------------------------------------------------------------------------------------
# GPU slot bookkeeping
# ---------------------------------------------------------------------------------------------


def _fill(slots: GpuSlots, keys: list[str], clock: _FakeClock) -> None:
    for key, slot in zip(keys, slots.slots, strict=False):
        slots.reserve(slot, key)
        slots.complete(slot, None, 10)
        clock.now += 1


def _choose(slots: GpuSlots, clock: _FakeClock, min_residency_s: float, *, urgent: bool = True,
            demand: dict[str, int] | None = None, pinned: set[str] | frozenset[str] = frozenset(),
            dead: set[str] | frozenset[str] = frozenset()) -> object:
    demand = demand or {}
    ranked = rank_slots(
        slots.slots,
        now=clock(),
        min_residency_s=min_residency_s,
        urgent=urgent,
        demand_of=lambda k: demand.get(k, 0),  # type: ignore[call-overload]
        held=lambda k: k in pinned,
        alive=lambda k: k not in dead,
    )
    return ranked[0] if ranked else None


def _victim(slots: GpuSlots, clock: _FakeClock, min_residency_s: float, **options: Any) -> object:
    slot = _choose(slots, clock, min_residency_s, **options)
    return None if slot is None else slot.key  # type: ignore[attr-defined]


def test_gpu_victim_order() -> None:
    clock = _FakeClock()
    slots = GpuSlots(4, clock=clock)
    victim = functools.partial(_victim, slots, clock, 0.5)
    assert victim() is None  # every slot empty: victim is an empty slot (no key)
    assert _choose(slots, clock, 0.5, urgent=False) is slots.slots[0]
    _fill(slots, ["a", "b", "c", "d"], clock)
    clock.now += 10  # everyone past the minimum residency
    assert victim() == "a"  # least recently used
    slots.lease(slots.get("a"))  # type: ignore[arg-type]
    assert victim() == "b"  # leased slots are never victims
    assert victim(pinned={"b"}) == "c"
    assert victim(demand={"b": 1, "c": 3}) == "d"  # no queued requests first
    assert victim(demand={"b": 1, "c": 1, "d": 1}) == "b"  # urgent: LRU among demanded
    assert victim(urgent=False, demand={"b": 1, "c": 1, "d": 1}) is None  # a prefetch may not
    assert victim(dead={"d"}) == "d"  # a dead version goes first
    slots.unlease(slots.get("a"))  # type: ignore[arg-type]
    assert victim() == "b"  # "a" counts as used when it was leased
    slots.get("b").last_used = clock.now  # type: ignore[union-attr]
    assert victim() == "c"


def test_gpu_minimum_residency() -> None:
    clock = _FakeClock()
    slots = GpuSlots(2, clock=clock)
    victim = functools.partial(_victim, slots, clock, 0.5)
    _fill(slots, ["old", "new"], clock)
    clock.now = slots.get("new").loaded_at + 0.1  # type: ignore[union-attr]
    slots.get("old").loaded_at = clock.now - 5  # type: ignore[union-attr]
    slots.get("old").last_used = clock.now  # type: ignore[union-attr]
    # "old" was used more recently, but "new" is within its minimum residency.
    assert victim() == "old"
    assert victim(urgent=False) == "old"
    slots.get("old").loaded_at = clock.now  # type: ignore[union-attr]
    assert victim(urgent=False) is None  # a prefetch never takes a fresh slot
    assert victim() == "new"  # an urgent need does, as a last resort (LRU among fresh ones)


def test_gpu_reserve_complete_free_and_events() -> None:
    class Event:
        def __init__(self) -> None:
            self.finished = False

        def query(self) -> bool:
            return self.finished

    clock = _FakeClock()
    slots = GpuSlots(1, clock)
    victim = functools.partial(_victim, slots, clock, 0.0)
    slot = slots.slots[0]
    assert slots.reserve(slot, "a") is None
    assert slot.state is SlotState.WRITING and not slots.is_ready("a")
    assert victim() is None  # a slot being written is nobody's victim
    slots.complete(slot, "copy-a", 7)
    assert slots.is_ready("a") and slots.resident() == {"a": 1} and slots.resident_bytes == 7
    e1, e2, e3 = Event(), Event(), Event()
    for e in (e1, e2):
        slots.lease(slot)
        slots.unlease(slot, e)
    assert slot.read_events == [e1, e2]
    e1.finished = True
    slots.lease(slot)
    slots.unlease(slot, e3)
    assert slot.read_events == [e2, e3]  # finished batches are pruned
    assert slots.reserve(slot, "b") == "a"
    assert slot.read_events == [e2, e3]  # the next write must still wait for them
    assert slots.get("a") is None and slots.get("b") is slot
    slots.free(slot)
    assert slot.state is SlotState.EMPTY and slot.read_events == [e2, e3]
    slots.reserve(slot, "c")
    slots.complete(slot, None, 1)
    assert slot.read_events == []


def test_slot_writer_on_cpu_has_no_stream() -> None:
    class Model:
        device = torch.device("cpu")

        def __init__(self) -> None:
            self.written: list[int] = []

        def write_slot(self, slot: int, weights: AdapterWeights) -> None:
            self.written.append(slot)

    model = Model()
    writer = SlotWriter(model)
    assert writer.stream is None
    assert writer.write(3, _weights("a", 1), ["ignored"]) is None
    assert model.written == [3]
    writer.wait(["ignored"])  # no-op


# ---------------------------------------------------------------------------------------------
# Disk cache
# ---------------------------------------------------------------------------------------------

HOSTILE_IDS = [
    "../../etc",
    "../../etc/passwd",
    "/absolute/path",
    "..",
    ".",
    "a/../../b",
    "C:\\windows\\system32",
    "Adapter",
    "adapter",
    "ADAPTER",
    "a.b",
    "a_b",
    "a-b",
    "a b",
    "a/b",
    "a\\b",
    "a:b",
    "x" * 5000,
    "x" * 4999 + "y",
    "名前/の/アダプター",
    "ünïcødé",
    "unicode",
    "e\u0301",
    "\u00e9",
    "\x00nul\x00",
    "nul",
    "con",
    "emoji-\U0001f600",
    "-",
    "~",
]


def test_entry_names_are_safe_and_distinct() -> None:
    names = [entry_name(i, "tok") for i in HOSTILE_IDS]
    assert len({n.lower() for n in names}) == len(HOSTILE_IDS)  # distinct even case-insensitively
    for name in names:
        assert len(name) <= 81
        assert name not in {".", ".."} and "/" not in name and "\\" not in name
        assert all(c.isascii() and (c.isalnum() or c == "-") for c in name)
    assert entry_name("a", "t1") != entry_name("a", "t2")
    assert entry_name("a", "bc") != entry_name("ab", "c")  # the id is length-prefixed in the digest
    assert entry_name("../../etc", "t").startswith("etc-")


def test_hostile_ids_stay_inside_the_cache_and_never_collide(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    cache = DiskCache(root)
    for i, adapter_id in enumerate(HOSTILE_IDS):
        assert cache.write(adapter_id, "tok", _raw(i)).written
    entries = (root / ENTRIES_DIR).resolve()
    for i, adapter_id in enumerate(HOSTILE_IDS):
        path = cache.path_of(adapter_id, "tok").resolve()
        assert path.parent == entries
        got = cache.read(adapter_id, "tok")
        assert got is not None and _same_raw(got, _raw(i)), adapter_id
    assert len(list(entries.iterdir())) == len(HOSTILE_IDS)
    everything = {p.resolve() for p in tmp_path.rglob("*")}
    assert all(p == root.resolve() or root.resolve() in p.parents for p in everything)
    cache.close()
    reopened = DiskCache(root)
    assert reopened.stats().entries == len(HOSTILE_IDS) and reopened.stats().dropped_at_open == 0
    assert _same_raw(reopened.read("x" * 5000, "tok"), _raw(HOSTILE_IDS.index("x" * 5000)))  # type: ignore[arg-type]


def test_disk_entries_are_peft_format(tmp_path: Path) -> None:
    from polylora_async import read_peft_directory

    cache = DiskCache(tmp_path)
    raw = RawAdapter(config={"peft_type": "LORA", "r": 2, "target_modules": {"q", "v"}, "task_type": _Task.X},
                     tensors=_raw(1).tensors, origin="t")
    assert cache.write("a", "t", raw).written
    path = cache.path_of("a", "t")
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((path / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q", "v"] and config["task_type"] == "x"
    assert _same_raw(read_peft_directory("a", path), raw)
    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    assert [e["adapter_id"] for e in manifest["entries"]] == ["a"]


class _Task(enum.Enum):
    X = "x"


def test_jsonable() -> None:
    assert _jsonable({"a": {3, 1}, "b": (_Task.X, Path("/p")), 1: None}) == {"a": [1, 3], "b": ["x", "/p"], "1": None}


def test_weights_round_trip_through_peft_format() -> None:
    g = torch.Generator().manual_seed(0)
    layers = {
        "0": LayerLora(a=torch.randn(3, 8, generator=g), b=torch.randn(8, 3, generator=g), scale=0.37),
        "blocks.1.attn": LayerLora(a=torch.randn(1, 8, generator=g), b=torch.randn(4, 1, generator=g), scale=2.5),
    }
    weights = AdapterWeights("w", layers, "mem", nbytes=0)
    raw = weights_to_raw(weights)
    shapes = {"0": LayerShape(8, 8), "blocks.1.attn": LayerShape(8, 4), "blocks.11.attn": LayerShape(8, 4)}
    back = validate_adapter("w", raw, shapes, max_rank=4, dtype=torch.float32)
    assert back.layers.keys() == layers.keys()
    for name, lora in layers.items():
        assert torch.equal(back.layers[name].a, lora.a) and torch.equal(back.layers[name].b, lora.b)
        assert back.layers[name].scale == pytest.approx(lora.scale, rel=1e-12)


def test_disk_bounds_in_bytes_and_entries(tmp_path: Path) -> None:
    size = len(json.dumps({})) + 1  # any positive number; we read real sizes back from the cache
    cache = DiskCache(tmp_path / "probe")
    cache.write("probe", "t", _raw(0))
    size = cache.stats().nbytes
    cache = DiskCache(tmp_path / "c", max_bytes=3 * size, max_entries=10)
    for i in range(5):
        result = cache.write(f"a{i}", "t", _raw(i))
        assert result.written
        assert cache.stats().nbytes <= 3 * size
    assert sorted(e.adapter_id for e in cache.entries()) == ["a2", "a3", "a4"]
    assert cache.stats().evictions == 2
    cache.read("a2", "t")  # most recently used now
    assert cache.write("a5", "t", _raw(5)).evicted == (("a3", "t"),)
    by_count = DiskCache(tmp_path / "n", max_entries=2)
    for i in range(4):
        by_count.write(f"b{i}", "t", _raw(i))
        assert by_count.stats().entries <= 2
    assert sorted(e.adapter_id for e in by_count.entries()) == ["b2", "b3"]
    assert not cache.write("huge", "t", _raw(9, rank=64)).written  # bigger than the whole bound


def test_disk_durable_entries_are_never_evicted(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_entries=2)
    assert cache.write("spill1", "m", _raw(1), durable=True, ephemeral=True).written
    assert cache.write("spill2", "m", _raw(2), durable=True, ephemeral=True).written
    assert not cache.write("cached", "t", _raw(3)).written  # only durable entries: no room
    assert cache.remove("spill1", "m") and not cache.remove("spill1", "m")
    assert cache.write("cached", "t", _raw(3)).written
    cache.close()
    # Spills belong to the process that wrote them: a new process drops them.
    reopened = DiskCache(tmp_path, max_entries=2)
    assert [e.adapter_id for e in reopened.entries()] == ["cached"]
    assert reopened.stats().dropped_at_open == 1


def test_disk_reopen_logs_spills_apart_from_damage(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache = DiskCache(tmp_path)
    assert cache.write("spill", "m", _raw(1), durable=True, ephemeral=True).written
    assert cache.write("cached", "t", _raw(2)).written
    cache.close()
    (tmp_path / "entries" / "stray").mkdir()
    with caplog.at_level("INFO", logger="polylora_async"):
        reopened = DiskCache(tmp_path)
        reopened.open()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    infos = [r.getMessage() for r in caplog.records if r.levelname == "INFO"]
    assert len(warnings) == 1 and "'stray'" in warnings[0]  # the spill is not reported as damage
    assert any("kept 1 cached entries, dropped 1 spilled" in m for m in infos)
    assert reopened.stats().dropped_at_open == 2


def _populated(root: Path, n: int = 3) -> None:
    cache = DiskCache(root)
    for i in range(n):
        cache.write(f"a{i}", "t", _raw(i))
    cache.close()


def test_disk_recovers_from_a_half_written_entry(tmp_path: Path) -> None:
    _populated(tmp_path)
    entries = tmp_path / ENTRIES_DIR
    # a0: the weights file was cut short; a1: the weights file never got written.
    weights0 = entries / entry_name("a0", "t") / "adapter_model.safetensors"
    weights0.write_bytes(weights0.read_bytes()[:50])
    (entries / entry_name("a1", "t") / "adapter_model.safetensors").unlink()
    # A crash after the rename but before the manifest: an unlisted (complete) entry.
    (entries / "orphan-0123").mkdir()
    (entries / "orphan-0123" / "adapter_config.json").write_text("{}")
    # A crash mid-write: leftovers in tmp/ and a temp manifest.
    (tmp_path / TMP_DIR / "write-abc").mkdir()
    (tmp_path / TMP_DIR / "write-abc" / "adapter_config.json").write_text("{")
    (tmp_path / f".{MANIFEST_FILE}.1.abc.tmp").write_text("{")
    cache = DiskCache(tmp_path)
    assert cache.read("a0", "t") is None and cache.read("a1", "t") is None
    assert _same_raw(cache.read("a2", "t"), _raw(2))  # type: ignore[arg-type]
    assert cache.stats().dropped_at_open == 3
    assert sorted(p.name for p in entries.iterdir()) == [entry_name("a2", "t")]
    assert list((tmp_path / TMP_DIR).iterdir()) == []
    assert not list(tmp_path.glob(f".{MANIFEST_FILE}.*"))
    assert cache.write("a0", "t", _raw(0)).written  # and it keeps working
    assert _same_raw(cache.read("a0", "t"), _raw(0))  # type: ignore[arg-type]


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "wrong-format", "bad-entry"])
def test_disk_recovers_from_a_broken_manifest(tmp_path: Path, damage: str) -> None:
    _populated(tmp_path)
    manifest = tmp_path / MANIFEST_FILE
    text = manifest.read_text()
    broken = {
        "truncated": text[: len(text) // 2],
        "empty": "",
        "garbage": "\x00\xff not json",
        "wrong-format": json.dumps({"format": 99, "entries": []}),
        "bad-entry": json.dumps({"format": 1, "entries": [{"name": 3}]}),
    }[damage]
    manifest.write_text(broken, encoding="latin-1")
    cache = DiskCache(tmp_path)
    assert cache.stats().entries == 0 and cache.stats().dropped_at_open == 3
    assert list((tmp_path / ENTRIES_DIR).iterdir()) == []
    assert cache.write("a9", "t", _raw(9)).written
    assert _same_raw(DiskCache(tmp_path).read("a9", "t"), _raw(9))  # type: ignore[arg-type]


def test_disk_corrupt_entry_is_dropped_on_read(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.write("a", "t", _raw(1))
    weights = cache.path_of("a", "t") / "adapter_model.safetensors"
    weights.write_bytes(b"\xff" * weights.stat().st_size)  # same size, garbage content
    with pytest.raises(AdapterLoadError, match="cannot read"):
        cache.read("a", "t")
    assert not cache.contains("a", "t") and not cache.path_of("a", "t").exists()
    assert cache.read("a", "t") is None


def test_disk_lru_order_survives_reopen_and_bounds_shrink(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    for i in range(3):
        cache.write(f"a{i}", "t", _raw(i))
    os.utime(tmp_path)  # no-op; the order comes from the manifest, not mtimes
    cache.read("a0", "t")
    cache.close()
    smaller = DiskCache(tmp_path, max_entries=2)
    assert sorted(e.adapter_id for e in smaller.entries()) == ["a0", "a2"]


def test_disk_closed_cache_refuses_writes(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    cache.write("a", "t", _raw(1))
    cache.close()
    assert not cache.write("b", "t", _raw(2)).written
    assert cache.read("a", "t") is None
    assert list((tmp_path / TMP_DIR).iterdir()) == []


class _PinnedStorage:
    """Stands in for a page-locked storage of ``n`` bytes (no CUDA on the test machine)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def is_pinned(self) -> bool:
        return True

    def numel(self) -> int:
        return self.n

    def element_size(self) -> int:
        return 1


def test_cpu_tier_counts_pinned_weights_as_the_allocator_reserves_them() -> None:
    mib = 1 << 20
    unpinned = _weights("plain", 33 * mib)
    assert host_bytes(unpinned) == 33 * mib
    exact = AdapterWeights("exact", {}, "t", nbytes=64 * mib, storage=_PinnedStorage(64 * mib))  # type: ignore[arg-type]
    odd = AdapterWeights("odd", {}, "t", nbytes=33 * mib, storage=_PinnedStorage(33 * mib))  # type: ignore[arg-type]
    assert host_bytes(exact) == 64 * mib and host_bytes(odd) == 64 * mib
    tier = CpuTier(100 * mib)
    assert tier.put("odd", odd).stored and tier.nbytes == 64 * mib
    # 64 + 64 MiB would exceed the bound that 33 + 33 MiB of weights alone would have kept.
    assert tier.put("odd2", odd).evicted == ("odd",)
    _check_bound(tier)
    assert tier.nbytes == 64 * mib and tier.remove("odd2") and tier.nbytes == 0
