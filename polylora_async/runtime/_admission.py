"""Admission: one request's inputs checked and normalised against the model before it is queued.

Owns the input rules (names the model's forward takes, token inputs as int64 ``[L]``, one length
for the inputs and one for an encoder-decoder's decoder inputs, float dtypes, the vocabulary and
the position table), the cache of layouts already checked that makes the common case a dict lookup,
the batching group of a request's inputs, and the checks of ``submit``'s other arguments.
"""

from __future__ import annotations

import inspect
import math
import typing
from collections.abc import Mapping
from typing import Any

import torch

from .._config import check_adapter_id as _check_id
from .._errors import InputValidationError


class Admission:
    """The input rules of one model: the runtime holds one and calls :meth:`validate` per request."""

    def __init__(self, model: torch.nn.Module, max_batch_tokens: int) -> None:
        self._max_batch_tokens = max_batch_tokens
        # The input names the model's forward takes (None: it takes **kwargs, so any name).
        self._accepted = accepted_inputs(model)
        # Input layouts already checked, by name tuple: a cache for the fast path of validate, not
        # a rule. A request laid out otherwise takes the thorough path and is accepted if valid.
        # Per input: dtype, per-token shape, whether it is a token input (see TOKEN_INPUTS), and
        # which length it follows (0: the inputs', 1: the decoder inputs').
        self._layouts: dict[tuple[str, ...], tuple[tuple[_InputSpec, ...], object]] = {}
        # Token ids must index the model's embedding table: one id out of range would fail its
        # whole batch (and on CUDA an out-of-range gather is a device assert that ends the process's
        # CUDA context), so submit() refuses it up front.
        self._vocab_size = _vocab_size(model)
        # Likewise a row longer than the position table, or floats of another dtype than the
        # weights, fail in the model; refused at submit instead (see _check_length_fits, check_dtypes_fit).
        self._max_positions = _max_positions(model)
        self._float_dtype = _float_dtype(model)

    def _check_length_fits(self, length: int, decoder_length: int) -> None:
        """Refuse a row longer than the model's position table: it would fail its whole batch."""
        if self._max_positions is None:
            return
        for what, value in (("inputs have", length), ("decoder inputs have", decoder_length)):
            if value > self._max_positions:
                raise InputValidationError(
                    f"{what} length {value}, above the model's {self._max_positions} positions"
                )

    def check_dtypes_fit(self, inputs: Mapping[str, Any]) -> None:
        """Refuse float vectors of another dtype than the weights (checked before inputs are normalised)."""
        if self._float_dtype is None or not isinstance(inputs, Mapping):
            return
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                continue
            # Per-token vectors (embeddings) meet the weights directly; a float mask is converted.
            if value.is_floating_point() and value.dim() >= 2 and value.dtype != self._float_dtype:
                raise InputValidationError(
                    f"input {name!r} is {value.dtype}, but the model computes in {self._float_dtype}"
                )

    def validate(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, int, object]:
        """Normalised inputs, their length, the decoder inputs' length (0: none) and the batching group."""
        # Once per request on the event loop: the common case (a layout already seen: same names,
        # dtypes and per-token shapes, token inputs int64 [L], or a tokenizer's [1, L] / int32 of
        # them) is a dict lookup and a few comparisons per input; anything else takes the thorough
        # path, which normalises or names the problem.
        if type(inputs) is dict:
            cached = self._layouts.get(tuple(inputs))
            if cached is not None:
                specs, group = cached
                tensors: dict[str, torch.Tensor] = {}
                lengths = [-1, -1]  # inputs, decoder inputs
                for (name, value), (dtype, trailing, token, axis) in zip(inputs.items(), specs, strict=True):
                    if type(value) is not torch.Tensor:
                        break
                    shape = value.shape
                    if token and len(shape) == 2 and shape[0] == 1:
                        value = value[0]
                        shape = value.shape
                    if not shape or shape[1:] != trailing:
                        break
                    if value.dtype != dtype:
                        if not (token and value.dtype == torch.int32):
                            break
                        value = value.long()
                    if lengths[axis] < 0:
                        lengths[axis] = shape[0]
                    elif shape[0] != lengths[axis]:
                        break
                    tensors[name] = value
                else:
                    length, decoder_length = lengths[0], max(lengths[1], 0)
                    if 0 < length and decoder_length + length <= self._max_batch_tokens:
                        self._check_token_ids(tensors)
                        self._check_length_fits(length, decoder_length)
                        return tensors, length, decoder_length, group
        return self._validate_thoroughly(inputs)

    def _check_token_ids(self, inputs: Mapping[str, torch.Tensor]) -> None:
        if self._vocab_size is None:
            return
        for name in ("input_ids", "decoder_input_ids"):
            ids = inputs.get(name)
            if ids is None or ids.device.type != "cpu":  # a device tensor: no sync here
                continue
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= self._vocab_size:
                bad = int(low) if int(low) < 0 else int(high)
                raise InputValidationError(
                    f"input {name!r} holds token id {bad}, outside the model's vocabulary [0, {self._vocab_size})"
                )

    def _validate_thoroughly(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, int, object]:
        """Check and normalise one request's inputs against the model (not against other requests).

        Rules: every name must be a parameter of the model's forward (any name if it takes
        ``**kwargs``). Token-level integer inputs (ids, masks, token types, positions) are ``[L]``
        or ``[1, L]`` (what a tokenizer returns with ``return_tensors="pt"``) of any integer dtype
        (masks may be bool too) and become int64 ``[L]``; ``inputs_embeds`` is ``[L, H]`` or
        ``[1, L, H]``; other inputs are taken as given, ``[L, ...]``. All share the length ``L``,
        except an encoder-decoder's decoder inputs (names starting with ``decoder_``), which share
        a length of their own. There must be inputs other than decoder inputs.
        """
        if not isinstance(inputs, Mapping) or not inputs:
            raise InputValidationError("`inputs` must be a non-empty mapping of name -> tensor")
        tensors: dict[str, torch.Tensor] = {}
        lengths: dict[bool, tuple[str, int]] = {}  # decoder input? -> (first name, its length)
        for name, value in inputs.items():
            if not isinstance(value, torch.Tensor):
                raise InputValidationError(f"input {name!r} must be a tensor, got {type(value).__name__}")
            if self._accepted is not None and name not in self._accepted:
                raise InputValidationError(
                    f"input {name!r} is not an argument of the model's forward, which takes {sorted(self._accepted)}"
                )
            if value.dim() == 0:
                raise InputValidationError(f"input {name!r} must have a length dimension, got a scalar")
            if name in TOKEN_INPUTS:
                value = self._token_input(name, value)
            elif name == "inputs_embeds" and value.dim() == 3 and value.shape[0] == 1:
                value = value[0]
            decoder = is_decoder_input(name)
            first, length = lengths.setdefault(decoder, (name, value.shape[0]))
            if value.shape[0] != length:
                raise InputValidationError(
                    f"input {name!r} has length {value.shape[0]}, but input {first!r} has length {length}"
                    + (" (decoder inputs share one length of their own)" if decoder else "")
                )
            tensors[name] = value
        if False not in lengths:
            raise InputValidationError(
                f"inputs {sorted(tensors)} are all decoder inputs; the encoder's inputs (e.g. 'input_ids') are missing"
            )
        length = lengths[False][1]
        decoder_length = lengths[True][1] if True in lengths else 0
        if length == 0 or (True in lengths and decoder_length == 0):
            raise InputValidationError(f"inputs are empty (input {lengths[length > 0][0]!r} has length 0)")
        if length + decoder_length > self._max_batch_tokens:
            raise InputValidationError(
                f"inputs have {length + decoder_length} tokens, above `max_batch_tokens`={self._max_batch_tokens}"
            )
        self._check_token_ids(tensors)
        self._check_length_fits(length, decoder_length)
        specs = tuple(
            (t.dtype, tuple(t.shape[1:]), n in TOKEN_INPUTS, int(is_decoder_input(n))) for n, t in tensors.items()
        )
        group = input_group(tensors)
        if len(self._layouts) < _MAX_LAYOUTS:
            self._layouts[tuple(tensors)] = (specs, group)
        return tensors, length, decoder_length, group

    @staticmethod
    def _token_input(name: str, value: torch.Tensor) -> torch.Tensor:
        """An integer per-token input as int64 ``[L]``, from ``[L]`` or ``[1, L]``."""
        if value.dim() == 2 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 1:
            raise InputValidationError(
                f"input {name!r} must have shape [L] or [1, L], got {list(value.shape)} "
                f"(per-token shape {list(value.shape[1:])})"
            )
        if value.is_floating_point() or value.is_complex() or (value.dtype == torch.bool and name.endswith("_ids")):
            raise InputValidationError(f"input {name!r} must be an integer tensor, got {value.dtype}")
        return value if value.dtype == torch.int64 else value.long()


