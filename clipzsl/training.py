"""Training over embedded images: the one training loop, the adapter's fit and its model selection.

The adapter's objective is cross-entropy over the seen classes + lambda * KL(zero-shot ||
adapted) on the same logits (a KgCoOp / PromptSRC-style consistency term that keeps the
adapted classifier close to the zero-shot one, which is what protects unseen classes).
Hyper-parameters and the early-stopping epoch are chosen on a validation split of the
*seen* classes only: held-out images of the training classes (base) and held-out seen
classes that the adapter never trains on (pseudo-novel); the criterion is their harmonic
mean. The baselines (`clipzsl.baselines`) train through the same `train_loop`.

Three levels, three names: `fit_adapter` is one fit at given hyper-parameters (`clipzsl.train_adapter`
is its former name, kept); `fit_with_selection` chooses the hyper-parameters (a grid) and the epoch on a
seen-class validation split; `train_adapter_from_folder` is what `clipzsl train-adapter` runs: a
class-folder data set embedded, `fit_with_selection`, the adapter saved.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .adapter import CrossAttentionAdapter
from .backends import Backend
from .errors import InputError
from .images import EmbeddedImages, embed_images_cached, expand_sources
from .metrics import accuracy, harmonic_mean_or_available
from .prompts import DEFAULT_TEMPLATES, ClassEntry, TemplatesArg, content_lines, load_templates, normalise_text
from .store import cache_root
from .text_encoding import class_embeddings

log = logging.getLogger(__name__)

#: the hyper-parameters `train_adapter_from_folder` (and the evaluation's "ours") choose among on validation
DEFAULT_GRID: tuple[dict[str, float], ...] = ({"lr": 3e-3, "consistency": 1.0}, {"lr": 3e-3, "consistency": 0.3},
                                              {"lr": 1e-2, "consistency": 0.3})


@dataclass(frozen=True)
class TrainConfig:
    """The adapter's training hyper-parameters (frozen: a shared default cannot be changed by one caller)."""

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
class LoopResult:
    """What `train_loop` leaves besides the module (restored to its best epoch when validated)."""

    history: list[dict]
    best_epoch: int
    best_score: float  # NaN without validation
    epoch_seconds: float  # mean wall time of one training epoch


@dataclass
class TrainResult:
    adapter: CrossAttentionAdapter
    history: list[dict]
    best_epoch: int
    best_score: float
    epoch_seconds: float  # mean wall time of one training epoch (adapter only)


def train_loop(
    module: nn.Module,
    batch_loss: Callable[[torch.Tensor], torch.Tensor],
    count: int,
    epochs: int,
    batch_size: int,
    generator: torch.Generator,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    validate: Callable[[], float] | None = None,
    patience: int = 5,
    describe: Callable[[], dict] | None = None,
    progress: bool = False,
) -> LoopResult:
    """Mini-batch training of `module` on `count` examples, with early stopping.

    `batch_loss(indices)` is the loss of one shuffled batch. `validate()` (higher is better),
    called before training and after each epoch, picks the epoch: training stops after
    `patience` epochs without improvement and the best epoch's weights are restored; without
    it every epoch runs and the last is kept. `describe()` adds entries to each epoch's row, which
    `progress` logs (logger "clipzsl.training", INFO).
    """
    best = (validate() if validate else -math.inf, 0, copy.deepcopy(module.state_dict()))
    history, times, bad = [{"epoch": 0, "val": best[0]}], [], 0
    for epoch in range(1, epochs + 1):
        module.train()
        start = time.perf_counter()
        order = torch.randperm(count, generator=generator)
        total = 0.0
        for i in range(0, count, batch_size):
            idx = order[i:i + batch_size]
            loss = batch_loss(idx)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            total += float(loss.detach()) * len(idx)
        times.append(time.perf_counter() - start)
        module.eval()
        row = {"epoch": epoch, "loss": total / count, **(describe() if describe else {})}
        if validate:
            row["val"] = validate()
            if row["val"] > best[0]:
                best, bad = (row["val"], epoch, copy.deepcopy(module.state_dict())), 0
            else:
                bad += 1
        history.append(row)
        if progress:
            log.info("%s", row)
        if validate and bad >= patience:
            break
    if validate:
        module.load_state_dict(best[2])
        best_epoch, best_score = best[1], best[0]
    else:
        best_epoch, best_score = epochs, math.nan
    return LoopResult(history, best_epoch, best_score, float(np.mean(times)) if times else 0.0)


