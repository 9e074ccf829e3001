"""The saved index at scale, built in one streaming pass over shards, on text-like and image-like queries
(issue 21, items 2 and 3).

N synthetic clustered vectors (d = 384, the packaged model's space; `benchmarks.common.synthetic`, in
blocks of 100,000) are written as clip-retrieval shards (clipzsl's ShardWriter, 100,000 rows a shard).
Queries: QUERIES text-like ones (bench_ann's `text_like`: cosine to their best match about 0.24, the
modality gap) and QUERIES image-like ones (new points near the same centres). For each budget, a share of
the raw float16 vectors (N x 384 x 2 bytes), or none ("auto": `factory_for`'s choice):
1. build: `index_from_shards(..., max_memory=budget)` in a fresh process with the packaged model:
   seconds, peak RSS (VmHWM, which counts the mapped shards and store segments' file pages), peak anonymous
   memory (what the build itself holds) and the peak with the loaded model alone; the factory chosen, its
   size on disk and its estimated resident size (`resident_bytes`); the search setting tuning chose
   (knob and re-rank candidates) and the recall it noted per kind (tuned on the model's vocabulary prompts);
2. search, in a fresh process through `ImageIndex`, one query at a time (FAISS's default threads: 2 here):
   open + first query, ms/query per kind (and again with the stored rows in the page cache), recall@10 against
   exact search per kind, the RSS the open index adds;
3. the re-rank curve: recall@10 and ms/query per kind over the re-rank candidates (`RERANK_CANDIDATES`),
   through `saved_index.search_with` on the saved file and the store's rows;
4. `index info`, in a fresh process with the packaged model: recall measured on new queries of each kind,
   against the recall the index noted when it was tuned (the honesty target: within 0.03).
`--keep DIR` writes the shards into DIR and reuses them on the next run of the same size.

Usage: nice python -m benchmarks.bench_compressed [--rows 1000000] [--budgets auto,0.25]
Results: benchmarks/results/compressed-ROWS.json per size; the page compressed.md is written by hand from them
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
#: queries timed one at a time in the re-rank curve, per kind
CURVE_QUERIES = 100


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


def exact_top(shards: Path, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, row numbers) [Q, k] of the exact top-k (inner product) over the shards, one shard in
    memory at a time."""
    import faiss

    best = faiss.ResultHeap(len(queries), k)
    offset = 0
    for vectors in shard_rows(shards):
        sims = queries @ np.asarray(vectors, np.float32).T
        best.add_result(-sims, np.broadcast_to(np.arange(offset, offset + len(vectors)), sims.shape).copy())
        offset += len(vectors)
    best.finalize()
    return -best.D, best.I


def recall(found: np.ndarray, exact: np.ndarray) -> float:
    from clipzsl.search import recall_at_k

    return recall_at_k(found.tolist(), exact.tolist())


