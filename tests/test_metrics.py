"""RuntimeMetrics, scraped over real HTTP on 127.0.0.1, and the ASGI app called by hand."""

from __future__ import annotations

import asyncio
import math
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterable
from typing import Any

import anyio.to_thread
import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families
from prometheus_client.parser import text_string_to_metric_families

from polylora_async._exposition import MetricsServer, metrics_asgi_app, serve_metrics
from polylora_async._metrics import LOAD_SOURCES, LOAD_TARGETS, OUTCOMES, TIERS, RuntimeMetrics

# What a scraper that sends no Accept header gets: the Prometheus text format, version 0.0.4.
TEXT_FORMAT = "text/plain; version=0.0.4; charset=utf-8"

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: bytes | str) -> Samples:
    """Every sample of a text exposition, keyed by (name, sorted label pairs)."""
    if isinstance(text, bytes):
        text = text.decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def parse_openmetrics(text: bytes) -> Samples:
    """Every sample of an OpenMetrics exposition, keyed like :func:`parse`."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in openmetrics_families(text.decode())
        for s in family.samples
    }


def fetch(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request with urllib, bypassing any proxy from the environment (runs in a thread)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url, method=method, headers=headers or {})
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, {k.lower(): v for k, v in response.headers.items()}, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()


async def scrape(server: MetricsServer) -> Samples:
    status, headers, body = await anyio.to_thread.run_sync(fetch, server.url)
    assert status == 200
    assert headers["content-type"] == TEXT_FORMAT
    return parse(body)


@pytest.fixture
def metrics() -> RuntimeMetrics:
    return RuntimeMetrics()


@pytest.fixture
async def server(metrics: RuntimeMetrics) -> AsyncIterator[MetricsServer]:
    async with await serve_metrics(metrics.registry) as running:
        yield running


# -- values ------------------------------------------------------------------------------------------


def run_script(m: RuntimeMetrics) -> None:
    """A scripted sequence; durations are binary fractions, so sums are exact."""
    for tier in ("gpu", "gpu", "gpu", "cpu"):
        m.cache_hit(tier)
    for tier in ("gpu", "gpu", "disk"):
        m.cache_miss(tier)
    m.eviction("gpu")
    m.eviction("gpu")
    m.eviction("cpu")
    m.reload_after_eviction("gpu")
    m.set_resident("gpu", 3, 3000)
    m.set_resident("cpu", 5, 1 << 20)
    m.set_resident("gpu", 2, 2000)  # gauges keep the last value
    m.load_duration("disk", "cpu", 0.5)
    m.load_duration("disk", "cpu", 0.25)
    m.load_duration("cpu", "gpu", 2.0**-10)
    m.set_queue_depth(7)
    m.set_queue_depth(4)
    m.batch(4, 512, 2)
    m.batch(8, 1024, 3)
    m.batch(1, 16, 1)
    m.split_batch()
    m.split_batch()
    m.batch_duration(0.015625)
    m.batch_duration(0.015625)
    m.request_done("ok", 0.5, 0.0625)
    m.request_done("ok", 0.25, 0.03125)
    m.request_done("ok", 0.125, 2.0**-9)
    m.request_done("error", 1.0)
    m.request_done("rejected", 0.0)


async def test_scripted_updates_scraped_over_http(metrics: RuntimeMetrics, server: MetricsServer) -> None:
    run_script(metrics)
    s = await scrape(server)

    hits = {t: value(s, "polylora_adapter_cache_hits_total", tier=t) for t in TIERS}
    assert hits == {"gpu": 3, "cpu": 1, "disk": 0}
    misses = {t: value(s, "polylora_adapter_cache_misses_total", tier=t) for t in TIERS}
    assert misses == {"gpu": 2, "cpu": 0, "disk": 1}
    evictions = {t: value(s, "polylora_adapter_evictions_total", tier=t) for t in TIERS}
    assert evictions == {"gpu": 2, "cpu": 1, "disk": 0}
    reloads = {t: value(s, "polylora_adapter_reloads_after_eviction_total", tier=t) for t in TIERS}
    assert reloads == {"gpu": 1, "cpu": 0, "disk": 0}
    resident = {t: value(s, "polylora_adapters_resident", tier=t) for t in TIERS}
    assert resident == {"gpu": 2, "cpu": 5, "disk": 0}
    cache_bytes = {t: value(s, "polylora_adapter_cache_bytes", tier=t) for t in TIERS}
    assert cache_bytes == {"gpu": 2000, "cpu": 1 << 20, "disk": 0}

    load = "polylora_adapter_load_duration_seconds"
    assert value(s, load + "_count", source="disk", target="cpu") == 2
    assert value(s, load + "_sum", source="disk", target="cpu") == 0.75
    assert value(s, load + "_bucket", source="disk", target="cpu", le="0.25") == 1
    assert value(s, load + "_count", source="cpu", target="gpu") == 1
    assert value(s, load + "_bucket", source="cpu", target="gpu", le="0.001") == 1
    assert value(s, load + "_count", source="source", target="disk") == 0  # pre-created
    assert (load + "_count", (("source", "source"), ("target", "cpu"))) not in s  # never used

    assert value(s, "polylora_queue_depth") == 4
    assert value(s, "polylora_batch_size_count") == 3
    assert value(s, "polylora_batch_size_sum") == 13
    assert value(s, "polylora_batch_size_bucket", le="4.0") == 2
    assert value(s, "polylora_batch_size_bucket", le="8.0") == 3
    assert value(s, "polylora_batch_tokens_sum") == 1552
    assert value(s, "polylora_batch_tokens_bucket", le="512.0") == 2
    assert value(s, "polylora_batch_adapters_sum") == 6
    assert value(s, "polylora_batch_adapters_bucket", le="2.0") == 2
    assert value(s, "polylora_split_batches_total") == 2
    assert value(s, "polylora_batch_duration_seconds_count") == 2
    assert value(s, "polylora_batch_duration_seconds_sum") == 0.03125

    requests = {o: value(s, "polylora_requests_total", outcome=o) for o in OUTCOMES}
    assert requests == {"ok": 3, "error": 1, "timeout": 0, "cancelled": 0, "rejected": 1}
    duration = "polylora_request_duration_seconds"
    assert value(s, duration + "_count") == 4  # the rejected request's zero is not a latency
    assert value(s, duration + "_sum") == 1.875
    buckets = {le: value(s, duration + "_bucket", le=le) for le in ("0.0001", "0.25", "0.5", "1.0", "+Inf")}
    assert buckets == {"0.0001": 0, "0.25": 2, "0.5": 3, "1.0": 4, "+Inf": 4}
    wait = "polylora_request_queue_wait_seconds"
    assert value(s, wait + "_count") == 3  # error and rejected had no queue wait
    assert value(s, wait + "_sum") == 0.0625 + 0.03125 + 2.0**-9


async def test_every_child_reads_zero_before_first_use(server: MetricsServer) -> None:
    s = await scrape(server)
    for name in (
        "polylora_adapter_cache_hits_total", "polylora_adapter_cache_misses_total",
        "polylora_adapter_evictions_total", "polylora_adapter_reloads_after_eviction_total",
        "polylora_adapters_resident", "polylora_adapter_cache_bytes",
    ):
        assert [value(s, name, tier=t) for t in TIERS] == [0, 0, 0], name
    assert [value(s, "polylora_requests_total", outcome=o) for o in OUTCOMES] == [0] * len(OUTCOMES)
    for source, target in (("source", "disk"), ("disk", "cpu"), ("cpu", "gpu")):
        assert value(s, "polylora_adapter_load_duration_seconds_count", source=source, target=target) == 0
    assert value(s, "polylora_queue_depth") == 0
    assert value(s, "polylora_split_batches_total") == 0


def table_rows() -> dict[str, tuple[str, str]]:
    """The class docstring's table: metric name -> (type, labels)."""
    rows = {}
    for line in (RuntimeMetrics.__doc__ or "").splitlines():
        cells = line.split()
        if cells and cells[0].startswith("polylora_"):
            rows[cells[0]] = (cells[1], " ".join(cells[2:-1]))
    return rows


