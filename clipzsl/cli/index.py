"""`clipzsl index`, `embed` and `search`: image collections, their shards and their indexes."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..backends import load_model
from ..dedup import (CANDIDATE_THRESHOLD, DEFAULT_HASH_DISTANCE, DEFAULT_THRESHOLD, GROUP_FORMATS, VERIFY_CHOICES,
                     deduplicate, format_groups)
from ..errors import InputError
from ..image_index import ImageIndex, format_hits
from ..saved_index import describe_tuning
from ..shards import ShardCaptions, index_from_shards
from .options import (FORMATS, add_engine_arguments, add_run_options, empty_folders, engine_of, positive_int,
                      run_options)


def cmd_index(args: argparse.Namespace) -> int:
    run = {"info": index_info, "repair": index_repair, "from-shards": index_shards, "dedup": index_dedup}.get(
        args.kind, index_update)
    return run(args)


def index_dedup(args: argparse.Namespace) -> int:
    """`index dedup DIR`: the groups of near-duplicate images (`dedup.deduplicate`); with --hide only the first
    of each group is found by search from now on; --show finds every image again (`ImageIndex.hide([])`)."""
    index = existing_index(args)
    if args.show:
        index.hide([])
        print(f"{args.folders[0]}: every image is found by search again", file=sys.stderr)
        return 0
    found = deduplicate(index, args.threshold, hide=args.hide, verify=args.verify, hash_distance=args.hash_distance)
    sys.stdout.write(format_groups(found.groups, args.dedup_format))
    for failure in found.unreadable:
        print(f"clipzsl: unreadable {failure}", file=sys.stderr)
    hidden = sum(len(g.paths) - 1 for g in found.groups)
    print(f"{args.folders[0]}: {len(found.groups)} groups of {found.describe()}; "
          + (f"{hidden} images hidden from search (--show: found again)" if args.hide else
             f"--hide keeps the first of each group in search results ({hidden} hidden)"), file=sys.stderr)
    return 1 if found.unreadable else 0


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
    if args.kind != "dedup" and (args.hide or args.show):
        raise InputError("--hide and --show are options of `clipzsl index dedup`")
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
                              workers=args.workers, prune=args.prune, max_memory=args.max_memory,
                              metadata=args.metadata)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(report.summary(args.out, len(index)))
    return 1 if report.failures or empty else 0


def cmd_embed(args: argparse.Namespace) -> int:
    """`embed`: clip-retrieval shards of every image, on either engine, resumable (`embed_to_shards`)."""
    from ..pipeline import embed_to_shards

    engine = engine_of(args)  # before the model loads: a missing Ray costs nothing
    model = load_model(args.model, **run_options(args))
    captions = None if args.captions is None else ShardCaptions.read(args.paths, args.captions or None, model)
    report = embed_to_shards(args.paths, args.out, model, shard_size=args.shard_size,
                             resume=args.resume or args.engine == "ray", engine=engine, captions=captions)
    what = f"{report.rows} embeddings in {len(report.shards)} shard(s)"
    print(f"{args.out}: already complete ({what})" if report.complete_before else
          f"{args.out}: {what} (img_emb/, {'text_emb/, ' if captions else ''}metadata/)")
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
    sys.stdout.write(format_hits(index.search(query, top_k=args.top_k, where=args.where), args.format))
    return 0


def register(commands: Any) -> None:
    index = commands.add_parser("index", help="build, inspect or repair an image index (resumable)")
    index.add_argument("kind", choices=("images", "from-shards", "info", "repair", "dedup"),
                       help="images: embed PATHs into --out; from-shards: clip-retrieval shards DIR into --out; "
                            "info / repair: the index directory given; dedup: its groups of near-duplicate images")
    index.add_argument("folders", nargs="+", metavar="PATH",
                       help="image folders, files or webdataset .tar shards (images); the index (info, repair, dedup)")
    index.add_argument("--out", help="index directory (images, from-shards): new, empty, or one clipzsl made")
    index.add_argument("--model", help="model spec (default: the index's own, else packaged)")
    index.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="how a new index stores vectors (float16: half the disk)")
    index.add_argument("--faiss-factory", default="auto",
                       help="FAISS factory string for the saved index (auto: exact up to 200k images, else IVF); "
                            "checked before anything is embedded")
    index.add_argument("--max-memory", metavar="SIZE", help="images, from-shards: the index's RAM budget, e.g. 2G (K, M, "
                       "G, T: powers of 1024): the usual index if it fits, else compressed codes that do (from-shards "
                       "builds it in one pass over the shards)")
    index.add_argument("--prune", action="store_true",
                       help="images: forget every indexed image under PATH that is not found now. Without it a PATH "
                            "that held indexed images but is now missing, unreadable or empty (an unmounted drive) "
                            "stops the update with nothing changed, and only files confirmed deleted are forgotten")
    index.add_argument("--threshold", type=float, help="dedup: the cosine similarity at or above which two images are "
                       f"near-duplicates (candidates, with --verify hash; default {CANDIDATE_THRESHOLD}, else {DEFAULT_THRESHOLD})")
    index.add_argument("--verify", choices=VERIFY_CHOICES, default="hash", help="dedup: hash: a candidate pair must "
                       "also look alike (perceptual hashes of the files; an image without a readable file: the embedding "
                       f"alone at {DEFAULT_THRESHOLD}); none: the embedding alone")
    index.add_argument("--hash-distance", type=int, default=DEFAULT_HASH_DISTANCE,
                       help="dedup --verify hash: the most bits (of 64) two images' hashes may differ by")
    shown = index.add_mutually_exclusive_group()
    shown.add_argument("--hide", action="store_true", help="dedup: search finds only the first image of each group "
                                                            "(kept with the index, in place of earlier --hide)")
    shown.add_argument("--show", action="store_true", help="dedup: search finds every image again")
    index.add_argument("--format", dest="dedup_format", choices=GROUP_FORMATS, default="text", help="dedup: output format")
    index.add_argument("--metadata", metavar="CSV", help="images: a CSV of extra metadata columns keyed by a `path` "
                       "column, kept with the index for `search --where` (beside folder, name, width, height)")
    add_run_options(index)
    index.set_defaults(outputs=(("folders",), ("out",), False), run=cmd_index)

    embed = commands.add_parser("embed", help="embed images into clip-retrieval shards (img_emb/, metadata/)")
    embed.add_argument("paths", nargs="+", help="image files, folders, .txt lists of paths, webdataset .tar shards")
    embed.add_argument("--out", required=True, help="output directory: new or empty (with --resume: or the same "
                                                    "run's, to continue it)")
    embed.add_argument("--resume", action="store_true",
                       help="continue the run that wrote --out (same images, model and --shard-size) from its last "
                            "shard, e.g. after an interruption (always on with --engine ray)")
    embed.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    embed.add_argument("--shard-size", type=positive_int, default=100_000, help="rows per shard")
    embed.add_argument("--captions", nargs="?", const="", metavar="FILE",
                       help="the images' captions (one folder PATH): a .csv or .jsonl file, or alone a .txt beside each "
                            "image; each shard then gets text_emb/ and a caption column, as clip-retrieval writes them")
    add_engine_arguments(embed)
    add_run_options(embed)
    embed.set_defaults(outputs=(("paths",), ("out",), False), run=cmd_embed)

    search = commands.add_parser("search", help="the best images of an index for a text or image query")
    search.add_argument("index", help="index directory made by `clipzsl index images` or `index from-shards`")
    search.add_argument("query", nargs="?", help="text query (or use --image)")
    search.add_argument("--image", help="an image file as the query")
    search.add_argument("--top-k", type=positive_int, default=10, help="images shown")
    search.add_argument("--format", choices=FORMATS, default="table", help="output format")
    search.add_argument("--where", metavar="EXPR", help="only images whose metadata match, e.g. \"folder = 'cats' and "
                        "width > 512\" (=, !=, <, <=, >, >=, in (...), and, or, not; text in single quotes)")
    add_run_options(search)
    search.set_defaults(run=cmd_search)
