"""What the commands share: argument types checked while the arguments are read, the run and engine
options, the parser class, and how notices and warnings reach stderr."""
from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from ..images import NoImagesWarning
from ..prompts import parse_label_list

if TYPE_CHECKING:
    from ..pipeline import Engine

FORMATS = ("table", "csv", "json")

LABELS_HELP = "label file (FILE.json:KEY picks a data set), shipped set name, or a,b,c (one label: a,)"


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def non_negative_float(value: str) -> float:
    number = float(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return number


def output_file(value: str) -> str:
    """A file the results can be written to: checked when the arguments are read, not after the work."""
    path = Path(value)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{value} is a folder; give the path of a file in it")
    if not path.parent.is_dir():
        raise argparse.ArgumentTypeError(f"{value}: folder {path.parent} does not exist; create it first")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise argparse.ArgumentTypeError(f"{value}: no permission to write there")
    return value


def adapter_directory(value: str) -> str:
    """A saved adapter's directory: checked before the model is loaded and the labels encoded."""
    from ..adapter import CONFIG_NAME

    if not (Path(value) / CONFIG_NAME).is_file():
        reason = f"no {CONFIG_NAME} in it" if Path(value).is_dir() else "no such folder"
        raise argparse.ArgumentTypeError(
            f"{value}: {reason}, so not a saved clipzsl adapter (`clipzsl train-adapter --out DIR` makes one)")
    return value


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """--device, --precision, --batch-size, --workers: how a command runs its model. One helper, so
    every command that runs a model offers the same four, with the same defaults."""
    parser.add_argument("--device", default="auto", help="where the model runs: auto (cuda, then mps, then cpu), "
                                                         "cpu, cuda, cuda:N or mps")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast precision of the forward passes (auto: bf16 on CUDA, fp32 elsewhere); "
                             "embeddings are stored as float32 whatever it is")
    parser.add_argument("--batch-size", type=positive_int,
                        help="images per forward pass (default: 32 on the CPU, 64 on mps, 256 on CUDA)")
    parser.add_argument("--workers", type=positive_int,
                        help="image-decoding threads (default: up to 4 on the CPU, every core with a GPU)")


def run_options(args: argparse.Namespace) -> dict:
    """The `add_run_options` choices as `load_model` keyword arguments."""
    return {"device": args.device, "precision": args.precision, "batch_size": args.batch_size,
            "workers": args.workers}


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine and the options of `--engine ray` (clipzsl.distributed)."""
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process; ray: Ray Data (pip install 'clipzsl[ray]')")
    parser.add_argument("--address", help="Ray cluster to run on (auto, ray://HOST:PORT); default: a local Ray "
                                          "runtime started for the run")
    parser.add_argument("--actors", type=positive_int, default=1, help="model actors (--engine ray)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float, default=0, help="GPUs per model actor (--engine ray)")


def engine_of(args: argparse.Namespace) -> Engine:
    """The `add_engine_arguments` and `add_run_options` choices of a command, as a pipeline `Engine`."""
    from ..pipeline import Engine

    return Engine(args.engine, args.batch_size, args.workers, args.address, args.actors, args.gpus_per_actor)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with its default, unless it has none or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """The parser of clipzsl and of each of its commands: every option's help shows its default."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)


def show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                 file=None, line: str | None = None) -> None:
    """A library warning as one `clipzsl: warning:` line, without Python's source-line echo."""
    print(f"clipzsl: warning: {message}", file=sys.stderr)


class NoticeFormatter(logging.Formatter):
    """`clipzsl: message` for notices, `clipzsl: warning: message` for warnings: the command line's style."""

    def format(self, record: logging.LogRecord) -> str:
        level = "" if record.levelno < logging.WARNING else f"{record.levelname.lower()}: "
        return f"clipzsl: {level}{record.getMessage()}"


@contextmanager
def notices_to_stderr() -> Iterator[None]:
    """The library's operational notices (logger "clipzsl", INFO and up) on stderr while a command runs;
    the handler is removed afterwards, so calling `main` again (tests, scripts) adds no second one."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(NoticeFormatter())
    logger = logging.getLogger("clipzsl")
    level, logger.level = logger.level, logging.INFO
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


@contextmanager
def empty_folders() -> Iterator[list[str]]:
    """Collect the folders `expand_sources` found no images in (each is still reported)."""
    found: list[str] = []
    show = warnings.showwarning

    def record(message, category, *args, **kwargs) -> None:
        if isinstance(message, NoImagesWarning):
            found.append(message.folder)
        show(message, category, *args, **kwargs)

    with warnings.catch_warnings():
        warnings.simplefilter("always", NoImagesWarning)
        warnings.showwarning = record
        yield found


def labels_argument(value: str) -> str | list[str]:
    """A comma-separated list of class names (`parse_label_list`); anything without a comma, or an
    existing file, names a label file or set.

    So a typo such as `cifar11` or a missing `my.txt` is an error (load_labels says what it
    tried) instead of a one-class list; a single class name is written `cat,`.
    """
    if os.path.isfile(value):  # never an OSError: a list longer than a file name may be is no file
        return value
    return parse_label_list(value) or value
