"""clipzsl.search.set_search_parameter: the speed/recall knob of an approximate index, set by the index's kind."""
from __future__ import annotations

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from clipzsl.search import build_index, set_search_parameter  # noqa: E402


def vectors(count: int = 2_000, dim: int = 16) -> np.ndarray:
    v = np.random.default_rng(0).normal(size=(count, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_ivf_gets_nprobe_and_hnsw_gets_efsearch():
    ivf = build_index(vectors(), "IVF16,Flat")
    assert set_search_parameter(ivf, 7) == "nprobe" and faiss.extract_index_ivf(ivf).nprobe == 7
    hnsw = build_index(vectors(), "HNSW16")
    assert set_search_parameter(hnsw, 48) == "efSearch" and hnsw.hnsw.efSearch == 48


def test_flat_and_non_positive_values_set_nothing():
    assert set_search_parameter(build_index(vectors(), "Flat"), 8) is None
    ivf = build_index(vectors(), "IVF16,Flat")
    before = faiss.extract_index_ivf(ivf).nprobe
    assert set_search_parameter(ivf, 0) is None and faiss.extract_index_ivf(ivf).nprobe == before
