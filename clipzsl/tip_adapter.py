"""Tip-Adapter (Zhang et al. 2022): a training-free cache model over a frozen dual encoder, and heads of
either adapter kind bound to a label set, with calibrated stacking.

The cache holds the embeddings of a few labelled images (keys F, [N, D]) and their one-hot labels
(values L, [N, K] over the adapter's K classes). As the official code writes it (main.py, utils.py of
gaopengcuhk/Tip-Adapter):

    affinity     = f @ F.T
    cache_logits = exp(-(beta - beta * affinity)) @ L
    tip_logits   = 100 * f @ W.T + alpha * cache_logits

Here 100 is CLIP's logit scale; a model with another scale s (the packaged model's is 10.8) gets
`s / 100 * tip_logits + b`, the same ranking and, for CLIP, the paper's logits exactly; `alpha` and
`beta` keep the paper's meaning. Tip-Adapter-F (`kind="tip-f"`) is the same head with trained keys
(`clipzsl.tip_training`).

Labels and the cache: a column of the label set whose label is one of the adapter's classes (same
name, normalised) gets that class's cache logits; any other label (unseen) gets the zero-shot logit
alone. The head recognises columns by their class embedding (the adapter stores those of its classes,
made with its templates), so it works on any slice of a label set, as `head.top_k` passes them; a
classifier binds the adapter to its labels by name (`bind_head`), whatever templates it uses.

Calibrated stacking: an adapter of either kind may carry a `Calibration` (fitted by
`clipzsl.calibration.fit_gamma`); the bound head subtracts its gamma from the seen labels' logits when
the label set mixes seen and unseen labels, and says so in the log.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn as nn

from .adapter import (CONFIG_NAME, FORMAT_NAME, WEIGHTS_NAME, AdapterMismatch, AdapterRecord, Calibration,
                      CrossAttentionAdapter, _damaged, _tensors, check_backbone, read_record, resolve_adapter,
                      rewrite_record, write_adapter)
from .backends.base import Backend
from .errors import InputError, InputTypeError
from .head import Head, calibrated_stacking, cosine_logits
from .images import EmbeddedImages
from .prompts import normalise_text
from .records import RecordError, parse, rule

log = logging.getLogger(__name__)

TIP_FORMAT = "clipzsl-tip-adapter"
KINDS = ("tip", "tip-f")
Kind = Literal["tip", "tip-f"]
#: the official code's logit scale of the zero-shot part, which alpha is relative to
PAPER_SCALE = 100.0
#: the default alpha and beta (the official configs' init_alpha of ImageNet and init_beta), used when no
#: validation image is left to search them on
DEFAULT_ALPHA, DEFAULT_BETA = 1.17, 1.0
#: a column is an adapter class when its embedding's cosine with the class's is at least 1 - this
MATCH_TOLERANCE = 1e-5

def _non_negative(value: float) -> bool:
    return value >= 0


@dataclass(frozen=True)
class TipRecord:
    """The schema of a Tip adapter's adapter.json (read through `clipzsl.records`)."""

    format: Literal["clipzsl-tip-adapter"]
    version: Literal[1]
    kind: Literal["tip", "tip-f"]
    dim: int = field(metadata=rule(lambda v: v >= 1, "at least 1"))
    cache_size: int = field(metadata=rule(lambda v: v >= 1, "at least 1"))
    alpha: float = field(metadata=rule(_non_negative, "0 or more"))
    beta: float = field(metadata=rule(_non_negative, "0 or more"))
    backbone_fingerprint: str = ""
    backbone_spec: str | None = None
    templates: list[str] = field(default_factory=list)
    trained_labels: list[str] = field(default_factory=list, metadata=rule(
        lambda v: len(v) >= 1 and len({normalise_text(n) for n in v}) == len(v), "a list of distinct class names"))
    weights_sha256: str | None = None
    training: dict | None = None  # how it was built: shots, validation images, the alpha/beta search
    calibration: Calibration | None = None


