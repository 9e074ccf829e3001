"""Search inside a metadata filter against the unfiltered search (issue 23, item 3): its overhead and recall.

N synthetic vectors (d = 384, bench_ann's `collection`: clustered, float16 in the store) get a metadata
column `bucket` (uniform 0..999, seeded), kept with the index (`clipzsl.metadata`); the default index of
that size is built once (`SavedIndex.save("auto")`: exact at 10^5, fast-scan PQ codes + exact re-rank at
10^6, tuned on stored vectors) and reused for every selectivity: `bucket < 500`, `< 100`, `< 10`, `< 5`, `< 2`,
`< 1` (50%, 10%, 1%, 0.5%, 0.2%, 0.1%). Queries: QUERIES text-like and QUERIES image-like ones (bench_ann's generators).
Per selectivity and kind: median ms per query (one at a time, the filter evaluated each time: `ImageIndex`-style
`Metadata.allowed` + `SavedIndex.search(allowed=...)`), recall@10 against brute force over the filtered
subset, and the two search paths forced (`saved_index.scan_rows` 0: the index with an ID selector or
post-filter; infinite: the exact scan of the allowed rows), which is how the switch point was chosen.

Usage: nice python -m benchmarks.bench_filter [--rows 100000,1000000] [--queries 50]
Results: benchmarks/results/filter.md and filter.json
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import common, report
from .bench_ann import CHUNK, collection, image_like, text_like

SELECTIVITIES = (0.5, 0.1, 0.01, 0.005, 0.002, 0.001)
QUICK = {"rows": "20000", "queries": 10}
#: the exact scan is timed only up to this many allowed rows (1.1 s a query at 10^5 of 10^6, far past the index)
SCAN_TIMED_ROWS = 20_000


def build(folder: Path, vectors: np.ndarray):
    """A store of `vectors` (float16), its default index and a `bucket` metadata column."""
    import pyarrow as pa

    from clipzsl.metadata import Metadata
    from clipzsl.saved_index import SavedIndex
    from clipzsl.store import EmbeddingStore

    store = EmbeddingStore(folder, "synthetic", vectors.shape[1], "synthetic", dtype="float16")
    keys = [f"/data/{i % 100:02d}/{i:08d}.jpg" for i in range(len(vectors))]
    for start in range(0, len(vectors), CHUNK):
        store.add(keys[start : start + CHUNK], vectors[start : start + CHUNK])
    started = time.perf_counter()
    saved = SavedIndex(store)
    state = saved.save("auto")
    built = time.perf_counter() - started
    buckets = np.random.default_rng(7).integers(0, 1000, len(vectors))
    metadata = Metadata(store)
    metadata.update([], pa.table({"path": keys, "bucket": buckets}), sizes=False)
    return saved, metadata, buckets, {"factory": state.get("factory", "Flat"), "param": state.get("param", 0),
                                      "rerank": state.get("rerank", 0), "build_s": round(built, 1)}


def exact_top(vectors: np.ndarray, queries: np.ndarray, chosen: np.ndarray) -> list[set[int]]:
    """The exact top 10 rows among `chosen`, per query."""
    sims = queries @ vectors[chosen].T
    return [set(chosen[row].tolist()) for row in np.argsort(-sims, axis=1)[:, :10]]


def timed(saved, metadata, queries: np.ndarray, where: str | None) -> tuple[float, list[set[int]]]:
    """(median ms per query, found rows per query): each query searched alone, the filter checked and evaluated
    each time (inside the search's consistent read), as `ImageIndex.search` does. The median, not the mean:
    the machine is shared, and a neighbour's burst would otherwise decide a point."""
    found, times = [], []
    for query in queries:
        started = time.perf_counter()
        if where:
            metadata.check(where)
        allowed = (lambda: metadata.allowed(where)) if where else None
        found.append({int(k[-12:-4]) for k, _ in saved.search(query[None], 10, allowed)[0]})
        times.append(time.perf_counter() - started)
    return 1000 * float(np.median(times)), found


def recall(found: list[set[int]], exact: list[set[int]]) -> float:
    return float(np.mean([len(f & e) / max(1, len(e)) for f, e in zip(found, exact)]))


def one_point(saved, metadata, vectors, kinds, where, chosen) -> dict:
    """Per kind: ms/query and recall@10 on the chosen path, and ms/query on each path forced."""
    from clipzsl import saved_index

    point: dict = {"where": where, "allowed": int(len(chosen))}
    for kind, queries in kinds.items():
        exact = exact_top(vectors, queries, chosen if where else np.arange(len(vectors)))
        ms, found = timed(saved, metadata, queries, where)
        point[kind] = {"ms": round(ms, 2), "recall": round(recall(found, exact), 4)}
        if where is None:
            continue
        limit = saved_index.scan_rows
        try:
            for path, rows in (("index", 0), ("scan", 1 << 62)):
                if path == "scan" and len(chosen) > SCAN_TIMED_ROWS:
                    continue
                saved_index.scan_rows = lambda index, rows=rows: rows  # type: ignore[misc]
                ms, found = timed(saved, metadata, queries[:max(5, len(queries) // 2)], where)
                point[kind][f"{path}_ms"] = round(ms, 2)
        finally:
            saved_index.scan_rows = limit
    return point


def measure_size(rows: int, queries: int) -> dict:
    vectors = collection(rows)
    kinds = {"text": text_like(queries, seed=5), "image": image_like(queries, seed=5)}
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        saved, metadata, buckets, size = build(Path(tmp) / "index", vectors)
        started = time.perf_counter()
        metadata.allowed("bucket < 1")
        size["first_filter_s"] = round(time.perf_counter() - started, 2)  # reads the table, maps keys to rows
        started = time.perf_counter()
        saved.search(vectors[:1], 10)
        size["first_search_s"] = round(time.perf_counter() - started, 2)  # loads the index: not in the timings
        size["rows"] = rows
        size["points"] = [one_point(saved, metadata, vectors, kinds, None, np.arange(rows))]
        for share in SELECTIVITIES:
            where = f"bucket < {round(share * 1000)}"
            size["points"].append(one_point(saved, metadata, vectors, kinds, where, np.flatnonzero(
                buckets < round(share * 1000))))
    return size


def summary(results: dict) -> list[str]:
    lines = ["# Search inside a metadata filter: overhead and recall", "",
             f"d = {results['dim']}, {results['queries']} queries per kind, one at a time (median ms); the filter is checked "
             "and evaluated on every query (pyarrow over the metadata table, inside the search's consistent read). "
             "`ms` is the path chosen (the exact scan of the allowed rows up to SCAN_ROWS = "
             f"{results['scan_rows']:,} unless the index is Flat, else the index with an ID selector / post-filter); "
             "`x unfiltered` is `ms` over the unfiltered search's; `index ms` and `scan ms` force one path (on half "
             "the queries; the scan only up to 20,000 allowed rows). Recall@10 is against brute force over the filtered "
             f"subset. Load average {results['load_average']['before']} before, {results['load_average']['after']} "
             "after (2 cores, shared).", ""]
    for size in results["sizes"]:
        lines += [f"## {size['rows']:,} vectors: {size['factory']} (param {size['param']}, re-rank {size['rerank']}), "
                  f"built in {size['build_s']} s; first filter {size['first_filter_s']} s (table read, keys mapped), "
                  f"first search {size.get('first_search_s', '?')} s (index loaded)", "",
                  "| filter | allowed | kind | ms | x unfiltered | recall@10 | index ms | scan ms |",
                  "|---|---|---|---|---|---|---|---|"]
        unfiltered = size["points"][0]
        for p in size["points"]:
            for kind in ("text", "image"):
                r = p[kind]
                lines.append(f"| {p['where'] or '(none)'} | {p['allowed']:,} | {kind} | {r['ms']} | "
                             f"{r['ms'] / unfiltered[kind]['ms']:.2f} | {r['recall']:.3f} | {r.get('index_ms', '')} | "
                             f"{r.get('scan_ms', '')} |")
        lines.append("")
    return lines + switch_point(results)


def switch_point(results: dict) -> list[str]:
    """Which forced path was faster at each point timed both ways: how `saved_index.scan_rows` was chosen."""
    lines = ["## The switch point", "",
             "The scan costs about a fixed part plus the allowed rows; the index searched through an ID selector "
             "(Flat) skips the rows filtered out, and the fast-scan codes' post-filter asks for size/allowed times the "
             "candidates, so its cost falls as more rows are allowed. Median ms per point, text/image:", ""]
    for size in results["sizes"]:
        both = [p for p in size["points"][1:] if "scan_ms" in p["text"]]
        cells = [f"{p['allowed']:,}: index {p['text']['index_ms']}/{p['image']['index_ms']}, scan "
                 f"{p['text']['scan_ms']}/{p['image']['scan_ms']} ms" for p in both]
        lines.append(f"- {size['rows']:,} ({size['factory']}): " + "; ".join(cells))
    flat = [p[kind] for size in results["sizes"] if size["factory"] == "Flat" for p in size["points"][1:]
            for kind in ("text", "image") if "scan_ms" in p[kind]]
    gain = max((r["index_ms"] - r["scan_ms"] for r in flat), default=0.0)
    return lines + ["", "Rule (`saved_index.scan_rows`): a Flat index is always searched through its ID selector (exact "
                    f"too; the scan's best gain over it at any point of the Flat size: {gain:.2f} ms); another index scans the "
                    f"store up to SCAN_ROWS = {results['scan_rows']:,} allowed rows, chosen as the last point of the 10^6 "
                    "size (fast-scan codes) where the scan was faster on both kinds.", ""]


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_filter", __doc__, f"{QUICK['rows']} rows, {QUICK['queries']} queries per kind")
    parser.add_argument("--rows", help="comma-separated sizes (default 100000,1000000)")
    parser.add_argument("--queries", type=int, help="queries per kind (default 50)")
    parser.set_defaults(name="filter")
    return report.fill(parser.parse_args(argv), QUICK, {"rows": "100000,1000000", "queries": 50})


def measure(args: argparse.Namespace) -> dict:
    from clipzsl.saved_index import SCAN_ROWS

    results: dict = {"quick": args.quick, "dim": 384, "queries": args.queries, "scan_rows": SCAN_ROWS,
                     "load_average": {"before": common.load_average()}}
    results["sizes"] = [measure_size(int(rows), args.queries) for rows in args.rows.split(",") if rows]
    results["load_average"]["after"] = common.load_average()
    report.write(args.name, results, summary(results))
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
