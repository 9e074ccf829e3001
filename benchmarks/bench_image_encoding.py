"""Image encoding: clipzsl's batched pipeline versus a plain loop of model.encode_image, and faster modes.

Same random-init open_clip ViT-B-32 on both sides, real image files (Tux Paint stamps written as PNG),
batch 32, images/s from file to normalised embedding. The plain loop decodes and preprocesses one
image after another, then calls `model.encode_image`; clipzsl.embed_images decodes in a thread pool
while the model runs. Target: clipzsl no slower than the plain loop.

Faster modes, each run through clipzsl.embed_images with the image tower swapped for its variant:
channels-last memory format, bfloat16 autocast, torch.compile, ONNX Runtime, int8 dynamic quantisation
of the Linear layers. Each mode's top-1 agreement with fp32 is measured on the same real images with
the Tux Paint class names as labels ("a photo of a {}."), twice: with the packaged default model (real
weights: meaningful predictions) and with the random ViT-B-32 (the model whose speed is timed), plus the
lowest cosine similarity between a mode's embedding and fp32's. A mode that cannot run here is skipped
with the reason.

Usage: python -m benchmarks.bench_image_encoding [--quick] [--modes NAME ...]
(full: ViT-B-32 160 images x 3 interleaved runs per side, packaged 512 images x 1 run per mode;
--quick: 32 and 64 images, 1 run.)
"""
from __future__ import annotations

import argparse
import copy
import io
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

import clipzsl
from clipzsl.images import EmbeddedImages

from . import common, datasets, report
from .bench_accuracy import merge_case_duplicates

NAME = "image_encoding"
MODES = ["fp32", "channels_last", "bf16_autocast", "torch_compile", "onnxruntime", "int8_dynamic"]
TEMPLATE = "a photo of a {}."
BATCH = 32


class Fn(torch.nn.Module):
    """A callable as a module, so it can stand where the backend keeps its image tower."""

    def __init__(self, fn: Callable, keep: torch.nn.Module | None = None):
        super().__init__()
        self.fn = fn
        self.keep = keep  # the module `fn` runs, kept alive

    def forward(self, x):
        return self.fn(x)


class WholeNet(torch.nn.Module):
    """The packaged backend calls image_model.forward_features then .forward_head; this runs the
    whole classifier (a mode's variant of it) in forward_features and passes it through the head."""

    def __init__(self, net: Callable):
        super().__init__()
        self.net = net

    def forward_features(self, x):
        return self.net(x)

    def forward_head(self, x):
        return x


# ---------------------------------------------------------------- the modes: fp32 tower -> variant


def channels_last(tower: torch.nn.Module, example: torch.Tensor):
    net = copy.deepcopy(tower).to(memory_format=torch.channels_last)
    return Fn(lambda x: net(x.contiguous(memory_format=torch.channels_last)), net), {}


