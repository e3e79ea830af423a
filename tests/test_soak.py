"""The soak benchmark's short run: chaos over many adapters, and its checks able to fail."""

from __future__ import annotations

import pytest

from benchmarks.soak import SoakConfig, run_soak


@pytest.mark.timeout(240)
def test_short_soak_loses_nothing_and_every_outcome_is_right() -> None:
    report = run_soak(SoakConfig(requests=3000, adapters=200, clients=64, slots=8, cpu_adapters=24))
    assert report.passed, (report.wrong, report.untyped, report.unexpected, report.lost, report.examples)
    # The run really exercised what it claims: faults of every kind, and adapters moving through tiers.
    for outcome in (
        "normal:ok",
        "base:ok",
        "burst:OverloadedError",
        "corrupt:AdapterLoadError",
        "poison:BatchFailedError",
        "timeout:RequestTimeoutError",
        "malformed:InputValidationError",
    ):
        assert report.outcomes[outcome] > 0, (outcome, report.outcomes)
    assert report.tiers["gpu"]["evictions"] > 0 and report.tiers["cpu"]["hits"] > 0, report.tiers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("fault", ["perturb", "drop"])
def test_soak_detects_injected_faults(fault: str) -> None:
    report = run_soak(SoakConfig(requests=400, adapters=30, clients=16, fault=fault, deadline_s=30.0))
    assert not report.passed
    if fault == "perturb":
        assert report.wrong > 0
    else:
        assert report.lost > 0
