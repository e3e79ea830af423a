"""Token generation for the runtime: sampling parameters, the running batch and its KV cache.

The running batch holds every sequence being generated, one row each, over ONE Hugging Face
``DynamicCache``. Rows are left-padded to a common width: each row's real tokens end at the last
column, so a decode step appends one column for all rows at once, and the attention mask and
explicit position ids make every row compute what it would alone (the standard way transformers
batches prompts of different lengths). Sequences join between steps (their prompts are
prefilled together, in one mixed-adapter forward, then merged in: the narrower side is
left-padded) and leave at any step (their rows are dropped at once, and columns that only
padding still uses are trimmed). Every row names its own adapter slot, so each step is one
forward pass over any mix of adapters and base rows.

Everything here but :class:`SamplingParams` runs in the runtime's worker thread.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .._errors import InputValidationError
from .._model import MultiLoraModel


@dataclass(frozen=True)
class SamplingParams:
    """How one sequence picks its tokens, and when it stops.

    Args:
        max_new_tokens: tokens to generate at most (>= 1).
        do_sample: sample from the (filtered) distribution; ``False``: greedy (the argmax).
        temperature: logits are divided by it before sampling (> 0).
        top_k: keep only the ``top_k`` most likely tokens (None: all).
        top_p: keep the smallest set of most likely tokens whose probability reaches ``top_p``
            (0 < top_p <= 1; None: all).
        eos_token_ids: generating any of these ends the sequence (the token is yielded).
        seed: seeds this sequence's own random generator, so what it samples does not depend on
            what else runs in its batch; None: a random seed.
    """

    max_new_tokens: int
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    eos_token_ids: frozenset[int] = frozenset()
    seed: int | None = None

    def __post_init__(self) -> None:
        def bad(name: str, rule: str) -> InputValidationError:
            return InputValidationError(f"`{name}` must be {rule}, got {getattr(self, name)!r}")

        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise bad("max_new_tokens", "an integer >= 1")
        if not isinstance(self.do_sample, bool):
            raise bad("do_sample", "True or False")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
            raise bad("temperature", "a finite number > 0")
        if self.top_k is not None and (not _is_int(self.top_k) or self.top_k < 1):
            raise bad("top_k", "an integer >= 1 or None")
        p = self.top_p
        if p is not None and (isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1):
            raise bad("top_p", "a number in (0, 1] or None")
        if not all(_is_int(i) and i >= 0 for i in self.eos_token_ids):
            raise bad("eos_token_ids", "token ids (integers >= 0)")
        if self.seed is not None and not _is_int(self.seed):
            raise bad("seed", "an integer or None")

    @classmethod
    def build(cls, generation_config: Any = None, **arguments: Any) -> SamplingParams:
        """From keyword arguments, over the fields of a ``transformers.GenerationConfig`` if given.

        ``eos_token_id`` may be one id, a list of ids or None (the config's, if any). Keyword
        arguments that are None leave the config's value.
        """
        values: dict[str, Any] = {}
        if generation_config is not None:
            for name in ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "eos_token_id"):
                value = getattr(generation_config, name, None)
                if value is not None:
                    values[name] = value
            if values.get("top_k") == 0:  # transformers' "no top-k filtering"
                values["top_k"] = None
        values.update({k: v for k, v in arguments.items() if v is not None})
        eos = values.pop("eos_token_id", None)
        if eos is None:
            ids: frozenset[int] = frozenset()
        elif isinstance(eos, int) and not isinstance(eos, bool):
            ids = frozenset((eos,))
        elif isinstance(eos, Iterable) and not isinstance(eos, (str, bytes)):
            ids = frozenset(eos)
        else:
            raise InputValidationError(f"`eos_token_id` must be a token id, a list of them or None, got {eos!r}")
        if "max_new_tokens" not in values:
            raise InputValidationError("`max_new_tokens` is required (here or in the GenerationConfig)")
        unknown = set(values) - {f for f in cls.__dataclass_fields__ if f != "eos_token_ids"}
        if unknown:
            raise InputValidationError(f"unknown generation arguments {sorted(unknown)}")
        return cls(eos_token_ids=ids, **values)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.top_k == 1


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(eq=False)
class GenSequence:
    """One sequence in the worker's view: its prompt, slot, sampling state and progress."""

    prompt: torch.Tensor  # int64 [P], on the CPU
    slot: int
    params: SamplingParams
    generator: torch.Generator | None = None  # created on the model's device at admission
    length: int = 0  # real tokens in the cache (prompt + generated, the last generated one not yet)
    generated: int = 0
    last_token: int = -1
    finished: bool = False
    tokens: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class StepResult:
    """What one step produced: the new token of every sequence that got one, and which finished."""

    tokens: list[tuple[GenSequence, int]]
    finished: list[GenSequence]


class RunningBatch:
    """The sequences being generated and their KV cache (worker thread only).

    A step (:meth:`step`) drops the sequences the caller gave up on, decodes one token for every
    running sequence, then prefills the admitted ones and merges them in. Rows are left-padded:
    ``mask`` is ``[rows, width]`` with ones where a row has a real token.
    """

    def __init__(self, model: MultiLoraModel, pad_token_id: int) -> None:
        self.model = model
        self.pad_token_id = pad_token_id
        self.rows: list[GenSequence] = []
        self.cache: Any = None  # transformers.DynamicCache over len(rows) rows, or None when empty
        self.mask: torch.Tensor | None = None
        self.bytes_per_token = 0  # KV bytes one token of one row takes (known after the first prefill)
        params = inspect.signature(model.model.forward).parameters
        # transformers renamed `past_key_values` to `cache` (5.2x); either is passed by name.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        # Prefill computes the logits of each row's last position only, where the model allows it.
        self._logits_to_keep = "logits_to_keep" in params
        self._last_cache: Any = None

    @property
    def width(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[1])

    @property
    def kv_bytes(self) -> int:
        """KV memory the cache holds now: rows x width tokens (padding included)."""
        return len(self.rows) * self.width * self.bytes_per_token

    def step(self, admit: Sequence[GenSequence], drop: Iterable[GenSequence]) -> StepResult:
        self._drop(set(drop))
        tokens: list[tuple[GenSequence, int]] = []
        if self.rows:
            tokens += self._decode()
        if admit:
            tokens += self._prefill(list(admit))
        finished = [s for s, _ in tokens if s.finished]
        if finished:
            self._drop(set(finished))
        return StepResult(tokens, finished)

    # -- the forward passes -----------------------------------------------------------------------

    def _forward(self, slots: list[int], **inputs: Any) -> torch.Tensor:
        if self._logits_to_keep:
            inputs["logits_to_keep"] = 1
        cache = inputs.pop("cache")
        with torch.inference_mode():
            out = self.model.forward_slots(slots, use_cache=True, **{self._cache_arg: cache}, **inputs)
        self._last_cache = getattr(out, self._cache_arg)
        return out.logits[:, -1]

    def _decode(self) -> list[tuple[GenSequence, int]]:
        assert self.mask is not None
        device = self.model.device
        rows = self.rows
        ids = torch.tensor([[s.last_token] for s in rows], device=device)
        positions = torch.tensor([[s.length] for s in rows], device=device)
        mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=1)
        logits = self._forward(
            [s.slot for s in rows], input_ids=ids, attention_mask=mask, position_ids=positions, cache=self.cache
        )
        self.cache, self.mask = self._last_cache, mask
        for s in rows:
            s.length += 1
        return self._take(rows, logits)

    def _prefill(self, seqs: list[GenSequence]) -> list[tuple[GenSequence, int]]:
        from transformers import DynamicCache

        device = self.model.device
        width = max(len(s.prompt) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, width - len(s.prompt) :] = s.prompt
            mask[row, width - len(s.prompt) :] = 1
            s.length = len(s.prompt)
            if s.generator is None:
                s.generator = torch.Generator(device)
                if s.params.seed is None:
                    s.generator.seed()
                else:
                    s.generator.manual_seed(s.params.seed)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(1) - 1).clamp_min(0)
        logits = self._forward(
            [s.slot for s in seqs], input_ids=ids, attention_mask=mask, position_ids=positions, cache=DynamicCache()
        )
        cache = self._last_cache
        if not self.bytes_per_token:
            self.bytes_per_token = sum(t.numel() * t.element_size() for t in _cache_tensors(cache)) // (
                len(seqs) * width
            )
        self._merge(seqs, cache, mask)
        return self._take(seqs, logits)

    def _take(self, seqs: list[GenSequence], logits: torch.Tensor) -> list[tuple[GenSequence, int]]:
        chosen = sample(logits, [s.params for s in seqs], [s.generator for s in seqs]).tolist()
        out = []
        for s, token in zip(seqs, chosen, strict=True):
            s.last_token = token
            s.generated += 1
            s.tokens.append(token)
            s.finished = token in s.params.eos_token_ids or s.generated >= s.params.max_new_tokens
            out.append((s, token))
        return out

    # -- rows joining and leaving -------------------------------------------------------------------

    def _merge(self, seqs: list[GenSequence], cache: Any, mask: torch.Tensor) -> None:
        if not self.rows:
            self.rows, self.cache, self.mask = list(seqs), cache, mask
            return
        assert self.mask is not None
        width = max(self.width, int(mask.shape[1]))
        old = [_left_pad(t, width) for t in _cache_tensors(self.cache)]
        new = [_left_pad(t, width) for t in _cache_tensors(cache)]
        merged = [torch.cat([a, b]) for a, b in zip(old, new, strict=True)]
        self.cache = _build_cache(merged)
        self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
        self.rows += seqs

    def _drop(self, gone: set[GenSequence]) -> None:
        gone &= set(self.rows)
        if not gone:
            return
        keep = [i for i, s in enumerate(self.rows) if s not in gone]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = None
            return
        assert self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Columns no remaining row uses (the left padding of the longest rows that left) go too.
        start = int((mask.sum(0) == 0).long().cumprod(0).sum())
        tensors = [t.index_select(0, index)[:, :, start:] for t in _cache_tensors(self.cache)]
        self.cache = _build_cache(tensors)
        self.mask = mask[:, start:]


