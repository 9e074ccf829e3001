"""clipzsl.metrics' reporting rule for top-5, and the benchmarks scoring through it (they once kept a
copy that disagreed at exactly 5 classes)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from benchmarks import common
from clipzsl.metrics import reported_top_k_accuracy, top_k_accuracy


def scores(classes: int, images: int = 40, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(images, classes)).astype(np.float32), rng.integers(0, classes, images).tolist()


@pytest.mark.parametrize("classes", [2, 4])
def test_top5_is_not_reported_under_5_classes(classes):
    logits, targets = scores(classes)
    assert reported_top_k_accuracy(torch.from_numpy(logits), targets, 5) is None
    assert common.metrics(logits, targets)["top5"] is None


def test_top5_is_reported_from_5_classes_on_as_clip_benchmark_does():
    logits, targets = scores(5)
    assert reported_top_k_accuracy(torch.from_numpy(logits), targets, 5) == 1.0  # every class is in the top 5
    logits, targets = scores(12)
    reported = reported_top_k_accuracy(torch.from_numpy(logits), targets, 5)
    rank = (logits > logits[np.arange(len(targets)), targets][:, None]).sum(1)
    assert reported == pytest.approx(np.mean(rank < 5)) and reported < 1


@pytest.mark.parametrize("classes", [4, 5, 6, 30])
def test_the_benchmarks_metrics_are_the_librarys(classes):
    logits, targets = scores(classes, seed=classes)
    got = common.metrics(logits, targets)
    tensor = torch.from_numpy(logits)
    assert got["top1"] == pytest.approx(top_k_accuracy(tensor, targets, 1))
    assert got["top5"] == reported_top_k_accuracy(tensor, targets, 5)
    recall = np.mean([np.mean(logits[np.asarray(targets) == c].argmax(1) == c) for c in set(targets)])
    assert got["mean_class_recall"] == pytest.approx(recall)
