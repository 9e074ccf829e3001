"""Scores of predictions against integer class ids (`targets`): one copy of each, used by the
evaluation protocols, the training's model selection and the benchmarks; and retrieval's recall@k
over a caption-image score matrix (`retrieval_recalls`, CLIP_benchmark's zeroshot_retrieval metrics)."""
from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F


#: integer class ids, one per image: a list, a numpy array or a tensor
Targets = Union[Sequence[int], npt.NDArray[np.integer], torch.Tensor]


def harmonic_mean(a: float, b: float) -> float:
    """H of two accuracies; NaN when either is missing (None or NaN)."""
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def harmonic_mean_or_available(a: float, b: float) -> float:
    """H of `a` and `b`, or the one of them that exists (not NaN); NaN when neither does.

    Model selection on a seen-class split may lack one side (no held-out images, or too few
    classes to hold some out): it is then judged on the other side alone."""
    present = [v for v in (a, b) if not math.isnan(v)]
    return harmonic_mean(a, b) if len(present) == 2 else (present[0] if present else math.nan)


def accuracy(logits: torch.Tensor, targets: Targets) -> float:
    """Share of rows whose highest logit is at the target column; NaN without rows."""
    target = torch.as_tensor(targets)
    return float((logits.argmax(1) == target).float().mean()) if len(target) else math.nan


def top_k_accuracy(logits: torch.Tensor, targets: Targets, k: int) -> float:
    """Share of images whose true class is among the `k` highest logits (k = 1 is `accuracy`)."""
    target = torch.as_tensor(targets)
    if not len(target):
        return math.nan
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == target[:, None]).any(1).float().mean())


def reported_top_k_accuracy(logits: torch.Tensor, targets: Targets, k: int) -> float | None:
    """`top_k_accuracy`, or None with fewer than `k` classes: the one rule for reporting top-5.

    It is CLIP_benchmark's (`acc5` from 5 classes on), so that evaluation records compare with
    its tables; the evaluation protocol and the benchmarks both report through it."""
    return top_k_accuracy(logits, targets, k) if logits.shape[1] >= k else None


def classification_metrics(logits: torch.Tensor, targets: Targets) -> dict[str, float | None]:
    """CLIP_benchmark's classification metrics of `logits` [N, C]: acc1, acc5 (`reported_top_k_accuracy`)
    and mean_per_class_recall (`per_class_recall` of the top-1 predictions)."""
    return {"acc1": accuracy(logits, targets), "acc5": reported_top_k_accuracy(logits, targets, 5),
            "mean_per_class_recall": per_class_recall(logits.argmax(1).numpy(), targets)}


def per_class_recall(predictions: Targets, targets: Targets) -> float:
    """Mean over the classes present in `targets` of the share of that class's images predicted as it."""
    predicted, target = np.asarray(predictions), np.asarray(targets)
    classes = np.unique(target)
    return float(np.mean([(predicted[target == c] == c).mean() for c in classes])) if len(classes) else math.nan


def expected_calibration_error(probs: torch.Tensor, targets: Targets, bins: int = 15) -> float:
    """ECE of the top-1 confidence (Guo et al. 2017): |confidence - accuracy| per equal-width
    bin, weighted by the bin's share of images. 0 is perfectly calibrated."""
    confidence, pred = probs.max(1)
    hit = (pred == torch.as_tensor(targets)).float()
    which = torch.clamp((confidence * bins).ceil().long() - 1, 0, bins - 1)
    total = torch.zeros(bins).index_add_(0, which, torch.ones_like(confidence))
    gap = torch.zeros(bins).index_add_(0, which, confidence - hit).abs()
    return float(gap.sum() / total.sum())


def fit_logit_scale(cosines: torch.Tensor, targets: Targets) -> float:
    """The scale s minimising the NLL of softmax(s * cosines): temperature scaling, one
    parameter fitted by L-BFGS in log space. Fit it on validation data, never on test data."""
    log_scale = torch.zeros((), requires_grad=True)
    target = torch.as_tensor(targets)
    opt = torch.optim.LBFGS([log_scale], lr=0.5, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(cosines * log_scale.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_scale.detach().exp())


#: the recall@k that `retrieval_recalls` reports, CLIP_benchmark's
RETRIEVAL_KS = (1, 5, 10)


def positive_ranks(scores: torch.Tensor, positive: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Per query (row of `scores` [Q, C]), the 0-based rank of its best-scored positive candidate
    (`positive` [Q, C] bool): how many negatives score at least as high. A tie ranks the negative first,
    so ties never raise a recall; a query without a positive gets C (found at no k). Rows are taken
    `chunk` at a time, so the temporaries stay [chunk, C]."""
    ranks = []
    for s, p in zip(scores.split(chunk), positive.split(chunk)):
        best = s.masked_fill(~p, -math.inf).max(1, keepdim=True).values
        ranks.append(((s >= best) & ~p).sum(1))
    return torch.cat(ranks) if ranks else torch.zeros(0, dtype=torch.long)


def recall_at_k(ranks: torch.Tensor, k: int, candidates: int) -> float | None:
    """Share of queries with a positive among their top `k` (`positive_ranks` below k): recall@k as CLIP-like
    papers and CLIP_benchmark report it. None with fewer than `k` candidates, where CLIP_benchmark's top-k
    fails and any ranking would find every positive; NaN without queries."""
    if candidates < k:
        return None
    return float((ranks < k).float().mean()) if len(ranks) else math.nan


def retrieval_recalls(scores: torch.Tensor, text_image: Targets, ks: Sequence[int] = RETRIEVAL_KS
                      ) -> dict[str, float | None]:
    """CLIP_benchmark's zeroshot_retrieval metrics of `scores` [texts, images] (cosine of each caption with
    each image), where caption t describes image `text_image[t]`: `image_retrieval_recall@k` (each caption
    finds its image among the top k images) and `text_retrieval_recall@k` (each image finds one of its
    captions among the top k captions), for each k of `ks`. Ties: `positive_ranks`."""
    owner = torch.as_tensor(text_image, dtype=torch.long)
    positive = owner[:, None] == torch.arange(scores.shape[1])[None]
    by_text = positive_ranks(scores, positive)
    by_image = positive_ranks(scores.T, positive.T)
    metrics: dict[str, float | None] = {}
    for k in ks:
        metrics[f"image_retrieval_recall@{k}"] = recall_at_k(by_text, k, scores.shape[1])
        metrics[f"text_retrieval_recall@{k}"] = recall_at_k(by_image, k, scores.shape[0])
    return metrics
