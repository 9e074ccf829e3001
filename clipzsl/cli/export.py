"""`clipzsl export onnx`: a model's two towers as ONNX graphs, for `onnx:<folder>` (`clipzsl.export`)."""
from __future__ import annotations

import argparse
import json
from typing import Any



def cmd_export(args: argparse.Namespace) -> int:
    from ..export import export_onnx

    manifest = export_onnx(args.model, args.out)
    print(json.dumps({"out": args.out, "spec": f"onnx:{args.out}", "source": manifest.source_spec,
                      "fingerprint": manifest.fingerprint, "max_abs_diff": manifest.max_abs_diff}))
    return 0


def register(commands: Any) -> None:
    export = commands.add_parser("export", help="export a model for deployment (onnx: both towers, onnxruntime)")
    export.add_argument("format", choices=("onnx",), help="the format: onnx")
    export.add_argument("model", help="the model spec to export, e.g. packaged, openclip:ViT-B-32/<tag>, hf:<dir>")
    export.add_argument("--out", required=True,
                        help="folder to write (clipzsl creates and marks it; a non-empty folder it did not make "
                             "is refused); then use the model spec onnx:<folder>")
    export.set_defaults(run=cmd_export, outputs=((), ("out",), False))
