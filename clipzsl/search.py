"""FAISS indexes over embeddings: top-k labels for images, top-k images for a text.

Configuration is a FAISS index factory string ("Flat" is exact; "HNSW32",
"IVF1024,Flat" and "PQ192x4fs" are approximate), always with the inner-product metric,
which on L2-normalised vectors is cosine similarity. `auto` (`factory_for`) picks exact
search up to `AUTO_EXACT_LIMIT` vectors, then 4-bit fast-scan PQ codes (whose top
candidates the saved index re-ranks with the exact rows), in an inverted file above
`AUTO_FLAT_CODES_LIMIT`.
"""
from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

from .errors import InputError

AUTO_EXACT_LIMIT = 200_000
#: above this many vectors the fast-scan codes go into an inverted file, probed in part, not one list scanned whole
AUTO_FLAT_CODES_LIMIT = 20_000_000


def factory_for(count: int, dim: int, factory: str = "auto") -> str:
    """The factory string that `factory` means for `count` `dim`-dimensional vectors: itself, or for "auto"
    one chosen by size.

    "auto" is chosen by measurement (benchmarks/results/ann.md, issue 21). Text queries sit far from the
    images they should find (the modality gap), so their true neighbours are scattered over the
    collection's partitions: an inverted file or a graph must visit a large share of it to find them
    (IVF-Flat needed 256 of 1,024 cells for 0.95 recall@10 at 10^6). Scanning every vector's 4-bit
    fast-scan PQ code (2 dimensions a sub-quantizer: 1/8 of the float16 rows) and re-ranking the best few
    hundred with the exact rows (`clipzsl.saved_index`) reaches 0.95 on both kinds of query in a few ms
    at 10^6. Up to AUTO_EXACT_LIMIT exact search costs no build and finds everything."""
    if factory != "auto":
        return factory
    if count <= AUTO_EXACT_LIMIT:
        return "Flat"
    return fast_scan_factory(count, fast_scan_subquantizers(dim)[0])


