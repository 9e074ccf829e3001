"""Classifier building: clipzsl versus open_clip.build_zero_shot_classifier, side by side.

Same random-init ViT-B-32, the 1,000 ImageNet class names x the 7-template set.
Targets (issue 2): clipzsl at least 5x faster, weights within 1e-5.

Usage: python -m benchmarks.bench_classifier_build [--labels N] [--repeats R]
"""
from __future__ import annotations

import argparse

import open_clip
import torch

import clipzsl
from clipzsl.backends.openclip import OpenClipBackend

from . import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--templates", default="simple_7")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each side (median reported)")
    args = parser.parse_args()

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    tokenizer = open_clip.get_tokenizer("ViT-B-32")
    backend = OpenClipBackend(model, preprocess, tokenizer, spec="openclip:ViT-B-32/random")
    labels = [e.name for e in clipzsl.load_labels("imagenet1k")][: args.labels]
    templates = clipzsl.load_templates(args.templates)

    def ours():
        return clipzsl.ZeroShotClassifier(backend, labels=labels, templates=templates).weights

    def reference():
        return open_clip.build_zero_shot_classifier(model, tokenizer, labels, templates).T

    # interleave the two sides so that load on the shared machine hits both alike
    ours_times, ref_times = [], []
    for _ in range(args.repeats):
        t, ours_weights = report.timed(ours, 1)
        ours_times += t
        t, ref_weights = report.timed(reference, 1)
        ref_times += t
    max_diff = float((ours_weights - ref_weights).abs().max())
    speedup = report.median(ref_times) / report.median(ours_times)
    results = {
        "labels": len(labels),
        "templates": len(templates),
        "clipzsl_s": ours_times,
        "open_clip_s": ref_times,
        "speedup": speedup,
        "max_abs_diff": max_diff,
        "targets": {"speedup": 5.0, "max_abs_diff": 1e-5},
    }
    lines = [
        f"{len(labels)} labels x {len(templates)} templates ({args.templates}), random-init ViT-B-32, CPU.",
        "",
        "| builder | median s | runs |",
        "|---|---|---|",
        f"| clipzsl.ZeroShotClassifier | {report.median(ours_times):.1f} | {len(ours_times)} |",
        f"| open_clip.build_zero_shot_classifier | {report.median(ref_times):.1f} | {len(ref_times)} |",
        "",
        f"Speed-up: **{speedup:.1f}x** (target >= 5x). Max |difference| of the weights: **{max_diff:.2e}** "
        "(target < 1e-5).",
    ]
    print(report.write("classifier_build", results, lines).read_text())


if __name__ == "__main__":
    main()
