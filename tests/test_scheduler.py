"""Batch formation (polylora_async/runtime/_scheduler.py) from plain requests: no model, no store, no threads."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterable
from typing import Any

from polylora_async.runtime._scheduler import BatchPlan, form_batch, padded_width
from polylora_async.runtime._types import Request, RuntimeConfig


def _request(
    seq: int,
    length: int = 4,
    adapter: str | None = None,
    *,
    decoder_length: int = 0,
    group: object = "ids",
    passed_over: int = 0,
    done: bool = False,
) -> Request:
    # An adapter is named by a string here: the function only compares refs and keys and asks
    # `is_ready` about refs, so any hashable stands in for the store's AdapterRef.
    future: Any = concurrent.futures.Future()
    if done:
        future.set_result(None)
    return Request(
        seq=seq,
        inputs={},
        length=length,
        ref=adapter,  # type: ignore[arg-type]
        future=future,
        submitted=0.0,
        key=adapter,
        group=group,
        passed_over=passed_over,
        decoder_length=decoder_length,
    )


def _queue(*specs: tuple[int, str | None] | int) -> list[Request]:
    """Requests in arrival order from ``length`` or ``(length, adapter)`` items."""
    out = []
    for seq, spec in enumerate(specs):
        length, adapter = spec if isinstance(spec, tuple) else (spec, None)
        out.append(_request(seq, length, adapter))
    return out


def _plan(
    pending: list[Request], ready: Iterable[str] = (), slots: int = 8, **config: Any
) -> BatchPlan | None:
    ready_set = set(ready)
    return form_batch(pending, RuntimeConfig(**config), lambda ref: ref in ready_set, slots)


def _seqs(requests: Iterable[Request]) -> list[int]:
    return [r.seq for r in requests]


def test_oldest_first_and_widths_padded_to_the_multiple() -> None:
    pending = _queue(3, 5, 1, 2)
    plan = _plan(pending)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 1, 2, 3]
    assert (plan.width, plan.decoder_width) == (16, 0)  # pad_to_multiple=16 by default
    assert plan.refs == [] and plan.passed_over == []


def test_padded_width_rounds_up_and_is_capped_by_max_batch_tokens() -> None:
    config = RuntimeConfig(pad_to_multiple=16, max_batch_tokens=40)
    assert [padded_width(n, config) for n in (0, 1, 16, 17, 33, 100)] == [0, 16, 16, 32, 40, 40]


def test_row_bound() -> None:
    plan = _plan(_queue(*[2] * 10), max_batch_size=3)
    assert plan is not None and _seqs(plan.requests) == [0, 1, 2]


def test_token_bound_counts_rows_times_the_padded_width() -> None:
    # 4 -> 4 x 1; 4 -> 4 x 2 = 8; 5 would make 5 x 3 = 15 > 12; 2 keeps the width: 4 x 3 = 12.
    plan = _plan(_queue(4, 4, 5, 2), pad_to_multiple=1, max_batch_tokens=12)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 1, 3]
    assert plan.width == 4
    # With padding to 16: 16, then 32 x 2 = 64; a third row would be 32 x 3 = 96 > 64.
    plan = _plan(_queue(3, 17, 1), pad_to_multiple=16, max_batch_tokens=64)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 1]
    assert plan.width == 32


def test_token_bound_adds_the_decoder_width_of_encoder_decoder_requests() -> None:
    pending = [
        _request(0, 4, decoder_length=4),  # (4 + 4) x 1 = 8
        _request(1, 2, decoder_length=6),  # (4 + 6) x 2 = 20
        _request(2, 4, decoder_length=1),  # (4 + 6) x 3 = 30 > 20 (4 x 3 = 12 alone would fit)
        _request(3, 1, decoder_length=6),  # also 30
    ]
    plan = _plan(pending, pad_to_multiple=1, max_batch_tokens=20)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 1]
    assert (plan.width, plan.decoder_width) == (4, 6)


def test_slot_bound_holds_distinct_adapters_and_base_rows_need_no_slot() -> None:
    pending = _queue((4, "a"), (4, "b"), (4, "c"), (4, "a"), (4, None), (4, "c"))
    plan = _plan(pending, ready={"a", "b", "c"}, slots=2)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 1, 3, 4]
    assert plan.refs == ["a", "b"]  # distinct, in order of first use
    assert _seqs(plan.passed_over) == [2]  # the second "c" came after the last chosen request
    # No slot at all: only base rows run.
    plan = _plan(_queue((4, "a"), (4, None), (4, "a"), (4, None)), ready={"a"}, slots=0)
    assert plan is not None
    assert _seqs(plan.requests) == [1, 3]
    assert plan.refs == []
    assert _seqs(plan.passed_over) == [0, 2]


def test_requests_of_another_input_group_are_not_mixed_in() -> None:
    pending = [_request(0, group="ids"), _request(1, group="embeds"), _request(2, group="ids")]
    plan = _plan(pending)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 2]
    assert plan.passed_over == []  # another group is not passed over: it forms a batch of its own
    plan = _plan(pending[1:])
    assert plan is not None and _seqs(plan.requests) == [1]


def test_requests_whose_adapter_is_not_ready_are_passed_over_only_if_a_later_one_runs() -> None:
    pending = _queue((4, "a"), (4, None), (4, "a"), (4, "b"), (4, "a"))
    plan = _plan(pending, ready={"b"})
    assert plan is not None
    assert _seqs(plan.requests) == [1, 3]
    assert plan.refs == ["b"]
    assert _seqs(plan.passed_over) == [0, 2]  # request 4 waits behind the last chosen one: not passed over
    assert [r.passed_over for r in pending] == [0] * 5  # the caller applies the plan
    assert _plan(_queue((4, "a"), (4, "a")), ready=()) is None  # nothing can run


def test_starvation_bound_stops_batch_formation_for_the_oldest_request() -> None:
    def pending(passed: int) -> list[Request]:
        return [_request(0, 4, "cold", passed_over=passed), *(_request(i, 4) for i in range(1, 4))]

    plan = _plan(pending(2), starvation_limit=3)
    assert plan is not None
    assert _seqs(plan.requests) == [1, 2, 3]
    assert _seqs(plan.passed_over) == [0]
    assert _plan(pending(3), starvation_limit=3) is None  # wait for "cold" instead
    plan = _plan(pending(3), ready={"cold"}, starvation_limit=3)  # once it is ready it runs first
    assert plan is not None and _seqs(plan.requests) == [0, 1, 2, 3]
    assert _plan(pending(0), starvation_limit=0) is None


def test_starvation_bound_counts_batches_that_passed_the_request_over() -> None:
    # Applying each plan as the dispatcher does: exactly `starvation_limit` batches go ahead.
    queue = [_request(0, 4, "cold"), *(_request(i, 4) for i in range(1, 20))]
    batches = 0
    while (plan := _plan(queue, max_batch_size=2, starvation_limit=4)) is not None:
        for request in plan.passed_over:
            request.passed_over += 1
        queue = [r for r in queue if r not in plan.requests]
        batches += 1
    assert batches == 4
    assert queue[0].seq == 0 and queue[0].passed_over == 4


def test_length_bucketing_keeps_lengths_within_a_factor_of_two_of_the_first_chosen() -> None:
    pending = _queue(8, 3, 4, 16, 17, 5)
    plan = _plan(pending, pad_to_multiple=1, length_bucketing=True)
    assert plan is not None
    assert _seqs(plan.requests) == [0, 3, 5]  # 4 < length <= 16
    assert plan.width == 16
    assert plan.passed_over == []
    # The anchor is the first request that can run, not the oldest one.
    pending = [_request(0, 100, "cold"), _request(1, 8), _request(2, 3), _request(3, 16)]
    plan = _plan(pending, pad_to_multiple=1, length_bucketing=True)
    assert plan is not None
    assert _seqs(plan.requests) == [1, 3]
    plan = _plan(pending, pad_to_multiple=1, length_bucketing=False)
    assert plan is not None and _seqs(plan.requests) == [1, 2, 3]


def test_requests_whose_future_is_done_are_skipped() -> None:
    pending = [_request(0, done=True), _request(1), _request(2, 4, "a", done=True), _request(3)]
    plan = _plan(pending)
    assert plan is not None
    assert _seqs(plan.requests) == [1, 3]
    assert plan.refs == [] and plan.passed_over == []
