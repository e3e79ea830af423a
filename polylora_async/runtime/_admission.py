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
from collections.abc import Collection, Mapping
from typing import Any, NamedTuple

import torch

from .._config import check_adapter_id as _check_id
from .._errors import InputValidationError


class Admission:
    """The input rules of one model: the runtime holds one and calls :meth:`validate` per request."""

    def __init__(self, model: torch.nn.Module, max_batch_tokens: int, per_token_inputs: Collection[str] = ()) -> None:
        self._max_batch_tokens = max_batch_tokens
        self._per_token = frozenset(per_token_inputs)
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
        table = _input_embeddings(model)
        self._vocab_size = None if table is None else table.num_embeddings
        # Likewise a row longer than the position table, token types or positions past their
        # tables, embeddings of another width or floats of another dtype than the weights fail in
        # the model; refused at submit instead (see _check_length_fits, _check_ranges, check_dtypes_fit).
        self.max_positions = max_positions(model)
        self._ranges = {name: size for name, size in _index_ranges(model, self._vocab_size).items() if size}
        self._embedding_width = None if table is None else table.embedding_dim
        self._float_dtype = _float_dtype(model)
        # A decoder classifier finds each row's last real token from `input_ids`; given embeddings
        # alone it reads the last position, which padding may occupy.
        self._reads_last_token = reads_last_token(model)

    def _check_length_fits(self, length: int, decoder_length: int) -> None:
        """Refuse a row longer than the model's position table: it would fail its whole batch."""
        if self.max_positions is None:
            return
        for what, value in (("inputs have", length), ("decoder inputs have", decoder_length)):
            if value > self.max_positions:
                raise InputValidationError(
                    f"{what} length {value}, above the model's {self.max_positions} positions"
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
                lengths = [-1, -1, 0]  # inputs, decoder inputs, (whole inputs: no length)
                for (name, value), (dtype, trailing, token, axis) in zip(inputs.items(), specs, strict=True):
                    if type(value) is not torch.Tensor:
                        break
                    shape = value.shape
                    if token and len(shape) == 2 and shape[0] == 1:
                        value = value[0]
                        shape = value.shape
                    if axis == WHOLE:
                        if shape != trailing:
                            break
                    elif not shape or shape[1:] != trailing:
                        break
                    if value.dtype != dtype:
                        if not (token and value.dtype == torch.int32):
                            break
                        value = value.long()
                    if axis == WHOLE:
                        pass
                    elif lengths[axis] < 0:
                        lengths[axis] = shape[0]
                    elif shape[0] != lengths[axis]:
                        break
                    tensors[name] = value
                else:
                    length, decoder_length = max(lengths[0], 0), max(lengths[1], 0)
                    if (length or lengths[0] < 0) and decoder_length + length <= self._max_batch_tokens:
                        self._check_ranges(tensors)
                        self._check_length_fits(length, decoder_length)
                        return tensors, length, decoder_length, group
        return self._validate_thoroughly(inputs)

    def _check_ranges(self, inputs: Mapping[str, torch.Tensor]) -> None:
        """Ids that index an embedding table must be inside it (token ids, token types, positions)."""
        for name, size in self._ranges.items():
            ids = inputs.get(name)
            if ids is None or ids.device.type != "cpu":  # a device tensor: no sync here
                continue
            low, high = torch.aminmax(ids)
            if int(low) < 0 or int(high) >= size:
                bad = int(low) if int(low) < 0 else int(high)
                table = "vocabulary" if name.endswith("input_ids") else f"{_TABLE_NAMES[name]} table"
                what = "token id" if table == "vocabulary" else "id"
                raise InputValidationError(
                    f"input {name!r} holds {what} {bad}, outside the model's {table} [0, {size})"
                )

    def _validate_thoroughly(
        self, inputs: Mapping[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], int, int, object]:
        """Check and normalise one request's inputs against the model (not against other requests).

        Rules: every name must be a parameter of the model's forward (any name if it takes
        ``**kwargs``). Token-level integer inputs (ids, masks, token types, positions) are ``[L]``
        or ``[1, L]`` (what a tokenizer returns with ``return_tensors="pt"``) of any integer dtype
        (masks may be bool too) and become int64 ``[L]``; ``inputs_embeds`` is ``[L, H]`` or
        ``[1, L, H]``. All share the length ``L``, except an encoder-decoder's decoder inputs
        (names starting with ``decoder_``), which share a length of their own. Any other input
        (``pixel_values``, ``input_values``, ...) is one row's tensor as the model takes it, minus
        the batch axis: it has no length, is never padded, and a request batches only with
        requests whose such inputs have the same shapes. There must be inputs other than decoder
        inputs.
        """
        if not isinstance(inputs, Mapping) or not inputs:
            raise InputValidationError("`inputs` must be a non-empty mapping of name -> tensor")
        tensors: dict[str, torch.Tensor] = {}
        lengths: dict[bool, tuple[str, int]] = {}  # decoder input? -> (first name, its length)
        whole = False
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
            elif name in EMBEDDING_INPUTS:
                value = self._embedding_input(name, value)
            elif name not in self._per_token:
                tensors[name] = value
                whole = True
                continue
            decoder = is_decoder_input(name)
            first, length = lengths.setdefault(decoder, (name, value.shape[0]))
            if value.shape[0] != length:
                raise InputValidationError(
                    f"input {name!r} has length {value.shape[0]}, but input {first!r} has length {length}"
                    + (" (decoder inputs share one length of their own)" if decoder else "")
                )
            tensors[name] = value
        if False not in lengths and not whole:
            raise InputValidationError(
                f"inputs {sorted(tensors)} are all decoder inputs; the encoder's inputs (e.g. 'input_ids') are missing"
            )
        length = lengths[False][1] if False in lengths else 0
        decoder_length = lengths[True][1] if True in lengths else 0
        if (False in lengths and length == 0) or (True in lengths and decoder_length == 0):
            raise InputValidationError(f"inputs are empty (input {lengths[length > 0][0]!r} has length 0)")
        self._check_combination(tensors)
        if length + decoder_length > self._max_batch_tokens:
            raise InputValidationError(
                f"inputs have {length + decoder_length} tokens, above `max_batch_tokens`={self._max_batch_tokens}"
            )
        self._check_ranges(tensors)
        self._check_length_fits(length, decoder_length)
        specs = tuple(_spec(n, t, self._per_token) for n, t in tensors.items())
        group = input_group(tensors, self._per_token, (length, decoder_length))
        if len(self._layouts) < _MAX_LAYOUTS and not group.unpadded:  # an unpadded group holds the lengths
            self._layouts[tuple(tensors)] = (specs, group)
        return tensors, length, decoder_length, group

    def _embedding_input(self, name: str, value: torch.Tensor) -> torch.Tensor:
        """``inputs_embeds`` as ``[L, H]``, from ``[L, H]`` or ``[1, L, H]``, ``H`` the model's width."""
        if value.dim() == 3 and value.shape[0] == 1:
            value = value[0]
        if value.dim() != 2 or (self._embedding_width is not None and value.shape[1] != self._embedding_width):
            width = "H" if self._embedding_width is None else str(self._embedding_width)
            raise InputValidationError(
                f"input {name!r} must have shape [L, {width}] or [1, L, {width}], got {list(value.shape)}"
            )
        return value

    def _check_combination(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for ids, embeds in (("input_ids", "inputs_embeds"), ("decoder_input_ids", "decoder_inputs_embeds")):
            if ids in tensors and embeds in tensors:
                raise InputValidationError(f"inputs {ids!r} and {embeds!r} are given together; the model takes one")
        if self._reads_last_token and "inputs_embeds" in tensors:
            raise InputValidationError(
                "this model reads each row at its last token that is not the pad id, which it finds from "
                "'input_ids'; with 'inputs_embeds' alone it would read a padding position: pass 'input_ids'"
            )

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


def max_positions(model: torch.nn.Module) -> int | None:
    """Positions a row may use (Hugging Face config fields), if known.

    RoBERTa-style models number positions from ``padding_idx + 1``: their position table (an
    embedding with a ``padding_idx``) holds that many fewer usable positions than its size.
    """
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            table = _table(model, "position_embeddings")
            if table is not None and table.padding_idx is not None:
                value = min(value, table.num_embeddings - table.padding_idx - 1)
            return value
    return None


def _table(model: torch.nn.Module, name: str) -> torch.nn.Embedding | None:
    """The model's embedding module called ``name`` (the first, outermost), if any."""
    for path, module in model.named_modules():
        if path.rsplit(".", 1)[-1] == name and isinstance(module, torch.nn.Embedding):
            return module
    return None


# Ids that index an embedding table, and what the table is called in messages.
_TABLE_NAMES = {"token_type_ids": "token type", "position_ids": "position"}


def _index_ranges(model: torch.nn.Module, vocab_size: int | None) -> dict[str, int | None]:
    """Input name -> the size of the table its ids index (None: unknown, not checked).

    Positions are checked only against a learned position table (rotary models take any).
    """
    types = _table(model, "token_type_embeddings")
    positions = _table(model, "position_embeddings")
    return {
        "input_ids": vocab_size,
        "decoder_input_ids": vocab_size,
        "token_type_ids": None if types is None else types.num_embeddings,
        "position_ids": None if positions is None else positions.num_embeddings,
    }


def reads_last_token(model: torch.nn.Module) -> bool:
    """A decoder classifier: it reads each row at its last token that is not ``config.pad_token_id``.

    ``LlamaForSequenceClassification``, ``GPT2ForSequenceClassification`` and their kin; their
    ``forward`` reads the config's pad id, which is how they are recognised (encoder classifiers
    pool a fixed position and do not).
    """
    if not type(model).__name__.endswith("ForSequenceClassification"):
        return False
    try:
        return "pad_token_id" in inspect.getsource(type(model).forward)
    except (OSError, TypeError):
        return False


def _float_dtype(model: torch.nn.Module) -> torch.dtype | None:
    for param in model.parameters():
        if param.is_floating_point():
            return param.dtype
    return None


def _input_embeddings(model: torch.nn.Module) -> torch.nn.Embedding | None:
    """The model's input embedding table (Hugging Face's ``get_input_embeddings``), if it has one."""
    getter = getattr(model, "get_input_embeddings", None)
    try:
        embeddings = getter() if callable(getter) else None
    except (NotImplementedError, AttributeError):
        return None
    return embeddings if isinstance(embeddings, torch.nn.Embedding) else None


# Token-level integer inputs: [L] per request (a tokenizer's [1, L] squeezed), normalised to int64.
TOKEN_INPUTS = frozenset(
    {"input_ids", "attention_mask", "token_type_ids", "position_ids", "decoder_input_ids", "decoder_attention_mask"}
)
# Per-token vectors: [L, H] per request (or [1, L, H]), padded along L like the token inputs.
EMBEDDING_INPUTS = frozenset({"inputs_embeds", "decoder_inputs_embeds"})
# Which length an input follows (see Admission._layouts): the inputs', the decoder inputs', none.
SEQUENCE, DECODER, WHOLE = 0, 1, 2
_InputSpec = tuple[torch.dtype, tuple[int, ...], bool, int]  # see Admission._layouts


def input_axis(name: str, per_token: Collection[str] = ()) -> int:
    """SEQUENCE, DECODER or WHOLE: which length input ``name`` follows (``per_token``: more per-token names)."""
    if name not in TOKEN_INPUTS and name not in EMBEDDING_INPUTS and name not in per_token:
        return WHOLE
    return DECODER if is_decoder_input(name) else SEQUENCE


def _spec(name: str, tensor: torch.Tensor, per_token: Collection[str] = ()) -> _InputSpec:
    """What the fast path compares: dtype, the per-token shape (whole inputs: the shape), token input?, axis."""
    axis = input_axis(name, per_token)
    shape = tuple(tensor.shape) if axis == WHOLE else tuple(tensor.shape[1:])
    return tensor.dtype, shape, name in TOKEN_INPUTS, axis
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


class InputGroup(NamedTuple):
    """Requests with equal groups batch together (see :func:`input_group`)."""

    key: tuple[Any, ...]
    unpadded: bool  # the batch is not padded: its requests have the same lengths too


def input_group(
    tensors: Mapping[str, torch.Tensor], per_token: Collection[str] = (), lengths: tuple[int, int] = (0, 0)
) -> InputGroup:
    """Requests batch together when they have the same input names, dtypes and per-token shapes.

    Inputs without a length (``pixel_values``, ...) are compared whole: they are never padded.
    A request that has such an input besides token inputs batches only with requests of the
    same lengths, unpadded: the runtime cannot know whether that input follows the tokens (a
    per-token input the config does not name in ``per_token_inputs``) or not (an image).
    ``attention_mask`` is left out: a request without one gets an all-ones mask in a batch with
    requests that have one (see _collate), which is what the model does for it alone. Any other
    input present on some requests and absent on others keeps them in separate batches: padding
    cannot stand in for an input the model would otherwise default.
    """
    specs = {n: _spec(n, t, per_token) for n, t in tensors.items() if n != "attention_mask"}
    key = tuple(sorted((n, str(spec[0]), spec[1]) for n, spec in specs.items()))
    unpadded = any(s[3] == WHOLE for s in specs.values()) and any(s[3] != WHOLE for s in specs.values())
    return InputGroup((*key, lengths) if unpadded else key, unpadded)
