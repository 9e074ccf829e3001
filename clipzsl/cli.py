"""Command line: a thin shell over the Python API.

Exit status: 0 when everything was classified, 1 when some images could not be
read (they are listed on stderr, the rest are still classified), 2 for bad
arguments or label/template files. `train-adapter` exits 1 when the adapter it saved is
untrained (no epoch beat epoch 0 on validation: it scores exactly as zero-shot; adapter.json
says so in training.untrained).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

from . import __version__
from . import evaluation as ev
from .adapter import CONFIG_NAME
from .backends import available_models, load_model
from .cache import cache_info, clear_cache
from .errors import ClipzslError, InputError
from .explain import explain
from .image_index import ImageIndex, format_hits
from .images import MAX_PIXELS, NoImagesWarning, check_output
from .pipeline import Classification, Engine, classify_to_file, embed_to_shards
from .predictions import PREDICTION_FORMATS
from .prompts import DEFAULT_TEMPLATES, parse_label_list
from .saved_index import describe_tuning
from .shards import index_from_shards
from .training import ClassFolders, adapter_grid, describe_training, train_adapter_from_folder, training_set

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


def cmd_classify(args: argparse.Namespace) -> int:
    """`classify`: predictions of every image into --output (or stdout), on either engine (`classify_to_file`)."""
    fmt = args.format or ("parquet" if args.output and Path(args.output).suffix == ".parquet" else "table")
    job = Classification(labels_argument(args.labels), args.model, args.templates, args.top_k,
                         cache=False if args.no_cache else (args.cache_dir or True), adapter=args.adapter,
                         device=args.device, precision=args.precision, explain=args.explain, method=args.method)
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


def engine_of(args: argparse.Namespace) -> Engine:
    """The `add_engine_arguments` and `add_run_options` choices of a command, as a pipeline `Engine`."""
    return Engine(args.engine, args.batch_size, args.workers, args.address, args.actors, args.gpus_per_actor)


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
    """`index info DIR`: size, model, FAISS factory, and recall of an index measured now on stored vectors
    and on text queries from its model (or that they were not measured), and what it was tuned on."""
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
    index = index_from_shards(args.folders[0], out, args.model, args.faiss_factory, args.dtype, args.max_memory)
    state = index.saved_index.state()
    print(f"{out}: {len(index)} images from {args.folders[0]} (faiss factory {state.get('factory', 'Flat')}; "
          f"{describe_tuning(state)})")
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
    """`embed`: clip-retrieval shards of every image, on either engine, resumable (`embed_to_shards`)."""
    engine = engine_of(args)  # before the model loads: a missing Ray costs nothing
    report = embed_to_shards(args.paths, args.out, load_model(args.model, **run_options(args)),
                             shard_size=args.shard_size, resume=args.resume or args.engine == "ray", engine=engine)
    what = f"{report.rows} embeddings in {len(report.shards)} shard(s)"
    print(f"{args.out}: already complete ({what})" if report.complete_before else
          f"{args.out}: {what} (img_emb/, metadata/)")
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


def cmd_eval_record(args: argparse.Namespace) -> int:
    """`eval --protocol zeroshot|retrieval`: a CLIP_benchmark-style record; exit 1 when images are left out."""
    if args.test:
        raise InputError(f"--test does not apply to --protocol {args.protocol}: it evaluates every image of DATA")
    # read before the model loads: a DATA without images or a wrong captions file is refused at once
    data = ev.CaptionedImages.read(args.data, args.captions) if args.protocol == "retrieval" else ClassFolders.read(args.data)
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    if isinstance(data, ev.CaptionedImages):
        record = ev.retrieval_evaluation(data, model, batch_size=args.batch_size)
    else:
        record = ev.zeroshot_evaluation(data, model, templates=args.templates, load_classifier=args.load_classifier,
                                        save_classifier=args.save_classifier, cache_dir=args.cache_dir,
                                        batch_size=args.batch_size).record
    if not record["n_images"]:
        print("clipzsl: error: no image could be read; nothing to evaluate", file=sys.stderr)
        return 1
    sys.stdout.write(ev.format_record(record))
    if args.output:
        Path(args.output).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return 1 if record["n_unreadable"] else 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`evaluation.class_split` and `run_protocols`: the tables, and the results as JSON with --output."""
    if args.protocol != "zeroshot" and (args.save_classifier or args.load_classifier):
        raise InputError("--save-classifier and --load-classifier apply to --protocol zeroshot only")
    if args.protocol != "retrieval" and args.captions:
        raise InputError("--captions applies to --protocol retrieval only")
    if args.protocol in ("zeroshot", "retrieval"):
        return cmd_eval_record(args)
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
    done = explain(model, args.images, labels_argument(args.labels), args.out, adapter=args.adapter,
                   templates=args.templates, method=args.method)
    for path in done.written:
        print(path)
    return 1 if done.failures else 0


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
    parser = Parser(prog="clipzsl", description="Zero-shot image classification.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
                                           "--adapter, else the model's default; see clipzsl.maps.METHODS)")
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
    index.add_argument("--max-memory", metavar="SIZE", help="from-shards: the index's RAM budget, e.g. 2G (K, M, G, T: "
                       "powers of 1024): a compressed index (SQ or PQ) that fits it, built in one pass over the shards")
    index.add_argument("--prune", action="store_true",
                       help="images: forget every indexed image under PATH that is not found now. Without it a PATH "
                            "that held indexed images but is now missing, unreadable or empty (an unmounted drive) "
                            "stops the update with nothing changed, and only files confirmed deleted are forgotten")
    add_run_options(index)
    index.set_defaults(run=cmd_index)

    embed = commands.add_parser("embed", help="embed images into clip-retrieval shards (img_emb/, metadata/)")
    embed.add_argument("paths", nargs="+", help="image files, folders, .txt lists of paths, webdataset .tar shards")
    embed.add_argument("--out", required=True, help="output directory: new or empty (with --resume: or the same "
                                                    "run's, to continue it)")
    embed.add_argument("--resume", action="store_true",
                       help="continue the run that wrote --out (same images, model and --shard-size) from its last "
                            "shard, e.g. after an interruption (always on with --engine ray)")
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
    evaluate.add_argument("--protocol", choices=("b2n", "gzsl", "both", "zeroshot", "retrieval"), default="both",
                          help="b2n: base-to-novel; gzsl: generalised zero-shot; both; zeroshot: plain zero-shot "
                               "accuracy on every image of DATA, no training; retrieval: caption<->image recall@k")
    evaluate.add_argument("--captions", help="retrieval: a .csv (image,caption) or .jsonl captions file, image paths "
                                             "relative to DATA (default: a .txt beside each image)")
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
    explain.add_argument("--method", help="heat-map method (default: the adapter's attention with --adapter, else "
                                          "the model's default; see clipzsl.maps.METHODS)")
    add_run_options(explain)
    explain.set_defaults(run=cmd_explain)

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
    return parser


#: per command: (the arguments naming its inputs, the options naming what it writes, whether those
#: are folders it writes images into); `check_outputs` refuses an output that would replace an input
OUTPUTS = {
    "classify": (("paths",), ("output",), False),
    "eval": (("data", "test", "captions"), ("output", "save_classifier"), False),
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
    """Run one command. A `ClipzslError` (the input or a file is wrong; the message says how to fix it)
    or an `OSError` (a missing file, a full disk) is one line and exit status 2; anything else is a bug,
    and its traceback is shown."""
    args = build_parser().parse_args(argv)
    with warnings.catch_warnings(), notices_to_stderr():
        warnings.showwarning = show_warning
        try:
            check_outputs(args)
            return args.run(args)
        except (ClipzslError, OSError) as err:
            print(f"clipzsl: error: {err}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