def exposed(registry: CollectorRegistry) -> dict[str, Metric]:
    """Metric families by their exposed name (counters with their ``_total``)."""
    return {
        family.name + ("_total" if family.type == "counter" else ""): family
        for family in registry.collect()
    }


def test_docstring_table_lists_every_metric_with_its_type_and_labels() -> None:
    families = exposed(RuntimeMetrics().registry)
    rows = table_rows()
    assert set(rows) == set(families)
    for name, family in families.items():
        labels = {k for s in family.samples for k in s.labels if k not in ("le", "quantile")}
        documented_type, documented_labels = rows[name]
        assert documented_type == family.type, name
        assert labels == {label.strip() for label in documented_labels.split(",")} - {"-"}, name


def test_names_and_labels_follow_prometheus_conventions() -> None:
    for name, family in exposed(RuntimeMetrics().registry).items():
        assert name.startswith("polylora_"), name
        assert name.endswith("_total") == (family.type == "counter"), name
        if "duration" in name or "wait" in name:
            assert name.endswith("_seconds"), name
        if "bytes" in name:
            assert name.endswith("_bytes"), name
        for sample in family.samples:
            assert set(sample.labels) <= {"tier", "outcome", "source", "target", "reason", "state", "le"}, name


# -- isolation ---------------------------------------------------------------------------------------


