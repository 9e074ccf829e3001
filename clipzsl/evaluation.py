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
- linear probe (CLIP_benchmark's linear_probe, `clipzsl.linear_probe`): logistic regression on the
  frozen embeddings of a training split, full and k-shot, weight decay chosen on a validation split;
  scored with zero-shot on the same test images.
- zero-shot retrieval (CLIP_benchmark's zeroshot_retrieval): a captioned collection
  (`clipzsl.captions.CaptionedImages`), each caption finding its image and each image one of its
  captions; recall@1/5/10 both ways (`metrics.retrieval_recalls`).

The methods compared (`METHODS`, `Problem`, `Fitted`) are in `clipzsl.baselines`; the metrics
in `clipzsl.metrics`. What `clipzsl eval` runs, callable from Python:

    split = class_split("data/")                      # or class_split("train/", test="test/")
    results = run_protocols(split, load_model(), methods=["zero-shot", "ours"], seeds=3)
    print(split.summary()); print(format_results(results, "both"))

and `zeroshot_evaluation(ClassFolders.read("data/"), model)` for the CLIP_benchmark-style record,
`retrieval_evaluation(CaptionedImages.read("data/", "captions.csv"), model)` for retrieval's.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
import torch

from .backends import Backend
from .baselines import METHODS, Fitted, Problem
from .captions import CaptionedImages
from .classifier import ZeroShotClassifier
from .errors import InputError
from .head import calibrated_stacking
from .images import EmbeddedImages, ImageLoadError, embed_images, embed_images_cached
from .linear_probe import ProbeConfig, check_shots, fit_linear_probe, probe_metrics
from .metrics import accuracy, classification_metrics, harmonic_mean, per_class_recall, retrieval_recalls
from .prompts import DEFAULT_TEMPLATES, ClassEntry, TemplatesArg, load_prompts
from .store import cache_root
from .text_encoding import class_embeddings, encode_prompts
from .training import ClassFolders, seen_split

__all__ = ["METHODS", "PROTOCOLS", "CaptionedImages", "ClassFolders", "EvalSplit", "Fitted", "Problem",
           "ZeroShotResult", "base_novel_split", "base_to_novel", "calibrated_stacking", "choose_gamma",
           "class_split", "format_record", "format_results", "format_zeroshot", "gzsl", "gzsl_metrics",
           "linear_probe_evaluation", "mean_std", "retrieval_evaluation", "run_protocols", "validation_logits",
           "zeroshot_classification",
           "zeroshot_evaluation"]

log = logging.getLogger(__name__)

#: `run_protocols`' choices: base-to-novel, generalised zero-shot, or both
PROTOCOLS = ("b2n", "gzsl", "both")
Protocol = Literal["b2n", "gzsl", "both"]
Results = dict[str, list[dict]]  # per method, one row per seed: {"seed", "b2n": {...}, "gzsl": {...}}


def base_novel_split(classnames: Sequence[str]) -> tuple[list[int], list[int]]:
    """Class indices sorted by name; first half base, second half novel (CoCoOp)."""
    order = sorted(range(len(classnames)), key=lambda i: (classnames[i].lower(), i))
    half = len(order) // 2
    return sorted(order[:half]), sorted(order[half:])


def gzsl_metrics(logits: torch.Tensor, targets: Sequence[int], seen_mask: torch.Tensor, gamma: float = 0.0) -> dict:
    """Seen / unseen per-class mean accuracy and H; `targets` index the columns of `logits`."""
    target = np.asarray(targets)
    pred = calibrated_stacking(logits, seen_mask, gamma).argmax(1).numpy()
    is_seen = seen_mask.numpy()[target]
    s = per_class_recall(pred[is_seen].tolist(), target[is_seen].tolist()) if is_seen.any() else math.nan
    u = per_class_recall(pred[~is_seen].tolist(), target[~is_seen].tolist()) if (~is_seen).any() else math.nan
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
        idx = np.flatnonzero(np.isin(y, classes)).tolist()
        if side == "novel" and not fitted.scores_novel:
            out[side] = math.nan
            continue
        col = {c: i for i, c in enumerate(classes)}
        logits = fitted.score(test.subset(idx), list(classes))
        out[side] = accuracy(logits, [col[int(c)] for c in y[idx]])
    out["H"] = harmonic_mean(out["base"], out["novel"])
    return out


def gzsl(fitted: Fitted, p: Problem, test: EmbeddedImages, test_targets: Sequence[int], seen: Sequence[int],
         unseen: Sequence[int], seed: int, proxy: Fitted | None = None) -> dict:
    """GZSL over seen ∪ unseen, without and with calibrated stacking (gamma from seen validation, scored by
    `proxy` when `fitted` trained on the validation split too, as a Tip cache of every image does)."""
    classes = sorted(list(seen) + list(unseen))
    col = {c: i for i, c in enumerate(classes)}
    seen_mask = torch.tensor([c in set(seen) for c in classes])
    logits = fitted.score(test, classes)
    y = [col[int(c)] for c in test_targets]
    plain = gzsl_metrics(logits, y, seen_mask, 0.0)
    validation = validation_logits(proxy or fitted, p, seed)
    gamma = choose_gamma(*validation) if validation is not None else 0.0
    calibrated = gzsl_metrics(logits, y, seen_mask, gamma)
    return {"plain": plain, "calibrated": calibrated}


def validation_logits(fitted: Fitted, p: Problem, seed: int) -> tuple[torch.Tensor, list[int], torch.Tensor] | None:
    """(logits, targets, seen mask) of the seen-class validation split (`seen_split` at `seed`) that gamma is
    chosen on: val-base images and the held-out seen classes' images (as "unseen"), scored among both sets
    of classes by `fitted`, which trained on the split's training classes only. None when the split has no
    held-out class or no val-base image."""
    tr, vb, vn, tr_classes, val_classes = seen_split(p.targets, p.seen, seed)
    if not val_classes or not vb:
        return None
    vclasses = sorted(tr_classes + val_classes)
    vcol = {c: i for i, c in enumerate(vclasses)}
    vmask = torch.tensor([c in set(tr_classes) for c in vclasses])
    vidx = vb + vn
    vlogits = fitted.score(p.images.subset(vidx), vclasses)
    return vlogits, [vcol[p.targets[i]] for i in vidx], vmask


def zeroshot_classification(clf: ZeroShotClassifier, paths: Sequence[str], targets: Sequence[int],
                            batch_size: int | None = None) -> tuple[dict, list[ImageLoadError]]:
    """CLIP_benchmark's zero-shot metrics of `clf` on labelled images (`targets` index `clf.labels`).

    acc1, acc5 (None under 5 classes, where it would be 1 by construction, as CLIP_benchmark
    does) and mean_per_class_recall (per-class accuracy). Unreadable images are not scored;
    they come back so the caller can report them and say the metrics leave them out.
    """
    if clf.adapter is not None:
        raise InputError("zeroshot_classification scores the plain zero-shot classifier; this one has an adapter")
    embedded = clf.embed(list(paths), batch_size=batch_size, skip_errors=True)
    target_of = dict(zip(map(str, paths), targets))
    y = [target_of[source] for source in embedded.sources]
    return classification_metrics(clf.logits(embedded), y), embedded.failures


# ------------------------------------------------------------------ `clipzsl eval`: data, protocols, reports


@dataclass(frozen=True)
class EvalSplit:
    """The images and classes of one base-to-novel / GZSL evaluation (`class_split`)."""

    names: list[str]  # class names; targets index them
    train: list[tuple[str, int]]  # (path, target): base-class images only, what the methods train on
    test: list[tuple[str, int]]  # (path, target): every class
    base: list[int]
    novel: list[int]

    def summary(self) -> str:
        """The line `clipzsl eval` opens its report with."""
        return (f"{len(self.names)} classes ({len(self.base)} base, {len(self.novel)} novel), "
                f"{len(self.train)} training images, {len(self.test)} test")


def _shared_classes(data: ClassFolders, test: ClassFolders) -> tuple[list[str], list[tuple[str, int]],
                                                                     list[tuple[str, int]]]:
    """The classes both folders have (sorted), and each folder's images of them."""
    common = sorted(set(data.names) & set(test.names))
    train = [(p, common.index(data.names[y])) for p, y in zip(data.paths, data.targets) if data.names[y] in common]
    tested = [(p, common.index(test.names[y])) for p, y in zip(test.paths, test.targets) if test.names[y] in common]
    return common, train, tested


def _halves(data: ClassFolders) -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
    """Each class's images shuffled (seed 0) and cut in half: the first half trains, the second tests."""
    rng = np.random.default_rng(0)
    train: list[tuple[str, int]] = []
    test: list[tuple[str, int]] = []
    for c in range(len(data.names)):
        idx = rng.permutation([i for i, y in enumerate(data.targets) if y == c]).tolist()
        train += [(data.paths[i], c) for i in idx[: len(idx) // 2]]
        test += [(data.paths[i], c) for i in idx[len(idx) // 2:]]
    return train, test


def class_split(data: str | os.PathLike, test: str | os.PathLike | None = None) -> EvalSplit:
    """The evaluation split of a class-folder data set: with a `test` folder, the classes both share
    (DATA trains, TEST tests); without, half of each class's images (seed 0) on either side. Classes
    are then cut into base and novel halves (`base_novel_split`); only base images train.

    Refused, before any model is loaded: fewer than 4 classes (each half scored among at least 2), or
    a base class without a training image."""
    folders = ClassFolders.read(data)
    names = folders.names
    if test:
        names, train, tested = _shared_classes(folders, ClassFolders.read(test))
    else:
        train, tested = _halves(folders)
    if len(names) < 4:  # base accuracy among one base class is 1.0 whatever the model does
        where = f"{data} and {test} share" if test else f"{data} has"
        raise InputError(f"{where} {len(names)} class sub-folders with images ({names}); eval needs at least 4 "
                         "(half base, half novel, each half scored among at least 2 classes)")
    base, novel = base_novel_split(names)
    base_set = set(base)
    train = [(p, y) for p, y in train if y in base_set]
    untrained = sorted({names[c] for c in base} - {names[y] for _, y in train})
    if untrained:
        raise InputError(f"{data}: base classes {untrained[:5]} have no training image; without --test each "
                         "class is split in half, so it needs at least 2 images")
    return EvalSplit(names, train, tested, base, novel)


def check_methods(methods: Sequence[str]) -> None:
    """Refuse a method `METHODS` does not know, naming those it does."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InputError(f"unknown methods {unknown}; known: {list(METHODS)}")


def _seed_run(fitted: Fitted, problem: Problem, test: EmbeddedImages, split: EvalSplit, protocol: Protocol,
              seed: int) -> dict:
    """One method's scores at one seed: {"seed", "b2n"?, "gzsl"?}."""
    targets = [y for _, y in split.test]
    run: dict = {"seed": seed}
    if protocol in ("b2n", "both"):
        run["b2n"] = base_to_novel(fitted, test, targets, split.base, split.novel)
    if protocol in ("gzsl", "both"):
        run["gzsl"] = gzsl(fitted, problem, test, targets, split.base, split.novel, seed)
    return run


def run_protocols(split: EvalSplit, model: Backend, *, methods: Sequence[str] = tuple(METHODS), seeds: int = 3,
                  protocol: Protocol = "both", templates: TemplatesArg = DEFAULT_TEMPLATES,
                  cache_dir: str | os.PathLike | None = None, progress: bool | None = True) -> Results:
    """`clipzsl eval`: each method of `METHODS` fitted on the base-class training images at seeds 0 ..
    `seeds` - 1, and scored by the base-to-novel and/or GZSL protocol on the test images.

    Returns {method: [{"seed": s, "b2n": {base, novel, H}, "gzsl": {plain, calibrated}}, ...]}, what
    `eval --output` writes as JSON. Image features are cached under `cache_dir` (None: the default folder)."""
    check_methods(methods)
    if protocol not in PROTOCOLS:
        raise InputError(f"unknown protocol {protocol!r}; known: {list(PROTOCOLS)}")
    text = class_embeddings(model, *load_prompts([ClassEntry(n) for n in split.names], templates))
    root = cache_root(cache_dir)
    train_images = embed_images_cached(model, [p for p, _ in split.train], root, progress=progress)
    test_images = embed_images_cached(model, [p for p, _ in split.test], root, progress=progress)
    problem = Problem(train_images, [y for _, y in split.train], text, split.base, model.logit_scale, model.logit_bias)
    return {m: [_seed_run(METHODS[m](problem, seed=seed), problem, test_images, split, protocol, seed)
                for seed in range(seeds)] for m in methods}


def mean_std(values: Iterable[float]) -> tuple[float, float] | None:
    """Mean and (population) standard deviation over seeds, NaN runs left out; None when none is left."""
    kept = [v for v in values if not math.isnan(v)]
    if not kept:
        return None
    mean = sum(kept) / len(kept)
    return mean, (sum((v - mean) ** 2 for v in kept) / len(kept)) ** 0.5


def _cell(values: Iterable[float]) -> str:
    """`mean ± std` in percent, or n/a."""
    summary = mean_std(values)
    return "n/a" if summary is None else f"{100 * summary[0]:.1f} ± {100 * summary[1]:.1f}"


def format_results(results: Results, protocol: Protocol = "both") -> str:
    """The tables `clipzsl eval` prints: per method, mean ± std over seeds of base / novel / H
    (base-to-novel) and seen / unseen / H without and with calibrated stacking (GZSL)."""
    lines = []
    if protocol in ("b2n", "both"):
        lines.append("base-to-novel        Base           Novel          H")
        lines += [f"{m:<20} " + "  ".join(f"{_cell([r['b2n'][k] for r in runs]):<13}" for k in ("base", "novel", "H"))
                  for m, runs in results.items()]
    if protocol in ("gzsl", "both"):
        lines.append("GZSL                 Seen           Unseen         H              | calibrated stacking: Seen, "
                     "Unseen, H")
        lines += [f"{m:<20} " + "  ".join(f"{_cell([r['gzsl'][v][k] for r in runs]):<13}"
                                          for v in ("plain", "calibrated") for k in ("seen", "unseen", "H"))
                  for m, runs in results.items()]
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------ `clipzsl eval --protocol zeroshot`


@dataclass(frozen=True)
class ZeroShotResult:
    """`zeroshot_evaluation`'s outcome: the record and the images that could not be read (left out of it)."""

    record: dict  # CLIP_benchmark-style: dataset, model, pretrained, task, metrics, ..., n_images, n_unreadable
    failures: list[ImageLoadError]


def _loaded_classifier(path: str | os.PathLike, model: Backend, data: ClassFolders, templates: list[str],
                       templates_given: TemplatesArg) -> ZeroShotClassifier:
    """A classifier saved by `zeroshot_evaluation(save_classifier=...)`, refused unless it has the classes
    of `data` in their order and the `templates` (as `templates_given` names them)."""
    clf = ZeroShotClassifier.load(path, model)
    if clf.labels != data.names:
        missing = [n for n in data.names if n not in clf.labels]
        extra = [n for n in clf.labels if n not in data.names]
        detail = (f"classes of {data.root} not in it: {missing[:5]}; classes in it not in {data.root}: {extra[:5]}"
                  if missing or extra else "the same classes in another order")
        raise InputError(f"{path}: built for other classes than the folders of {data.root} ({detail}); build it "
                         "again with --save-classifier")
    if clf.templates != templates:
        raise InputError(f"{path}: built with other templates than --templates {templates_given!r}; pass the "
                         "templates it was built with, or build it again with --save-classifier")
    return clf


def zeroshot_evaluation(data: ClassFolders, model: Backend, *, templates: TemplatesArg = DEFAULT_TEMPLATES,
                        load_classifier: str | os.PathLike | None = None,
                        save_classifier: str | os.PathLike | None = None,
                        cache_dir: str | os.PathLike | None = None, batch_size: int | None = None) -> ZeroShotResult:
    """`clipzsl eval --protocol zeroshot`: every image of `data` scored among all its classes, no
    training; a CLIP_benchmark-style record (`zeroshot_classification`'s metrics).

    `load_classifier`: class embeddings saved by an earlier `save_classifier` (same model, classes and
    templates; no text is encoded). Label embeddings are cached under `cache_dir` (None: the default
    folder). Unreadable images are logged and left out (`failures`); none readable: `n_images` is 0."""
    entries, template_list = load_prompts([ClassEntry(n) for n in data.names], templates)  # or CuPL descriptions
    if load_classifier:
        clf = _loaded_classifier(load_classifier, model, data, template_list, templates)
    else:
        clf = ZeroShotClassifier(model, labels=entries, templates=template_list, cache=cache_dir or True)
    if save_classifier:
        clf.save(save_classifier)
    metrics, failures = zeroshot_classification(clf, data.paths, data.targets, batch_size=batch_size)
    _log_failures(failures, len(data.paths), "")
    scored = len(data.paths) - len(failures)
    record = {
        "dataset": data.root,
        "model": model.spec,
        "pretrained": model.fingerprint,  # a spec names architecture and weights together; this is the weights
        "task": "zeroshot_classification",
        "metrics": metrics,
        "language": "en",
        "templates": clf.templates,
        "n_classes": len(data.names),
        "n_images": scored,
        "n_unreadable": len(failures),
    }
    return ZeroShotResult(record, failures)


def format_zeroshot(record: dict) -> str:
    """The report `clipzsl eval --protocol zeroshot` prints for a `zeroshot_evaluation` record."""
    lines = [f"zero-shot classification: {record['dataset']}, {record['n_classes']} classes, "
             f"{record['n_images']} images, model {record['model']}"]
    lines += [f"{key:<22} {'n/a (fewer than 5 classes)' if value is None else f'{100 * value:.2f}%'}"
              for key, value in record["metrics"].items()]
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------ `clipzsl eval --protocol retrieval`


def _log_failures(failures: Sequence[ImageLoadError], total: int, what: str) -> None:
    """Each unreadable image, then how many the metrics leave out."""
    for failure in failures:
        log.info("skipped %s", failure)
    if failures:
        log.info("%d of %d images could not be read; the metrics are over the other %d%s", len(failures), total,
                 total - len(failures), what)


def retrieval_evaluation(data: CaptionedImages, model: Backend, *, batch_size: int | None = None) -> dict:
    """`clipzsl eval --protocol retrieval`: CLIP_benchmark's zeroshot_retrieval record of `model` on a
    captioned collection (`CaptionedImages.read`): `metrics.retrieval_recalls` of every caption against
    every image, recall@1/5/10 of image retrieval (caption -> image) and text retrieval (image -> caption).

    Unreadable images are logged and left out with their captions (`n_unreadable` counts them; none
    readable: `n_images` is 0 and no metric is computed)."""
    embedded = embed_images(model, data.paths, batch_size=batch_size, skip_errors=True)
    _log_failures(embedded.failures, len(data.paths), " and their captions")
    kept = data.subset(embedded.sources)
    texts = encode_prompts(model, kept.texts) if kept.paths else torch.empty(0, model.embed_dim)
    return {
        "dataset": data.root,
        "model": model.spec,
        "pretrained": model.fingerprint,
        "task": "zeroshot_retrieval",
        "metrics": retrieval_recalls(texts @ embedded.embeddings.T, kept.text_image),
        "language": "en",
        "n_images": len(kept.paths),
        "n_captions": len(kept.text_image),
        "n_unreadable": len(embedded.failures),
    }


def format_record(record: dict) -> str:
    """The report `clipzsl eval --protocol zeroshot` or `retrieval` prints for its record."""
    if record["task"] == "zeroshot_classification":
        return format_zeroshot(record)
    lines = [f"zero-shot retrieval: {record['dataset']}, {record['n_images']} images, {record['n_captions']} "
             f"captions, model {record['model']}"]
    lines += [f"{key:<28} {'n/a (fewer candidates than k)' if value is None else f'{100 * value:.2f}%'}"
              for key, value in record["metrics"].items()]
    return "".join(line + "\n" for line in lines)


# ------------------------------------------------------------------ `clipzsl eval --protocol linear-probe`


def linear_probe_evaluation(data: ClassFolders, model: Backend, *, test: ClassFolders | None = None,
                            shots: Sequence[int | None] = (None,), config: ProbeConfig = ProbeConfig(),
                            templates: TemplatesArg = DEFAULT_TEMPLATES, cache_dir: str | os.PathLike | None = None,
                            progress: bool | None = True) -> list[dict]:
    """`clipzsl eval --protocol linear-probe`: CLIP_benchmark-style records of zero-shot and of a linear probe
    per entry of `shots` (None: every training image; k: k per class), all on the same test images.

    DATA trains and `test` tests (the classes both have); without `test`, half of each class's images
    (seed 0) on either side, as the base-to-novel split cuts them. The probe (`fit_linear_probe`) chooses
    its weight decay on a validation split of the training images. Shots some class cannot give are refused
    before anything is embedded; image features (cached under `cache_dir`) and label embeddings are shared
    with the other protocols. Returns [zero-shot record, probe record per shots]."""
    names, train, tested = _shared_classes(data, test) if test else (data.names, *_halves(data))
    targets, test_targets = [y for _, y in train], [y for _, y in tested]
    check_shots(targets, shots, config, names)
    x = embed_images_cached(model, [p for p, _ in train], cache_root(cache_dir), progress=progress)
    x_test = embed_images_cached(model, [p for p, _ in tested], cache_root(cache_dir), progress=progress)
    clf = ZeroShotClassifier(model, labels=[ClassEntry(n) for n in names], templates=templates, cache=cache_dir or True)
    common = {"dataset": data.root, "model": model.spec, "pretrained": model.fingerprint, "language": "en",
              "n_classes": len(names), "n_test": len(tested)}
    records = [{**common, "task": "zeroshot_classification", "templates": clf.templates,
                "metrics": classification_metrics(clf.logits(x_test), test_targets)}]
    for k in shots:
        probe = fit_linear_probe(x.embeddings, targets, len(names), k, config)
        metrics = probe_metrics(probe, x_test.embeddings, test_targets)
        records.append({**common, "task": "linear_probe", "metrics": metrics, **probe.settings()})
    return records