class TipAdapter(nn.Module):
    """The cache model: keys [N, D] (a parameter: Tip-Adapter-F trains them), each key's class [N] (an
    index into `class_names`) and the class embeddings [K, D] the head recognises its classes by."""

    labels: torch.Tensor
    class_embeddings: torch.Tensor

    def __init__(self, keys: torch.Tensor, labels: torch.Tensor, class_embeddings: torch.Tensor,
                 alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA, kind: Kind = "tip",
                 meta: dict | None = None):
        super().__init__()
        if kind not in KINDS:
            raise InputError(f"unknown Tip adapter kind {kind!r}; expected one of {KINDS}")
        if keys.ndim != 2 or labels.shape != (keys.shape[0],) or class_embeddings.shape[1:] != keys.shape[1:]:
            raise InputError(f"keys {tuple(keys.shape)}, labels {tuple(labels.shape)} and class embeddings "
                             f"{tuple(class_embeddings.shape)} do not fit: [N, D], [N] and [K, D]")
        self.keys = nn.Parameter(keys.detach().float().clone())
        self.register_buffer("labels", labels.detach().long().clone())
        self.register_buffer("class_embeddings", class_embeddings.detach().float().clone())
        self.alpha, self.beta = float(alpha), float(beta)
        self.kind: Kind = kind
        self.meta = meta or {}
        self.check_labels()

    def check_labels(self) -> None:
        """Every key's class is one of the K classes (an InputError otherwise)."""
        k = self.class_embeddings.shape[0]
        if len(self.labels) and not (0 <= int(self.labels.min()) and int(self.labels.max()) < k):
            raise InputError(f"cache labels must index the {k} classes, got {self.labels.min()}..{self.labels.max()}")

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("trained_labels") or [])

    def values(self) -> torch.Tensor:
        """L: the one-hot labels of the keys [N, K]."""
        return nn.functional.one_hot(self.labels, self.class_embeddings.shape[0]).float()

    def cache_logits(self, features: torch.Tensor, alpha: float | None = None, beta: float | None = None,
                     leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """alpha * exp(-(beta - beta * f @ F.T)) @ L: [N, K] over the adapter's classes. `leave_out` [N]: the
        key each feature must not see (its own, when training on the cache's images), or None."""
        alpha = self.alpha if alpha is None else alpha
        beta = self.beta if beta is None else beta
        affinity = features @ self.keys.T
        weights = torch.exp(-(beta - beta * affinity))
        if leave_out is not None:
            weights = weights.index_put((torch.arange(len(features)), leave_out), torch.zeros(()))
        return alpha * weights @ self.values()

    def columns(self, class_embeddings: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`matching_rows` of the class embeddings among `rows` (default: the stored class embeddings)."""
        return matching_rows(class_embeddings, self.class_embeddings if rows is None else rows)

    def paper_logits(self, features: torch.Tensor, class_embeddings: torch.Tensor, columns: torch.Tensor,
                     alpha: float | None = None, beta: float | None = None,
                     leave_out: torch.Tensor | None = None) -> torch.Tensor:
        """100 * f @ W.T + alpha * cache logits, the cache's column for each class (`columns`, -1: none)."""
        cache = self.cache_logits(features, alpha, beta, leave_out)
        gathered = cache[:, columns.clamp(min=0)] * (columns >= 0).to(cache.dtype)[None]
        return cosine_logits(features, class_embeddings, PAPER_SCALE) + gathered

    @torch.no_grad()
    def head(self, images: EmbeddedImages, class_embeddings: torch.Tensor, logit_scale: float,
             logit_bias: float = 0.0, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, C] (a `clipzsl.head.Head`): s / 100 * (100 * f @ W.T + alpha * cache) + b; a class that
        is none of the adapter's gets the zero-shot logit alone. `rows`: see `columns`."""
        columns = self.columns(class_embeddings, rows)
        paper = self.paper_logits(images.embeddings.float(), class_embeddings.float(), columns)
        return logit_scale / PAPER_SCALE * paper + logit_bias

    # -- persistence
    def save(self, directory: str | os.PathLike, model: Backend, templates: Sequence[str],
             labels: Sequence[str], training: dict | None = None) -> Path:
        """adapter.safetensors (keys, labels, class embeddings) + adapter.json (`TipRecord`), as the
        cross-attention adapter is saved (`adapter.write_adapter`)."""
        if len(labels) != self.class_embeddings.shape[0]:
            raise InputError(f"{len(labels)} class names for {self.class_embeddings.shape[0]} class embeddings")
        meta = {"format": TIP_FORMAT, "version": 1, "kind": self.kind, "dim": int(self.keys.shape[1]),
                "cache_size": int(self.keys.shape[0]), "alpha": self.alpha, "beta": self.beta,
                "backbone_fingerprint": model.fingerprint, "backbone_spec": model.spec,
                "templates": list(templates), "trained_labels": list(labels), "training": training}
        self.meta = meta
        return write_adapter(directory, TipRecord, meta, self.state_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Backend | None = None) -> "TipAdapter":
        """A saved Tip adapter, checked as the cross-attention adapter is (`adapter.read_record`): schema,
        copy in the weights' header, sha256, tensor names and shapes, finiteness, key labels in range;
        with `model`, refused (AdapterMismatch) unless made with that model's weights."""
        record, blob = read_record(directory, TipRecord)
        check_backbone(directory, record.backbone_fingerprint, record.backbone_spec, record.dim, model)
        k, n, d = len(record.trained_labels), record.cache_size, record.dim
        adapter = cls(torch.zeros(n, d), torch.zeros(n, dtype=torch.long), torch.zeros(k, d), record.alpha,
                      record.beta, record.kind, asdict(record))
        weights = Path(directory) / WEIGHTS_NAME
        adapter.load_state_dict(_tensors(weights, blob, adapter.state_dict()))
        try:
            adapter.check_labels()
        except InputError as err:
            raise _damaged(weights, str(err)) from err
        return adapter.eval()


def matching_rows(class_embeddings: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """For each class embedding [C, D], the row of `rows` [K, D] it equals up to MATCH_TOLERANCE (cosine), or -1."""
    if not rows.shape[0]:
        return torch.full((len(class_embeddings),), -1, dtype=torch.long)
    best, index = (class_embeddings.float() @ rows.T).max(1)
    return torch.where(best >= 1 - MATCH_TOLERANCE, index, torch.full_like(index, -1))


# ------------------------------------------------------------------ either kind: load, bind, calibrate

Adapter = CrossAttentionAdapter | TipAdapter


@dataclass(frozen=True)
class _Kind:
    """What `adapter_format` reads of adapter.json before its kind's schema."""

    format: Literal["clipzsl-cross-attention-adapter", "clipzsl-tip-adapter"]


def adapter_format(directory: str | os.PathLike) -> str:
    """The "format" of a saved adapter's adapter.json (which kind it is); an AdapterError when unreadable."""
    path = Path(directory) / CONFIG_NAME
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved clipzsl adapter") from err
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _damaged(path, f"not readable JSON ({err})") from err
    try:
        return parse(_Kind, {"format": data.get("format") if isinstance(data, dict) else None}, path).format
    except RecordError as err:
        raise _damaged(path, err.detail) from err


def load_adapter(directory: str | os.PathLike, model: Backend | None = None) -> Adapter:
    """A saved adapter of either kind (its adapter.json's "format" says which), checked for `model`."""
    if adapter_format(directory) == TIP_FORMAT:
        return TipAdapter.load(directory, model)
    return CrossAttentionAdapter.load(directory, model)


def resolve_any_adapter(adapter: Adapter | str | os.PathLike, model: Backend) -> Adapter:
    """An adapter object of either kind (checked for the model) or a saved directory (`load_adapter`)."""
    if isinstance(adapter, (str, os.PathLike)):
        return load_adapter(adapter, model)
    if isinstance(adapter, TipAdapter):
        check_backbone("(in memory)", adapter.meta.get("backbone_fingerprint", model.fingerprint),
                       adapter.meta.get("backbone_spec"), adapter.keys.shape[1], model)
        return adapter.eval()
    if not isinstance(adapter, CrossAttentionAdapter):
        raise InputTypeError(f"adapter must be a CrossAttentionAdapter, a TipAdapter or a saved adapter directory, "
                             f"got {type(adapter)}")
    return resolve_adapter(adapter, model)


def attending(adapter: Adapter | None) -> CrossAttentionAdapter | None:
    """The adapter when it attends over spatial tokens (it draws heat maps and needs tokens), else None."""
    return adapter if isinstance(adapter, CrossAttentionAdapter) else None


def draws_attention(adapter: Adapter | str | os.PathLike | None) -> bool:
    """Whether `adapter` (an object, a saved directory, or None) attends over spatial tokens, so that it has a
    heat-map method ("adapter") and needs the tokens; a Tip adapter does not."""
    if isinstance(adapter, (str, os.PathLike)):
        return adapter_format(adapter) != TIP_FORMAT
    return attending(adapter) is not None


@dataclass
class BoundHead:
    """An adapter's head over one label set (`bind_head`): `rows` [K, D] are the label set's embeddings of
    the adapter's classes (zero for a class not in it), how its columns are recognised in any slice."""

    adapter: Adapter
    rows: torch.Tensor
    gamma: float  # subtracted from the seen labels' logits; 0 unless calibrated and the label set is mixed

    def seen_mask(self, class_embeddings: torch.Tensor) -> torch.Tensor:
        return matching_rows(class_embeddings, self.rows) >= 0

    def __call__(self, images: EmbeddedImages, class_embeddings: torch.Tensor, logit_scale: float,
                 logit_bias: float = 0.0) -> torch.Tensor:
        if isinstance(self.adapter, TipAdapter):
            logits = self.adapter.head(images, class_embeddings, logit_scale, logit_bias, self.rows)
        else:
            logits = self.adapter.head(images, class_embeddings, logit_scale, logit_bias)
        if self.gamma:
            logits = calibrated_stacking(logits, self.seen_mask(class_embeddings), self.gamma)
        return logits


def bind_head(adapter: Adapter, labels: Sequence[str], class_embeddings: torch.Tensor) -> Head:
    """The head a classifier scores `labels` ([C, D] `class_embeddings`) through: the adapter's, with its
    classes found among the labels by (normalised) name, and calibrated stacking when the adapter has a
    gamma and the labels mix seen and unseen ones. What it does is logged (logger clipzsl.tip_adapter)."""
    seen_names = adapter.class_names if isinstance(adapter, TipAdapter) else list(adapter.meta.get("trained_labels")
                                                                                   or [])
    column = {normalise_text(name): j for j, name in enumerate(labels)}
    found = [column.get(normalise_text(name)) for name in seen_names]
    rows = torch.zeros(len(seen_names), class_embeddings.shape[1])
    for k, j in enumerate(found):
        if j is not None:
            rows[k] = class_embeddings[j].float()
    seen = len({j for j in found if j is not None})
    calibration = adapter.meta.get("calibration")
    mixed = 0 < seen < len(labels)
    gamma = float(calibration["gamma"]) if calibration and mixed else 0.0
    _log_binding(adapter, seen, len(labels), gamma, calibration is not None)
    return BoundHead(adapter, rows, gamma)


def _log_binding(adapter: Adapter, seen: int, total: int, gamma: float, calibrated: bool) -> None:
    kind = f"Tip adapter ({adapter.kind})" if isinstance(adapter, TipAdapter) else "cross-attention adapter"
    if isinstance(adapter, TipAdapter) and seen < total:
        log.info("%s: %d of %d labels are classes of its cache; the other %d score zero-shot only", kind, seen,
                 total, total - seen)
        if not seen:
            log.warning("%s: none of the %d labels is a class of its cache (%s...), so it scores exactly as "
                        "zero-shot", kind, total, ", ".join(adapter.class_names[:3]))
    if gamma:
        log.info("calibrated stacking: gamma %.4g subtracted from the logits of the %d seen labels (the %s was "
                 "fitted on them), since the %d labels mix seen and unseen ones", gamma, seen, kind, total)
    elif calibrated and seen:
        log.info("calibrated stacking not applied: all %d labels are seen classes of the %s", total, kind)


def write_calibration(directory: str | os.PathLike, calibration: Calibration) -> dict:
    """Store `calibration` in a saved adapter's adapter.json (either kind), atomically; returns the record."""
    schema = TipRecord if adapter_format(directory) == TIP_FORMAT else AdapterRecord
    return rewrite_record(directory, schema, calibration=asdict(calibration))


__all__ = ["AdapterMismatch", "BoundHead", "Calibration", "FORMAT_NAME", "KINDS", "TIP_FORMAT", "TipAdapter",
           "TipRecord", "attending", "bind_head", "draws_attention", "load_adapter", "matching_rows",
           "resolve_any_adapter", "write_calibration"]