async def test_two_runtimes_in_one_process_do_not_collide() -> None:
    first, second = RuntimeMetrics(), RuntimeMetrics()
    assert first.registry is not second.registry
    first.cache_hit("gpu")
    first.request_done("ok", 0.5)
    second.request_done("timeout", 2.0)
    async with await serve_metrics(first.registry) as one, await serve_metrics(second.registry) as two:
        assert one.port != two.port
        s1, s2 = await scrape(one), await scrape(two)
    assert value(s1, "polylora_adapter_cache_hits_total", tier="gpu") == 1
    assert value(s2, "polylora_adapter_cache_hits_total", tier="gpu") == 0
    assert value(s1, "polylora_requests_total", outcome="ok") == 1
    assert value(s1, "polylora_requests_total", outcome="timeout") == 0
    assert value(s2, "polylora_requests_total", outcome="timeout") == 1
    assert value(s2, "polylora_request_duration_seconds_sum") == 2.0


def test_a_registry_passed_in_is_used_and_a_clash_leaves_it_unchanged() -> None:
    registry = CollectorRegistry()
    metrics = RuntimeMetrics(registry)
    assert metrics.registry is registry
    metrics.set_queue_depth(3)
    assert value(parse(generate_latest(registry)), "polylora_queue_depth") == 3

    with pytest.raises(ValueError, match="own CollectorRegistry"):
        RuntimeMetrics(registry)
    assert value(parse(generate_latest(registry)), "polylora_queue_depth") == 3

    # A clash on a later metric must undo the registrations made before it.
    other = CollectorRegistry()
    Gauge("polylora_request_queue_wait_seconds", "somebody else's", registry=other)
    with pytest.raises(ValueError, match="polylora_request_queue_wait_seconds"):
        RuntimeMetrics(other)
    assert [family.name for family in other.collect()] == ["polylora_request_queue_wait_seconds"]


def test_nothing_is_registered_in_the_global_registry() -> None:
    def names() -> set[str]:
        return {family.name for family in REGISTRY.collect()}

    before = names()
    metrics = RuntimeMetrics()
    run_script(metrics)
    metrics_asgi_app(metrics.registry)
    assert names() == before
    # The modules were imported by this file already: importing registered nothing either.
    assert not any(name.startswith("polylora") for name in before)
    assert b"polylora" not in generate_latest(REGISTRY)


# -- validation --------------------------------------------------------------------------------------


Call = Callable[[RuntimeMetrics], Any]

