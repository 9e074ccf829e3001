"""`clipzsl serve` under load, and its page in a real browser.

A bounded load test on 127.0.0.1 (an asyncio httpx loop): CLIENTS concurrent clients for DURATION
seconds against /classify (1,000 labels, the packaged model) and /search (an index of
200,000 vectors), with micro-batching and one request at a time; requests/s, p50/p95/p99
latency, errors, and the server's RSS before and after. Then one /classify against the
transformers zero-shot pipeline called per image with the same labels (a random tiny CLIP, the
same `hf:` model for both). Last, a screenshot of the page (Debian's chromium via Playwright).

Usage: python -m benchmarks.bench_serve [--duration 60] [--clients 50] [--rows 200000] [--device cpu] [--only PART]
On a GPU: python -m benchmarks.bench_serve --only load --device cuda --name serve_gpu
Writes benchmarks/results/serve.json through the recorder (a part not run keeps its earlier figures)
and serve_page.png; serve.md is written from serve.json by hand.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import IO, Iterator, Sequence

import numpy as np
from PIL import Image

from benchmarks import report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(args: list[str], timeout: float = 300, log: IO[bytes] | None = None,
                   clipzsl: Sequence[str] = (sys.executable, "-m", "clipzsl.cli")
                   ) -> Iterator[tuple[str, subprocess.Popen]]:
    """`clipzsl serve ARGS` on 127.0.0.1 and a free port, until /health answers; stopped on exit.
    Its output goes to `log` (a binary file the caller reads), else to a temporary file. `clipzsl`: the
    command that runs the command line."""
    import httpx

    port = free_port()
    log = log or tempfile.TemporaryFile()
    proc = subprocess.Popen([*clipzsl, "serve", "--host", "127.0.0.1", "--port", str(port), *args], stdout=log,
                            stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                raise RuntimeError(f"clipzsl serve exited with {proc.returncode}: {log.read().decode()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"clipzsl serve did not answer on {url} in {timeout:.0f} s")
            time.sleep(0.2)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def drive_page(url: str, query: str, image: Path, labels: str, screenshot: Path | None = None,
               width: int = 1000) -> dict:
    """Type a query and wait for thumbnails; upload an image and wait for its labels (in chromium)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": width, "height": 900})
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent.indexOf('connecting') < 0")
            page.fill("#query", query)
            page.press("#query", "Enter")
            page.wait_for_selector("#grid figure img")
            page.wait_for_function("[...document.querySelectorAll('#grid img')].every(i => i.complete && "
                                   "i.naturalWidth > 0)")
            thumbnails = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.naturalWidth)")
            page.fill("#labels", labels)
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#labels-out li.prediction")
            predictions = page.eval_on_selector_all("#labels-out li.prediction", "items => items.map(i => i.textContent)")
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return {"thumbnails": thumbnails, "predictions": predictions,
                    "error": page.text_content("#classify-error") + page.text_content("#search-error")}
        finally:
            browser.close()


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def png(colour: tuple[int, int, int], size: int = 256) -> bytes:
    rng = np.random.default_rng(sum(colour))
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (size, size, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "PNG")
    return out.getvalue()


async def load(url: str, endpoint: str, clients: int, duration: float, payload) -> dict:
    """`clients` loops sending requests for `duration` seconds; latencies of the answered ones."""
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        stop = time.perf_counter() + duration

        async def one(n: int) -> None:
            i = n
            while time.perf_counter() < stop:
                start = time.perf_counter()
                try:
                    response = await client.post(endpoint, **payload(i))
                    ok = response.status_code == 200
                    key = str(response.status_code)
                except httpx.HTTPError as err:
                    ok, key = False, type(err).__name__
                if ok:
                    latencies.append(time.perf_counter() - start)
                else:
                    errors[key] = errors.get(key, 0) + 1
                i += clients

        began = time.perf_counter()
        await asyncio.gather(*(one(n) for n in range(clients)))
        elapsed = time.perf_counter() - began
    ms = np.array(latencies) * 1000
    pct = (lambda q: round(float(np.percentile(ms, q)), 1)) if len(ms) else (lambda q: None)
    return {"requests": len(latencies), "seconds": round(elapsed, 1), "rps": round(len(latencies) / elapsed, 2),
            "p50_ms": pct(50), "p95_ms": pct(95), "p99_ms": pct(99), "errors": sum(errors.values()),
            "error_kinds": errors}


