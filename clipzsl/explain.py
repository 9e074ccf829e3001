"""Heatmaps of where a label looks in an image.

With an adapter: its attention (mean over heads, the global token left out) of the label's
query over the image's spatial tokens. Without one: the patch-to-text cosine similarity map
(each spatial token against the label's embedding). The token grid covers the backbone's
centre crop, so the map is drawn over that region of the original image, which is kept at
its own size.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .images import ImageSource, expand_sources, load_image


def crop_fraction(backend) -> float:
    """Side of the centre crop / shorter side after resize, read from a torchvision Compose (else 1)."""
    resize = crop = None
    for t in getattr(backend.preprocess, "transforms", []):
        name = type(t).__name__
        size = getattr(t, "size", None)
        if isinstance(size, (list, tuple)):
            size = size[0]
        if name == "Resize" and isinstance(size, int):
            resize = size
        elif name == "CenterCrop" and isinstance(size, int):
            crop = size
    return min(1.0, crop / resize) if resize and crop else 1.0


def grid_of(values: torch.Tensor) -> np.ndarray:
    """[T] -> [h, w] (square grid; T must be a square number)."""
    t = values.numel()
    side = int(round(math.sqrt(t)))
    if side * side != t:
        raise ValueError(f"cannot lay {t} tokens out on a square grid")
    return values.reshape(side, side).float().numpy()


def colormap(x: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-cyan-yellow-red ramp (no matplotlib needed)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]], float)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, fraction: float = 1.0, opacity: float = 0.5) -> Image.Image:
    """The image (its own size) with `heat` ([h, w], any range) drawn over its centre crop."""
    image = image.convert("RGB")
    w, h = image.size
    side = int(round(min(w, h) * fraction))
    left, top = (w - side) // 2, (h - side) // 2
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    small = Image.fromarray((norm * 255).astype(np.uint8)).resize((side, side), Image.BILINEAR)
    colored = Image.fromarray(colormap(np.asarray(small, float) / 255))
    out = image.copy()
    region = out.crop((left, top, left + side, top + side))
    out.paste(Image.blend(region, colored, opacity), (left, top))
    return out


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")[:60] or "label"


def heatmaps(backend, images: Sequence[ImageSource], class_emb: torch.Tensor, adapter=None) -> torch.Tensor:
    """[N, C, T] maps: adapter attention (mean over heads, without the global token) or patch-text cosine."""
    from .adapter import extract_features

    feats = extract_features(backend, list(images), cache=False)
    with torch.no_grad():
        if adapter is not None:
            attn = adapter.attention(class_emb, feats.tokens, feats.pooled).mean(2)  # [N, C, T']
            return attn[..., 1:] if adapter.config.global_token else attn
        return torch.einsum("ntd,cd->nct", F.normalize(feats.tokens, dim=-1), class_emb)


def explain(
    backend,
    images: ImageSource | Sequence[ImageSource],
    labels,
    out_dir,
    adapter=None,
    templates=None,
) -> list[Path]:
    """Write one PNG per (image, label) into `out_dir`: `<image stem>__<label>.png`, the image's size."""
    from .classifier import class_embeddings
    from .prompts import DEFAULT_TEMPLATES, load_labels, load_templates

    if isinstance(adapter, (str, Path)):
        from .adapter import CrossAttentionAdapter

        adapter = CrossAttentionAdapter.load(adapter, backend)
    entries = load_labels(labels)
    tmpl = load_templates(templates or (adapter.meta.get("templates") if getattr(adapter, "meta", None)
                                        and adapter.meta.get("templates") else DEFAULT_TEMPLATES))
    emb = class_embeddings(backend, entries, tmpl)
    sources = expand_sources(images)
    maps = heatmaps(backend, sources, emb, adapter)
    fraction = crop_fraction(backend)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, src in enumerate(sources):
        image = load_image(src)
        stem = Path(src).stem if isinstance(src, (str, Path)) else f"image{i}"
        for c, entry in enumerate(entries):
            path = out_dir / f"{_slug(stem)}__{_slug(entry.name)}.png"
            overlay(image, grid_of(maps[i, c]), fraction).save(path)
            written.append(path)
    return written
