"""A folder of images embedded once and searched by text.

The index is an `EmbeddingStore` keyed by absolute file path, with each file's size
and modification time stored beside its vector: re-running `update` embeds only new
or changed files and forgets deleted ones. Progress is written every
`checkpoint_every` images, so an interrupted run loses at most one checkpoint's work.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from .backends import Backend, load_model
from .images import ImageLoadError, embed_images, expand_sources
from .search import build_index, search
from .store import EmbeddingStore


@dataclass
class UpdateReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failures: list[ImageLoadError] = field(default_factory=list)


def file_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


class ImageIndex:
    """Image embeddings of one model, stored in `directory`, searchable by text."""

    def __init__(self, directory: str | os.PathLike, model: Backend | str | None = None):
        """Open or create an index. Without `model`, an existing index loads the model it was built with."""
        if model is None:
            model = EmbeddingStore.read_meta(directory).get("spec") or "packaged"
        self.model = load_model(model) if isinstance(model, str) else model
        self.store = EmbeddingStore(directory, self.model.fingerprint, self.model.embed_dim, self.model.spec)

    def __len__(self) -> int:
        return len(self.store)

    def update(
        self,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int = 32,
        checkpoint_every: int = 256,
        progress: bool | None = None,
    ) -> UpdateReport:
        """Embed new and changed images under `folders`; forget indexed files that are gone."""
        roots = [str(Path(p).resolve()) for p in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
        files = expand_sources(roots)
        present = set(files)
        gone = [k for k in self.store.keys() if k not in present and any(k == r or k.startswith(r + os.sep) for r in roots)]
        self.store.remove(gone)
        report = UpdateReport(removed=len(gone))
        stamps = {f: file_stamp(f) for f in files}
        todo = [f for f in files if f not in self.store or self.store.info(f) != stamps[f]]
        report.unchanged = len(files) - len(todo)
        for start in range(0, len(todo), checkpoint_every):
            chunk = todo[start : start + checkpoint_every]
            result = embed_images(self.model, chunk, batch_size=batch_size, skip_errors=True, progress=progress)
            report.failures += result.failures
            report.updated += sum(1 for f in result.sources if f in self.store)
            report.added += sum(1 for f in result.sources if f not in self.store)
            if result.sources:
                self.store.add(result.sources, result.embeddings.numpy(), [stamps[f] for f in result.sources])
        return report

    def search(self, query: str | torch.Tensor, top_k: int = 10, index: str = "auto") -> list[tuple[str, float]]:
        """The `top_k` (path, cosine similarity) pairs for a text query or a query embedding."""
        if len(self.store) == 0:
            return []
        vector = self.model.encode_texts([query]) if isinstance(query, str) else query.reshape(1, -1)
        keys = self.store.keys()
        similarities, ids = search(build_index(self.store.get(keys), index), vector.float().numpy(), top_k)
        return [(keys[i], float(s)) for i, s in zip(ids[0], similarities[0]) if i >= 0]