def loadavg() -> float:
    """The machine's 1-minute load average: how busy it was besides the server and its clients."""
    return float(Path("/proc/loadavg").read_text().split()[0])


def run_load(server_args: list[str], endpoint: str, clients: int, duration: float, payload, warmup,
             every: float = 5) -> dict:
    """One load run; the server's RSS before, after and every `every` seconds (to tell growth that
    levels off from a leak), and the load average before and after."""
    with running_server(server_args, timeout=900) as (url, proc):
        warmup(url)
        before, load_before = rss_mb(proc.pid), loadavg()
        samples: list[float] = []
        done = threading.Event()

        def sample() -> None:
            while not done.wait(every):
                samples.append(round(rss_mb(proc.pid), 1))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        try:
            result = asyncio.run(load(url, endpoint, clients, duration, payload))
        finally:
            done.set()
            sampler.join()
        result["rss_before_mb"], result["rss_after_mb"] = round(before, 1), round(rss_mb(proc.pid), 1)
        result[f"rss_every_{every:g}s_mb"] = samples
        result["loadavg_before_after"] = [load_before, loadavg()]
        import httpx

        result["mean_batch"] = httpx.get(f"{url}/health").json()["mean_batch"]
    return result


def build_index(directory: Path, rows: int) -> float:
    """An index of the packaged model holding `rows` random unit vectors under made-up paths; seconds it
    took. Embedding that many real images takes hours on this shared 2-core machine (~6 images/s), and
    /search costs the same per query whatever the vectors are: one text encoding and one FAISS search."""
    import clipzsl

    start = time.perf_counter()
    index = clipzsl.ImageIndex(directory, "packaged")
    if len(index) < rows:
        index.add_vectors(random_blocks(len(index), rows, index.model.embed_dim))
    return time.perf_counter() - start


