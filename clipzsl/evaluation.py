"""Evaluation protocols for adapters and baselines over a frozen dual encoder.

- base-to-novel (CoCoOp): classes sorted by name, first half base, second half novel; a
  method trains on base-class images only; base test images are scored among base
  classes, novel among novel classes; H = harmonic mean of the two accuracies.
- generalised ZSL: base ("seen") and novel ("unseen") test images scored against the union
  of labels; per-class mean accuracy on each side and H; optionally calibrated stacking
  (Chao et al. 2016): gamma subtracted from seen-class logits, gamma chosen on seen-class
  validation data only (held-out images of training classes + held-out seen classes acting
  as unseen), never on test data or real unseen classes.
- plain zero-shot (as CLIP_benchmark reports it): every class of a labelled set scored,
  no training; top-1, top-5 accuracy and the mean per-class recall.

The methods compared (`METHODS`, `Problem`, `Fitted`) are in `clipzsl.baselines`; the metrics
in `clipzsl.metrics`.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from .baselines import METHODS, Fitted, Problem
from .images import EmbeddedImages, ImageLoadError
from .metrics import accuracy, harmonic_mean, per_class_recall, reported_top_k_accuracy
from .training import seen_split

if TYPE_CHECKING:
    from .classifier import ZeroShotClassifier

__all__ = ["METHODS", "Fitted", "Problem", "base_novel_split", "base_to_novel", "calibrated_stacking", "choose_gamma",
           "gzsl", "gzsl_metrics", "zeroshot_classification"]


def base_novel_split(classnames: Sequence[str]) -> tuple[list[int], list[int]]:
    """Class indices sorted by name; first half base, second half novel (CoCoOp)."""
    order = sorted(range(len(classnames)), key=lambda i: (classnames[i].lower(), i))
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def calibrated_stacking(logits: torch.Tensor, seen_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Subtract gamma from the seen-class columns."""
    return logits - gamma * seen_mask.to(logits.dtype)[None]


def gzsl_metrics(logits: torch.Tensor, targets: Sequence[int], seen_mask: torch.Tensor, gamma: float = 0.0) -> dict:
    """Seen / unseen per-class mean accuracy and H; `targets` index the columns of `logits`."""
    targets = np.asarray(targets)
    pred = calibrated_stacking(logits, seen_mask, gamma).argmax(1).numpy()
    is_seen = seen_mask.numpy()[targets]
    s = per_class_recall(pred[is_seen], targets[is_seen]) if is_seen.any() else math.nan
    u = per_class_recall(pred[~is_seen], targets[~is_seen]) if (~is_seen).any() else math.nan
    return {"seen": s, "unseen": u, "H": harmonic_mean(s, u), "gamma": gamma}


def choose_gamma(val_logits: torch.Tensor, val_targets: Sequence[int], seen_mask: torch.Tensor) -> float:
    """The gamma maximising H on validation data (ties: the smallest |gamma|).

    A prediction can only change where gamma crosses max(seen logits) - max(unseen logits)
    of some image, so those points (nudged to either side) and 0 are all the candidates.
    """
    seen = seen_mask.bool()
    if seen.all() or not seen.any():
        return 0.0
    gaps = (val_logits[:, seen].max(1).values - val_logits[:, ~seen].max(1).values).numpy()
    eps = 1e-6
    candidates = np.unique(np.concatenate([[0.0], gaps - eps, gaps + eps]))
    best = (-1.0, 0.0)
    for g in sorted(candidates, key=abs):
        h = gzsl_metrics(val_logits, val_targets, seen_mask, float(g))["H"]
        if h > best[0] + 1e-12:
            best = (h, float(g))
    return best[1]


# ------------------------------------------------------------------ protocols


def base_to_novel(fitted: Fitted, test: EmbeddedImages, test_targets: Sequence[int], base: Sequence[int],
                  novel: Sequence[int]) -> dict:
    """Base accuracy among base classes, novel among novel classes, H."""
    y = np.asarray(test_targets)
    out = {}
    for side, classes in (("base", base), ("novel", novel)):
        idx = np.flatnonzero(np.isin(y, classes))
        if side == "novel" and not fitted.scores_novel:
            out[side] = math.nan
            continue
        col = {c: i for i, c in enumerate(classes)}
        logits = fitted.score(test.subset(idx), list(classes))
        out[side] = accuracy(logits, [col[int(c)] for c in y[idx]])
    out["H"] = harmonic_mean(out["base"], out["novel"])
    return out


def gzsl(fitted: Fitted, p: Problem, test: EmbeddedImages, test_targets: Sequence[int], seen: Sequence[int],
         unseen: Sequence[int], seed: int) -> dict:
    """GZSL over seen ∪ unseen, without and with calibrated stacking (gamma from seen validation)."""
    classes = sorted(list(seen) + list(unseen))
    col = {c: i for i, c in enumerate(classes)}
    seen_mask = torch.tensor([c in set(seen) for c in classes])
    logits = fitted.score(test, classes)
    y = [col[int(c)] for c in test_targets]
    plain = gzsl_metrics(logits, y, seen_mask, 0.0)
    # gamma on the seen-class validation split: val-base images + held-out seen classes as "unseen"
    tr, vb, vn, tr_classes, val_classes = seen_split(p.targets, p.seen, seed)
    if not val_classes or not vb:
        gamma = 0.0
    else:
        vclasses = sorted(tr_classes + val_classes)
        vcol = {c: i for i, c in enumerate(vclasses)}
        vmask = torch.tensor([c in set(tr_classes) for c in vclasses])
        vidx = vb + vn
        vlogits = fitted.score(p.images.subset(vidx), vclasses)
        gamma = choose_gamma(vlogits, [vcol[p.targets[i]] for i in vidx], vmask)
    calibrated = gzsl_metrics(logits, y, seen_mask, gamma)
    return {"plain": plain, "calibrated": calibrated}


def zeroshot_classification(clf: ZeroShotClassifier, paths: Sequence[str], targets: Sequence[int],
                            batch_size: int | None = None) -> tuple[dict, list[ImageLoadError]]:
    """CLIP_benchmark's zero-shot metrics of `clf` on labelled images (`targets` index `clf.labels`).

    acc1, acc5 (None under 5 classes, where it would be 1 by construction, as CLIP_benchmark
    does) and mean_per_class_recall (per-class accuracy). Unreadable images are not scored;
    they come back so the caller can report them and say the metrics leave them out.
    """
    if clf.adapter is not None:
        raise ValueError("zeroshot_classification scores the plain zero-shot classifier; this one has an adapter")
    embedded = clf.embed(list(paths), batch_size=batch_size, skip_errors=True)
    target_of = dict(zip(map(str, paths), targets))
    y = [target_of[source] for source in embedded.sources]
    logits = clf.logits(embedded)
    metrics = {
        "acc1": accuracy(logits, y),
        "acc5": reported_top_k_accuracy(logits, y, 5),
        "mean_per_class_recall": per_class_recall(logits.argmax(1).numpy(), y),
    }
    return metrics, embedded.failures