def bf16_autocast(tower: torch.nn.Module, example: torch.Tensor):
    def forward(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return tower(x).float()

    return Fn(forward, tower), {}


def inductor_cache_warm() -> bool | None:
    """Whether torch inductor's on-disk cache already holds anything (compiling is much faster then)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir

        path = Path(cache_dir())
        return path.is_dir() and any(path.iterdir())
    except Exception:  # noqa: BLE001 - a private helper of torch; unknown is fine
        return None


def torch_compile(tower: torch.nn.Module, example: torch.Tensor):
    warm = inductor_cache_warm()
    compiled = torch.compile(tower)
    start = time.perf_counter()
    with torch.inference_mode():  # compile for the grad mode and batch shape the pipeline will use
        compiled(example)
    return Fn(compiled, tower), {"compile_s": time.perf_counter() - start,
                                 "inductor cache": {True: "warm", False: "cold", None: "unknown"}[warm]}


def onnxruntime(tower: torch.nn.Module, example: torch.Tensor):
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise Unavailable(f"onnxruntime is not installed ({err}); pip install onnxruntime") from err
    start = time.perf_counter()
    buffer = io.BytesIO()
    # parameters that require grad keep nn.MultiheadAttention off its fused fast path, which the
    # TorchScript-based exporter cannot translate (aten::_native_multi_head_attention)
    net = copy.deepcopy(tower).requires_grad_(True)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example[:1],), buffer, input_names=["pixels"], output_names=["out"],
                          dynamic_axes={"pixels": {0: "n"}, "out": {0: "n"}}, opset_version=17, dynamo=False)
    export_s = time.perf_counter() - start
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
    run = lambda x: torch.from_numpy(session.run(None, {"pixels": x.contiguous().numpy()})[0])
    return Fn(run), {"export_s": export_s, "onnxruntime": ort.__version__}


def int8_dynamic(tower: torch.nn.Module, example: torch.Tensor):
    quantize = getattr(getattr(torch, "ao", None), "quantization", None)
    if quantize is None or not hasattr(quantize, "quantize_dynamic"):
        raise Unavailable("torch.ao.quantization.quantize_dynamic is not in this torch")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # its deprecation notice (moving to torchao)
        net = quantize.quantize_dynamic(copy.deepcopy(tower), {torch.nn.Linear}, dtype=torch.qint8)
    return net, {}


VARIANTS = {"fp32": lambda tower, example: (tower, {}), "channels_last": channels_last,
            "bf16_autocast": bf16_autocast, "torch_compile": torch_compile, "onnxruntime": onnxruntime,
            "int8_dynamic": int8_dynamic}


class Unavailable(RuntimeError):
    """A mode that cannot run on this machine; the message says why."""


# ---------------------------------------------------------------- the two models and their towers


class Model:
    """A backend whose image tower can be swapped for a mode's variant."""

    def __init__(self, name: str, backend, tower: torch.nn.Module, install: Callable):
        self.name, self.backend, self.tower, self._install = name, backend, tower, install
        self.variants: dict[str, torch.nn.Module] = {}

    def use(self, mode: str) -> None:
        self._install(self.variants[mode])


def vit_b32() -> Model:
    import open_clip
    from clipzsl.backends.openclip import OpenClipBackend

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    backend = OpenClipBackend(model, preprocess, open_clip.get_tokenizer("ViT-B-32"), spec="openclip:ViT-B-32/random")
    tower = backend.network.visual

    def install(variant):
        backend.network.visual = variant

    return Model("ViT-B-32 (random)", backend, tower, install)


def packaged() -> Model:
    backend = clipzsl.load_model()
    tower = backend.image_model  # timm EfficientNet-Lite0: forward = forward_head(forward_features(x))

    def install(variant):
        backend.image_model = WholeNet(variant) if variant is not tower else tower

    return Model(f"{backend.spec} (EfficientNet-Lite0 + MiniLM, real weights)", backend, tower, install)


# ---------------------------------------------------------------- images and the plain loop


def image_files(count: int, directory: Path) -> tuple[list[str], list[int], list[str], str]:
    """`count` real images written as PNG files (paths), their labels, the class names and the source."""
    reasons = []
    for name, options in (("tuxpaint", {}), ("emoji", {"style": "twemoji"})):
        try:
            ds = datasets.load(name, "test", count, **options)
        except datasets.DatasetUnavailable as err:
            reasons.append(f"{name}: {err}")
            continue
        merge_case_duplicates(ds)
        paths = []
        for i, image in enumerate(ds.images):
            path = directory / f"{i:04d}.png"
            image.save(path)
            paths.append(str(path))
        return paths, ds.labels, ds.classnames, f"{name}: {ds.source}"
    raise datasets.DatasetUnavailable("; ".join(reasons))


def plain_loop(model: torch.nn.Module, preprocess, paths: list[str]) -> torch.Tensor:
    """What one writes without a pipeline: decode, preprocess, stack, encode, one batch after another."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), BATCH):
            pixels = torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths[start : start + BATCH]])
            out.append(F.normalize(model.encode_image(pixels), dim=-1))
    return torch.cat(out)


def timed_embed(model: Model, mode: str, paths: list[str]) -> tuple[float, torch.Tensor]:
    model.use(mode)
    start = time.perf_counter()
    embedded = clipzsl.embed_images(model.backend, paths, batch_size=BATCH, progress=False)
    return time.perf_counter() - start, embedded.embeddings


def run(quick: bool = False, modes: list[str] | None = None) -> dict:
    load_before = common.load_average()
    vit_count, packaged_count, vit_repeats, packaged_repeats = (32, 64, 1, 1) if quick else (160, 512, 3, 1)
    modes = ["fp32"] + [m for m in (modes or MODES) if m != "fp32"]
    phase = {"start": time.perf_counter()}
    models = [vit_b32(), packaged()]
    results: dict = {"quick": quick, "batch_size": BATCH, "torch_threads": torch.get_num_threads(),
                     "modes": {}, "skipped": {}}

    with tempfile.TemporaryDirectory(prefix="clipzsl-bench-images-") as directory:
        all_paths, all_truth, classnames, source = image_files(max(vit_count, packaged_count), Path(directory))
        subsets = {models[0].name: vit_count, models[1].name: packaged_count}  # images per model
        results.update(images={models[0].name: vit_count, models[1].name: min(packaged_count, len(all_paths))},
                       image_source=source, classes=len(classnames))
        examples = {m.name: torch.stack([m.backend.preprocess(Image.open(p).convert("RGB")) for p in all_paths[:BATCH]])
                    for m in models}

        # build every variant of both towers (compile and export times are recorded, not timed in the runs)
        for mode in modes:
            info: dict = {}
            try:
                for model in models:
                    variant, extra = VARIANTS[mode](model.tower, examples[model.name])
                    model.variants[mode] = variant
                    info[model.name] = extra
            except Exception as err:  # noqa: BLE001 - a mode that fails here is reported, the rest go on
                reason = str(err) if isinstance(err, Unavailable) else f"{type(err).__name__}: {err}"
                results["skipped"][mode] = reason.splitlines()[0][:300]
                for model in models:
                    model.variants.pop(mode, None)
                print(f"image_encoding: {mode} skipped: {reason}", flush=True)
                if not isinstance(err, Unavailable):
                    traceback.print_exc()
                continue
            results["modes"][mode] = {"setup": info}
        modes = list(results["modes"])
        phase["variants"] = time.perf_counter()

        # timed runs, interleaved so that load on the shared machine hits every side alike
        vit, pack = models
        times: dict[str, dict[str, list[float]]] = {m.name: {mode: [] for mode in modes} for m in models}
        plain_s: list[float] = []
        embeddings: dict[str, dict[str, torch.Tensor]] = {m.name: {} for m in models}
        vit.use("fp32")  # one untimed batch of every side first: one-off allocations, kernel selection
        plain_loop(vit.backend.network, vit.backend.preprocess, all_paths[:BATCH])
        for model in models:
            for mode in modes:
                timed_embed(model, mode, all_paths[:BATCH])
        for r in range(max(vit_repeats, packaged_repeats)):
            for model, repeats in ((vit, vit_repeats), (pack, packaged_repeats)):
                if r >= repeats:
                    continue
                paths = all_paths[: subsets[model.name]]
                if model is vit:
                    vit.use("fp32")
                    start = time.perf_counter()
                    plain = plain_loop(vit.backend.network, vit.backend.preprocess, paths)
                    plain_s.append(time.perf_counter() - start)
                for mode in modes:
                    seconds, emb = timed_embed(model, mode, paths)
                    times[model.name][mode].append(seconds)
                    embeddings[model.name][mode] = emb
                print(f"image_encoding: run {r + 1}: {model.name}: " + ", ".join(
                    f"{mode} {len(paths) / times[model.name][mode][-1]:.1f}" for mode in modes) + " img/s", flush=True)
        phase["runs"] = time.perf_counter()
        plain_vs_fp32 = float(F.cosine_similarity(plain, embeddings[vit.name]["fp32"]).min())

        # agreement with fp32: top-1 over the class names, and embedding cosine
        for model in models:
            model.use("fp32")
            n = len(embeddings[model.name]["fp32"])
            truth_arr = np.asarray(all_truth[:n])
            clf = clipzsl.ZeroShotClassifier(model.backend, labels=classnames, templates=[TEMPLATE], progress=False)
            reference = clf.predict_proba(EmbeddedImages(embeddings[model.name]["fp32"])).argmax(axis=1)
            for mode in modes:
                emb = embeddings[model.name][mode]
                top1 = clf.predict_proba(EmbeddedImages(emb)).argmax(axis=1)
                rate = n / report.median(times[model.name][mode])
                results["modes"][mode][model.name] = {
                    "seconds": times[model.name][mode], "images_per_s": rate,
                    "vs_fp32": report.median(times[model.name]["fp32"]) / report.median(times[model.name][mode]),
                    "top1_agreement": float((top1 == reference).mean()),
                    "top1_accuracy": float((top1 == truth_arr).mean()),
                    "min_cosine_vs_fp32": float(F.cosine_similarity(emb, embeddings[model.name]["fp32"]).min()),
                }

    phase["agreement"] = time.perf_counter()
    names = list(phase)
    results["phase_s"] = {b: phase[b] - phase[a] for a, b in zip(names, names[1:])}
    plain_rate = vit_count / report.median(plain_s)
    fp32_rate = results["modes"]["fp32"][vit.name]["images_per_s"]
    results.update(
        models={"vit": vit.name, "packaged": pack.name}, plain_loop_s=plain_s, plain_loop_images_per_s=plain_rate,
        pipeline_vs_plain=fp32_rate / plain_rate, plain_vs_pipeline_min_cosine=plain_vs_fp32,
        load_average={"before": load_before, "after": common.load_average()},
    )
    results["ratios"] = [{"name": "image encoding: clipzsl vs plain loop (ViT-B-32 fp32)",
                          "value": fp32_rate / plain_rate, "target": 1.0}]
    for model, short in ((vit, "ViT-B-32"), (pack, "packaged")):
        results["ratios"] += [{"name": f"image encoding: {mode} vs fp32 ({short})",
                               "value": results["modes"][mode][model.name]["vs_fp32"], "target": None}
                              for mode in modes if mode != "fp32"]
    results["checks"] = [{"name": "image encoding: clipzsl vs plain loop", "value": f"{fp32_rate / plain_rate:.2f}x",
                          "target": ">= 1x (no slower)", "met": fp32_rate >= plain_rate}]
    lines = markdown(results, vit.name, pack.name, vit_repeats, packaged_repeats)
    results["markdown"] = lines
    report.write(NAME, results, lines)
    return results


def markdown(results: dict, vit: str, pack: str, vit_repeats: int, packaged_repeats: int) -> list[str]:
    n_vit, n_pack = results["images"][vit], results["images"][pack]
    ratio = results["pipeline_vs_plain"]
    lines = [
        f"Real images ({results['image_source']}), written as PNG files; from file to normalised embedding, "
        f"batch {results['batch_size']}, {results['torch_threads']} torch threads. ViT-B-32: {n_vit} images, "
        f"median of {vit_repeats} interleaved run(s) per side; packaged model: {n_pack} images, "
        f"{packaged_repeats} run(s) per mode. One untimed batch of every side runs first.",
        "",
        "| ViT-B-32 (random weights), fp32 | images/s | ratio |",
        "|---|---|---|",
        f"| plain loop: decode + preprocess one by one, `model.encode_image` per batch | "
        f"{results['plain_loop_images_per_s']:.1f} | 1x |",
        f"| `clipzsl.embed_images` (thread-pool decoding, batching) | "
        f"{results['modes']['fp32'][vit]['images_per_s']:.1f} | **{ratio:.2f}x** |",
        "",
        f"clipzsl versus the plain loop: **{ratio:.2f}x** (target: no slower; {'met' if ratio >= 1 else 'missed'}). "
        f"Lowest cosine between the two sides' embeddings: {results['plain_vs_pipeline_min_cosine']:.6f}.",
        "",
        f"Faster modes, through `clipzsl.embed_images`. Agreement = share of the images above whose top-1 class "
        f"(of {results['classes']} class names, `{TEMPLATE}`) is the fp32 one; the packaged default has real "
        "weights, the random ViT-B-32's predictions only test numerical fidelity.",
        "",
        "| mode | ViT-B-32 img/s | vs fp32 | ViT top-1 agreement % | ViT min cosine | packaged img/s | vs fp32 "
        "| packaged top-1 agreement % | packaged top-1 accuracy % | setup |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, row in results["modes"].items():
        v, p = row[vit], row[pack]
        setup = "; ".join(dict.fromkeys(
            f"{'ViT' if name == vit else 'packaged'} {k} {val:.0f} s" if isinstance(val, float) else f"{k} {val}"
            for name, extra in row["setup"].items() for k, val in extra.items()))
        lines.append(
            f"| {mode} | {v['images_per_s']:.1f} | {v['vs_fp32']:.2f}x | {common.pct(v['top1_agreement'])} "
            f"| {v['min_cosine_vs_fp32']:.4f} | {p['images_per_s']:.1f} | {p['vs_fp32']:.2f}x "
            f"| {common.pct(p['top1_agreement'])} | {common.pct(p['top1_accuracy'])} | {setup or '—'} |")
    for mode, reason in results["skipped"].items():
        lines.append(f"| {mode} | skipped: {reason} | | | | | | | | |")
    lines += ["", "Compile and export times are paid once per process and are not in the images/s; compiling "
              "takes much longer with torch inductor's on-disk cache cold (first compile on a machine) than warm."]
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--modes", nargs="+", choices=MODES, help="default: all (fp32 always runs)")
    args = parser.parse_args(argv)
    if args.quick:
        report.quick_results()
    run(args.quick, args.modes)
    print((report.RESULTS_DIR / f"{NAME}.md").read_text())


if __name__ == "__main__":
    main()
