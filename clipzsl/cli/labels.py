"""`clipzsl labels wordnet`: a label file of per-class descriptions from WordNet, with no network."""
from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import InputError
from ..wordnet import write_wordnet_labels
from .options import output_file


def cmd_wordnet(args: argparse.Namespace) -> int:
    """The names (or the label file --from) described from WordNet into --out; the senses chosen reported."""
    if bool(args.names) == bool(args.from_file):
        raise InputError("labels wordnet: give the names (clipzsl labels wordnet tabby airliner --out FILE.json) "
                         "or --from FILE, not both and not neither")
    found = write_wordnet_labels(args.from_file or args.names, args.out, args.skip_unknown, args.wordnet_dir)
    sys.stdout.write(found.describe() + f"wrote {args.out}\n")
    return 0


def register(commands: Any) -> None:
    labels = commands.add_parser("labels", help="write label files")
    kinds = labels.add_subparsers(dest="kind", required=True)
    wordnet = kinds.add_parser(
        "wordnet", help="per-class descriptions from WordNet (its definition and hypernyms), CuPL's JSON format",
        description="Each name's first noun sense in WordNet (Debian's wordnet-base) gives a few descriptions; the "
                    "file is a label file (--labels FILE.json), its descriptions ensembled with the templates.")
    wordnet.add_argument("names", nargs="*", help="class names (a name of several words in quotes)")
    wordnet.add_argument("--from", dest="from_file", metavar="FILE",
                         help="read the names from a label file (one a line; .json/.yaml lists too)")
    wordnet.add_argument("--out", required=True, type=output_file, help="the JSON description file to write")
    wordnet.add_argument("--skip-unknown", action="store_true", help="leave out names WordNet lacks (else an error)")
    wordnet.add_argument("--wordnet-dir", help="WordNet's dictionary folder (default $WNSEARCHDIR, else the system's wordnet-base, else that package fetched into the cache)")
    wordnet.set_defaults(outputs=(("from_file",), ("out",), False), run=cmd_wordnet)
