"""The adapter catalog: which adapters exist, in which version, and where their weights come from.

Identity only. The catalog hands out immutable :class:`AdapterRef` objects (adapter id + version +
source); it never reads, validates or places tensors itself (that is the store's job). The store
gives it a ``check`` that refuses a source at registration when its config or tensor metadata
already show it cannot serve (:func:`.adapters.check_source`), so a bad adapter never becomes a
version. Versions make
replacement safe: registering an id again creates a new version, requests that hold a ref to the
old one keep it (and its weights) until they release it, and new resolutions get the new one.

A version is *alive* while it is the current version of its id or while a resolved ref to it has
not been released. When a version dies the catalog calls ``on_version_dead(ref)`` once, so the store
can drop its placements.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ._config import BASE_ADAPTER, check_adapter_id
from ._errors import AdapterLoadError, AdapterNotFoundError, PolyLoraError, StoreClosedError
from ._single_flight import SharedCall, SingleFlight
from .adapters import AdapterWeights, RawAdapter, raw_from_peft_model, raw_from_state_dict

AdapterKey = tuple[str, int]
"""``(adapter_id, version)``: what every tier keys its placements by."""

SourceCheck = Callable[[str, Path | RawAdapter | AdapterWeights], None]
"""``check(adapter_id, source)``: raises when a normalized source must not be registered."""

Resolver = Callable[[str], Awaitable[Any]]
"""``async def resolver(adapter_id) -> source | None``: finds adapters nobody registered up front.

