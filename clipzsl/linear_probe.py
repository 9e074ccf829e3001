"""A linear probe on frozen image embeddings, run as CLIP_benchmark's `linear_probe` task runs it.

Logistic regression (one `nn.Linear`, cross-entropy) on L2-normalised pooled embeddings
(`EmbeddedImages.embeddings`), trained with AdamW under a cosine learning-rate schedule, batches
drawn as a shuffling `DataLoader` draws them. The weight decay (decoupled L2) is chosen on a
validation split carved from the training images: CLIP_benchmark's sweep over 97 values
log-spaced from 1e-6 to 1e2 (7 coarse points, then 4 refinements around the best, halving the
step each time; the first best wins ties), each candidate trained on the training part and scored
by top-1 on the validation part. The chosen weight decay is then refit on train + validation for
the full probe, and on the k-shot images alone for a few-shot probe (adding the validation images
would train on more than k per class), as CLIP_benchmark does.

k-shot: the first k images of each class in a permutation seeded by `ProbeConfig.seed`
(CLIP_benchmark's sampling). A class with fewer than k training images is refused.

Every training run starts from `torch.manual_seed(seed)` inside `torch.random.fork_rng`, so the
caller's random state is left as it was and the same inputs give the same probe; given the same
train, validation and test features, the chosen weight decay and the metrics are those of
CLIP_benchmark's `linear_probe.evaluate` (tests/test_linear_probe.py checks it against its code).

    probe = fit_linear_probe(x_train, y_train, n_classes, shots=16)
    metrics = probe_metrics(probe, x_test, y_test)   # lp_acc1, lp_acc5, lp_mean_per_class_recall, weight_decay...

`clipzsl.evaluation.linear_probe_evaluation` runs it on a class-folder data set (`clipzsl eval
--protocol linear-probe`), next to zero-shot on the same test images.
"""
from __future__ import annotations

import logging
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, TensorDataset, random_split

from .errors import InputError
from .metrics import Targets, accuracy, classification_metrics

__all__ = ["COARSE", "WEIGHT_DECAYS", "LinearProbe", "ProbeConfig", "check_shots", "choose_weight_decay",
           "few_shot_indices", "fit_linear_probe", "format_linear_probe", "probe_metrics", "train_probe",
           "validation_split"]

log = logging.getLogger(__name__)

#: the weight decays the search chooses among (CLIP_benchmark's, after CLIP's paper, appendix A.3)
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
#: the indices of WEIGHT_DECAYS tried first (its 7 decades-and-a-third points); the search refines around the best
COARSE: list[int] = [i for i, wd in enumerate(WEIGHT_DECAYS) if wd in np.logspace(-6, 2, num=7).tolist()]


@dataclass(frozen=True)
class ProbeConfig:
    """The probe's training: CLIP_benchmark's defaults (`--fewshot_lr 0.1 --fewshot_epochs 10
    --batch_size 64`), and the share of the training images held out to choose the weight decay."""

    lr: float = 0.1
    epochs: int = 10
    batch_size: int = 64
    seed: int = 0
    val_proportion: float = 0.2


@dataclass
class LinearProbe:
    """A fitted probe: the layer, the chosen weight decay and what chose it."""

    linear: nn.Linear
    weight_decay: float
    shots: int | None  # None: every training image
    config: ProbeConfig
    val_acc1: dict[float, float] = field(default_factory=dict)  # the validation top-1 of each weight decay tried
    n_train: int = 0  # the images the final probe trained on
    n_val: int = 0

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.linear(x.float())

    def settings(self) -> dict:
        """What a record adds to `probe_metrics` (which has weight_decay, epochs and seed): the images
        it trained on and chose on, the chosen weight decay's validation top-1, the other settings."""
        return {"n_train": self.n_train, "n_val": self.n_val, "val_acc1": self.val_acc1[self.weight_decay],
                "lr": self.config.lr, "batch_size": self.config.batch_size,
                "val_proportion": self.config.val_proportion}


def validation_split(count: int, proportion: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) rows of `count` training images: `torch.utils.data.random_split` with the
    proportions (1 - p, p), as CLIP_benchmark's `--val_proportion`, from a generator seeded by `seed`."""
    if not 0 < proportion < 1:
        raise InputError(f"the validation proportion must be between 0 and 1 (exclusive), got {proportion}")
    with warnings.catch_warnings():  # an empty validation part: the caller says what to do about it
        warnings.filterwarnings("ignore", "Length of split", UserWarning)
        train, val = random_split(TensorDataset(torch.arange(count)), [1 - proportion, proportion],
                                  generator=torch.Generator().manual_seed(seed))
    return list(train.indices), list(val.indices)