def check_timeout(timeout: object) -> None:
    if timeout is None:
        return
    if (
        not isinstance(timeout, (int, float))
        or isinstance(timeout, bool)
        or not math.isfinite(timeout)
        or timeout <= 0
    ):
        raise InputValidationError(f"`timeout` must be a positive finite number of seconds or None, got {timeout!r}")


def check_adapter_id(adapter: object, name: str) -> None:
    """A request's or a management call's adapter id (``__base__`` allowed): InputValidationError if bad."""
    _check_id(adapter, name, allow_base=True, error=InputValidationError)


def check_input_names(inputs: object) -> None:
    if isinstance(inputs, Mapping):
        for name in inputs:
            if not isinstance(name, str):
                raise InputValidationError(f"input names must be strings, got {name!r}")


def _max_positions(model: torch.nn.Module) -> int | None:
    """Positions the model's position embeddings hold (Hugging Face config fields), if known."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _vocab_size(model: torch.nn.Module) -> int | None:
    """Rows of the model's input embedding table (Hugging Face's ``get_input_embeddings``), if it has one."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return embeddings.num_embeddings if isinstance(embeddings, torch.nn.Embedding) else None


# Token-level integer inputs: [L] per request (a tokenizer's [1, L] squeezed), normalised to int64.
TOKEN_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask"}
)
_InputSpec = tuple[torch.dtype, tuple[int, ...], bool, int]  # see Admission._layouts
_MAX_LAYOUTS = 64  # distinct input layouts remembered for the fast path; more still work, slower


