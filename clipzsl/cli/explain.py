"""`clipzsl explain`: heat-map pictures of where each label looks."""
from __future__ import annotations

import argparse
from typing import Any

from ..backends import load_model
from .options import LABELS_HELP, add_run_options, labels_argument, run_options


def cmd_explain(args: argparse.Namespace) -> int:
    from ..explain import explain

    model = load_model(args.model, **run_options(args))
    done = explain(model, args.images, labels_argument(args.labels), args.out, adapter=args.adapter,
                   templates=args.templates, method=args.method)
    for path in done.written:
        print(path)
    return 1 if done.failures else 0


def register(commands: Any) -> None:
    explain = commands.add_parser("explain", help="heatmap PNGs: adapter attention or patch-text similarity")
    explain.add_argument("images", nargs="+", help="image files or folders")
    explain.add_argument("--labels", required=True, help=LABELS_HELP)
    explain.add_argument("--adapter", help="saved adapter directory (default: patch-to-text similarity)")
    explain.add_argument("--out", default="explain", help="output directory")
    explain.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    explain.add_argument("--templates", help="template set (default: the adapter's, else the default)")
    explain.add_argument("--method", help="heat-map method (default: the adapter's attention with --adapter, else "
                                          "the model's default; see clipzsl.maps.METHODS)")
    add_run_options(explain)
    explain.set_defaults(outputs=(("images",), ("out",), True), run=cmd_explain)
