"""Building a Tip-Adapter (training-free) and training a Tip-Adapter-F, as the official code does
(gaopengcuhk/Tip-Adapter, main.py and utils.py), over embedded images.

- Tip-Adapter: the keys are the images' embeddings, the values their one-hot classes. alpha and beta are
  searched as `search_hp` does, on a grid (beta: `SEARCH_STEPS[0]` values from 0.1 to `SEARCH_SCALE[0]`,
  alpha: `SEARCH_STEPS[1]` from 0.1 to `SEARCH_SCALE[1]`, the widest official ranges, 200 x 20),
  keeping the first best validation accuracy. The validation images are held out of the cache while
  searching (one in five of each class with two images or more, at least one); the saved cache then holds
  every image. With no validation image (one shot), alpha and beta keep the official defaults.
- Tip-Adapter-F: the keys become a parameter trained with cross-entropy on the cache's own images
  (AdamW, lr 1e-3, eps 1e-4, a cosine schedule over every step, 20 epochs, batches of 256, alpha and beta
  at their initial values), the epoch chosen on the validation images (the official code picks it on the
  test set), then alpha and beta searched. The official code trains on augmented views whose own key is
  the mean of other views; the images here are embedded once, so each training image leaves its own key
  out (`TipAdapter.cache_logits(leave_out=...)`), the same situation as a new image's. Its cache holds
  the training images only (the validation images chose the epoch, alpha and beta).
"""
from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backends import Backend
from .errors import InputError
from .images import EmbeddedImages, embed_images_cached
from .metrics import accuracy
from .prompts import DEFAULT_TEMPLATES, ClassEntry, TemplatesArg, load_templates
from .store import cache_root
from .text_encoding import class_embeddings as class_embeddings_of
from .tip_adapter import DEFAULT_ALPHA, DEFAULT_BETA, PAPER_SCALE, TipAdapter
from .training import TrainingSet, train_loop, training_set

log = logging.getLogger(__name__)

#: the search's upper ends (beta, alpha) and numbers of values: the widest of the official configs' search_scale
#: (oxford_flowers.yaml; ImageNet's 7 and 3 leave the packaged model's cache no weight) and their search_step
SEARCH_SCALE = (50.0, 50.0)
SEARCH_STEPS = (200, 20)


@dataclass(frozen=True)
class TipConfig:
    """How a Tip adapter is built (`fit_tip`); the defaults are the official code's."""

    kind: Literal["tip", "tip-f"] = "tip"
    alpha: float = DEFAULT_ALPHA  # init_alpha: used as is without validation images, and while training keys
    beta: float = DEFAULT_BETA  # init_beta
    search: bool = True  # search alpha and beta on the validation images
    search_scale: tuple[float, float] = SEARCH_SCALE
    search_steps: tuple[int, int] = SEARCH_STEPS
    epochs: int = 20  # Tip-Adapter-F
    lr: float = 1e-3
    batch_size: int = 256
    val_fraction: float = 0.2  # of each class's images, held out to search alpha/beta and pick the epoch
    seed: int = 0


def search_values(scale: float, steps: int) -> list[float]:
    """The official `search_hp` grid: `steps` values from 0.1 up to (not including) `scale`."""
    return [i * (scale - 0.1) / steps + 0.1 for i in range(steps)]


def search_alpha_beta(adapter: TipAdapter, features: torch.Tensor, targets: Sequence[int],
                      config: TipConfig) -> tuple[float, float, float]:
    """(alpha, beta, accuracy): the first best validation accuracy over the grid, as `search_hp`; `targets`
    index the adapter's classes, which are all scored. Every alpha of a beta is scored at once."""
    target = torch.as_tensor(list(targets), dtype=torch.long)
    alpha_values = search_values(config.search_scale[1], config.search_steps[1])
    alphas, betas = torch.tensor(alpha_values), search_values(config.search_scale[0], config.search_steps[0])
    with torch.no_grad():
        zero_shot = PAPER_SCALE * features @ adapter.class_embeddings.T
        affinity = features @ adapter.keys.T
        values = adapter.values()
        correct = torch.stack([((zero_shot + alphas[:, None, None] * (torch.exp(-(beta - beta * affinity)) @ values))
                                .argmax(2) == target).sum(1) for beta in betas])  # [betas, alphas]
    first = int(correct.flatten().argmax())  # the first best, beta outer and alpha inner as search_hp loops
    best_beta, best_alpha = divmod(first, len(alphas))
    return alpha_values[best_alpha], betas[best_beta], int(correct.flatten()[first]) / len(target)