def accepted_inputs(model: torch.nn.Module) -> frozenset[str] | None:
    """Names the model's forward takes as keywords, or None when it takes any (or is opaque).

    ``**kwargs`` accepts any name, unless it is typed ``Unpack[SomeTypedDict]`` (as Hugging Face
    models type theirs): then it takes that dict's keys.
    """
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    names = {p.name for p in params if p.kind in kinds}
    for param in params:
        if param.kind is inspect.Parameter.VAR_KEYWORD:
            annotation = param.annotation
            if typing.get_origin(annotation) is not typing.Unpack:
                return None
            (typed,) = typing.get_args(annotation)
            required = getattr(typed, "__required_keys__", None)
            optional = getattr(typed, "__optional_keys__", None)
            if not isinstance(required, frozenset) or not isinstance(optional, frozenset):
                return None  # not a TypedDict: take any name
            names |= required | optional
    return frozenset(names)


def is_decoder_input(name: str) -> bool:
    """An encoder-decoder's decoder input (``decoder_input_ids``, ``decoder_attention_mask``, ...): own length."""
    return name.startswith("decoder_")


def input_group(tensors: Mapping[str, torch.Tensor]) -> object:
    """Requests with equal groups batch together: the same input names, dtypes and per-token shapes.

    ``attention_mask`` is left out: a request without one gets an all-ones mask in a batch with
    requests that have one (see _collate), which is what the model does for it alone. Any other
    input present on some requests and absent on others keeps them in separate batches: padding
    cannot stand in for an input the model would otherwise default.
    """
    return tuple(
        sorted((n, str(t.dtype), tuple(t.shape[1:])) for n, t in tensors.items() if n != "attention_mask")
    )
