"""Approximate indexes for text queries and image queries (issue 21, item 2): which index, by measurement.

Text queries are far from the images they should find (the modality gap): with CLIP-style models a
text's cosine to its best-matching image is about 0.2-0.35, an image's to its near-duplicate about
0.9. An index tuned on the collection's own vectors can miss most of a text query's neighbours.

Data: synthetic clustered unit vectors, d = 384 (the packaged model's space), from
`benchmarks.common.synthetic` (4,096 centres, as bench_store_scale). Two query generators:
- image-like (`image_like`): new points near the same centres (seeds the collection does not use);
- text-like (`text_like`): OFFSET_WEIGHT x a modality offset shared by every text query (their
  cosine to one another is about 0.6, as CLIP texts are) + MATCH_WEIGHT x a cluster's centre +
  the rest in per-query noise, normalised. The weights put the median cosine to the best match near
  0.24 at 10^6 (0.21 at 2 x 10^4: fewer points, lower maxima); the measured quartiles are reported.
Indexes at each size (N rows, nlist = sqrt(N) to a power of two, as `clipzsl.search.factory_for`):
Flat (exact), IVF-Flat, IVF-SQ8, IVF-PQ with exact re-ranking of K_FACTOR x 10 candidates (RFlat),
HNSW32, IVF with an HNSW coarse quantizer (2 x nlist cells), and 4-bit fast-scan PQ codes of every
vector (d / 2 sub-quantizers, scanned whole) whose top k_factor x 10 are re-ranked exactly (RFlat: the
float32 rows in RAM, where clipzsl's saved index reads its stored rows instead; the knob is k_factor), each built by `clipzsl.search.build_index`
(trained on `clipzsl.saved_index.train_size` rows, then every row added), swept over its search
parameter (`set_search_parameter`: nprobe / efSearch). Per point: recall@10 against exact search
(`recall_at_k`) and ms per query, batched (THREADS threads) and one query at a time (median), for
both kinds. Single queries run on one thread: FAISS scans for one query on one thread anyway, and on
this shared, oversubscribed machine every 2-thread region a single query enters (Flat's scan, the
refine step) waited about 12 ms for its second thread (Flat over 20,000 rows: 0.9 ms per query on
one thread, 24 ms on two), which measures the machine's load, not the index. An HNSW coarse
quantizer searches with efSearch 2 x nprobe (its default, 16, caps the recall of text queries).
Size in RAM is the serialised index's size. The default per size is the cheapest point (single-query
ms on text-like queries) with recall@10 >= TARGET_RECALL on both kinds at < MAX_MS ms per text query
(`choose`).

Usage: nice python -m benchmarks.bench_ann [--rows 100000,1000000] [--queries 500] [--indexes HNSW IVF-Flat]
Results: benchmarks/results/ann.{json,md,png}
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time

import numpy as np

from . import common, report
from .common import cluster_centres, synthetic

DIM = 384
CENTRES = 4096
#: weights of the shared modality offset and of the cluster centre in a text-like query
OFFSET_WEIGHT, MATCH_WEIGHT = 0.75, 0.18
OFFSET_SEED = 999
#: image-like queries' seeds start here, far above the collection's (one per 100,000 rows)
IMAGE_SEED = 10**6
CHUNK = 100_000
THREADS = 2
K = 10
K_FACTOR = 64
TARGET_RECALL = 0.95
MAX_MS = 10.0
#: a sweep stops once both kinds reach this recall, or a single text query takes over STOP_MS
STOP_RECALL, STOP_MS = 0.995, 40.0
#: queries timed one at a time, per kind and point (recall uses every query, batched)
SINGLE = 100
#: the real-weights check: shipped label sets whose prompts are the text queries
REAL_LABELS = ("fashion_mnist", "cifar100")
SWEEPS = {"nprobe": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024), "efSearch": (16, 32, 64, 128, 256, 512, 1024, 2048, 4096),
          "k_factor": (2, 5, 10, 20, 40, 80, 160, 320)}


# ---------------------------------------------------------------- data


def collection(rows: int, dim: int = DIM) -> np.ndarray:
    """`rows` synthetic image embeddings, made CHUNK at a time (seed: the chunk's number)."""
    out = np.empty((rows, dim), np.float32)
    for start in range(0, rows, CHUNK):
        stop = min(start + CHUNK, rows)
        out[start:stop] = synthetic(stop - start, dim, seed=start // CHUNK, centres=CENTRES)
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def text_like(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Text-like queries: the shared modality offset, a random cluster's centre and per-query noise."""
    rng = np.random.default_rng(seed)
    offset = unit_rows(np.random.default_rng(OFFSET_SEED).normal(size=dim))
    centre = cluster_centres(CENTRES, dim)[rng.integers(0, CENTRES, count)]
    noise = unit_rows(rng.normal(size=(count, dim)))
    rest = math.sqrt(1 - OFFSET_WEIGHT**2 - MATCH_WEIGHT**2)
    return unit_rows(OFFSET_WEIGHT * offset + MATCH_WEIGHT * centre + rest * noise)


def image_like(count: int, dim: int = DIM, seed: int = 0) -> np.ndarray:
    """Image-like queries: new points near the collection's centres."""
    return synthetic(count, dim, seed=IMAGE_SEED + seed, centres=CENTRES)


def exact(vectors: np.ndarray, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, ids) of the exact top-K, by brute force."""
    import faiss

    return faiss.knn(queries, vectors, K, metric=faiss.METRIC_INNER_PRODUCT)


def spread(values: np.ndarray) -> dict:
    """Percentiles 10, 25, 50, 75, 90 of `values`."""
    return {f"p{p}": round(float(v), 4) for p, v in zip((10, 25, 50, 75, 90), np.percentile(values, (10, 25, 50, 75, 90)))}


def best_match(vectors: np.ndarray, queries: np.ndarray) -> dict:
    """The distribution of each query's cosine to its best match in `vectors`."""
    return spread(exact(vectors, queries)[0][:, 0])


# ---------------------------------------------------------------- indexes


def factories(rows: int, dim: int = DIM) -> dict[str, str]:
    """The indexes compared at `rows` rows: name -> FAISS factory string."""
    from clipzsl.search import fast_scan_subquantizers, ivf_cells

    nlist = ivf_cells(rows)
    return {"Flat": "Flat", "IVF-Flat": f"IVF{nlist},Flat", "IVF-SQ8": f"IVF{nlist},SQ8",
            "IVF-PQ+refine": f"IVF{nlist},PQ{dim // 8}np,RFlat", "HNSW": "HNSW32",
            "IVF-HNSW": f"IVF{2 * nlist}_HNSW32,Flat",
            "PQ-fastscan+re-rank": f"PQ{fast_scan_subquantizers(dim)[0]}x4fs,RFlat"}


def ram_mb(index) -> float:
    """The index's serialised size in MB: what it holds in RAM."""
    from clipzsl.search import write_index

    with tempfile.TemporaryFile() as f:
        write_index(index, f)
        return f.tell() / 1e6


def build(vectors: np.ndarray, factory: str) -> tuple[object, dict]:
    """The index of `factory` over `vectors`, trained as the saved index is, with its build figures."""
    from clipzsl.saved_index import train_size
    from clipzsl.search import build_index

    start = time.perf_counter()
    index = build_index(vectors[: train_size(factory)], factory, add=False)
    trained = time.perf_counter()
    index.add(vectors)
    added = time.perf_counter()
    if hasattr(index, "k_factor"):  # a refine step: re-rank K_FACTOR x k candidates exactly
        index.k_factor = K_FACTOR
    return index, {"factory": factory, "train_s": round(trained - start, 2), "add_s": round(added - trained, 2),
                   "build_s": round(added - start, 2), "ram_mb": round(ram_mb(index), 1)}


def point(index, queries: np.ndarray, exact_ids: np.ndarray) -> dict:
    """recall@K (batched search, THREADS threads) and ms per query, batched and one at a time (the
    first SINGLE, on one thread: median and mean)."""
    import faiss

    from clipzsl.search import recall_at_k, search

    start = time.perf_counter()
    ids = search(index, queries, K)[1]
    batched = time.perf_counter() - start
    rows = iter(queries[:SINGLE])
    faiss.omp_set_num_threads(1)
    times = report.timed(lambda: search(index, next(rows)[None], K), min(SINGLE, len(queries)))[0]
    faiss.omp_set_num_threads(THREADS)
    return {"recall": round(recall_at_k(ids, exact_ids), 4), "ms_batched": round(1e3 * batched / len(queries), 3),
            "ms_single": round(1e3 * report.median(times), 3), "ms_single_mean": round(1e3 * float(np.mean(times)), 3)}


def codes_refined(index) -> bool:
    """Is it fast-scan codes scanned whole with a refine step (whose knob is the refine's k_factor)?"""
    import faiss

    return isinstance(index, faiss.IndexRefine) and isinstance(faiss.downcast_index(index.base_index),
                                                               faiss.IndexPQFastScan)


def set_parameter(index, param: int) -> str | None:
    """`set_search_parameter`, and an HNSW coarse quantizer's efSearch to 2 x nprobe; fast-scan codes with a
    refine step: their re-rank's k_factor."""
    import faiss

    from clipzsl.search import set_search_parameter

    if codes_refined(index):
        index.k_factor = param  # one list of codes: the re-rank's candidates (k_factor x 10) are the knob
        return "k_factor"
    knob = set_search_parameter(index, param)
    if knob == "nprobe" and hasattr(faiss.extract_index_ivf(index).quantizer, "hnsw"):
        faiss.ParameterSpace().set_index_parameter(index, "quantizer_efSearch", 2 * param)
    return knob


def finished(p: dict) -> bool:
    """Is a sweep done: an exact index, both kinds at STOP_RECALL, or a text query over STOP_MS?"""
    return p["knob"] is None or p["text"]["ms_single"] > STOP_MS or min(p["text"]["recall"], p["image"]["recall"]) >= STOP_RECALL


def sweep(index, kinds: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[dict]:
    """One point per search parameter, smallest first, until `finished`; an exact index has one
    point (parameter 0)."""
    curve: list[dict] = []
    for param in SWEEPS["efSearch" if hasattr(index, "hnsw") else "k_factor" if codes_refined(index) else "nprobe"]:
        knob = set_parameter(index, param)
        if knob == "nprobe" and param > getattr(index, "nlist", math.inf):
            break
        curve.append({"param": 0 if knob is None else param, "knob": knob,
                      **{kind: point(index, q, ids) for kind, (q, ids) in kinds.items()}})
        if finished(curve[-1]):
            break
    return curve


def meets(p: dict) -> bool:
    """Does a point meet the targets: recall@10 >= TARGET_RECALL on both kinds, < MAX_MS per text query?"""
    return p["text"]["recall"] >= TARGET_RECALL and p["image"]["recall"] >= TARGET_RECALL and p["text"]["ms_single"] < MAX_MS


def choose(indexes: list[dict]) -> dict | None:
    """The cheapest (single-query ms on text-like queries) index and parameter meeting the targets."""
    fits = [{"name": i["name"], "factory": i["factory"], **p} for i in indexes for p in i["curve"] if meets(p)]
    return min(fits, key=lambda p: p["text"]["ms_single"], default=None)


# ---------------------------------------------------------------- one size


def measure_size(rows: int, queries: int, names: list[str]) -> dict:
    """Every index of `names` at `rows` rows, one built at a time, on text-like and image-like queries."""
    import faiss

    faiss.omp_set_num_threads(THREADS)
    vectors = collection(rows)
    kinds = {"text": text_like(queries), "image": image_like(queries)}
    truth = {kind: exact(vectors, q) for kind, q in kinds.items()}
    result = {"rows": rows, "best_match": {kind: spread(t[0][:, 0]) for kind, t in truth.items()}, "indexes": []}
    for name, factory in factories(rows).items():
        if name not in names:
            continue
        print(f"   {rows:,} rows: {name} ({factory})", flush=True)
        index, figures = build(vectors, factory)
        figures["curve"] = sweep(index, {kind: (q, truth[kind][1]) for kind, q in kinds.items()})
        result["indexes"].append({"name": name, **figures})
        del index
    result["choice"] = choose(result["indexes"])
    return result


# ---------------------------------------------------------------- real weights


def real_gap(count: int, labels: tuple[str, ...] = REAL_LABELS) -> dict:
    """The gap with real weights: the packaged model's embeddings of `count` Fashion-MNIST test images,
    queried with its text embeddings of shipped label sets through the default templates (one query
    per prompt) and with half the images (against the other half); each kind's cosine to its best match."""
    import clipzsl
    from clipzsl.images import embed_images

    from .datasets import load_fashion_mnist

    model = clipzsl.load_model("packaged", device="cpu")
    images = embed_images(model, load_fashion_mnist("test", limit=count).images, progress=False).embeddings.numpy()
    templates = clipzsl.load_templates()
    result: dict = {"images": len(images), "model": "packaged"}
    for name in labels:
        prompts = [text for entry in clipzsl.load_labels(name) for text in entry.texts(templates)]
        texts = unit_rows(model.encode_texts(prompts).numpy())
        result[f"text: {name} ({len(texts)} prompts)"] = best_match(images, texts)
    half = len(images) // 2
    result["image: the other half"] = best_match(images[half:], images[:half])
    return result


# ---------------------------------------------------------------- page


def table(size: dict) -> list[str]:
    lines = ["| index | factory | param | recall@10 text | recall@10 image | ms/query text, single | image, single "
             "| text, batched | image, batched | RAM MB | build s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for i in size["indexes"]:
        for p in i["curve"]:
            t, m = p["text"], p["image"]
            mark = "**" if meets(p) else ""
            lines.append(f"| {i['name']} | `{i['factory']}` | {p['knob'] or '—'} {p['param'] or ''} | {mark}{t['recall']:.3f}{mark} "
                         f"| {m['recall']:.3f} | {t['ms_single']:.2f} | {m['ms_single']:.2f} | {t['ms_batched']:.3f} "
                         f"| {m['ms_batched']:.3f} | {i['ram_mb']:.0f} | {i['build_s']:.1f} |")
    return lines


def choice_line(size: dict) -> str:
    c = size["choice"]
    if c is None:
        return f"- **{size['rows']:,} rows: no index met the targets.**"
    return (f"- **{size['rows']:,} rows: `{c['factory']}`, {c['knob'] or 'exact'} {c['param'] or ''}**: recall@10 "
            f"{c['text']['recall']:.3f} text / {c['image']['recall']:.3f} image at {c['text']['ms_single']:.2f} ms "
            "per text query, one at a time")


def real_lines(real: dict | None) -> list[str]:
    if not real:
        return ["", "Real weights: not measured (--real 0)."]
    lines = ["", f"Real weights, the {real['model']} model on {real['images']} Fashion-MNIST test images, cosine to "
                 "the best match (percentiles 10 / 25 / 50 / 75 / 90). Its image embeddings are mixtures of its "
                 "concepts' text embeddings (ConSE), so its texts sit nearer its images than a CLIP model's "
                 "(0.2-0.35): the text-like generator models CLIP-style models, the hard case.", ""]
    return lines + [f"- {kind}: " + " / ".join(f"{v:.3f}" for v in s.values())
                    for kind, s in real.items() if isinstance(s, dict)]


def summary(results: dict) -> list[str]:
    lines = [f"Synthetic clustered unit vectors, d = {results['dim']}; {results['queries']} queries of each kind; "
             f"FAISS on {results['threads']} threads (one query runs on one). Bold: the point meets the targets "
             f"(recall@10 >= {TARGET_RECALL} on both kinds, < {MAX_MS:g} ms per text query one at a time).", "",
             f"Text-like queries: {results['generators']['offset_weight']} x a shared modality offset + "
             f"{results['generators']['match_weight']} x a cluster centre + noise, normalised; image-like: new points "
             "near the centres. " + ("The sizes' figures are an earlier run's of this benchmark (the command in git "
                                     "history); this run measured the real weights only. " if results.get("sizes_from_earlier_run") else "")
             + "Cosine of each query to its best match (percentiles 10 / 25 / 50 / 75 / 90):", ""]
    for size in results["sizes"]:
        for kind, s in size["best_match"].items():
            lines.append(f"- {size['rows']:,} rows, {kind}-like: " + " / ".join(f"{v:.3f}" for v in s.values()))
    lines += real_lines(results.get("real"))
    lines += ["", "Default chosen per size (cheapest point meeting the targets):", ""]
    lines += [choice_line(size) for size in results["sizes"]]
    if results.get("plot"):
        lines += ["", f"![recall against ms per query]({results['plot']})" if results["plot"].endswith(".png")
                  else f"_Plot: {results['plot']}_"]
    for size in results["sizes"]:
        lines += ["", f"### {size['rows']:,} rows", "", *table(size)]
    return lines


def plot(results: dict, name: str) -> str:
    """Recall@10 against ms per query (single, text-like and image-like), one panel per size and kind:
    the picture's file name (`name`.png), or why there is no plot."""
    try:
        plt = common.pyplot()
    except ImportError as err:
        return f"skipped: {err}"
    sizes = results["sizes"]
    fig, axes = plt.subplots(len(sizes), 2, figsize=(11, 4 * len(sizes)), squeeze=False)
    for row, size in zip(axes, sizes):
        for ax, kind in zip(row, ("text", "image")):
            for i in size["indexes"]:
                ax.plot([p[kind]["ms_single"] for p in i["curve"]], [p[kind]["recall"] for p in i["curve"]],
                        marker="o", label=i["factory"])
            ax.axhline(TARGET_RECALL, color="black", linewidth=0.8, linestyle=":")
            ax.axvline(MAX_MS, color="black", linewidth=0.8, linestyle=":")
            ax.set_xscale("log")
            ax.set_xlabel("ms per query, one at a time")
            ax.set_ylabel("recall@10")
            ax.set_title(f"{size['rows']:,} rows, {kind}-like queries", fontsize=9)
            ax.legend(fontsize=7)
            ax.grid(alpha=0.3)
    common.save(fig, report.RESULTS_DIR / f"{name}.png")
    return f"{name}.png"


def checks(results: dict) -> list[dict]:
    out = []
    for size in results["sizes"]:
        c = size["choice"]
        out.append({"name": f"{size['rows']:,} rows: recall@10 text & image, ms per text query",
                    "value": "none" if c is None else f"{c['text']['recall']:.3f} & {c['image']['recall']:.3f}, "
                                                      f"{c['text']['ms_single']:.2f} ms ({c['factory']})",
                    "target": f">= {TARGET_RECALL} at < {MAX_MS:g} ms", "met": c is not None})
    return out


#: --quick: one size, fewer queries
QUICK = {"rows": "100000", "queries": 300, "indexes": list(factories(CHUNK)), "real": 0}


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_ann", __doc__, f"{QUICK['rows']} rows, {QUICK['queries']} queries per kind")
    parser.add_argument("--rows", help="sizes, comma-separated (default 100000,1000000; '' keeps the earlier run's)")
    parser.add_argument("--queries", type=int, help="queries of each kind (default 500)")
    parser.add_argument("--indexes", nargs="+", help=f"names of the indexes to compare (default all: {' '.join(factories(CHUNK))})")
    parser.add_argument("--real", type=int, help="Fashion-MNIST images of the real-weights check (default 1500; "
                                                 "0: keep the earlier run's; embedding runs at about 6 images/s)")
    parser.add_argument("--name", default="ann", help="results file name under benchmarks/results/")
    return report.fill(parser.parse_args(argv), QUICK, {"rows": "100000,1000000", "queries": 500, "indexes": list(factories(CHUNK)), "real": 1500})


def measure(args: argparse.Namespace) -> dict:
    """Every size of `args`, then the plot and the page through the recorder."""
    results: dict = {"quick": args.quick, "dim": DIM, "threads": THREADS, "queries": args.queries,
                     "generators": {"offset_weight": OFFSET_WEIGHT, "match_weight": MATCH_WEIGHT, "centres": CENTRES},
                     "load_average": {"before": common.load_average()}}
    earlier = report.previous(args.name)
    sizes = [measure_size(int(rows), args.queries, args.indexes) for rows in args.rows.split(",") if rows]
    results["sizes"] = sizes or earlier.get("sizes", [])
    results["sizes_from_earlier_run"] = not sizes
    results["real"] = real_gap(args.real) if args.real else earlier.get("real")
    results["load_average"]["after"] = common.load_average()
    results["checks"] = checks(results)
    results["plot"] = plot(results, args.name)
    report.write(args.name, results, summary(results))
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
