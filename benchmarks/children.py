"""Code the benchmarks run in a fresh interpreter: `python -m benchmarks.children NAME ARG...`.

Why a fresh process: import and open times, peak memory (VmHWM) and the command line itself are only
measured honestly from a clean start. Each child is a function here (not a string of code); the JSON
children print one JSON line last, which `run_json` reads. This module imports nothing heavy at its
top, so a child's own timings start from a bare interpreter; it runs under other interpreters too
(bench_store_scale's autofaiss venv), where only the child's own imports must exist.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parent.parent


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MB: VmRSS (now), VmHWM (its peak; reset at
    exec, where getrusage's ru_maxrss keeps the forking parent's), RssAnon, RssFile."""
    with open("/proc/self/status") as status:
        return int(next(line.split()[1] for line in status if line.startswith(field))) / 1024


def run_json(name: str, *args: str, python: str = sys.executable) -> dict:
    """Run child `name` in a fresh `python` (from the repository root); its last stdout line, as JSON."""
    out = subprocess.run([python, "-m", "benchmarks.children", name, *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(f"benchmark child {name} exited with {out.returncode}:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def counting_classify(*argv: str) -> int:
    """`clipzsl classify ARGV` with the packaged backend's text encoder counting the prompts it encodes;
    the count goes to stderr as `ENCODED-PROMPTS N` (bench_store: a warm cache must encode none)."""
    from clipzsl.backends.packaged import PackagedBackend
    from clipzsl.cli import main

    encoded = [0]
    original = PackagedBackend.encode_texts

    def counted(self, texts):
        encoded[0] += len(texts)
        return original(self, texts)

    PackagedBackend.encode_texts = counted  # type: ignore[method-assign]  # the instrument, this process only
    status = main(["classify", *argv])
    print(f"ENCODED-PROMPTS {encoded[0]}", file=sys.stderr)
    return status


def embed_peak_rss(mode: str, spec: str, *files: str) -> int:
    """Embed `files` on the CPU, with the bounded pipeline (`bounded`) or decoding all first
    (`decode-all`); prints the process's peak RSS in kB (bench_gpu's memory rows)."""
    import torch

    import clipzsl
    from clipzsl.images import embed_images, load_image

    model = clipzsl.load_model(spec, device="cpu")
    if mode == "bounded":
        embed_images(model, list(files))
    else:  # decode everything first, then encode
        pixels = [model.preprocess(load_image(f)) for f in files]
        for i in range(0, len(pixels), model.batch_size):
            model.encode_images(torch.stack(pixels[i:i + model.batch_size]))
    print(round(status_mb("VmHWM") * 1024))  # kB
    return 0


def open_query(directory: str, queries_path: str) -> int:
    """Open a saved image store and query it (bench_store_scale part 2): import, open and first-query
    time, ms/query unbatched and batched on one FAISS thread, recall@10 against exact."""
    t0 = time.perf_counter()
    import faiss
    import numpy as np

    from clipzsl.saved_index import SavedIndex, exact_ids
    from clipzsl.store import EmbeddingStore

    faiss.omp_set_num_threads(1)
    queries = np.load(queries_path)
    t1 = time.perf_counter()
    store = EmbeddingStore(directory, "synthetic-512", 512)
    saved = SavedIndex(store)
    saved.search(queries[:1], 10)
    t2 = time.perf_counter()
    unbatched = []
    for q in queries:
        s = time.perf_counter()
        saved.search(q[None], 10)
        unbatched.append(time.perf_counter() - s)
    s = time.perf_counter()
    found = saved.search(queries, 10)
    batched = (time.perf_counter() - s) / len(queries)
    exact = exact_ids(store, queries[:100], 10)
    names = store.row_keys(np.unique(exact))
    exact_keys = [[names[r] for r in row] for row in exact.tolist()]
    hits = sum(len({k for k, _ in f} & set(e)) for f, e in zip(found[:100], exact_keys))
    print(json.dumps({"import_s": t1 - t0, "open_and_first_query_s": t2 - t1,
                      "ms_per_query_unbatched": 1000 * float(np.median(unbatched)),
                      "ms_per_query_batched": 1000 * batched, "recall_at_10": hits / exact.size,
                      "queries": len(queries), "index": saved.state()}))
    return 0


def label_cache_query(directory: str, count: str, queries_path: str) -> int:
    """The classifier's path over a cached label set (bench_store_scale part 3): open the store, read
    every vector, build the exact index, then ms/query unbatched and batched on one FAISS thread."""
    import faiss
    import numpy as np

    from clipzsl.search import build_index, search
    from clipzsl.store import EmbeddingStore

    faiss.omp_set_num_threads(1)
    keys = [f"label-{i}" for i in range(int(count))]
    t0 = time.perf_counter()
    store = EmbeddingStore(directory, "labels-384", 384)
    weights = store.get_or_compute(keys, lambda todo: 1 / 0)  # all cached: computing would fail
    index = build_index(weights, "auto")
    build = time.perf_counter() - t0
    queries = np.load(queries_path)
    times = []
    for q in queries:
        s = time.perf_counter()
        search(index, q[None], 5)
        times.append(time.perf_counter() - s)
    s = time.perf_counter()
    search(index, queries, 5)
    batched = (time.perf_counter() - s) / len(queries)
    print(json.dumps({"open_read_index_s": build, "ms_per_query_unbatched": 1000 * float(np.median(times)),
                      "ms_per_query_batched": 1000 * batched}))
    return 0


def autofaiss_build(embeddings: str, index_path: str, infos_path: str, factory: str) -> int:
    """autofaiss's `build_index` on clip-retrieval shards, timed (bench_store_scale part 4; runs in
    autofaiss's own venv, which pins numpy<2)."""
    from autofaiss import build_index

    t = time.perf_counter()
    build_index(embeddings=embeddings, index_path=index_path, index_infos_path=infos_path, index_key=factory,
                metric_type="ip", max_index_memory_usage="16G", current_memory_available="20G", verbose=30)
    print(json.dumps({"seconds": time.perf_counter() - t}))
    return 0


def budget_build(shards: str, out: str, budget: str) -> int:
    """`index_from_shards` under a memory budget ("": none), with the packaged model (bench_compressed): seconds,
    this process's peak RSS (VmHWM: with the shards' and the store's mapped file pages) and its peak once the
    model was loaded, and the peak of its anonymous memory (RssAnon, sampled every 0.5 s), in MB."""
    import clipzsl
    from clipzsl.shards import index_from_shards

    model = clipzsl.load_model("packaged")
    loaded = status_mb("VmHWM")
    anon = [status_mb("RssAnon")]
    done = threading.Event()
    sampler = threading.Thread(target=lambda: [anon.append(status_mb("RssAnon")) for _ in iter(lambda: done.wait(0.5), True)],
                               daemon=True)
    sampler.start()
    t = time.perf_counter()
    index = index_from_shards(shards, out, model, dtype="float16", max_memory=budget or None)
    build_s = time.perf_counter() - t
    done.set()
    sampler.join()
    print(json.dumps({"build_s": build_s, "peak_rss_mb": status_mb("VmHWM"), "peak_anon_mb": max(anon),
                      "model_loaded_rss_mb": loaded, "state": index.saved_index.state()}))
    return 0


def budget_search(directory: str, queries_path: str) -> int:
    """Open an image index and search it one query at a time (bench_compressed), per kind of query in the
    .npz `queries_path`: the packaged model's load, then open (with that model) + first query, ms/query (median;
    and again once the stored rows the re-rank read are in the page cache, `_warm`), the rows found (from the keys
    ".../img/<row>.jpg"), and the RSS the open index adds (VmRSS after the queries less before the open), MB."""
    import numpy as np

    import clipzsl
    from clipzsl.image_index import ImageIndex

    kinds = np.load(queries_path)
    t = time.perf_counter()
    model = clipzsl.load_model("packaged")  # loaded once by a service or a Ray actor, before any index
    loaded = time.perf_counter() - t
    before = {field: status_mb(field) for field in ("VmRSS", "RssAnon", "RssFile")}
    t = time.perf_counter()
    index = ImageIndex(directory, model)
    index.search(kinds["text"][0], 10)
    result: dict = {"model_load_s": loaded, "open_first_query_s": time.perf_counter() - t}
    for kind in kinds.files:
        result[kind] = {}
        for run in ("", "_warm"):  # the second time, the stored rows the re-rank reads are in the page cache
            times, found = [], []
            for query in kinds[kind]:
                t = time.perf_counter()
                hits = index.search(query, 10)
                times.append(time.perf_counter() - t)
                found.append([int(Path(path).stem) for path, _ in hits])
            result[kind].update({f"ms_per_query{run}": 1000 * float(np.median(times)), "found": found})
    print(json.dumps({**result, **{f"index_{name}_mb": status_mb(field) - before[field] for name, field in
                                   (("rss", "VmRSS"), ("anon", "RssAnon"), ("file", "RssFile"))}}))
    return 0


def index_info(directory: str) -> int:
    """`ImageIndex.info()` with the packaged model (bench_compressed): recall@10 measured now on new queries
    of each kind, against what the saved index noted when it was tuned; seconds it took."""
    from dataclasses import asdict

    import clipzsl
    from clipzsl.image_index import ImageIndex

    index = ImageIndex(directory, clipzsl.load_model("packaged"))
    t = time.perf_counter()
    info = index.info()
    print(json.dumps({"info_s": time.perf_counter() - t, "info": asdict(info), "state": index.saved_index.state()},
                     default=str))
    return 0


def onnx_imports(folder: str) -> int:
    """Classify one image through `onnx:<folder>` as the service does (bench_onnx): which heavy modules
    `import clipzsl` alone brings in, which are in the process after classifying, every top-level module
    loaded (bench_onnx sums their distributions' sizes), and the seconds it all took."""
    start = time.perf_counter()
    heavy = ("torch", "torchvision", "timm", "open_clip", "transformers", "onnxruntime")
    import clipzsl

    by_package = [m for m in heavy if m in sys.modules]
    from PIL import Image

    import clipzsl.serve  # noqa: F401  (the service's own imports)

    classifier = clipzsl.ZeroShotClassifier(f"onnx:{folder}", labels=["cat", "dog"], cache=False)
    classifier.predict([Image.new("RGB", (64, 48), "red")])
    top_level = sorted({name.partition(".")[0] for name, module in sys.modules.items() if module is not None})
    print(json.dumps({"package_import": by_package, "after_classify": [m for m in heavy if m in sys.modules],
                      "modules": top_level, "seconds": time.perf_counter() - start}))
    return 0


CHILDREN: dict[str, Callable[..., int]] = {
    "counting-classify": counting_classify,
    "embed-peak-rss": embed_peak_rss,
    "open-query": open_query,
    "label-cache-query": label_cache_query,
    "autofaiss-build": autofaiss_build,
    "budget-build": budget_build,
    "budget-search": budget_search,
    "index-info": index_info,
    "onnx-imports": onnx_imports,
}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] not in CHILDREN:
        print(f"usage: python -m benchmarks.children {{{','.join(CHILDREN)}}} ARG...", file=sys.stderr)
        return 2
    return CHILDREN[args[0]](*args[1:])


if __name__ == "__main__":
    sys.exit(main())
