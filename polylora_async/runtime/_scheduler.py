"""Batch formation: which queued requests form the next batch, as a pure function of the queue.

No model, no store, no threads, no clock: the caller passes the queue in arrival order, the
config, which adapters are ready and how many slots are free; it gets a :class:`BatchPlan` and
applies it (leases the plan's adapters, takes its requests out of the queue, counts the passes).
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import NamedTuple

from ..store import AdapterRef
from ._admission import InputGroup
from ._types import Request, RuntimeConfig


class BatchPlan(NamedTuple):
    """The next batch: its requests (oldest first), their distinct adapters and padded widths."""

    requests: list[Request]
    refs: list[AdapterRef]  # the distinct adapters of `requests`, in order of first use (to lease)
    width: int  # the inputs' padded length
    decoder_width: int  # the decoder inputs' padded length (0: none)
    passed_over: list[Request]  # skipped ahead of a chosen request: each one's `passed_over` rises


def padded_width(length: int, config: RuntimeConfig, max_width: int | None = None) -> int:
    """``length`` rounded up to ``pad_to_multiple``, at most ``max_batch_tokens`` and ``max_width``.

    ``max_width`` is the positions the model can use: padding past them would fail the batch
    (rows themselves are refused at submit if longer).
    """
    width = min(-(-length // config.pad_to_multiple) * config.pad_to_multiple, config.max_batch_tokens)
    return width if max_width is None else max(length, min(width, max_width))


def row_widths(request: Request, config: RuntimeConfig, max_width: int | None = None) -> tuple[int, int]:
    """The widths ``request`` needs: its lengths padded (:func:`padded_width`), or as they are if unpadded."""
    if isinstance(request.group, InputGroup) and request.group.unpadded:
        return request.length, request.decoder_length
    return padded_width(request.length, config, max_width), padded_width(request.decoder_length, config, max_width)


def form_batch(
    pending: Collection[Request],
    config: RuntimeConfig,
    is_ready: Callable[[AdapterRef], bool],
    slots_free: int,
    max_width: int | None = None,
) -> BatchPlan | None:
    """Oldest first: ready requests, bounded by rows, padded tokens and distinct adapters.

    Args:
        pending: the queued requests in arrival order (not empty).
        config: the bounds (``max_batch_size``, ``max_batch_tokens``, ``starvation_limit``,
            ``length_bucketing``) and the padding rule (``pad_to_multiple``).
        is_ready: whether an adapter can run now (base rows always can and need no slot).
        slots_free: distinct adapters one batch may hold.
        max_width: the model's usable positions, which padding must not exceed (None: no limit).

    Returns:
        The plan, or None when no request can run now or the oldest one has been passed over
        ``starvation_limit`` times and is not ready (the caller then waits for its adapter).
    """
    cfg = config
    oldest = next(iter(pending))
    if oldest.passed_over >= cfg.starvation_limit and not (oldest.ref is None or is_ready(oldest.ref)):
        return None  # wait for the starving request's adapter rather than pass it over again
    chosen: list[Request] = []
    keys: dict[object, AdapterRef] = {}
    width = decoder_width = 0
    anchor = None
    skipped: list[Request] = []
    for request in pending:
        if len(chosen) >= cfg.max_batch_size:
            break
        if request.future.done():
            continue
        if chosen and request.group != chosen[0].group:
            continue  # other input names or layouts: a batch of their own
        if not (request.ref is None or is_ready(request.ref)) or (
            request.key is not None and request.key not in keys and len(keys) >= slots_free
        ):
            skipped.append(request)
            continue
        if cfg.length_bucketing:
            anchor = anchor or request.length
            if not anchor / 2 < request.length <= anchor * 2:
                continue
        row, decoder_row = row_widths(request, cfg, max_width)
        new_width, new_decoder_width = max(width, row), max(decoder_width, decoder_row)
        if (new_width + new_decoder_width) * (len(chosen) + 1) > cfg.max_batch_tokens:
            continue
        chosen.append(request)
        width, decoder_width = new_width, new_decoder_width
        if request.ref is not None:
            keys.setdefault(request.key, request.ref)
    if not chosen:
        return None
    last = chosen[-1].seq
    return BatchPlan(chosen, list(keys.values()), width, decoder_width, [r for r in skipped if r.seq < last])
