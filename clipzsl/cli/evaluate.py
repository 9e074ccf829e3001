"""`clipzsl train-adapter` and `eval`: adapters trained on class folders, and the evaluation protocols."""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..backends import load_model
from ..errors import InputError
from ..prompts import DEFAULT_TEMPLATES
from .options import adapter_directory, add_run_options, output_file, positive_int, run_options

EPOCHS = 15
METHODS = "zero-shot,linear probe,CLIP-Adapter,Tip-Adapter-F,ours"
SEEDS = 3


def refuse(given: dict[str, bool], why: str) -> None:
    """An InputError naming the options given (`given`: option -> whether it was given) that do not apply."""
    named = [option for option, value in given.items() if value]
    if named:
        raise InputError(f"{', '.join(named)} {'does' if len(named) == 1 else 'do'} not apply {why}")


def cmd_train_adapter(args: argparse.Namespace) -> int:
    """`training.train_adapter_from_folder` (`--kind tip|tip-f`: `cmd_build_tip`); exit 1 when the adapter saved
    is untrained (it warned)."""
    from ..training import adapter_grid, describe_training, train_adapter_from_folder, training_set

    if args.kind != "cross-attention":
        return cmd_build_tip(args)
    data = training_set(args.data, args.seen)  # checked before the model loads
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    _, info = train_adapter_from_folder(data, model, args.out, templates=args.templates, epochs=args.epochs or EPOCHS,
                                        grid=adapter_grid(args.lr, args.consistency), seed=args.seed,
                                        cache_dir=args.cache_dir)
    print(describe_training(args.out, info))
    return 1 if info["untrained"] else 0


