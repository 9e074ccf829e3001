"""`clipzsl serve`: the HTTP service and its web page (the serve extra)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..images import MAX_PIXELS
from ..prompts import DEFAULT_TEMPLATES
from .options import LABELS_HELP, adapter_directory, add_run_options, labels_argument, non_negative_float, positive_int, run_options


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from ..serve import Limits, app_from_folders, run_service  # the serve extra: fastapi, uvicorn
    except ImportError as err:
        print(f"clipzsl: error: the service needs the serve extra ({err}); pip install 'clipzsl[serve]'", file=sys.stderr)
        return 2
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_labels=args.max_labels,
                    max_templates=args.max_templates, max_pixels=int(args.max_megapixels * 1e6),
                    batch_window_s=args.batch_window_ms / 1000, max_batch=args.max_batch)
    label_sets = {Path(labels).stem: labels_argument(labels) for labels in args.labels or []}
    app = app_from_folders(args.index or [], label_sets, args.model, templates=args.templates, adapter=args.adapter,
                           cache=args.cache_dir or True, limits=limits, **run_options(args))
    run_service(app, args.host, args.port)
    return 0


def register(commands: Any) -> None:
    serve = commands.add_parser("serve", help="HTTP service and web page: search an index, classify uploads")
    serve.add_argument("--index", action="append", metavar="DIR",
                       help="index directory to search (repeatable; named by its folder name)")
    serve.add_argument("--labels", action="append", metavar="NAME_OR_FILE",
                       help="label set clients may name (repeatable; by its file stem): " + LABELS_HELP)
    serve.add_argument("--model", help="model spec (default: the index's own, else packaged)")
    serve.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file, for requests that send none")
    serve.add_argument("--adapter", type=adapter_directory,
                       help="saved adapter directory: /classify scores through it and /explain draws its attention "
                            "by default (without one, /explain draws the model's default heat-map method)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (another exposes the service)")
    serve.add_argument("--port", type=int, default=8000, help="port to listen on")
    serve.add_argument("--max-upload-mb", type=float, default=20, help="largest request body (413 above it)")
    serve.add_argument("--max-labels", type=positive_int, default=1000, help="most labels in one request (422 above)")
    serve.add_argument("--max-templates", type=positive_int, default=100,
                       help="most templates in one request (422 above)")
    serve.add_argument("--max-megapixels", type=non_negative_float, default=MAX_PIXELS / 1e6,
                       help="most pixels an upload may decode to, a JPEG after its reduction to the model's size "
                            "(422 above; refused from the header, before decoding)")
    serve.add_argument("--batch-window-ms", type=float, default=5,
                       help="how long concurrent requests are gathered into one batch")
    serve.add_argument("--max-batch", type=positive_int, default=64, help="most requests in one batch (1: one at a time)")
    serve.add_argument("--cache-dir", help="label cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    add_run_options(serve)
    serve.set_defaults(run=cmd_serve)