def _sample(targets: Targets, shots: int | None, seed: int, classes: int | None = None
            ) -> tuple[list[int], dict[int, int]]:
    """`few_shot_indices`' rows, and the classes (of `range(classes)`; None: those in `targets`) that have
    fewer than `shots` rows, with how many they have."""
    target = torch.as_tensor(targets).tolist()
    if shots is not None and shots < 1:
        raise InputError(f"shots must be at least 1 image per class (or None for every image), got {shots}")
    order = torch.randperm(len(target), generator=torch.Generator().manual_seed(seed)).tolist()
    taken: Counter[int] = Counter()
    rows = []
    for row in order:
        if shots is None or taken[target[row]] < shots:
            taken[target[row]] += 1
            rows.append(row)
    wanted = sorted(taken) if classes is None else range(classes)
    return rows, {c: taken[c] for c in wanted if shots is not None and taken[c] < shots}


def _too_few(shots: int | None, short: dict) -> InputError:
    return InputError(f"a {shots}-shot probe needs {shots} training images of every class; "
                      + ", ".join(f"{c!r} has {n}" for c, n in list(short.items())[:5])
                      + f"{' ...' if len(short) > 5 else ''} (of the training images the validation split leaves); "
                      "ask for fewer shots, or add images to those classes")


def few_shot_indices(targets: Targets, shots: int | None, seed: int, classes: int | None = None) -> list[int]:
    """The rows a `shots`-shot probe trains on: the first `shots` of each class in a permutation of the
    rows seeded by `seed` (CLIP_benchmark's sampling), in that permutation's order; None: every row, in it.

    A class with fewer than `shots` rows is refused, naming it: each of `range(classes)` (a class without
    a row too, which CLIP_benchmark lets through), or with `classes` None each class `targets` holds."""
    rows, short = _sample(targets, shots, seed, classes)
    if short:
        raise _too_few(shots, short)
    return rows


def check_shots(targets: Targets, shots: Sequence[int | None], config: ProbeConfig = ProbeConfig(),
                names: Sequence[str] | None = None) -> None:
    """Refuse, before anything is embedded, shots that `fit_linear_probe` could not sample from these targets
    (the validation split is drawn from their count alone, so this is the split the fit will use). With
    `names` (the targets index them), every one of them must give the shots, and the error names them."""
    part, _ = validation_split(len(torch.as_tensor(targets)), config.val_proportion, config.seed)
    for k in shots:
        _, short = _sample(torch.as_tensor(targets)[part], k, config.seed, len(names) if names else None)
        if short:
            raise _too_few(k, {names[c] if names else c: n for c, n in short.items()})


def _epoch_batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> DataLoader:
    """One pass over (x, y) in shuffled batches, drawn from the global generator exactly as CLIP_benchmark's
    `DataLoader(shuffle=True)` draws them (a batch is taken whole, not image by image)."""
    data = TensorDataset(x, y)
    return DataLoader(data, sampler=BatchSampler(RandomSampler(data), batch_size, drop_last=False), batch_size=None)


def _cosine(base_lr: float, step: int, steps: int) -> float:
    """CLIP_benchmark's `cosine_lr` without warm-up: the learning rate of `step` out of `steps`."""
    return 0.5 * (1 + np.cos(np.pi * step / steps)) * base_lr


def train_probe(x: torch.Tensor, y: torch.Tensor, n_classes: int, weight_decay: float,
                config: ProbeConfig = ProbeConfig()) -> nn.Linear:
    """One probe: `nn.Linear(D, n_classes)` (default init, seeded) trained by AdamW at `weight_decay` for
    `config.epochs` epochs, the learning rate set before each step by the cosine schedule (CLIP_benchmark's `train`)."""
    x, y = x.float(), torch.as_tensor(y, dtype=torch.long)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        linear = nn.Linear(x.shape[1], n_classes)
        optimizer = torch.optim.AdamW(linear.parameters(), lr=config.lr, weight_decay=weight_decay)
        loader = _epoch_batches(x, y, config.batch_size)
        steps = config.epochs * len(loader)
        for epoch in range(config.epochs):
            for i, (xb, yb) in enumerate(loader):
                for group in optimizer.param_groups:
                    group["lr"] = _cosine(config.lr, i + epoch * len(loader), steps)
                optimizer.zero_grad()
                F.cross_entropy(linear(xb), yb).backward()
                optimizer.step()
    return linear