def cmd_build_tip(args: argparse.Namespace) -> int:
    """`train-adapter --kind tip|tip-f`: `tip_training.build_tip_from_folder`."""
    from ..tip_training import build_tip_from_folder, describe_tip
    from ..training import training_set

    refuse({"--epochs": args.epochs is not None, "--lr": args.lr is not None,
            "--consistency": args.consistency is not None},
           f"to --kind {args.kind}: its alpha and beta are searched on held-out images of DATA (Tip-Adapter-F's "
           "training is the official one): drop the option or use --kind cross-attention")
    data = training_set(args.data, args.seen)  # checked before the model loads
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    _, info = build_tip_from_folder(data, model, args.out, kind=args.kind, templates=args.templates, seed=args.seed,
                                    cache_dir=args.cache_dir)
    print(describe_tip(args.out, info))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    """`eval DATA --calibrate DIR`: `calibration.fit_gamma`, gamma stored in the adapter and printed."""
    from ..calibration import describe_calibration, fit_gamma
    from ..training import ClassFolders

    refuse({"--test": bool(args.test), "--captions": bool(args.captions), "--protocol": args.protocol != "both",
            "--methods": args.methods != METHODS, "--seeds": args.seeds != SEEDS,
            "--templates": args.templates != DEFAULT_TEMPLATES, "--save-classifier": bool(args.save_classifier),
            "--load-classifier": bool(args.load_classifier)},
           "to --calibrate: gamma is fitted on a seen-class split of DATA with the adapter's own templates")
    data = ClassFolders.read(args.data)  # checked before the model loads
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    calibration = fit_gamma(args.calibrate, data, model, cache_dir=args.cache_dir)
    print(describe_calibration(args.calibrate, calibration))
    if args.output:
        Path(args.output).write_text(json.dumps(asdict(calibration), indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_eval_record(args: argparse.Namespace) -> int:
    """`eval --protocol zeroshot|retrieval`: a CLIP_benchmark-style record; exit 1 when images are left out."""
    from .. import evaluation as ev
    from ..training import ClassFolders

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


def shots(value: str) -> int | None:
    """A `--shots` entry: images per class, or `full` (None: every training image)."""
    return None if value == "full" else positive_int(value)


def cmd_eval_probe(args: argparse.Namespace) -> int:
    """`eval --protocol linear-probe`: `evaluation.linear_probe_evaluation`, its table, its records as JSON."""
    from .. import evaluation as ev
    from ..linear_probe import format_linear_probe
    from ..training import ClassFolders

    data, test = ClassFolders.read(args.data), ClassFolders.read(args.test) if args.test else None
    model = load_model(args.model, cache=args.cache_dir or True, **run_options(args))
    records = ev.linear_probe_evaluation(data, model, test=test, shots=args.shots or [None],
                                         templates=args.templates, cache_dir=args.cache_dir)
    sys.stdout.write(format_linear_probe(records))
    if args.output:
        Path(args.output).write_text(json.dumps(records, indent=2) + "\n", encoding="utf-8")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """`evaluation.class_split` and `run_protocols`: the tables, and the results as JSON with --output."""
    from .. import evaluation as ev

    if args.calibrate:
        return cmd_calibrate(args)
    if args.protocol != "zeroshot" and (args.save_classifier or args.load_classifier):
        raise InputError("--save-classifier and --load-classifier apply to --protocol zeroshot only")
    if args.protocol != "retrieval" and args.captions:
        raise InputError("--captions applies to --protocol retrieval only")
    if args.protocol != "linear-probe" and args.shots:
        raise InputError("--shots applies to --protocol linear-probe only")
    if args.protocol == "linear-probe":
        return cmd_eval_probe(args)
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
    train = commands.add_parser("train-adapter", help="train an adapter (cross-attention, Tip-Adapter or "
                                                      "Tip-Adapter-F) on a class-folder data set",
                                description="Exit status 1: the cross-attention adapter was saved but is untrained "
                                            "(no epoch beat epoch 0 on the validation split, so it scores exactly as "
                                            "zero-shot).")
    train.add_argument("data", help="folder with one sub-folder of images per class")
    train.add_argument("--out", required=True, help="directory for adapter.safetensors + adapter.json")
    train.add_argument("--kind", choices=("cross-attention", "tip", "tip-f"), default="cross-attention",
                       help="cross-attention: trained over the spatial tokens (draws heat maps); tip: Tip-Adapter's "
                            "training-free cache of DATA's images, alpha and beta searched on held-out ones (seconds); "
                            "tip-f: Tip-Adapter-F, its keys trained")
    train.add_argument("--seen", help="file listing the classes to train on (one per line); default all")
    train.add_argument("--model", default="packaged", help="model spec (see `clipzsl models`)")
    train.add_argument("--templates", default=DEFAULT_TEMPLATES, help="template set name or .txt file")
    train.add_argument("--epochs", type=positive_int,
                       help=f"cross-attention: most training epochs (stops early; default {EPOCHS})")
    train.add_argument("--lr", type=float,
                       help="cross-attention: learning rate (default: chosen on the seen validation split)")
    train.add_argument("--consistency", type=float,
                       help="cross-attention: KL-to-zero-shot weight (default: chosen on validation)")
    train.add_argument("--seed", type=int, default=0, help="random seed (splits, initialisation)")
    train.add_argument("--cache-dir", help="feature cache (default $CLIPZSL_CACHE_DIR or ~/.cache/clipzsl)")
    add_run_options(train)
    train.set_defaults(run=cmd_train_adapter)

    evaluate = commands.add_parser("eval", help="base-to-novel and GZSL protocols, adapters vs baselines")
    evaluate.add_argument("data", help="training folder (one sub-folder per class)")
    evaluate.add_argument("--test", help="test folder with the same class sub-folders (default: half of DATA per class)")
    evaluate.add_argument("--protocol", choices=("b2n", "gzsl", "both", "zeroshot", "retrieval", "linear-probe"),
                          default="both",
                          help="b2n: base-to-novel; gzsl: generalised zero-shot; both; zeroshot: plain zero-shot "
                               "accuracy on every image of DATA, no training; retrieval: caption<->image recall@k; "
                               "linear-probe: logistic regression on the image embeddings (CLIP_benchmark's), "
                               "next to zero-shot on the same test images")
    evaluate.add_argument("--captions", help="retrieval: a .csv (image,caption) or .jsonl captions file, image paths "
                                             "relative to DATA (default: a .txt beside each image)")
    evaluate.add_argument("--shots", type=shots, nargs="+", metavar="K",
                          help="linear-probe: images per class (1 2 4 8 16 ...) and/or `full` (default: full)")
    evaluate.add_argument("--methods", default=METHODS, help="comma-separated methods to compare")
    evaluate.add_argument("--seeds", type=positive_int, default=SEEDS, help="runs per method, seeds 0, 1, ...")
    evaluate.add_argument("--calibrate", metavar="ADAPTER_DIR", type=adapter_directory,
                          help="instead of the protocols: fit calibrated stacking's gamma for this saved adapter "
                               "(either kind) on DATA's images of its classes, store it in its adapter.json "
                               "(classify and serve subtract it from the seen labels when a label set mixes seen "
                               "and unseen ones) and print it; --output: the calibration as JSON")
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
