"""A durable on-disk store of embeddings, keyed by strings, for one model.

Label embeddings (so no label is encoded twice) and image embeddings (so a folder
is embedded once, and re-indexing adds only new or changed files) live in stores.

Layout: a directory with `meta.json` (the model fingerprint and dimension) and
append-only segment files `seg-*.npz`. Every write goes to a temporary file that is
fsync'ed and renamed, so a process killed at any moment leaves the previous state
loadable. Segments are zip archives whose members carry CRC-32s, so a truncated or
corrupted segment is detected on read and ignored with a warning (its entries are
simply missing and get recomputed), never served as wrong vectors. Writers take an
exclusive file lock, so concurrent processes never lose or duplicate each other's work.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

#: more segments than this are merged into one on the next write
MAX_SEGMENTS = 16


class StoreError(RuntimeError):
    """A store that cannot be used as asked (another model's, unreadable metadata)."""


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Argument, else $CLIPZSL_CACHE_DIR, else $XDG_CACHE_HOME/clipzsl, else ~/.cache/clipzsl."""
    if cache_dir:
        return Path(cache_dir)
    if os.environ.get("CLIPZSL_CACHE_DIR"):
        return Path(os.environ["CLIPZSL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "clipzsl"


def atomic_write(path: Path, write: Callable[[object], None]) -> None:
    """Call `write(file)` on a temporary sibling, fsync it, then rename it over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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
    """Exclusive lock on a directory, across processes (released if the holder dies)."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def digest(text: str, length: int = 32) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


class EmbeddingStore:
    """Key -> vector for one model fingerprint; later writes of a key replace earlier ones."""

    def __init__(self, directory: str | os.PathLike, fingerprint: str, embed_dim: int, spec: str = ""):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.embed_dim = embed_dim
        self.spec = spec  # the model spec that built it, so a reader can load the same model
        self._check_meta()
        self._vectors = np.empty((0, embed_dim), np.float32)
        self._row: dict[str, int] = {}
        self._info: dict[str, str] = {}
        self._segments: list[str] = []
        self.reload()

    @classmethod
    def for_labels(cls, backend, cache_dir: str | os.PathLike | None = None) -> "EmbeddingStore":
        """The label-embedding cache of a backend: one directory per fingerprint."""
        directory = cache_root(cache_dir) / "labels" / digest(backend.fingerprint)
        return cls(directory, backend.fingerprint, backend.embed_dim, backend.spec)

    @staticmethod
    def read_meta(directory: str | os.PathLike) -> dict:
        """The metadata of an existing store: fingerprint, embed_dim and model spec."""
        path = Path(directory) / "meta.json"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError as err:
            raise StoreError(f"{directory} is not a clipzsl store or index (no meta.json).") from err
        except (OSError, ValueError) as err:
            raise StoreError(f"{path}: unreadable store metadata ({err}); delete {directory} to rebuild.") from err

    # -- reading -------------------------------------------------------------------------

    def _check_meta(self) -> None:
        if not (self.directory / "meta.json").exists():
            return
        meta = self.read_meta(self.directory)
        if meta.get("fingerprint") != self.fingerprint or meta.get("embed_dim") != self.embed_dim:
            raise StoreError(
                f"{self.directory} holds embeddings of model {meta.get('fingerprint')!r} "
                f"(dim {meta.get('embed_dim')}), not of {self.fingerprint!r} (dim {self.embed_dim}); "
                "use the model it was built with, or another directory."
            )

    def reload(self) -> None:
        """Read every intact segment (oldest first, so later entries win)."""
        names = sorted(p.name for p in self.directory.glob("seg-*.npz")) if self.directory.exists() else []
        if names == self._segments:
            return
        vectors, row, info = [], {}, {}
        count = 0
        for name in names:
            segment = _read_segment(self.directory / name, self.embed_dim)
            if segment is None:
                continue
            keys, seg_vectors, seg_info, deleted = segment
            vectors.append(seg_vectors)
            if not deleted.any():  # the common case, without a Python-level branch per key
                row.update(zip(keys, range(count, count + len(keys))))
                info.update(zip(keys, seg_info))
            else:
                for i, key in enumerate(keys):
                    if deleted[i]:
                        row.pop(key, None)
                        info.pop(key, None)
                    else:
                        row[key] = count + i
                        info[key] = seg_info[i]
            count += len(keys)
        self._vectors = np.concatenate(vectors) if vectors else np.empty((0, self.embed_dim), np.float32)
        self._row, self._info, self._segments = row, info, names

    def __len__(self) -> int:
        return len(self._row)

    def __contains__(self, key: str) -> bool:
        return key in self._row

    def keys(self) -> list[str]:
        """Present keys, in insertion order."""
        return sorted(self._row, key=self._row.__getitem__)

    def info(self, key: str) -> str:
        """The free-form string stored with a key (e.g. an image file's size and mtime)."""
        return self._info[key]

    def get(self, keys: Sequence[str]) -> np.ndarray:
        """Vectors [len(keys), D] of keys that are all present."""
        return self._vectors[[self._row[k] for k in keys]] if keys else np.empty((0, self.embed_dim), np.float32)

    def missing(self, keys: Sequence[str]) -> list[str]:
        return [k for k in dict.fromkeys(keys) if k not in self._row]

    # -- writing -------------------------------------------------------------------------

    def add(self, keys: Sequence[str], vectors: np.ndarray, info: Sequence[str] | None = None) -> None:
        """Append (or replace) entries in one atomic segment."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(len(keys), self.embed_dim)
        with locked(self.directory):
            self._write_segment(list(keys), vectors, list(info) if info else [""] * len(keys), np.zeros(len(keys), bool))

    def remove(self, keys: Sequence[str]) -> None:
        keys = [k for k in keys if k in self._row]
        if keys:
            with locked(self.directory):
                zeros = np.zeros((len(keys), self.embed_dim), np.float32)
                self._write_segment(keys, zeros, [""] * len(keys), np.ones(len(keys), bool))

    def get_or_compute(self, keys: Sequence[str], compute: Callable[[list[str]], np.ndarray]) -> np.ndarray:
        """Vectors for `keys`, computing and storing only those no process has stored yet."""
        self.reload()
        if self.missing(keys):
            with locked(self.directory):
                self.reload()  # another process may have added some while we waited
                todo = self.missing(keys)
                if todo:
                    vectors = np.asarray(compute(todo), dtype=np.float32)
                    self._write_segment(todo, vectors, [""] * len(todo), np.zeros(len(todo), bool))
        return self.get(keys)

    def _write_segment(self, keys: list[str], vectors: np.ndarray, info: list[str], deleted: np.ndarray) -> None:
        """Write one segment; caller holds the lock. Compacts when segments pile up."""
        self._write_meta()
        name = f"seg-{len(self._segments_on_disk()):06d}-{uuid.uuid4().hex[:8]}.npz"
        atomic_write(self.directory / name, lambda f: _save_segment(f, keys, vectors, info, deleted))
        self.reload()
        if len(self._segments) > MAX_SEGMENTS:
            self._compact()

    def _segments_on_disk(self) -> list[Path]:
        return sorted(self.directory.glob("seg-*.npz"))

    def _write_meta(self) -> None:
        path = self.directory / "meta.json"
        if not path.exists():
            meta = json.dumps({"fingerprint": self.fingerprint, "embed_dim": self.embed_dim, "spec": self.spec}, indent=2)
            atomic_write(path, lambda f: f.write(meta.encode()))

    def _compact(self) -> None:
        """Merge all segments into one; old ones are deleted only after the new one is durable."""
        old = self._segments_on_disk()
        keys = self.keys()
        merged = f"seg-{len(old):06d}-{uuid.uuid4().hex[:8]}.npz"
        atomic_write(
            self.directory / merged,
            lambda f: _save_segment(f, keys, self.get(keys), [self._info[k] for k in keys], np.zeros(len(keys), bool)),
        )
        for path in old:
            path.unlink(missing_ok=True)
        # the merged file sorts after the deleted ones only by accident; rename it to sort first
        os.replace(self.directory / merged, self.directory / f"seg-000000-{merged[11:]}")
        self.reload()

    def clear(self) -> None:
        with locked(self.directory):
            for path in self._segments_on_disk():
                path.unlink()
            (self.directory / "meta.json").unlink(missing_ok=True)
            self.reload()

    def size_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._segments_on_disk())


def _save_segment(f, keys: list[str], vectors: np.ndarray, info: list[str], deleted: np.ndarray) -> None:
    np.savez(f, keys=np.array(keys, dtype=str), vectors=vectors, info=np.array(info, dtype=str), deleted=deleted)


def _read_segment(path: Path, embed_dim: int):
    """(keys, vectors, info, deleted) of an intact segment, else None with a warning."""
    try:
        with np.load(path, allow_pickle=False) as data:
            keys, vectors = data["keys"].tolist(), data["vectors"]
            info, deleted = data["info"].tolist(), data["deleted"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"ignoring corrupt store segment {path} ({err}); moved aside, its entries will be recomputed")
        with contextlib.suppress(OSError):
            os.replace(path, path.with_name(path.name + ".corrupt"))
        return None
    if vectors.shape != (len(keys), embed_dim) or len(info) != len(keys) or len(deleted) != len(keys):
        warnings.warn(f"ignoring store segment {path}: inconsistent shapes; its entries will be recomputed")
        return None
    return keys, vectors.astype(np.float32, copy=False), info, deleted
