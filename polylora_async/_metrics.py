"""Prometheus metrics of one runtime: what the adapter caches, the queue and the batches are doing.

Every metric lives in a ``CollectorRegistry`` that the user passes in, or in a fresh one owned by the
:class:`RuntimeMetrics` object. Nothing is registered in ``prometheus_client.REGISTRY``, at import or
later, so two runtimes in one process never collide. Serve a registry over HTTP with
``serve_metrics`` or mount ``metrics_asgi_app`` in a web app (both in ``_exposition``, both
prometheus_client's own server and app).
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.utils import floatToGoString

_M = TypeVar("_M", bound=MetricWrapperBase)

TIERS: tuple[str, ...] = ("gpu", "cpu", "disk")
"""Cache tiers, the values of the ``tier`` label."""

LOAD_SOURCES: tuple[str, ...] = ("source", "disk", "cpu")
"""Where an adapter load starts (``source`` is the adapter's original PEFT directory)."""

LOAD_TARGETS: tuple[str, ...] = ("disk", "cpu", "gpu")
"""Where an adapter load ends."""

OUTCOMES: tuple[str, ...] = ("ok", "error", "timeout", "cancelled", "rejected")
"""How a request ended, the values of the ``outcome`` label."""

# The hops of the data path (source -> disk cache -> pinned CPU -> GPU slot). Their histogram
# children exist from the start so that rate() over them reads 0, not "no data", before the first
# load. Other (source, target) pairs are accepted and appear when first used.
_PRECREATED_LOADS: tuple[tuple[str, str], ...] = (("source", "disk"), ("disk", "cpu"), ("cpu", "gpu"))

# Request latency and queue wait: 100 µs (a warm small batch on an idle runtime) to 30 s (a cold
# adapter fetched from its source behind a long queue), roughly 1-2.5-5 per decade.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0,
)

# Adapter loads: a CPU -> GPU copy of a rank-16 adapter takes well under 1 ms on PCIe 5; a first
# fetch from a remote source can take a minute.
LOAD_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005,
    0.01, 0.025, 0.05,
    0.1, 0.25, 0.5,
    1.0, 2.5, 5.0,
    10.0, 30.0, 60.0, 120.0,
)

# Counts: powers of two, because batch limits are almost always set to powers of two and a
# bucket boundary on the limit shows at a glance how often batches are full.
BATCH_SIZE_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(11))  # 1 .. 1024 rows
BATCH_TOKENS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(4, 18))  # 16 .. 131072
BATCH_ADAPTERS_BUCKETS: tuple[float, ...] = tuple(float(2**i) for i in range(8))  # 1 .. 128 adapters


