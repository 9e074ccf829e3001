"""Command line: a thin shell over the Python API.

Exit status: 0 when everything was classified, 1 when some images could not be
read (they are listed on stderr, the rest are still classified), 2 for bad
arguments or label/template files. `train-adapter` exits 1 when the adapter it saved is
untrained (no epoch beat epoch 0 on validation: it scores exactly as zero-shot; adapter.json
says so in training.untrained).
"""
from __future__ import annotations

import argparse
import csv
import functools
import io
import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator, Literal, Sequence

from tqdm.auto import tqdm

from . import __version__
from . import distributed
from . import evaluation as ev
from .adapter import CONFIG_NAME
from .backends import available_models, load_model
from .cache import cache_info, clear_cache
from .classifier import ZeroShotClassifier
from .errors import InputError
from .explain import explain
from .image_index import ImageIndex, format_hits
from .images import (MAX_PIXELS, ImageLoadError, NoImagesWarning, check_output, each_image_once, expand_sources,
                     image_key)
from .prompts import DEFAULT_TEMPLATES, ClassEntry, PromptFileError, load_labels, load_templates, parse_label_list
from .records import RecordError, canonical, dumps, load
from .shards import ShardReport, index_from_shards, write_shards
from .store import StoreError, atomic_write, digest
from .training import ClassFolders, adapter_grid, describe_training, train_adapter_from_folder, training_set

FORMATS = ("table", "csv", "json")
#: `classify` also writes JSON lines; these two formats can be resumed
CLASSIFY_FORMATS = FORMATS + ("jsonl",)
RESUMABLE = ("csv", "jsonl")
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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Ends an option's help with its default, unless it has none or the help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


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


