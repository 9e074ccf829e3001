"""A compressed index under a memory budget, built in one streaming pass over shards (issue 21, item 3).

N synthetic clustered vectors (d = 384, the packaged model's space; bench_store_scale's generator, in
blocks of 100,000) are written as clip-retrieval shards (clipzsl's ShardWriter, 100,000 rows a shard).
For each budget, a share of the raw float16 vectors (N x 384 x 2 bytes):
1. build: `index_from_shards(..., max_memory=budget)` in a fresh process with the packaged model:
   seconds, peak RSS (getrusage) and the RSS the loaded model alone takes; the factory chosen, its
   size on disk and its estimated resident size (`resident_bytes`);
2. search, in a fresh process through `ImageIndex`: open + first query, ms/query one query at a time
   (FAISS's default threads: 2 here), the RSS the open index adds;
3. recall@10 against exact search on image-like queries (new points around the same centres), with
   FAISS on the saved file over nprobe; and, as what a refine step would give (not in clipzsl), the
   top 100 of the compressed index re-ranked with the exact float16 vectors read from the shards.
Text-like queries (cosine to their best match 0.2-0.3) are not measured here: their generator is
another part of issue 21 and was not available to this benchmark.

Usage: nice python -m benchmarks.bench_compressed [--rows 1000000] [--budgets 0.25,0.125]
Results: benchmarks/results/compressed.{json,md} (the page compressed.md is written by hand from it)
"""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from . import report
from .common import synthetic
from .children import run_json

DIM = 384
BLOCK = 100_000
QUERIES = 500
NPROBES = (1, 4, 16, 32, 64, 128, 256, 1024)


def write_shards(out: Path, rows: int) -> None:
    """`rows` synthetic vectors as clip-retrieval shards of BLOCK rows, block b drawn with seed b."""
    from clipzsl.shards import RunState, ShardWriter

    writer = ShardWriter(out, RunState({"synthetic": rows}), shard_size=BLOCK)
    for b, start in enumerate(range(0, rows, BLOCK)):
        count = min(BLOCK, rows - start)
        writer.add([f"img/{start + i:08d}.jpg" for i in range(count)], synthetic(count, DIM, seed=b), [])
    writer.close()


def shard_rows(shards: Path) -> list[np.ndarray]:
    """The shards' float16 vectors, memory-mapped, in order."""
    from clipzsl.shards import shard_files

    return [np.load(emb, mmap_mode="r") for emb, _ in shard_files(shards)]


def exact_top(shards: Path, queries: np.ndarray, k: int) -> np.ndarray:
    """Row numbers [Q, k] of the exact top-k (inner product) over the shards, one shard in memory at a time."""
    import faiss

    best = faiss.ResultHeap(len(queries), k)
    offset = 0
    for vectors in shard_rows(shards):
        sims = queries @ np.asarray(vectors, np.float32).T
        best.add_result(-sims, np.broadcast_to(np.arange(offset, offset + len(vectors)), sims.shape).copy())
        offset += len(vectors)
    best.finalize()
    return best.I


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    from clipzsl.search import recall_at_k

    return recall_at_k(found.tolist(), exact.tolist())


def curve(index_file: Path, queries: np.ndarray, exact: np.ndarray) -> list[dict]:
    """recall@10 and ms/query (one query at a time, 100 queries) of the saved file over nprobe."""
    from clipzsl.search import load_index, set_search_parameter

    index = load_index(index_file)
    points = []
    for nprobe in [p for p in NPROBES if p <= index.nlist]:
        set_search_parameter(index, nprobe)
        start = time.perf_counter()
        for q in queries[:100]:
            index.search(q[None], 10)
        ms = 10 * (time.perf_counter() - start)
        points.append({"nprobe": nprobe, "recall_at_10": recall(index.search(queries, 10)[1], exact), "ms_per_query": ms})
    return points