class RuntimeMetrics:
    """The Prometheus metrics of one runtime, and the methods that update them.

    =============================================  =========  ==============  =======================
    Metric                                         Type       Labels          Updated by
    =============================================  =========  ==============  =======================
    polylora_adapter_cache_hits_total              counter    tier            cache_hit()
    polylora_adapter_cache_misses_total            counter    tier            cache_miss()
    polylora_adapter_load_duration_seconds         histogram  source, target  load_duration()
    polylora_adapter_evictions_total               counter    tier            eviction()
    polylora_adapter_reloads_after_eviction_total  counter    tier            reload_after_eviction()
    polylora_adapters_resident                     gauge      tier            set_resident()
    polylora_adapter_cache_bytes                   gauge      tier            set_resident()
    polylora_queue_depth                           gauge      -               set_queue_depth()
    polylora_batch_size                            histogram  -               batch()
    polylora_batch_tokens                          histogram  -               batch()
    polylora_batch_adapters                        histogram  -               batch()
    polylora_split_batches_total                   counter    -               split_batch()
    polylora_isolated_failures_total               counter    -               isolated_failure()
    polylora_batch_duration_seconds                histogram  -               batch_duration()
    polylora_requests_total                        counter    outcome         request_done()
    polylora_request_duration_seconds              histogram  -               request_done()
    polylora_request_queue_wait_seconds            histogram  -               request_done()
    polylora_time_to_first_token_seconds           histogram  -               first_token()
    polylora_inter_token_seconds                   histogram  -               next_token()
    polylora_generated_tokens_total                counter    -               first_token()+next_token()
    polylora_sequences                             gauge      state           set_sequences()
    polylora_kv_cache_bytes                        gauge      -               set_sequences()
    polylora_preemptions_total                     counter    -               (never)
    =============================================  =========  ==============  =======================

    Label values are bounded and validated: ``tier`` is one of :data:`TIERS` (gpu, cpu, disk);
    ``source`` one of :data:`LOAD_SOURCES` (source, disk, cpu); ``target`` one of
    :data:`LOAD_TARGETS` (disk, cpu, gpu); ``outcome`` one of :data:`OUTCOMES` (ok, error, timeout,
    cancelled, rejected). Adapter ids never become label values: one series per adapter would grow
    without bound. Every ``tier`` and ``outcome`` child exists from the start and reads 0.

    Counters, gauges and histograms of ``prometheus_client`` are thread-safe, so the GPU worker
    thread and the event loop may both call these methods.

    Args:
        registry: where the metrics are registered. ``None`` (the default) creates a fresh
            registry owned by this object. Never ``prometheus_client.REGISTRY`` unless you pass it.

    Raises:
        ValueError: if ``registry`` already holds a metric with one of these names (for example
            another runtime's metrics); give each runtime its own registry. Nothing is left
            registered when this is raised.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._registry = CollectorRegistry() if registry is None else registry

        # Created unregistered (registry=None), then registered together below so that a name
        # clash leaves the user's registry as it was.
        # Updated once or more per request: the light collectors below (see _FastCounter).
        self._hits = _FastCounter(
            "polylora_adapter_cache_hits_total",
            "Adapter lookups that found the adapter already in this tier.",
            "tier", TIERS,
        )
        self._misses = _FastCounter(
            "polylora_adapter_cache_misses_total",
            "Adapter lookups that did not find the adapter in this tier.",
            "tier", TIERS,
        )
        self._load = Histogram(
            "polylora_adapter_load_duration_seconds",
            "Time to move one adapter from one tier (or its source) to another.",
            ["source", "target"], buckets=LOAD_BUCKETS, registry=None,
        )
        self._evictions = Counter(
            "polylora_adapter_evictions_total",
            "Adapters evicted from this tier to make room.",
            ["tier"], registry=None,
        )
        self._reloads = Counter(
            "polylora_adapter_reloads_after_eviction_total",
            "Adapters loaded into this tier again after being evicted from it (cache thrash).",
            ["tier"], registry=None,
        )
        self._resident = Gauge(
            "polylora_adapters_resident",
            "Adapters resident in this tier.",
            ["tier"], registry=None,
        )
        self._cache_bytes = Gauge(
            "polylora_adapter_cache_bytes",
            "Bytes of adapter weights resident in this tier.",
            ["tier"], registry=None,
        )
        self._queue_depth = Gauge(
            "polylora_queue_depth",
            "Requests submitted and not yet placed in a batch.",
            registry=None,
        )
        self._batch_size = Histogram(
            "polylora_batch_size",
            "Rows (requests) per batch.",
            buckets=BATCH_SIZE_BUCKETS, registry=None,
        )
        self._batch_tokens = Histogram(
            "polylora_batch_tokens",
            "Tokens per batch, padding included.",
            buckets=BATCH_TOKENS_BUCKETS, registry=None,
        )
        self._batch_adapters = Histogram(
            "polylora_batch_adapters",
            "Distinct adapters per batch.",
            buckets=BATCH_ADAPTERS_BUCKETS, registry=None,
        )
        self._split_batches = Counter(
            "polylora_split_batches_total",
            "Batches run as adapter-homogeneous groups because the model fed a tensor shared by "
            "all rows into a wrapped layer.",
            registry=None,
        )
        self._isolated_failures = Counter(
            "polylora_isolated_failures_total",
            "Requests failed alone after their batch failed and was re-run in parts to find them.",
            registry=None,
        )
        self._batch_duration = Histogram(
            "polylora_batch_duration_seconds",
            "Time to run one batch through the model, from launch to completion.",
            buckets=LATENCY_BUCKETS, registry=None,
        )
        self._requests = _FastCounter(
            "polylora_requests_total",
            "Requests finished, by outcome.",
            "outcome", OUTCOMES,
        )
        self._request_duration = _FastHistogram(
            "polylora_request_duration_seconds",
            "Time from submit to the request's end, whatever the outcome.",
            LATENCY_BUCKETS,
        )
        self._queue_wait = _FastHistogram(
            "polylora_request_queue_wait_seconds",
            "Time from submit until the request was placed in a batch.",
            LATENCY_BUCKETS,
        )

        self._ttft = Histogram(
            "polylora_time_to_first_token_seconds",
            "Time from a generation's submit to its first token.",
            buckets=LATENCY_BUCKETS, registry=None,
        )
        self._itl = Histogram(
            "polylora_inter_token_seconds",
            "Time between two consecutive tokens of one generation.",
            buckets=LATENCY_BUCKETS, registry=None,
        )
        self._generated = Counter(
            "polylora_generated_tokens_total",
            "Tokens generated, over all sequences.",
            registry=None,
        )
        self._sequences = Gauge(
            "polylora_sequences",
            "Generations running (in the decode batch) or waiting to be admitted.",
            ["state"], registry=None,
        )
        self._kv_bytes = Gauge(
            "polylora_kv_cache_bytes",
            "Bytes the running generations' KV cache holds (padding included).",
            registry=None,
        )
        self._preemptions = Counter(
            "polylora_preemptions_total",
            "Generations preempted for KV memory: none, since admission reserves each sequence's whole "
            "KV need (kept so dashboards can show it).",
            registry=None,
        )

        # Children looked up by label value: validation and update in one dict lookup, without
        # going through labels() (which takes a lock and builds a key tuple) on the hot path.
        self._evictions_by_tier = _children(self._evictions, TIERS)
        self._reloads_by_tier = _children(self._reloads, TIERS)
        self._resident_by_tier = _children(self._resident, TIERS)
        self._bytes_by_tier = _children(self._cache_bytes, TIERS)
        self._sequences_by_state = _children(self._sequences, ("running", "waiting"))
        for source, target in _PRECREATED_LOADS:
            self._load.labels(source=source, target=target)

        _register_all(
            self._registry,
            [
                self._hits, self._misses, self._load, self._evictions, self._reloads,
                self._resident, self._cache_bytes, self._queue_depth,
                self._batch_size, self._batch_tokens, self._batch_adapters, self._split_batches,
                self._isolated_failures,
                self._batch_duration, self._requests, self._request_duration, self._queue_wait,
                self._ttft, self._itl, self._generated, self._sequences, self._kv_bytes, self._preemptions,
            ],
        )

    @property
    def registry(self) -> CollectorRegistry:
        """The registry holding these metrics: serve it, or collect it in tests."""
        return self._registry

    # -- adapter caches ----------------------------------------------------------------------------

    def cache_hit(self, tier: str) -> None:
        """Count a lookup that found the adapter resident in ``tier`` (gpu, cpu or disk).

        Raises:
            ValueError: if ``tier`` is not a known tier.
        """
        self._hits.inc(tier)

    def cache_miss(self, tier: str) -> None:
        """Count a lookup that did not find the adapter in ``tier`` (gpu, cpu or disk).

        Raises:
            ValueError: if ``tier`` is not a known tier.
        """
        self._misses.inc(tier)

    def load_duration(self, source: str, target: str, seconds: float) -> None:
        """Record how long moving one adapter from ``source`` to ``target`` took.

        Args:
            source: ``"source"`` (the adapter's original directory), ``"disk"`` or ``"cpu"``.
            target: ``"disk"``, ``"cpu"`` or ``"gpu"``; not the same as ``source``.
            seconds: the duration, >= 0.

        Raises:
            ValueError: if a label value is unknown, ``source == target``, or ``seconds`` is
                negative or not finite.
        """
        if source not in LOAD_SOURCES:
            raise ValueError(f"`source` must be one of {', '.join(LOAD_SOURCES)}, got {source!r}")
        if target not in LOAD_TARGETS:
            raise ValueError(f"`target` must be one of {', '.join(LOAD_TARGETS)}, got {target!r}")
        if source == target:
            raise ValueError(f"`target` must differ from `source`, got {source!r} for both")
        _check_amount("seconds", seconds)
        self._load.labels(source=source, target=target).observe(seconds)

    def eviction(self, tier: str) -> None:
        """Count one adapter evicted from ``tier`` (gpu, cpu or disk).

        Raises:
            ValueError: if ``tier`` is not a known tier.
        """
        _child(self._evictions_by_tier, "tier", tier).inc()

    def reload_after_eviction(self, tier: str) -> None:
        """Count one adapter loaded into ``tier`` again after it was evicted from it (thrash).

        A rate that stays high next to :meth:`eviction`'s means the tier is too small for the
        working set.

        Raises:
            ValueError: if ``tier`` is not a known tier.
        """
        _child(self._reloads_by_tier, "tier", tier).inc()

    def set_resident(self, tier: str, count: int, nbytes: int) -> None:
        """Set how many adapters, and how many bytes of their weights, ``tier`` holds now.

        Args:
            tier: ``"gpu"``, ``"cpu"`` or ``"disk"``.
            count: adapters resident, >= 0.
            nbytes: bytes of adapter weights resident (for the GPU, the bytes of occupied
                slots), >= 0.

        Raises:
            ValueError: if ``tier`` is unknown or a number is negative.
        """
        resident = _child(self._resident_by_tier, "tier", tier)
        cache_bytes = _child(self._bytes_by_tier, "tier", tier)
        _check_amount("count", count)
        _check_amount("nbytes", nbytes)
        resident.set(count)
        cache_bytes.set(nbytes)

    # -- queue and batches -------------------------------------------------------------------------

    def set_queue_depth(self, n: int) -> None:
        """Set how many requests wait to be placed in a batch.

        Raises:
            ValueError: if ``n`` is negative.
        """
        _check_amount("n", n)
        self._queue_depth.set(n)

    def batch(self, size: int, tokens: int, adapters: int) -> None:
        """Record one batch's shape.

        Args:
            size: rows (requests) in the batch.
            tokens: tokens in the batch, padding included (rows x padded length).
            adapters: distinct adapters in the batch.

        Raises:
            ValueError: if a number is negative.
        """
        _check_amount("size", size)
        _check_amount("tokens", tokens)
        _check_amount("adapters", adapters)
        self._batch_size.observe(size)
        self._batch_tokens.observe(tokens)
        self._batch_adapters.observe(adapters)

    def split_batch(self) -> None:
        """Count one batch run as adapter-homogeneous groups instead of one mixed forward pass.

        This happens when the model fed a tensor shared by all rows (not one row per request)
        into a wrapped layer of an architecture without a dedicated patch.
        """
        self._split_batches.inc()

    def isolated_failure(self) -> None:
        """Count one request failed alone: its batch failed and re-running it in parts found it."""
        self._isolated_failures.inc()

    def batch_duration(self, seconds: float) -> None:
        """Record how long one batch took on the device, from launch to completion.

        Raises:
            ValueError: if ``seconds`` is negative or not finite.
        """
        _check_amount("seconds", seconds)
        self._batch_duration.observe(seconds)

    # -- requests ----------------------------------------------------------------------------------

    def request_done(self, outcome: str, duration_s: float, queue_wait_s: float | None = None) -> None:
        """Count one finished request and record its latency.

        Args:
            outcome: ``"ok"``, ``"error"``, ``"timeout"``, ``"cancelled"`` or ``"rejected"``.
            duration_s: seconds from submit to the end; observed for every outcome except
                ``"rejected"`` (a request refused at the door never waited, and counting its
                zero would pull the latency quantiles down exactly when the service is overloaded).
            queue_wait_s: seconds from submit until the request was placed in a batch; ``None``
                when it never was (rejected, or cancelled while queued), and then not observed.

        Raises:
            ValueError: if ``outcome`` is unknown or a duration is negative or not finite.
        """
        self._requests.check(outcome)
        _check_amount("duration_s", duration_s)
        if queue_wait_s is not None:
            _check_amount("queue_wait_s", queue_wait_s)
        self._requests.inc(outcome)
        if outcome != "rejected":
            self._request_duration.observe(duration_s)
        if queue_wait_s is not None:
            self._queue_wait.observe(queue_wait_s)

    # -- generation --------------------------------------------------------------------------------

    def first_token(self, seconds: float) -> None:
        """Count a generation's first token, ``seconds`` after its submit."""
        _check_amount("seconds", seconds)
        self._ttft.observe(seconds)
        self._generated.inc()

    def next_token(self, seconds: float) -> None:
        """Count a later token of a generation, ``seconds`` after its previous one."""
        _check_amount("seconds", seconds)
        self._itl.observe(seconds)
        self._generated.inc()

    def set_sequences(self, running: int, waiting: int, kv_bytes: int) -> None:
        """The generations running and waiting now, and the bytes their KV cache holds."""
        for name, value in (("running", running), ("waiting", waiting), ("kv_bytes", kv_bytes)):
            _check_amount(name, value)
        self._sequences_by_state["running"].set(running)
        self._sequences_by_state["waiting"].set(waiting)
        self._kv_bytes.set(kv_bytes)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(registry={self._registry!r})"


def _children(metric: _M, values: Sequence[str]) -> dict[str, _M]:
    """Create the child of a one-label metric for every value now, so each reads 0 before use."""
    return {value: metric.labels(value) for value in values}


def _child(children: Mapping[str, _M], label: str, value: str) -> _M:
    child = children.get(value)
    if child is None:
        raise ValueError(f"`{label}` must be one of {', '.join(children)}, got {value!r}")
    return child


def _check_amount(name: str, value: float) -> None:
    # `not (0 <= value < inf)` is also true for NaN, which a comparison-based check would let through.
    if not 0 <= value < math.inf:
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value!r}")


