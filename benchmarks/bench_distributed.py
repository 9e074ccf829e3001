"""Ray Data's overhead at equal cores: images/s of one process against `--engine ray` with 1 and 2
CPU model actors, on the same images, runs interleaved (the machine is shared, so the medians of
`--repeats` rounds are reported), plus the decode + preprocess cost per CPU core, which the
on-paper GPU estimates of results/distributed.md are built from.

    python -m benchmarks.bench_distributed --images 5000 --repeats 3
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import clipzsl
from clipzsl import distributed
from clipzsl.images import load_image

from . import report

def make_images(folder: Path, n: int) -> list[str]:
    """`n` JPEGs of 256x192 with structure (gradients, blocks, noise): decoding costs what a photo's would."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:192, 0:256]
    paths = []
    for i in range(n):
        base = (xx * rng.uniform(0.2, 1) + yy * rng.uniform(0.2, 1))[..., None] * rng.uniform(0.3, 1, 3)
        pixels = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(str(path))
    return paths


def single_process(spec: str, paths: list[str], batch_size: int) -> float:
    start = time.perf_counter()
    model = clipzsl.load_model(spec)
    clipzsl.embed_images(model, paths, batch_size=batch_size, progress=False)
    return time.perf_counter() - start


def on_ray(spec: str, paths: list[str], batch_size: int, actors: int) -> float:
    start = time.perf_counter()
    ds = distributed.embed_dataset(distributed.paths_dataset(paths), spec, batch_size=batch_size, concurrency=actors)
    rows = sum(len(batch["path"]) for batch in ds.iter_batches(batch_format="numpy", batch_size=None))
    assert rows == len(paths)
    return time.perf_counter() - start


def decode_rate(spec: str, paths: list[str]) -> float:
    """Images/s of decode + preprocess on one core (what the CPU stage does per image)."""
    import torch

    torch.set_num_threads(1)
    preprocess = clipzsl.load_model(spec).preprocess
    start = time.perf_counter()
    for path in paths:
        preprocess(load_image(path))
    return len(paths) / (time.perf_counter() - start)


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_distributed", __doc__, "40 images, 1 round")
    parser.add_argument("--images", type=int, help="default 5000 (quick 40)")
    parser.add_argument("--repeats", type=int, help="default 3 (quick 1)")
    parser.add_argument("--model", default="packaged")
    parser.add_argument("--batch-size", type=int, default=32)
    return report.fill(parser.parse_args(argv), {"images": 40, "repeats": 1}, {"images": 5000, "repeats": 3})


def show(result: dict) -> None:
    print(json.dumps(result["images_per_s_median"], indent=2),
          f"decode/core {result['decode_preprocess_images_per_s_per_core']:.0f} img/s")


def measure(args: argparse.Namespace) -> dict:
    """Time the variants, interleaved, and write the results through the recorder (distributed.md is
    written by hand from distributed.json)."""
    import ray

    os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_images(Path(tmp), args.images)
        clipzsl.load_model(args.model)  # builds the packaged model's concept cache once, outside the timings
        # 2 physical cores for everyone; 4 logical CPUs so 2 model actors and the decode tasks can be scheduled
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(Path(tmp) / "ray"))
        seconds: dict[str, list[float]] = {"single process": [], "ray, 1 actor": [], "ray, 2 actors": []}
        for _ in range(args.repeats):  # interleaved: a busy spell of the shared machine hits every variant
            seconds["single process"].append(single_process(args.model, paths, args.batch_size))
            for actors in (1, 2):
                seconds[f"ray, {actors} actor{'s' * (actors > 1)}"].append(
                    on_ray(args.model, paths, args.batch_size, actors))
            print({k: [round(s, 1) for s in v] for k, v in seconds.items()}, flush=True)
        ray.shutdown()
        rate = decode_rate(args.model, paths[:500])
    result = {
        "images": args.images, "model": args.model, "batch_size": args.batch_size, "repeats": args.repeats,
        "cpu_cores": os.cpu_count(), "seconds": seconds,
        "images_per_s_median": {k: args.images / statistics.median(v) for k, v in seconds.items()},
        "decode_preprocess_images_per_s_per_core": rate,
    }
    report.write("distributed", result, None)
    return result


run, main = report.entry_points(options, measure, show)


if __name__ == "__main__":
    main()