BAD_CALLS: dict[str, tuple[Call, str]] = {
    "hit-tier": (lambda m: m.cache_hit("l1"), r"`tier` must be one of gpu, cpu, disk, got 'l1'"),
    "miss-tier": (lambda m: m.cache_miss("GPU"), r"`tier` .* got 'GPU'"),
    "eviction-tier": (lambda m: m.eviction("adapter-123"), r"`tier` .* got 'adapter-123'"),
    "reload-tier": (lambda m: m.reload_after_eviction(""), r"`tier` .* got ''"),
    "resident-tier": (lambda m: m.set_resident("ram", 1, 1), r"`tier` .* got 'ram'"),
    "resident-count": (lambda m: m.set_resident("gpu", -1, 1), r"`count` .* got -1"),
    "resident-nbytes": (lambda m: m.set_resident("gpu", 1, -5), r"`nbytes` .* got -5"),
    "load-source": (
        lambda m: m.load_duration("net", "gpu", 1.0), r"`source` must be one of source, disk, cpu, got 'net'"
    ),
    "load-target": (
        lambda m: m.load_duration("disk", "ssd", 1.0), r"`target` must be one of disk, cpu, gpu, got 'ssd'"
    ),
    "load-same-tier": (
        lambda m: m.load_duration("cpu", "cpu", 1.0), r"`target` must differ from `source`, got 'cpu'"
    ),
    "load-seconds": (lambda m: m.load_duration("cpu", "gpu", -0.5), r"`seconds` .* got -0.5"),
    "request-outcome": (
        lambda m: m.request_done("success", 0.1), r"`outcome` must be one of ok, error, .* got 'success'"
    ),
    "request-duration-nan": (lambda m: m.request_done("ok", math.nan), r"`duration_s` .* got nan"),
    "request-queue-wait": (lambda m: m.request_done("ok", 0.1, -1.0), r"`queue_wait_s` .* got -1.0"),
    "queue-depth": (lambda m: m.set_queue_depth(-2), r"`n` .* got -2"),
    "batch-size": (lambda m: m.batch(-1, 10, 1), r"`size` .* got -1"),
    "batch-tokens-inf": (lambda m: m.batch(1, math.inf, 1), r"`tokens` .* got inf"),  # type: ignore[arg-type]
    "batch-duration": (lambda m: m.batch_duration(-1e-3), r"`seconds` .* got -0.001"),
}


@pytest.mark.parametrize(("call", "message"), BAD_CALLS.values(), ids=BAD_CALLS.keys())
def test_bad_values_raise_and_change_nothing(call: Call, message: str) -> None:
    metrics = RuntimeMetrics()
    before = parse(generate_latest(metrics.registry))
    with pytest.raises(ValueError, match=message):
        call(metrics)
    after = parse(generate_latest(metrics.registry))
    assert {k: v for k, v in after.items() if "_created" not in k[0]} == {
        k: v for k, v in before.items() if "_created" not in k[0]
    }


def test_every_valid_label_value_is_accepted() -> None:
    metrics = RuntimeMetrics()
    for tier in TIERS:
        metrics.cache_hit(tier)
        metrics.cache_miss(tier)
        metrics.eviction(tier)
        metrics.reload_after_eviction(tier)
        metrics.set_resident(tier, 0, 0)
    for outcome in OUTCOMES:
        metrics.request_done(outcome, 0.0)
    for source in LOAD_SOURCES:
        for target in LOAD_TARGETS:
            if source != target:
                metrics.load_duration(source, target, 0.0)


# -- the HTTP server ---------------------------------------------------------------------------------


async def test_server_reports_its_real_address(server: MetricsServer) -> None:
    assert server.host == "127.0.0.1"
    assert server.port > 0
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert not server.closed
    with pytest.raises(OSError):
        await serve_metrics(CollectorRegistry(), port=server.port)  # taken


async def test_scraped_over_http_in_both_text_formats(metrics: RuntimeMetrics, server: MetricsServer) -> None:
    run_script(metrics)
    expected = parse(generate_latest(metrics.registry))
    status, headers, body = await anyio.to_thread.run_sync(fetch, server.url)
    assert (status, headers["content-type"]) == (200, TEXT_FORMAT)
    assert parse(body) == expected
    accept = {"Accept": "application/openmetrics-text; version=1.0.0; charset=utf-8"}
    status, headers, body = await anyio.to_thread.run_sync(fetch, server.url, "GET", accept)
    assert status == 200 and headers["content-type"].startswith("application/openmetrics-text")
    assert body.endswith(b"# EOF\n")
    open_samples = parse_openmetrics(body)
    # OpenMetrics names counters without `_total` in the family but keeps it on the samples.
    assert value(open_samples, "polylora_requests_total", outcome="ok") == 3
    assert value(open_samples, "polylora_adapter_cache_hits_total", tier="gpu") == 3
    assert {k for k in open_samples if not k[0].endswith("_created")} == {
        k for k in expected if not k[0].endswith("_created")
    }


