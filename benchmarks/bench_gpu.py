"""Device and precision: images/s end to end, fp32 against bf16, and the bounded pipeline's memory.

Images: every colour photo shipped in installed packages (scikit-image, scikit-learn, matplotlib),
resized to photo size (1024 px on the long side) and cropped/flipped into `--images` distinct JPEG
files (quality 90) on local disk. Models: random-init weights (no hub here), so speed only.

Rows, each images/s from JPEG file to float32 embedding on the CPU:
  clipzsl            `embed_images` on `load_model(spec, device, precision)` (CPU thread workers decode and
                     resize to uint8, bounded prefetch, pinned memory on CUDA, normalisation on the device)
  clipzsl+gpu-decode the same with decode="device" (nvJPEG); CUDA only
  open_clip loop     a plain torch DataLoader (same workers, open_clip's float preprocessing in the workers,
                     same batch size and autocast precision) calling model.encode_image
  clip-retrieval     its inference on the same files, where the package installs; else the row says why
Memory: peak RSS of a fresh process embedding N images with the bounded pipeline, against decoding all N
first (what an unbounded prefetch amounts to when the model is the slower side).

Usage: python -m benchmarks.bench_gpu [--quick] [--device auto] [--images N] [--specs ...] [--name gpu]
On a GPU: python -m benchmarks.bench_gpu --device cuda --images 20000 --specs openclip:ViT-B-32/random
openclip:ViT-L-14/random (fp32 and bf16 each).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

import clipzsl
from clipzsl.images import embed_images, load_image

from . import report

SITE = Path(np.__file__).parents[1]
REPO = Path(__file__).resolve().parent.parent


def photo_files() -> list[Path]:
    files = sorted((SITE / "skimage" / "data").glob("*.png")) + sorted((SITE / "skimage" / "data").glob("*.jpg"))
    files += [SITE / "sklearn/datasets/images/china.jpg", SITE / "sklearn/datasets/images/flower.jpg",
              SITE / "matplotlib/mpl-data/sample_data/grace_hopper.jpg"]
    return [f for f in files if f.is_file()]


def write_jpegs(out: Path, count: int, side: int = 1024) -> list[str]:
    """`count` distinct photo-sized JPEGs from the shipped photos (scaled, cropped, mirrored)."""
    photos = [load_image(f) for f in photo_files()]
    paths = []
    for i in range(count):
        image = photos[i % len(photos)]
        scale = side / max(image.size) * (1 + 0.1 * (i // len(photos) % 5))
        image = image.resize((max(8, round(image.width * scale)), max(8, round(image.height * scale))), Image.BICUBIC)
        shift = (i // (5 * len(photos))) % 8 * 8
        image = image.crop((shift, shift, image.width, image.height))
        if (i // len(photos)) % 2:
            image = ImageOps.mirror(image)
        paths.append(str(out / f"{i:06d}.jpg"))
        image.save(paths[-1], quality=90)
    return paths


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_clipzsl(model, files: list[str], decode: str = "cpu") -> float:
    embed_images(model, files[: model.batch_size], decode=decode)  # warm-up
    sync(model.device)
    start = time.perf_counter()
    embed_images(model, files, decode=decode)
    sync(model.device)
    return len(files) / (time.perf_counter() - start)


def time_openclip_loop(spec: str, files: list[str], device: str, precision: str, batch_size: int,
                       workers: int) -> float:
    """The plain open_clip way: a DataLoader over the files with the float preprocessing in its workers."""
    import open_clip

    arch = spec.split(":", 1)[1].split("/", 1)[0]
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    model.eval()

    class Files(torch.utils.data.Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return preprocess(Image.open(files[i]).convert("RGB"))

    loader = torch.utils.data.DataLoader(Files(), batch_size=batch_size, num_workers=workers,
                                         pin_memory=torch.device(device).type == "cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype is not None)
    out = []
    start = time.perf_counter()
    with torch.inference_mode(), autocast:
        for batch in loader:
            out.append(torch.nn.functional.normalize(model.encode_image(batch.to(device)).float(), dim=-1).cpu())
    sync(device)
    return len(files) / (time.perf_counter() - start)


def clip_retrieval_row(files: list[str], device: str) -> str:
    """clip-retrieval's inference where it installs; it loads hub weights only, so it cannot run offline."""
    try:
        import clip_retrieval  # noqa: F401
    except ImportError:
        return "not measured: clip-retrieval is not installed here (`pip install clip-retrieval`)"
    if torch.device(device).type != "cuda":
        return "not measured: clip-retrieval's comparison is a GPU measurement"
    return ("not measured: clip-retrieval's `clip_inference` loads pretrained hub weights only, and this machine "
            "has no hub access; run it on the same folder with `clip-retrieval inference --input_dataset DIR`")


