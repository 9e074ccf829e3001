"""ONNX export against torch: install size, image-tower speed on the CPU, what a served process imports.

Each model is exported (`clipzsl.export.export_onnx`) into a temporary folder, then its image tower
(preprocessed pixels -> normalised embeddings; for the packaged model with ConSE) runs on the same
random pixels under torch and under onnxruntime, both with 2 threads, batch 1 and 32, interleaved,
median of the runs. Sizes are the installed files of each distribution (importlib.metadata).
The import check runs `onnx:<folder>` classification in a fresh process and lists the heavy modules
it imported.

  python -m benchmarks.bench_onnx [--quick]
"""
from __future__ import annotations

import os
import tempfile
from importlib.metadata import PackageNotFoundError, distribution, distributions, packages_distributions
from pathlib import Path

import torch

import clipzsl
from clipzsl.backends.onnx import OnnxBackend
from clipzsl.export import export_onnx

from . import children, report

THREADS = 2
MODELS = {"packaged": "packaged", "ViT-B/32": "openclip:ViT-B-32/random"}
def installed_mb(*names: str) -> float:
    """Megabytes of the installed files of the named distributions (missing ones count 0)."""
    total = 0
    for name in names:
        try:
            files = distribution(name).files or []
        except PackageNotFoundError:
            continue
        total += sum(f.size or 0 for f in files)
    return total / 1e6


def sizes() -> dict[str, float]:
    cuda = sorted({d.metadata["Name"] for d in distributions() if d.metadata["Name"].lower().startswith("nvidia-")})
    return {
        "onnxruntime": installed_mb("onnxruntime"),
        "onnxruntime + onnx": installed_mb("onnxruntime", "onnx"),
        "onnxruntime + onnx + onnxscript (export only)": installed_mb("onnxruntime", "onnx", "onnxscript"),
        "torch": installed_mb("torch"),
        "torch + torchvision": installed_mb("torch", "torchvision"),
        "torch + torchvision + CUDA libraries (nvidia-*, triton)": installed_mb("torch", "torchvision", "triton",
                                                                                 *cuda),
    }


def served_distributions(modules: list[str]) -> dict[str, float]:
    """The distributions that provide these top-level modules (clipzsl itself left out) -> their installed MB."""
    provided = packages_distributions()
    names = sorted({name for module in modules for name in provided.get(module, []) if name != "clipzsl"})
    return {name: installed_mb(name) for name in names}


def speeds(backend, exported: OnnxBackend, size: list[int], quick: bool) -> dict[str, dict[str, float]]:
    """Images/s of the image tower, torch against onnxruntime, at batch 1 and 32 (interleaved runs)."""
    out = {}
    for batch, repeats in ((1, 5 if quick else 20), (32, 2 if quick else 5)):
        pixels = torch.randn(batch, 3, *size, generator=torch.Generator().manual_seed(batch))
        backend.encode_images(pixels), exported.encode_images(pixels)  # warm up both
        times: dict[str, list[float]] = {"torch": [], "onnxruntime": []}
        for _ in range(repeats):
            times["torch"] += report.timed(lambda: backend.encode_images(pixels), 1)[0]
            times["onnxruntime"] += report.timed(lambda: exported.encode_images(pixels), 1)[0]
        out[f"batch {batch}"] = {k: batch / report.median(v) for k, v in times.items()}
    return out


def measure_model(spec: str, quick: bool, scratch: Path) -> dict:
    backend = clipzsl.load_model(spec, device="cpu")
    manifest = export_onnx(backend, scratch / spec.replace(":", "_").replace("/", "_"))
    exported = OnnxBackend(scratch / spec.replace(":", "_").replace("/", "_"), threads=THREADS)
    files = {name: (exported.directory / name).stat().st_size / 1e6 for name in manifest.files if name.endswith(".onnx")}
    return {"max_abs_diff": manifest.max_abs_diff, "onnx_mb": files,
            "images_per_s": speeds(backend, exported, manifest.image_size, quick),
            "imports": imports(exported.directory)}


def imports(folder: Path) -> dict:
    """What a fresh process classifying through `onnx:<folder>` imports, and the installed size of it."""
    found = children.run_json("onnx-imports", str(folder))
    return {**found, "distributions_mb": served_distributions(found["modules"])}


def summary(results: dict) -> list[str]:
    lines = [f"Image tower only (preprocessed pixels in, normalised embeddings out), CPU, {THREADS} threads for "
             f"torch and for onnxruntime, same pixels, interleaved runs, median; the machine's load average at the end "
             f"was {results['load_average_1min']:.1f} on {os.cpu_count()} cores.", "",
             "| model | batch | torch img/s | onnxruntime img/s | onnxruntime / torch |", "|---|---|---|---|---|"]
    for model, r in results["models"].items():
        for batch, s in r["images_per_s"].items():
            lines.append(f"| {model} | {batch.split()[1]} | {s['torch']:.1f} | {s['onnxruntime']:.1f} | "
                         f"{s['onnxruntime'] / s['torch']:.2f}x |")
    lines += ["", "Exported files and agreement (max abs difference of the normalised embeddings, probe inputs):", ""]
    lines += [f"- {model}: {', '.join(f'{k} {v:.0f} MB' for k, v in r['onnx_mb'].items())}; "
              f"max abs difference {r['max_abs_diff']:.1e}" for model, r in results["models"].items()]
    lines += ["", "Installed size (the distributions' files, this machine's wheels):", "", "| packages | MB |", "|---|---|"]
    lines += [f"| {name} | {mb:,.0f} |" for name, mb in results["sizes"].items()]
    lines += ["", "What a process serving `onnx:<folder>` imports (fresh process: `clipzsl.serve` imported, one image "
              "classified), and the installed size of every distribution it loaded (clipzsl's dependencies that it "
              "loads; clipzsl itself not counted):", ""]
    for model, r in results["models"].items():
        loaded = r["imports"]["distributions_mb"]
        lines.append(f"- {model}: `import clipzsl` alone imports {', '.join(r['imports']['package_import']) or 'none of them'}; "
                     f"after classifying: {', '.join(r['imports']['after_classify'])}; {len(loaded)} distributions, "
                     f"{sum(loaded.values()):,.0f} MB in all (the largest: "
                     f"{', '.join(f'{n} {mb:,.0f}' for n, mb in sorted(loaded.items(), key=lambda x: -x[1])[:5])})")
    return lines


def run(quick: bool = False) -> dict:
    torch.set_num_threads(THREADS)
    models = {"packaged": MODELS["packaged"]} if quick else MODELS
    with tempfile.TemporaryDirectory() as scratch:
        results = {"threads": THREADS, "quick": quick, "sizes": sizes(),
                   "models": {name: measure_model(spec, quick, Path(scratch)) for name, spec in models.items()},
                   "load_average_1min": os.getloadavg()[0]}  # other processes' load skews the speeds
    lines = summary(results)
    report.write("onnx", results, lines)
    print("\n".join(lines))
    return results


def main(argv: list[str] | None = None) -> None:
    report.main(__doc__, "onnx", run, "the packaged model only, fewer runs", argv)


if __name__ == "__main__":
    main()
