"""Heatmaps of where a label looks in an image.

With an adapter: its attention (mean over heads, the global token left out) of the label's
query over the image's spatial tokens. Without one: the patch-to-text cosine similarity map
(each spatial token against the label's embedding). The token grid covers what the backbone
was shown: the whole image squeezed to a square (the packaged default) or a centre crop
(CLIP models, `packaged+crop`), so the map is stretched over exactly that part of the original
image. The picture keeps the image at its own size, with the label and its probability in a
strip below it and a colour scale beside it.
"""
from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from .adapter import CrossAttentionAdapter, tokens_of
from .backends import Backend
from .classifier import ZeroShotClassifier
from .errors import InputError
from .images import EmbeddedImages, ImageSource, check_output, expand_sources, load_image
from .prompts import DEFAULT_TEMPLATES, LabelsArg, TemplatesArg


@dataclass(frozen=True)
class View:
    """The part of an image that a backend's input shows.

    `squeeze`: the whole image resized to the input size, aspect ratio not kept; otherwise the
    shorter side is resized and a centre square cut out. `crop`: side of the centre crop over
    the resized side (for `squeeze`, per axis)."""

    squeeze: bool
    crop: float = 1.0

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of that part in an image of this size."""
        if self.squeeze:
            w, h = round(width * self.crop), round(height * self.crop)
        else:
            w = h = round(min(width, height) * self.crop)
        w, h = max(1, w), max(1, h)
        left, top = (width - w) // 2, (height - h) // 2
        return left, top, left + w, top + h


def image_view(model: Backend, image: Image.Image | None = None) -> View:
    """The `View` of a model's preprocessing, read from its transformers image processor (hf:)
    or its torchvision Compose (open_clip, packaged). A preprocessing that picks its view per image
    (the packaged default's `transform_for`) is asked for `image`'s. Anything else is taken as CLIP's
    centre square."""
    processor = getattr(getattr(model, "processor", None), "image_processor", None)
    if processor is not None:
        return _processor_view(processor)
    transform = model.preprocess
    if image is not None and hasattr(transform, "transform_for"):
        transform = transform.transform_for(image)
    return _compose_view(transform)


def _processor_view(processor: Any) -> View:
    """The `View` of a transformers image processor (its resize and centre-crop settings)."""
    size = _size_fields(processor.size) if getattr(processor, "do_resize", True) else {}
    crop = _size_fields(processor.crop_size) if getattr(processor, "do_center_crop", False) else {}
    squeeze = "height" in size and "width" in size
    resize = size.get("height") if squeeze else size.get("shortest_edge")
    return View(squeeze, min(1.0, crop["height"] / resize) if resize and "height" in crop else 1.0)


def _compose_view(transform: Any) -> View:
    """The `View` of a torchvision Compose: its Resize and CenterCrop steps (none: CLIP's centre square)."""
    resize = crop = None
    squeeze = False
    for t in getattr(transform, "transforms", []):
        size = getattr(t, "size", None)
        pair = isinstance(size, (list, tuple)) and len(size) == 2
        side = size[0] if isinstance(size, (list, tuple)) else size
        if type(t).__name__ == "Resize":
            squeeze, resize = pair, side  # Resize((h, w)) squeezes; Resize(n) scales the shorter side to n
        elif type(t).__name__ == "CenterCrop":
            crop = side
    return View(squeeze, min(1.0, crop / resize) if resize and crop else 1.0)


def _size_fields(size: Any) -> dict:
    """A processor's size (a dict, transformers 5's SizeDict, or a bare int) as a dict of its set fields."""
    if isinstance(size, int):
        return {"shortest_edge": size}
    fields = asdict(size) if is_dataclass(size) and not isinstance(size, type) else dict(size)
    return {k: v for k, v in fields.items() if v is not None}


def grid_of(values: torch.Tensor) -> np.ndarray:
    """[T] -> [h, w] (square grid; T must be a square number)."""
    t = values.numel()
    side = int(round(math.sqrt(t)))
    if side * side != t:
        raise InputError(f"cannot lay {t} tokens out on a square grid")
    return values.reshape(side, side).float().numpy()


def colormap(x: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-cyan-yellow-red ramp (no matplotlib needed)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]], float)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, view: View = View(squeeze=False),
            opacity: float = 0.5) -> Image.Image:
    """The image (its own size) with `heat` ([h, w], any range) stretched over the part `view` shows."""
    image = image.convert("RGB")
    left, top, right, bottom = view.box(*image.size)
    lo, hi = float(heat.min()), float(heat.max())
    norm = (heat - lo) / (hi - lo) if hi > lo else np.zeros_like(heat)
    small = Image.fromarray((norm * 255).astype(np.uint8)).resize((right - left, bottom - top),
                                                                  Image.Resampling.BILINEAR)
    colored = Image.fromarray(colormap(np.asarray(small, float) / 255))
    out = image.copy()
    region = out.crop((left, top, right, bottom))
    out.paste(Image.blend(region, colored, opacity), (left, top))
    return out


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)  # scalable since Pillow 10.1
    except TypeError:  # Pillow 10.0: its one fixed-size bitmap font
        return ImageFont.load_default()