def format_predictions(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(
            [{"image": image, "predictions": [{"label": l, "probability": p} for l, p in preds]} for image, preds in rows],
            indent=2,
        ) + "\n"
    width = max([len("image")] + [len(image) for image, _ in rows])
    return prediction_header(fmt, width) + prediction_rows(rows, fmt, width)


def prediction_header(fmt: str, width: int) -> str:
    """The first line of a table or CSV output (none for JSON lines); `width`: the table's image column."""
    if fmt == "csv":
        return "image,rank,label,probability\n"
    return f"{'image':<{width}}  predictions\n" if fmt == "table" else ""


def prediction_rows(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str, width: int) -> str:
    """Rows of a table, CSV or JSON-lines output, one image (CSV: one label) per line, so they can be
    written as they are computed."""
    if fmt == "jsonl":
        return "".join(json.dumps({"image": image, "predictions": [{"label": l, "probability": p} for l, p in preds]})
                       + "\n" for image, preds in rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        for image, preds in rows:
            writer.writerows([image, rank, label, f"{p:.6f}"] for rank, (label, p) in enumerate(preds, 1))
        return out.getvalue()
    return "".join(f"{image:<{width}}  " + "  ".join(f"{label} ({p:.1%})" for label, p in preds) + "\n"
                   for image, preds in rows)


def drop_incomplete_line(path: Path) -> None:
    """Cut a last line without its newline (what a run killed mid-write may leave), with a warning."""
    with open(path, "rb+") as f:
        size = end = f.seek(0, os.SEEK_END)
        while end > 0:
            step = min(end, 1 << 16)
            f.seek(end - step)
            newline = f.read(step).rfind(b"\n")
            if newline >= 0:
                end = end - step + newline + 1
                break
            end -= step
        if end < size:
            f.truncate(end)
            print(f"clipzsl: warning: {path}: dropped an incomplete last line (left by an interrupted run)",
                  file=sys.stderr)


def classified_images(path: Path, fmt: str, top_k: int) -> set[str]:
    """The images an earlier `classify --output PATH --format csv|jsonl` run wrote completely. A torn
    last line is cut off, and so are the CSV rows of a last image with fewer ranks than the images
    before it (or than `top_k` when it is the only one): that image is classified again."""
    if not path.exists():
        return set()
    drop_incomplete_line(path)
    done: set[str] = set()
    with open(path, "rb") as f:
        if fmt == "jsonl":
            for number, line in enumerate(f, 1):
                try:
                    done.add(json.loads(line)["image"])
                except (ValueError, KeyError, TypeError) as err:
                    raise ValueError(f"{path}:{number}: not a classify JSON-lines row ({err}); give the --format it "
                                     "was written in, or another --output") from err
            return done
        offset, last_start, counts = 0, 0, []
        for number, line in enumerate(f, 1):
            row = next(csv.reader([line.decode("utf-8")]), [])
            if row != ["image", "rank", "label", "probability"] if number == 1 else (
                    len(row) != 4 or not row[1].isdigit() or not (counts or row[1] == "1")):
                raise ValueError(f"{path}:{number}: not a classify CSV row (image,rank,label,probability); give the "
                                 "--format it was written in, or another --output")
            if number > 1 and row[1] == "1":
                last_start = offset
                counts.append(0)
                done.add(row[0])
            if number > 1:
                counts[-1] += 1
            offset += len(line)
    if counts and counts[-1] < (max(counts[:-1]) if len(counts) > 1 else top_k):
        os.truncate(path, last_start)
        done.discard(row[0])
    return done


#: images embedded and scored at once by `classify`, in batches: rows are written (and
#: flushed to disk) per chunk, so a killed run loses at most one chunk and memory is bounded
CLASSIFY_CHUNK_BATCHES = 8
#: next to `classify --output FILE`: FILE + this, the settings its rows were computed with
SETTINGS_SUFFIX = ".clipzsl.json"


@dataclass(frozen=True)
class ClassifySettings:
    """What the rows of a `classify --output` file depend on: `--resume` appends only under the same ones.
    The schema of OUTPUT.clipzsl.json (sealed: read through `clipzsl.records`)."""

    model: str  # the spec given (said in messages); the weights are `fingerprint`
    fingerprint: str
    labels: int
    labels_sha256: str  # of the normalised label entries (names, synonyms, prompts)
    templates: int
    templates_sha256: str
    top_k: int
    format: Literal["table", "csv", "json", "jsonl"]
    base: str  # the folder relative image paths in the output are relative to
    record_sha256: str = ""


def settings_path(output: str) -> Path:
    return Path(output + SETTINGS_SUFFIX)


def classify_settings(args: argparse.Namespace, entries: Sequence[ClassEntry], templates: Sequence[str]) -> ClassifySettings:
    """This run's settings; the model's weights (`fingerprint`) are filled in once it is loaded."""
    entries_text = canonical([asdict(e) for e in entries]).decode()
    return ClassifySettings(args.model, "", len(entries), digest(entries_text, 64), len(templates),
                            digest(canonical(list(templates)).decode(), 64), args.top_k, args.format, os.getcwd())


#: the settings `--resume` compares, and the option that sets each
RESUME_FLAGS = {"labels": "--labels", "templates": "--templates", "top_k": "--top-k", "format": "--format",
                "fingerprint": "--model"}


def saved_settings(args: argparse.Namespace) -> ClassifySettings | None:
    """The settings a non-empty --output was written with (None: no rows to resume from); an output
    without them, or with damaged or edited ones, is refused: resuming it could mix two runs."""
    output, path = Path(args.output), settings_path(args.output)
    if not output.is_file() or not output.stat().st_size:
        return None
    again = f"run without --resume to write {output} again, or give another --output"
    try:
        return load(ClassifySettings, path)
    except FileNotFoundError:
        raise ValueError(f"{output}: no {path.name} next to it saying which model, labels, templates and --top-k its "
                         f"rows were computed with (written by an older clipzsl?), so --resume could mix two runs in "
                         f"it; {again}") from None
    except RecordError as err:
        raise ValueError(f"{err}; {again}") from err


def check_settings(output: str, saved: ClassifySettings, wanted: ClassifySettings, fields: Sequence[str]) -> None:
    """Refuse to append rows computed with other settings than the output's (the first that differs is named)."""
    def describe(settings: ClassifySettings, field: str) -> str:
        if field in ("labels", "templates"):
            return f"{getattr(settings, field)} {field} (sha256 {getattr(settings, field + '_sha256')[:12]})"
        return f"{settings.model} (weights {settings.fingerprint})" if field == "fingerprint" else \
            str(getattr(settings, field))

    for field in fields:  # a model is its weights: the same ones under another spec are the same model
        if describe(saved, field) != describe(replace(wanted, model=saved.model), field):
            flag = RESUME_FLAGS[field]
            raise ValueError(f"{output}: written with {flag} giving {describe(saved, field)}, but this run has "
                             f"{describe(wanted, field)}; resuming would mix the two in one file: rerun with the {flag} "
                             "it was written with, run without --resume to write it again, or give another --output")


def cmd_classify(args: argparse.Namespace) -> int:
    if args.resume and (not args.output or args.format not in RESUMABLE or args.engine == "ray"):
        raise ValueError("--resume needs --output FILE and --format csv or jsonl (it reads the images already in FILE), "
                         "and the default --engine")
    if args.engine == "ray":
        return cmd_classify_ray(args)
    with empty_folders() as empty:  # before the model loads: a wrong path costs nothing
        sources = list(each_image_once(expand_sources(args.paths), str))
    if not sources:
        print(f"clipzsl: error: no images to classify in {', '.join(args.paths)}", file=sys.stderr)
        return 1
    with warnings.catch_warnings():  # read again, with its warnings, by the classifier (if it has work)
        warnings.simplefilter("ignore")
        entries, templates = load_labels(labels_argument(args.labels)), load_templates(args.templates)
    wanted = classify_settings(args, entries, templates)
    saved = saved_settings(args) if args.resume else None
    done: set[str] = set()
    if saved is not None:  # checked before the output is read (and a torn last line cut off)
        check_settings(args.output, saved, wanted, ("labels", "templates", "top_k", "format"))
        done = {image_key(name, saved.base) for name in classified_images(Path(args.output), args.format, args.top_k)}
    todo = [s for s in sources if image_key(s) not in done]
    # --no-cache: False all the way down, so neither the labels nor the model write anything
    cache = False if args.no_cache else (args.cache_dir or True)
    if todo or saved.model != args.model:  # nothing to add with the same --model: no need to load it
        model = load_model(args.model, args.device, args.precision, cache=cache)
        wanted = replace(wanted, fingerprint=model.fingerprint)
        if saved is not None:
            check_settings(args.output, saved, wanted, ("fingerprint",))
    if not todo:
        print(f"clipzsl: all {len(sources)} images are already in {args.output}; nothing to do", file=sys.stderr)
        return 1 if empty else 0
    if done:
        print(f"clipzsl: resuming: {len(sources) - len(todo)} of {len(sources)} images already in {args.output}, "
              f"classifying the remaining {len(todo)}", file=sys.stderr)
    clf = ZeroShotClassifier(model, labels=labels_argument(args.labels), templates=args.templates, cache=cache,
                             adapter=args.adapter)
    width = max([len("image")] + [len(s) for s in todo])
    fresh = not (args.resume and Path(args.output).is_file() and os.path.getsize(args.output))  # else: has its header
    out = None if args.output else sys.stdout  # a file is opened with the first row: all unreadable, untouched
    failures, written, document = [], 0, []
    chunk = (args.batch_size or clf.model.batch_size) * CLASSIFY_CHUNK_BATCHES
    record = dumps(wanted)
    try:
        with tqdm(total=len(todo), unit="img", desc="images", disable=None if len(todo) > 64 else True) as bar:
            for start in range(0, len(todo), chunk):
                embedded = clf.embed(todo[start : start + chunk], batch_size=args.batch_size, workers=args.workers,
                                     skip_errors=True, progress=False)
                for failure in embedded.failures:
                    print(f"clipzsl: skipped {failure}", file=sys.stderr)
                failures += embedded.failures
                bar.update(len(embedded) + len(embedded.failures))
                if not embedded.sources:
                    continue
                rows = list(zip(embedded.sources, clf.predict(embedded, args.top_k)))
                written += len(rows)
                if args.format == "json":  # one document: written whole at the end
                    document += rows
                    continue
                if out is None:
                    if fresh:  # the settings, before the first row: what a later --resume checks
                        atomic_write(settings_path(args.output), lambda f: f.write(record))
                    out = open(args.output, "a" if args.resume else "w", encoding="utf-8", newline="")
                if fresh:  # the header just before the first row: all unreadable writes nothing
                    out.write(prediction_header(args.format, width))
                    fresh = False
                out.write(prediction_rows(rows, args.format, width))
                out.flush()
                if args.output:
                    os.fsync(out.fileno())  # durable: a killed run keeps every completed row
        if document:
            if args.output:
                atomic_write(settings_path(args.output), lambda f: f.write(record))
            out = out or open(args.output, "w", encoding="utf-8")
            out.write(format_predictions(document, "json"))
    finally:
        if args.output and out is not None:
            out.close()
    if failures:
        print(f"clipzsl: {len(failures)} of {len(failures) + written} images could not be read", file=sys.stderr)
    return 1 if failures or empty else 0


def cmd_classify_ray(args: argparse.Namespace) -> int:
    """`classify --engine ray`: predictions (and unreadable images, as rows) into a parquet file."""
    distributed.require_ray()
    if not args.output or Path(args.output).suffix != ".parquet":
        raise ValueError("--engine ray writes parquet predictions: give --output FILE.parquet")
    if args.adapter:
        raise ValueError("--adapter is not supported with --engine ray; classify with the default engine")
    if Path(args.output).exists():
        raise ValueError(f"{args.output}: exists; --engine ray does not overwrite predictions: delete it or choose "
                         "another --output")
    cache = False if args.no_cache else (args.cache_dir or True)
    paths = distributed.image_paths(args.paths)
    with distributed.ray_runtime(args.address):
        ds = distributed.classify_dataset(
            distributed.paths_dataset(paths), labels=labels_argument(args.labels), templates=args.templates,
            top_k=args.top_k, model=args.model, batch_size=args.batch_size, concurrency=args.actors,
            num_gpus=args.gpus_per_actor, cache=cache)
        failures = distributed.write_predictions(ds, args.output)
    for failure in failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(f"{args.output}: predictions for {len(paths) - len(failures)} of {len(paths)} images")
    return 1 if failures else 0


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


def cmd_index(args: argparse.Namespace) -> int:
    run = {"info": index_info, "repair": index_repair, "from-shards": index_shards}.get(args.kind, index_update)
    return run(args)


def index_info(args: argparse.Namespace) -> int:
    """`index info DIR`: size, model, FAISS factory and measured recall of an index."""
    print(existing_index(args).info().text(args.folders[0]))
    return 0


def index_repair(args: argparse.Namespace) -> int:
    """`index repair DIR`: set damaged segments aside and re-embed their images; 1 when some are lost."""
    index = existing_index(args)
    report = index.repair(batch_size=args.batch_size, workers=args.workers)
    for line in report.damaged:
        print(f"set aside damaged segment {line}")
    for path in report.unrecoverable:
        print(f"clipzsl: lost {path} (file gone or unreadable)", file=sys.stderr)
    print(report.summary(args.folders[0], len(index)))
    return 1 if report.unrecoverable else 0


def existing_index(args: argparse.Namespace) -> ImageIndex:
    """The one index directory `index info` and `index repair` take, opened."""
    if len(args.folders) != 1:
        raise InputError(f"`clipzsl index {args.kind}` takes one index directory, got {len(args.folders)}")
    return ImageIndex(args.folders[0], args.model, device=args.device, precision=args.precision)


def index_output(args: argparse.Namespace) -> str:
    """The --out INDEX_DIR that building an index needs."""
    if not args.out:
        raise InputError(f"`clipzsl index {args.kind}` needs --out INDEX_DIR")
    return args.out


def index_shards(args: argparse.Namespace) -> int:
    """`index from-shards DIR --out INDEX --model SPEC`: an index of the rows `clipzsl embed` wrote."""
    out = index_output(args)
    if len(args.folders) != 1 or not args.model:
        raise InputError("`clipzsl index from-shards DIR --out INDEX --model SPEC`: one shard directory, and the "
                         "model that embedded the shards")
    index = index_from_shards(args.folders[0], out, args.model, args.faiss_factory, args.dtype)
    print(f"{out}: {len(index)} images from {args.folders[0]} "
          f"(faiss factory {index.saved_index.state().get('factory', 'Flat')})")
    return 0


def index_update(args: argparse.Namespace) -> int:
    """`index FOLDER... --out INDEX`: embed new and changed images, forget deleted ones; 1 when some were
    skipped or a folder had no images."""
    index = ImageIndex(index_output(args), args.model or "packaged", dtype=args.dtype, device=args.device,
                       precision=args.precision)
    with empty_folders() as empty:
        report = index.update(args.folders, batch_size=args.batch_size, factory=args.faiss_factory,
                              workers=args.workers, prune=args.prune)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(report.summary(args.out, len(index)))
    return 1 if report.failures or empty else 0


def cmd_embed(args: argparse.Namespace) -> int:
    if args.engine == "ray":
        return cmd_embed_ray(args)
    report = write_shards(load_model(args.model, **run_options(args)), args.paths, args.out, shard_size=args.shard_size,
                          batch_size=args.batch_size)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(f"{args.out}: {report.rows} embeddings in {len(report.shards)} shard(s) (img_emb/, metadata/)")
    return 1 if report.failures else 0


def cmd_embed_ray(args: argparse.Namespace) -> int:
    """`embed --engine ray`: shards written as the cluster delivers them; a rerun resumes the same run."""
    distributed.require_ray()  # before the model loads
    paths = distributed.image_paths(args.paths)
    model = load_model(args.model, **run_options(args))
    state = distributed.resume_state(args.out, distributed.run_identity(model, paths, args.shard_size))
    seen = state.done | {path for path, _ in state.failures}
    remaining = [path for path in paths if path not in seen]
    if state.complete or not remaining:
        print(f"{args.out}: already complete ({state.rows} embeddings in {len(state.shards)} shard(s))")
        report = ShardReport(state.rows, state.shards, [ImageLoadError(p, r) for p, r in state.failures])
    else:
        if seen:
            print(f"{args.out}: resuming: {len(seen)} of {len(paths)} images already done", file=sys.stderr)
        with distributed.ray_runtime(args.address):
            ds = distributed.embed_dataset(distributed.paths_dataset(remaining), model, batch_size=args.batch_size,
                                           concurrency=args.actors, num_gpus=args.gpus_per_actor)
            report = distributed.write_embedding_shards(ds, args.out, state, shard_size=args.shard_size)
        print(f"{args.out}: {report.rows} embeddings in {len(report.shards)} shard(s) (img_emb/, metadata/)")
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def cmd_search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise InputError("give a text query or --image PATH (exactly one)")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image}: no such image file (--image)")
    query = args.query if args.image is None else Path(args.image)
    index = ImageIndex(args.index, device=args.device, precision=args.precision)
    sys.stdout.write(format_hits(index.search(query, top_k=args.top_k), args.format))
    return 0


def cmd_train_adapter(args: argparse.Namespace) -> int:
    """`training.train_adapter_from_folder`; exit 1 when the adapter saved is untrained (it warned)."""
    data = training_set(args.data, args.seen)  # checked before the model loads
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    _, info = train_adapter_from_folder(data, model, args.out, templates=args.templates, epochs=args.epochs,
                                        grid=adapter_grid(args.lr, args.consistency), seed=args.seed,
                                        cache_dir=args.cache_dir)
    print(describe_training(args.out, info))
    return 1 if info["untrained"] else 0


def cmd_eval_zeroshot(args: argparse.Namespace) -> int:
    """`eval --protocol zeroshot`: `evaluation.zeroshot_evaluation`, a CLIP_benchmark-style record."""
    if args.test:
        raise InputError("--test does not apply to --protocol zeroshot: it evaluates every image of DATA")
    data = ClassFolders.read(args.data)  # refuses a DATA without images, before the model loads
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    result = ev.zeroshot_evaluation(data, model, templates=args.templates, load_classifier=args.load_classifier,
                                    save_classifier=args.save_classifier, cache_dir=args.cache_dir,
                                    batch_size=args.batch_size)
    if not result.record["n_images"]:
        print("clipzsl: error: no image could be read; nothing to evaluate", file=sys.stderr)
        return 1
    sys.stdout.write(ev.format_zeroshot(result.record))
    if args.output:
        Path(args.output).write_text(json.dumps(result.record, indent=2) + "\n", encoding="utf-8")
    return 1 if result.failures else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`evaluation.class_split` and `run_protocols`: the tables, and the results as JSON with --output."""
    if args.protocol == "zeroshot":
        return cmd_eval_zeroshot(args)
    if args.save_classifier or args.load_classifier:
        raise InputError("--save-classifier and --load-classifier apply to --protocol zeroshot only")
    split = ev.class_split(args.data, args.test)  # checked before the model loads
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    results = ev.run_protocols(split, model, methods=methods, seeds=args.seeds, protocol=args.protocol,
                               templates=args.templates, cache_dir=args.cache_dir)
    sys.stdout.write(split.summary() + "\n" + ev.format_results(results, args.protocol))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    model = load_model(args.model, **run_options(args))
    written = explain(model, args.images, labels_argument(args.labels), args.out, adapter=args.adapter,
                      templates=args.templates)
    for path in written:
        print(path)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        from .serve import Limits, app_from_folders, run_service  # the serve extra: fastapi, uvicorn
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


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--engine and the options of `--engine ray` (clipzsl.distributed)."""
    parser.add_argument("--engine", choices=("local", "ray"), default="local",
                        help="local: this process; ray: Ray Data (pip install 'clipzsl[ray]')")
    parser.add_argument("--address", help="Ray cluster to run on (auto, ray://HOST:PORT); default: a local Ray "
                                          "runtime started for the run")
    parser.add_argument("--actors", type=positive_int, default=1, help="model actors (--engine ray)")
    parser.add_argument("--gpus-per-actor", type=non_negative_float, default=0, help="GPUs per model actor (--engine ray)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzsl", description="Zero-shot image classification.",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparser = functools.partial(argparse.ArgumentParser, formatter_class=HelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, parser_class=subparser)

    classify = commands.add_parser("classify", help="classify images against a label set")
    classify.add_argument("paths", nargs="+", help="image files or folders (walked recursively)")
    classify.add_argument("--labels", required=True, help=LABELS_HELP)
    classify.add_argument("--templates", default=DEFAULT_TEMPLATES,
                          help="template set name, .txt or .json file (FILE.json:KEY picks a data set)")
    classify.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    classify.add_argument("--top-k", type=positive_int, default=5, help="labels shown per image")
    classify.add_argument("--format", choices=CLASSIFY_FORMATS, default="table",
                          help="output format; table, csv and jsonl (one JSON object per line) are written as images "
                               "are classified, json is one document written at the end (so it cannot stream or resume)")
    classify.add_argument("--output", type=output_file, help="write results to this file instead of stdout")
    classify.add_argument("--resume", action="store_true",
                          help="skip the images already in --output (csv or jsonl) and append the rest, e.g. after "
                               "an interrupted run")
    classify.add_argument("--cache-dir", help="cache directory: label embeddings, the packaged model's concepts "
                                              "(default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    classify.add_argument("--no-cache", action="store_true",
                          help="write no cache anywhere: encode every label (and the packaged model's concepts) in memory")
    classify.add_argument("--adapter", type=adapter_directory,
                          help="saved adapter directory (from train-adapter) to score through; it must have been "
                               "trained on --model (default: none, plain zero-shot)")
    add_engine_arguments(classify)
    add_run_options(classify)
    classify.set_defaults(run=cmd_classify)

    cache = commands.add_parser("cache", help="show or clear the caches (labels, packaged concepts, image features)")
    cache.add_argument("action", choices=("info", "clear"),
                       help="info: list what is cached; clear: delete it all (only from a folder clipzsl made)")
    cache.add_argument("--cache-dir", help="cache directory (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    cache.set_defaults(run=cmd_cache)

    index = commands.add_parser("index", help="build, inspect or repair an image index (resumable)")
    index.add_argument("kind", choices=("images", "from-shards", "info", "repair"),
                       help="images: embed PATHs into --out; from-shards: clip-retrieval shards DIR into --out; "
                            "info / repair: the index directory given")
    index.add_argument("folders", nargs="+", metavar="PATH", help="image folders or files (images); the index (info, repair)")
    index.add_argument("--out", help="index directory (images, from-shards): new, empty, or one clipzsl made")
    index.add_argument("--model", help="model spec (default: the index's own, else packaged)")
    index.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="how a new index stores vectors (float16: half the disk)")
    index.add_argument("--faiss-factory", default="auto",
                       help="FAISS factory string for the saved index (auto: exact up to 200k images, else IVF); "
                            "checked before anything is embedded")
    index.add_argument("--prune", action="store_true",
                       help="images: forget every indexed image under PATH that is not found now. Without it a PATH "
                            "that held indexed images but is now missing, unreadable or empty (an unmounted drive) "
                            "stops the update with nothing changed, and only files confirmed deleted are forgotten")
    add_run_options(index)
    index.set_defaults(run=cmd_index)

    embed = commands.add_parser("embed", help="embed images into clip-retrieval shards (img_emb/, metadata/)")
    embed.add_argument("paths", nargs="+", help="image files, folders, .txt lists of paths, webdataset .tar shards")
    embed.add_argument("--out", required=True, help="output directory: new or empty (--engine ray: or the same "
                                                    "run's, to resume)")
    embed.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    embed.add_argument("--shard-size", type=positive_int, default=100_000, help="rows per shard")
    add_engine_arguments(embed)
    add_run_options(embed)
    embed.set_defaults(run=cmd_embed)

    search = commands.add_parser("search", help="the best images of an index for a text or image query")
    search.add_argument("index", help="index directory made by `clipzsl index images` or `index from-shards`")
    search.add_argument("query", nargs="?", help="text query (or use --image)")
    search.add_argument("--image", help="an image file as the query")
    search.add_argument("--top-k", type=positive_int, default=10, help="images shown")
    search.add_argument("--format", choices=FORMATS, default="table", help="output format")
    add_run_options(search)
    search.set_defaults(run=cmd_search)

    models = commands.add_parser("models", help="list model specs and what runs offline")
    models.set_defaults(run=cmd_models)

    train = commands.add_parser("train-adapter", help="train a cross-attention adapter on a class-folder data set",
                                description="Exit status 1: the adapter was saved but is untrained (no epoch beat "
                                            "epoch 0 on the validation split, so it scores exactly as zero-shot).")
    train.add_argument("data", help="folder with one sub-folder of images per class")
    train.add_argument("--out", required=True, help="directory for adapter.safetensors + adapter.json")
    train.add_argument("--seen", help="file listing the classes to train on (one per line); default all")
    train.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    train.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    train.add_argument("--epochs", type=positive_int, default=15, help="most training epochs (stops early)")
    train.add_argument("--lr", type=float, help="learning rate (default: chosen on the seen validation split)")
    train.add_argument("--consistency", type=float, help="KL-to-zero-shot weight (default: chosen on validation)")
    train.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation)")
    train.add_argument("--cache-dir", help="feature cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    add_run_options(train)
    train.set_defaults(run=cmd_train_adapter)

    evaluate = commands.add_parser("eval", help="base-to-novel and GZSL protocols, adapters vs baselines")
    evaluate.add_argument("data", help="training folder (one sub-folder per class)")
    evaluate.add_argument("--test", help="test folder with the same class sub-folders (default: half of DATA per class)")
    evaluate.add_argument("--protocol", choices=("b2n", "gzsl", "both", "zeroshot"), default="both",
                          help="b2n: base-to-novel; gzsl: generalised zero-shot; both; "
                               "zeroshot: plain zero-shot accuracy on every image of DATA, no training")
    evaluate.add_argument("--methods", default="zero-shot,linear probe,CLIP-Adapter,Tip-Adapter-F,ours",
                          help="comma-separated methods to compare")
    evaluate.add_argument("--seeds", type=positive_int, default=3, help="runs per method, seeds 0, 1, ...")
    evaluate.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    evaluate.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    evaluate.add_argument("--output", type=output_file, help="also write the results as JSON here")
    evaluate.add_argument("--cache-dir", help="feature cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    evaluate.add_argument("--save-classifier", metavar="FILE",
                          help="zeroshot: write the class embeddings (safetensors) for --load-classifier")
    evaluate.add_argument("--load-classifier", metavar="FILE",
                          help="zeroshot: class embeddings from --save-classifier (same model, classes, templates); "
                               "no text is encoded")
    add_run_options(evaluate)
    evaluate.set_defaults(run=cmd_eval)

    explain = commands.add_parser("explain", help="heatmap PNGs: adapter attention or patch-text similarity")
    explain.add_argument("images", nargs="+", help="image files or folders")
    explain.add_argument("--labels", required=True, help=LABELS_HELP)
    explain.add_argument("--adapter", help="saved adapter directory (default: patch-to-text similarity)")
    explain.add_argument("--out", default="explain", help="output directory")
    explain.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    explain.add_argument("--templates", help="template set (default: the adapter's, else the default)")
    add_run_options(explain)
    explain.set_defaults(run=cmd_explain)

    serve = commands.add_parser("serve", help="HTTP service and web page: search an index, classify uploads")
    serve.add_argument("--index", action="append", metavar="DIR",
                       help="index directory to search (repeatable; named by its folder name)")
    serve.add_argument("--labels", action="append", metavar="NAME_OR_FILE",
                       help="label set clients may name (repeatable; by its file stem): " + LABELS_HELP)
    serve.add_argument("--model", help="model spec (default: the index's own, else packaged)")
    serve.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file, for requests that send none")
    serve.add_argument("--adapter", type=adapter_directory, help="saved adapter directory (enables /explain)")
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
    return parser


#: per command: (the arguments naming its inputs, the options naming what it writes, whether those
#: are folders it writes images into); `check_outputs` refuses an output that would replace an input
OUTPUTS = {
    "classify": (("paths",), ("output",), False),
    "eval": (("data", "test"), ("output", "save_classifier"), False),
    "explain": (("images",), ("out",), True),
    "embed": (("paths",), ("out",), False),
    "index": (("folders",), ("out",), False),
}


def check_outputs(args: argparse.Namespace) -> None:
    """Every command's outputs checked against its inputs (`images.check_output`) before any work."""
    inputs_of, outputs_of, writes_images = OUTPUTS.get(args.command, ((), (), False))
    inputs: list[str] = []
    for name in inputs_of:
        value = getattr(args, name)
        inputs += [value] if isinstance(value, str) else value or []
    for name in outputs_of:
        if getattr(args, name):
            check_output(getattr(args, name), inputs, writes_images)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), notices_to_stderr():
        warnings.showwarning = show_warning
        try:
            check_outputs(args)
            return args.run(args)
        except (PromptFileError, StoreError, OSError, ValueError, RuntimeError, ImportError) as err:
            print(f"clipzsl: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
