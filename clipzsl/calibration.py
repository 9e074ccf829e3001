"""Calibrated stacking for a saved adapter: gamma fitted on a seen-class validation split and stored in
the adapter (what `clipzsl eval --calibrate DIR` runs); `clipzsl.tip_adapter.bind_head` applies it.

An adapter trained on all its seen classes has no class left to play "unseen", so gamma is fitted as the
GZSL protocol fits it (`evaluation.gzsl`): a proxy of the same kind and settings is fitted on the training
classes of a `seen_split` of the adapter's classes (a Tip cache built with the adapter's alpha and beta,
or the cross-attention adapter trained with the hyper-parameters it chose), and gamma is the one that
maximises H of the held-out images of those classes and of the held-out seen classes
(`evaluation.choose_gamma`). Unseen classes and test images are never looked at.
"""
from __future__ import annotations

import logging
import os
import time
from typing import Sequence

import torch

from .adapter import Calibration, CrossAttentionAdapter
from .backends import Backend
from .baselines import Fitted, Problem, cross_attention
from .errors import InputError
from .evaluation import choose_gamma, gzsl_metrics, validation_logits
from .images import EmbeddedImages, embed_images_cached
from .prompts import ClassEntry, normalise_text
from .store import cache_root
from .text_encoding import class_embeddings
from .tip_adapter import Adapter, Kind, TipAdapter, load_adapter, write_calibration
from .tip_training import TipConfig, fit_tip
from .training import DEFAULT_GRID, ClassFolders, TrainConfig, seen_split

log = logging.getLogger(__name__)


def tip_proxy(kind: Kind, alpha: float, beta: float, p: Problem, seed: int) -> Fitted:
    """A Tip adapter of this kind, alpha and beta built on the training rows of the seen split at `seed`."""
    tr, _, _, tr_classes, _ = seen_split(p.targets, p.seen, seed)
    column = {c: k for k, c in enumerate(tr_classes)}
    config = TipConfig(kind=kind, alpha=alpha, beta=beta, search=False, seed=seed)
    proxy, _ = fit_tip(p.images.subset(tr), [column[p.targets[i]] for i in tr], p.class_embeddings[tr_classes],
                       config)

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        return proxy.head(images, p.class_embeddings[list(classes)], p.logit_scale, p.logit_bias)
    return Fitted(f"Tip proxy ({kind})", score)


def attention_proxy(adapter: CrossAttentionAdapter, p: Problem, seed: int) -> Fitted:
    """The cross-attention adapter trained again, at the hyper-parameters it chose, on the seen split."""
    params = (adapter.meta.get("training") or {}).get("params")
    return cross_attention(p, seed, grid=[params] if params else DEFAULT_GRID, base=TrainConfig(epochs=15, patience=4))


def seen_problem(adapter: Adapter, data: ClassFolders, model: Backend, cache_dir: str | os.PathLike | None,
                 progress: bool | None) -> Problem:
    """The images of `data` whose class is one the adapter was fitted on, embedded (with tokens), and those
    classes' embeddings with the adapter's templates; refused with fewer than 4 such classes."""
    seen = [normalise_text(n) for n in (adapter.meta.get("trained_labels") or [])]
    classes = [c for c, name in enumerate(data.names) if normalise_text(name) in set(seen)]
    if len(classes) < 4:
        raise InputError(f"{data.root}: {len(classes)} of its classes are ones the adapter was fitted on "
                         f"({[data.names[c] for c in classes][:5]}); fitting gamma holds whole seen classes out, "
                         "which needs at least 4: give the folder the adapter was built from")
    column = {c: k for k, c in enumerate(classes)}
    rows = [i for i, y in enumerate(data.targets) if y in column]
    images = embed_images_cached(model, [data.paths[i] for i in rows], cache_root(cache_dir), progress=progress)
    texts = class_embeddings(model, [ClassEntry(data.names[c]) for c in classes], adapter.meta.get("templates") or [])
    return Problem(images, [column[data.targets[i]] for i in rows], texts, list(range(len(classes))),
                   model.logit_scale, model.logit_bias)


def fit_gamma(directory: str | os.PathLike, data: ClassFolders, model: Backend, *, seed: int = 0,
              cache_dir: str | os.PathLike | None = None, progress: bool | None = True) -> Calibration:
    """`clipzsl eval --calibrate DIR`: gamma of calibrated stacking for the adapter saved in `directory`
    (either kind), fitted on the images of `data` of the adapter's classes, and written into its
    adapter.json (atomically: `tip_adapter.write_calibration`). Returns what was stored."""
    adapter = load_adapter(directory, model)
    problem = seen_problem(adapter, data, model, cache_dir, progress)
    proxy = tip_proxy(adapter.kind, adapter.alpha, adapter.beta, problem, seed) \
        if isinstance(adapter, TipAdapter) else \
        attention_proxy(adapter, problem, seed)
    validation = validation_logits(proxy, problem, seed)
    if validation is None:
        raise InputError(f"{data.root}: no held-out image of a training class in the seen split (each class needs "
                         "2 images or more); gamma cannot be fitted")
    gamma = choose_gamma(*validation)
    plain, calibrated = (gzsl_metrics(*validation, g)["H"] for g in (0.0, gamma))
    calibration = Calibration(gamma, list(adapter.meta.get("trained_labels") or []), str(data.root), seed,
                              len(validation[1]), plain, calibrated)
    write_calibration(directory, calibration)
    log.info("%s: gamma %.4g stored (validation H %.3f without it, %.3f with it)", directory, gamma, plain,
             calibrated)
    return calibration


def describe_calibration(directory: str | os.PathLike, calibration: Calibration) -> str:
    """One line: the gamma stored and what it did on validation (what `clipzsl eval --calibrate` prints)."""
    return (f"{directory}: gamma {calibration.gamma:.4g} stored in adapter.json, fitted on "
            f"{calibration.val_images} held-out images of {len(calibration.seen_labels)} seen classes of "
            f"{calibration.data} (seed {calibration.seed}); validation H {calibration.val_h_plain:.3f} without it, "
            f"{calibration.val_h_calibrated:.3f} with it")


def tip_method(p: Problem, seed: int = 0, kind: Kind = "tip") -> Fitted:
    """A Tip adapter (or Tip-Adapter-F) over every seen training image of `p`, as a method of the protocols
    (`clipzsl.baselines.Fitted`); its gamma comes from `tip_proxy`, since its cache holds the validation split."""
    column = {c: k for k, c in enumerate(p.seen)}
    start = time.perf_counter()
    adapter, info = fit_tip(p.images, [column[t] for t in p.targets], p.class_embeddings[p.seen],
                            TipConfig(kind=kind, seed=seed))
    info = {**info, "fit_seconds": time.perf_counter() - start}

    def score(images: EmbeddedImages, classes: Sequence[int]) -> torch.Tensor:
        return adapter.head(images, p.class_embeddings[list(classes)], p.logit_scale, p.logit_bias)
    return Fitted("Tip-Adapter" if kind == "tip" else "Tip-Adapter-F (clipzsl.tip_training)", score, info=info)
