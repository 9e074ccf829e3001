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
from .prompts import DEFAULT_TEMPLATES, LABEL_SUFFIXES, LABELS_DIR, PromptFileError, available

FORMATS = ("table", "csv", "json")


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
    clf = ZeroShotClassifier(args.model, labels=labels_argument(args.labels), templates=args.templates)
    embedded = clf.embed(args.paths, batch_size=args.batch_size, skip_errors=True, progress=None)
    for failure in embedded.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    predictions = clf.top_k(clf.scores_from_embeddings(embedded.embeddings), args.top_k)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzsl", description="Zero-shot image classification.")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify images against a label set")
    classify.add_argument("paths", nargs="+", help="image files or folders (walked recursively)")
    classify.add_argument("--labels", required=True, help="label file, shipped set name, or a,b,c")
    classify.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    classify.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    classify.add_argument("--top-k", type=int, default=5)
    classify.add_argument("--format", choices=FORMATS, default="table")
    classify.add_argument("--output", help="write results to this file instead of stdout")
    classify.add_argument("--batch-size", type=int, default=32)
    classify.set_defaults(run=cmd_classify)

    models = commands.add_parser("models", help="list model specs and what runs offline")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PromptFileError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"clipzsl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
