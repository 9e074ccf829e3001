"""Command line: a thin shell over the Python API.

Exit status: 0 when everything was classified, 1 when some images could not be
read (they are listed on stderr, the rest are still classified), 2 for bad
arguments or label/template files.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Sequence

from . import available_models
from .classifier import ZeroShotClassifier
from .image_index import ImageIndex
from .store import StoreError, cache_root
from .prompts import DEFAULT_TEMPLATES, LABEL_SUFFIXES, LABELS_DIR, PromptFileError, available

FORMATS = ("table", "csv", "json")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return number


def labels_argument(value: str) -> str | list[str]:
    """A label file path or shipped set name stays as is; anything else is a comma-separated list."""
    if Path(value).is_file() or value in available(LABELS_DIR, LABEL_SUFFIXES):
        return value
    return [part.strip() for part in value.split(",") if part.strip()]


def format_predictions(rows: list[tuple[str, list[tuple[str, float]]]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(
            [{"image": image, "predictions": [{"label": l, "probability": p} for l, p in preds]} for image, preds in rows],
            indent=2,
        ) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["image", "rank", "label", "probability"])
        for image, preds in rows:
            writer.writerows([image, rank, label, f"{p:.6f}"] for rank, (label, p) in enumerate(preds, 1))
        return out.getvalue()
    width = max([len("image")] + [len(image) for image, _ in rows])
    lines = [f"{'image':<{width}}  predictions"]
    for image, preds in rows:
        lines.append(f"{image:<{width}}  " + "  ".join(f"{label} ({p:.1%})" for label, p in preds))
    return "\n".join(lines) + "\n"


def cmd_classify(args: argparse.Namespace) -> int:
    cache = False if args.no_cache else (args.cache_dir or True)
    clf = ZeroShotClassifier(
        args.model, labels=labels_argument(args.labels), templates=args.templates, cache=cache, index=args.index
    )
    embedded = clf.embed(args.paths, batch_size=args.batch_size, skip_errors=True, progress=None)
    for failure in embedded.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    predictions = clf.top_k_from_embeddings(embedded.embeddings, args.top_k)
    text = format_predictions(list(zip(embedded.sources, predictions)), args.format)
    if args.output:
        Path(args.output).write_text(text, encoding="utf-8")
    else:
        sys.stdout.write(text)
    if embedded.failures:
        print(f"clipzsl: {len(embedded.failures)} of {len(embedded.failures) + len(embedded.sources)} "
              "images could not be read", file=sys.stderr)
        return 1
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    rows = available_models()
    width = max(len(spec) for spec, _ in rows)
    for spec, status in rows:
        print(f"{spec:<{width}}  {status}")
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from .store import EmbeddingStore

    root = cache_root(args.cache_dir) / "labels"
    stores = sorted(p for p in root.glob("*") if p.is_dir()) if root.exists() else []
    if args.action == "clear":
        for directory in stores:  # whatever state it is in: an unreadable meta.json must not block this
            EmbeddingStore.destroy(directory)
        print(f"cleared {len(stores)} label cache(s) under {root}")
        return 0
    print(f"label cache: {root}")
    for directory in stores:
        try:
            meta = EmbeddingStore.read_meta(directory)
            store = EmbeddingStore(directory, meta["fingerprint"], meta["embed_dim"])
        except StoreError as err:
            print(f"  {directory.name}  unusable ({err}); `clipzsl cache clear` removes it")
            continue
        print(f"  {meta.get('spec') or '?'}  {len(store)} labels  {store.size_bytes() / 1e6:.1f} MB  {meta['fingerprint']}")
    return 0


def cmd_index(args: argparse.Namespace) -> int:
    if args.kind in ("info", "repair"):
        if len(args.folders) != 1:
            raise ValueError(f"`clipzsl index {args.kind}` takes one index directory, got {len(args.folders)}")
        index = ImageIndex(args.folders[0], args.model)
        if args.kind == "info":
            info = index.info()
            recall = "n/a (empty)" if info["recall_at_10"] is None else \
                f"{info['recall_at_10']:.3f} against exact search on {info['recall_sample']} stored vectors"
            print(f"{args.folders[0]}: {info['images']} images, {info['bytes'] / 1e6:.1f} MB on disk "
                  f"({info['dtype']}, {info['segments']} segments, {info['dead_rows']} replaced rows)\n"
                  f"model: {info['model']}\nfaiss factory: {info['factory']}"
                  + (f" (search parameter {info['search_parameter']})" if info["search_parameter"] else "")
                  + f"\nrecall@10: {recall}")
            return 0
        report = index.repair(batch_size=args.batch_size)
        for line in report.damaged:
            print(f"set aside damaged segment {line}")
        for path in report.unrecoverable:
            print(f"clipzsl: lost {path} (file gone or unreadable)", file=sys.stderr)
        print(f"{args.folders[0]}: {len(index)} images; {len(report.damaged)} damaged segments, "
              f"{report.reembedded} images re-embedded, {len(report.unrecoverable)} lost"
              + (", index rebuilt" if report.index_rebuilt else ""))
        return 1 if report.unrecoverable else 0
    if not args.out:
        raise ValueError(f"`clipzsl index {args.kind}` needs --out INDEX_DIR")
    if args.kind == "from-shards":
        from .shards import index_from_shards

        if len(args.folders) != 1 or not args.model:
            raise ValueError("`clipzsl index from-shards DIR --out INDEX --model SPEC`: one shard directory, and "
                             "the model that embedded the shards")
        index = index_from_shards(args.folders[0], args.out, args.model, args.faiss_factory, args.dtype)
        print(f"{args.out}: {len(index)} images from {args.folders[0]} "
              f"(faiss factory {index.store.index_state().get('factory', 'Flat')})")
        return 0
    index = ImageIndex(args.out, args.model or "packaged", dtype=args.dtype)
    report = index.update(args.folders, batch_size=args.batch_size, factory=args.faiss_factory)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(f"{args.out}: {len(index)} images ({report.added} added, {report.updated} updated, "
          f"{report.removed} removed, {report.unchanged} unchanged)")
    return 1 if report.failures else 0


def cmd_embed(args: argparse.Namespace) -> int:
    from . import load_model
    from .shards import write_shards

    report = write_shards(load_model(args.model), args.paths, args.out, shard_size=args.shard_size,
                          batch_size=args.batch_size)
    for failure in report.failures:
        print(f"clipzsl: skipped {failure}", file=sys.stderr)
    print(f"{args.out}: {report.rows} embeddings in {len(report.shards)} shard(s) (img_emb/, metadata/)")
    return 1 if report.failures else 0


def format_hits(rows: list[tuple[str, float]], fmt: str) -> str:
    """Search results as a table, JSON (a list of {path, score}) or CSV (rank, path, score)."""
    if fmt == "json":
        return json.dumps([{"path": path, "score": score} for path, score in rows], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["rank", "path", "score"])
        writer.writerows([rank, path, f"{score:.6f}"] for rank, (path, score) in enumerate(rows, 1))
        return out.getvalue()
    width = max([len("image")] + [len(path) for path, _ in rows])
    return "".join([f"{'image':<{width}}  similarity\n"] + [f"{path:<{width}}  {s:.4f}\n" for path, s in rows])


def cmd_search(args: argparse.Namespace) -> int:
    if (args.query is None) == (args.image is None):
        raise ValueError("give a text query or --image PATH (exactly one)")
    if args.image is not None and not Path(args.image).is_file():
        raise FileNotFoundError(f"{args.image}: no such image file (--image)")
    query = args.query if args.image is None else Path(args.image)
    sys.stdout.write(format_hits(ImageIndex(args.index).search(query, top_k=args.top_k), args.format))
    return 0


def cmd_train_adapter(args: argparse.Namespace) -> int:
    from . import load_model
    from .adapter import TrainConfig, extract_features, fit_with_selection, folder_dataset
    from .classifier import class_embeddings
    from .evaluation import DEFAULT_GRID
    from .prompts import ClassEntry, load_templates

    backend = load_model(args.model)
    names, paths, labels = folder_dataset(args.data)
    seen = list(range(len(names)))
    if args.seen:
        wanted = [l.strip() for l in Path(args.seen).read_text().splitlines() if l.strip() and not l.startswith("#")]
        unknown = [w for w in wanted if w not in names and w.replace("_", " ") not in names]
        if unknown:
            raise ValueError(f"{args.seen}: classes not in {args.data}: {unknown[:5]}")
        seen = sorted(names.index(w.replace("_", " ")) for w in wanted)
    keep = [i for i, y in enumerate(labels) if y in set(seen)]
    templates = load_templates(args.templates)
    emb = class_embeddings(backend, [ClassEntry(n) for n in names], templates)
    feats = extract_features(backend, [paths[i] for i in keep], cache=args.cache_dir or True, progress=True)
    if args.lr is None and args.consistency is None:
        grid = DEFAULT_GRID
    else:
        grid = ({"lr": args.lr or 3e-3, "consistency": 1.0 if args.consistency is None else args.consistency},)
    result, info = fit_with_selection(feats, [labels[i] for i in keep], emb, seen, backend.logit_scale,
                                      seed=args.seed, grid=grid, base=TrainConfig(epochs=args.epochs, patience=4),
                                      logit_bias=backend.logit_bias, log=lambda m: print(m, file=sys.stderr))
    info.pop("val_split")
    result.adapter.save(args.out, backend, templates=templates, labels=[names[c] for c in seen],
                        extra={"training": info})
    print(f"{args.out}: adapter trained on {len(seen)} classes, {info['n_train']} images; chosen {info['params']}, "
          f"validation H {info['val_score']:.3f} at epoch {info['best_epoch']}, {info['epoch_seconds']:.2f} s/epoch")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import math

    from . import evaluation as ev
    from . import load_model
    from .adapter import extract_features, folder_dataset
    from .classifier import class_embeddings
    from .prompts import ClassEntry, load_templates

    backend = load_model(args.model)
    names, paths, labels = folder_dataset(args.data)
    if args.test:
        tnames, tpaths, tlabels = folder_dataset(args.test)
        common = sorted(set(names) & set(tnames))
        tr = [(p, common.index(names[y])) for p, y in zip(paths, labels) if names[y] in common]
        te = [(p, common.index(tnames[y])) for p, y in zip(tpaths, tlabels) if tnames[y] in common]
        names = common
    else:
        import numpy as np

        rng = np.random.default_rng(0)
        tr, te = [], []
        for c in range(len(names)):
            idx = rng.permutation([i for i, y in enumerate(labels) if y == c]).tolist()
            tr += [(paths[i], c) for i in idx[: len(idx) // 2]]
            te += [(paths[i], c) for i in idx[len(idx) // 2:]]
    emb = class_embeddings(backend, [ClassEntry(n) for n in names], load_templates(args.templates))
    base, novel = ev.base_novel_split(names)
    tr = [(p, y) for p, y in tr if y in set(base)]
    cache = args.cache_dir or True
    ftr = extract_features(backend, [p for p, _ in tr], cache=cache, progress=True)
    fte = extract_features(backend, [p for p, _ in te], cache=cache, progress=True)
    problem = ev.Problem(ftr, [y for _, y in tr], emb, base, backend.logit_scale, backend.logit_bias)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ev.METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(ev.METHODS)}")
    results = {}
    for m in methods:
        runs = []
        for seed in range(args.seeds):
            fitted = ev.METHODS[m](problem, seed=seed)
            run = {"seed": seed}
            if args.protocol in ("b2n", "both"):
                run["b2n"] = ev.base_to_novel(fitted, fte, [y for _, y in te], base, novel)
            if args.protocol in ("gzsl", "both"):
                run["gzsl"] = ev.gzsl(fitted, problem, fte, [y for _, y in te], base, novel, seed)
            runs.append(run)
        results[m] = runs

    def ms(values):
        values = [v for v in values if not math.isnan(v)]
        if not values:
            return "n/a"
        mean = sum(values) / len(values)
        std = (sum((v - mean) ** 2 for v in values) / len(values)) ** 0.5
        return f"{100 * mean:.1f} ± {100 * std:.1f}"

    print(f"{len(names)} classes ({len(base)} base, {len(novel)} novel), {len(tr)} training images, {len(te)} test")
    if args.protocol in ("b2n", "both"):
        print("base-to-novel        Base           Novel          H")
        for m, runs in results.items():
            print(f"{m:<20} " + "  ".join(f"{ms([r['b2n'][k] for r in runs]):<13}" for k in ("base", "novel", "H")))
    if args.protocol in ("gzsl", "both"):
        print("GZSL                 Seen           Unseen         H              | calibrated stacking: Seen, Unseen, H")
        for m, runs in results.items():
            print(f"{m:<20} " + "  ".join(f"{ms([r['gzsl'][v][k] for r in runs]):<13}"
                                          for v in ("plain", "calibrated") for k in ("seen", "unseen", "H")))
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from . import load_model
    from .explain import explain

    backend = load_model(args.model)
    written = explain(backend, args.images, labels_argument(args.labels), args.out, adapter=args.adapter,
                      templates=args.templates)
    for path in written:
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clipzsl", description="Zero-shot image classification.")
    commands = parser.add_subparsers(dest="command", required=True)

    classify = commands.add_parser("classify", help="classify images against a label set")
    classify.add_argument("paths", nargs="+", help="image files or folders (walked recursively)")
    classify.add_argument("--labels", required=True, help="label file, shipped set name, or a,b,c")
    classify.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    classify.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    classify.add_argument("--top-k", type=positive_int, default=5)
    classify.add_argument("--format", choices=FORMATS, default="table")
    classify.add_argument("--output", help="write results to this file instead of stdout")
    classify.add_argument("--batch-size", type=int, default=32)
    classify.add_argument("--index", default="auto", help="FAISS factory string for the label index (Flat, HNSW32, ...)")
    classify.add_argument("--cache-dir", help="label-embedding cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    classify.add_argument("--no-cache", action="store_true", help="encode every label, store nothing")
    classify.set_defaults(run=cmd_classify)

    cache = commands.add_parser("cache", help="show or clear the label-embedding cache")
    cache.add_argument("action", choices=("info", "clear"))
    cache.add_argument("--cache-dir")
    cache.set_defaults(run=cmd_cache)

    index = commands.add_parser("index", help="build, inspect or repair an image index (resumable)")
    index.add_argument("kind", choices=("images", "from-shards", "info", "repair"),
                       help="images: embed PATHs into --out; from-shards: clip-retrieval shards DIR into --out; "
                            "info / repair: the index directory given")
    index.add_argument("folders", nargs="+", metavar="PATH", help="image folders or files (images); the index (info, repair)")
    index.add_argument("--out", help="index directory (images)")
    index.add_argument("--model", help="model spec (default: the index's own, else packaged)")
    index.add_argument("--batch-size", type=int, default=32)
    index.add_argument("--dtype", choices=("float32", "float16"), default="float32",
                       help="how a new index stores vectors (float16: half the disk)")
    index.add_argument("--faiss-factory", default="auto",
                       help="FAISS factory string for the saved index (auto: exact up to 200k images, else IVF)")
    index.set_defaults(run=cmd_index)

    embed = commands.add_parser("embed", help="embed images into clip-retrieval shards (img_emb/, metadata/)")
    embed.add_argument("paths", nargs="+", help="image files, folders, .txt lists of paths, webdataset .tar shards")
    embed.add_argument("--out", required=True, help="output directory")
    embed.add_argument("--model", default="packaged")
    embed.add_argument("--batch-size", type=int, default=32)
    embed.add_argument("--shard-size", type=positive_int, default=100_000, help="rows per shard")
    embed.set_defaults(run=cmd_embed)

    search = commands.add_parser("search", help="the best images of an index for a text or image query")
    search.add_argument("index")
    search.add_argument("query", nargs="?", help="text query (or use --image)")
    search.add_argument("--image", help="an image file as the query")
    search.add_argument("--top-k", type=positive_int, default=10)
    search.add_argument("--format", choices=FORMATS, default="table")
    search.set_defaults(run=cmd_search)

    models = commands.add_parser("models", help="list model specs and what runs offline")
    models.set_defaults(run=cmd_models)

    train = commands.add_parser("train-adapter", help="train a cross-attention adapter on a class-folder data set")
    train.add_argument("data", help="folder with one sub-folder of images per class")
    train.add_argument("--out", required=True, help="directory for adapter.safetensors + adapter.json")
    train.add_argument("--seen", help="file listing the classes to train on (one per line); default all")
    train.add_argument("--model", default="packaged")
    train.add_argument("--templates", default=DEFAULT_TEMPLATES)
    train.add_argument("--epochs", type=positive_int, default=15)
    train.add_argument("--lr", type=float, help="learning rate (default: chosen on the seen validation split)")
    train.add_argument("--consistency", type=float, help="KL-to-zero-shot weight (default: chosen on validation)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--cache-dir", help="feature cache directory")
    train.set_defaults(run=cmd_train_adapter)

    evaluate = commands.add_parser("eval", help="base-to-novel and GZSL protocols, adapters vs baselines")
    evaluate.add_argument("data", help="training folder (one sub-folder per class)")
    evaluate.add_argument("--test", help="test folder with the same class sub-folders (default: half of DATA per class)")
    evaluate.add_argument("--protocol", choices=("b2n", "gzsl", "both"), default="both")
    evaluate.add_argument("--methods", default="zero-shot,linear probe,CLIP-Adapter,Tip-Adapter-F,ours")
    evaluate.add_argument("--seeds", type=positive_int, default=3)
    evaluate.add_argument("--model", default="packaged")
    evaluate.add_argument("--templates", default=DEFAULT_TEMPLATES)
    evaluate.add_argument("--output", help="also write the results as JSON here")
    evaluate.add_argument("--cache-dir", help="feature cache directory")
    evaluate.set_defaults(run=cmd_eval)

    explain = commands.add_parser("explain", help="heatmap PNGs: adapter attention or patch-text similarity")
    explain.add_argument("images", nargs="+")
    explain.add_argument("--labels", required=True, help="label file, shipped set name, or a,b,c")
    explain.add_argument("--adapter", help="saved adapter directory (default: patch-to-text similarity)")
    explain.add_argument("--out", default="explain", help="output directory")
    explain.add_argument("--model", default="packaged")
    explain.add_argument("--templates", help="template set (default: the adapter's, else the default)")
    explain.set_defaults(run=cmd_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (PromptFileError, StoreError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"clipzsl: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
