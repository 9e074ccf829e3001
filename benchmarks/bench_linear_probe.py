"""Linear probe (CLIP_benchmark's linear_probe task, `clipzsl.linear_probe`) next to zero-shot and the
cross-attention adapter, at 1/2/4/8/16 images per class and on every training image.

Each method sees the same training images and is scored on the same test images, among every class
(no base/novel split: the probe cannot score a class it has no images of). The probe chooses its weight
decay on a validation split of the training images (20%) and trains on the k-shot images of the rest
(few-shot) or on all of them (full), CLIP_benchmark's defaults otherwise (lr 0.1, 10 epochs, batch 64).
The adapter (`training.fit_with_selection`, every class seen, one grid point: lr 3e-3, consistency 1)
trains on the same k-shot images (its own validation split holds out some of them and some classes).
Few-shot draws are seeded; mean ± std over `--seeds` seeds for the probe, seed 0 for the adapter.

Data (packaged default model):
- Fashion-MNIST: a class-balanced sample of the train split trains, of the test split tests.
- Tux Paint stamps: bench_adapter's classes (category folders), half of each class's images train.
- emoji: twemoji + noto train, openmoji (else fluent3d: openmoji's SVGs need cairosvg) tests, a held-out
  drawing style; the first 250 images of each style (the classes all three draw). 2 training images per
  class, so only the full probe (shots that a class cannot give are refused, and reported as such).

Usage: python -m benchmarks.bench_linear_probe [--quick] [--datasets fashion_mnist,tuxpaint,emoji]
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

import clipzsl
from clipzsl import linear_probe as lp
from clipzsl.errors import InputError
from clipzsl.head import zero_shot_head
from clipzsl.images import EmbeddedImages, embed_images_cached
from clipzsl.metrics import classification_metrics
from clipzsl.store import cache_root
from clipzsl.training import TrainConfig, fit_with_selection

from . import bench_adapter, common, report
from .datasets import DatasetUnavailable, load

NAME = "linear_probe"
SHOTS: tuple[int | None, ...] = (1, 2, 4, 8, 16, None)
#: Fashion-MNIST images (train, test): full run, --quick
FASHION = {"full": (500, 500), "quick": (300, 200)}
#: emoji images per drawing style: full run, --quick (the first ones, classes drawn by every style kept)
EMOJI = {"full": 250, "quick": 100}
ADAPTER_GRID = ({"lr": 3e-3, "consistency": 1.0},)


@dataclass
class Split:
    names: list[str]
    templates: str
    train: EmbeddedImages
    y: list[int]
    test: EmbeddedImages
    y_test: list[int]
    test_set: str


def fashion_split(model: clipzsl.Backend, quick: bool) -> Split:
    n_train, n_test = FASHION["quick" if quick else "full"]
    train, test = load("fashion_mnist", "train", limit=n_train), load("fashion_mnist", "test", limit=n_test)
    embed = lambda ds: embed_images_cached(model, ds.images, cache_root(), progress=True)  # noqa: E731
    return Split(train.classnames, train.templates, embed(train), train.labels, embed(test), test.labels,
                 "the test split")


def adapter_split(name: str, model: clipzsl.Backend, quick: bool) -> Split:
    """bench_adapter's data, every class kept: its first test set."""
    prepared = bench_adapter.prepare_tux(model) if name == "tuxpaint" else emoji_features(model, quick)
    names, templates, train, y, tests = bench_adapter.build_runs(name, prepared)
    test_set, (test, y_test) = next(iter(tests.items()))
    return Split(names, templates, train, y, test, y_test, test_set)


def emoji_features(model: clipzsl.Backend, quick: bool):
    """bench_adapter.prepare_emoji's (class names, features, labels) of the training styles and the first
    held-out style that can be had (openmoji, else fluent3d)."""
    ds = load("emoji")
    tested = next((s for s in bench_adapter.TEST_STYLES if s in ds.groups), None)  # openmoji needs cairosvg
    if tested is None:
        raise DatasetUnavailable(f"no held-out emoji style ({', '.join(bench_adapter.TEST_STYLES)}) could be had")
    feats, labels = {}, {}
    for style in bench_adapter.TRAIN_STYLES + (tested,):
        idx = [i for i, g in enumerate(ds.groups) if g == style][: EMOJI['quick' if quick else 'full']]
        feats[style] = embed_images_cached(model, [ds.images[i] for i in idx], cache_root(), progress=True)
        labels[style] = [ds.labels[i] for i in idx]
    return ds.classnames, feats, labels


def probe_row(split: Split, shots: int | None, seed: int) -> dict:
    config = lp.ProbeConfig(seed=seed)
    start = time.perf_counter()
    try:
        probe = lp.fit_linear_probe(split.train.embeddings, split.y, len(split.names), shots, config)
    except InputError as err:
        return {"skipped": str(err)}
    return {**lp.probe_metrics(probe, split.test.embeddings, split.y_test), **probe.settings(),
            "seconds": round(time.perf_counter() - start, 2)}


