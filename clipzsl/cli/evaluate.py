"""`clipzsl train-adapter` and `eval`: adapters trained on class folders, and the evaluation protocols."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .. import evaluation as ev
from ..backends import load_model
from ..errors import InputError
from ..prompts import DEFAULT_TEMPLATES
from ..training import ClassFolders, adapter_grid, describe_training, train_adapter_from_folder, training_set
from .options import add_run_options, output_file, positive_int, run_options


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


def register(commands: Any) -> None:
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
    evaluate.set_defaults(outputs=(("data", "test", "captions"), ("output", "save_classifier"), False), run=cmd_eval)