def sample(logits: torch.Tensor, params: Sequence[SamplingParams], generators: Sequence[Any]) -> torch.Tensor:
    """One token per row of ``logits`` (``[rows, vocab]``): greedy rows take the argmax, others sample.

    Sampling follows transformers' order: temperature, then top-k, then top-p (the smallest set of
    most likely tokens whose probability reaches ``top_p``, at least one), then one draw from the
    rest with the row's own generator, so a row's draw does not depend on its neighbours.
    """
    chosen = logits.argmax(dim=-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled:
        return chosen
    for i in sampled:
        probs = filtered_probs(logits[i], params[i])
        chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution one row samples from (``[vocab]``, fp32): temperature, top-k, top-p applied."""
    scores = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, -math.inf)
    if params.top_p is not None and params.top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        cumulative = ordered.softmax(-1).cumsum(-1)
        # Drop a token when the ones before it already reach top_p (the first one always stays).
        drop = (cumulative - ordered.softmax(-1)) >= params.top_p
        scores = scores.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), -math.inf)
    return scores.softmax(-1)


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every layer's keys and values, in order ``[k0, v0, k1, v1, ...]`` (each ``[rows, heads, T, d]``)."""
    out = []
    for layer in cache.layers:
        out += [layer.keys, layer.values]
    return out


def _build_cache(tensors: list[torch.Tensor]) -> Any:
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=list(zip(tensors[::2], tensors[1::2], strict=True)))


def _left_pad(tensor: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``tensor`` with zeros prepended along ``dim`` up to ``width``."""
    missing = width - tensor.shape[dim]
    if missing <= 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
