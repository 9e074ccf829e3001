"""The embedding store at scale (issue 12), through the public API only.

1. append: N synthetic unit vectors (d=512) in batches of 10,000 through `EmbeddingStore.add`, float32
   and float16 stores written alternately batch by batch: median seconds per batch (last 10 / first 10,
   target <= 1.2), peak RSS, size on disk.
   The vectors lie around 4,096 random centres (noise 0.5 per unit of centre): synthetic but with
   neighbourhoods, as real embeddings have; on uniformly random 512-d vectors every approximate
   index's recall collapses (there are no near neighbours), which says nothing about real use.
2. open + query, in a fresh process: `SavedIndex.save()` (auto factory), then time to the first result
   after opening, ms/query unbatched and batched (FAISS single thread), recall@10 against exact.
3. label cache: 100,000 label vectors (d=384) stored through `get_or_compute`; in a fresh process
   the classifier's path (open, read all, exact Flat index) and ms/query, exact.
4. from-shards vs autofaiss: the same N vectors written as clip-retrieval shards (float16);
   `clipzsl index from-shards` and autofaiss's `build_index` on the same shards with the same factory
   string, one after the other (autofaiss pins numpy<2: it runs in its own venv, $AUTOFAISS_PYTHON,
   default /tmp/afvenv/bin/python: python -m venv /tmp/afvenv && /tmp/afvenv/bin/pip install autofaiss "pyarrow<16").
5. `clipzsl index images` on 20,000 Fashion-MNIST images against 2,000 (PNG files, packaged model), run
   2,000 / 20,000 / 2,000: images/s (20k against the median of the 2k runs) and peak RSS of the process.

Usage: nice python -m benchmarks.bench_store_scale [--rows 1000000] [--parts append,open,labels,shards,images]
Results: benchmarks/results/store_scale.{json,md}
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import report
from .children import run_json
from .common import synthetic

DIM = 512
BATCH = 10_000
PARTS = ("append", "open", "labels", "shards", "images")
MODEL_512 = "openclip:ViT-B-32/random"  # any 512-d model: from-shards needs one for text queries


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def append(directories: dict[str, Path], rows: int) -> dict[str, dict]:
    """Append to one store per dtype, alternating batch by batch, so both see the same machine load
    (the machine is shared): the ratio is of medians, robust to a few batches slowed by other work."""
    from clipzsl.store import EmbeddingStore

    stores = {dtype: EmbeddingStore(d, "synthetic-512", DIM, spec="synthetic", dtype=dtype)
              for dtype, d in directories.items()}
    times: dict[str, list[float]] = {dtype: [] for dtype in stores}
    for b in range(rows // BATCH):
        vectors = synthetic(BATCH, DIM, seed=b)
        for dtype, store in stores.items():
            start = time.perf_counter()
            store.add([f"img/{b:05d}/{i:05d}.jpg" for i in range(BATCH)], vectors)
            times[dtype].append(time.perf_counter() - start)
    results = {}
    for dtype, store in stores.items():
        t = times[dtype]
        first, last = report.median(t[:10]), report.median(t[-10:])
        results[dtype] = {"rows": rows, "dtype": dtype, "batches": len(t), "first10_median_s": first,
                          "last10_median_s": last, "ratio_last_first": last / first,
                          "ratio_of_sums": sum(t[-10:]) / sum(t[:10]), "total_s": sum(t),
                          "disk_mb": store.size_bytes() / 1e6, "peak_rss_mb_both": peak_rss_mb()}
    return results




def open_query(directory: Path, tmp: Path) -> dict:
    from clipzsl.saved_index import SavedIndex
    from clipzsl.store import EmbeddingStore

    store = EmbeddingStore(directory, "synthetic-512", DIM)
    start = time.perf_counter()
    state = SavedIndex(store).save()
    build = time.perf_counter() - start
    queries = synthetic(1000, DIM, seed=10**6)  # new points near the same centres
    np.save(tmp / "queries.npy", queries)
    result = run_json("open-query", str(directory), str(tmp / "queries.npy"))
    return {"save_index_s": build, "index": state, **result,
            "index_mb": (directory / "index.faiss").stat().st_size / 1e6 if (directory / "index.faiss").exists() else 0}




def labels(tmp: Path, count: int = 100_000) -> dict:
    from clipzsl.store import EmbeddingStore

    vectors = synthetic(count, 384, seed=7)
    store = EmbeddingStore(tmp / "labels", "labels-384", 384)
    start = time.perf_counter()
    store.get_or_compute([f"label-{i}" for i in range(count)], lambda todo: vectors)
    write = time.perf_counter() - start
    np.save(tmp / "lq.npy", synthetic(500, 384, seed=8))
    runs = [run_json("label-cache-query", str(tmp / "labels"), str(count), str(tmp / "lq.npy")) for _ in range(3)]
    best = {k: report.median([r[k] for r in runs]) for k in runs[0]}
    return {"labels": count, "write_s": write, **best, "recall_at_10": 1.0, "note": "exact (Flat): recall 1"}




def shards(directory: Path, tmp: Path, factory: str) -> dict:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from clipzsl.store import EmbeddingStore

    store = EmbeddingStore(directory, "synthetic-512", DIM)
    out = tmp / "shards"
    first, stop = store.row_span
    per = 100_000
    for number, start in enumerate(range(first, stop, per)):
        (out / "img_emb").mkdir(parents=True, exist_ok=True)
        (out / "metadata").mkdir(parents=True, exist_ok=True)
        np.save(out / "img_emb" / f"img_emb_{number}.npy", store.read_range(start, min(start + per, stop)).astype(np.float16))
        names = [f"img/{i}.jpg" for i in range(start, min(start + per, stop))]
        pq.write_table(pa.table({"image_path": names}), out / "metadata" / f"metadata_{number}.parquet")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "clipzsl.cli", "index", "from-shards", str(out), "--out", str(tmp / "fs"),
                    "--model", MODEL_512, "--faiss-factory", factory], check=True, capture_output=True)
    ours = time.perf_counter() - start
    result = {"rows": stop - first, "factory": factory, "clipzsl_from_shards_s": ours}
    try:
        af = run_json("autofaiss-build", str(out / "img_emb"), str(tmp / "af.index"), str(tmp / "af.json"), factory,
                      python=os.environ.get("AUTOFAISS_PYTHON", "/tmp/afvenv/bin/python"))
        result["autofaiss_build_index_s"] = af["seconds"]
        result["ratio_clipzsl_autofaiss"] = ours / af["seconds"]
    except (subprocess.CalledProcessError, ValueError) as err:
        result["autofaiss_skipped"] = f"{type(err).__name__}: {getattr(err, 'stderr', err)}"[-500:]
    shutil.rmtree(out)
    return result


def images(tmp: Path, sizes=(2_000, 20_000, 2_000)) -> dict:
    """Runs interleaved small, large, small (the machine is shared): the large run is compared with the
    median of the small ones around it."""
    from . import datasets

    data = datasets.load("fashion_mnist", split="train", limit=max(sizes))
    runs = []
    for number, size in enumerate(sizes):
        folder = tmp / f"fm{size}"
        folder.mkdir()
        for i, image in enumerate(data.images[:size]):
            image.save(folder / f"{i:05d}.png")
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "clipzsl.cli", "index", "images", str(folder),
               "--out", str(tmp / f"idx{size}-{number}")]
        start = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        runs.append({"images": size, "seconds": seconds, "images_per_s": size / seconds,
                     "peak_rss_mb": int(done.stderr.strip().splitlines()[-1]) / 1024})
        shutil.rmtree(folder)
        shutil.rmtree(tmp / f"idx{size}-{number}")
    small = [r for r in runs if r["images"] == min(sizes)]
    large = [r for r in runs if r["images"] == max(sizes)]
    return {"runs": runs,
            "throughput_ratio": report.median([r["images_per_s"] for r in large])
            / report.median([r["images_per_s"] for r in small]),
            "memory_ratio": report.median([r["peak_rss_mb"] for r in large])
            / report.median([r["peak_rss_mb"] for r in small])}


def summary(results: dict) -> list[str]:
    lines = []
    for dtype in ("float32", "float16"):
        a = results.get(f"append_{dtype}")
        if a:
            lines.append(f"- append {a['rows']:,} x {DIM} ({dtype}), batches of {BATCH:,}: median of last 10 / first 10 "
                         f"= **{a['ratio_last_first']:.2f}** ({a['last10_median_s']:.3f} s / {a['first10_median_s']:.3f} s; "
                         f"ratio of sums {a['ratio_of_sums']:.2f}), total {a['total_s']:.0f} s, {a['disk_mb']:.0f} MB on "
                         f"disk, peak RSS {a['peak_rss_mb_both']:.0f} MB (both stores, one process)")
    o = results.get("open")
    if o:
        lines.append(f"- open + first query (fresh process): **{o['open_and_first_query_s']:.3f} s**; "
                     f"{o['ms_per_query_unbatched']:.2f} ms/query unbatched, {o['ms_per_query_batched']:.2f} ms batched "
                     f"(1 thread), recall@10 **{o['recall_at_10']:.3f}** vs exact; index {o['index'].get('factory')} "
                     f"(param {o['index'].get('param')}), built in {o['save_index_s']:.0f} s, {o['index_mb']:.0f} MB")
    l = results.get("labels")
    if l:
        lines.append(f"- label cache, {l['labels']:,} labels: open + read + index {l['open_read_index_s']:.3f} s, "
                     f"{l['ms_per_query_unbatched']:.2f} ms/query unbatched, {l['ms_per_query_batched']:.3f} batched, "
                     "exact (recall 1)")
    s = results.get("shards")
    if s:
        af = (f"autofaiss build_index {s['autofaiss_build_index_s']:.0f} s, ratio **{s['ratio_clipzsl_autofaiss']:.2f}**"
              if "autofaiss_build_index_s" in s else f"autofaiss skipped ({s['autofaiss_skipped'][:200]})")
        lines.append(f"- {s['rows']:,} rows as clip-retrieval shards, factory {s['factory']}: "
                     f"`index from-shards` {s['clipzsl_from_shards_s']:.0f} s; {af}")
    i = results.get("images")
    if i:
        runs = "; ".join(f"{r['images']:,}: {r['images_per_s']:.1f} img/s, {r['peak_rss_mb']:.0f} MB" for r in i["runs"])
        lines.append(f"- `clipzsl index images` on Fashion-MNIST, run in this order: {runs}; throughput ratio "
                     f"**{i['throughput_ratio']:.2f}**, memory ratio **{i['memory_ratio']:.2f}**")
    return lines


#: --quick: the parts that need no download or second venv, at smoke sizes
QUICK = {"rows": 20_000, "labels": 5_000, "parts": "append,open,labels"}


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_store_scale", __doc__,
                           f"{QUICK['rows']:,} rows, {QUICK['labels']:,} labels, parts {QUICK['parts']}")
    parser.add_argument("--rows", type=int, help="default 1,000,000")
    parser.add_argument("--labels", type=int, help="label vectors of part 3 (default 100,000)")
    parser.add_argument("--parts", help=f"default {','.join(PARTS)}")
    parser.add_argument("--factory", default="IVF1024,Flat", help="factory string for the autofaiss comparison")
    parser.add_argument("--tmp", help="working directory (default: a temporary one)")
    parser.add_argument("--name", default="store_scale", help="results file name under benchmarks/results/")
    return report.fill(parser.parse_args(argv), QUICK,
                       {"rows": 1_000_000, "labels": 100_000, "parts": ",".join(PARTS)})


def measure(args: argparse.Namespace) -> dict:
    """Run the parts of `args` and write their results through the recorder."""
    parts = args.parts.split(",")
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="store_scale_", dir=args.tmp) as tmp:
        tmp = Path(tmp)
        if "append" in parts:
            appended = append({"float32": tmp / "f32", "float16": tmp / "f16"}, args.rows)
            shutil.rmtree(tmp / "f16")
            results.update({f"append_{dtype}": a for dtype, a in appended.items()})
        if "open" in parts:
            results["open"] = open_query(tmp / "f32", tmp)
        if "shards" in parts:
            results["shards"] = shards(tmp / "f32", tmp, args.factory)
        if "labels" in parts:
            results["labels"] = labels(tmp, args.labels)
        if "images" in parts:
            results["images"] = images(tmp)
    report.write(args.name, results, summary(results))
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
