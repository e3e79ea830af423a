"""The worker: runs batches in its thread and gives each request its row of the output.

Owns the two threads (the worker thread launches forwards, the completion thread waits for the
device and slices rows), collation with right padding, the output-layout probe, splitting the
output into rows, and isolation re-runs of a failed batch. Padding values and the pad-id check
at start are here too: collation is what pads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import BatchFailedError, ConfigError, WorkerCrashedError
from .._metrics import RuntimeMetrics
from .._model import MultiLoraModel
from ..store import BatchLease
from ._admission import WHOLE, InputGroup, input_axis, is_decoder_input, reads_last_token
from ._scheduler import row_widths
from ._types import OutputSelector, Request, RuntimeConfig

_log = logging.getLogger("polylora_async")


@dataclass
class Batch:
    """Requests run as one forward: their slots, padded widths and the lease that holds the slots."""

    requests: list[Request]
    slots: list[int]
    width: int
    lease: BatchLease
    decoder_width: int = 0  # the decoder inputs' padded length
    # Set by the worker: where each row's slice of the output ends (see OutputLayout).
    layout: OutputLayout | None = None
    head_widths: dict[str, list[int]] = field(default_factory=dict)


@dataclass(frozen=True)
class OutputLayout:
    """Which axes of the selected output a row's slice is cut along, learnt from the model.

    ``sequence_axes`` follow the padded length (cut to the row's length), ``decoder_axes`` the
    decoder inputs' padded length (an encoder-decoder's per-token outputs); ``head_axes`` map a
    wrapped head whose width varies per adapter to the axis that follows its width (cut to the
    row's head width). Axes are of the whole batch output (axis 0 = rows).
    """

    sequence_axes: tuple[int, ...]
    head_axes: dict[str, int] = field(default_factory=dict)
    decoder_axes: tuple[int, ...] = ()  # follow the decoder inputs' padded length


class Worker:
    """Runs batches: collate, launch the forward (worker thread), wait and slice rows (completion thread).

    Args:
        model: the wrapped model.
        config: padding and where results go (``pad_values``, ``attention_mask``, ``results_on_cpu``).
        select_output: picks the per-row tensor from the model's output.
        metrics: counts isolated failures.
        max_width: the positions the model can use; no batch is padded past them.
    """

    def __init__(
        self,
        model: MultiLoraModel,
        config: RuntimeConfig,
        select_output: OutputSelector,
        metrics: RuntimeMetrics,
        *,
        max_width: int | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.max_width = max_width
        self._metrics = metrics
        # Token ids are padded with the model's own pad id: a decoder classifier finds each row's
        # last real token by looking for it, so padding with another id would move that token.
        self._pad_values = {**_default_pad_values(model.model), **config.pad_values}
        _check_pad_id(model.model)
        self._select = select_output
        self._add_mask = config.attention_mask
        if self._add_mask is None:
            params = inspect.signature(model.model.forward).parameters
            self._add_mask = "attention_mask" in params
        self._output_layouts: dict[object, OutputLayout] = {}  # worker thread only
        self._probe_failed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._completer: concurrent.futures.ThreadPoolExecutor | None = None
        self._copy_out: Any = None  # CUDA stream for output copies to the host (worker thread only)
        self.isolated_failures = 0

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polylora-gpu")
        self._completer = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="polylora-done")

    def close(self) -> None:
        """Wait for both threads to finish their work and end."""
        for pool in (self._executor, self._completer):
            if pool is not None:
                pool.shutdown(wait=True)

    async def run(self, function: Callable[..., Any], *args: Any) -> Any:
        """``function(*args)`` in the worker thread, after the batches handed to it before."""
        assert self._loop is not None and self._executor is not None
        return await self._loop.run_in_executor(self._executor, function, *args)

    async def launch(self, batch: Batch) -> tuple[str, Any, Any]:
        """Run ``batch`` in the worker thread: ``(outcome, payload, computed)`` as :meth:`_execute` says.

        A failure of one batch's rows is isolated here (outcome ``"isolated"``: every request resolved);
        a failure of the device itself is raised.
        """
        assert self._loop is not None and self._executor is not None
        outcome, payload, done_event = await self._loop.run_in_executor(self._executor, self._execute, batch)
        if outcome == "error" and is_device_error(payload):
            raise payload  # the device is broken: every later batch would fail too
        if outcome == "error" and len(batch.requests) > 1:
            await self._isolate(batch, payload)  # the slots are still leased for the re-runs
            outcome, payload = "isolated", None
        return outcome, payload, done_event

    async def complete(self, batch: Batch, pending: tuple[torch.Tensor, Any]) -> tuple[str, Any]:
        """Wait for a launched batch (outcome ``"pending"``) in the completion thread and slice its rows."""
        assert self._loop is not None and self._completer is not None
        return await self._loop.run_in_executor(self._completer, self._complete, batch, pending)

    async def _isolate(self, batch: Batch, exc: BaseException) -> None:
        """Re-run a failed batch in halves until each failure is one request's own.

        A failure that depends on the rows (one bad request) then fails only that request, with
        the cause; the others get their results. The lease is still held, so the slots are the
        batch's. ``log2(rows)`` rounds of forwards at most, run only after a failure.
        """
        assert self._loop is not None and self._executor is not None and self._completer is not None
        live = [i for i, r in enumerate(batch.requests) if not r.future.done()]
        if not live:
            return
        if len(live) == 1 or len(batch.requests) == 1:
            request = batch.requests[live[0]]
            error = BatchFailedError(f"this request failed alone when its batch was re-run: {exc!r}")
            error.__cause__ = exc
            request.future.set_exception(error)
            self.isolated_failures += 1
            self._metrics.isolated_failure()
            return
        half = len(live) // 2
        for part in (live[:half], live[half:]):
            requests = [batch.requests[i] for i in part]
            sub = Batch(
                requests=requests,
                slots=[batch.slots[i] for i in part],
                width=max(row_widths(r, self.config, self.max_width)[0] for r in requests),
                lease=batch.lease,
                decoder_width=max(row_widths(r, self.config, self.max_width)[1] for r in requests),
            )
            outcome, payload, _computed = await self._loop.run_in_executor(self._executor, self._execute, sub)
            if outcome == "pending":
                outcome, payload = await self._loop.run_in_executor(self._completer, self._complete, sub, payload)
            if outcome == "ok":
                set_results(requests, payload)
            elif is_device_error(payload):
                raise payload
            else:
                await self._isolate(sub, payload)

    def _execute(self, batch: Batch) -> tuple[str, Any, Any]:
        """Runs in the worker thread: collate, order after slot copies, launch the forward.

        On CUDA it returns as soon as the forward and the copy of its output into pinned host
        memory are queued ("pending"), so this thread can launch the next batch while the device
        works; :meth:`_complete` waits for the device in another thread. On the CPU the forward is
        already done and the rows are sliced here.

        Returns ``(outcome, payload, computed)``: ``computed`` is recorded on the compute stream
        right after the forward (the batch's slots may be rewritten after it), the payload's event
        after the output's copy to the host, which runs on a stream of its own: on the compute
        stream it would hold the next batch's forward back for the whole copy (32 MiB, a
        32 x 256 x 2048 bf16 output, is over 1 ms at PCIe speeds, against a ~24 ms forward).
        """
        inputs = self._collate(batch)
        batch.lease.wait_copies()
        try:
            with torch.inference_mode():
                batch.head_widths = self.model.head_widths(batch.slots) if self.model.head_names else {}
                outputs = self.model.forward_slots(batch.slots, **inputs)
                selected = self._select(outputs)
                _check_rows(selected, batch)
                batch.layout = self._layout(batch, selected)
                if not selected.is_cuda:
                    return "ok", self._split_rows(selected, batch), None
                computed = torch.cuda.Event()
                computed.record()
                if not self.config.results_on_cpu:
                    return "pending", (selected, computed), computed
                stream = self._output_stream(selected.device)
                host = torch.empty(selected.shape, dtype=selected.dtype, pin_memory=True)
                with torch.cuda.stream(stream):
                    stream.wait_event(computed)
                    host.copy_(selected, non_blocking=True)
                    # `selected` belongs to the compute stream's memory pool: without this, the
                    # next batch could be given its memory while the copy still reads it.
                    selected.record_stream(stream)
                    copied = torch.cuda.Event()
                    copied.record(stream)
                return "pending", (host, copied), computed
        except Exception as exc:  # the model or the output hook failed: this batch only
            return "error", exc, None

    def _layout(self, batch: Batch, selected: torch.Tensor) -> OutputLayout:
        """The output layout for this batch's input names (probed once per set of names and heads).

        Which output axes follow the sequence cannot be read off one batch: a hidden size or a
        label count may equal the padded width by coincidence. So one row runs alone, base model,
        at two lengths: an axis whose size is that length both times follows the sequence. A head
        whose width varies per adapter is found the same way, with the head made one column wider
        (:meth:`MultiLoraModel.head_width_probe`). If probing fails, the batch keeps the old rule
        (axis 1 is cut when its size is the padded width) and a warning is logged once.
        """
        names = tuple(batch.requests[0].inputs)
        key = (names, tuple(sorted(batch.head_widths)))
        layout = self._output_layouts.get(key)
        if layout is not None:
            return layout
        try:
            layout = self._probe_layout(batch)
        except Exception as exc:  # the batch itself ran: keep its rows, cut along axis 1 if it is the width
            if not self._probe_failed:
                self._probe_failed = True
                _log.warning("output layout probe failed (%r); axis 1 is cut if it has the padded width", exc)
            return OutputLayout((1,) if selected.dim() >= 2 and selected.shape[1] == batch.width else ())
        self._output_layouts[key] = layout
        return layout

    def _probe_layout(self, batch: Batch) -> OutputLayout:
        # Two lengths of the first request's own tokens (no padding: a model may treat padding
        # specially): its first n positions, and those plus the n-th once more; decoder inputs,
        # if any, are lengthened separately (m and m + 1), so either length can be told apart.
        first = batch.requests[0]
        if isinstance(first.group, InputGroup) and first.group.unpadded:  # nothing padded, nothing to cut
            return OutputLayout((), self._probe_heads(batch, first, self._probe_shape(first, batch.lease)))
        n, m = min(first.length, 8), min(first.decoder_length, 8)

        def probe(extra: int, decoder_extra: int) -> Request:
            inputs = {}
            for name, value in first.inputs.items():
                if input_axis(name, self.config.per_token_inputs) == WHOLE:  # no length to change
                    inputs[name] = value
                    continue
                keep, more = (m, decoder_extra) if is_decoder_input(name) else (n, extra)
                inputs[name] = torch.cat([value[:keep], value[keep - 1 : keep].expand(more, *value.shape[1:])])
            return dataclasses.replace(first, inputs=inputs, length=n + extra, decoder_length=m + decoder_extra)

        short = probe(0, 0)
        shape = self._probe_shape(short, batch.lease)

        sequence_axes = _grown(shape, self._probe_shape(probe(1, 0), batch.lease), n) if n else ()
        decoder_axes = _grown(shape, self._probe_shape(probe(0, 1), batch.lease), m) if m else ()
        return OutputLayout(sequence_axes, self._probe_heads(batch, short, shape), decoder_axes)

    def _probe_heads(self, batch: Batch, probe: Request, shape: tuple[int, ...]) -> dict[str, int]:
        """Wrapped heads whose width varies per adapter -> the output axis that follows that width."""
        head_axes: dict[str, int] = {}
        for name in sorted(batch.head_widths):
            with self.model.head_width_probe(name):
                grown = _grown(shape, self._probe_shape(probe, batch.lease), None)
            if len(grown) == 1:
                head_axes[name] = grown[0]
        return head_axes

    def _probe_shape(self, request: Request, lease: BatchLease) -> tuple[int, ...]:
        probe = Batch(
            requests=[request], slots=[0], width=request.length, lease=lease, decoder_width=request.decoder_length
        )
        selected = self._select(self.model.forward_slots([0], **self._collate(probe)))
        return tuple(selected.shape)

    def _output_stream(self, device: torch.device) -> Any:
        """The worker's stream for copying outputs to the host (created on first use)."""
        if self._copy_out is None:
            self._copy_out = torch.cuda.Stream(device)
        return self._copy_out

    def _complete(self, batch: Batch, pending: tuple[torch.Tensor, Any]) -> tuple[str, Any]:
        """Runs in the completion thread: wait for the batch's device work, then slice rows."""
        selected, done = pending
        try:
            done.synchronize()
            with torch.inference_mode():
                return "ok", self._split_rows(selected, batch)
        except Exception as exc:  # a device error surfaced by the wait: this batch only
            return "error", exc

    def _collate(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Right-pad every input into one ``[rows, width, ...]`` tensor (pinned on CUDA), then upload.

        Token-level inputs (``[L]``: ids, masks, positions) take a constant number of torch calls
        whatever the row count: one boolean mask of the real tokens places all rows at once
        (row-major order of the mask = the rows concatenated). Copying row by row cost ~26 us per
        row on a 2-core development CPU, and this runs in the worker thread, whose Python time the
        event loop waits for. Inputs with per-token vectors (``[L, ...]``, e.g. embeddings) are
        copied row by row: there the bytes dominate, and the one-call path copies them twice.
        """
        device = self.model.device
        requests = batch.requests
        rows, width = len(requests), batch.width
        pin = device.type == "cuda"
        real = _token_mask([r.length for r in requests], width)
        if batch.decoder_width:  # an encoder-decoder's decoder inputs: padded along their own length
            decoder_real = _token_mask([r.decoder_length for r in requests], batch.decoder_width)
        out: dict[str, torch.Tensor] = {}
        # Requests of one batch have the same inputs (see _input_group), except that some may
        # lack an attention mask: those rows get ones over their real tokens below.
        masked = [r for r in requests if "attention_mask" in r.inputs]
        if masked and len(masked) < rows:
            for request in requests:
                if "attention_mask" not in request.inputs:
                    request.inputs["attention_mask"] = torch.ones(request.length, dtype=torch.long)
        for name, sample in (masked[0] if masked else requests[0]).inputs.items():
            if input_axis(name, self.config.per_token_inputs) == WHOLE:  # one shape per batch: stacked
                whole = torch.empty((rows, *sample.shape), dtype=sample.dtype, pin_memory=pin)
                torch.stack([_on_cpu(r.inputs[name]) for r in requests], out=whole)
                out[name] = whole.to(device, non_blocking=True)
                continue
            decoder = is_decoder_input(name)
            padded = torch.full(
                (rows, batch.decoder_width if decoder else width, *sample.shape[1:]),
                self._pad_values.get(name, 0),
                dtype=sample.dtype,
                pin_memory=pin,
            )
            if sample.dim() == 1:
                padded[decoder_real if decoder else real] = torch.cat([_on_cpu(r.inputs[name]) for r in requests])
            else:
                for row, request in zip(padded.unbind(0), requests, strict=True):
                    row[: request.decoder_length if decoder else request.length] = request.inputs[name]
            out[name] = padded.to(device, non_blocking=True)
        if self._add_mask and width and "attention_mask" not in out:
            mask = torch.empty(rows, width, dtype=torch.long, pin_memory=pin)
            mask.copy_(real)  # pinned: the upload below is queued, not waited for
            out["attention_mask"] = mask.to(device, non_blocking=True)
        return out

    def _split_rows(self, selected: torch.Tensor, batch: Batch) -> list[torch.Tensor]:
        """Each request's slice of the batch output, in its own storage (no row keeps the batch alive).

        One copy per row, straight from the batch output: gathering the real tokens first and then
        cloning each row (fewer calls) copies everything twice, which cost 4x more for a
        32 x 256 x 2048 bf16 output on the development CPU.
        """
        if self.config.results_on_cpu and selected.device.type != "cpu":
            selected = selected.to("cpu")
        rows = selected.unbind(0)
        layout = batch.layout
        if layout is None or not (layout.sequence_axes or layout.head_axes or layout.decoder_axes):  # one per row
            return [row.clone() for row in rows]
        if layout.sequence_axes == (1,) and not (layout.head_axes or layout.decoder_axes):  # [rows, length, ...]
            return [row[: r.length].clone() for row, r in zip(rows, batch.requests, strict=True)]
        out = []
        for i, (row, request) in enumerate(zip(rows, batch.requests, strict=True)):
            for axis in layout.sequence_axes:
                row = row.narrow(axis - 1, 0, request.length)
            for axis in layout.decoder_axes:
                row = row.narrow(axis - 1, 0, request.decoder_length)
            for name, axis in layout.head_axes.items():
                row = row.narrow(axis - 1, 0, batch.head_widths[name][i])
            out.append(row.clone())
        return out


def _grown(shape: tuple[int, ...], other: tuple[int, ...], size: int | None) -> tuple[int, ...]:
    """The axes one longer in ``other`` than in ``shape`` (and of size ``size`` in ``shape``, if given)."""
    if len(other) != len(shape):
        return ()
    return tuple(a for a in range(1, len(shape)) if other[a] == shape[a] + 1 and (size is None or shape[a] == size))


def set_results(requests: list[Request], rows: list[Any]) -> None:
    for request, row in zip(requests, rows, strict=True):
        if not request.future.done():  # a cancelled caller's result is discarded
            request.future.set_result(row)


def is_device_error(exc: BaseException) -> bool:
    """A failure of the accelerator itself (not of one batch's data): re-running cannot isolate it."""
    accelerator_error = getattr(torch, "AcceleratorError", None)
    if accelerator_error is not None and isinstance(exc, accelerator_error):
        return True
    if type(exc).__module__.startswith("torch.cuda"):
        return True
    return "CUDA error" in str(exc) or "CUDA-capable device" in str(exc)


def crash_error(exc: BaseException) -> WorkerCrashedError:
    error = WorkerCrashedError(f"the runtime's worker failed: {exc!r}")
    error.__cause__ = exc
    return error


def _check_rows(selected: torch.Tensor, batch: Batch) -> None:
    if selected.dim() == 0 or selected.shape[0] != len(batch.requests):
        raise TypeError(
            f"the selected output has shape {tuple(selected.shape)}; its first dimension must be the "
            f"batch's {len(batch.requests)} rows"
        )


def _token_mask(lengths: list[int], width: int) -> torch.Tensor:
    """``[rows, width]`` bool on the CPU: True where a row (of length ``lengths[row]``) has a real token."""
    return torch.arange(width) < torch.tensor(lengths)[:, None]


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    return tensor if tensor.device.type == "cpu" else tensor.cpu()


def _default_pad_values(model: torch.nn.Module) -> dict[str, int]:
    """``input_ids`` (and ``decoder_input_ids``) padded with ``config.pad_token_id`` when the model has one."""
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    if isinstance(pad, int) and not isinstance(pad, bool) and pad >= 0:
        return {"input_ids": pad, "decoder_input_ids": pad}
    return {}


def _check_pad_id(model: torch.nn.Module) -> None:
    """Refuse a decoder classifier without ``config.pad_token_id``: it cannot batch rows of two lengths.

    Such a model (see :func:`reads_last_token`) reads each row at its last token that is not the
    pad id, and transformers refuses its batches of more than one row without one.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "pad_token_id", 0) is not None or not reads_last_token(model):
        return
    raise ConfigError(
        f"{type(model).__name__} needs `config.pad_token_id` to batch rows of different lengths (it reads "
        "each row at its last token that is not the pad id), and its config has none: set "
        "`model.config.pad_token_id` before wrapping, e.g. to the tokenizer's pad id, or to its eos id "
        "as is usual for Llama-style models"
    )
