"""A durable on-disk store of embeddings, keyed by strings, for one model, sized for 10^8 rows.

On-disk format 2 (one directory):
  meta.json          {"format": 2, "fingerprint", "spec", "embed_dim", "dtype": "float32"|"float16",
                      "precisions": the model precisions (fp32, bf16, fp16) that wrote its vectors}
  table.sqlite       entries(key PK, row UNIQUE, info) = live keys; segments(id, name, start, rows, bytes, crc32)
                     = every segment's global row range and checksum; state(name, value) = next row, index state
  seg-NNNNNN.npy     append-only [rows, D] arrays, memory-mapped; NNNNNN from a counter never reused
  index.faiss        FAISS index over global rows [base, rows) (factory, nprobe, crc32, recall in `state`),
                     written and read by `clipzsl.saved_index`
  .clipzsl.json      the ownership marker (`claim`): {"kind": "image-index" | "label-cache", "format": 1}

Why: an append writes one new segment (temp, fsync, rename) and then commits its rows in
one SQLite transaction, so it costs O(batch), a process killed at any moment leaves the
previous state (an uncommitted segment is an orphan, deleted by the next writer), and
opening reads only the segment list. Writers take an exclusive file lock, so concurrent
processes never lose or duplicate each other's work. Replaced and removed rows stay in
their segments until `compact()` (run on its own once they outnumber the live rows);
small segments are concatenated (same rows, fewer files), never rewritten per write.
Each segment's CRC-32 is checked when a process first reads it (at open for a small
cache): a damaged segment is never served; a cache drops it with a warning (its entries
are recomputed), an index (`repair_hint`) refuses with an error naming it and the repair.

Ownership: clipzsl writes into and deletes from only folders it created. Each one it creates
(an index, a label cache, the cache root, a shard folder) carries a marker, `.clipzsl.json`,
saying its kind; `claim` checks it before any write and `destroy` before any delete, and
refuses any other non-empty folder, naming it. A folder made by an older clipzsl (no marker)
is adopted, marker written, only when its contents are recognisably clipzsl's.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import fnmatch
import functools
import hashlib
import io
import json
import logging
import os
import sqlite3
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator, Literal, NoReturn, Sequence, TypeVar

import numpy as np

from .errors import ClipzslError, InputError
from .records import RecordError, load, rule

log = logging.getLogger(__name__)

FORMAT = 2
#: the ownership marker every folder clipzsl creates carries (`claim`), and its format
MARKER = ".clipzsl.json"
MARKER_FORMAT = 1
#: the kinds of folder an `EmbeddingStore` is
STORE_KINDS = ("image-index", "label-cache")
#: more small segments than this (at the end of the store) are concatenated into one
MAX_SEGMENTS = 16
#: segments with fewer rows than this count as small
SMALL_SEGMENT_ROWS = 8192
#: rows per segment written by `compact`
COMPACT_SEGMENT_ROWS = 65_536
#: stores up to this size verify every checksum when opened; larger ones when first read
VERIFY_ON_OPEN_BYTES = 256 << 20
#: the saved index's file and the prefix of its description in the state table (`clipzsl.saved_index`):
#: derived from the rows' positions, so a compaction deletes both
INDEX_FILE = "index.faiss"
METADATA_FILE = "metadata.parquet"  # an image index's metadata columns (clipzsl.metadata), beside its rows
INDEX_STATE = "index_"
DTYPES = ("float32", "float16")
T = TypeVar("T")
_SQL_CHUNK = 900  # keys per `IN (...)` query
#: most keys `get_or_compute` computes and appends per locked write, so a long job lets other writers in between
WRITE_CHUNK = SMALL_SEGMENT_ROWS
#: times a read starts again when other processes keep merging or compacting the segments under it
_READ_ATTEMPTS = 5

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(key TEXT PRIMARY KEY, row INTEGER NOT NULL UNIQUE, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS segments(id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL UNIQUE,
    start INTEGER NOT NULL, rows INTEGER NOT NULL, bytes INTEGER NOT NULL, crc INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS state(name TEXT PRIMARY KEY, value);
"""


class StoreError(ClipzslError, RuntimeError):
    """A store that cannot be used as asked (another model's, unreadable or damaged files, a full disk)."""


class ForeignFolderError(StoreError):
    """A folder clipzsl did not create (or of another kind): it is never written into or emptied."""


class SegmentsChanged(ClipzslError):
    """The segments changed under a read (a damaged one was set aside, or another process merged or
    compacted them); the read starts again on the new list (`consistent`), so it never reaches a caller."""


@dataclass(frozen=True)
class StoreMeta:
    """The schema of a store's meta.json (read through `clipzsl.records`)."""

    fingerprint: str
    embed_dim: int = field(metadata=rule(lambda v: v >= 1, "at least 1"))
    format: Literal[1, 2] = 1  # format-1 stores wrote none
    spec: str = ""
    dtype: Literal["float32", "float16"] = "float32"
    precisions: list[Literal["fp32", "bf16", "fp16"]] = field(default_factory=list)