def adapter_row(split: Split, text: torch.Tensor, model: clipzsl.Backend, shots: int | None) -> dict:
    """The adapter on the k-shot images `few_shot_indices` draws (seed 0) from every training image."""
    try:
        rows = lp.few_shot_indices(split.y, shots, 0, len(split.names))
    except InputError as err:
        return {"skipped": str(err)}
    start = time.perf_counter()
    result, info = fit_with_selection(split.train.subset(rows), [split.y[i] for i in rows], text,
                                      list(range(len(split.names))), model.logit_scale, seed=0, grid=ADAPTER_GRID,
                                      base=TrainConfig(epochs=15, patience=4), logit_bias=model.logit_bias)
    logits = result.adapter.head(split.test, text, model.logit_scale, model.logit_bias)
    return {**classification_metrics(logits, split.y_test), "n_train": len(rows), "untrained": info["untrained"],
            "seconds": round(time.perf_counter() - start, 2)}


def measure_split(model: clipzsl.Backend, split: Split, seeds: int) -> dict:
    torch.set_num_threads(1)  # small matrices: on 2 shared cores a second thread only waits (100x slower steps)
    text = bench_adapter.class_embeddings_for(model, split.names, split.templates)
    zero_shot = classification_metrics(zero_shot_head(split.test, text, model.logit_scale, model.logit_bias),
                                       split.y_test)
    out: dict = {"classes": len(split.names), "train_images": len(split.y), "test_images": len(split.y_test),
                 "test_set": split.test_set,
                 "templates": split.templates, "zero_shot": zero_shot, "shots": {}}
    for shots in SHOTS:
        key = "full" if shots is None else str(shots)
        probes = [probe_row(split, shots, seed) for seed in range(seeds if shots is not None else 1)]
        out["shots"][key] = {"probe": probes, "adapter": adapter_row(split, text, model, shots)}
        bench_adapter.log(f"{key}: probe {[p.get('lp_acc1') for p in probes]}, "
                          f"adapter {out['shots'][key]['adapter'].get('acc1')}")
    return out


def _cell(rows: list[dict], key: str) -> str:
    values = [r[key] for r in rows if key in r and r[key] is not None]
    if not values:
        return "n/a"
    cell = common.pct(values[0]) if len(values) == 1 else f"{100 * np.mean(values):.1f} ± {100 * np.std(values):.1f}"
    return cell + (f" ({len(values)} of {len(rows)} draws)" if len(values) < len(rows) else "")


def summary(results: dict) -> list[str]:
    lines = [f"Model: `{results['model']}`. Top-1 accuracy (%) on the test images among every class; the probe's "
             "few-shot rows are mean ± std over seeds, the adapter's seed 0. n/a: a class has fewer training "
             "images than the shots (the probe's count is after its 20% validation split, which each seed draws anew: "
             "\"1 of 3 draws\" is the mean over the seeds whose draw every class could give).", ""]
    for name, res in results["datasets"].items():
        lines += [f"## {name}", "", f"{res['classes']} classes, {res['train_images']} training images, "
                  f"{res['test_images']} test images ({res['test_set']}), templates `{res['templates']}`. "
                  "Zero-shot: top-1 "
                  f"{common.pct(res['zero_shot']['acc1'])}, mean per-class recall "
                  f"{common.pct(res['zero_shot']['mean_per_class_recall'])}.", "",
                  "| shots | linear probe top-1 | probe mean recall | weight decay (seed 0) | adapter top-1 "
                  "| adapter mean recall | zero-shot top-1 |", "|---|---|---|---|---|---|---|"]
        for key, row in res["shots"].items():
            probe, adapter = row["probe"], [row["adapter"]]
            wd = probe[0].get("weight_decay")
            lines.append(f"| {key} | {_cell(probe, 'lp_acc1')} | {_cell(probe, 'lp_mean_per_class_recall')} | "
                         f"{'n/a' if wd is None else f'{wd:.3g}'} | {_cell(adapter, 'acc1')} | "
                         f"{_cell(adapter, 'mean_per_class_recall')} | {common.pct(res['zero_shot']['acc1'])} |")
        lines.append("")
    return lines + [f"- skipped {n}: {why}" for n, why in results["skipped"].items()]


def options(argv=None):
    parser = report.parser("bench_linear_probe", __doc__, "fewer Fashion-MNIST and emoji images, 1 seed")
    parser.add_argument("--datasets", default="fashion_mnist,tuxpaint,emoji")
    parser.add_argument("--seeds", type=int, help="few-shot draws of the probe (default 3, quick 1)")
    return report.fill(parser.parse_args(argv), {"seeds": 1}, {"seeds": 3})


def measure(args) -> dict:
    model = clipzsl.load_model("packaged")
    results: dict = {"model": model.spec, "datasets": {}, "skipped": {}}
    for name in args.datasets.split(","):
        try:
            split = fashion_split(model, args.quick) if name == "fashion_mnist" else adapter_split(name, model,
                                                                                                    args.quick)
        except DatasetUnavailable as err:
            results["skipped"][name] = str(err)
            continue
        results["datasets"][name] = measure_split(model, split, args.seeds)
        report.write(NAME, results, summary(results))
    report.write(NAME, results, summary(results))
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
