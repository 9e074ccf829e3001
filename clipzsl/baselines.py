"""The methods the evaluation protocols compare, each fitted on seen-class embedded images.

Every method turns a `Problem` into a `Fitted` scorer `(images, global class ids) -> logits`,
and every trained one goes through `clipzsl.training.train_loop`:

- zero-shot: the zero-shot head, s * x @ T.T + b.
- linear probe: multinomial logistic regression on x, base classes only (cannot score novel).
- CLIP-Adapter (Gao et al. 2021): x' = r * MLP(x) + (1 - r) * x, MLP D -> D/4 -> D (ReLU, no bias),
  r = 0.2, logits s * norm(x') @ T.T; class-agnostic, so it also scores novel classes.
- Tip-Adapter-F (Zhang et al. 2022): logits = s * x @ T.T + a * exp(-b (1 - x @ K.T)) @ L, keys K the
  training images' embeddings (fine-tuned), L their one-hot targets; the cache holds base classes
  only, so it leaves novel-class logits at zero-shot.
- ours: the cross-attention adapter (`clipzsl.training.fit_with_selection`), scored through its head.

`Problem` and `Fitted` live here rather than in `clipzsl.evaluation` because the methods build
them and the protocols, one layer up, consume them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import CrossAttentionAdapter
from .head import cosine_logits, zero_shot_head
from .images import EmbeddedImages
from .metrics import accuracy, harmonic_mean_or_available
from .training import DEFAULT_GRID, TrainConfig, fit_with_selection, seen_split, train_loop

M = TypeVar("M", bound=nn.Module)
Scorer = Callable[[EmbeddedImages, Sequence[int]], torch.Tensor]  # (images, global class ids) -> logits


@dataclass
class Fitted:
    name: str
    score: Scorer  # (images, class ids) -> logits over those classes
    scores_novel: bool = True  # False: the method has no way to score classes it did not train on
    info: dict = field(default_factory=dict)
    adapter: CrossAttentionAdapter | None = None  # the trained adapter, for "ours"


@dataclass
class Problem:
    """Everything a method may use: embedded *seen* training images, their targets, all class embeddings."""

    images: EmbeddedImages
    targets: list[int]  # global class ids, all in `seen`
    class_embeddings: torch.Tensor  # [C_all, D], prompt-ensembled text embeddings
    seen: list[int]
    logit_scale: float
    logit_bias: float = 0.0


def zero_shot(p: Problem, seed: int = 0) -> Fitted:
    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        return zero_shot_head(images, p.class_embeddings[list(classes)], p.logit_scale, p.logit_bias)
    return Fitted("zero-shot", score)


def _val_helpers(p: Problem, seed: int):
    tr, vb, vn, tr_classes, val_classes = seen_split(p.targets, p.seen, seed)
    targets = torch.as_tensor(p.targets)
    remap = {c: i for i, c in enumerate(tr_classes)}
    vremap = {c: i for i, c in enumerate(val_classes)}
    y_tr = torch.tensor([remap[int(c)] for c in targets[tr]], dtype=torch.long)
    y_vb = [remap[int(c)] for c in targets[vb]]
    y_vn = [vremap[int(c)] for c in targets[vn]]
    return tr, vb, vn, tr_classes, val_classes, y_tr, y_vb, y_vn


def _fit(module: nn.Module, logits_of: Callable[[torch.Tensor], torch.Tensor], train_idx: Sequence[int],
         y: torch.Tensor, epochs: int, lr: float, weight_decay: float, batch_size: int, seed: int,
         validate: Callable[[], float], patience: int = 5) -> dict:
    """Cross-entropy of `logits_of(image rows)` against `y` through `train_loop`, AdamW, early stopping."""
    torch.manual_seed(seed)
    rows = torch.tensor(train_idx)
    optimizer = torch.optim.AdamW([q for q in module.parameters() if q.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    loop = train_loop(module, lambda idx: F.cross_entropy(logits_of(rows[idx]), y[idx]), len(y), epochs,
                      batch_size, torch.Generator().manual_seed(seed), optimizer, validate=validate,
                      patience=patience)
    return {"val_score": loop.best_score, "best_epoch": loop.best_epoch, "epoch_seconds": loop.epoch_seconds}


def _best(candidates: Iterable[tuple[M, dict]]) -> tuple[M, dict]:
    """The (module, info) of the highest validation score, the first of equals; `candidates` are
    trained one after the other, in order, as they are drawn."""
    return max(candidates, key=lambda candidate: candidate[1]["val_score"])


def linear_probe(p: Problem, seed: int = 0, epochs: int = 100) -> Fitted:
    """Logistic regression on pooled embeddings over the seen classes; weight decay picked on val-base."""
    tr, vb, vn, tr_classes, _, y_tr, y_vb, _ = _val_helpers(p, seed)
    x, scale = p.images.embeddings, p.logit_scale

    def candidate(wd: float) -> tuple[nn.Linear, dict]:
        torch.manual_seed(seed)
        lin = nn.Linear(x.shape[1], len(tr_classes))
        with torch.no_grad():  # zero init: a convex problem, the optimum does not depend on the start
            lin.weight.zero_()
            lin.bias.zero_()

        def val() -> float:
            with torch.no_grad():
                return accuracy(lin(scale * x[vb]), y_vb) if vb else 0.0
        info = _fit(lin, lambda i: lin(scale * x[i]), tr, y_tr, epochs, 1e-2, wd, 256, seed, val, patience=20)
        return lin, {**info, "weight_decay": wd}

    lin, info = _best(candidate(wd) for wd in (1e-4, 1e-2, 1e-1))
    col = {c: i for i, c in enumerate(tr_classes)}

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            out = torch.full((len(images), len(classes)), -1e4)
            all_logits = lin(p.logit_scale * images.embeddings)
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
    x = p.images.embeddings
    t_tr, t_val = p.class_embeddings[tr_classes], p.class_embeddings[val_classes]

    def candidate(ratio: float) -> tuple[_ClipAdapterNet, dict]:
        torch.manual_seed(seed)
        net = _ClipAdapterNet(x.shape[1], ratio)

        def val() -> float:
            with torch.no_grad():
                a = accuracy(cosine_logits(net(x[vb]), t_tr, p.logit_scale), y_vb) if vb else math.nan
                b = accuracy(cosine_logits(net(x[vn]), t_val, p.logit_scale), y_vn) if vn else math.nan
                return harmonic_mean_or_available(a, b)
        info = _fit(net, lambda i: cosine_logits(net(x[i]), t_tr, p.logit_scale), tr, y_tr, epochs, 1e-3, 1e-2, 32,
                    seed, val)
        return net, {**info, "ratio": ratio}

    net, info = _best(candidate(ratio) for ratio in (0.2, 0.6))

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return cosine_logits(net(images.embeddings), p.class_embeddings[list(classes)], p.logit_scale,
                                 p.logit_bias)
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
    x = p.images.embeddings
    targets = torch.as_tensor(p.targets)
    values = F.one_hot(targets[tr], p.class_embeddings.shape[0]).float()
    tr_t, val_t = torch.tensor(tr_classes), torch.tensor(val_classes, dtype=torch.long)

    def logits(xx: torch.Tensor, classes: torch.Tensor, cache: _TipCache, bias: float = 0.0) -> torch.Tensor:
        return cosine_logits(xx, p.class_embeddings[classes], p.logit_scale) + p.logit_scale * cache(xx)[:, classes] \
            + bias

    def candidate(alpha: float, beta: float) -> tuple[_TipCache, dict]:
        torch.manual_seed(seed)
        cache = _TipCache(x[tr], values, alpha, beta)

        def val() -> float:
            with torch.no_grad():
                a = accuracy(logits(x[vb], tr_t, cache), y_vb) if vb else math.nan
                b = accuracy(logits(x[vn], val_t, cache), y_vn) if vn else math.nan
                return harmonic_mean_or_available(a, b)
        info = _fit(cache, lambda i: logits(x[i], tr_t, cache), tr, y_tr, epochs, 1e-3, 1e-2, 32, seed, val)
        return cache, {**info, "alpha": alpha, "beta": beta}

    cache, info = _best(candidate(alpha, beta) for alpha, beta in ((1.0, 5.5), (3.0, 5.5), (1.0, 1.0)))

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        with torch.no_grad():
            return logits(images.embeddings, torch.as_tensor(list(classes)), cache, p.logit_bias)
    return Fitted("Tip-Adapter-F", score, info=info)


def cross_attention(p: Problem, seed: int = 0, grid: Sequence[dict] = DEFAULT_GRID, base: TrainConfig | None = None,
                    name: str = "cross-attention adapter (ours)", log: Callable[[str], None] | None = None) -> Fitted:
    base = base or TrainConfig(epochs=30, patience=5)
    result, info = fit_with_selection(p.images, p.targets, p.class_embeddings, p.seen, p.logit_scale, seed=seed,
                                      grid=grid, base=base, logit_bias=p.logit_bias, log=log)
    adapter = result.adapter
    info = {k: v for k, v in info.items() if k != "val_split"}
    info["alpha"] = float(adapter.alpha.detach())
    info["history"] = result.history

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        return adapter.head(images, p.class_embeddings[list(classes)], p.logit_scale, p.logit_bias)
    return Fitted(name, score, info=info, adapter=adapter)


METHODS: dict[str, Callable[..., Fitted]] = {
    "zero-shot": zero_shot,
    "linear probe": linear_probe,
    "CLIP-Adapter": clip_adapter,
    "Tip-Adapter-F": tip_adapter_f,
    "ours": cross_attention,
}
