"""A class-agnostic cross-attention adapter over a frozen dual encoder.

Queries come from the (prompt-ensembled) class text embeddings, keys and values from the
image's spatial tokens (plus its pooled embedding as one extra "global" token). Each class
attends over the image regions and gets a class-conditioned context vector c_nc; its score
cos(c_nc, t_c) is added to the zero-shot cosine through a residual weight `alpha`:

    logit_nc = s * (cos(x_n, t_c) + alpha * cos(c_nc, t_c)) + b

`alpha` starts at 0, so an untrained adapter *is* the zero-shot classifier, bit for bit.
No parameter depends on the number or identity of classes, so the adapter applies to
any label set, seen in training or not. The backbone is never touched: its features
(pooled + tokens) are computed once, cached on disk (safetensors, keyed by the backbone
fingerprint and the images), and every epoch runs only the adapter.

Training: cross-entropy over the seen classes + lambda * KL(zero-shot || adapted) on the
same logits (a KgCoOp / PromptSRC-style consistency term that keeps the adapted classifier
close to the zero-shot one, which is what protects unseen classes). Hyper-parameters and
the early-stopping epoch are chosen on a validation split of the *seen* classes only:
held-out images of the training classes (base) and held-out seen classes that the
adapter never trains on (pseudo-novel); the criterion is their harmonic mean.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from .backends.base import Backend
from .images import ImageSource, embed_images, expand_sources, source_name
from .store import atomic_write, cache_root

CONFIG_NAME = "adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_VERSION = 1


class AdapterError(ValueError):
    """A saved adapter that cannot be used: damaged files (whose scores would be NaN or silently
    wrong), or, as `AdapterMismatch`, one made for another backbone."""


class AdapterMismatch(AdapterError):
    """An adapter saved for another backbone (or embedding size) than the one it is used with."""


def _damaged(path: Path, problem: str) -> AdapterError:
    return AdapterError(f"{path}: {problem}; the saved adapter is damaged: retrain it (clipzsl train-adapter) "
                        "or copy it again from where it was trained")


# ------------------------------------------------------------------ backbone features, computed once


@dataclass
class Features:
    """Frozen-backbone features of a list of images: pooled [N, D] (L2-normalised), tokens [N, T, D]."""

    pooled: torch.Tensor
    tokens: torch.Tensor
    sources: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return self.pooled.shape[0]

    def subset(self, index: Sequence[int] | torch.Tensor) -> "Features":
        index = torch.as_tensor(index, dtype=torch.long)
        srcs = [self.sources[i] for i in index.tolist()] if self.sources else []
        return Features(self.pooled[index], self.tokens[index], srcs)

    @staticmethod
    def cat(parts: Sequence["Features"]) -> "Features":
        return Features(torch.cat([p.pooled for p in parts]), torch.cat([p.tokens for p in parts]),
                        [s for p in parts for s in p.sources])


def _image_identity(source: ImageSource, index: int) -> str:
    """What a cached feature row depends on: a file's path, size and mtime, or a PIL image's pixels."""
    if isinstance(source, (str, Path)):
        try:
            st = os.stat(source)
            return f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return f"{source}|missing"
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source.mode}|{source.size}".encode())
    h.update(source.tobytes())
    return f"<pil {h.hexdigest()}>"


def features_key(backend: Backend, sources: Sequence[ImageSource]) -> str:
    h = hashlib.sha256(backend.fingerprint.encode())
    for i, s in enumerate(sources):
        h.update(b"\n" + _image_identity(s, i).encode())
    return h.hexdigest()[:32]


def _compute_features(backend: Backend, sources: list[ImageSource], batch_size: int,
                      progress: bool | None) -> Features:
    if not sources:
        return Features(torch.empty(0, backend.embed_dim), torch.empty(0, 0, backend.embed_dim), [])
    embedded = embed_images(backend, sources, batch_size=batch_size, progress=progress, return_tokens=True)
    return Features(embedded.embeddings, embedded.tokens, embedded.sources)


def extract_features(
    backend: Backend,
    images: ImageSource | Sequence[ImageSource],
    batch_size: int = 32,
    cache: bool | str | os.PathLike = True,
    progress: bool | None = None,
) -> Features:
    """(pooled, tokens) of every image from the frozen backbone, cached on disk.

    The cache file is keyed by the backbone fingerprint and the images (path + size +
    mtime, or a PIL image's pixels), so a second call costs one file read. Tokens are
    stored as float16 (half the disk; far below the adapter's sensitivity); pooled stays
    float32 so the zero-shot scores from cached features equal the uncached ones.
    Unreadable images raise `ImageLoadError` naming the file.
    """
    sources = expand_sources(images)
    path = None
    if cache:
        root = cache_root(None if cache is True else cache) / "adapter-features"
        path = root / f"{features_key(backend, sources)}.safetensors"
        if path.exists():
            try:
                data = load_file(str(path))
                if data["pooled"].shape[0] == len(sources):
                    return Features(data["pooled"], data["tokens"].float(),
                                    [source_name(s, i) for i, s in enumerate(sources)])
            except Exception:  # a truncated/corrupt cache file is recomputed
                pass
    feats = _compute_features(backend, sources, batch_size, progress)
    if path is not None:
        tensors = {"pooled": feats.pooled.contiguous(), "tokens": feats.tokens.half().contiguous()}
        atomic_write(path, lambda f: f.write(_safetensors_bytes(tensors)))
    return feats


def _safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    from safetensors.torch import save

    return save(tensors, metadata=metadata)


# ------------------------------------------------------------------ the adapter


@dataclass
class AdapterConfig:
    dim: int
    heads: int = 4
    attn_dim: int | None = None  # width of q/k/v; default = dim
    dropout: float = 0.0
    global_token: bool = True  # the pooled embedding joins the tokens as one more key/value

    def __post_init__(self):
        self.attn_dim = self.attn_dim or self.dim
        if self.attn_dim % self.heads:
            raise ValueError(f"attn_dim {self.attn_dim} is not divisible by heads {self.heads}")


class CrossAttentionAdapter(nn.Module):
    """Multi-head cross-attention: class text embeddings [C, D] attend over image tokens [N, T, D].

    q/k/v/out projections start at the identity, so before training the context of class c
    is a text-guided attention pooling of the image's (normalised) tokens; `alpha` (the
    residual weight of the adapter's score) starts at 0, so logits equal zero-shot ones.
    """

    def __init__(self, dim: int, heads: int = 4, attn_dim: int | None = None, dropout: float = 0.0,
                 global_token: bool = True):
        super().__init__()
        self.config = AdapterConfig(dim, heads, attn_dim, dropout, global_token)
        a = self.config.attn_dim
        self.token_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, a)
        self.k = nn.Linear(dim, a)
        self.v = nn.Linear(dim, a)
        self.out = nn.Linear(a, dim)
        for lin in (self.q, self.k, self.v, self.out):
            with torch.no_grad():
                lin.weight.copy_(torch.eye(lin.out_features, lin.in_features))
                lin.bias.zero_()
        # attention logits are (q . k) * exp(log_tau); text/LN'd-token dot products are O(1)
        self.log_tau = nn.Parameter(torch.tensor(math.log(10.0)))
        self.alpha = nn.Parameter(torch.zeros(()))
        self.drop = nn.Dropout(dropout)

    # -- pieces
    def _keys_values(self, tokens: torch.Tensor, pooled: torch.Tensor | None):
        if self.config.global_token:
            if pooled is None:
                raise ValueError("this adapter uses the pooled embedding as a global token: pass `pooled`")
            tokens = torch.cat([pooled[:, None, :].to(tokens.dtype), tokens], dim=1)
        h, a = self.config.heads, self.config.attn_dim
        n, t, _ = tokens.shape
        k = self.k(self.token_norm(tokens)).view(n, t, h, a // h)
        v = self.v(F.normalize(tokens, dim=-1)).view(n, t, h, a // h)
        return k, v

    def _queries(self, class_emb: torch.Tensor) -> torch.Tensor:
        h, a = self.config.heads, self.config.attn_dim
        return self.q(class_emb).view(class_emb.shape[0], h, a // h)

    def attention(self, class_emb: torch.Tensor, tokens: torch.Tensor,
                  pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [N, C, heads, T'] (T' = T + 1 with the global token first)."""
        k, _ = self._keys_values(tokens, pooled)
        q = self._queries(class_emb)
        scores = torch.einsum("chd,nthd->nhct", q, k) * self.log_tau.exp() / math.sqrt(q.shape[-1])
        return scores.softmax(-1).permute(0, 2, 1, 3)

    def context(self, class_emb: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None = None):
        """(class-conditioned context [N, C, D], attention [N, C, heads, T'])."""
        k, v = self._keys_values(tokens, pooled)
        q = self._queries(class_emb)
        scores = torch.einsum("chd,nthd->nhct", q, k) * self.log_tau.exp() / math.sqrt(q.shape[-1])
        attn = self.drop(scores.softmax(-1))
        ctx = torch.einsum("nhct,nthd->nchd", attn, v).reshape(k.shape[0], q.shape[0], -1)
        return self.out(ctx), attn.permute(0, 2, 1, 3)

    def adapter_scores(self, class_emb, tokens, pooled=None) -> torch.Tensor:
        """cos(context_nc, t_c): [N, C]."""
        ctx, _ = self.context(class_emb, tokens, pooled)
        return (F.normalize(ctx, dim=-1) * F.normalize(class_emb, dim=-1)[None]).sum(-1)

    def forward(self, class_emb: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
                logit_scale: float, logit_bias: float = 0.0, return_parts: bool = False):
        """Final logits [N, C] = s * pooled @ t.T + s * alpha * cos(context, t) + b.

        The zero-shot part is computed exactly as `ZeroShotClassifier` does, so with alpha = 0
        the result is bit-identical to it."""
        zs = logit_scale * pooled @ class_emb.T
        if not return_parts and not self.training and float(self.alpha.detach()) == 0.0:
            return zs + logit_bias  # exactly zero-shot, and no attention to compute
        ad = self.adapter_scores(class_emb, tokens, pooled)
        out = zs + logit_scale * self.alpha * ad + logit_bias
        return (out, zs + logit_bias) if return_parts else out

    @torch.no_grad()
    def logits(self, class_emb, features: Features, logit_scale: float, logit_bias: float = 0.0,
               batch_size: int = 128) -> torch.Tensor:
        """Evaluation logits [N, C] in image batches (bounded memory for many classes)."""
        was = self.training
        self.eval()
        out = [self(class_emb, features.tokens[i:i + batch_size], features.pooled[i:i + batch_size],
                    logit_scale, logit_bias) for i in range(0, len(features), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.empty(0, class_emb.shape[0])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- persistence
    def save(self, directory: str | os.PathLike, backend: Backend | None = None, fingerprint: str | None = None,
             templates: Sequence[str] | None = None, labels: Sequence[str] | None = None,
             extra: dict | None = None) -> Path:
        """Weights as safetensors + a JSON config with the backbone fingerprint, templates and labels."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fp = fingerprint or (backend.fingerprint if backend is not None else None)
        if fp is None:
            raise ValueError("save() needs the backbone (or its fingerprint) the adapter was trained on")
        meta = {
            "format": "clipzsl-cross-attention-adapter",
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "backbone_fingerprint": fp,
            "backbone_spec": getattr(backend, "spec", None),
            "templates": list(templates) if templates is not None else None,
            "trained_labels": list(labels) if labels is not None else None,
            **(extra or {}),
        }
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        weights = _safetensors_bytes(state, {"fingerprint": fp})
        # load() checks it: a flipped byte in the weights would otherwise give NaN or silently wrong scores
        meta["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(weights))
        atomic_write(directory / CONFIG_NAME, lambda f: f.write(json.dumps(meta, indent=2).encode()))
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike, backend: Backend | None = None) -> "CrossAttentionAdapter":
        """Load a saved adapter; with `backend`, refuse one trained on another backbone.

        Damaged files raise `AdapterError` naming the file: a checksum mismatch (adapters saved
        with one), unreadable safetensors, non-finite weights or tensors that do not fit the config.
        """
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        try:
            meta = json.loads(config_path.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved clipzsl adapter") from err
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise _damaged(config_path, f"not valid JSON ({err})") from err
        if not isinstance(meta, dict) or not isinstance(meta.get("config"), dict):
            raise _damaged(config_path, "no adapter \"config\" object")
        if backend is not None:
            fp = meta.get("backbone_fingerprint")
            if fp != backend.fingerprint:
                raise AdapterMismatch(
                    f"adapter {directory} was trained on backbone {fp!r} (spec {meta.get('backbone_spec')!r}), "
                    f"but the model in use is {backend.fingerprint!r} (spec {backend.spec!r}); "
                    "train an adapter for this backbone or load the one it was trained on")
            if meta["config"].get("dim") != backend.embed_dim:
                raise AdapterMismatch(f"adapter {directory} has dim {meta['config'].get('dim')}, "
                                      f"model {backend.spec!r} has {backend.embed_dim}")
        try:
            adapter = cls(**meta["config"])
        except (TypeError, ValueError) as err:
            raise _damaged(config_path, f"unusable adapter config ({err})") from err
        adapter.load_state_dict(_read_weights(weights_path, meta.get("weights_sha256"), adapter.state_dict()))
        adapter.meta = meta
        return adapter.eval()


def _read_weights(path: Path, sha256: str | None, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of `path`, checked against the recorded checksum (None: older adapters without
    one) and the adapter's own state dict (names, shapes), and all finite."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError as err:
        raise _damaged(path, "missing") from err
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise _damaged(path, f"its sha256 differs from the one recorded in {CONFIG_NAME} at save")
    try:
        state = load_safetensors(blob)
    except SafetensorError as err:
        raise _damaged(path, f"not a readable safetensors file ({err})") from err
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise _damaged(path, f"its tensors do not fit the config in {CONFIG_NAME} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]})")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise _damaged(path, f"non-finite values (NaN or inf) in {bad[:3]}")
    return state


def resolve_adapter(adapter, backend: Backend) -> CrossAttentionAdapter:
    """An adapter object (checked for dim) or a saved directory (checked for backbone)."""
    if isinstance(adapter, (str, os.PathLike)):
        return CrossAttentionAdapter.load(adapter, backend)
    if not isinstance(adapter, CrossAttentionAdapter):
        raise TypeError(f"adapter must be a CrossAttentionAdapter or a saved adapter directory, got {type(adapter)}")
    if adapter.config.dim != backend.embed_dim:
        raise AdapterMismatch(f"adapter dim {adapter.config.dim} != model {backend.spec!r} dim {backend.embed_dim}")
    fp = getattr(adapter, "meta", {}).get("backbone_fingerprint")
    if fp is not None and fp != backend.fingerprint:
        raise AdapterMismatch(f"adapter was trained on backbone {fp!r}, not {backend.fingerprint!r}")
    return adapter.eval()


# ------------------------------------------------------------------ training


@dataclass
class TrainConfig:
    epochs: int = 20
    lr: float = 1e-3
    weight_decay: float = 1e-2
    batch_size: int = 64
    consistency: float = 1.0  # lambda of KL(zero-shot || adapted)
    heads: int = 4
    dropout: float = 0.0
    patience: int = 5  # epochs without validation improvement before stopping
    seed: int = 0
    max_classes: int = 128  # classes per training batch: the batch's own + random others (0 = all)
    gate_lr_mult: float = 30.0  # alpha and the attention temperature are scalars: Adam moves them by ~lr a
    # step, so at lr 1e-3 a hundred steps could not take alpha past 0.1; they get lr * this


@dataclass
class TrainResult:
    adapter: CrossAttentionAdapter
    history: list[dict]
    best_epoch: int
    best_score: float
    epoch_seconds: float  # mean wall time of one training epoch (adapter only)


def kl_to_zero_shot(logits: torch.Tensor, zs_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_zs || p_adapted), mean over the batch."""
    return F.kl_div(logits.log_softmax(-1), zs_logits.log_softmax(-1), log_target=True, reduction="batchmean")


def train_adapter(
    train: Features,
    train_labels: Sequence[int] | torch.Tensor,
    class_emb: torch.Tensor,
    logit_scale: float,
    config: TrainConfig = TrainConfig(),
    validate=None,
    logit_bias: float = 0.0,
    progress: bool = False,
) -> TrainResult:
    """Fit an adapter on cached features; `class_emb` are the training classes' embeddings [C, D].

    `validate(adapter) -> float` (higher is better), called after each epoch, picks the
    epoch (early stopping); without it, the last epoch is kept.
    """
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    labels = torch.as_tensor(train_labels, dtype=torch.long)
    adapter = CrossAttentionAdapter(class_emb.shape[1], heads=config.heads, dropout=config.dropout)
    gates = [adapter.alpha, adapter.log_tau]
    rest = [p for p in adapter.parameters() if all(p is not g for g in gates)]
    opt = torch.optim.AdamW([{"params": rest}, {"params": gates, "weight_decay": 0.0}],
                            lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, math.ceil(len(labels) / config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[config.lr, config.lr * config.gate_lr_mult],
                                                total_steps=steps, pct_start=0.1)
    best = (validate(adapter) if validate else -math.inf, 0, copy.deepcopy(adapter.state_dict()))
    history, times, bad = [{"epoch": 0, "val": best[0]}], [], 0
    for epoch in range(1, config.epochs + 1):
        adapter.train()
        start = time.perf_counter()
        order = torch.randperm(len(labels), generator=gen)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            emb, y = class_emb, labels[idx]
            if config.max_classes and class_emb.shape[0] > config.max_classes:
                own = torch.unique(y)
                rest = torch.ones(class_emb.shape[0], dtype=torch.bool)
                rest[own] = False
                others = torch.nonzero(rest).squeeze(1)
                others = others[torch.randperm(len(others), generator=gen)[:max(0, config.max_classes - len(own))]]
                cls = torch.cat([own, others])
                emb = class_emb[cls]
                y = torch.searchsorted(own, y)  # own classes come first, in sorted order
            logits, zs = adapter(emb, train.tokens[idx], train.pooled[idx], logit_scale, logit_bias,
                                 return_parts=True)
            loss = F.cross_entropy(logits, y)
            if config.consistency:
                loss = loss + config.consistency * kl_to_zero_shot(logits, zs.detach())
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(idx)
        times.append(time.perf_counter() - start)
        adapter.eval()
        row = {"epoch": epoch, "loss": total / len(labels), "alpha": float(adapter.alpha.detach())}
        if validate:
            row["val"] = validate(adapter)
            if row["val"] > best[0]:
                best, bad = (row["val"], epoch, copy.deepcopy(adapter.state_dict())), 0
            else:
                bad += 1
        history.append(row)
        if progress:
            print(row)
        if validate and bad >= config.patience:
            break
    if validate:
        adapter.load_state_dict(best[2])
    else:
        best = (math.nan, config.epochs, None)
    return TrainResult(adapter.eval(), history, best[1], best[0], float(np.mean(times)) if times else 0.0)


def seen_split(labels: Sequence[int], classes: Sequence[int], seed: int, val_class_frac: float = 0.2,
               val_image_frac: float = 0.2):
    """Split seen data for model selection: (train idx, val-base idx, val-novel idx, train classes,
    val classes). Val classes are whole seen classes held out of training (pseudo-novel); val-base
    are held-out images of the training classes (only from classes with >= 2 images)."""
    rng = np.random.default_rng(seed)
    classes = np.array(sorted(classes))
    perm = rng.permutation(len(classes))
    n_val = max(1, int(round(val_class_frac * len(classes)))) if len(classes) >= 4 else 0
    val_classes = set(classes[perm[:n_val]].tolist())
    train_classes = [c for c in classes.tolist() if c not in val_classes]
    labels = np.asarray(labels)
    train_idx, val_base, val_novel = [], [], []
    for c in classes.tolist():
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        if c in val_classes:
            val_novel += idx.tolist()
            continue
        k = int(math.floor(val_image_frac * len(idx))) if len(idx) >= 2 else 0
        if len(idx) >= 2 and k == 0 and rng.random() < val_image_frac * len(idx):
            k = 1
        val_base += idx[:k].tolist()
        train_idx += idx[k:].tolist()
    return sorted(train_idx), sorted(val_base), sorted(val_novel), train_classes, sorted(val_classes)


def fit_with_selection(
    feats: Features,
    labels: Sequence[int],
    class_emb_all: torch.Tensor,
    seen_classes: Sequence[int],
    logit_scale: float,
    seed: int = 0,
    grid: Sequence[dict] | None = None,
    base: TrainConfig = TrainConfig(),
    logit_bias: float = 0.0,
    log=None,
) -> tuple[TrainResult, dict]:
    """Choose hyper-parameters and the epoch on a seen-class validation split, and train.

    The score of a candidate is the harmonic mean of its validation accuracy on held-out images
    of the training classes (scored among the training classes) and on the held-out seen classes
    (scored among themselves); unseen classes and test data are never looked at. With fewer than
    4 seen classes there are no held-out classes and the score is the first accuracy alone;
    `info["val_metric"]` says which ("H", "base accuracy", "pseudo-novel accuracy", or None when
    there are no validation images: then the last epoch of the first grid setting is kept).
    """
    from .evaluation import harmonic_mean

    if len(set(seen_classes)) < 2:
        raise ValueError(f"an adapter needs at least 2 seen classes to train on, got {len(set(seen_classes))}: "
                         "cross-entropy over a single class is always 0")
    labels_t = torch.as_tensor(labels, dtype=torch.long)
    tr, vb, vn, tr_classes, val_classes = seen_split(labels_t.numpy(), seen_classes, seed)
    remap = torch.full((class_emb_all.shape[0],), -1, dtype=torch.long)
    remap[torch.tensor(tr_classes)] = torch.arange(len(tr_classes))
    emb_tr = class_emb_all[tr_classes]
    vremap = torch.full((class_emb_all.shape[0],), -1, dtype=torch.long)
    if val_classes:
        vremap[torch.tensor(val_classes)] = torch.arange(len(val_classes))
    emb_val = class_emb_all[val_classes] if val_classes else None
    f_tr, f_vb, f_vn = feats.subset(tr), feats.subset(vb), feats.subset(vn)
    y_tr, y_vb, y_vn = remap[labels_t[tr]], remap[labels_t[vb]], vremap[labels_t[vn]]

    def acc(adapter, emb, f, y):
        if len(y) == 0:
            return math.nan
        return float((adapter.logits(emb, f, logit_scale, logit_bias).argmax(1) == y).float().mean())

    def validate(adapter):
        a = acc(adapter, emb_tr, f_vb, y_vb)
        b = acc(adapter, emb_val, f_vn, y_vn) if emb_val is not None else math.nan
        vals = [v for v in (a, b) if not math.isnan(v)]  # one at least: it is not called without validation data
        return harmonic_mean(a, b) if len(vals) == 2 else vals[0]

    # without validation images every epoch would score 0 and the untrained epoch 0 would be kept
    metric = {(True, True): "H", (True, False): "base accuracy", (False, True): "pseudo-novel accuracy",
              (False, False): None}[bool(vb), bool(vn)]
    grid = list(grid or [{}])
    best = None
    for params in grid:
        cfg = TrainConfig(**{**asdict(base), **params, "seed": seed})
        result = train_adapter(f_tr, y_tr, emb_tr, logit_scale, cfg, validate if metric else None, logit_bias)
        if log:
            score = f"val {metric} {result.best_score:.4f}" if metric else "no validation images, last"
            log(f"  seed {seed} {params}: {score} at epoch {result.best_epoch}, {result.epoch_seconds:.2f} s/epoch")
        if best is None or result.best_score > best[0].best_score:
            best = (result, params)
    info = {"params": best[1], "val_score": best[0].best_score, "val_metric": metric, "best_epoch": best[0].best_epoch,
            "n_train": len(tr), "n_val_base": len(vb), "n_val_novel": len(vn),
            "train_classes": len(tr_classes), "val_classes": len(val_classes),
            "epoch_seconds": best[0].epoch_seconds,
            "val_split": {"train_idx": tr, "val_base_idx": vb, "val_novel_idx": vn,
                          "train_classes": tr_classes, "val_classes": val_classes}}
    return best[0], info


def folder_dataset(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, labels) of a folder with one sub-folder per class (names: '_' -> ' ').

    A sub-folder without images is left out with a warning naming it: as a class it would be a
    label trained, validated and scored on nothing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; expected a folder with one sub-folder of images per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise ValueError(f"{root}: expected one sub-folder per class, found none")
    names, paths, labels = [], [], []
    for d in dirs:
        files = expand_sources(str(d))
        if not files:
            warnings.warn(f"{d}: no images; class {d.name.replace('_', ' ')!r} left out")
            continue
        paths += [str(f) for f in files]
        labels += [len(names)] * len(files)
        names.append(d.name.replace("_", " "))
    if not names:
        raise ValueError(f"{root}: none of its {len(dirs)} class sub-folders holds images")
    return names, paths, labels