def rerank_curve(out: Path, kinds: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> list[dict]:
    """recall@10 (every query) and ms/query (CURVE_QUERIES one at a time, median) per kind over the
    re-rank candidates, through clipzsl's own re-rank of the saved file's candidates with the store's rows."""
    from clipzsl.image_index import ImageIndex
    from clipzsl.saved_index import RERANK_CANDIDATES, Setting, candidates, search_with
    from clipzsl.search import load_index, set_search_parameter

    image_index = ImageIndex(out)
    saved = image_index.saved_index
    state = saved.state()
    index = load_index(out / "index.faiss")
    set_search_parameter(index, int(state.get("param", 0)))
    rerank = saved.reranker(int(state["base"]))
    points = []
    for count in RERANK_CANDIDATES:
        setting = Setting(int(state.get("param", 0)), count)
        point: dict = {"rerank": count}
        for kind, queries in kinds.items():
            pool = candidates(setting, 10)
            rows = search_with(index, queries, 10, setting, rerank, pool)[1]
            times = report.timed(lambda q=iter(queries): search_with(index, next(q)[None], 10, setting, rerank, pool),
                                 CURVE_QUERIES)[0]
            point[kind] = {"recall_at_10": recall(rows, exact[kind]), "ms_per_query": 1000 * report.median(times)}
        points.append(point)
    image_index.close()
    return points


def one_budget(tmp: Path, rows: int, share: str, kinds: dict[str, np.ndarray], exact: dict[str, np.ndarray]) -> dict:
    from clipzsl.saved_index import resident_bytes

    budget = "" if share == "auto" else str(int(float(share) * rows * DIM * 2))
    out = tmp / f"idx-{share}"
    built = run_json("budget-build", str(tmp / "shards"), str(out), budget)
    searched = run_json("budget-search", str(out), str(tmp / "queries.npz"))
    for kind in kinds:
        searched[kind]["recall_at_10"] = recall(np.array(searched[kind].pop("found")), exact[kind])
    factory = built["state"].get("factory", "Flat")  # exact search saves no index
    result = {"rows": rows, "share_of_float16": share, "budget_bytes": int(budget or 0), "factory": factory, **built,
              **searched, "index_file_bytes": (out / "index.faiss").stat().st_size,
              "resident_estimate_bytes": resident_bytes(factory, rows, DIM),
              "store_bytes_on_disk": sum(p.stat().st_size for p in out.glob("seg-*.npy")),
              "curve": rerank_curve(out, kinds, exact), "info": run_json("index-info", str(out))}
    shutil.rmtree(out)
    return result


def summary(results: dict) -> list[str]:
    lines = [f"- {results['rows']:,} x {DIM} shards written in {results['write_s']:.0f} s; {results['queries']} "
             f"queries of each kind, exact top-10 in {results['exact_s']:.0f} s; cosine to the best match: "
             + ", ".join(f"{kind} {spread}" for kind, spread in results["best_match"].items())]
    for r in results["budgets"]:
        state, info = r["state"], r["info"]["info"]
        lines.append(
            f"- budget {r['share_of_float16']} ({r['budget_bytes'] / 1e6:.0f} MB): **{r['factory']}**, file "
            f"{r['index_file_bytes'] / 1e6:.1f} MB = {r['index_file_bytes'] / (r['rows'] * DIM * 2):.1%} of float16 "
            f"(estimate {r['resident_estimate_bytes'] / 1e6:.1f} MB), RSS added by the open index {r['index_rss_mb']:.0f} MB "
            f"(anonymous {r.get('index_anon_mb', 0):.0f} MB, file pages {r.get('index_file_mb', 0):.0f} MB); "
            f"build {r['build_s']:.0f} s, peak RSS {r['peak_rss_mb']:.0f} MB with mapped file pages, peak anonymous "
            f"{r.get('peak_anon_mb', 0):.0f} MB ({r['model_loaded_rss_mb']:.0f} MB with only the model); tuned: param {state.get('param')}, re-rank {state.get('rerank')}; open + first query "
            f"{r['open_first_query_s']:.2f} s")
        lines.append("  - through ImageIndex, one query at a time: " + "; ".join(
            f"{kind} recall@10 {r[kind]['recall_at_10']:.3f} at {r[kind]['ms_per_query']:.2f} ms "
            f"({r[kind].get('ms_per_query_warm', float('nan')):.2f} ms warm)" for kind in ("text", "image")))
        lines.append(f"  - index info ({r['info']['info_s']:.0f} s): image {info['recall_at_10']} (noted "
                     f"{state.get('image_recall')}), model-vocabulary text {info['text_recall_at_10']} (noted "
                     f"{state.get('text_recall')})")
        lines.append("  - re-rank curve: " + "; ".join(
            f"{p['rerank']}: text {p['text']['recall_at_10']:.3f} ({p['text']['ms_per_query']:.2f} ms), image "
            f"{p['image']['recall_at_10']:.3f}" for p in r["curve"]))
    return lines


QUICK = {"rows": 100_000, "budgets": "0.25"}


def options(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_compressed", __doc__, f"{QUICK['rows']:,} rows, budget {QUICK['budgets']}")
    parser.add_argument("--rows", type=int, help="default 1,000,000")
    parser.add_argument("--budgets", help="shares of the raw float16 vectors or auto (no budget), comma-separated "
                                          "(default auto,0.0625)")
    parser.add_argument("--tmp", help="working directory (default: a temporary one)")
    parser.add_argument("--keep", help="write the shards into this directory and reuse them on the next run")
    return report.fill(parser.parse_args(argv), QUICK, {"rows": 1_000_000, "budgets": "auto,0.0625"})


def shards_in(folder: Path, rows: int) -> tuple[Path, float]:
    """The shards of `rows` rows in `folder` (written unless a finished set is there), and seconds spent writing."""
    from clipzsl.shards import shard_files

    shards = folder / f"shards-{rows}"
    if (shards / "written").exists() and len(shard_files(shards)) == -(-rows // BLOCK):
        return shards, 0.0
    shutil.rmtree(shards, ignore_errors=True)
    start = time.perf_counter()
    write_shards(shards, rows)
    (shards / "written").touch()
    return shards, time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict:
    from .bench_ann import image_like, spread, text_like

    results: dict = {"rows": args.rows, "queries": QUERIES}
    with tempfile.TemporaryDirectory(prefix="compressed_", dir=args.tmp) as tmp_name:
        tmp = Path(tmp_name)
        shards, results["write_s"] = shards_in(Path(args.keep) if args.keep else tmp, args.rows)
        (tmp / "shards").symlink_to(shards.resolve())
        kinds = {"text": text_like(QUERIES, seed=1), "image": image_like(QUERIES, seed=1)}
        np.savez(tmp / "queries.npz", **kinds)
        start = time.perf_counter()
        top = {kind: exact_top(tmp / "shards", q, 10) for kind, q in kinds.items()}
        results["exact_s"] = time.perf_counter() - start
        exact = {kind: ids for kind, (_, ids) in top.items()}
        results["best_match"] = {kind: spread(sims[:, 0]) for kind, (sims, _) in top.items()}
        results["budgets"] = [one_budget(tmp, args.rows, share, kinds, exact) for share in args.budgets.split(",")]
    report.write(f"compressed-{args.rows}", results, None)  # the page, compressed.md, is written by hand from the JSONs
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
