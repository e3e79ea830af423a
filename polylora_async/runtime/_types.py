"""The runtime's configuration, its statistics snapshot, stream results and the queued request.

Plain data shared by every part of the runtime: the facade, admission, the scheduler and the worker.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .._config import check_int, check_seconds
from .._errors import ConfigError
from ..store import AdapterRef, StoreStatistics

OutputSelector = Callable[[Any], torch.Tensor]


def default_select_output(outputs: Any) -> torch.Tensor:
    """``last_hidden_state`` if the model returns one, else ``logits``, else the output tensor."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    for name in ("last_hidden_state", "logits"):
        value = getattr(outputs, name, None)
        if value is None and isinstance(outputs, Mapping):
            value = outputs.get(name)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    raise TypeError(f"cannot pick a tensor from a {type(outputs).__name__}; pass `select_output`")


@dataclass(frozen=True)
class RuntimeConfig:
    """How the runtime batches and bounds work.

    Args:
        max_batch_size: rows per batch.
        max_batch_tokens: padded tokens per batch (rows x longest row).
        max_wait: seconds the oldest queued request may wait for its batch to fill.
        max_queue: requests waiting at most; ``submit`` then waits for room, ``submit_nowait``
            raises :class:`OverloadedError` (backpressure).
        starvation_limit: batches that may pass over a request (its adapter is cold or rare)
            before the scheduler waits for that adapter instead of forming other batches.
        length_bucketing: batch requests of similar length together (lengths within a factor of
            two of the oldest request's) to waste less compute on padding.
        lookahead: queued requests whose adapters are prefetched ahead of batch formation.
        max_inflight_batches: batches handed to the worker at once (2: the next batch is launched
            while the device still runs the current one). A second batch is only formed when the
            queue can fill it; otherwise the queue keeps filling until the running batch completes.
        pad_to_multiple: batches are padded to a length that is a multiple of this (16: fewer
            distinct shapes for the model's kernels, at most 15 padding tokens per row).
        pad_values: padding value per input name (default: the model's ``config.pad_token_id`` for
            ``input_ids`` and ``decoder_input_ids``, 0 for everything else).
        per_token_inputs: names of inputs, besides the token inputs and ``inputs_embeds``, that
            are per-token (``[L, ...]``) and padded along ``L`` (with ``pad_values``, default 0).
            Every other input is taken whole: never padded, and batched only with requests whose
            input of that name has the same shape.
        attention_mask: add an ``attention_mask`` input when requests carry none; ``None``
            means "if the model's forward accepts one".
        results_on_cpu: copy each row's result to CPU memory (in the worker thread).
        shutdown: what ``aclose()`` does with queued requests: ``"drain"`` serves them,
            ``"cancel"`` fails them with :class:`RuntimeClosedError`.
        prefetch: load adapters for queued requests in the background while other batches run.
            ``False`` loads an adapter only when its request is the oldest one waiting, holding
            back batch formation meanwhile (what a server without a prefetcher does; kept for
            comparison in benchmarks).
        max_sequences: generations running at once (rows of the decode batch).
        kv_cache_bytes: KV memory the running generations may hold at most, padding included;
            ``None``: bounded by ``max_sequences`` only. Admission reserves each sequence's
            whole remaining length, so an admitted generation always finishes.
    """

    max_batch_size: int = 32
    max_batch_tokens: int = 16384
    max_wait: float = 0.002
    max_queue: int = 4096
    starvation_limit: int = 8
    length_bucketing: bool = False
    lookahead: int = 256
    max_inflight_batches: int = 2
    pad_to_multiple: int = 16
    pad_values: Mapping[str, int | float] = field(default_factory=dict)
    attention_mask: bool | None = None
    results_on_cpu: bool = True
    shutdown: Literal["drain", "cancel"] = "drain"
    prefetch: bool = True
    per_token_inputs: Collection[str] = ()
    max_sequences: int = 64
    kv_cache_bytes: int | None = None

    def __post_init__(self) -> None:
        for name in (
            "max_batch_size",
            "max_batch_tokens",
            "max_queue",
            "lookahead",
            "max_inflight_batches",
            "pad_to_multiple",
            "max_sequences",
        ):
            check_int(name, getattr(self, name), 1)
        check_int("starvation_limit", self.starvation_limit, 0)
        check_int("kv_cache_bytes", self.kv_cache_bytes, 1, optional=True)
        check_seconds("max_wait", self.max_wait)
        if self.shutdown not in ("drain", "cancel"):
            raise ConfigError(f"`shutdown` must be 'drain' or 'cancel', got {self.shutdown!r}")
        names = self.per_token_inputs
        if isinstance(names, str) or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"`per_token_inputs` must be a list of input names, got {names!r}")
        object.__setattr__(self, "per_token_inputs", frozenset(names))


@dataclass(frozen=True)
class RuntimeStatistics:
    """A snapshot of what the runtime has done (see :meth:`Runtime.statistics`)."""

    submitted: int
    completed: int
    failed: int
    cancelled: int
    timed_out: int
    rejected: int
    queued: int
    batches: int
    mixed_batches: int
    max_adapters_in_batch: int
    rows: int
    padded_tokens: int
    real_tokens: int
    split_batches: int
    store: StoreStatistics
    isolated_failures: int = 0
    generated_tokens: int = 0
    generation_steps: int = 0
    generations_running: int = 0
    generations_waiting: int = 0


@dataclass(frozen=True)
class StreamResult:
    """One completed request of :meth:`Runtime.stream`: ``error`` is set when it failed."""

    key: Any
    value: Any = None
    error: BaseException | None = None


@dataclass(eq=False)
class Request:
    """One queued request: its normalised inputs, adapter, future and scheduling state."""

    seq: int
    inputs: dict[str, torch.Tensor]
    length: int  # of the (encoder) inputs
    ref: AdapterRef | None  # None: base model
    future: asyncio.Future[Any]
    submitted: float
    key: object = None  # the adapter version's key (None: base model)
    group: object = None  # requests batch together only with the same group (see input_group)
    passed_over: int = 0
    dispatched: float | None = None  # when it was placed in a batch
    decoder_length: int = 0  # of an encoder-decoder model's decoder inputs (0: none given)