def reranked(index_file: Path, shards: Path, queries: np.ndarray, exact: np.ndarray, nprobe: int) -> dict:
    """recall@10 when the index's top 100 are re-ranked with the exact vectors read from the shards."""
    from clipzsl.search import load_index, set_search_parameter

    index = load_index(index_file)
    set_search_parameter(index, nprobe)
    candidates = index.search(queries, 100)[1]
    parts = shard_rows(shards)
    start = time.perf_counter()
    rows = np.stack([parts[r // BLOCK][r % BLOCK] for r in candidates.ravel()]).astype(np.float32)
    sims = np.einsum("qkd,qd->qk", rows.reshape(len(queries), 100, DIM), queries)
    top = np.take_along_axis(candidates, np.argsort(-sims, axis=1)[:, :10], axis=1)
    return {"nprobe": nprobe, "candidates": 100, "recall_at_10": recall(top, exact),
            "rerank_ms_per_query": 1000 * (time.perf_counter() - start) / len(queries)}


def one_budget(tmp: Path, rows: int, share: float, queries: np.ndarray, exact: np.ndarray) -> dict:
    from clipzsl.saved_index import resident_bytes

    budget = int(share * rows * DIM * 2)
    out = tmp / f"idx-{share}"
    built = run_json("budget-build", str(tmp / "shards"), str(out), str(budget))
    searched = run_json("budget-search", str(out), str(tmp / "queries.npy"))
    factory = built["state"]["factory"]
    points = curve(out / "index.faiss", queries, exact)
    tuned = int(built["state"].get("param") or 1)
    result = {"rows": rows, "share_of_float16": share, "budget_bytes": budget, "factory": factory, **built, **searched,
              "index_file_bytes": (out / "index.faiss").stat().st_size,
              "resident_estimate_bytes": resident_bytes(factory, rows, DIM),
              "store_bytes_on_disk": sum(p.stat().st_size for p in out.glob("seg-*.npy")), "curve": points,
              "reranked": [reranked(out / "index.faiss", tmp / "shards", queries, exact, p) for p in (tuned, 64)]}
    shutil.rmtree(out)
    return result


def summary(results: dict) -> list[str]:
    lines = [f"- {results['rows']:,} x {DIM} shards written in {results['write_s']:.0f} s; "
             f"{results['queries']} image-like queries, exact top-10 in {results['exact_s']:.0f} s"]
    for r in results["budgets"]:
        best = max(r["curve"], key=lambda p: p["recall_at_10"])
        lines.append(
            f"- budget {r['share_of_float16']:.3g} x float16 ({r['budget_bytes'] / 1e6:.0f} MB): **{r['factory']}**, "
            f"file {r['index_file_bytes'] / 1e6:.1f} MB (estimate {r['resident_estimate_bytes'] / 1e6:.1f} MB), "
            f"RSS added by the open index {r['index_rss_mb']:.0f} MB; build {r['build_s']:.0f} s, peak RSS "
            f"{r['peak_rss_mb']:.0f} MB ({r['model_loaded_rss_mb']:.0f} MB with only the model loaded); tuned "
            f"nprobe {r['state'].get('param')} (recall {r['state'].get('recall')}), {r['ms_per_query']:.2f} ms/query "
            f"through ImageIndex, open + first query {r['open_first_query_s']:.2f} s; best recall@10 "
            f"{best['recall_at_10']:.3f} (nprobe {best['nprobe']}, {best['ms_per_query']:.2f} ms); re-ranked top 100: "
            + ", ".join(f"{x['recall_at_10']:.3f} at nprobe {x['nprobe']} (+{x['rerank_ms_per_query']:.2f} ms)"
                        for x in r["reranked"]))
        lines.append("  - curve: " + "; ".join(f"nprobe {p['nprobe']}: {p['recall_at_10']:.3f}, {p['ms_per_query']:.2f} ms"
                                               for p in r["curve"]))
    return lines


QUICK = {"rows": 100_000, "budgets": "0.25"}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_compressed", __doc__, f"{QUICK['rows']:,} rows, budget {QUICK['budgets']}")
    parser.add_argument("--rows", type=int, help="default 1,000,000")
    parser.add_argument("--budgets", help="shares of the raw float16 vectors, comma-separated (default 0.25,0.125)")
    parser.add_argument("--tmp", help="working directory (default: a temporary one)")
    return report.fill(parser.parse_args(argv), QUICK, {"rows": 1_000_000, "budgets": "0.25,0.125"})


def measure(args: argparse.Namespace) -> dict:
    results: dict = {"rows": args.rows, "queries": QUERIES, "text_like": "not measured: no text-like generator here"}
    with tempfile.TemporaryDirectory(prefix="compressed_", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        start = time.perf_counter()
        write_shards(tmp / "shards", args.rows)
        results["write_s"] = time.perf_counter() - start
        queries = synthetic(QUERIES, DIM, seed=10**6)  # new points near the same centres: image-like
        np.save(tmp / "queries.npy", queries)
        start = time.perf_counter()
        exact = exact_top(tmp / "shards", queries, 10)
        results["exact_s"] = time.perf_counter() - start
        results["budgets"] = [one_budget(tmp, args.rows, float(s), queries, exact) for s in args.budgets.split(",")]
    report.write("compressed", results, None)  # the page, compressed.md, is written by hand from the JSON
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