def peak_rss_mb(mode: str, spec: str, files: list[str]) -> float:
    """Peak RSS of a fresh process embedding `files` (benchmarks.children's embed-peak-rss)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.children", "embed-peak-rss", mode, spec, *files],
                         capture_output=True, text=True, check=True, cwd=REPO)
    return int(out.stdout.split()[-1]) / 1024


#: --quick: one small model, fp32, few images (a smoke run on any machine)
QUICK = {"images": 8, "specs": ["packaged"], "precisions": ["fp32"], "memory": [16]}


def options(argv: list[str] | None = None) -> argparse.Namespace:
    parser = report.parser("bench_gpu", __doc__, f"smoke sizes: {QUICK}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, help="JPEG files timed per row (default 64)")
    parser.add_argument("--specs", nargs="+", help="default: packaged openclip:ViT-B-32/random")
    parser.add_argument("--precisions", nargs="+", help="default: fp32 bf16")
    parser.add_argument("--memory", type=int, nargs="*",
                        help="N for the peak-RSS rows (default 64 256 1024; CPU, a tiny 224-px model: the "
                             "pipeline's memory, not the model's)")
    parser.add_argument("--name", default="gpu", help="results file name under benchmarks/results/ (gpu.md is "
                                                      "written by hand from it)")
    return report.fill(parser.parse_args(argv), QUICK,
                       {"images": 64, "specs": ["packaged", "openclip:ViT-B-32/random"],
                        "precisions": ["fp32", "bf16"], "memory": [64, 256, 1024]})


def measure(args: argparse.Namespace) -> dict:
    """Time every row and write the results through the recorder."""
    device = clipzsl.backends.resolve_device(args.device)
    results = {"device": torch.cuda.get_device_name() if device.startswith("cuda") else f"cpu ({os.cpu_count()} cores)",
               "torch": torch.__version__, "images": args.images, "throughput": [], "memory": []}
    with tempfile.TemporaryDirectory() as tmp:
        files = write_jpegs(Path(tmp), max(args.images, max(args.memory or [0])))
        for spec in args.specs:
            for precision in args.precisions:
                torch.manual_seed(0)
                model = clipzsl.load_model(spec, device=device, precision=precision)
                row = {"spec": spec, "precision": precision, "batch_size": model.batch_size, "workers": model.workers,
                       "clipzsl": time_clipzsl(model, files[: args.images])}
                if device.startswith("cuda"):
                    try:
                        row["clipzsl+gpu-decode"] = time_clipzsl(model, files[: args.images], decode="device")
                    except ValueError as err:
                        row["clipzsl+gpu-decode"] = f"n/a: {err}"
                if spec.startswith("openclip:"):
                    row["open_clip loop"] = time_openclip_loop(spec, files[: args.images], device, precision,
                                                               model.batch_size, model.workers)
                    row["clip-retrieval"] = clip_retrieval_row(files, device)
                print(json.dumps(row), flush=True)
                results["throughput"].append(row)
        if args.memory:
            from clipzsl.backends.hf import save_random_clip

            tiny = save_random_clip(Path(tmp) / "tiny224", vision_image_size=224, vision_patch_size=32,
                                    vision_hidden_size=64, vision_intermediate_size=128, vision_num_hidden_layers=1,
                                    vision_num_attention_heads=4, text_hidden_size=64, text_intermediate_size=128,
                                    text_num_hidden_layers=1, text_num_attention_heads=4, projection_dim=32)
            for n in args.memory:
                row = {"n": n, **{mode: peak_rss_mb(mode, f"hf:{tiny}", files[:n]) for mode in ("bounded", "decode-all")}}
                print(json.dumps(row), flush=True)
                results["memory"].append(row)
    report.write(args.name, results, None)
    return results


run, main = report.entry_points(options, measure)


if __name__ == "__main__":
    main()