async def test_families_are_selected_with_name_filters(metrics: RuntimeMetrics, server: MetricsServer) -> None:
    metrics.set_queue_depth(5)
    status, _, body = await anyio.to_thread.run_sync(fetch, server.url + "?name[]=polylora_queue_depth")
    assert status == 200
    assert parse(body) == {("polylora_queue_depth", ()): 5.0}


async def test_aclose_stops_listening(metrics: RuntimeMetrics) -> None:
    server = await serve_metrics(metrics.registry)
    assert value(await scrape(server), "polylora_queue_depth") == 0
    async with server:
        pass  # __aexit__ closes
    assert server.closed
    await server.aclose()  # idempotent
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", server.port)


async def test_serve_metrics_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"pass `\.registry`"):
        await serve_metrics(RuntimeMetrics())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`port` must be an integer in 0\.\.65535, got 70000"):
        await serve_metrics(CollectorRegistry(), port=70000)
    with pytest.raises(TypeError, match="collector"):
        metrics_asgi_app(object())  # type: ignore[arg-type]


# -- the ASGI app ------------------------------------------------------------------------------------


async def call_asgi(app: Any, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call an ASGI app the way a server would; return what it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(dict(message))

    await app(scope, receive, send)
    return sent


def http_scope(method: str, path: str = "/", headers: Iterable[tuple[bytes, bytes]] = ()) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "/metrics",
        "query_string": b"", "headers": [(b"host", b"example"), *headers],
    }


REQUEST = {"type": "http.request", "body": b"", "more_body": False}


async def test_asgi_app_serves_the_registry(metrics: RuntimeMetrics) -> None:
    app = metrics_asgi_app(metrics.registry)
    metrics.request_done("cancelled", 0.25, 0.125)
    start, body = await call_asgi(app, http_scope("GET"), [REQUEST])
    assert start["type"] == "http.response.start"
    assert start["status"] == 200
    assert dict(start["headers"])[b"Content-Type"] == TEXT_FORMAT.encode()
    assert body["type"] == "http.response.body"
    s = parse(body["body"])
    assert value(s, "polylora_requests_total", outcome="cancelled") == 1
    assert value(s, "polylora_request_queue_wait_seconds_sum") == 0.125

    accept = [(b"accept", b"application/openmetrics-text; version=1.0.0")]
    start, body = await call_asgi(app, http_scope("GET", headers=accept), [REQUEST])
    assert start["status"] == 200 and body["body"].endswith(b"# EOF\n")
    assert value(parse_openmetrics(body["body"]), "polylora_requests_total", outcome="cancelled") == 1


def test_light_collectors_expose_what_prometheus_client_would() -> None:
    from prometheus_client import Counter, Histogram

    from polylora_async._metrics import LATENCY_BUCKETS, _FastCounter, _FastHistogram

    ours, theirs = CollectorRegistry(), CollectorRegistry()
    fast_hist = _FastHistogram("x_seconds", "doc", LATENCY_BUCKETS)
    fast_count = _FastCounter("y_total", "doc", "outcome", OUTCOMES)
    ours.register(fast_hist)
    ours.register(fast_count)
    ref_hist = Histogram("x_seconds", "doc", buckets=LATENCY_BUCKETS, registry=theirs)
    ref_count = Counter("y_total", "doc", ["outcome"], registry=theirs)
    for outcome in OUTCOMES:
        ref_count.labels(outcome)
    # Values on bucket bounds, between them, below the first and above the last.
    amounts = [0.0, 1e-5, *LATENCY_BUCKETS, 0.0003, 0.07, 29.9, 31.0, 1e4]
    for i, amount in enumerate(amounts):
        fast_hist.observe(amount)
        ref_hist.observe(amount)
        outcome = OUTCOMES[i % len(OUTCOMES)]
        fast_count.inc(outcome)
        ref_count.labels(outcome).inc()

    def samples(registry: CollectorRegistry) -> Samples:
        # Histograms of ours have no _created series; counters have it, at another instant.
        return {k: v for k, v in parse(generate_latest(registry)).items() if not k[0].endswith("_created")}

    assert samples(ours) == samples(theirs)
    assert {k for k in parse(generate_latest(ours)) if k[0] == "y_created"}
    with pytest.raises(ValueError, match="`outcome` must be one of"):
        fast_count.inc("nope")
