"""Classifier building: clipzsl versus open_clip.build_zero_shot_classifier, side by side.

Same random-init ViT-B-32, the 1,000 ImageNet class names x the 7-template set.
Targets (issue 2): clipzsl at least 5x faster, weights within 1e-5.
clipzsl's on-disk label cache, where the constructor has one, is off: every run encodes every prompt.

Usage: python -m benchmarks.bench_classifier_build [--labels N] [--repeats R]
In the suite (python -m benchmarks): 500 labels x 3 interleaved runs (open_clip takes ~4-12 min a run
for 1,000 labels on 2 shared cores); --quick: 50 labels x 1 run.
"""
from __future__ import annotations

import argparse

import open_clip
import torch

import clipzsl
from clipzsl.backends.openclip import OpenClipBackend

from . import common, report

NAME = "classifier_build"
TARGETS = {"speedup": 5.0, "max_abs_diff": 1e-5}


def measure(labels_count: int = 1000, templates_name: str = "simple_7", repeats: int = 1) -> tuple[dict, list[str]]:
    load_before = common.load_average()
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    backend = OpenClipBackend(model, preprocess, tokenizer, spec="openclip:ViT-B-32/random")
    labels = [e.name for e in clipzsl.load_labels("imagenet1k")][:labels_count]
    templates = clipzsl.load_templates(templates_name)
    options = common.uncached()

    def ours():
        return clipzsl.ZeroShotClassifier(backend, labels=labels, templates=templates, **options).class_embeddings

    def reference():
        return open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates).T

    # interleave the two sides so that load on the shared machine hits both alike
    ours_times, ref_times = [], []
    for _ in range(repeats):
        t, ours_weights = report.timed(ours, 1)
        ours_times += t
        t, ref_weights = report.timed(reference, 1)
        ref_times += t
    max_diff = float((ours_weights - ref_weights).abs().max())
    speedup = report.median(ref_times) / report.median(ours_times)
    results = {
        "labels": len(labels),
        "templates": len(templates),
        "clipzsl_options": {k: repr(v) for k, v in options.items()},
        "clipzsl_s": ours_times,
        "open_clip_s": ref_times,
        "speedup": speedup,
        "max_abs_diff": max_diff,
        "targets": TARGETS,
        "load_average": {"before": load_before, "after": common.load_average()},
        "ratios": [
            {"name": "classifier build: clipzsl vs open_clip", "value": speedup, "target": TARGETS["speedup"]},
        ],
        "checks": [
            {"name": "classifier build: speed-up", "value": f"{speedup:.1f}x", "target": ">= 5x",
             "met": speedup >= TARGETS["speedup"]},
            {"name": "classifier build: max |weight difference|", "value": f"{max_diff:.1e}", "target": "< 1e-5",
             "met": max_diff < TARGETS["max_abs_diff"]},
        ],
    }
    lines = [
        f"{len(labels)} labels x {len(templates)} templates ({templates_name}), random-init ViT-B-32, CPU"
        + (", clipzsl label cache off" if options else "") + ".",
        "",
        "| builder | median s | runs |",
        "|---|---|---|",
        f"| clipzsl.ZeroShotClassifier | {report.median(ours_times):.1f} | {len(ours_times)} |",
        f"| open_clip.build_zero_shot_classifier | {report.median(ref_times):.1f} | {len(ref_times)} |",
        "",
        f"Speed-up: **{speedup:.1f}x** (target >= 5x). Max |difference| of the weights: **{max_diff:.2e}** "
        "(target < 1e-5).",
    ]
    return results, lines


def run(quick: bool = False) -> dict:
    """The suite's entry: 500 labels x 3 interleaved runs; quick: 50 labels x 1 run."""
    results, lines = measure(50 if quick else 500, "simple_7", 1 if quick else 3)
    results["quick"] = quick
    results["markdown"] = lines
    report.write(NAME, results, lines)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--templates", default="simple_7")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median reported)")
    args = parser.parse_args(argv)
    results, lines = measure(args.labels, args.templates, args.repeats)
    print(report.write(NAME, results, lines).read_text())


if __name__ == "__main__":
    main()