def _register_all(registry: CollectorRegistry, metrics: Sequence[Any]) -> None:
    """Register every metric, or none: on a name clash, undo the registrations already made."""
    done: list[Any] = []
    try:
        for metric in metrics:
            registry.register(metric)
            done.append(metric)
    except ValueError as exc:
        for metric in done:
            registry.unregister(metric)
        raise ValueError(
            f"the registry already holds a metric named like one of RuntimeMetrics' ({exc}); "
            "give each runtime its own CollectorRegistry"
        ) from exc


class _FastCounter:
    """A counter with one bounded label, as a collector: for metrics updated on every request.

    A request updates four metrics, and through ``prometheus_client``'s objects that was a sizeable
    share of the runtime's host cost per request (benchmarks/notes_host.md). This counter is one
    dict update under a lock (thread-safe, label checked in the same step) and exposes the same
    samples, ``_created`` included.
    """

    def __init__(self, name: str, documentation: str, label: str, values: Sequence[str]) -> None:
        self._name = name
        self._documentation = documentation
        self._label = label
        self._counts = dict.fromkeys(values, 0.0)
        self._created = time.time()
        self._lock = threading.Lock()

    def check(self, value: str) -> None:
        if value not in self._counts:
            raise ValueError(f"`{self._label}` must be one of {', '.join(self._counts)}, got {value!r}")

    def inc(self, value: str) -> None:
        with self._lock:
            if value in self._counts:
                self._counts[value] += 1.0
                return
        self.check(value)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily(self._name, self._documentation, labels=[self._label])

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(self._name, self._documentation, labels=[self._label])
        with self._lock:
            counts = list(self._counts.items())
        for value, count in counts:
            family.add_metric([value], count, created=self._created)
        yield family


class _FastHistogram:
    """A histogram without labels, as a collector: ``observe`` is a bisection and two additions.

    The same buckets and samples as ``prometheus_client``'s Histogram (cumulative ``le`` buckets,
    ``+Inf``, ``_count``, ``_sum``) except ``_created``, at under half the cost of an observation
    (benchmarks/notes_host.md).
    """

    def __init__(self, name: str, documentation: str, buckets: Sequence[float]) -> None:
        self._name = name
        self._documentation = documentation
        self._bounds = tuple(float(b) for b in buckets)
        self._counts = [0] * (len(self._bounds) + 1)  # the last one is +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, amount: float) -> None:
        index = bisect.bisect_left(self._bounds, amount)  # the first bucket with amount <= le
        with self._lock:
            self._counts[index] += 1
            self._sum += amount

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self._name, self._documentation)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        buckets = []
        cumulative = 0
        for bound, count in zip((*self._bounds, math.inf), counts, strict=True):
            cumulative += count
            buckets.append((floatToGoString(bound), float(cumulative)))
        yield HistogramMetricFamily(self._name, self._documentation, buckets=buckets, sum_value=total)
