"""Command line: a thin shell over the Python API, one module per group of commands.

Exit status: 0 when everything was classified, 1 when some images could not be
read (they are listed on stderr, the rest are still classified), 2 for bad
arguments or label/template files. `train-adapter` exits 1 when the adapter it saved is
untrained (no epoch beat epoch 0 on validation: it scores exactly as zero-shot; adapter.json
says so in training.untrained).

A command module has a `register(commands)` that adds its sub-parsers; each sub-parser's defaults
name the function that runs it (`run`) and, for commands that write files, `outputs`: (the
arguments naming its inputs, the options naming what it writes, whether those are folders it
writes images into), which `check_outputs` checks before any work.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from typing import Sequence

from .. import __version__
from ..backends import TORCH_PACKAGES
from ..errors import ClipzslError
from ..images import check_output
from . import classify, evaluate, explain, export, index, labels, service, tools
from .options import Parser, notices_to_stderr, show_warning

COMMAND_MODULES = (classify, tools, index, evaluate, explain, service, labels, export)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="clipzsl", description="Zero-shot image classification.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for module in COMMAND_MODULES:
        module.register(commands)
    return parser


def check_outputs(args: argparse.Namespace) -> None:
    """Every command's outputs checked against its inputs (`images.check_output`) before any work."""
    inputs_of, outputs_of, writes_images = getattr(args, "outputs", ((), (), False))
    inputs: list[str] = []
    for name in inputs_of:
        value = getattr(args, name)
        inputs += [value] if isinstance(value, str) else value or []
    for name in outputs_of:
        if getattr(args, name):
            check_output(getattr(args, name), inputs, writes_images)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A `ClipzslError` (the input or a file is wrong; the message says how to fix it)
    or an `OSError` (a missing file, a full disk) is one line and exit status 2, and so is a command that needs
    torch where it is not installed; anything else is a bug, and its traceback is shown."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), notices_to_stderr():
        warnings.showwarning = show_warning
        try:
            check_outputs(args)
            return args.run(args)
        except (ClipzslError, OSError) as err:
            print(f"clipzsl: error: {err}", file=sys.stderr)
            return 2
        except ModuleNotFoundError as err:  # a command that needs torch, where it is not installed
            if (err.name or "").partition(".")[0] not in TORCH_PACKAGES:
                raise
            print(f"clipzsl: error: this command needs torch ({err.name} is not installed here): install clipzsl with "
                  "its dependencies (pip install clipzsl); without torch, onnx: models classify, index and serve",
                  file=sys.stderr)
            return 2
