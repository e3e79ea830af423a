"""Prometheus metrics scraped over real HTTP while the runtime serves match what happened."""

from __future__ import annotations

import asyncio
import re
import urllib.request
from pathlib import Path

import torch
from prometheus_client import CollectorRegistry

from polylora_async import BASE_ADAPTER, MultiLoraModel, Runtime, RuntimeConfig, StoreConfig, WrapConfig, serve_metrics
from tests._tiny import TARGETS, TinyModel, write_adapter


def _scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=10) as response:  # real HTTP on 127.0.0.1
        assert response.status == 200
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) (\S+)$", line)
        if match:
            values[match[1]] = float(match[2])
    return values


async def test_scripted_sequence_gives_exact_counts(tmp_path: Path) -> None:
    adapters = {name: write_adapter(tmp_path, name, seed=i) for i, name in enumerate(["ad0", "ad1", "ad2"])}
    model = MultiLoraModel(TinyModel(), WrapConfig(TARGETS, max_rank=8, num_slots=2))
    registry = CollectorRegistry()
    runtime = Runtime(model, RuntimeConfig(max_wait=0.0), registry, store_config=StoreConfig(min_residency_s=0.0))
    # Two slots, three adapters, one request at a time. Expected per step (gpu, cpu):
    #   ad0: miss, miss | ad0: hit | ad1: miss, miss | ad0: hit | ad2: miss (evicts ad1), miss
    #   ad1: miss (evicts ad0), cpu hit | base: no lookup
    script = ["ad0", "ad0", "ad1", "ad0", "ad2", "ad1", BASE_ADAPTER]
    async with runtime, await serve_metrics(registry) as server:
        for name, path in adapters.items():
            runtime.register_adapter(name, path)
        for step, name in enumerate(script):
            await runtime.submit({"input_ids": torch.tensor([1, 2, 3 + step])}, name)
        await runtime.store.drain()
        values = await asyncio.to_thread(_scrape, server.url)

    assert values['polylora_adapter_cache_hits_total{tier="gpu"}'] == 2
    assert values['polylora_adapter_cache_misses_total{tier="gpu"}'] == 4
    assert values['polylora_adapter_cache_hits_total{tier="cpu"}'] == 1
    assert values['polylora_adapter_cache_misses_total{tier="cpu"}'] == 3
    assert values['polylora_adapter_evictions_total{tier="gpu"}'] == 2
    assert values['polylora_requests_total{outcome="ok"}'] == len(script)
    assert values['polylora_requests_total{outcome="error"}'] == 0
    assert values["polylora_request_duration_seconds_count"] == len(script)
    assert values["polylora_batch_size_count"] == len(script)  # one request at a time: one batch each
    assert values["polylora_queue_depth"] == 0
    assert values['polylora_adapters_resident{tier="gpu"}'] == 2