def kl_to_zero_shot(logits: torch.Tensor, zs_logits: torch.Tensor) -> torch.Tensor:
    """KL(p_zs || p_adapted), mean over the batch."""
    return F.kl_div(logits.log_softmax(-1), zs_logits.log_softmax(-1), log_target=True, reduction="batchmean")


def fit_adapter(
    train: EmbeddedImages,
    train_targets: Sequence[int] | torch.Tensor,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    config: TrainConfig | None = None,
    validate: Callable[[CrossAttentionAdapter], float] | None = None,
    logit_bias: float = 0.0,
    progress: bool = False,
) -> TrainResult:
    """One fit of an adapter at the hyper-parameters of `config`, on embedded images (with tokens);
    `class_embeddings` are the training classes' [C, D]. (`fit_with_selection` chooses `config`.)

    `validate(adapter) -> float` (higher is better), called after each epoch, picks the
    epoch (early stopping); without it, the last epoch is kept.
    """
    config = config or TrainConfig()
    tokens = train.tokens
    if tokens is None:
        raise InputError("the adapter attends over spatial tokens, and these images have none: embed them with "
                         "tokens (embed_images_cached, or embed_images(..., return_tokens=True))")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    targets = torch.as_tensor(train_targets, dtype=torch.long)
    adapter = CrossAttentionAdapter(class_embeddings.shape[1], heads=config.heads, dropout=config.dropout)
    gates: list[torch.Tensor] = [adapter.alpha, adapter.log_tau]
    rest = [p for p in adapter.parameters() if all(p is not g for g in gates)]
    groups: list[dict[str, Any]] = [{"params": rest}, {"params": gates, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=config.lr, weight_decay=config.weight_decay)
    steps = config.epochs * max(1, math.ceil(len(targets) / config.batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[config.lr, config.lr * config.gate_lr_mult],
                                                total_steps=steps, pct_start=0.1)

    def batch_loss(idx: torch.Tensor) -> torch.Tensor:
        emb, y = class_embeddings, targets[idx]
        if config.max_classes and class_embeddings.shape[0] > config.max_classes:
            own = torch.unique(y)
            others = torch.ones(class_embeddings.shape[0], dtype=torch.bool)
            others[own] = False
            others = torch.nonzero(others).squeeze(1)
            others = others[torch.randperm(len(others), generator=gen)[:max(0, config.max_classes - len(own))]]
            emb = class_embeddings[torch.cat([own, others])]
            y = torch.searchsorted(own, y)  # own classes come first, in sorted order
        logits, zs = adapter(emb, tokens[idx], train.embeddings[idx], logit_scale, logit_bias,
                             return_parts=True)
        loss = F.cross_entropy(logits, y)
        if config.consistency:
            loss = loss + config.consistency * kl_to_zero_shot(logits, zs.detach())
        return loss

    loop = train_loop(adapter, batch_loss, len(targets), config.epochs, config.batch_size, gen, opt, sched,
                      (lambda: validate(adapter)) if validate else None, config.patience,
                      describe=lambda: {"alpha": float(adapter.alpha.detach())}, progress=progress)
    return TrainResult(adapter.eval(), loop.history, loop.best_epoch, loop.best_score, loop.epoch_seconds)


#: the former name of `fit_adapter` (exported as `clipzsl.train_adapter`): one fit, not the command's grid search
train_adapter = fit_adapter


def seen_split(targets: Sequence[int] | np.ndarray, classes: Sequence[int], seed: int, val_class_frac: float = 0.2,
               val_image_frac: float = 0.2) -> tuple[list[int], list[int], list[int], list[int], list[int]]:
    """Split seen data for model selection: (train idx, val-base idx, val-novel idx, train classes,
    val classes). Val classes are whole seen classes held out of training (pseudo-novel); val-base
    are held-out images of the training classes (only from classes with >= 2 images)."""
    rng = np.random.default_rng(seed)
    ordered = np.array(sorted(classes))
    perm = rng.permutation(len(ordered))
    n_val = max(1, int(round(val_class_frac * len(ordered)))) if len(ordered) >= 4 else 0
    val_classes = set(ordered[perm[:n_val]].tolist())
    train_classes = [c for c in ordered.tolist() if c not in val_classes]
    target = np.asarray(targets)
    train_idx: list[int] = []
    val_base: list[int] = []
    val_novel: list[int] = []
    for c in ordered.tolist():
        idx = np.flatnonzero(target == c)
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
    images: EmbeddedImages,
    targets: Sequence[int],
    class_embeddings_all: torch.Tensor,
    seen_classes: Sequence[int],
    logit_scale: float,
    seed: int = 0,
    grid: Sequence[dict] | None = None,
    base: TrainConfig | None = None,
    logit_bias: float = 0.0,
    log: Callable[[str], None] | None = None,
) -> tuple[TrainResult, dict]:
    """Choose hyper-parameters (one `fit_adapter` per `grid` entry) and the epoch on a seen-class
    validation split: the grid search of `clipzsl train-adapter`.

    The score of a candidate is the harmonic mean of its validation accuracy on held-out images
    of the training classes (scored among the training classes) and on the held-out seen classes
    (scored among themselves); unseen classes and test data are never looked at. With fewer than
    4 seen classes there are no held-out classes and the score is the first accuracy alone;
    `info["val_metric"]` says which ("H", "base accuracy", "pseudo-novel accuracy", or None when
    there are no validation images: then the last epoch of the first grid setting is kept).
    `info["untrained"]` (with a warning) when the best epoch is epoch 0: no training improved on zero-shot.
    """
    base = base or TrainConfig()
    if len(set(seen_classes)) < 2:
        raise InputError(f"an adapter needs at least 2 seen classes to train on, got {len(set(seen_classes))}: "
                         "cross-entropy over a single class is always 0")
    targets_t = torch.as_tensor(targets, dtype=torch.long)
    tr, vb, vn, tr_classes, val_classes = seen_split(targets_t.numpy(), seen_classes, seed)
    remap = torch.full((class_embeddings_all.shape[0],), -1, dtype=torch.long)
    remap[torch.tensor(tr_classes)] = torch.arange(len(tr_classes))
    emb_tr = class_embeddings_all[tr_classes]
    vremap = torch.full((class_embeddings_all.shape[0],), -1, dtype=torch.long)
    if val_classes:
        vremap[torch.tensor(val_classes)] = torch.arange(len(val_classes))
    emb_val = class_embeddings_all[val_classes] if val_classes else None
    f_tr, f_vb, f_vn = images.subset(tr), images.subset(vb), images.subset(vn)
    y_tr, y_vb, y_vn = remap[targets_t[tr]], remap[targets_t[vb]].tolist(), vremap[targets_t[vn]].tolist()

    def validate(adapter: CrossAttentionAdapter) -> float:
        a = accuracy(adapter.head(f_vb, emb_tr, logit_scale, logit_bias), y_vb)
        b = accuracy(adapter.head(f_vn, emb_val, logit_scale, logit_bias), y_vn) if emb_val is not None else math.nan
        return harmonic_mean_or_available(a, b)  # one at least: it is not called without validation data

    # without validation images every epoch would score 0 and the untrained epoch 0 would be kept
    metric = {(True, True): "H", (True, False): "base accuracy", (False, True): "pseudo-novel accuracy",
              (False, False): None}[bool(vb), bool(vn)]
    candidates = []
    for params in list(grid or [{}]):
        cfg = TrainConfig(**{**asdict(base), **params, "seed": seed})
        result = fit_adapter(f_tr, y_tr, emb_tr, logit_scale, cfg, validate if metric else None, logit_bias)
        if log:
            score = f"val {metric} {result.best_score:.4f}" if metric else "no validation images, last"
            log(f"  seed {seed} {params}: {score} at epoch {result.best_epoch}, {result.epoch_seconds:.2f} s/epoch")
        candidates.append((result, params))
    best, params = max(candidates, key=lambda candidate: candidate[0].best_score)  # the first of equals
    # validated, and no epoch beat epoch 0: alpha is still 0, so the adapter scores exactly as zero-shot
    untrained = metric is not None and best.best_epoch == 0
    if untrained:
        warnings.warn(f"no training epoch beat the untrained adapter on the validation {metric} "
                      f"({best.best_score:.3f} at epoch 0), so the adapter kept is untrained: it scores exactly "
                      "as zero-shot; more images per class, more epochs or another learning rate may help")
    info = {"params": params, "val_score": best.best_score, "val_metric": metric, "best_epoch": best.best_epoch,
            "untrained": untrained, "n_train": len(tr), "n_val_base": len(vb), "n_val_novel": len(vn),
            "train_classes": len(tr_classes), "val_classes": len(val_classes),
            "epoch_seconds": best.epoch_seconds,
            "val_split": {"train_idx": tr, "val_base_idx": vb, "val_novel_idx": vn,
                          "train_classes": tr_classes, "val_classes": val_classes}}
    return best, info


def folder_dataset(root: str | os.PathLike) -> tuple[list[str], list[str], list[int]]:
    """(class names, image paths, targets) of a folder with one sub-folder per class (names: '_' -> ' ').

    A sub-folder without images is left out with a warning naming it: as a class it would be a
    label trained, validated and scored on nothing."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; expected a folder with one sub-folder of images per class")
    dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not dirs:
        raise InputError(f"{root}: expected one sub-folder per class, found none")
    names: list[str] = []
    paths: list[str] = []
    targets: list[int] = []
    for d in dirs:
        files = expand_sources(str(d))
        if not files:
            warnings.warn(f"{d}: no images; class {d.name.replace('_', ' ')!r} left out")
            continue
        paths += [str(f) for f in files]
        targets += [len(names)] * len(files)
        names.append(d.name.replace("_", " "))
    if not names:
        raise InputError(f"{root}: none of its {len(dirs)} class sub-folders holds images")
    return names, paths, targets


@dataclass(frozen=True)
class ClassFolders:
    """A labelled image set read from a folder with one sub-folder of images per class (`folder_dataset`):
    read once, so its errors come before a model is loaded and its warnings are said once."""

    root: str  # as given: what messages and records name
    names: list[str]
    paths: list[str]
    targets: list[int]  # indexes into `names`, one per path

    @classmethod
    def read(cls, root: str | os.PathLike) -> ClassFolders:
        return cls(str(root), *folder_dataset(root))


@dataclass(frozen=True)
class TrainingSet:
    """The classes of a `ClassFolders` an adapter trains on (`seen`, indexes into its names): what
    `train_adapter_from_folder` needs before the model is loaded."""

    folders: ClassFolders
    seen: list[int]

    @property
    def rows(self) -> list[int]:
        """The images of the seen classes (indexes into `folders.paths`)."""
        seen = set(self.seen)
        return [i for i, y in enumerate(self.folders.targets) if y in seen]


def read_seen(folders: ClassFolders, seen_file: str | os.PathLike) -> list[int]:
    """The classes a file lists, one per line, as indexes into `folders.names`; names compare as labels
    do (normalised, '_' as ' ', lines ending at \\n or \\r\\n only). A name that is no class is an error."""
    column = {normalise_text(name): number for number, name in enumerate(folders.names)}
    text = Path(seen_file).read_text(encoding="utf-8-sig")
    wanted = {n: normalise_text(line.replace("_", " ")) for n, line in content_lines(text)}
    unknown = [f"line {n}: {w!r}" for n, w in wanted.items() if w not in column]
    if unknown:
        raise InputError(f"{seen_file}: classes not in {folders.root} (no such sub-folder, or one without images): "
                         f"{', '.join(unknown[:5])}")
    return sorted({column[w] for w in wanted.values()})


def training_set(data: str | os.PathLike, seen: str | os.PathLike | None = None) -> TrainingSet:
    """The class folders of `data` and the classes to train on (those `seen` lists; default all),
    refused when fewer than 2: checked before any model is loaded."""
    folders = ClassFolders.read(data)
    chosen = read_seen(folders, seen) if seen else list(range(len(folders.names)))
    if len(chosen) < 2:
        where = f"{seen} selects" if seen else f"{data} has"
        raise InputError(f"{where} {len(chosen)} class(es) with images ({[folders.names[c] for c in chosen]}); an "
                         f"adapter needs at least 2 classes to train on: add class sub-folders of images to {data}")
    return TrainingSet(folders, chosen)


def adapter_grid(lr: float | None = None, consistency: float | None = None) -> tuple[dict[str, float], ...]:
    """The hyper-parameters to choose among: `DEFAULT_GRID`, or the one setting given (an unset one of
    the two at its default: lr 3e-3, consistency 1.0)."""
    if lr is None and consistency is None:
        return DEFAULT_GRID
    return ({"lr": lr or 3e-3, "consistency": 1.0 if consistency is None else consistency},)


def train_adapter_from_folder(
    data: str | os.PathLike | TrainingSet,
    model: Backend,
    out: str | os.PathLike,
    *,
    seen: str | os.PathLike | None = None,
    templates: TemplatesArg = DEFAULT_TEMPLATES,
    grid: Sequence[dict[str, Any]] | None = None,
    epochs: int = 15,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    progress: bool | None = True,
) -> tuple[TrainResult, dict]:
    """`clipzsl train-adapter`: an adapter trained on the seen classes of a class-folder data set
    (`training_set`), its hyper-parameters and epoch chosen on validation (`fit_with_selection` over
    `grid`, default `DEFAULT_GRID`), saved to `out` with what was chosen (adapter.json's "training").

    Image features are cached under `cache_dir` (None: the default cache folder). Returns the fit and
    that record; `info["untrained"]` says the adapter saved scores exactly as zero-shot (warned)."""
    if isinstance(data, TrainingSet) and seen is not None:
        raise InputError("give the seen classes once: in the TrainingSet, or as `seen` with a data folder")
    dataset = data if isinstance(data, TrainingSet) else training_set(data, seen)
    folders, rows = dataset.folders, dataset.rows
    template_list = load_templates(templates)
    class_embs = class_embeddings(model, [ClassEntry(n) for n in folders.names], template_list)
    images = embed_images_cached(model, [folders.paths[i] for i in rows], cache_root(cache_dir), progress=progress)
    result, info = fit_with_selection(images, [folders.targets[i] for i in rows], class_embs, dataset.seen,
                                      model.logit_scale, seed=seed, grid=DEFAULT_GRID if grid is None else grid,
                                      base=TrainConfig(epochs=epochs, patience=4), logit_bias=model.logit_bias,
                                      log=log.info)
    info.pop("val_split")
    result.adapter.save(out, model, templates=template_list, labels=[folders.names[c] for c in dataset.seen],
                        extra={"training": info})
    return result, info


def describe_training(out: str | os.PathLike, info: dict) -> str:
    """One line: where the adapter was saved, on how much, and what was chosen on which validation
    score (`fit_with_selection`'s info): what `clipzsl train-adapter` prints."""
    classes = info["train_classes"] + info["val_classes"]
    metric = info["val_metric"]
    if metric is None:
        chosen = (f"no validation images (a class needs >= 2 images to hold one out), so the last epoch "
                  f"{info['best_epoch']} of {info['params']} is kept")
    else:
        what = {"H": "H of base and pseudo-novel accuracy",
                "base accuracy": f"accuracy on held-out images of the {info['train_classes']} training classes "
                                 "(no pseudo-novel classes: that needs >= 4 seen classes)",
                "pseudo-novel accuracy": f"accuracy on the {info['val_classes']} held-out seen classes "
                                         "(no held-out images of the training classes)"}[metric]
        chosen = f"chosen {info['params']}, validation {what} {info['val_score']:.3f} at epoch {info['best_epoch']}"
    return (f"{out}: adapter trained on {classes} classes, {info['n_train']} images; {chosen}, "
            f"{info['epoch_seconds']:.2f} s/epoch")