def choose_weight_decay(train: tuple[torch.Tensor, torch.Tensor], val: tuple[torch.Tensor, torch.Tensor],
                        n_classes: int, config: ProbeConfig = ProbeConfig()) -> tuple[float, dict[float, float]]:
    """The weight decay of `WEIGHT_DECAYS` whose probe, trained on `train` (x, y), scores the best top-1 on
    `val`, found as CLIP_benchmark's `find_peak` sweep finds it; and the validation top-1 of each one tried."""
    tried: dict[int, float] = {}

    def peak(candidates: Sequence[int]) -> int:
        best, best_acc = 0, 0.0  # CLIP_benchmark's `find_peak`: index 0 unless a candidate beats 0 and those before it
        for idx in candidates:
            if idx not in tried:  # a probe is a function of its weight decay: train each once
                linear = train_probe(*train, n_classes, WEIGHT_DECAYS[idx], config)
                with torch.no_grad():
                    tried[idx] = accuracy(linear(val[0].float()), val[1])
                log.debug("weight decay %g: validation top-1 %.4f", WEIGHT_DECAYS[idx], tried[idx])
            if best_acc < tried[idx]:
                best, best_acc = idx, tried[idx]
        return best

    best = peak(COARSE)
    for span in (8, 4, 2, 1):
        best = peak([max(best - span, 0), best, min(best + span, len(WEIGHT_DECAYS) - 1)])
    return WEIGHT_DECAYS[best], {WEIGHT_DECAYS[i]: acc for i, acc in sorted(tried.items())}


def fit_linear_probe(x: torch.Tensor, targets: Targets, n_classes: int, shots: int | None = None,
                     config: ProbeConfig = ProbeConfig()) -> LinearProbe:
    """A probe on the training images `x` [N, D] (`targets` index 0 .. n_classes - 1): the validation split
    (`validation_split`), `shots` per class of the rest (`few_shot_indices`; None: all of it), the weight
    decay chosen on the validation split (`choose_weight_decay`), then the final probe trained at it on
    train + validation (full) or on the k-shot images alone (few-shot)."""
    y = torch.as_tensor(targets, dtype=torch.long)
    if len(y) != len(x) or not len(y):
        raise InputError(f"a linear probe needs training images with one target each; got {len(x)} images and "
                         f"{len(y)} targets")
    part, val = validation_split(len(y), config.val_proportion, config.seed)
    if not val:
        raise InputError(f"{len(y)} training images leave none for the validation split that chooses the weight "
                         f"decay (proportion {config.val_proportion}); add images")
    train = torch.tensor(part)[few_shot_indices(y[part], shots, config.seed, n_classes)]
    wd, searched = choose_weight_decay((x[train], y[train]), (x[val], y[val]), n_classes, config)
    final = train if shots is not None else torch.cat([train, torch.tensor(val)])
    linear = train_probe(x[final], y[final], n_classes, wd, config)
    return LinearProbe(linear, wd, shots, config, searched, n_train=len(final), n_val=len(val))


def probe_metrics(probe: LinearProbe, x: torch.Tensor, targets: Targets) -> dict:
    """CLIP_benchmark's linear-probe metrics of `probe` on test images `x`: lp_acc1, lp_acc5 (None under 5
    classes, `metrics.reported_top_k_accuracy`), lp_mean_per_class_recall, and the run's settings
    (weight_decay, epochs, seed, fewshot_k: -1 for every image, normalized: embeddings are L2-normalised)."""
    scored = classification_metrics(probe.logits(x), targets)
    return {**{f"lp_{key}": value for key, value in scored.items()}, "weight_decay": probe.weight_decay,
            "epochs": probe.config.epochs, "seed": probe.config.seed,
            "fewshot_k": -1 if probe.shots is None else probe.shots, "normalized": True}


def _shots_name(k: int) -> str:
    return "full" if k < 0 else f"{k}-shot"


def format_linear_probe(records: Sequence[dict]) -> str:
    """The table `clipzsl eval --protocol linear-probe` prints: zero-shot (when among the records), then
    each probe, with its top-1, top-5, mean per-class recall and chosen weight decay."""
    first = records[0]
    lines = [f"linear probe: {first['dataset']}, {first['n_classes']} classes, {first['n_test']} test images, "
             f"model {first['model']}",
             f"{'':<20} {'acc1':>8} {'acc5':>8} {'mean recall':>12} {'weight decay':>13} {'train images':>13}"]
    for record in records:
        m, pct = record["metrics"], lambda v: "n/a" if v is None else f"{100 * v:.2f}%"
        if record["task"] == "zeroshot_classification":
            cells, name = (m["acc1"], m["acc5"], m["mean_per_class_recall"]), "zero-shot"
            tail = f"{'-':>13} {'-':>13}"
        else:
            cells, name = (m["lp_acc1"], m["lp_acc5"], m["lp_mean_per_class_recall"]), _shots_name(m["fewshot_k"])
            tail = f"{m['weight_decay']:>13.3g} {record['n_train']:>13}"
        lines.append(f"{name:<20} {pct(cells[0]):>8} {pct(cells[1]):>8} {pct(cells[2]):>12} {tail}")
    return "".join(line + "\n" for line in lines)