def fast_scan_subquantizers(dim: int) -> list[int]:
    """The numbers of sub-quantizers a fast-scan PQ code of `dim` dimensions can have, most first: those that
    divide `dim` with at least 2 dimensions each (dim / 2 first for an even dim)."""
    return [m for m in range(dim // 2, 0, -1) if dim % m == 0] or [1]


def fast_scan_factory(count: int, subquantizers: int) -> str:
    """4-bit fast-scan PQ codes of `subquantizers` bytes / 2 a vector for `count` vectors: one list scanned
    whole, or above AUTO_FLAT_CODES_LIMIT in an inverted file of `ivf_cells` cells."""
    codes = f"PQ{subquantizers}x4fs"
    return codes if count <= AUTO_FLAT_CODES_LIMIT else f"IVF{ivf_cells(count)},{codes}"


def ivf_cells(count: int) -> int:
    """Inverted-file cells for `count` vectors: the power of 2 nearest sqrt(count)."""
    return 2 ** round(math.log2(math.sqrt(max(count, 1))))


def new_index(factory: str, dim: int, count: int):
    """An empty FAISS inner-product index of `factory` for `dim`-dimensional vectors, to be trained on
    `count` of them; a string FAISS rejects (or one needing more training vectors) is an InputError.
    Calling it before any work is how a bad factory is refused with nothing written."""
    import faiss

    try:
        index = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    except RuntimeError as err:
        reason = str(err).rsplit(": ", 1)[-1]
        raise InputError(f"invalid FAISS index factory string {factory!r} for {dim}-dimensional vectors: {reason}; "
                         "see https://github.com/facebookresearch/faiss/wiki/The-index-factory") from err
    needed = 39 * getattr(index, "nlist", 1)  # FAISS's minimum: 39 vectors per inverted-file cell
    if not index.is_trained and count < needed:
        raise InputError(f"index {factory!r} needs at least {needed} training vectors, not the {count} there are; "
                         "choose a smaller factory (or auto)")
    return index


def build_index(vectors: np.ndarray, factory: str = "auto", add: bool = True):
    """A FAISS inner-product index trained on `vectors` and (with `add`) holding them (row i has id i)."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    index = new_index(factory_for(len(vectors), vectors.shape[1], factory), vectors.shape[1], len(vectors))
    if not index.is_trained:
        index.train(vectors)
    if add:
        index.add(vectors)
    return index


def check_top_k(k: int) -> None:
    """Refuse k < 1 with a clear error: FAISS would fail on a bare assertion, torch return nothing."""
    if k < 1:
        raise InputError(f"top_k must be at least 1, got {k}")


#: the search-time knob of each approximate index kind, in the order they are looked for
SEARCH_KNOBS = ("nprobe", "efSearch")


def set_search_parameter(index, value: int) -> str | None:
    """Set an approximate index's search-time knob, nprobe (IVF) or efSearch (HNSW), to `value`:
    the speed/recall trade-off that tuning and the benchmarks sweep. Returns the knob's name, or
    None (nothing set) for an index without one (Flat) or a `value` below 1."""
    import faiss

    space = faiss.ParameterSpace()
    space.initialize(index)
    names = {space.parameter_ranges.at(i).name for i in range(space.parameter_ranges.size())}
    name = next((knob for knob in SEARCH_KNOBS if knob in names), None)
    if name is None or value < 1:
        return None
    space.set_index_parameter(index, name, value)
    return name


def write_index(index, file) -> None:
    """Write an index into an open binary file, streamed rather than copied in memory (the store
    gives it the temporary file of an atomic write)."""
    import faiss

    faiss.write_index(index, faiss.PyCallbackIOWriter(file.write))  # type: ignore[attr-defined]  # in the SWIG module, not its stubs


def load_index(path: os.PathLike, mmap: bool = False):
    """Read a saved index; `mmap` maps it instead (opening costs no read, but it cannot grow)."""
    import faiss

    return faiss.read_index(str(path), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mmap else 0)


def search(index, queries: np.ndarray, k: int, params=None) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids), each [N, k], best first; k is capped at the index size. `params`: FAISS
    SearchParameters (e.g. `selector_parameters`'), None for the index's own settings.

    A batch of queries is scored as one matrix product: below `distance_compute_blas_threshold`
    queries (128,000 in FAISS 1.15) FAISS reads a flat index once per query, so 64 queries on
    200,000 vectors took 1,344 ms one scan each and 62 ms as a product on 2 cores, with the same
    hits and their scores to float32 rounding. The setting is FAISS's, process-wide: it is set and
    restored under a lock."""
    check_top_k(k)
    k = min(k, index.ntotal)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if len(queries) < 2:
        return _searched(index, queries, k, params)
    import faiss

    with _FAISS_SETTING:
        saved = faiss.cvar.distance_compute_blas_threshold
        faiss.cvar.distance_compute_blas_threshold = 2
        try:
            return _searched(index, queries, k, params)
        finally:
            faiss.cvar.distance_compute_blas_threshold = saved


_FAISS_SETTING = threading.Lock()


def _searched(index, queries: np.ndarray, k: int, params) -> tuple[np.ndarray, np.ndarray]:
    """`index.search`, with `params` only where given (so any object with FAISS's search(x, k) will do)."""
    return index.search(queries, k) if params is None else index.search(queries, k, params=params)


def selector_parameters(index, keep: np.ndarray):
    """FAISS SearchParameters that restrict a search of `index` to the positions where `keep` (bool, one
    per position) is true, through an IDSelectorBitmap; None for an index whose search takes no selector
    (flat fast-scan PQ codes: FAISS 1.15 refuses any parameters). The index's nprobe / efSearch grows by
    the share filtered out (size / allowed), so that as many allowed candidates are visited as unfiltered:
    HNSW at efSearch 16 found 0.48 of a 16% subset's top 10 without it."""
    import faiss

    fs: Any = faiss  # the SWIG module: its stubs predate search parameters
    if isinstance(index, fs.IndexFastScan):
        return None
    bits = np.packbits(keep, bitorder="little")
    selector = fs.IDSelectorBitmap(len(bits), fs.swig_ptr(bits))
    spread = len(keep) / max(1, int(keep.sum()))
    try:
        ivf = fs.extract_index_ivf(index)
        params = fs.SearchParametersIVF(sel=selector, nprobe=min(ivf.nlist, math.ceil(ivf.nprobe * spread)))
    except RuntimeError:  # not an inverted file
        params = (fs.SearchParametersHNSW(sel=selector, efSearch=min(index.ntotal, math.ceil(index.hnsw.efSearch * spread)))
                  if hasattr(index, "hnsw") else fs.SearchParameters(sel=selector))
    params.referenced = (bits, selector)  # FAISS keeps raw pointers: both must live as long as the parameters
    return params


def recall_at_k(approximate_ids, exact_ids) -> float:
    """Share of the exact top-k that the approximate search also returned (rows of ids or keys)."""
    hits = sum(len(set(a) & set(e)) for a, e in zip(approximate_ids, exact_ids))
    return hits / sum(len(e) for e in exact_ids)
