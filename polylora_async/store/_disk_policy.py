"""The disk policy: which versions go to the disk cache, under which token, and when they come back.

* An in-memory adapter (``ref.kind == "memory"``) is *spilled*: after its first load its weights are
  written durably under a random token, and once that write completes its CPU-tier entry stops
  being sticky (the disk holds a copy it can reload from). A spill is that version's private copy:
  it is removed when the version dies.
* An adapter a resolver returned is *cached*: written behind its first load under a fingerprint of
  its files (real path, sizes, mtimes), so later loads need not touch the (maybe slow or temporary)
  source; the entry outlives the version, for later versions (or runs) with the same files.
* Directories registered up front are read from where they are: no disk tier.

Every disk-cache call runs in a worker thread (reads in the load pool, writes and removals in one
disk thread); the tier's statistics snapshot is refreshed after each.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal, TypeVar

from .._catalog import AdapterCatalog, AdapterKey, AdapterRef
from .._errors import AdapterLoadError
from ..adapters import CONFIG_FILE, PICKLE_FILE, SAFETENSORS_FILE, AdapterWeights, RawAdapter
from ._accounting import Accounting
from ._config import StoreConfig
from ._cpu_tier import stage_weights
from ._disk_tier import DiskCache, DiskStats
from ._lifecycle import Lifecycle

logger = logging.getLogger("polylora_async")

DiskMode = Literal["spill", "cache"]
_T = TypeVar("_T")


async def in_thread(pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))


class DiskPolicy:
    """Spill and cache decisions over a :class:`DiskCache` (or nothing, without ``disk_dir``).

    Args:
        config: the store's config (``disk_dir``, ``disk_bytes``, ``disk_entries``).
        catalog: whose versions these are (a dead version's spill is removed).
        accounting: counts disk loads and evictions.
        life: the store's lifecycle (background writes are its tasks).
        read_pool: the store's load threads (disk reads run there).
        validate: ``validate(adapter_id, raw) -> weights`` (the model's check; worker thread).
        pin: stage read weights in page-locked memory.
        on_spilled: told (on the loop) of each version whose spill completed.
        clock: the store's clock, for load durations.
    """

    def __init__(
        self,
        config: StoreConfig,
        *,
        catalog: AdapterCatalog,
        accounting: Accounting,
        life: Lifecycle,
        read_pool: ThreadPoolExecutor,
        validate: Callable[[str, RawAdapter], AdapterWeights],
        pin: bool,
        on_spilled: Callable[[AdapterKey], None],
        clock: Callable[[], float],
    ) -> None:
        self._cache = (
            DiskCache(config.disk_dir, max_bytes=config.disk_bytes, max_entries=config.disk_entries)
            if config.disk_dir is not None
            else None
        )
        self._catalog = catalog
        self._accounting = accounting
        self._life = life
        self._read_pool = read_pool
        self._validate = validate
        self._pin = pin
        self._on_spilled = on_spilled
        self._clock = clock
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="polylora-disk") if self._cache else None
        self.stats = DiskStats(0, 0, 0, 0)
        """The disk tier's statistics as of its last call."""
        self._tokens: dict[AdapterKey, str] = {}
        self._token_keys: dict[tuple[str, str], AdapterKey] = {}
        self._spilled: set[AdapterKey] = set()

    @property
    def enabled(self) -> bool:
        return self._cache is not None

    def mode(self, ref: AdapterRef) -> DiskMode | None:
        """Whether ``ref`` is spilled, cached, or not on disk at all."""
        if self._cache is None:
            return None
        if ref.kind == "memory":
            return "spill"
        if ref.origin == "resolved":
            return "cache"
        return None

    def is_spilled(self, key: AdapterKey) -> bool:
        """Whether the version's spill completed (an in-memory adapter is on disk only then)."""
        return key in self._spilled

    async def token(self, ref: AdapterRef, mode: DiskMode) -> str | None:
        """The version's disk-cache token (None: its source cannot be fingerprinted)."""
        token = self._tokens.get(ref.key)
        if token is not None:
            return token
        if mode == "spill":
            token = f"mem:{uuid.uuid4().hex}"
        else:
            source = ref.source
            if not isinstance(source, Path):
                return None
            token = await in_thread(self._read_pool, _fingerprint_directory, source)
            if token is None:
                return None
        if self._catalog.is_alive(ref.key):
            self._tokens[ref.key] = token
            self._token_keys[(ref.adapter_id, token)] = ref.key
        return token

    async def read(self, ref: AdapterRef, token: str) -> AdapterWeights | None:
        """The cached copy, validated and staged; None if not cached.

        Raises:
            AdapterLoadError: the entry is unreadable or invalid (it was dropped).
        """
        return await self._op(self._read_pool, self._read, ref, token)

    def write_behind(self, ref: AdapterRef, token: str, raw: RawAdapter, mode: DiskMode) -> None:
        """Write ``raw`` to the cache in the background (failures are logged, never raised)."""
        self._life.spawn(self._write(ref, token, raw, mode), "polylora-disk-write")

    def open_in_background(self) -> None:
        """Open (and repair) the disk cache now, off the loop, rather than at the first lookup."""
        if self._cache is not None and self._pool is not None:
            self._life.spawn(self._op(self._pool, self._cache.open), "polylora-disk-open")

    def forget(self, ref: AdapterRef) -> None:
        """A dead version: drop its token; remove its spill (a cache entry stays for later versions)."""
        key = ref.key
        token = self._tokens.pop(key, None)
        if token is not None:
            self._token_keys.pop((ref.adapter_id, token), None)
            # A spill is that version's private copy; a resolver-source cache entry is kept for
            # later versions (or runs) with the same files.
            if ref.kind == "memory" and self._cache is not None and not self._life.closed and self._life.loop_running:
                self._life.spawn(self._remove(ref.adapter_id, token), "polylora-disk-remove")
        self._spilled.discard(key)

    def shutdown_pool(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)

    async def close(self) -> None:
        if self._cache is not None:
            await asyncio.to_thread(self._cache.close)

    async def _op(self, pool: ThreadPoolExecutor, fn: Callable[..., _T], *args: Any) -> _T:
        """Run a disk-tier call in ``pool`` and refresh the tier's statistics snapshot afterwards."""
        cache = self._cache
        assert cache is not None

        def run() -> tuple[_T | None, Exception | None, DiskStats]:
            try:
                return fn(*args), None, cache.stats()
            except Exception as exc:
                return None, exc, cache.stats()

        result, error, stats = await in_thread(pool, run)
        self.stats = stats
        self._accounting.report_resident("disk")
        if error is not None:
            raise error
        return result  # type: ignore[return-value]

    async def _write(self, ref: AdapterRef, token: str, raw: RawAdapter, mode: DiskMode) -> None:
        assert self._cache is not None and self._pool is not None
        key = ref.key
        spill = mode == "spill"
        start = self._clock()
        try:
            write = functools.partial(self._cache.write, durable=spill, ephemeral=spill)
            result = await self._op(self._pool, write, ref.adapter_id, token, raw)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a full or broken disk: the CPU tier keeps (sticky) what it has
            logger.warning("adapter %r: could not write the disk cache: %s", ref.adapter_id, exc)
            return
        for evicted in result.evicted:
            self._accounting.eviction("disk", self._token_keys.get(evicted))
        if not result.written:
            return
        self._accounting.load("disk", key, self._clock() - start, "cpu")
        if not spill:
            return
        if not self._catalog.is_alive(key):
            await self._remove(ref.adapter_id, token)
            return
        self._spilled.add(key)
        self._on_spilled(key)

    async def _remove(self, adapter_id: str, token: str) -> None:
        assert self._cache is not None and self._pool is not None
        try:
            await self._op(self._pool, self._cache.remove, adapter_id, token)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            logger.warning("adapter %r: could not remove its disk-cache entry: %s", adapter_id, exc)

    def _read(self, ref: AdapterRef, token: str) -> AdapterWeights | None:
        """Worker thread: the disk-cache copy, validated and staged; None if not cached."""
        assert self._cache is not None
        raw = self._cache.read(ref.adapter_id, token, pin_memory=self._pin)
        if raw is None:
            return None
        try:
            weights = self._validate(ref.adapter_id, raw)
        except AdapterLoadError:
            self._cache.remove(ref.adapter_id, token)
            raise
        return stage_weights(weights, pin=self._pin)


def _fingerprint_directory(path: Path) -> str | None:
    """Worker thread: a content token for a PEFT directory (real path, file sizes and mtimes)."""
    try:
        real = path.resolve(strict=True)
        parts = [str(real)]
        for name in (CONFIG_FILE, SAFETENSORS_FILE, PICKLE_FILE):
            try:
                st = (real / name).stat()
            except FileNotFoundError:
                continue
            parts.append(f"{name}:{st.st_size}:{st.st_mtime_ns}")
    except OSError:
        return None
    return "dir:" + hashlib.sha256("\n".join(parts).encode("utf-8", "surrogatepass")).hexdigest()

