"""Evaluation protocols and baselines for adapters over a frozen dual encoder.

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

Baselines (from the papers' descriptions, on cached pooled features):
- zero-shot: s * x @ T.T
- linear probe: multinomial logistic regression on x, base classes only (cannot score novel).
- CLIP-Adapter (Gao et al. 2021): x' = r * MLP(x) + (1 - r) * x, MLP D -> D/4 -> D (ReLU, no bias),
  r = 0.2, logits s * norm(x') @ T.T; class-agnostic, so it also scores novel classes.
- Tip-Adapter-F (Zhang et al. 2022): logits = s * x @ T.T + a * exp(-b (1 - x @ K.T)) @ L, keys K the
  training images' embeddings (fine-tuned), L their one-hot labels; the cache holds base classes
  only, so it leaves novel-class logits at zero-shot.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import Features, TrainConfig, fit_with_selection, seen_split
from .classifier import ZeroShotClassifier
from .images import ImageLoadError

Scorer = Callable[[Features, Sequence[int]], torch.Tensor]  # (features, global class ids) -> logits


# ------------------------------------------------------------------ metrics


def harmonic_mean(a: float, b: float) -> float:
    if a is None or b is None or (isinstance(a, float) and math.isnan(a)) or (isinstance(b, float) and math.isnan(b)):
        return math.nan
    return 0.0 if a + b == 0 else 2 * a * b / (a + b)


def accuracy(logits: torch.Tensor, labels: Sequence[int]) -> float:
    labels = torch.as_tensor(labels)
    return float((logits.argmax(1) == labels).float().mean()) if len(labels) else math.nan


def top_k_accuracy(logits: torch.Tensor, labels: Sequence[int], k: int) -> float:
    """Share of images whose true class is among the `k` highest logits (k = 1 is `accuracy`)."""
    labels = torch.as_tensor(labels)
    if not len(labels):
        return math.nan
    top = logits.topk(min(k, logits.shape[1]), dim=1).indices
    return float((top == labels[:, None]).any(1).float().mean())


def per_class_accuracy(pred: Sequence[int], labels: Sequence[int]) -> float:
    """Mean over the classes present in `labels` of the accuracy on that class's images."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    classes = np.unique(labels)
    return float(np.mean([(pred[labels == c] == c).mean() for c in classes])) if len(classes) else math.nan


def expected_calibration_error(probs: torch.Tensor, labels: Sequence[int], bins: int = 15) -> float:
    """ECE of the top-1 confidence (Guo et al. 2017): |confidence - accuracy| per equal-width
    bin, weighted by the bin's share of images. 0 is perfectly calibrated."""
    confidence, pred = probs.max(1)
    hit = (pred == torch.as_tensor(labels)).float()
    which = torch.clamp((confidence * bins).ceil().long() - 1, 0, bins - 1)
    total = torch.zeros(bins).index_add_(0, which, torch.ones_like(confidence))
    gap = torch.zeros(bins).index_add_(0, which, confidence - hit).abs()
    return float(gap.sum() / total.sum())


def fit_logit_scale(cosines: torch.Tensor, labels: Sequence[int]) -> float:
    """The scale s minimising the NLL of softmax(s * cosines): temperature scaling, one
    parameter fitted by L-BFGS in log space. Fit it on validation data, never on test data."""
    log_scale = torch.zeros((), requires_grad=True)
    target = torch.as_tensor(labels)
    opt = torch.optim.LBFGS([log_scale], lr=0.5, max_iter=100)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(cosines * log_scale.exp(), target)
        loss.backward()
        return loss

    opt.step(closure)
    return float(log_scale.detach().exp())