@dataclass(frozen=True)
class Segment:
    name: str
    start: int
    rows: int
    bytes: int
    crc: int

    @property
    def end(self) -> int:
        return self.start + self.rows


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Argument, else $CLIPZSL_CACHE_DIR, else $XDG_CACHE_HOME/clipzsl, else ~/.cache/clipzsl."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("CLIPZSL_CACHE_DIR"):
        return Path(os.environ["CLIPZSL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipzsl"


def current_umask() -> int:
    """The process's umask, read without changing it (Linux); elsewhere set and restored at once."""
    with contextlib.suppress(OSError, ValueError, StopIteration):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Call `write(file)` on a temporary sibling, fsync it, then rename it over `path`. The file
    gets the mode a plain open() would give it (0666 less the umask), not mkstemp's 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def locked(directory: Path) -> Iterator[None]:
    """Exclusive lock on a directory, across processes (released if the holder dies). The holder
    notes its pid and command in the lock file, so a process that has to wait says for what and
    for whom instead of hanging silently; $CLIPZSL_LOCK_TIMEOUT (seconds) bounds the wait."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / ".lock", os.O_RDWR | os.O_CREAT, 0o666)  # less the umask, as every file written
    try:
        _acquire(fd, directory)
        try:
            note = _holder_note().encode()
            os.pwrite(fd, note, 0)
            os.ftruncate(fd, len(note))
            yield
        finally:
            os.ftruncate(fd, 0)  # the note names the holder only while it holds the lock
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _acquire(fd: int, directory: Path) -> None:
    """Lock `fd`; when another process holds it, say so once (a warning of the "clipzsl" logger), then wait."""
    with contextlib.suppress(BlockingIOError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    holder = os.pread(fd, 1024, 0).decode(errors="replace").strip() or "another process"
    log.warning("waiting for the lock on %s (held by %s)", directory, holder)
    timeout = _lock_timeout()
    if timeout is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        if time.monotonic() >= deadline:
            raise StoreError(f"{directory}: still locked after {timeout:g} s (held by {holder}); let that run "
                             "finish or stop it (a stopped process releases the lock), or raise CLIPZSL_LOCK_TIMEOUT")
        time.sleep(0.05)


def _lock_timeout() -> float | None:
    """$CLIPZSL_LOCK_TIMEOUT in seconds, or None (wait as long as it takes) when unset."""
    value = os.environ.get("CLIPZSL_LOCK_TIMEOUT", "").strip()
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError as err:
        raise StoreError(f"CLIPZSL_LOCK_TIMEOUT={value!r} is not a number of seconds; set it to e.g. 60, "
                         "or unset it to wait as long as it takes") from err


def _holder_note() -> str:
    """Who holds a lock, for the processes that wait on it: pid, when it took the lock, command line."""
    command = " ".join(sys.orig_argv).replace("\n", " ")
    command = command if len(command) <= 160 else command[:157] + "..."
    return f"pid {os.getpid()} since {time.strftime('%H:%M:%S')}: {command}"


def marker_kind(directory: Path) -> str | None:
    """The kind a folder's ownership marker names, or None (no marker, or an unreadable one)."""
    try:
        marker = json.loads((Path(directory) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker.get("kind") if isinstance(marker, dict) else None


def _contents(directory: Path) -> list[str]:
    """A folder's entries, less what `claim` and `locked` themselves create first (so two
    processes claiming a new folder at once do not refuse each other)."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return [n for n in names if n != ".lock" and not n.startswith(f".{MARKER}.")]


def claim(directory: str | os.PathLike, kind: str, recognise: Callable[[Path], bool] | None = None) -> Path:
    """Make `directory` clipzsl's folder of `kind` before anything is written into it: it is used when
    it does not exist yet, is empty, or carries the marker of `kind`; one made by an older clipzsl
    (no marker) is adopted, marker written, when `recognise(directory)` finds its contents
    clipzsl's. Anything else is refused with `ForeignFolderError`, naming it."""
    directory = Path(directory)
    found = marker_kind(directory)
    if found == kind:
        return directory
    if found is not None:
        raise ForeignFolderError(f"{directory}: clipzsl made it as a folder of kind {found}, not {kind}; choose "
                                 "another folder")
    if directory.exists() and not directory.is_dir():
        raise ForeignFolderError(f"{directory}: not a folder; choose a new or empty folder")
    if _contents(directory) and not (recognise is not None and recognise(directory)):
        raise ForeignFolderError(
            f"{directory}: not empty, and not a folder clipzsl made (no {MARKER} marker); clipzsl writes into and "
            "deletes from only its own folders: choose a new or empty folder")
    text = json.dumps({"kind": kind, "format": MARKER_FORMAT})
    atomic_write(directory / MARKER, lambda f: f.write(text.encode()))
    return directory


def check_owned(directory: str | os.PathLike, kinds: Sequence[str], recognise: Callable[[Path], bool]) -> None:
    """Refuse to delete from `directory` unless its marker is one of `kinds` or `recognise` finds its
    contents clipzsl's (a folder made by an older clipzsl)."""
    directory = Path(directory)
    if marker_kind(directory) not in kinds and not recognise(directory):
        raise ForeignFolderError(f"{directory}: not a folder clipzsl made of kind {' or '.join(kinds)} (no {MARKER} "
                                 "marker, and not recognisably clipzsl's); nothing was deleted")


def _only(names: Sequence[str], patterns: Sequence[str]) -> bool:
    """Whether every name matches one of the glob patterns."""
    return all(any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns) for name in names)


#: the files a store writes (`is_store_folder`)
_STORE_FILES = ("meta.json", "table.sqlite*", "seg-*.npy", "seg-*.npy.corrupt", INDEX_FILE, METADATA_FILE, ".lock",
                ".*.tmp", MARKER)


def is_store_folder(directory: Path) -> bool:
    """Whether a folder is recognisably a store an older clipzsl made: nothing but a store's files,
    with a meta.json holding clipzsl's fields (or damaged, as a cache's may be) or else a
    table.sqlite with clipzsl's tables. A user's own seg-*.npy files are not enough."""
    names = _contents(directory)
    if not _only(names, _STORE_FILES):
        return False
    try:
        meta = json.loads((directory / "meta.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "table.sqlite" in names and _has_store_tables(directory / "table.sqlite")
    except (OSError, ValueError):
        return True  # a damaged meta.json beside nothing but store files
    return isinstance(meta, dict) and {"fingerprint", "embed_dim"} <= meta.keys()


def _has_store_tables(path: Path) -> bool:
    try:
        db = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)
        try:
            tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error:
        return False
    return {"entries", "segments", "state"} <= tables


#: what the cache root holds (`is_cache_root`): label caches, image features, WordNet, concepts
_CACHE_ENTRIES = ("labels", "image-features", "vocab", "conse-*.npy", "conse-*.npy.json", MARKER)


def is_cache_root(directory: Path) -> bool:
    """Whether a folder is recognisably a cache root an older clipzsl made: nothing but cache entries."""
    names = _contents(directory)
    return bool(names) and _only(names, _CACHE_ENTRIES)


def own_cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_root`, claimed as clipzsl's cache root: what every writer into the cache calls first."""
    return claim(cache_root(cache_dir), "cache-root", is_cache_root)


def digest(text: str, length: int = 32) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def file_crc(path: Path) -> int:
    """CRC-32 of a file, read in 16 MB blocks (about 1.5 GB/s)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(16 << 20):
            crc = zlib.crc32(block, crc)
    return crc


def disk_full(err: BaseException) -> bool:
    if isinstance(err, OSError):
        return err.errno in (errno.ENOSPC, errno.EDQUOT)
    return isinstance(err, sqlite3.OperationalError) and "full" in str(err)


def _consistent(read: Callable[..., T]) -> Callable[..., T]:
    """A store read, started again on a fresh segment list whenever the segments changed under it:
    another process merged them (a listed file is gone) or compacted them (every row moved), or a
    damaged one was set aside. So readers never see another writer's upkeep, nor `SegmentsChanged`."""

    @functools.wraps(read)
    def consistent_read(store: "EmbeddingStore", *args, **kwargs) -> T:
        for _ in range(_READ_ATTEMPTS):
            first = store._first_row()
            try:
                result = read(store, *args, **kwargs)
            except SegmentsChanged:
                store.reload()
                continue
            if store._first_row() == first:
                return result
            store.reload()
        raise store._unsettled()

    return consistent_read


class EmbeddingStore:
    """Key -> vector for one model fingerprint; later writes of a key replace earlier ones."""

    def __init__(
        self,
        directory: str | os.PathLike,
        fingerprint: str,
        embed_dim: int,
        spec: str = "",
        dtype: str = "float32",
        repair_hint: str | None = None,
        precision: str | None = None,
    ):
        """`dtype` (float32 or float16) applies to a new store; an existing one keeps its own.
        `precision`: the model precision of the vectors this object writes, noted in meta.json. The
        fingerprint is of the weights, so one key keeps one vector whatever precision wrote it: a bf16
        vector is within cosine 0.999 of the fp32 one (benchmarks/results/gpu.md), and the note says
        which precisions a store's vectors came from.
        `repair_hint`: None for a cache (damaged segments are dropped with a warning and their
        entries recomputed); else damage is an error, and this text says how to repair it."""
        if dtype not in DTYPES:
            raise InputError(f"store dtype must be one of {DTYPES}, got {dtype!r}")
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.embed_dim = embed_dim
        self.spec = spec  # the model spec that built it, so a reader can load the same model
        self.dtype = np.dtype(dtype)
        self.repair_hint = repair_hint
        self.precision = precision
        self._db: sqlite3.Connection | None = None
        self._segments: list[Segment] = []
        self._maps: dict[str, np.ndarray] = {}
        self._holding = False  # this object holds the directory lock (flock is not reentrant)
        self._claimed = False  # the directory's ownership marker was checked (`claim`)
        self._cache_root: Path | None = None  # a label cache's cache root, claimed with it
        self._check_meta()
        self.reload()
        if repair_hint is None and sum(s.bytes for s in self._segments) <= VERIFY_ON_OPEN_BYTES:
            for segment in list(self._segments):
                with contextlib.suppress(SegmentsChanged):
                    self._map(segment)

    @classmethod
    def for_labels(cls, backend, cache_dir: str | os.PathLike | None = None) -> "EmbeddingStore":
        """The label-embedding cache of a backend: one directory per fingerprint (the cache root is
        claimed with it, on the first write: `claim`)."""
        root = cache_root(cache_dir)
        store = cls(root / "labels" / digest(backend.fingerprint), backend.fingerprint, backend.embed_dim,
                    backend.spec, precision=getattr(backend, "precision", None))
        store._cache_root = root
        return store

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict:
        """The metadata of an existing store (`StoreMeta`: fingerprint, embed_dim, model spec, dtype), checked
        against its schema: a hand-edited or damaged meta.json is an error naming the field."""
        path = Path(directory) / "meta.json"
        try:
            return asdict(load(StoreMeta, path))
        except FileNotFoundError as err:
            raise StoreError(f"{directory} is not a clipzsl store or index (no meta.json).") from err
        except OSError as err:
            raise StoreError(f"{path}: unreadable store metadata ({err}); delete {directory} to rebuild.") from err
        except RecordError as err:
            raise StoreError(f"{path}: unreadable store metadata ({err.detail}); delete {directory} to rebuild.") from err

    @property
    def kind(self) -> str:
        """What its ownership marker says it is: an index (damage is an error) or a cache."""
        return "label-cache" if self.repair_hint is None else "image-index"

    def claim(self) -> None:
        """Make the directory this store's (`claim`) before the first write: a folder clipzsl did
        not create, or another kind's, is refused before anything is computed or written."""
        if not self._claimed:
            if self._cache_root is not None:
                own_cache_root(self._cache_root)
            claim(self.directory, self.kind, is_store_folder)
            self._claimed = True

    @staticmethod
    def destroy(directory: str | os.PathLike) -> None:
        """Delete a store's files, whatever state they are in (metadata unreadable included); a
        folder that is not a store clipzsl made is refused and left as it is."""
        directory = Path(directory)
        if not directory.exists():
            return
        check_owned(directory, STORE_KINDS, is_store_folder)
        with locked(directory):
            for pattern in ("seg-*", "table.sqlite*", INDEX_FILE, "meta.json", ".*.tmp", MARKER):
                for path in directory.glob(pattern):
                    path.unlink(missing_ok=True)
            (directory / ".lock").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            directory.rmdir()  # only if nothing else is in it

    # -- reading -------------------------------------------------------------------------

    def _describe(self, fingerprint, spec, dim) -> str:
        return f"{fingerprint!r} (spec {spec or '?'!r}, dim {dim})"

    def _check_meta(self) -> None:
        if not (self.directory / "meta.json").exists():
            return
        meta = self.read_meta(self.directory)
        if meta["fingerprint"] == self.fingerprint and meta["embed_dim"] != self.embed_dim:
            raise StoreError(
                f"{self.directory / 'meta.json'}: field 'embed_dim' says {meta['embed_dim']}, but its model "
                f"{self.fingerprint!r} embeds {self.embed_dim} dimensions (edited by hand?); set it back to "
                f"{self.embed_dim}")
        if meta["fingerprint"] != self.fingerprint or meta["embed_dim"] != self.embed_dim:
            raise StoreError(
                f"{self.directory / 'meta.json'}: this store holds embeddings of model "
                f"{self._describe(meta['fingerprint'], meta['spec'], meta['embed_dim'])}, not of "
                f"{self._describe(self.fingerprint, self.spec, self.embed_dim)}; "
                "use the model it was built with, or another directory."
            )
        if meta["format"] != FORMAT:
            if self.repair_hint is not None:
                raise StoreError(f"{self.directory / 'meta.json'}: store format {meta['format']}, written by an older "
                                 f"clipzsl; delete {self.directory} and build it again.")
            warnings.warn(f"{self.directory}: cache in an older format, emptied (entries will be recomputed)")
            self.destroy(self.directory)
            return
        self.dtype = np.dtype(meta["dtype"])
        self.spec = self.spec or meta["spec"]
        self._check_dtype()

    def _check_dtype(self) -> None:
        """meta.json's dtype must be the segments' (read from one .npy header): else every segment would
        look damaged, and be dropped from a cache or re-embedded by an index repair."""
        segment = next(self.directory.glob("seg-*.npy"), None)
        if segment is None:
            return  # no segment yet
        try:
            with open(segment, "rb") as f:
                version = np.lib.format.read_magic(f)
                read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
                stored = read[version](f)[2]
        except (TypeError, OSError, ValueError, KeyError):
            return  # no segment, or a damaged one: the checksum check reports it
        if stored != self.dtype:
            raise StoreError(f"{self.directory / 'meta.json'}: field 'dtype' says {self.dtype.name}, but the store's "
                             f"segments hold {stored.name} (edited by hand?); set it back to {stored.name!r}")

    def _connect(self) -> sqlite3.Connection | None:
        """The table's connection, or None while the store has no table (nothing written yet)."""
        if self._db is None and not (self.directory / "table.sqlite").exists():
            return None
        return self._table(create=False)

    def _table(self, create: bool = True) -> sqlite3.Connection:
        """The table's connection, the table created first (for a writer: `writing`) when `create`."""
        if self._db is None:
            path = self.directory / "table.sqlite"
            try:
                if create and not path.exists():
                    atomic_write(path, _new_table)  # readers never see a table without its schema
                db = sqlite3.connect(path, timeout=600, isolation_level=None)
                if create:
                    db.execute("PRAGMA journal_mode=WAL")  # persistent: readers then never block writers
                db.execute("PRAGMA synchronous=FULL")
            except sqlite3.DatabaseError as err:
                raise self._table_error(err) from err
            self._db = db
        return self._db

    def _table_error(self, err: sqlite3.DatabaseError) -> StoreError:
        if disk_full(err):
            return StoreError(self._full_message())
        hint = (f"delete {self.directory} (it is a cache: its entries are recomputed)" if self.repair_hint is None
                else f"its keys cannot be recovered from the segments: delete {self.directory} and build it again")
        return StoreError(f"{self.directory / 'table.sqlite'}: damaged store table ({err}); {hint}")

    def _unsettled(self) -> StoreError:
        """The error once reading or upkeep gave up starting again (see `SegmentsChanged`)."""
        return StoreError(f"{self.directory}: its segments kept failing their checksums or being rewritten by another "
                          "process; run again (a cache can also be deleted: its entries are recomputed)")

    def _full_message(self) -> str:
        return (f"{self.directory}: no space left on device; nothing was written and the store is as it was "
                "(free some space and run again)")

    def _sql(self, sql: str, params: Sequence = (), many: bool = False) -> list:
        db = self._connect()
        if db is None:
            return []
        try:
            return (db.executemany if many else db.execute)(sql, params).fetchall()
        except sqlite3.DatabaseError as err:
            raise self._table_error(err) from err

    def _state(self) -> dict:
        return dict(self._sql("SELECT name, value FROM state"))

    def state(self, prefix: str) -> dict:
        """The values noted in the state table under names starting with `prefix` (e.g. the saved
        index's description, `INDEX_STATE`), by the rest of their names."""
        return {name[len(prefix):]: value for name, value in self._state().items() if name.startswith(prefix)}

    def set_state(self, prefix: str, values: dict) -> None:
        """Replace, in one transaction, every value noted under `prefix` by `values` (their names
        prefixed); the caller holds the writers' lock (`writing`)."""
        db = self._table()
        with _all_or_nothing(db, []):
            db.execute("BEGIN IMMEDIATE")
            db.execute("DELETE FROM state WHERE name LIKE ?", (f"{prefix}%",))
            db.executemany("INSERT INTO state VALUES (?, ?)", ((prefix + name, value) for name, value in values.items()))
            db.execute("COMMIT")

    def consistent(self, read: Callable[[], T]) -> T:
        """`read()`, started again on a fresh segment list whenever the segments changed under it
        (it raised `SegmentsChanged`, or the rows moved meanwhile): what every reader of the rows
        outside this class (`clipzsl.saved_index`) runs its reads through."""
        return _consistent(lambda store: read())(self)

    def live_rows(self) -> np.ndarray:
        """The global rows of the present entries, in no particular order."""
        return np.array([r for (r,) in self._sql("SELECT row FROM entries")], np.int64)

    def close(self) -> None:
        """Close the table's connection, in the thread that used it (a later call opens it again):
        the last connection to close removes SQLite's -wal and -shm files beside the table."""
        if self._db is not None:
            self._db.close()
            self._db = None

    def noted(self, name: str) -> list[str]:
        """The strings `note` kept under `name` (e.g. the folders an image index was built from)."""
        value = self._state().get(f"note_{name}")
        return json.loads(value) if value else []

    def note(self, name: str, values: Sequence[str]) -> None:
        """Add `values` to the set of strings kept under `name` beside the entries (under the writers' lock)."""
        with self.writing() as db:
            merged = sorted({*self.noted(name), *values})
            db.execute("INSERT OR REPLACE INTO state VALUES (?, ?)", (f"note_{name}", json.dumps(merged)))

    def reload(self) -> None:
        """Re-read the segment list (other processes may have written); cheap, O(segments)."""
        rows = self._sql("SELECT name, start, rows, bytes, crc FROM segments ORDER BY start")
        segments = [Segment(*row) for row in rows]
        names = {s.name for s in segments}
        self._maps = {name: m for name, m in self._maps.items() if name in names}
        self._segments = segments

    def __len__(self) -> int:
        return self._sql("SELECT count(*) FROM entries")[0][0] if self._connect() else 0

    def __bool__(self) -> bool:
        """Whether any entry is stored: one row looked up, where `len` counts them all (44 ms at 10^7 entries,
        which every search paid)."""
        return bool(self._connect() and self._sql("SELECT 1 FROM entries LIMIT 1"))

    def __contains__(self, key: str) -> bool:
        return bool(self._sql("SELECT 1 FROM entries WHERE key = ?", (key,)))

    def keys(self) -> list[str]:
        """Present keys, in insertion order (a replaced key counts from its last write)."""
        return [k for (k,) in self._sql("SELECT key FROM entries ORDER BY row")]

    def info(self, key: str) -> str:
        """The free-form string stored with a key (e.g. an image file's size and mtime)."""
        found = self._sql("SELECT info FROM entries WHERE key = ?", (key,))
        if not found:
            raise KeyError(key)
        return found[0][0]

    def infos(self) -> dict[str, str]:
        """Every present key's info string, in one query (what an incremental update compares)."""
        return dict(self._sql("SELECT key, info FROM entries"))

    def rows_of(self, keys: Sequence[str]) -> dict[str, int]:
        """The global row of each present key among `keys`."""
        return self._rows_of(keys)

    def key_rows(self) -> tuple[list[str], np.ndarray]:
        """Every present key and its global row, in one query (how `clipzsl.metadata` maps its keys to rows)."""
        found = self._sql("SELECT key, row FROM entries")
        return [k for k, _ in found], np.fromiter((r for _, r in found), np.int64, len(found))

    def _rows_of(self, keys: Sequence[str]) -> dict[str, int]:
        found: dict[str, int] = {}
        keys = list(keys)
        for start in range(0, len(keys), _SQL_CHUNK):
            chunk = keys[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._sql(f"SELECT key, row FROM entries WHERE key IN ({marks})", chunk))
        return found

    @_consistent
    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Vectors [len(keys), D] (float32) of keys that are all present."""
        if not keys:
            return np.empty((0, self.embed_dim), np.float32)
        rows = self._rows_of(keys)
        absent = [k for k in keys if k not in rows]
        if absent:
            raise KeyError(absent[0])
        return self.read_rows(np.fromiter((rows[k] for k in keys), np.int64, len(keys)))

    def missing(self, keys: Sequence[str]) -> list[str]:
        unique = list(dict.fromkeys(keys))
        present = self._rows_of(unique)
        return [k for k in unique if k not in present]

    def _open(self, segment: Segment) -> np.ndarray | str:
        """A segment's rows memory-mapped after checking its size and checksum, or what is wrong."""
        path = self.directory / segment.name
        try:
            size = path.stat().st_size
            if size != segment.bytes:
                return f"{size} bytes, expected {segment.bytes}"
            if file_crc(path) != segment.crc:
                return "checksum mismatch"
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            return "file missing"
        except (OSError, ValueError) as err:
            return str(err)
        if mapped.shape != (segment.rows, self.embed_dim) or mapped.dtype != self.dtype:
            return f"shape {mapped.shape} {mapped.dtype}, expected ({segment.rows}, {self.embed_dim}) {self.dtype}"
        return mapped

    def _map(self, segment: Segment) -> np.ndarray:
        """The memory-mapped rows of a segment, its checksum verified on first use."""
        mapped = self._maps.get(segment.name)
        if mapped is not None:
            return mapped
        opened = self._open(segment)
        if isinstance(opened, str) and opened == "file missing":
            self.reload()  # another writer may have concatenated it into a new one
            if segment not in self._segments:
                raise SegmentsChanged()
        if isinstance(opened, str):
            self._damaged(segment, opened)
        self._maps[segment.name] = opened
        return opened

    def _damaged(self, segment: Segment, problem: str) -> NoReturn:
        """Refuse a damaged segment (an index), or set it aside and start the read again (a cache)."""
        path = self.directory / segment.name
        if self.repair_hint is not None:
            raise StoreError(f"{path}: damaged store segment ({problem}); its {segment.rows} rows cannot be "
                             f"read. {self.repair_hint}")
        warnings.warn(f"ignoring corrupt store segment {path} ({problem}); moved aside, its entries will be recomputed")
        self.set_aside([segment])
        raise SegmentsChanged()

    @contextlib.contextmanager
    def _lock(self) -> Iterator[None]:
        """The directory lock, reentrant within this object."""
        if self._holding:
            yield
            return
        self.claim()
        with locked(self.directory):
            self._holding = True
            try:
                yield
            finally:
                self._holding = False

    def set_aside(self, segments: Sequence[Segment]) -> list[str]:
        """Drop damaged segments and their entries (files renamed *.corrupt); returns the keys lost.
        Segment names come from a counter that is never reused, so no later name collides."""
        lost: list[str] = []
        with self._lock():
            self._set_aside(segments, lost)
        return lost

    def _set_aside(self, segments: Sequence[Segment], lost: list[str]) -> None:
        db = self._table()
        with _all_or_nothing(db, []):
            db.execute("BEGIN IMMEDIATE")
            for segment in segments:
                lost += [k for (k,) in db.execute("SELECT key FROM entries WHERE row >= ? AND row < ?",
                                                  (segment.start, segment.end))]
                db.execute("DELETE FROM entries WHERE row >= ? AND row < ?", (segment.start, segment.end))
                db.execute("DELETE FROM segments WHERE name = ?", (segment.name,))
            db.execute("COMMIT")
        for segment in segments:
            with contextlib.suppress(OSError):
                os.replace(self.directory / segment.name, self.directory / f"{segment.name}.corrupt")
        self.reload()

    def _locate(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Segment number of each row (-1 where no segment holds it) and the row within it."""
        starts = np.fromiter((s.start for s in self._segments), np.int64, len(self._segments))
        ends = np.fromiter((s.end for s in self._segments), np.int64, len(self._segments))
        which = np.searchsorted(starts, rows, side="right") - 1
        valid = which >= 0
        valid[valid] &= rows[valid] < ends[which[valid]]
        which[~valid] = -1
        return which, rows - np.where(valid, starts[np.maximum(which, 0)], 0)

    def read_rows(self, rows: np.ndarray, zeros_for_missing: bool = False) -> np.ndarray:
        out = np.zeros((len(rows), self.embed_dim), np.float32)
        which, offset = self._locate(rows)
        if (which < 0).any() and not zeros_for_missing:
            listed = self._segments
            self.reload()  # written by another process since we listed the segments
            which, offset = self._locate(rows)
            if (which < 0).any() and self._segments != listed:
                raise SegmentsChanged()  # compacted since the rows were looked up: look them up again
            if (which < 0).any():
                raise StoreError(f"{self.directory / 'table.sqlite'}: rows without a segment; "
                                 f"{self.repair_hint or 'delete the directory to rebuild it'}")
        for number in np.unique(which[which >= 0]):
            chosen = which == number
            out[chosen] = self._map(self._segments[number])[offset[chosen]]
        return out

    @_consistent
    def read_range(self, start: int, stop: int) -> np.ndarray:
        """Vectors of global rows [start, stop) as float32, zeros for rows of set-aside segments."""
        return self.read_rows(np.arange(start, stop, dtype=np.int64), zeros_for_missing=True)

    def _first_row(self) -> int | None:
        """The first stored row: only a compaction (which renumbers every row) or a set-aside moves it."""
        return (self._sql("SELECT min(start) FROM segments") or [(None,)])[0][0]

    def row_keys(self, rows: Sequence[int] | np.ndarray) -> dict[int, str]:
        """Live key of each of these global rows (rows of replaced or removed entries are absent)."""
        rows = [int(r) for r in rows]
        found: dict[int, str] = {}
        for start in range(0, len(rows), _SQL_CHUNK):
            chunk = rows[start : start + _SQL_CHUNK]
            marks = ",".join("?" * len(chunk))
            found.update(self._sql(f"SELECT row, key FROM entries WHERE row IN ({marks})", chunk))
        return found

    @property
    def segments(self) -> list[Segment]:
        return list(self._segments)

    @property
    def row_span(self) -> tuple[int, int]:
        """(first, next) global row: rows written so far lie in [first, next)."""
        state = self._state()
        first = self._segments[0].start if self._segments else int(state.get("next_row", 0))
        return first, int(state.get("next_row", 0))

    def dead_rows(self) -> int:
        """Rows still on disk whose entry was replaced or removed (what `compact` drops)."""
        return sum(s.rows for s in self._segments) - len(self)

    @_consistent
    def verify(self) -> list[tuple[Segment, str]]:
        """Check every segment's checksum; returns the damaged ones, with what is wrong."""
        self.reload()
        listed = self._segments
        checked = [(segment, self._open(segment)) for segment in listed]
        damaged = [(segment, problem) for segment, problem in checked if isinstance(problem, str)]
        if any(problem == "file missing" for _, problem in damaged):
            self.reload()
            if self._segments != listed:
                raise SegmentsChanged()  # merged or compacted by another writer meanwhile, not damaged: check again
        return damaged

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def writing(self) -> Iterator[sqlite3.Connection]:
        """Lock, create the files if new, drop what killed writers left; a full disk is one clear error."""
        try:
            with self._lock():
                self._write_meta()
                db = self._table()
                self._remove_orphans()
                self.reload()
                yield db
        except (OSError, sqlite3.OperationalError) as err:
            if disk_full(err):
                raise StoreError(self._full_message()) from err
            raise

    def _write_meta(self) -> None:
        """Create meta.json; once it exists, only add this writer's precision to it (under the lock)."""
        path = self.directory / "meta.json"
        meta: dict[str, Any]
        if not path.exists():
            meta = {"format": FORMAT, "fingerprint": self.fingerprint, "embed_dim": self.embed_dim,
                    "spec": self.spec, "dtype": self.dtype.name}
        else:
            meta = self.read_meta(self.directory)
            if self.precision is None or self.precision in meta.get("precisions", []):
                return
        if self.precision is not None:
            meta["precisions"] = sorted({*meta.get("precisions", []), self.precision})
        text = json.dumps(meta, indent=2)
        atomic_write(path, lambda f: f.write(text.encode()))

    def _remove_orphans(self) -> None:
        """Segments no committed transaction names, and temp files: a killed writer's leftovers."""
        known = {name for (name,) in self._sql("SELECT name FROM segments")}
        for path in self.directory.glob("seg-*.npy"):
            if path.name not in known:
                path.unlink(missing_ok=True)
        for path in self.directory.glob(".*.tmp"):
            path.unlink(missing_ok=True)

    def add(self, keys: Sequence[str], vectors: np.ndarray, info: Sequence[str] | None = None) -> None:
        """Append (or replace) entries as one new segment: O(len(keys)), whatever the store's size."""
        if not len(keys):
            return
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.embed_dim)
        with self.writing():
            self._append(list(keys), vectors, list(info) if info else [""] * len(keys))
            self._maintain()

    def remove(self, keys: Sequence[str]) -> None:
        """Forget entries (their rows are dropped from disk by the next compaction)."""
        if not keys:
            return
        with self.writing() as db:
            with _all_or_nothing(db, []):
                db.execute("BEGIN IMMEDIATE")
                db.executemany("DELETE FROM entries WHERE key = ?", [(k,) for k in keys])
                db.execute("COMMIT")
            self._maintain()

    def get_or_compute(
        self, keys: Sequence[str], compute: Callable[[list[str]], np.ndarray], best_effort: bool = False
    ) -> np.ndarray:
        """Vectors for `keys`, computing and storing only those no process has stored yet.

        The vectors are computed outside the lock, WRITE_CHUNK keys at a time, and each chunk is
        appended under the lock with only its keys still missing then: a long job never keeps
        another writer waiting for more than one append, and no key is stored twice.
        `best_effort` (for caches): when storing fails (full disk, read-only directory), warn
        and return the computed vectors anyway."""
        unstored: dict[str, np.ndarray] = {}
        for _ in range(_READ_ATTEMPTS):
            self.reload()
            todo = [k for k in self.missing(keys) if k not in unstored]
            try:
                for start in range(0, len(todo), WRITE_CHUNK):
                    chunk = self.missing(todo[start : start + WRITE_CHUNK])  # others may have stored some meanwhile
                    if chunk:
                        vectors = np.asarray(compute(chunk), dtype=np.float32)
                        if unstored or not self._store_missing(chunk, vectors, best_effort):
                            unstored.update(zip(chunk, vectors))
                return _assemble(keys, unstored, self)
            except SegmentsChanged:
                continue  # a damaged segment was set aside meanwhile: its keys are missing now, compute them
        raise self._unsettled()

    def _store_missing(self, keys: list[str], vectors: np.ndarray, best_effort: bool) -> bool:
        """Append, under the lock, the entries no process has stored since `keys` were found missing.
        False (after a warning) when storing fails and `best_effort` lets the caller go on without it."""
        try:
            with self.writing():
                still = set(self.missing(keys))
                chosen = [i for i, key in enumerate(keys) if key in still]
                if chosen:
                    self._append([keys[i] for i in chosen], vectors[chosen], [""] * len(chosen))
                    self._maintain()
            return True
        except (StoreError, OSError) as err:
            if not best_effort:
                raise
            warnings.warn(f"could not write the cache {self.directory} ({err}); continuing without it")
            return False

    def _append(self, keys: list[str], vectors: np.ndarray, info: list[str]) -> None:
        """Write one segment and commit its rows; caller holds the lock (`_writing`)."""
        data = _npy_bytes(np.ascontiguousarray(vectors, dtype=self.dtype))
        db = self._table()
        new: list[Path] = []
        with _all_or_nothing(db, new):
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'segments'").fetchone()
            name = f"seg-{(seq[0] if seq else 0) + 1:06d}.npy"
            start = int((db.execute("SELECT value FROM state WHERE name = 'next_row'").fetchone() or [0])[0])
            new.append(self.directory / name)
            atomic_write(new[0], lambda f: f.write(data))
            db.execute("INSERT INTO segments(name, start, rows, bytes, crc) VALUES (?, ?, ?, ?, ?)",
                       (name, start, len(keys), len(data), zlib.crc32(data)))
            db.executemany("INSERT OR REPLACE INTO entries(key, row, info) VALUES (?, ?, ?)",
                           zip(keys, range(start, start + len(keys)), info))
            db.execute("INSERT OR REPLACE INTO state VALUES ('next_row', ?)", (start + len(keys),))
            db.execute("COMMIT")
        self.reload()

    def _maintain(self) -> None:
        """Amortised upkeep after a write: concatenate a run of small segments, compact when mostly dead.
        A damaged segment it finds is set aside (with a warning); the upkeep then waits for the next write."""
        with contextlib.suppress(SegmentsChanged):
            self._upkeep()

    def _upkeep(self) -> None:
        tail: list[Segment] = []
        for segment in reversed(self._segments):
            if segment.rows >= SMALL_SEGMENT_ROWS or (tail and segment.end != tail[-1].start):
                break
            tail.append(segment)
        if len(tail) > MAX_SEGMENTS:
            self._concatenate(tail[::-1])
        dead = self.dead_rows()
        if dead > SMALL_SEGMENT_ROWS and dead > len(self):
            self._compact()

    def _concatenate(self, segments: list[Segment]) -> None:
        """Replace contiguous segments by one file holding the same rows (entries are unchanged)."""
        vectors = np.concatenate([np.asarray(self._map(s)) for s in segments])
        data = _npy_bytes(vectors)
        db = self._table()
        new: list[Path] = []
        with _all_or_nothing(db, new):
            db.execute("BEGIN IMMEDIATE")
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'segments'").fetchone()
            new.append(self.directory / f"seg-{seq[0] + 1:06d}.npy")
            atomic_write(new[0], lambda f: f.write(data))
            db.executemany("DELETE FROM segments WHERE name = ?", [(s.name,) for s in segments])
            db.execute("INSERT INTO segments(name, start, rows, bytes, crc) VALUES (?, ?, ?, ?, ?)",
                       (new[0].name, segments[0].start, len(vectors), len(data), zlib.crc32(data)))
            db.execute("COMMIT")
        for segment in segments:
            (self.directory / segment.name).unlink(missing_ok=True)
        self.reload()

    def compact(self) -> None:
        """Rewrite the live rows into fresh segments, dropping replaced and removed ones."""
        with self.writing():
            for _ in range(_READ_ATTEMPTS):
                with contextlib.suppress(SegmentsChanged):  # a damaged segment was set aside: compact the others
                    return self._compact()
        raise self._unsettled()

    def _compact(self) -> None:
        live = self._sql("SELECT key, row FROM entries ORDER BY row")
        old = list(self._segments)
        first = int(self._state().get("next_row", 0))
        written: list[tuple[str, int, int, int, int]] = []
        new: list[Path] = []
        db = self._table()
        with _all_or_nothing(db, new):
            seq = (db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'segments'").fetchone() or [0])[0]
            for number, start in enumerate(range(0, len(live), COMPACT_SEGMENT_ROWS)):
                rows = np.fromiter((r for _, r in live[start : start + COMPACT_SEGMENT_ROWS]), np.int64)
                data = _npy_bytes(self.read_rows(rows).astype(self.dtype))
                name = f"seg-{seq + 1 + number:06d}.npy"
                new.append(self.directory / name)
                atomic_write(new[-1], lambda f: f.write(data))
                written.append((name, first + start, len(rows), len(data), zlib.crc32(data)))
            db.execute("BEGIN IMMEDIATE")
            db.executemany("UPDATE entries SET row = ? WHERE key = ?",
                           ((first + i, key) for i, (key, _) in enumerate(live)))
            db.execute("DELETE FROM segments")
            db.executemany("INSERT INTO segments(name, start, rows, bytes, crc) VALUES (?, ?, ?, ?, ?)", written)
            db.execute("INSERT OR REPLACE INTO state VALUES ('next_row', ?)", (first + len(live),))
            db.execute("DELETE FROM state WHERE name LIKE ?", (f"{INDEX_STATE}%",))  # its positions no longer match
            db.execute("COMMIT")
        for segment in old:
            (self.directory / segment.name).unlink(missing_ok=True)
        (self.directory / INDEX_FILE).unlink(missing_ok=True)
        self.reload()

    def clear(self) -> None:
        self._db = None
        self.destroy(self.directory)
        self._maps, self._segments, self._claimed = {}, [], False

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.directory.glob("*") if p.is_file()) if self.directory.exists() else 0

    @_consistent
    def sample_vectors(self, count: int, seed: int = 0) -> np.ndarray:
        """`count` stored vectors chosen at random (queries for measuring recall)."""
        rows = self.live_rows()
        chosen = np.random.default_rng(seed).choice(rows, min(count, len(rows)), replace=False)
        return self.read_rows(np.sort(chosen))


@contextlib.contextmanager
def _all_or_nothing(db: sqlite3.Connection, new_files: list[Path]) -> Iterator[None]:
    """A write that commits whole or leaves nothing: on any failure (a full disk, a kill signal as
    an exception) the transaction is rolled back and the segment files it created are deleted, so
    the table never names a missing file and no orphan file is left behind."""
    try:
        yield
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        for path in new_files:
            path.unlink(missing_ok=True)
        raise


def _npy_bytes(vectors: np.ndarray) -> memoryview:
    """A segment's bytes (.npy, so it can be memory-mapped), built in memory for its CRC and one write."""
    buffer = io.BytesIO()
    np.save(buffer, vectors, allow_pickle=False)
    return buffer.getbuffer()

def _new_table(f) -> None:
    """Write an empty table file (the schema) into `f`."""
    db = sqlite3.connect(":memory:")
    db.executescript(SCHEMA)
    f.write(db.serialize())
    db.close()


def _assemble(keys: Sequence[str], unstored: dict[str, np.ndarray], store: EmbeddingStore) -> np.ndarray:
    """Vectors for `keys` from the store plus freshly computed ones that could not be stored."""
    stored_keys = [k for k in dict.fromkeys(keys) if k not in unstored] if unstored else keys
    try:
        stored = store.get(stored_keys)
    except KeyError as err:
        raise SegmentsChanged() from err  # its segment was set aside as damaged since: compute it again
    if not unstored:
        return stored
    by_key = dict(zip(stored_keys, stored))
    return np.stack([unstored[k] if k in unstored else by_key[k] for k in keys])