A source is anything :meth:`AdapterCatalog.register` accepts; ``None`` means "no such adapter".
"""

SourceKind = Literal["directory", "memory", "base"]
Origin = Literal["registered", "resolved", "base"]


class _SourceHolder:
    """The one mutable part behind a ref: an in-memory source is dropped once the store owns a copy."""

    __slots__ = ("source",)

    def __init__(self, source: Path | RawAdapter | AdapterWeights | None) -> None:
        self.source = source


@dataclass(frozen=True)
class AdapterRef:
    """One version of one adapter: what a request holds from submission until it completes.

    Two refs are equal when they name the same version. Refs are cheap; the weights live in the
    store's tiers, keyed by :attr:`key`.

    Attributes:
        adapter_id: the id the adapter is served under.
        version: increases every time the id is registered (never reused, even after
            unregistering); 0 only for the base model's ref.
        kind: ``"directory"`` (a PEFT directory on disk), ``"memory"`` (a PeftModel snapshot, a
            state dict, a :class:`RawAdapter` or :class:`AdapterWeights`), or ``"base"``.
        origin: ``"registered"`` up front, ``"resolved"`` by the catalog's resolver, or ``"base"``.
    """

    adapter_id: str
    version: int
    kind: SourceKind
    origin: Origin
    _holder: _SourceHolder = field(repr=False, compare=False, hash=False)

    @property
    def key(self) -> AdapterKey:
        """``(adapter_id, version)``."""
        return (self.adapter_id, self.version)

    @property
    def source(self) -> Path | RawAdapter | AdapterWeights | None:
        """Where the weights come from: a directory ``Path``, a :class:`RawAdapter` or :class:`AdapterWeights`.

        ``None`` for the base ref, and for an in-memory source after the store took over its copy
        (an in-memory source is read once; the store then keeps the validated weights in its CPU
        tier, or spilled to its disk cache).
        """
        return self._holder.source

    @property
    def is_base(self) -> bool:
        return self.kind == "base"


BASE_REF = AdapterRef(BASE_ADAPTER, 0, "base", "base", _SourceHolder(None))
"""The ref of the base model (:data:`BASE_ADAPTER`): always ready, always slot 0, never released."""


def normalize_source(
    adapter_id: str, source: Any, peft_adapter_name: str | None = None
) -> tuple[SourceKind, Path | RawAdapter | AdapterWeights]:
    """Turn a user's source into what a ref holds: a directory path, or tensors in host memory.

    A ``peft.PeftModel`` is snapshotted now (its adapter's tensors copied to host memory), so later
    training of that model does not change this version and the catalog does not keep the model
    alive. A ``(state_dict, config)`` tuple and a :class:`RawAdapter` are kept as given: don't
    modify their tensors in place after registering them (register again instead).

    Raises:
        TypeError: an unsupported source type, or ``peft_adapter_name`` with a non-PeftModel source.
        ValueError: an empty path.
        AdapterFormatError: the PeftModel has no adapter of that name, or the config is unusable.
    """
    if peft_adapter_name is not None and not hasattr(source, "peft_config"):
        raise TypeError(
            f"adapter {adapter_id!r}: `peft_adapter_name` applies only to a PeftModel source, "
            f"got {type(source).__name__}"
        )
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if not text:
            raise ValueError(f"adapter {adapter_id!r}: the source path is empty")
        return "directory", Path(text).expanduser().absolute()
    if isinstance(source, (RawAdapter, AdapterWeights)):
        return "memory", source
    if isinstance(source, tuple) and len(source) == 2 and isinstance(source[0], Mapping):
        return "memory", raw_from_state_dict(source[0], source[1], origin=f"state dict of adapter {adapter_id!r}")
    if hasattr(source, "peft_config"):
        return "memory", raw_from_peft_model(adapter_id, source, peft_adapter_name)
    raise TypeError(
        f"adapter {adapter_id!r}: unsupported source {type(source).__name__}; expected a PEFT directory, "
        "a PeftModel, a (state_dict, config) tuple, a RawAdapter or AdapterWeights"
    )


class AdapterCatalog:
    """Adapter id -> current :class:`AdapterRef`, plus the reference counts that keep old versions alive.

    Must be used from one event loop thread (``register``/``unregister`` may also be called before
    the loop runs).

    Args:
        resolver: optional ``async def resolver(adapter_id) -> source | None`` asked for ids that
            are not registered; concurrent resolutions of one id share one call. A ``None`` result
            means the id is unknown. Resolved adapters stay registered (their origin is
            ``"resolved"``) until unregistered.
        on_version_dead: called (synchronously, on the loop) with each version that stops being
            alive: no longer current and no longer referenced.
        check: called with every normalized source before it becomes a version, registered or
            resolved; what it raises propagates (from :meth:`register`, or to the callers of
            :meth:`resolve` waiting for that id) and nothing is registered. It may read files: for
            a resolver's answer it runs in a worker thread.
    """

    def __init__(
        self,
        resolver: Resolver | None = None,
        *,
        on_version_dead: Callable[[AdapterRef], None] | None = None,
        check: SourceCheck | None = None,
    ) -> None:
        self._resolver = resolver
        self._on_version_dead = on_version_dead
        self._check = check
        self._current: dict[str, AdapterRef] = {}
        self._live: dict[AdapterKey, AdapterRef] = {}
        self._refcounts: dict[AdapterKey, int] = {}
        self._last_version: dict[str, int] = {}
        self._resolving: SingleFlight[str, SharedCall] = SingleFlight(SharedCall, cancelled=_resolution_cancelled)
        self._closed = False

    # -- registration -------------------------------------------------------------------------------

    def register(
        self,
        adapter_id: str,
        source: Any,
        *,
        peft_adapter_name: str | None = None,
        origin: Origin = "registered",
    ) -> AdapterRef:
        """Register (or replace) an adapter; returns the new current version's ref (not acquired).

        Replacing keeps every older version that a resolved ref still holds; they die when released.

        Args:
            adapter_id: the id requests name; any non-empty string except :data:`BASE_ADAPTER`.
            source: a PEFT adapter directory (``str``/``PathLike``), a ``peft.PeftModel`` (its adapter
                ``peft_adapter_name``, default the active one, is copied to host memory now), a
                ``(state_dict, config)`` tuple, a :class:`RawAdapter` or :class:`AdapterWeights`.
            peft_adapter_name: which adapter of a PeftModel source.
            origin: ``"resolved"`` when called for a resolver's answer (the store caches those on disk).

        Raises:
            StoreClosedError: the catalog was closed.
            ValueError, TypeError: a bad id or source (see :func:`normalize_source`).
            AdapterLoadError, AdapterFormatError, UnsupportedAdapterError: the catalog's ``check``
                refused the source (nothing is registered; a previous version stays current).
        """
        self._check_open()
        check_adapter_id(adapter_id)
        kind, normalized = self._normalize(adapter_id, source, peft_adapter_name)
        return self._add(adapter_id, kind, normalized, origin)

    def _normalize(
        self, adapter_id: str, source: Any, peft_adapter_name: str | None = None
    ) -> tuple[SourceKind, Path | RawAdapter | AdapterWeights]:
        """:func:`normalize_source`, then the catalog's ``check``."""
        kind, normalized = normalize_source(adapter_id, source, peft_adapter_name)
        if self._check is not None:
            self._check(adapter_id, normalized)
        return kind, normalized

    def _add(
        self, adapter_id: str, kind: SourceKind, source: Path | RawAdapter | AdapterWeights, origin: Origin
    ) -> AdapterRef:
        version = self._last_version.get(adapter_id, 0) + 1
        self._last_version[adapter_id] = version
        ref = AdapterRef(adapter_id, version, kind, origin, _SourceHolder(source))
        old = self._current.get(adapter_id)
        self._current[adapter_id] = ref
        self._live[ref.key] = ref
        self._refcounts[ref.key] = 0
        if old is not None:
            self._maybe_dead(old)
        return ref

    def unregister(self, adapter_id: str) -> None:
        """Forget an id: new resolutions fail (or ask the resolver again); held refs keep working.

        Raises:
            AdapterNotFoundError: the id is not registered.
        """
        ref = self._current.pop(adapter_id, None)
        if ref is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
        self._maybe_dead(ref)

    def adapter_ids(self) -> list[str]:
        """The registered (and resolved) ids, sorted."""
        return sorted(self._current)

    def current(self, adapter_id: str) -> AdapterRef | None:
        """The current version's ref, without acquiring it (``None`` if not registered)."""
        if adapter_id == BASE_ADAPTER:
            return BASE_REF
        return self._current.get(adapter_id)

    @property
    def has_resolver(self) -> bool:
        return self._resolver is not None

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self._current

    def __len__(self) -> int:
        return len(self._current)

    # -- resolution and reference counts -----------------------------------------------------------

    async def resolve(self, adapter_id: str, *, acquire: bool = True) -> AdapterRef:
        """The current version of ``adapter_id``, asking the resolver if it is not registered.

        Args:
            adapter_id: the id; :data:`BASE_ADAPTER` gives :data:`BASE_REF`.
            acquire: count the returned ref as held; the holder must :meth:`release` it exactly once.

        Raises:
            AdapterNotFoundError: unknown id (no resolver, or the resolver returned ``None``).
            AdapterLoadError: the resolver raised (the cause is chained); a later call tries again.
            AdapterLoadError, AdapterFormatError, UnsupportedAdapterError: the catalog's ``check``
                refused the resolver's answer; it is not registered, so a later call asks again.
            StoreClosedError: the catalog was closed (also for callers waiting when it closes).
        """
        if adapter_id == BASE_ADAPTER:
            return BASE_REF
        self._check_open()
        check_adapter_id(adapter_id, allow_base=True)
        while True:
            ref = self._current.get(adapter_id)
            if ref is None:
                if self._resolver is None:
                    raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered")
                call = self._resolving.join(
                    adapter_id, lambda _: self._run_resolver(adapter_id), f"polylora-resolve:{adapter_id[:64]}"
                )
                ref = await call.wait()
                assert isinstance(ref, AdapterRef)
            # The version could have been replaced while we waited: take whatever is alive now.
            if ref.key in self._live:
                if acquire:
                    self.acquire(ref)
                return ref

    async def _run_resolver(self, adapter_id: str) -> AdapterRef:
        assert self._resolver is not None
        try:
            source = await self._resolver(adapter_id)
        except PolyLoraError:
            raise
        except Exception as exc:
            raise AdapterLoadError(f"adapter {adapter_id!r}: the resolver failed: {exc!r}") from exc
        if source is None:
            raise AdapterNotFoundError(f"adapter {adapter_id!r} is not registered and the resolver does not know it")
        self._check_open()
        existing = self._current.get(adapter_id)
        if existing is not None:  # registered explicitly while the resolver ran: that one wins
            return existing
        if hasattr(source, "peft_config") or (self._check is not None and isinstance(source, (str, os.PathLike))):
            # Snapshotting a PeftModel copies tensors (maybe from a GPU), and checking a directory
            # reads its config and safetensors header: not on the event loop.
            kind, normalized = await asyncio.to_thread(self._normalize, adapter_id, source)
        else:
            kind, normalized = self._normalize(adapter_id, source)
        self._check_open()
        existing = self._current.get(adapter_id)
        if existing is not None:
            return existing
        return self._add(adapter_id, kind, normalized, "resolved")

    def acquire(self, ref: AdapterRef) -> None:
        """Count one more holder of ``ref`` (:meth:`resolve` does this for you).

        Raises:
            AdapterNotFoundError: the version is no longer alive.
        """
        if ref.is_base:
            return
        if ref.key not in self._live:
            raise AdapterNotFoundError(
                f"adapter {ref.adapter_id!r} version {ref.version} is no longer registered or referenced"
            )
        self._refcounts[ref.key] += 1

    def release(self, ref: AdapterRef) -> None:
        """Drop one holder of ``ref``; a replaced or unregistered version dies with its last holder.

        Raises:
            ValueError: released more often than acquired.
        """
        if ref.is_base:
            return
        count = self._refcounts.get(ref.key, 0)
        if count <= 0:
            raise ValueError(f"adapter {ref.adapter_id!r} version {ref.version} was released more often than resolved")
        self._refcounts[ref.key] = count - 1
        self._maybe_dead(ref)

    def refcount(self, ref: AdapterRef) -> int:
        return self._refcounts.get(ref.key, 0)

    def is_alive(self, key: AdapterKey) -> bool:
        """Whether the version can still be used: current, or held by an unreleased ref."""
        return key in self._live

    def is_current(self, key: AdapterKey) -> bool:
        ref = self._current.get(key[0])
        return ref is not None and ref.version == key[1]

    def live_versions(self) -> list[AdapterRef]:
        return list(self._live.values())

    def drop_source(self, ref: AdapterRef) -> None:
        """Forget an in-memory source once the store holds its own durable copy (frees host memory)."""
        if ref.kind == "memory":
            ref._holder.source = None

    def _maybe_dead(self, ref: AdapterRef) -> None:
        key = ref.key
        if key not in self._live or self._refcounts.get(key, 0) > 0 or self.is_current(key):
            return
        del self._live[key]
        self._refcounts.pop(key, None)
        if self._on_version_dead is not None:
            self._on_version_dead(ref)

    # -- shutdown -----------------------------------------------------------------------------------

    def close(self) -> list[asyncio.Task[Any]]:
        """Refuse new work and fail pending resolutions; returns their tasks (cancelled) to await."""
        self._closed = True
        return self._resolving.close()

    def _check_open(self) -> None:
        if self._closed:
            raise StoreClosedError("the adapter catalog is closed")


def _resolution_cancelled(adapter_id: str) -> StoreClosedError:
    return StoreClosedError(f"resolving adapter {adapter_id!r} was cancelled: the catalog closed")
