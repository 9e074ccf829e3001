"""The FAISS index saved beside a store's rows (index.faiss), in autofaiss's split of the job:

  choose  `choose_factory`: the factory string for a number of vectors ("auto": by size, else the saved one)
  build   `SavedIndex.save`: trained once on a sample when first built, then only the new rows added
  tune    `tune`: the smallest search parameter (nprobe / efSearch, `set_search_parameter`) at which
          every kind of query reaches `TARGET_RECALL`@10 against exact search: the collection's own
          vectors ("image"), and text-like queries from the index's model ("text", `TextQueries`),
          which sit far from the images (the modality gap) and need a larger parameter
  score   `recall_against_exact`, `recall_on`: recall@k of the index's search against `exact_ids`;
          `SavedIndex.measure`: both kinds, measured now on new queries
  check   `check_file`: the saved file's size and checksum against what the table noted
  search  `SavedIndex.search`: the saved index plus the rows written since, searched as one

The store (`clipzsl.store`) keeps the rows, segments, checksums and locks; the index's description
(factory, base row, rows covered, bytes, crc32, search parameter, and what it was tuned on:
`tuned_on`) is kept in the store's
table under `INDEX_STATE`, so both change in one transaction, and a compaction (which renumbers the
rows) drops them together. The in-memory FAISS helpers (factories, training, batched search) are
`clipzsl.search`'s.
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from .errors import InputError
from .search import (build_index, factory_for, fast_scan_factory, fast_scan_subquantizers, load_index, new_index, recall_at_k,
                     selector_parameters, set_search_parameter, write_index)
from .search import search as faiss_search
from .store import (COMPACT_SEGMENT_ROWS, INDEX_FILE, INDEX_STATE, VERIFY_ON_OPEN_BYTES, EmbeddingStore,
                    SegmentsChanged, StoreError, atomic_write, file_crc)

#: recall@10 the approximate index is tuned to reach against exact search
TARGET_RECALL = 0.95
#: the search parameters `tune` tries, smallest first
SEARCH_PARAMETERS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
#: recall@10 within this of the best tried counts as the best, when no parameter reaches the target
RECALL_PLATEAU = 0.005
#: candidates per query (for a top 10) that a compressed index hands to the exact re-rank, smallest first
RERANK_CANDIDATES = (20, 50, 100, 200, 400, 800, 1600, 3200)
#: rows re-ranked at once: bounds the float32 rows in memory (100,000 x 384 x 4 bytes = 154 MB)
RERANK_BLOCK = 100_000
#: the kinds of query an index is tuned and checked on: stored vectors, and texts from its model
QUERY_KINDS = ("image", "text")
#: text-like queries from the index's model: (count, part) -> [count, D] unit vectors, parts 0 (tuning)
#: and 1 (checking afresh) disjoint; None where the model's text tower is not at hand
TextQueries = Callable[[int, int], Optional[np.ndarray]]


#: ids of the candidates [Q, R] (-1: none) of queries [Q, D] -> (similarities, ids) [Q, R], exact, best first
Rerank = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
#: a search allowed this many rows or fewer scores them exactly from the store rather than searching the index,
#: unless the index is exact (Flat: `scan_rows`). Chosen on benchmarks/results/filter.md, 10^6 rows of fast-scan
#: PQ codes (which take no ID selector: post-filtered over size/allowed times the candidates, re-ranked), median
#: ms per query, scan / index: 978 allowed rows 6.8-9.3 / 30, 1,998: 7.9-8.6 / 22, 4,975: 11.5-11.7 / 17-18,
#: 9,895: 17-22 / 15. The scan's cost grows with the rows, the index's falls: the last point the scan won.
SCAN_ROWS = 5_000
#: rows a scan multiplies at once: one query's product with 1,000 rows or more goes to OpenBLAS's threads,
#: which on a busy machine stalled it (2,000 rows of d = 384: 5.5 ms median, up to 108 ms at 5,000; in blocks
#: of 512: 0.24 and 0.77 ms)
SCAN_BLOCK = 512


@dataclass(frozen=True)
class Allowed:
    """The global rows a search may return: row r is allowed where `mask[r - first]` is true; rows outside
    [first, first + len(mask)) are not. A metadata filter's rows (`clipzsl.metadata.Metadata.allowed`), or
    every row but some hidden ones (`all_but`); `&` combines two."""

    first: int
    mask: np.ndarray

    @classmethod
    def of_rows(cls, rows: np.ndarray, span: tuple[int, int]) -> "Allowed":
        """These global rows (those within `span`, the store's (first, next) row) and no others."""
        mask = np.zeros(span[1] - span[0], bool)
        rows = np.asarray(rows, np.int64) - span[0]
        mask[rows[(rows >= 0) & (rows < len(mask))]] = True
        return cls(span[0], mask)

    @classmethod
    def all_but(cls, rows: np.ndarray, span: tuple[int, int]) -> "Allowed":
        """Every row of `span` but these (hidden duplicates, say)."""
        return cls(span[0], ~cls.of_rows(rows, span).mask)

    def __and__(self, other: "Allowed") -> "Allowed":
        if (self.first, len(self.mask)) == (other.first, len(other.mask)):  # one span: no sort of every row per search
            return Allowed(self.first, self.mask & other.mask)
        return Allowed.of_rows(np.intersect1d(self.rows(), other.rows()), (self.first, self.first + len(self.mask)))

    def rows(self) -> np.ndarray:
        """The allowed global rows, ascending."""
        return np.flatnonzero(self.mask) + self.first

    def positions(self, base: int, size: int) -> np.ndarray:
        """A bool per position 0..size-1 of an index whose position 0 is global row `base`."""
        keep = np.zeros(size, bool)
        start, stop = max(base, self.first), min(base + size, self.first + len(self.mask))
        if stop > start:
            keep[start - base : stop - base] = self.mask[start - self.first : stop - self.first]
        return keep


@dataclass(frozen=True)
class Within:
    """How an index search keeps to allowed positions: FAISS `params` with an ID selector where the index
    takes one; else `keep` (a bool per position) applied to its candidates, `spread` times as many asked for
    (the index's size over the allowed count), so that as many allowed ones come back as unfiltered."""

    params: Any = None
    keep: np.ndarray | None = None
    spread: float = 1.0

    @classmethod
    def of(cls, index: Any, keep: np.ndarray) -> "Within":
        params = selector_parameters(index, keep)
        if params is not None:
            return cls(params)
        return cls(None, keep, len(keep) / max(1, int(keep.sum())))

    def kept(self, ids: np.ndarray) -> np.ndarray:
        """Candidate positions [Q, R] with those not allowed set to -1 (none)."""
        if self.keep is None:
            return ids
        return np.where((ids >= 0) & self.keep[np.maximum(ids, 0)], ids, -1)


@dataclass(frozen=True)
class Setting:
    """How a saved index is searched: `param` is its knob (nprobe / efSearch; 0: none), `rerank` the
    candidates per query (for a top 10) re-ranked with the exact stored rows (0: none)."""

    param: int = 0
    rerank: int = 0


@dataclass(frozen=True)
class Recall:
    """recall@10 against exact search on `queries` queries of one kind; `value` None: not measured
    (`queries` 0 also where an index saved before the kinds were noted did not note their number)."""

    value: float | None
    queries: int


def train_size(factory: str) -> int:
    """Training sample for an index: 64 vectors per IVF cell (FAISS wants at least 39), else 100k."""
    cells = re.search(r"IVF(\d+)", factory)
    return 64 * int(cells.group(1)) if cells else 100_000


def choose_factory(count: int, dim: int, factory: str = "auto", saved: str | None = None) -> str:
    """The factory string to build for `count` `dim`-dimensional vectors: `factory`, or with "auto" the
    `saved` one, else one chosen by size (`clipzsl.search.factory_for`)."""
    return factory_for(count, dim, saved or "auto" if factory == "auto" else factory)


def compressed(factory: str) -> bool:
    """Whether an index of `factory` keeps lossy codes (PQ, SQ), whose order the exact rows must correct."""
    return re.search(r"(^|,)(PQ|SQ)", factory) is not None


def tune(index: Any, kinds: dict[str, tuple[np.ndarray, np.ndarray]],
         rerank: Rerank | None = None) -> tuple[Setting, dict[str, float]]:
    """(setting, recall@10 per kind): the cheapest `Setting` at which the queries of every kind (kind ->
    (queries, their `exact` ids)) reach TARGET_RECALL; when none does, the cheapest whose lowest recall
    is within RECALL_PLATEAU of the best tried (a compressed index's recall stops growing long before
    every cell is probed: more would only cost time). Cheapest: the smallest knob (`SEARCH_PARAMETERS`),
    then, with `rerank`, the fewest candidates (`RERANK_CANDIDATES`) at that knob; at each knob the
    candidates grow only while recall does. The index is left set to the setting chosen."""
    tried: list[tuple[Setting, dict[str, float]]] = []
    for param in SEARCH_PARAMETERS:
        knob = set_search_parameter(index, param) is not None
        tried += _tune_candidates(index, kinds, Setting(param if knob else 0), rerank)
        if min(tried[-1][1].values()) >= TARGET_RECALL or not knob:
            break
    best = max(min(recalls.values()) for _, recalls in tried)
    floor = TARGET_RECALL if best >= TARGET_RECALL else best - RECALL_PLATEAU
    setting, recalls = next((s, r) for s, r in tried if min(r.values()) >= floor)
    set_search_parameter(index, setting.param)
    return setting, recalls


def _tune_candidates(index: Any, kinds: dict[str, tuple[np.ndarray, np.ndarray]], knob: Setting,
                     rerank: Rerank | None) -> list[tuple[Setting, dict[str, float]]]:
    """`tune`'s tries at one knob: no re-rank, or RERANK_CANDIDATES in turn until the target is reached or
    recall stops growing (within RECALL_PLATEAU)."""
    tried: list[tuple[Setting, dict[str, float]]] = []
    for count in RERANK_CANDIDATES if rerank is not None else (0,):
        setting = Setting(knob.param, count)
        recalls = {kind: recall_at_k(search_with(index, queries, 10, setting, rerank, candidates(setting, 10))[1], exact)
                   for kind, (queries, exact) in kinds.items()}
        grew = not tried or min(recalls.values()) > min(tried[-1][1].values()) + RECALL_PLATEAU
        tried.append((setting, recalls))
        if min(recalls.values()) >= TARGET_RECALL or not grew:
            break
    return tried


def candidates(setting: Setting, want: int) -> int:
    """Candidates a search for the top `want` asks the index for: the setting's re-rank count for a top
    10, in proportion for more, at least `want`."""
    return max(want, -(-setting.rerank * want // 10))


def search_with(index: Any, queries: np.ndarray, k: int, setting: Setting, rerank: Rerank | None,
                pool: int, within: Within = Within()) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) [Q, k]: the index's top `k`, or with a re-rank (`setting.rerank` > 0), its top
    `pool` (at least k) re-ordered by `rerank` and cut to `k`; only positions `within` allows (-1 for
    candidates it drops, so fewer than k may come back)."""
    if not setting.rerank or rerank is None:
        similarities, ids = faiss_search(index, queries, k, within.params)
        kept = within.kept(ids)
        return np.where(kept >= 0, similarities, -np.inf), kept
    similarities, ids = rerank(queries, within.kept(faiss_search(index, queries, max(pool, k), within.params)[1]))
    return similarities[:, :k], ids[:, :k]


def scan_rows(index: Any) -> int:
    """The most allowed rows that `SavedIndex.search` scores exactly from the store rather than searching
    `index`: SCAN_ROWS, and none for an exact (Flat) index, whose ID-selector search is exact too and skips
    the rows filtered out (benchmarks/results/filter.md, 10^5 rows, median ms, index / scan: 4.8-5.5 / 12-13.5
    at 9,889 allowed rows, 1.1-1.2 / 1.7-1.8 at 974; the scan's best gain, at 101 rows, 0.12 ms)."""
    import faiss

    return 0 if isinstance(index, faiss.IndexFlat) else SCAN_ROWS


def scan(store: EmbeddingStore, queries: np.ndarray, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, global rows) [Q, min(k, len(rows))]: the exact top `k` of `rows` (ascending), scored
    from the store, best first (ties: the lower row first)."""
    k = min(k, len(rows))
    if not k:
        return np.empty((len(queries), 0), np.float32), np.empty((len(queries), 0), np.int64)
    vectors = store.read_rows(rows)
    sims = np.hstack([queries @ vectors[start:start + SCAN_BLOCK].T for start in range(0, len(rows), SCAN_BLOCK)])
    best = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < len(rows) else np.broadcast_to(np.arange(k), sims.shape)
    best = np.sort(best, axis=1)  # ties resolve to the lower row, as FAISS's own heap does
    order = np.argsort(-np.take_along_axis(sims, best, 1), axis=1, kind="stable")
    best = np.take_along_axis(best, order, 1)
    return np.take_along_axis(sims, best, 1), rows[best]


def reranked(store: EmbeddingStore, queries: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) [Q, R]: candidate global `rows` [Q, R] (-1: none, kept last) in the order of
    their exact inner product with `queries`, read from the store RERANK_BLOCK rows at a time."""
    sims = np.full(rows.shape, -np.inf, np.float32)
    per_block = max(1, RERANK_BLOCK // max(1, rows.shape[1]))
    for start in range(0, len(rows), per_block):
        block = rows[start:start + per_block]
        found = block >= 0
        vectors = store.read_rows(block[found])
        sims[start:start + per_block][found] = np.einsum("nd,nd->n", vectors, np.repeat(
            queries[start:start + per_block], found.sum(1), axis=0))
    order = np.argsort(-sims, axis=1, kind="stable")
    return np.take_along_axis(sims, order, 1), np.take_along_axis(rows, order, 1)


def tuning_state(recalls: dict[str, float], counts: dict[str, int]) -> dict:
    """What the index state notes of a tuning: the kinds, per kind its number of queries and recall@10, and
    as `recall` the lowest of them (the one an index saved before the kinds were noted had alone)."""
    noted = {f"{kind}_{name}": value for kind in recalls for name, value in (("queries", counts[kind]),
                                                                             ("recall", recalls[kind]))}
    return {"tuned_on": ",".join(recalls), "recall": min(recalls.values()), **noted}


def tuned_on(state: dict) -> dict[str, Recall]:
    """Per kind of query, what the saved index's search parameter was tuned on (`tuning_state`); an
    index saved before the kinds were noted: its stored-vector recall alone, number not noted; {} for
    exact search. A state that names an unknown kind or lacks a kind's values is a StoreError."""
    if "tuned_on" not in state:
        return {"image": Recall(float(state["recall"]), 0)} if "recall" in state else {}
    kinds = str(state["tuned_on"]).split(",")
    if not set(kinds) <= set(QUERY_KINDS) or any(f"{k}_recall" not in state or f"{k}_queries" not in state
                                                 for k in kinds):
        raise StoreError(f"unreadable index state (tuned on {state['tuned_on']!r}): run `clipzsl index repair`")
    return {kind: Recall(float(state[f"{kind}_recall"]), int(state[f"{kind}_queries"])) for kind in kinds}


def describe_tuning(state: dict) -> str:
    """One line: what the saved index's search parameter was tuned on, and which kind was not."""
    tuned = tuned_on(state)
    if not tuned:
        return "exact search: nothing tuned"
    parts = [f"{kind} queries ({f'{r.queries}, ' if r.queries else ''}recall@10 {r.value:.3f})"
             for kind, r in tuned.items()]
    missing = "".join(f"; {kind} queries: not measured" for kind in QUERY_KINDS if kind not in tuned)
    pool, rows = int(state.get("rerank") or 0), int(state.get("rows") or 0) - int(state.get("base") or 0)
    rerank = "" if not pool else (f", every row ({rows}) re-ranked with the exact rows (an exact scan)," if pool >= rows
                                  else f", {pool} candidates re-ranked with the exact rows,")
    return f"search parameter {state.get('param', 0)}{rerank} tuned on " + " and ".join(parts) + missing


def check_file(path: Path, state: dict, full: bool = True) -> str | None:
    """What is wrong with a saved index file against its noted `state` (size; checksum when `full`), or None."""
    size = path.stat().st_size if path.exists() else -1
    if size != int(state.get("bytes", -2)):
        return f"{size} bytes, expected {state.get('bytes')}"
    if full and file_crc(path) != int(state["crc"]):
        return "checksum mismatch"
    return None


def exact_ids(store: EmbeddingStore, queries: np.ndarray, k: int) -> np.ndarray:
    """Global rows [Q, k] of the exact top-k live rows of `store`, one segment in memory at a time."""
    return store.consistent(lambda: _exact_ids(store, queries, k))


def _exact_ids(store: EmbeddingStore, queries: np.ndarray, k: int) -> np.ndarray:
    import faiss

    best = faiss.ResultHeap(len(queries), k)
    first, next_row = store.row_span
    live = np.zeros(next_row - first, bool)
    live[store.live_rows() - first] = True
    for start in range(first, next_row, COMPACT_SEGMENT_ROWS):
        stop = min(start + COMPACT_SEGMENT_ROWS, next_row)
        sims = queries @ store.read_range(start, stop).T
        sims[:, ~live[start - first : stop - first]] = -np.inf
        best.add_result(-sims, np.broadcast_to(np.arange(start, stop), sims.shape).copy())
    best.finalize()
    return best.I


def recall_against_exact(store: EmbeddingStore, sample: int, search_index: "SavedIndex",
                         seed: int = 0) -> tuple[float | None, int]:
    """(recall@10 of `search_index` against exact search, queries used) on `sample` stored vectors
    (chosen with `seed`) as queries; (None, 0) for an empty store."""
    if not len(store):
        return None, 0
    queries = store.sample_vectors(sample, seed)
    return recall_on(store, queries, search_index), len(queries)


def recall_on(store: EmbeddingStore, queries: np.ndarray, search_index: "SavedIndex") -> float:
    """recall@10 of `search_index` against exact search over the live rows of a non-empty `store`."""
    found = [[hit for hit, _ in hits] for hits in search_index.search(queries, 10)]
    exact = exact_ids(store, queries, min(10, len(store)))
    names = store.row_keys(np.unique(exact))
    return recall_at_k(found, [[names[r] for r in row] for row in exact.tolist()])


@dataclass
class _Loaded:
    """A FAISS index in memory: global row of its position 0, rows it covers, memory-mapped (read-only)?"""

    index: Any
    base: int
    covered: int
    mapped: bool
    setting: Setting = Setting()


class SavedIndex:
    """The saved FAISS index of one store: build and tune it (`save`), check it, search through it,
    measure it (`measure`). `text_queries`: the index's model's text-like queries; None (a store of
    vectors alone) tunes and measures on stored vectors only, and says text queries were not measured."""

    def __init__(self, store: EmbeddingStore, text_queries: TextQueries | None = None):
        self.store = store
        self.text_queries = text_queries
        self._loaded: _Loaded | None = None

    @property
    def path(self) -> Path:
        return self.store.directory / INDEX_FILE

    def state(self) -> dict:
        """What the saved index is: factory, base, rows covered, bytes, crc, search parameter, and what
        that was tuned on (`tuned_on` reads it)."""
        return self.store.state(INDEX_STATE)

    def problem(self) -> str | None:
        """What is wrong with the saved index file (size, full checksum), or None (also when none is saved)."""
        state = self.state()
        return check_file(self.path, state) if state.get("factory") else None

    def check_factory(self, factory: str = "auto", count: int | None = None) -> str:
        """The factory string `save(factory)` builds for `count` live rows; one FAISS rejects for the
        store's dimension, or (a new one) with fewer than `count` rows to train on, is an InputError.
        Called before any work (None: the count is not known yet), so a refused factory leaves the
        store and its saved index as they were."""
        saved = self.state().get("factory")
        wanted = choose_factory(len(self.store) if count is None else count, self.store.embed_dim, factory, saved)
        if wanted not in ("Flat", saved):
            new_index(wanted, self.store.embed_dim, 1 << 62 if count is None else min(count, train_size(wanted)))
        return wanted

    def save(self, factory: str = "auto", sample: int = 200, seed: int = 0) -> dict:
        """Bring the saved FAISS index up to date: add only the rows written since it was saved
        (trained once, on a sample, when first built). `factory` "auto" keeps the saved one, else
        chooses by size (`choose_factory`); another factory string builds afresh. The search
        parameter is the smallest at which `sample` stored vectors and `sample` text-like queries
        (part 0 of `text_queries`, where there are any) both reach TARGET_RECALL@10 (`tune`). A store
        whose replaced or removed rows exceed a tenth of its live ones is compacted first.
        Returns `state()`."""
        self.check_factory(factory, len(self.store))  # a bad one is refused before the lock, with nothing written
        if self.store.dead_rows() > len(self.store) // 10:
            self.store.compact()  # replaced rows stay in a FAISS index built over them: its search and tuning would waste
            # candidates on them (half of each top 10 after a collection was imported twice)
        with self.store.writing():
            wanted = self.check_factory(factory, len(self.store))
            if wanted == "Flat":  # exact search reads the segments themselves: no second copy
                return self._note(None)
            first, next_row = self.store.row_span
            index, covered = self._reusable(wanted, first) or (self._train(wanted, seed), first)
            for start in range(covered, next_row, COMPACT_SEGMENT_ROWS):
                index.add(self.store.read_range(start, min(start + COMPACT_SEGMENT_ROWS, next_row)))
            queries = self.queries(sample, seed, part=0)
            setting, recalls = tune(index, {kind: (q, exact_ids(self.store, q, 10) - first) for kind, q in queries.items()},
                                    self.reranker(first) if compressed(wanted) else None)
            atomic_write(self.path, lambda f: write_index(index, f))
            return self._note({"factory": wanted, "base": first, "rows": next_row, "bytes": self.path.stat().st_size,
                               "crc": file_crc(self.path), "param": setting.param, "rerank": setting.rerank,
                               **tuning_state(recalls, {kind: len(q) for kind, q in queries.items()})})

    def reranker(self, base: int) -> Rerank:
        """`reranked` for an index whose position 0 is global row `base`: candidates and results are positions."""
        def rerank(queries: np.ndarray, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            sims, rows = reranked(self.store, queries, np.where(positions >= 0, positions + base, -1))
            return sims, np.where(rows >= 0, rows - base, -1)
        return rerank

    def queries(self, sample: int, seed: int, part: int) -> dict[str, np.ndarray]:
        """Queries of each kind at hand: `sample` stored vectors chosen with `seed`, and `sample` text-like
        queries of `part` (`TextQueries`) where the model's text tower is at hand."""
        kinds = {"image": self.store.sample_vectors(sample, seed)}
        text = self.text_queries(sample, part) if self.text_queries is not None else None
        if text is not None:
            kinds["text"] = np.ascontiguousarray(np.asarray(text, np.float32).reshape(-1, self.store.embed_dim))
        return kinds

    def measure(self, sample: int = 200) -> dict[str, Recall]:
        """recall@10 of `search` against exact search, per kind of query (`QUERY_KINDS`), measured now
        on new queries: stored vectors drawn with another seed than `save`'s, and text-like queries of
        part 1 (never those it was tuned on); Recall(None, 0) for a kind not at hand or an empty store."""
        measured = {kind: Recall(None, 0) for kind in QUERY_KINDS}
        if len(self.store):
            measured.update({kind: Recall(recall_on(self.store, q, self), len(q))
                             for kind, q in self.queries(sample, seed=1, part=1).items()})
        return measured

    def _reusable(self, factory: str, first: int) -> tuple[Any, int] | None:
        """(the saved index, rows it covers) when it is of `factory`, over the current rows, and sound."""
        state = self.state()
        if state.get("factory") == factory and int(state.get("base", -1)) == first and check_file(self.path, state) is None:
            return load_index(self.path), int(state["rows"])
        return None

    def _train(self, factory: str, seed: int) -> Any:
        """A new, empty index of `factory` trained on a random sample of the live rows."""
        live = self.store.live_rows()
        chosen = np.random.default_rng(seed).choice(live, min(len(live), train_size(factory)), replace=False)
        return build_index(self.store.read_rows(np.sort(chosen)), factory, add=False)

    def _note(self, values: dict | None) -> dict:
        """Record the saved index's description in the table (None: there is none; its file is deleted)."""
        self.store.set_state(INDEX_STATE, values or {})
        if values is None:
            self.path.unlink(missing_ok=True)
        self._loaded = None
        return self.state()

    def search(self, queries: np.ndarray, top_k: int,
               allowed: Allowed | Callable[[], Allowed] | None = None) -> list[list[tuple[str, float]]]:
        """Per query, the `top_k` (key, inner product) pairs, best first, through the saved index
        (exact search over the segments when none was saved); rows added since it was saved are
        searched too. Never rebuilds or trains an index. `allowed`: only those rows may come back
        (a metadata filter's, say): at most SCAN_ROWS of them are scored exactly from the store (none for a
        Flat index: `scan_rows`); more are searched through the index with an ID selector (`Within`), as exact as the unfiltered
        search of that index (exact for Flat). A callable `allowed` (`Metadata.allowed` of a filter, say)
        is called inside the same consistent read as the search: a compaction between the two, which
        renumbers every row, starts both again rather than searching with the rows of before."""
        queries = np.ascontiguousarray(np.asarray(queries, np.float32).reshape(-1, self.store.embed_dim))
        return self.store.consistent(lambda: self._search(queries, top_k, allowed))

    def _search(self, queries: np.ndarray, want: int,
                allowed: Allowed | Callable[[], Allowed] | None) -> list[list[tuple[str, float]]]:
        loaded = self._current()
        allowed = allowed() if callable(allowed) else allowed  # on the rows just reloaded, checked by `consistent`
        index, base = loaded.index, loaded.base
        if index.ntotal == 0:
            return [[] for _ in queries]
        find, reach = self._finder(loaded, queries, want, allowed)
        k = min(reach, want + max(16, want))  # a few more than wanted: some may be replaced rows
        while True:
            similarities, rows = find(k)
            keys = self.store.row_keys(np.unique(rows[rows >= 0]))
            results = [[(keys[r], float(s)) for r, s in zip(row_ids, row_sims) if r in keys][:want]
                       for row_ids, row_sims in zip(rows.tolist(), similarities.tolist())]
            if all(len(r) == want for r in results):
                return results
            if k >= reach:
                if self.store.row_span[1] > base + index.ntotal:
                    raise SegmentsChanged()  # another process rewrote entries past the rows searched: search them too
                return results
            k = min(reach, 4 * k)  # replaced rows crowded the live ones out: look further

    def _finder(self, loaded: _Loaded, queries: np.ndarray, want: int,
                allowed: Allowed | None) -> tuple[Callable[[int], tuple[np.ndarray, np.ndarray]], int]:
        """(k -> (similarities, global rows -1: none) [Q, <= k] of the top k allowed, the most rows it can
        return): an exact scan of few allowed rows, else the index (through `Within`)."""
        index, base = loaded.index, loaded.base
        keep = None if allowed is None else allowed.positions(base, index.ntotal)
        count = index.ntotal if keep is None else int(keep.sum())
        if keep is not None and count <= scan_rows(index):
            rows = np.flatnonzero(keep) + base
            return (lambda k: scan(self.store, queries, rows, k)), max(1, count)
        within = Within() if keep is None else Within.of(index, keep)
        pool = candidates(loaded.setting, want)  # what tuning measured for a top `want`, re-ranked before any key is read

        def find(k: int) -> tuple[np.ndarray, np.ndarray]:
            spread = min(index.ntotal, int(np.ceil(k * within.spread)))
            sims, ids = search_with(index, queries, spread, loaded.setting, self.reranker(base),
                                    int(np.ceil(pool * within.spread)), within)
            return sims, np.where(ids >= 0, ids + base, -1)
        return find, max(1, count)  # with `spread`, a k of `count` covers the whole index

    def _current(self) -> _Loaded:
        """The index in memory, covering every row written so far."""
        self.store.reload()
        first, next_row = self.store.row_span
        loaded = self._loaded
        if loaded is not None and (loaded.base != first or loaded.covered > next_row
                                   or (loaded.mapped and loaded.covered < next_row)):
            loaded = None  # compacted or emptied, or new rows to add to a read-only mapped index
        loaded = loaded or self._load(first, next_row)
        self._loaded = loaded
        for start in range(loaded.covered, next_row, COMPACT_SEGMENT_ROWS):
            stop = min(start + COMPACT_SEGMENT_ROWS, next_row)
            loaded.index.add(self.store.read_range(start, stop))
            loaded.covered = stop  # what it covers, even if a later read fails
        return loaded

    def _load(self, first: int, next_row: int) -> _Loaded:
        """The saved index when it is over the current rows and sound, else an empty exact one."""
        state = self.state()
        if not (state.get("factory") and self.path.exists()):
            return self._flat(first)
        if int(state.get("base", -1)) == first:
            problem = check_file(self.path, state, full=self.path.stat().st_size <= VERIFY_ON_OPEN_BYTES)
            if problem and self.store.repair_hint is not None:
                raise StoreError(f"{self.path}: damaged index ({problem}). {self.store.repair_hint}")
            if problem:
                warnings.warn(f"ignoring damaged index {self.path} ({problem}); searching the segments exactly")
                return self._flat(first)
        covered = int(state["rows"])
        index = load_index(self.path, mmap=covered == next_row)
        setting = Setting(int(state.get("param", 0)), int(state.get("rerank", 0)))
        set_search_parameter(index, setting.param)
        return _Loaded(index, first, covered, covered == next_row, setting)

    def _flat(self, first: int) -> _Loaded:
        import faiss

        return _Loaded(faiss.IndexFlatIP(self.store.embed_dim), first, first, False)


# -- an index under a memory budget, built in one streaming pass ------------------------------------------------

#: what `parse_size` reads: a number, then K, M, G or T (powers of 1024; a trailing B or iB allowed)
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
#: PQ's 256-centroid sub-quantizers want 39 training vectors per centroid (FAISS warns below that)
PQ_TRAINING = 39 * 256


def parse_size(size: int | str) -> int:
    """Bytes of a size given as `2G`, `512M`, `1.5GiB` or a plain number of bytes (K, M, G, T are powers
    of 1024); anything else, or a size below 1 byte, is an InputError that says the format."""
    match = _SIZE.fullmatch(size) if isinstance(size, str) else None
    value = int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " ")) if match else size
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise InputError(f"memory budget {size!r}: not a size; give a number of bytes, optionally with K, M, G or T "
                         "(powers of 1024), for example 2G or 512M")
    return value


def resident_bytes(factory: str, count: int, dim: int) -> int:
    """Bytes an index of `factory` holding `count` `dim`-dimensional vectors keeps in RAM once built, which
    is also about its saved file's size: exact search ("Flat") holds the float32 rows; an inverted file holds
    each vector's code and 8-byte id, its cells' centroids, its quantizer's tables (at most 256 x dim
    floats) and each cell's list headers. Other kinds (HNSW) are an InputError: their graph's size is not estimated here."""
    import faiss

    if factory == "Flat":
        return 4 * count * dim
    index: Any = new_index(factory, dim, 1 << 62)
    if isinstance(index, faiss.IndexPQFastScan):  # one list of codes, ids implicit, and the PQ's tables
        return count * int(index.sa_code_size()) + 16 * dim * 4 + 4096
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError as err:
        raise InputError(f"a memory budget chooses among Flat, fast-scan PQ and inverted-file (IVF) indexes, not "
                         f"{factory!r}; leave out the budget or the factory") from err
    return count * (ivf.code_size + 8) + (ivf.nlist + 256) * dim * 4 + 64 * ivf.nlist + 4096  # + each list's own size


def factory_within(count: int, dim: int, budget: int, factory: str = "auto") -> str:
    """The factory string of the most accurate index of `count` `dim`-dimensional vectors whose
    `resident_bytes` fit `budget`: `factory` itself when given (refused if it does not fit), else the
    size's usual one (`factory_for`) when it fits, else fast-scan PQ codes with the most sub-quantizers
    (half a byte each) that fit (`fast_scan_factory`): the search re-ranks their best candidates with the
    exact rows, so fewer bytes cost more candidates rather than recall. None fitting is an InputError
    naming the smallest's need."""
    candidates = [factory] if factory != "auto" else [
        factory_for(count, dim), *(fast_scan_factory(count, m) for m in fast_scan_subquantizers(dim))]
    for candidate in candidates:
        if resident_bytes(candidate, count, dim) <= budget:
            return candidate
    need = resident_bytes(candidates[-1], count, dim)
    raise InputError(f"no index of {count} {dim}-dimensional vectors fits a memory budget of {budget:,} bytes: "
                     f"{candidates[-1]} needs {need:,}; give a larger budget (--max-memory)")


def save_streamed(saved: SavedIndex, factory: str, blocks: Iterable[tuple[Sequence[str], np.ndarray]],
                  training: Callable[[int], np.ndarray], sample: int = 200, seed: int = 0) -> dict:
    """Store `blocks` of (keys, vectors) and build `saved`'s index of `factory` in the same single pass:
    trained first on `training(n)` (n vectors drawn from the same data: 64 per cell, at least PQ_TRAINING
    for PQ codes), then each block added to the store and to the index as it comes, so only the index,
    the training sample and one block are ever in memory. The index is written (atomically, checksum and
    size noted in the store's state), then `SavedIndex.save` tunes and records it as it does any index it
    finds current. Exact search ("Flat"), or a store that already held rows, takes `save`'s own path
    (store first, then the index from the stored rows). Returns `state()`."""
    store = saved.store
    if factory == "Flat" or len(store):
        for keys, vectors in blocks:
            store.add(keys, vectors)
        return saved.save(factory, sample, seed)
    with store.writing():
        _build_streamed(saved, factory, blocks, training)
        return saved.save(factory, sample, seed)


def _build_streamed(saved: SavedIndex, factory: str, blocks: Iterable[tuple[Sequence[str], np.ndarray]],
                    training: Callable[[int], np.ndarray]) -> None:
    """`save_streamed`'s one pass, under the store's write lock; the index it builds is freed on return,
    before `save` opens the written one."""
    store = saved.store
    first = store.row_span[0]
    index = build_index(training(max(train_size(factory), PQ_TRAINING if ",PQ" in factory else 0)), factory,
                        add=False)
    for keys, vectors in blocks:
        store.add(keys, vectors)
        index.add(np.ascontiguousarray(vectors, dtype=np.float32))
    if store.row_span == (first, first + index.ntotal):  # else compacted meanwhile: `save` builds afresh
        atomic_write(saved.path, lambda f: write_index(index, f))
        saved._note({"factory": factory, "base": first, "rows": first + index.ntotal,
                     "bytes": saved.path.stat().st_size, "crc": file_crc(saved.path)})