def hold_out(targets: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(cache rows, validation rows): of each class with two images or more, round(fraction * n) images
    (at least one) held out at random (seed); a class of one image stays whole in the cache."""
    rng = np.random.default_rng(seed)
    target = np.asarray(targets)
    keep: list[int] = []
    held: list[int] = []
    for c in np.unique(target).tolist():
        rows = rng.permutation(np.flatnonzero(target == c)).tolist()
        k = max(1, round(fraction * len(rows))) if len(rows) >= 2 and fraction > 0 else 0
        held += rows[:k]
        keep += rows[k:]
    return sorted(keep), sorted(held)


def train_keys(adapter: TipAdapter, features: torch.Tensor, targets: torch.Tensor, config: TipConfig,
               val: tuple[torch.Tensor, list[int]] | None) -> dict:
    """Tip-Adapter-F's fine-tuning of the keys (which are `features`' rows, in order), each image leaving its
    own key out; the epoch with the best validation accuracy kept (without `val`, the last)."""
    torch.manual_seed(config.seed)
    columns = torch.arange(adapter.class_embeddings.shape[0])
    optimizer = torch.optim.AdamW([adapter.keys], lr=config.lr, eps=1e-4)
    steps = config.epochs * max(1, math.ceil(len(targets) / config.batch_size))
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        logits = adapter.paper_logits(features[idx], adapter.class_embeddings, columns, leave_out=idx)
        return F.cross_entropy(logits, targets[idx])

    def validate() -> float:
        with torch.no_grad():
            assert val is not None
            return accuracy(adapter.paper_logits(val[0], adapter.class_embeddings, columns), val[1])

    loop = train_loop(adapter, batch_loss, len(targets), config.epochs, config.batch_size,
                      torch.Generator().manual_seed(config.seed), optimizer, scheduler,
                      validate if val is not None else None, patience=config.epochs)
    return {"best_epoch": loop.best_epoch, "epoch_seconds": loop.epoch_seconds,
            "val_accuracy_trained": None if val is None else loop.best_score}


def fit_tip(images: EmbeddedImages, targets: Sequence[int], class_embeddings: torch.Tensor,
            config: TipConfig = TipConfig()) -> tuple[TipAdapter, dict]:
    """A Tip-Adapter (`config.kind` "tip") or Tip-Adapter-F ("tip-f") over `images` of the classes whose
    embeddings [K, D] are `class_embeddings` (`targets` index them), and what was chosen (the record's
    "training"). Every class needs at least one image."""
    start = time.perf_counter()
    target = torch.as_tensor(list(targets), dtype=torch.long)
    missing = sorted(set(range(class_embeddings.shape[0])) - set(target.tolist()))
    if missing:
        raise InputError(f"classes {missing[:5]} have no image: a Tip adapter's cache needs one per class at least")
    x = images.embeddings.float()
    keep, held = hold_out(target.tolist(), config.val_fraction, config.seed)
    if not held or (config.kind == "tip" and not config.search):  # nothing to choose on the held-out images
        keep, held = list(range(len(target))), []
    adapter = TipAdapter(x[keep], target[keep], class_embeddings, config.alpha, config.beta, config.kind)
    val = (x[held], target[held].tolist()) if held else None
    info: dict = {"kind": config.kind, "images": len(target), "validation_images": len(held),
                  "shots": _shots(target)}
    if config.kind == "tip-f":
        info.update(train_keys(adapter, x[keep], target[keep], config, val))
    if val is not None and config.search:
        adapter.alpha, adapter.beta, info["val_accuracy"] = search_alpha_beta(adapter, val[0], val[1], config)
    if config.kind == "tip" and held:  # the cache keeps every image once alpha and beta are chosen
        adapter = TipAdapter(x, target, class_embeddings, adapter.alpha, adapter.beta, "tip")
    info.update({"alpha": adapter.alpha, "beta": adapter.beta, "searched": val is not None and config.search,
                 "cache_size": int(adapter.keys.shape[0]), "config": asdict(config),
                 "build_seconds": time.perf_counter() - start})
    return adapter.eval(), info


def _shots(target: torch.Tensor) -> list[int]:
    """The fewest and the most images of a class."""
    counts = torch.bincount(target)
    counts = counts[counts > 0]
    return [int(counts.min()), int(counts.max())]


def build_tip_from_folder(data: str | os.PathLike | TrainingSet, model: Backend, out: str | os.PathLike, *,
                          seen: str | os.PathLike | None = None, kind: Literal["tip", "tip-f"] = "tip",
                          templates: TemplatesArg = DEFAULT_TEMPLATES, seed: int = 0,
                          cache_dir: str | os.PathLike | None = None,
                          progress: bool | None = True) -> tuple[TipAdapter, dict]:
    """`clipzsl train-adapter --kind tip|tip-f`: a Tip adapter over the seen classes of a class-folder data set
    (`training.training_set`: every sub-folder, or those `seen` lists), saved to `out`. Image features are
    cached under `cache_dir` (None: the default folder). Returns the adapter and its record's "training"."""
    if isinstance(data, TrainingSet) and seen is not None:
        raise InputError("give the seen classes once: in the TrainingSet, or as `seen` with a data folder")
    dataset = data if isinstance(data, TrainingSet) else training_set(data, seen)
    folders, rows = dataset.folders, dataset.rows
    names = [folders.names[c] for c in dataset.seen]
    template_list = load_templates(templates)
    texts = class_embeddings_of(model, [ClassEntry(n) for n in names], template_list)
    images = embed_images_cached(model, [folders.paths[i] for i in rows], cache_root(cache_dir), progress=progress)
    column = {c: k for k, c in enumerate(dataset.seen)}
    adapter, info = fit_tip(images, [column[folders.targets[i]] for i in rows], texts, TipConfig(kind=kind, seed=seed))
    adapter.save(Path(out), model, template_list, names, training=info)
    return adapter, info


def describe_tip(out: str | os.PathLike, info: dict) -> str:
    """One line: where the Tip adapter was saved, on how much, and what was chosen (what the command prints)."""
    chosen = (f"alpha {info['alpha']:.3g}, beta {info['beta']:.3g} searched on {info['validation_images']} "
              f"held-out images (accuracy {info['val_accuracy']:.3f})" if info["searched"] else
              f"alpha {info['alpha']:.3g}, beta {info['beta']:.3g} (the official defaults: no class has 2 images "
              "to hold one out)")
    epochs = f", keys trained, epoch {info['best_epoch']} kept" if info["kind"] == "tip-f" else ""
    return (f"{out}: {info['kind']} adapter, cache of {info['cache_size']} images ({info['shots'][0]}-"
            f"{info['shots'][1]} per class); {chosen}{epochs}; built in {info['build_seconds']:.2f} s")
