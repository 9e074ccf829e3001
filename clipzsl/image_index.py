"""A collection of images embedded once and searched by text, by image or by vector.

The index is an `EmbeddingStore` keyed by absolute file path, with each file's size
and modification time stored beside its vector: re-running `update` embeds only new
or changed files and forgets deleted ones (never a whole folder that is merely unmounted or
unreadable: that needs `prune`). Every `checkpoint_every` images become a
segment as they are embedded, so an interrupted run loses at most one checkpoint's
work; the FAISS index is brought up to date (new rows added, never retrained) at the end.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .backends import Backend, load_model
from .images import ImageLoadError, check_output, embed_images, expand_sources
from .prompts import query_text
from .search import recall_at_k
from .store import EmbeddingStore, StoreError


@dataclass
class UpdateReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failures: list[ImageLoadError] = field(default_factory=list)


@dataclass
class RepairReport:
    damaged: list[str] = field(default_factory=list)  # segment files set aside, with what was wrong
    reembedded: int = 0  # lost images embedded again from their files
    unrecoverable: list[str] = field(default_factory=list)  # lost images whose files are gone or unreadable
    index_rebuilt: bool = False


def file_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def is_under(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies below it (both resolved)."""
    return path == root or path.startswith(root + os.sep)


def _gone(path: str) -> bool:
    """Whether an indexed file is confirmed missing (not merely unreadable where it is)."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        pass  # permission denied on the way: still there, as far as anyone can tell
    return False


def check_roots(roots: Sequence[str], files: Sequence[str], stored: dict[str, str], prune: bool) -> None:
    """Refuse an update (StoreError) when a given folder holds indexed images but yields none now:
    missing, unreadable or empty, which is far more often an unmounted drive or a permission
    change than a collection deleted on purpose (`prune` says it was). A missing path that
    holds no indexed image is a typo: FileNotFoundError."""
    for root in roots:
        held = sum(is_under(k, root) for k in stored)
        if not held and not os.path.exists(root):
            raise FileNotFoundError(f"{root}: no such file or folder; check the path")
        if held and not prune and not any(is_under(f, root) for f in files):
            raise StoreError(
                f"{root}: now missing, unreadable or without images, but the index holds {held} images from it; "
                "nothing was changed. Mount it or fix its permissions and run again, or run again with --prune "
                "(Python: prune=True) to remove its images from the index.")


class ImageIndex:
    """Image embeddings of one model, stored in `directory`, searchable by text, image or vector."""

    def __init__(self, directory: str | os.PathLike, model: Backend | str | None = None, dtype: str = "float32",
                 device: str = "auto", precision: str = "auto"):
        """Open or create an index. Without `model`, an existing index loads the model it was built with.
        `dtype`: float32, or float16 (half the disk, as clip-retrieval stores embeddings) for a new index.
        `device`, `precision`: for a model given as a spec (`load_model`'s). The vectors are float32 on
        the CPU whatever they are, and FAISS searches them there: the installed build is faiss-cpu, and a
        query is one vector, so the device would only add a copy."""
        if model is None:
            model = EmbeddingStore.read_meta(directory).get("spec") or "packaged"
        self.model = load_model(model, device=device, precision=precision) if isinstance(model, str) else model
        self.directory = Path(directory)
        self.store = EmbeddingStore(
            directory, self.model.fingerprint, self.model.embed_dim, self.model.spec, dtype=dtype,
            repair_hint=f"Run `clipzsl index repair {directory}` to re-embed what was lost.",
            precision=self.model.precision,
        )

    def __len__(self) -> int:
        return len(self.store)

    @property
    def roots(self) -> list[str]:
        """The folders `update` was given (resolved): each indexed file lies under one of them."""
        return self.store.noted("roots")

    def update(
        self,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int | None = None,
        checkpoint_every: int = 1024,
        progress: bool | None = None,
        factory: str = "auto",
        workers: int | None = None,
        prune: bool = False,
    ) -> UpdateReport:
        """Embed new and changed images under `folders`; forget indexed files that are gone.
        `factory`: FAISS factory string of the saved index ("auto": the saved one, else by size),
        checked before anything is embedded or written.
        `batch_size`, `workers`: as in `embed_images` (None: the model's).
        `prune`: a re-index never empties a collection silently. Without it, a given folder that
        holds indexed images but now yields none (missing, unreadable, empty: an unmounted drive, a
        permission change) refuses the update with nothing changed, and an indexed file is forgotten
        only once it is confirmed gone (a file in a folder that cannot be read is kept). With it,
        every indexed file under `folders` that was not found now is forgotten."""
        given = [folders] if isinstance(folders, (str, os.PathLike)) else list(folders)
        check_output(self.directory, given)
        roots = [str(Path(p).resolve()) for p in given]
        files = list(dict.fromkeys(f for f in expand_sources(roots) if f not in roots or os.path.exists(f)))  # each once
        present = set(files)
        stored = self.store.infos()
        check_roots(roots, files, stored, prune)
        gone = [k for k in stored if k not in present and any(is_under(k, r) for r in roots) and (prune or _gone(k))]
        stamps = {f: file_stamp(f) for f in files}
        todo = [f for f in files if stored.get(f) != stamps[f]]
        self.store.check_factory(factory, len(stored) - len(gone) + sum(f not in stored for f in todo))
        self.store.claim()  # a folder clipzsl did not make is refused before the first write
        self.store.note("roots", sorted(set(self.roots) | set(roots)))  # what each image is served from
        self.store.remove(gone)
        report = UpdateReport(removed=len(gone))
        report.unchanged = len(files) - len(todo)
        for start in range(0, len(todo), checkpoint_every):
            chunk = todo[start : start + checkpoint_every]
            result = embed_images(self.model, chunk, batch_size=batch_size, skip_errors=True, progress=progress,
                                  workers=workers)
            report.failures += result.failures
            report.updated += sum(1 for f in result.sources if f in stored)
            report.added += sum(1 for f in result.sources if f not in stored)
            if result.sources:
                self.store.add(result.sources, result.embeddings.numpy(), [stamps[f] for f in result.sources])
        self.store.save_index(factory)
        return report

    def query_vector(self, query: str | torch.Tensor | np.ndarray | os.PathLike) -> np.ndarray:
        """A query as one embedding [1, D]: text, an image file (`pathlib.Path`), or a vector."""
        if isinstance(query, str):
            return self.model.encode_texts([query_text(query)]).float().cpu().numpy()
        if isinstance(query, os.PathLike):
            return embed_images(self.model, [str(query)], progress=False).embeddings.numpy()
        vector = query.float().cpu().numpy() if isinstance(query, torch.Tensor) else np.asarray(query, np.float32)
        return vector.reshape(1, -1)

    def search(self, query: str | torch.Tensor | np.ndarray | os.PathLike, top_k: int = 10) -> list[tuple[str, float]]:
        """The `top_k` (path, cosine similarity) pairs, best first, for a text query, an image
        file (as a `pathlib.Path`) or a query embedding."""
        if len(self.store) == 0:
            return []
        return self.store.search(self.query_vector(query), top_k)[0]

    def info(self, sample: int = 100) -> dict:
        """Size, dtype, FAISS factory and recall@10 of the saved index against exact search,
        measured now on `sample` stored vectors as queries (every checksum is verified first)."""
        damaged = self.store.verify()
        if damaged:
            segment, problem = damaged[0]
            raise StoreError(f"{self.directory / segment.name}: damaged store segment ({problem}); "
                             f"{len(damaged)} damaged in all. {self.store.repair_hint}")
        state = self.store.index_state()
        result = {"images": len(self.store), "bytes": self.store.size_bytes(), "dtype": self.store.dtype.name,
                  "model": self.model.spec, "segments": len(self.store.segments), "dead_rows": self.store.dead_rows(),
                  "factory": state.get("factory", "Flat"), "search_parameter": state.get("param"),
                  "recall_at_10": None, "recall_sample": 0}
        if len(self.store):
            queries = self.store.sample_vectors(sample)
            found = [[hit for hit, _ in hits] for hits in self.store.search(queries, 10)]
            exact = self.store.exact_ids(queries, min(10, len(self.store)))
            names = self.store.row_keys(np.unique(exact))
            exact_keys = [[names[r] for r in row] for row in exact.tolist()]
            result["recall_at_10"] = recall_at_k(found, exact_keys)
            result["recall_sample"] = len(queries)
        return result

    def repair(self, batch_size: int | None = None, progress: bool | None = None,
               workers: int | None = None) -> RepairReport:
        """Set damaged segments aside, embed their images again from their files, rebuild a damaged index."""
        report = RepairReport()
        damaged = self.store.verify()
        report.damaged = [f"{segment.name} ({problem})" for segment, problem in damaged]
        lost = self.store.set_aside([segment for segment, _ in damaged]) if damaged else []
        readable = [k for k in lost if os.path.isfile(k)]
        report.unrecoverable = [k for k in lost if not os.path.isfile(k)]
        for start in range(0, len(readable), 1024):
            chunk = readable[start : start + 1024]
            result = embed_images(self.model, chunk, batch_size=batch_size, skip_errors=True, progress=progress,
                                  workers=workers)
            report.unrecoverable += [failure.source for failure in result.failures]
            if result.sources:
                self.store.add(result.sources, result.embeddings.numpy(), [file_stamp(f) for f in result.sources])
            report.reembedded += len(result.sources)
        report.index_rebuilt = self.store.index_problem() is not None
        self.store.save_index()  # a damaged one is built afresh
        return report
