"""`clipzsl classify`: predictions of every image, on either engine."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..predictions import PREDICTION_FORMATS
from ..prompts import DEFAULT_TEMPLATES
from .options import (LABELS_HELP, adapter_directory, add_engine_arguments, add_run_options, empty_folders, engine_of,
                      labels_argument, output_file, positive_int)


def cmd_classify(args: argparse.Namespace) -> int:
    """`classify`: predictions of every image into --output (or stdout), on either engine (`classify_to_file`)."""
    from ..pipeline import Classification, classify_to_file

    fmt = args.format or ("parquet" if args.output and Path(args.output).suffix == ".parquet" else "table")
    job = Classification(labels_argument(args.labels), args.model, args.templates, args.top_k,
                         cache=False if args.no_cache else (args.cache_dir or True), adapter=args.adapter,
                         device=args.device, precision=args.precision, explain=args.explain, method=args.method,
                         zoom=args.zoom)
    with empty_folders() as empty:
        report = classify_to_file(args.paths, args.output, job, fmt=fmt, resume=args.resume, engine=engine_of(args))
    if not report.images:
        print(f"clipzsl: error: no images to classify in {', '.join(args.paths)}", file=sys.stderr)
        return 1
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    if report.failures:
        print(f"clipzsl: {len(report.failures)} of {len(report.failures) + report.written} images could not be read",
              file=sys.stderr)
    if fmt == "parquet":
        print(f"{args.output}: predictions for {report.written} of {report.written + len(report.failures)} images")
    return 1 if report.failures or empty else 0


def register(commands: Any) -> None:
    classify = commands.add_parser("classify", help="classify images against a label set")
    classify.add_argument("paths", nargs="+", help="image files or folders (walked recursively)")
    classify.add_argument("--labels", required=True, help=LABELS_HELP)
    classify.add_argument("--templates", default=DEFAULT_TEMPLATES,
                          help="template set name, .txt or .json file (FILE.json:KEY picks a data set)")
    classify.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    classify.add_argument("--top-k", type=positive_int, default=5, help="labels shown per image")
    classify.add_argument("--format", choices=PREDICTION_FORMATS,
                          help="output format (default: parquet for --output FILE.parquet, else table); table, csv "
                               "and jsonl (one JSON object per line) are written as images are classified, json and "
                               "parquet (unreadable images included, with their error) at the end (so they cannot "
                               "stream or resume)")
    classify.add_argument("--output", type=output_file, help="write results to this file instead of stdout")
    classify.add_argument("--resume", action="store_true",
                          help="skip the images already in --output (csv or jsonl) and append the rest, e.g. after "
                               "an interrupted run (either engine)")
    classify.add_argument("--cache-dir", help="cache directory: label embeddings, the packaged model's concepts "
                                              "(default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    classify.add_argument("--no-cache", action="store_true",
                          help="write no cache anywhere: encode every label (and the packaged model's concepts) in memory")
    classify.add_argument("--adapter", type=adapter_directory,
                          help="saved adapter directory (from train-adapter) to score through; it must have been "
                               "trained on --model (default: none, plain zero-shot)")
    classify.add_argument("--explain", action="store_true",
                          help="also give, per top label, where its heat map peaks: the box (left, top, right, "
                               "bottom in the image's pixels) and the map's score there (csv: columns left,top,"
                               "right,bottom,peak_score; json/jsonl: box, peak_score; parquet: boxes, peak_scores; "
                               "table: @box). Costs one more forward pass per image; local engine only")
    classify.add_argument("--method", help="heat-map method of --explain (default: the adapter's attention with "
                                           "a cross-attention --adapter, else the model's default; see "
                                           "clipzsl.maps.METHODS)")
    classify.add_argument("--zoom", action="store_true",
                          help="score each image again on crops around its labels' heat-map peaks and average the "
                               "scores (the attention-guided zoom, ZeroShotClassifier.zoomed_predict; what it gains: "
                               "benchmarks/results/zoom.md). "
                               "Costs a heat map per image and the crops of its top labels (at most 5); local engine "
                               "only")
    add_engine_arguments(classify)
    add_run_options(classify)
    classify.set_defaults(outputs=(("paths",), ("output",), False), run=cmd_classify)
