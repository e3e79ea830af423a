"""The disk tier: a directory cache of adapters in PEFT format, bounded in bytes and entries.

Layout under the cache root::

    manifest.json                     {"format": 1, "entries": [...]}, replaced atomically
    entries/<safe name>/              adapter_config.json + adapter_model.safetensors (PEFT format)
    tmp/                              writes in progress, and directories being deleted

Adapter ids never become paths: an entry's directory name is a readable ASCII prefix of the id
plus a SHA-256 digest of the id and a content token (:func:`entry_name`), so ``../../etc``, very
long ids, unicode, and ids that differ only in case or punctuation all stay inside ``entries/``
and never share a directory, on case-insensitive file systems too.

Crash safety: an entry is written into ``tmp/``, fsynced, renamed into ``entries/``, and only then
listed in the manifest (write temp + fsync + ``os.replace`` + fsync of the directory). Deleting
unlists first, then removes. Opening the cache therefore drops, without failing: temp files and
directories, entries the manifest does not list, listed entries whose files are missing or have the
wrong size, entries from a previous process's memory spills, and everything if the manifest itself
is unreadable. The cache is opened lazily, inside the first call (which runs in a worker thread).

Every method may block on file I/O: call them from worker threads. They are thread-safe.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..adapters import CONFIG_FILE, SAFETENSORS_FILE, AdapterWeights, RawAdapter, read_peft_directory

logger = logging.getLogger("polylora_async")

MANIFEST_FILE = "manifest.json"
ENTRIES_DIR = "entries"
TMP_DIR = "tmp"
FORMAT_VERSION = 1
_PREFIX_CHARS = 48


def entry_name(adapter_id: str, token: str) -> str:
    """The directory name of an entry: ``<readable prefix>-<32 hex digits>``, at most 81 characters.

    The prefix (lowercase ASCII letters, digits and ``-``) is for humans only; uniqueness comes from
    the digest of the length-prefixed id and the token, so no two (id, token) pairs collide.
    """
    id_bytes = adapter_id.encode("utf-8", "surrogatepass")
    token_bytes = token.encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(b"%d:" % len(id_bytes) + id_bytes + token_bytes).hexdigest()[:32]
    ascii_id = unicodedata.normalize("NFKD", adapter_id).encode("ascii", "ignore").decode("ascii").lower()
    prefix = re.sub(r"[^a-z0-9]+", "-", ascii_id).strip("-")[:_PREFIX_CHARS].strip("-") or "adapter"
    return f"{prefix}-{digest}"


def weights_to_raw(weights: AdapterWeights) -> RawAdapter:
    """PEFT-format config + tensors that validate back to ``weights`` (per-layer rank and scale).

    Every layer is listed in ``rank_pattern``/``alpha_pattern`` under its escaped full name, with
    ``lora_alpha = scale * rank``; reading it back gives the same scale up to float rounding.
    """
    names = sorted(weights.layers)
    if not names:
        raise ValueError(f"adapter {weights.adapter_id!r}: no layers to save")
    first = weights.layers[names[0]]
    config: dict[str, Any] = {
        "peft_type": "LORA",
        "r": first.rank,
        "lora_alpha": first.scale * first.rank,
        "target_modules": names,
        "rank_pattern": {re.escape(n): weights.layers[n].rank for n in names},
        "alpha_pattern": {re.escape(n): weights.layers[n].scale * weights.layers[n].rank for n in names},
    }
    tensors: dict[str, torch.Tensor] = {}
    for name in names:
        lora = weights.layers[name]
        tensors[f"base_model.model.{name}.lora_A.weight"] = lora.a
        tensors[f"base_model.model.{name}.lora_B.weight"] = lora.b
    for head, saved in weights.heads.items():  # whole-module copies, keyed as PEFT saves them
        config["modules_to_save"] = sorted(weights.heads)
        for key, tensor in saved.items():
            tensors[f"base_model.model.{head}.{key}"] = tensor
    return RawAdapter(config=config, tensors=tensors, origin=weights.origin)


def _jsonable(value: Any) -> Any:
    """A PEFT config (maybe from ``LoraConfig.to_dict()``: sets, enums) as plain JSON values."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=str)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _jsonable(dataclasses.asdict(value))
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


