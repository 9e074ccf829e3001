"""Command line: a thin shell over the Python API.

Exit status: 0 when everything was classified, 1 when some images could not be
read (they are listed on stderr, the rest are still classified), 2 for bad
arguments or label/template files.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

from . import available_models
from .classifier import ZeroShotClassifier
from .image_index import ImageIndex
from .store import StoreError, cache_root
from .prompts import DEFAULT_TEMPLATES, LABEL_SUFFIXES, LABELS_DIR, PromptFileError, available

FORMATS = ("table", "csv", "json")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def labels_argument(value: str) -> str | list[str]:
    """A label file path or shipped set name stays as is; anything else is a comma-separated list."""
    if Path(value).is_file() or value in available(LABELS_DIR, LABEL_SUFFIXES):
        return value
    return [part.strip() for part in value.split(",") if part.strip()]


def format_predictions(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(
            [{"image": image, "predictions": [{"label": l, "probability": p} for l, p in preds]} for image, preds in rows],
            indent=2,
        ) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "probability"])
        for image, preds in rows:
            writer.writerows([image, rank, label, f"{p:.6f}"] for rank, (label, p) in enumerate(preds, 1))
        return out.getvalue()
    width = max([len("image")] + [len(image) for image, _ in rows])
    lines = [f"{'image':<{width}}  predictions"]
    for image, preds in rows:
        lines.append(f"{image:<{width}}  " + "  ".join(f"{label} ({p:.1%})" for label, p in preds))
    return "\n".join(lines) + "\n"


def cmd_classify(args: argparse.Namespace) -> int:
    cache = False if args.no_cache else (args.cache_dir or True)
    clf = ZeroShotClassifier(
        args.model, labels=labels_argument(args.labels), templates=args.templates, cache=cache, index=args.index
    )
    embedded = clf.embed(args.paths, batch_size=args.batch_size, skip_errors=True, progress=None)
    for failure in embedded.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    predictions = clf.top_k_from_embeddings(embedded.embeddings, args.top_k)
    text = format_predictions(list(zip(embedded.sources, predictions)), args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if embedded.failures:
        print(f"clipzsl: {len(embedded.failures)} of {len(embedded.failures) + len(embedded.sources)} "
              "images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = available_models()
    width = max(len(spec) for spec, _ in rows)
    for spec, status in rows:
        print(f"{spec:<{width}}  {status}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .store import EmbeddingStore

    root = cache_root(args.cache_dir) / "labels"
    stores = sorted(p for p in root.glob("*") if (p / "meta.json").exists()) if root.exists() else []
    if args.action == "clear":
        for directory in stores:
            meta = EmbeddingStore.read_meta(directory)
            EmbeddingStore(directory, meta["fingerprint"], meta["embed_dim"]).clear()
        print(f"cleared {len(stores)} label cache(s) under {root}")
        return 0
    print(f"label cache: {root}")
    for directory in stores:
        meta = EmbeddingStore.read_meta(directory)
        store = EmbeddingStore(directory, meta["fingerprint"], meta["embed_dim"])
        print(f"  {meta.get('spec') or '?'}  {len(store)} labels  {store.size_bytes() / 1e6:.1f} MB  {meta['fingerprint']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    index = ImageIndex(args.out, args.model)
    report = index.update(args.folders, batch_size=args.batch_size)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(f"{args.out}: {len(index)} images ({report.added} added, {report.updated} updated, "
          f"{report.removed} removed, {report.unchanged} unchanged)")
    return 1 if report.failures else 0


def cmd_search(args: argparse.Namespace) -> int:
    rows = ImageIndex(args.index).search(args.query, top_k=args.top_k)
    width = max([len("image")] + [len(path) for path, _ in rows])
    print(f"{'image':<{width}}  similarity")
    for path, similarity in rows:
        print(f"{path:<{width}}  {similarity:.4f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzsl", description="Zero-shot image classification.")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify images against a label set")
    classify.add_argument("paths", nargs="+", help="image files or folders (walked recursively)")
    classify.add_argument("--labels", required=True, help="label file, shipped set name, or a,b,c")
    classify.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    classify.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    classify.add_argument("--top-k", type=positive_int, default=5)
    classify.add_argument("--format", choices=FORMATS, default="table")
    classify.add_argument("--output", help="write results to this file instead of stdout")
    classify.add_argument("--batch-size", type=int, default=32)
    classify.add_argument("--index", default="auto", help="FAISS factory string for the label index (Flat, HNSW32, ...)")
    classify.add_argument("--cache-dir", help="label-embedding cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    classify.add_argument("--no-cache", action="store_true", help="encode every label, store nothing")
    classify.set_defaults(run=cmd_classify)

    cache = commands.add_parser("cache", help="show or clear the label-embedding cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("--cache-dir")
    cache.set_defaults(run=cmd_cache)

    index = commands.add_parser("index", help="embed a folder of images into an index (resumable)")
    index.add_argument("kind", choices=("images",))
    index.add_argument("folders", nargs="+")
    index.add_argument("--out", required=True, help="index directory")
    index.add_argument("--model", default="packaged")
    index.add_argument("--batch-size", type=int, default=32)
    index.set_defaults(run=cmd_index)

    search = commands.add_parser("search", help="the best images of an index for a text query")
    search.add_argument("index")
    search.add_argument("query")
    search.add_argument("--top-k", type=positive_int, default=10)
    search.set_defaults(run=cmd_search)

    models = commands.add_parser("models", help="list model specs and what runs offline")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PromptFileError, StoreError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"clipzsl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