def random_blocks(first: int, rows: int, dim: int):
    """(paths, unit vectors) blocks of 10,000 rows, `first` to `rows`, for `ImageIndex.add_vectors`."""
    rng = np.random.default_rng(0)
    for start in range(first, rows, 10_000):
        count = min(10_000, rows - start)
        vectors = rng.standard_normal((count, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        yield [f"/collection/{i // 1000:04d}/{i:07d}.jpg" for i in range(start, start + count)], vectors


def pipeline_comparison(work: Path, labels: list[str], images: int = 5) -> dict:
    """Seconds per image: the transformers zero-shot pipeline (re-encodes the labels every call)
    against /classify of the same `hf:` model (label embeddings cached once)."""
    import httpx
    from transformers import pipeline

    from clipzsl.backends.hf import save_random_clip

    model_dir = save_random_clip(work / "random_clip", seed=0)
    pictures = [png((i * 40 % 256, 90, 200 - i * 7 % 200), 224) for i in range(images)]
    pipe = pipeline("zero-shot-image-classification", model=model_dir)
    pipe(Image.open(io.BytesIO(pictures[0])), candidate_labels=labels[:5])  # warm-up
    start = time.perf_counter()
    for data in pictures:
        pipe(Image.open(io.BytesIO(data)), candidate_labels=labels)
    per_pipeline = (time.perf_counter() - start) / images
    # the pipeline's own prompt, so both encode the same 1,000 texts
    form = {"labels": ",".join(labels), "templates": "This is a photo of {}."}
    with running_server(["--model", f"hf:{model_dir}", "--max-labels", str(len(labels)),
                         "--cache-dir", str(work / "cache-hf")]) as (url, _):
        with httpx.Client(base_url=url, timeout=600) as client:
            first = time.perf_counter()
            client.post("/classify", files={"image": ("x.png", pictures[0])}, data=form).raise_for_status()
            first = time.perf_counter() - first
            start = time.perf_counter()
            for data in pictures:
                answer = client.post("/classify", files={"image": ("x.png", data)}, data=form)
                answer.raise_for_status()
            per_serve = (time.perf_counter() - start) / images
    return {"model": "random CLIP ViT-B/32-sized (save_random_clip defaults)", "labels": len(labels), "images": images,
            "pipeline_s_per_image": round(per_pipeline, 4), "serve_s_per_image": round(per_serve, 4),
            "serve_first_call_s": round(first, 2), "speedup": round(per_pipeline / per_serve, 1)}


def screenshot(work: Path, out: Path) -> dict:
    """The page over the demo photos (packaged model): a search and a classified upload."""
    from benchmarks.samples import write_samples

    import clipzsl

    photos = write_samples(work / "samples")
    clipzsl.ImageIndex(work / "samples-index", "packaged").update(work / "samples", progress=False)
    with running_server(["--index", str(work / "samples-index"), "--labels", "demo"]) as (url, _):
        return drive_page(url, "a cat", photos[1], "demo", out, width=900)


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_serve", __doc__, "the load test only: 4 clients, 3 s, 5,000 rows")
    parser.add_argument("--duration", type=float, help="seconds per load run (default 60)")
    parser.add_argument("--clients", type=int, help="concurrent clients (default 50)")
    parser.add_argument("--rows", type=int, help="vectors in the /search index (default 200,000)")
    parser.add_argument("--work", default="build/bench_serve", help="where the generated images and indexes go")
    parser.add_argument("--only", choices=("screenshot", "load", "pipeline"), action="append")
    parser.add_argument("--device", default="cpu", help="the server's --device for the load test (cuda on a GPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="the server's --batch-size (default: 8 on the CPU, the device's default elsewhere)")
    parser.add_argument("--name", default="serve", help="results file name under benchmarks/results/ "
                                                        "(serve.md is written by hand from it)")
    return report.fill(parser.parse_args(argv), {"duration": 3.0, "clients": 4, "rows": 5_000, "only": ["load"]},
                       {"duration": 60.0, "clients": 50, "rows": 200_000, "only": ["screenshot", "load", "pipeline"]})


def measure(args: argparse.Namespace) -> dict:
    """Run the parts of `args`; a part not run keeps its earlier figures. Written through the recorder."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parts = args.only
    results = report.previous(args.name)
    results.pop("machine", None)  # the recorder's record has the machine
    from clipzsl.prompts import load_labels

    labels = [e.name for e in load_labels("imagenet1k")]
    if "screenshot" in parts:
        results["page"] = screenshot(work, report.RESULTS_DIR / "serve_page.png")
    if "load" in parts:
        results["index_build_s"] = round(build_index(work / "index", args.rows), 1)
        results["index_rows"] = args.rows
        pictures = [png(((i * 53) % 256, (i * 97) % 256, (i * 31) % 256)) for i in range(64)]
        queries = [f"a photo of a {name}" for name in labels]

        def classify_payload(i: int) -> dict:
            return {"files": {"image": ("x.png", pictures[i % len(pictures)], "image/png")}, "data": {"labels": "imagenet1k"}}

        def search_payload(i: int) -> dict:
            return {"json": {"text": queries[i % len(queries)], "top_k": 10}}

        def warm_classify(url: str) -> None:
            import httpx

            httpx.post(f"{url}/classify", timeout=900, **classify_payload(0)).raise_for_status()

        def warm_search(url: str) -> None:
            import httpx

            httpx.post(f"{url}/search", timeout=900, **search_payload(0)).raise_for_status()

        # on the CPU, forward passes of at most 8 images: the fastest per image on 2 cores (8: 9.6 ms,
        # 32: 17.2 ms with the packaged model, benchmarks/results/serve.md); no effect one at a time
        batch_size = args.batch_size or (8 if args.device == "cpu" else None)
        cache = ["--cache-dir", str(work / "cache"), "--device", args.device,
                 *(["--batch-size", str(batch_size)] if batch_size else [])]
        for mode, batching in (("batched", []), ("one_at_a_time", ["--max-batch", "1"])):
            results.setdefault("load", {})[mode] = {
                "classify": run_load([*batching, *cache], "/classify", args.clients,
                                     args.duration, classify_payload, warm_classify),
                "search": run_load(["--index", str(work / "index"), *batching, *cache], "/search", args.clients,
                                   args.duration, search_payload, warm_search),
            }
            print(mode, json.dumps(results["load"][mode], indent=1), flush=True)
        results["load"]["clients"], results["load"]["duration_s"] = args.clients, args.duration
        results["load"]["device"], results["load"]["batch_size"] = args.device, batch_size
        results["load"]["command"], results["load"]["commit"] = report.invocation(), report.commit()
    if "pipeline" in parts:
        results["pipeline"] = pipeline_comparison(work, labels)
    report.write(args.name, results, None)
    return results


run, main = report.entry_points(options, measure, lambda results: print(json.dumps(results, indent=2)))


if __name__ == "__main__":
    main()