def annotate(picture: Image.Image, caption: str) -> Image.Image:
    """`picture` on a white canvas with `caption` in a strip below it and the colour scale of
    `colormap` beside it (high at the top, low at the bottom)."""
    w, h = picture.size
    size = int(np.clip(max(w, h) / 40, 10, 48))
    font, pad = _font(size), max(2, size // 3)
    text_w = max(font.getlength(t) for t in ("high", "low"))
    low_h, caption_h = font.getbbox("low")[3], font.getbbox(caption)[3]
    scale_w = int(pad + size + pad + text_w + pad)
    canvas = Image.new("RGB", (max(w + scale_w, int(font.getlength(caption)) + 2 * pad), int(h + caption_h + 2 * pad)),
                       "white")
    canvas.paste(picture, (0, 0))
    ramp = np.repeat(np.linspace(1, 0, h)[:, None], size, axis=1)
    canvas.paste(Image.fromarray(colormap(ramp)), (w + pad, 0))
    draw = ImageDraw.Draw(canvas)
    draw.text((w + 2 * pad + size, 0), "high", fill="black", font=font)
    draw.text((w + 2 * pad + size, h - low_h), "low", fill="black", font=font)
    draw.text((pad, h + pad), caption, fill="black", font=font)
    return canvas


def picture(model: Backend, image: Image.Image, heat: torch.Tensor, caption: str) -> Image.Image:
    """One label's map `heat` ([T] tokens) over `image` where `model` looked, captioned, with its colour scale."""
    return annotate(overlay(image, grid_of(heat), image_view(model, image)), caption)


def heatmaps(images: EmbeddedImages, class_embeddings: torch.Tensor,
             adapter: CrossAttentionAdapter | None = None) -> torch.Tensor:
    """[N, C, T] maps from images embedded with their tokens: adapter attention (mean over heads,
    without the global token) or patch-text cosine."""
    tokens = tokens_of(images)
    with torch.no_grad():
        if adapter is not None:
            attn = adapter.attention(class_embeddings, tokens, images.embeddings).mean(2)  # [N, C, T']
            return attn[..., 1:] if adapter.config.global_token else attn
        return torch.einsum("ntd,cd->nct", F.normalize(tokens, dim=-1), class_embeddings)


def _slug(text: str) -> str:
    return re.sub(r"[^\w.-]+", "_", text).strip("_")[:60] or "label"


def _distinct(names: list[str]) -> list[str]:
    """`names` with the repeated ones numbered by position (a-0, a-3), so no two are equal."""
    counts = Counter(names)
    return [f"{n}-{i}" if counts[n] > 1 else n for i, n in enumerate(names)]


def output_stems(sources: Sequence[ImageSource]) -> list[str]:
    """A distinct file-name stem per image: its own stem, with its parent folder's name in front
    where stems collide (a/cat.png, b/cat.png -> a_cat, b_cat), numbered if they still do."""
    paths = [Path(s) if isinstance(s, (str, Path)) else None for s in sources]
    stems = [_slug(p.stem) if p else f"image{i}" for i, p in enumerate(paths)]
    counts = Counter(stems)
    return _distinct([f"{_slug(p.parent.name)}_{s}" if p and p.parent.name and counts[s] > 1 else s
                      for p, s in zip(paths, stems)])


def explain(
    model: Backend,
    images: ImageSource | Sequence[ImageSource],
    labels: LabelsArg,
    out_dir: str | Path,
    adapter: CrossAttentionAdapter | str | Path | None = None,
    templates: TemplatesArg | None = None,
) -> list[Path]:
    """Write one PNG per (image, label) into `out_dir`, `<image stem>__<label>.png` (see
    `output_stems`): the image at its own size with the label's map over what the model saw,
    the label and its probability (among `labels`) below, the colour scale beside it."""
    check_output(out_dir, images, writes_images=True)
    if isinstance(adapter, (str, Path)):
        adapter = CrossAttentionAdapter.load(adapter, model)
    saved = adapter.meta.get("templates") if adapter is not None else None
    clf = ZeroShotClassifier(model, labels=labels, templates=templates or saved or DEFAULT_TEMPLATES, cache=False,
                             adapter=adapter)
    sources = expand_sources(images)
    embedded = clf.embed(sources, return_tokens=True)
    probs = clf.predict_proba(embedded)
    maps = heatmaps(embedded, clf.class_embeddings, clf.adapter)
    label_names = _distinct([_slug(name) for name in clf.labels])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, (src, stem) in enumerate(zip(sources, output_stems(sources))):
        image = load_image(src)
        for c, name in enumerate(clf.labels):
            path = out_dir / f"{stem}__{label_names[c]}.png"
            picture(model, image, maps[i, c], f"{name}: {probs[i, c]:.1%}").save(path)
            written.append(path)
    return written
