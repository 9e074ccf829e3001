"""FAISS indexes over embeddings: top-k labels for images, top-k images for a text.

Configuration is a FAISS index factory string ("Flat" is exact; "HNSW32" and
"IVF1024,Flat" are approximate), always with the inner-product metric, which on
L2-normalised vectors is cosine similarity. `auto` picks exact search up to
`AUTO_EXACT_LIMIT` vectors and HNSW above it.
"""
from __future__ import annotations

import numpy as np

AUTO_EXACT_LIMIT = 200_000


def factory_for(count: int, spec: str = "auto") -> str:
    """The factory string that `spec` means for `count` vectors."""
    if spec != "auto":
        return spec
    return "Flat" if count <= AUTO_EXACT_LIMIT else "HNSW32"


def build_index(vectors: np.ndarray, spec: str = "auto"):
    """A FAISS inner-product index holding `vectors` (row i has id i)."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    factory = factory_for(len(vectors), spec)
    try:
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        raise ValueError(f"invalid FAISS index factory string {factory!r}: {err}") from err
    if not index.is_trained:
        if len(vectors) < 39 * getattr(index, "nlist", 1):
            raise ValueError(f"index {factory!r} needs more training vectors than the {len(vectors)} given")
        index.train(vectors)
    index.add(vectors)
    return index


def check_top_k(k: int) -> None:
    """Refuse k < 1 with a clear error: FAISS would fail on a bare assertion, torch return nothing."""
    if k < 1:
        raise ValueError(f"top_k must be at least 1, got {k}")


def search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids), each [N, k], best first; k is capped at the index size."""
    check_top_k(k)
    k = min(k, index.ntotal)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), k)


def recall_at_k(approximate_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Share of the exact top-k that the approximate search also returned."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approximate_ids.tolist(), exact_ids.tolist()))
    return hits / exact_ids.size