@dataclass
class DiskEntry:
    """One cached adapter, as the manifest lists it.

    Attributes:
        durable: the only copy of an in-memory adapter (a spill): never evicted by the bounds,
            only removed by its owner.
        ephemeral: belongs to this process only (a spill); dropped when the cache is next opened.
        files: file name -> size in bytes; a size mismatch at open means a torn write.
    """

    name: str
    adapter_id: str
    token: str
    nbytes: int
    files: dict[str, int]
    last_used: float
    durable: bool = False
    ephemeral: bool = False


@dataclass(frozen=True)
class DiskWriteResult:
    """``written``: the entry is in the cache; ``evicted``: (adapter_id, token) of entries removed for room."""

    written: bool
    evicted: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class DiskStats:
    entries: int
    nbytes: int
    evictions: int
    dropped_at_open: int


class DiskCache:
    """A bounded directory cache of PEFT-format adapters, keyed by (adapter id, content token).

    Args:
        root: the cache directory (created if missing). One process per directory.
        max_bytes: bound on the total file bytes of evictable entries plus durable ones (None: none).
        max_entries: bound on the number of entries (None: none).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, max_bytes: int | None = None, max_entries: int | None = None
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.max_bytes = max_bytes
        self.max_entries = max_entries
        self._entries_dir = self.root / ENTRIES_DIR
        self._tmp_dir = self.root / TMP_DIR
        self._lock = threading.RLock()
        self._index: dict[str, DiskEntry] = {}
        self._opened = False
        self._closed = False
        self._dirty = False
        self._evictions = 0
        self._dropped_at_open = 0

    # -- opening and recovery -----------------------------------------------------------------------

    def open(self) -> None:
        """Open (and repair) the cache now; otherwise the first call does it."""
        with self._lock:
            self._ensure_open()

    def _ensure_open(self) -> None:
        if self._opened:
            return
        self._entries_dir.mkdir(parents=True, exist_ok=True)
        self._tmp_dir.mkdir(parents=True, exist_ok=True)
        for leftover in list(self._tmp_dir.iterdir()):
            _remove_path(leftover)
        for stray in self.root.glob(f".{MANIFEST_FILE}.*.tmp"):
            _remove_path(stray)
        listed = self._read_manifest()
        on_disk = {p.name: p for p in self._entries_dir.iterdir()}
        kept: dict[str, DiskEntry] = {}
        # Spills of in-memory adapters are private to the run that wrote them (their token is a
        # fresh uuid), so dropping them on reopen is expected, not damage: say so apart.
        ephemeral: set[str] = set()
        for entry in listed:
            path = on_disk.get(entry.name)
            if path is None:
                continue
            if entry.ephemeral:
                ephemeral.add(entry.name)
            elif self._entry_intact(entry, path):
                kept[entry.name] = entry
        for name, path in on_disk.items():
            if name in kept:
                continue
            self._dropped_at_open += 1
            if name not in ephemeral:
                logger.warning("adapter disk cache %s: dropping incomplete or unlisted entry %r", self.root, name)
            _remove_path(path)
        if kept or ephemeral:
            logger.info(
                "adapter disk cache %s: kept %d cached entries, dropped %d spilled entries of a previous run",
                self.root,
                len(kept),
                len(ephemeral),
            )
        self._index = kept
        self._opened = True
        # The bounds may have shrunk since the last run.
        evicted = self._evict_for(0, 0, exclude=None) or []
        for entry in evicted:
            self._unlist(entry.name)
        self._evictions += len(evicted)
        for entry in evicted:
            self._discard(entry.name)
        self._write_manifest()

    def _read_manifest(self) -> list[DiskEntry]:
        path = self.root / MANIFEST_FILE
        if not path.exists():
            return []
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
                raise ValueError(f"unknown manifest format {data.get('format') if isinstance(data, dict) else data!r}")
            entries = []
            for item in data["entries"]:
                entry = DiskEntry(**item)
                if not (
                    isinstance(entry.name, str) and isinstance(entry.adapter_id, str) and isinstance(entry.token, str)
                    and isinstance(entry.files, dict) and isinstance(entry.nbytes, int)
                ):
                    raise ValueError(f"malformed entry {item!r}")
                entries.append(entry)
            return entries
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
            # Nothing listed can be trusted; every entry directory is dropped as unlisted.
            logger.warning("adapter disk cache %s: unreadable manifest (%s); starting empty", self.root, exc)
            return []

    def _entry_intact(self, entry: DiskEntry, path: Path) -> bool:
        if entry.name != entry_name(entry.adapter_id, entry.token):
            return False
        if set(entry.files) != {CONFIG_FILE, SAFETENSORS_FILE}:
            return False
        try:
            return all((path / f).stat().st_size == size for f, size in entry.files.items())
        except OSError:
            return False

    # -- lookups ----------------------------------------------------------------------------------

    def contains(self, adapter_id: str, token: str) -> bool:
        with self._lock:
            self._ensure_open()
            entry = self._index.get(entry_name(adapter_id, token))
            return entry is not None and entry.adapter_id == adapter_id and entry.token == token

    def path_of(self, adapter_id: str, token: str) -> Path:
        """Where the entry lives (or would live): always inside ``root/entries``."""
        return self._entries_dir / entry_name(adapter_id, token)

    def read(self, adapter_id: str, token: str, *, pin_memory: bool = False) -> RawAdapter | None:
        """The cached adapter (unvalidated; its weights page-locked with ``pin_memory``), or None if not cached.

        Raises:
            AdapterLoadError: the entry is listed but unreadable (torn or corrupt file); it has been
                dropped, so the caller can fall back to the source.
        """
        name = entry_name(adapter_id, token)
        with self._lock:
            self._ensure_open()
            if self._closed:
                return None
            entry = self._index.get(name)
            if entry is None or entry.adapter_id != adapter_id or entry.token != token:
                return None
            entry.last_used = time.time()
            self._dirty = True
        try:
            return read_peft_directory(adapter_id, self._entries_dir / name, pin_memory=pin_memory)
        except Exception:
            with self._lock:
                if self._index.get(name) is entry:
                    self._unlist(name)
                    self._discard(name)
            raise

    # -- writes -------------------------------------------------------------------------------------

    def write(
        self, adapter_id: str, token: str, raw: RawAdapter, *, durable: bool = False, ephemeral: bool = False
    ) -> DiskWriteResult:
        """Store an adapter in PEFT format (replacing the same (id, token)); evicts LRU entries for room.

        Returns ``written=False`` (and changes nothing) if it cannot fit: larger than the bound,
        or the rest is durable, or the cache was closed.
        """
        name = entry_name(adapter_id, token)
        config_bytes = json.dumps(_jsonable(raw.config), indent=2, sort_keys=True).encode("utf-8")
        weights_bytes = _safetensors_bytes(raw.tensors)
        nbytes = len(config_bytes) + len(weights_bytes)
        with self._lock:
            self._ensure_open()
            if self._closed or (self.max_bytes is not None and nbytes > self.max_bytes):
                return DiskWriteResult(False)
        staging = self._tmp_dir / f"write-{uuid.uuid4().hex}"
        staging.mkdir()
        try:
            _write_synced(staging / CONFIG_FILE, config_bytes)
            _write_synced(staging / SAFETENSORS_FILE, weights_bytes)
            _fsync_dir(staging)
            with self._lock:
                if self._closed:
                    return DiskWriteResult(False)
                old = self._index.get(name)
                evicted = self._evict_for(nbytes - (old.nbytes if old else 0), 0 if old else 1, exclude=name)
                if evicted is None:
                    return DiskWriteResult(False)
                for entry in evicted:
                    self._unlist(entry.name)
                if old is not None:
                    self._unlist(name)
                    self._discard(name)
                os.replace(staging, self._entries_dir / name)
                _fsync_dir(self._entries_dir)
                self._index[name] = DiskEntry(
                    name=name, adapter_id=adapter_id, token=token, nbytes=nbytes,
                    files={CONFIG_FILE: len(config_bytes), SAFETENSORS_FILE: len(weights_bytes)},
                    last_used=time.time(), durable=durable, ephemeral=ephemeral,
                )
                self._write_manifest()
                for entry in evicted:  # unlisted (manifest written) before the files go
                    self._discard(entry.name)
                self._evictions += len(evicted)
                return DiskWriteResult(True, tuple((e.adapter_id, e.token) for e in evicted))
        finally:
            if staging.exists():
                _remove_path(staging)

    def remove(self, adapter_id: str, token: str) -> bool:
        """Delete an entry (a spill whose version died); True if it existed."""
        name = entry_name(adapter_id, token)
        with self._lock:
            self._ensure_open()
            if self._closed or name not in self._index:
                return False
            self._unlist(name)
            self._write_manifest()
            self._discard(name)
            return True

    def close(self) -> None:
        """Persist LRU order and refuse further writes; in-flight writes are abandoned."""
        with self._lock:
            if self._closed:
                return
            if self._opened and self._dirty:
                self._write_manifest()
            self._closed = True

    def stats(self) -> DiskStats:
        with self._lock:
            self._ensure_open()
            return DiskStats(
                entries=len(self._index),
                nbytes=sum(e.nbytes for e in self._index.values()),
                evictions=self._evictions,
                dropped_at_open=self._dropped_at_open,
            )

    def entries(self) -> list[DiskEntry]:
        with self._lock:
            self._ensure_open()
            return [dataclasses.replace(e, files=dict(e.files)) for e in self._index.values()]

    # -- internals (lock held) ----------------------------------------------------------------------

    def _evict_for(self, extra_bytes: int, extra_entries: int, *, exclude: str | None) -> list[DiskEntry] | None:
        """LRU entries (not durable, not ``exclude``) to remove so the additions fit; None if impossible."""
        count = len(self._index) + extra_entries
        total = sum(e.nbytes for e in self._index.values()) + extra_bytes
        victims: list[DiskEntry] = []
        candidates = sorted(
            (e for e in self._index.values() if not e.durable and e.name != exclude), key=lambda e: e.last_used
        )
        for entry in candidates:
            over_bytes = self.max_bytes is not None and total > self.max_bytes
            over_count = self.max_entries is not None and count > self.max_entries
            if not (over_bytes or over_count):
                break
            victims.append(entry)
            total -= entry.nbytes
            count -= 1
        if (self.max_bytes is not None and total > self.max_bytes) or (
            self.max_entries is not None and count > self.max_entries
        ):
            return None
        return victims

    def _unlist(self, name: str) -> None:
        self._index.pop(name, None)

    def _discard(self, name: str) -> None:
        """Remove an entry's directory: renamed into tmp/ first, so entries/ never holds half of one."""
        path = self._entries_dir / name
        if not path.exists():
            return
        trash = self._tmp_dir / f"trash-{uuid.uuid4().hex}"
        try:
            os.replace(path, trash)
        except OSError:
            trash = path
        _remove_path(trash)

    def _write_manifest(self) -> None:
        data = {
            "format": FORMAT_VERSION,
            "entries": [dataclasses.asdict(e) for e in sorted(self._index.values(), key=lambda e: e.name)],
        }
        tmp = self.root / f".{MANIFEST_FILE}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        _write_synced(tmp, json.dumps(data, indent=1).encode("utf-8"))
        os.replace(tmp, self.root / MANIFEST_FILE)
        _fsync_dir(self.root)
        self._dirty = False


def _safetensors_bytes(tensors: Mapping[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    # Fresh contiguous CPU copies: safetensors refuses tensors that share storage, and staged
    # weights hold column-major (transposed) views.
    plain = {k: v.detach().to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}
    return save(plain, metadata={"format": "pt"})


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds (Windows): rename durability is best effort
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
