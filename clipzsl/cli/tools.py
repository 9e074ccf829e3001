"""`clipzsl models` and `cache`: what runs offline, and what is cached."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..backends import available_models
from ..cache import cache_info, clear_cache


def cmd_models(args: argparse.Namespace) -> int:
    rows = available_models()
    width = max(len(spec) for spec, _ in rows)
    for spec, status in rows:
        print(f"{spec:<{width}}  {status}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """Every cache under the cache directory (`clipzsl.cache`): listed, or cleared."""
    if args.action == "clear":
        print(clear_cache(args.cache_dir).describe())
    else:
        sys.stdout.write(cache_info(args.cache_dir).describe())
    return 0


def register(commands: Any) -> None:
    models = commands.add_parser("models", help="list model specs and what runs offline")
    models.set_defaults(run=cmd_models)

    cache = commands.add_parser("cache", help="show or clear the caches (labels, packaged concepts, image features)")
    cache.add_argument("action", choices=("info", "clear"),
                       help="info: list what is cached; clear: delete it all (only from a folder clipzsl made)")
    cache.add_argument("--cache-dir", help="cache directory (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    cache.set_defaults(run=cmd_cache)
