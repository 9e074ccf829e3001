"""Helpers shared by the suite's benchmarks: metrics over numpy arrays, classifier options, load, plots."""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

import clipzsl
from clipzsl.metrics import accuracy, per_class_recall, reported_top_k_accuracy


# ---------------------------------------------------------------- classification metrics


def metrics(scores: np.ndarray, labels: Sequence[int]) -> dict:
    """top-1, top-5 and mean per-class recall of a score matrix [images, classes], by clipzsl.metrics'
    definitions (top-5 is None with fewer than 5 classes, as `clipzsl eval` reports it)."""
    logits = torch.as_tensor(scores)
    return {
        "top1": accuracy(logits, labels),
        "top5": reported_top_k_accuracy(logits, labels, 5),
        "mean_class_recall": per_class_recall(np.argmax(scores, axis=1), labels),
    }


# ---------------------------------------------------------------- clipzsl options that vary across versions


def uncached() -> dict:
    """Keyword arguments that turn the on-disk label-embedding cache off, where the constructor has one:
    timings of text encoding must encode every prompt, on every run."""
    params = inspect.signature(clipzsl.ZeroShotClassifier).parameters
    return {"cache": False} if "cache" in params else {}


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the shared machine was."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def pct(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{100 * value:.{digits}f}"


# ---------------------------------------------------------------- synthetic embeddings


def cluster_centres(count: int, dim: int) -> np.ndarray:
    """`count` random unit centres in `dim` dimensions, the same at every call (seed 12345): the
    neighbourhoods of every synthetic collection and query set of that dimension."""
    c = np.random.default_rng(12345).normal(size=(count, dim)).astype(np.float32)
    return c / np.linalg.norm(c, axis=1, keepdims=True)


def synthetic(count: int, dim: int, seed: int, centres: int = 4096) -> np.ndarray:
    """`count` unit vectors around `centres` cluster centres (noise 0.5 per unit of centre): synthetic
    embeddings with neighbourhoods, as real ones have (a point's cosine to its centre is about 0.89)."""
    rng = np.random.default_rng(seed)
    c = cluster_centres(centres, dim)
    v = c[rng.integers(0, centres, count)] + rng.normal(scale=0.5 / np.sqrt(dim), size=(count, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


# ---------------------------------------------------------------- plots


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display); ImportError says how to install it."""
    try:
        import matplotlib
    except ImportError as err:
        raise ImportError("plots need matplotlib: pip install matplotlib (or pip install -e '.[bench]')") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return path
