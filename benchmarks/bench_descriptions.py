"""WordNet descriptions against templates: zero-shot accuracy of the packaged model, templates only vs
WordNet descriptions (`clipzsl labels wordnet`) vs both ensembled (CuPL's "+ e").

For each data set of bench_accuracy (its label set, synonyms included, and its class-balanced subset),
three class embeddings from the same images:
- templates: every name and synonym in the default template set (simple_7);
- descriptions: each class's WordNet descriptions alone (a class WordNet lacks keeps its templates);
- both: the templated names and the descriptions in one mean, as CuPL's ensemble does.
WordNet's coverage (classes found) is given with each data set: where it is low, the three differ little.

Usage: python -m benchmarks.bench_descriptions [--quick]
(--quick: at most 60 images and 25 classes per data set; full: at most 300 images per data set, all classes)
"""
from __future__ import annotations

import time

import numpy as np

import clipzsl
from clipzsl.prompts import DEFAULT_TEMPLATES, ClassEntry
from clipzsl.wordnet import wordnet_labels

from . import bench_accuracy, common, datasets, report

NAME = "descriptions"
DATASETS = bench_accuracy.DATASETS
QUICK = {"images": 60, "classes": 25}
FULL = {"images": 300, "classes": None}
CONDITIONS = ("templates", "descriptions", "both")


def class_sets(entries: list[ClassEntry], templates: list[str]) -> tuple[dict[str, list[ClassEntry]], dict]:
    """The class entries of each condition, and WordNet's coverage of the classes."""
    found = wordnet_labels(entries, skip_unknown=True)
    described = {sense.name: tuple(sense.descriptions()) for sense in found.senses}
    both = [ClassEntry(e.name, e.synonyms, described.get(e.name, ())) for e in entries]
    alone = [ClassEntry(e.name, (), described.get(e.name) or tuple(e.texts(templates))) for e in entries]
    ambiguous = sum(sense.senses > 1 for sense in found.senses)
    coverage = {"classes": len(entries), "in_wordnet": len(described), "ambiguous": ambiguous,
                "descriptions_per_class": float(np.mean([len(d) for d in described.values()])) if described else 0.0,
                "example": next(iter(found.descriptions.items()), None)}
    return {"templates": list(entries), "descriptions": alone, "both": both}, coverage


def evaluate(model, name: str, options: dict, sizes: dict) -> dict:
    """One data set: its images embedded once, scored under each condition."""
    ds = datasets.load(name, "test", None, **options)
    bench_accuracy.merge_case_duplicates(ds)
    bench_accuracy.subset(ds, sizes["classes"], sizes["images"])
    embedded = clipzsl.embed_images(model, ds.images, batch_size=32, progress=False)
    labels, source = bench_accuracy.label_set(ds)
    templates = clipzsl.load_templates(DEFAULT_TEMPLATES)
    sets, coverage = class_sets(clipzsl.load_labels(labels), templates)
    truth = np.asarray(ds.labels)
    rows = {}
    for condition in CONDITIONS:
        start = time.perf_counter()
        clf = clipzsl.ZeroShotClassifier(model, labels=sets[condition],
                                         templates=[] if condition == "descriptions" else templates, progress=False)
        rows[condition] = {"build_s": time.perf_counter() - start, **common.metrics(clf.predict_proba(embedded), truth)}
    return {"images": len(ds), "classes": len(ds.classnames), "labels": source, "source": ds.source,
            "chance_top1": 1 / len(ds.classnames), "wordnet": coverage, "conditions": rows}


def markdown(results: dict) -> list[str]:
    lines = [
        f"Model: `{results['model']}` (the packaged default). Templates: `{DEFAULT_TEMPLATES}`. Descriptions: "
        "`clipzsl labels wordnet` (the first noun sense's definition and hypernyms, 4-5 per class). "
        "*descriptions*: the descriptions alone (a class not in WordNet keeps its templates); *both*: the "
        "templated names and the descriptions in one mean (CuPL's ensemble). Same images for all three.",
        "",
        "| data set | images | classes | in WordNet | ambiguous | top-1 % templates | descriptions | both "
        "| mean recall % templates | descriptions | both |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in results["datasets"].items():
        c, w = row["conditions"], row["wordnet"]
        lines.append(f"| {name} | {row['images']} | {row['classes']} | {w['in_wordnet']} | {w['ambiguous']} | "
                     + " | ".join(common.pct(c[k]["top1"]) for k in CONDITIONS) + " | "
                     + " | ".join(common.pct(c[k]["mean_class_recall"]) for k in CONDITIONS) + " |")
    counted = [r for r in results["datasets"].values() if r["images"] >= bench_accuracy.MIN_IMAGES_FOR_MEAN]
    if counted:
        mean = {k: float(np.mean([100 * (r["conditions"][k]["top1"] - r["conditions"]["templates"]["top1"])
                                  for r in counted])) for k in ("descriptions", "both")}
        results["mean_top1_gain_points"] = mean
        lines += ["", f"Mean top-1 change over templates, the {len(counted)} data sets with >= "
                      f"{bench_accuracy.MIN_IMAGES_FOR_MEAN} images: descriptions **{mean['descriptions']:+.1f}** "
                      f"points, both **{mean['both']:+.1f}** points."]
    lines += ["", "Examples and sources:", ""]
    for name, row in results["datasets"].items():
        example = row["wordnet"]["example"]
        shown = f" e.g. {example[0]!r}: {example[1][0]!r}" if example else ""
        lines.append(f"- {name}: {row['source']}; labels: {row['labels']}.{shown}")
    for name, reason in results["skipped"].items():
        lines.append(f"- {name}: **skipped**: {reason}")
    return lines


def run(quick: bool = False) -> dict:
    start, load_before = time.perf_counter(), common.load_average()
    model = clipzsl.load_model(clipzsl.DEFAULT_MODEL)
    sizes = QUICK if quick else FULL
    results: dict = {"model": model.spec, "fingerprint": model.fingerprint, "quick": quick, "sizes": sizes,
                     "datasets": {}, "skipped": {}}
    for name, options in DATASETS.items():
        try:
            row = evaluate(model, name, options, sizes)
        except datasets.DatasetUnavailable as err:
            results["skipped"][name] = str(err)
            continue
        results["datasets"][name] = row
        print(f"descriptions: {name}: " + ", ".join(f"{k} {100 * v['top1']:.1f}"
                                                    for k, v in row["conditions"].items()), flush=True)
    results["wall_s"] = time.perf_counter() - start
    results["load_average"] = {"before": load_before, "after": common.load_average()}
    lines = markdown(results)
    report.write(NAME, results, lines)
    return results


def main(argv: list[str] | None = None) -> None:
    report.main(__doc__, NAME, run, "at most 60 images and 25 classes per data set", argv)


if __name__ == "__main__":
    main()