def base_novel_split(classnames: Sequence[str]) -> tuple[list[int], list[int]]:
    """Class indices sorted by name; first half base, second half novel (CoCoOp)."""
    order = sorted(range(len(classnames)), key=lambda i: (classnames[i].lower(), i))
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def calibrated_stacking(logits: torch.Tensor, seen_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Subtract gamma from the seen-class columns."""
    return logits - gamma * seen_mask.to(logits.dtype)[None]


def gzsl_metrics(logits: torch.Tensor, labels: Sequence[int], seen_mask: torch.Tensor, gamma: float = 0.0) -> dict:
    """Seen / unseen per-class mean accuracy and H; `labels` index the columns of `logits`."""
    labels = np.asarray(labels)
    pred = calibrated_stacking(logits, seen_mask, gamma).argmax(1).numpy()
    is_seen = seen_mask.numpy()[labels]
    s = per_class_accuracy(pred[is_seen], labels[is_seen]) if is_seen.any() else math.nan
    u = per_class_accuracy(pred[~is_seen], labels[~is_seen]) if (~is_seen).any() else math.nan
    return {"seen": s, "unseen": u, "H": harmonic_mean(s, u), "gamma": gamma}


def choose_gamma(val_logits: torch.Tensor, val_labels: Sequence[int], seen_mask: torch.Tensor) -> float:
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
        h = gzsl_metrics(val_logits, val_labels, seen_mask, float(g))["H"]
        if h > best[0] + 1e-12:
            best = (h, float(g))
    return best[1]


# ------------------------------------------------------------------ methods


@dataclass
class Fitted:
    name: str
    score: Scorer  # (features, class ids) -> logits over those classes
    scores_novel: bool = True  # False: the method has no way to score classes it did not train on
    info: dict = field(default_factory=dict)


@dataclass
class Problem:
    """Everything a method may use: features/labels of *seen* training images, all class embeddings."""

    feats: Features
    labels: list[int]  # global class ids, all in `seen`
    class_emb: torch.Tensor  # [C_all, D], prompt-ensembled text embeddings
    seen: list[int]
    logit_scale: float
    logit_bias: float = 0.0


def zero_shot(p: Problem, seed: int = 0) -> Fitted:
    def score(f: Features, classes):
        return p.logit_scale * f.pooled @ p.class_emb[list(classes)].T + p.logit_bias
    return Fitted("zero-shot", score)


def _split(p: Problem, seed: int):
    tr, vb, vn, tr_classes, val_classes = seen_split(p.labels, p.seen, seed)
    return tr, vb, vn, tr_classes, val_classes


def _train_loop(module: nn.Module, logits_fn, x_idx, y, epochs, lr, wd, batch, seed, validate, patience=5):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=lr, weight_decay=wd)
    import copy
    best = (validate(), 0, copy.deepcopy(module.state_dict()))
    bad, times = 0, []
    for epoch in range(1, epochs + 1):
        t = time.perf_counter()
        module.train()
        order = torch.randperm(len(y), generator=gen)
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            loss = F.cross_entropy(logits_fn(x_idx[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        times.append(time.perf_counter() - t)
        module.eval()
        v = validate()
        if v > best[0]:
            best, bad = (v, epoch, copy.deepcopy(module.state_dict())), 0
        else:
            bad += 1
            if bad >= patience:
                break
    module.load_state_dict(best[2])
    return {"val_score": best[0], "best_epoch": best[1], "epoch_seconds": float(np.mean(times))}


def _val_helpers(p: Problem, seed: int):
    tr, vb, vn, tr_classes, val_classes = _split(p, seed)
    lab = torch.as_tensor(p.labels)
    remap = {c: i for i, c in enumerate(tr_classes)}
    vremap = {c: i for i, c in enumerate(val_classes)}
    y_tr = torch.tensor([remap[int(c)] for c in lab[tr]], dtype=torch.long)
    y_vb = [remap[int(c)] for c in lab[vb]]
    y_vn = [vremap[int(c)] for c in lab[vn]]
    return tr, vb, vn, tr_classes, val_classes, y_tr, y_vb, y_vn


def linear_probe(p: Problem, seed: int = 0, epochs: int = 100) -> Fitted:
    """Logistic regression on pooled features over the seen classes; weight decay picked on val-base."""
    tr, vb, vn, tr_classes, _, y_tr, y_vb, _ = _val_helpers(p, seed)
    x = p.feats.pooled
    best = None
    for wd in (1e-4, 1e-2, 1e-1):
        torch.manual_seed(seed)
        lin = nn.Linear(x.shape[1], len(tr_classes))
        with torch.no_grad():  # zero init: a convex problem, the optimum does not depend on the start
            lin.weight.zero_()
            lin.bias.zero_()
        scale = p.logit_scale

        def val(lin=lin):
            with torch.no_grad():
                return accuracy(lin(scale * x[vb]), y_vb) if vb else 0.0
        info = _train_loop(lin, lambda i, lin=lin: lin(scale * x[i]), torch.tensor(tr), y_tr, epochs, 1e-2, wd,
                           256, seed, val, patience=20)
        if best is None or info["val_score"] > best[1]["val_score"]:
            best = (lin, {**info, "weight_decay": wd})
    lin, info = best
    col = {c: i for i, c in enumerate(tr_classes)}

    def score(f: Features, classes):
        with torch.no_grad():
            out = torch.full((len(f), len(classes)), -1e4)
            all_logits = lin(p.logit_scale * f.pooled)
            for j, c in enumerate(classes):
                if c in col:
                    out[:, j] = all_logits[:, col[c]]
            return out
    return Fitted("linear probe", score, scores_novel=False, info=info)


class _ClipAdapterNet(nn.Module):
    def __init__(self, dim: int, ratio: float = 0.2, reduction: int = 4):
        super().__init__()
        self.ratio = ratio
        self.mlp = nn.Sequential(nn.Linear(dim, dim // reduction, bias=False), nn.ReLU(inplace=True),
                                 nn.Linear(dim // reduction, dim, bias=False), nn.ReLU(inplace=True))

    def forward(self, x):
        return F.normalize(self.ratio * self.mlp(x) + (1 - self.ratio) * x, dim=-1)


def clip_adapter(p: Problem, seed: int = 0, epochs: int = 30) -> Fitted:
    """CLIP-Adapter; residual ratio and lr chosen by H on the seen-class validation split."""
    tr, vb, vn, tr_classes, val_classes, y_tr, y_vb, y_vn = _val_helpers(p, seed)
    x = p.feats.pooled
    t_tr, t_val = p.class_emb[tr_classes], p.class_emb[val_classes] if val_classes else None
    best = None
    for ratio in (0.2, 0.6):
        torch.manual_seed(seed)
        net = _ClipAdapterNet(x.shape[1], ratio)

        def val(net=net):
            with torch.no_grad():
                a = accuracy(p.logit_scale * net(x[vb]) @ t_tr.T, y_vb) if vb else math.nan
                b = accuracy(p.logit_scale * net(x[vn]) @ t_val.T, y_vn) if vn else math.nan
                return harmonic_mean(a, b) if vb and vn else (a if vb else b)
        info = _train_loop(net, lambda i, net=net: p.logit_scale * net(x[i]) @ t_tr.T, torch.tensor(tr), y_tr,
                           epochs, 1e-3, 1e-2, 32, seed, val)
        if best is None or info["val_score"] > best[1]["val_score"]:
            best = (net, {**info, "ratio": ratio})
    net, info = best

    def score(f: Features, classes):
        with torch.no_grad():
            return p.logit_scale * net(f.pooled) @ p.class_emb[list(classes)].T + p.logit_bias
    return Fitted("CLIP-Adapter", score, info=info)


class _TipCache(nn.Module):
    def __init__(self, keys: torch.Tensor, values: torch.Tensor, alpha: float, beta: float):
        super().__init__()
        self.keys = nn.Parameter(keys.clone())
        self.register_buffer("values", values)  # [N_cache, C_all] one-hot over all classes
        self.alpha, self.beta = alpha, beta

    def forward(self, x):  # cache logits [N, C_all]
        affinity = x @ self.keys.T
        return self.alpha * torch.exp(-self.beta * (1 - affinity)) @ self.values


def tip_adapter_f(p: Problem, seed: int = 0, epochs: int = 20) -> Fitted:
    """Tip-Adapter-F; alpha, beta and the epoch chosen on the seen validation split."""
    tr, vb, vn, tr_classes, val_classes, y_tr, y_vb, y_vn = _val_helpers(p, seed)
    x = p.feats.pooled
    lab = torch.as_tensor(p.labels)
    n_all = p.class_emb.shape[0]
    values = F.one_hot(lab[tr], n_all).float()
    best = None
    tr_t, val_t = torch.tensor(tr_classes), torch.tensor(val_classes) if val_classes else None
    for alpha, beta in ((1.0, 5.5), (3.0, 5.5), (1.0, 1.0)):
        torch.manual_seed(seed)
        cache = _TipCache(x[tr], values, alpha, beta)

        def logits(xx, classes, cache=cache):
            return p.logit_scale * xx @ p.class_emb[classes].T + p.logit_scale * cache(xx)[:, classes]

        def val(cache=cache):
            with torch.no_grad():
                a = accuracy(logits(x[vb], tr_t), y_vb) if vb else math.nan
                b = accuracy(logits(x[vn], val_t), y_vn) if vn else math.nan
                return harmonic_mean(a, b) if vb and vn else (a if vb else b)
        info = _train_loop(cache, lambda i, cache=cache: logits(x[i], tr_t, cache), torch.tensor(tr), y_tr,
                           epochs, 1e-3, 1e-2, 32, seed, val)
        if best is None or info["val_score"] > best[1]["val_score"]:
            best = (cache, {**info, "alpha": alpha, "beta": beta})
    cache, info = best

    def score(f: Features, classes):
        with torch.no_grad():
            cls = torch.as_tensor(list(classes))
            return (p.logit_scale * f.pooled @ p.class_emb[cls].T + p.logit_scale * cache(f.pooled)[:, cls]
                    + p.logit_bias)
    return Fitted("Tip-Adapter-F", score, info=info)


DEFAULT_GRID = ({"lr": 3e-3, "consistency": 1.0}, {"lr": 3e-3, "consistency": 0.3},
                {"lr": 1e-2, "consistency": 0.3})


def cross_attention(p: Problem, seed: int = 0, grid=DEFAULT_GRID, base: TrainConfig | None = None,
                    name: str = "cross-attention adapter (ours)", log=None) -> Fitted:
    base = base or TrainConfig(epochs=30, patience=5)
    result, info = fit_with_selection(p.feats, p.labels, p.class_emb, p.seen, p.logit_scale, seed=seed,
                                      grid=grid, base=base, logit_bias=p.logit_bias, log=log)
    adapter = result.adapter
    info = {k: v for k, v in info.items() if k != "val_split"}
    info["alpha"] = float(adapter.alpha.detach())
    info["history"] = result.history

    def score(f: Features, classes):
        return adapter.logits(p.class_emb[list(classes)], f, p.logit_scale, p.logit_bias)
    fitted = Fitted(name, score, info=info)
    fitted.adapter = adapter
    return fitted


METHODS: dict[str, Callable[..., Fitted]] = {
    "zero-shot": zero_shot,
    "linear probe": linear_probe,
    "CLIP-Adapter": clip_adapter,
    "Tip-Adapter-F": tip_adapter_f,
    "ours": cross_attention,
}


# ------------------------------------------------------------------ protocols


def base_to_novel(fitted: Fitted, test: Features, test_labels: Sequence[int], base: Sequence[int],
                  novel: Sequence[int]) -> dict:
    """Base accuracy among base classes, novel among novel classes, H."""
    y = np.asarray(test_labels)
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


def gzsl(fitted: Fitted, p: Problem, test: Features, test_labels: Sequence[int], seen: Sequence[int],
         unseen: Sequence[int], seed: int) -> dict:
    """GZSL over seen ∪ unseen, without and with calibrated stacking (gamma from seen validation)."""
    classes = sorted(list(seen) + list(unseen))
    col = {c: i for i, c in enumerate(classes)}
    seen_mask = torch.tensor([c in set(seen) for c in classes])
    logits = fitted.score(test, classes)
    y = [col[int(c)] for c in test_labels]
    plain = gzsl_metrics(logits, y, seen_mask, 0.0)
    # gamma on the seen-class validation split: val-base images + held-out seen classes as "unseen"
    tr, vb, vn, tr_classes, val_classes = seen_split(p.labels, p.seen, seed)
    if not val_classes or not vb:
        gamma = 0.0
    else:
        vclasses = sorted(tr_classes + val_classes)
        vcol = {c: i for i, c in enumerate(vclasses)}
        vmask = torch.tensor([c in set(tr_classes) for c in vclasses])
        vidx = vb + vn
        vlogits = fitted.score(p.feats.subset(vidx), vclasses)
        gamma = choose_gamma(vlogits, [vcol[p.labels[i]] for i in vidx], vmask)
    calibrated = gzsl_metrics(logits, y, seen_mask, gamma)
    return {"plain": plain, "calibrated": calibrated}


def zeroshot_classification(clf: ZeroShotClassifier, paths: Sequence[str], labels: Sequence[int],
                            batch_size: int = 32) -> tuple[dict, list[ImageLoadError]]:
    """CLIP_benchmark's zero-shot metrics of `clf` on labelled images (`labels` index `clf.labels`).

    acc1, acc5 (None under 5 classes, where it would be 1 by construction, as CLIP_benchmark
    does) and mean_per_class_recall (per-class accuracy). Unreadable images are not scored;
    they come back so the caller can report them and say the metrics leave them out.
    """
    if clf.adapter is not None:
        raise ValueError("zeroshot_classification scores the plain zero-shot classifier; this one has an adapter")
    embedded = clf.embed(list(paths), batch_size=batch_size, skip_errors=True)
    label_of = dict(zip(map(str, paths), labels))
    y = [label_of[source] for source in embedded.sources]
    logits = clf.logits_from_embeddings(embedded.embeddings)
    metrics = {
        "acc1": accuracy(logits, y),
        "acc5": top_k_accuracy(logits, y, 5) if logits.shape[1] >= 5 else None,
        "mean_per_class_recall": per_class_accuracy(logits.argmax(1).numpy(), y),
    }
    return metrics, embedded.failures
