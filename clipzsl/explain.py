"""Pictures of where a label looks in an image: the maps of `clipzsl.maps` over the image.

The map is stretched over exactly the part of the image the model was shown (`HeatMap.box`). The
picture keeps the image at its own size, with the label, its probability and the map's method in a
strip below it and a colour scale beside it.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from .adapter import CrossAttentionAdapter
from .backends import Backend
from .classifier import ZeroShotClassifier
from .images import ImageLoadError, ImageSource, check_output, expand_sources, load_image
from .maps import HeatMap

logger = logging.getLogger(__name__)
from .prompts import DEFAULT_TEMPLATES, LabelsArg, TemplatesArg


MIN_PICTURE_SIDE, MIN_PICTURE_HEIGHT = 256, 64  # pixels: smaller images are enlarged in their pictures
MAX_PICTURE_SIDE = 4096  # but never beyond this


def colormap(x: np.ndarray) -> np.ndarray:
    """[H, W] in [0, 1] -> [H, W, 3] uint8, a blue-cyan-yellow-red ramp (no matplotlib needed)."""
    stops = np.array([[0, 0, 128], [0, 128, 255], [0, 255, 255], [255, 255, 0], [255, 64, 0], [160, 0, 0]], float)
    pos = np.clip(x, 0, 1) * (len(stops) - 1)
    lo = np.floor(pos).astype(int).clip(0, len(stops) - 2)
    frac = (pos - lo)[..., None]
    return (stops[lo] * (1 - frac) + stops[lo + 1] * frac).astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, box: tuple[int, int, int, int], opacity: float = 0.5) -> Image.Image:
    """The image (its own size) with `heat` ([h, w], any range) stretched over `box` (left, top, right, bottom)."""
    image = image.convert("RGB")
    left, top, right, bottom = box
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
    size = int(np.clip(min(max(w, h) / 40, h / 5), 10, 48))  # "high" and "low" fit one above the other
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


def legible(picture: Image.Image) -> Image.Image:
    """`picture` enlarged by a whole factor (nearest neighbour: pixels stay visible) until its longer side is
    `MIN_PICTURE_SIDE` and its height `MIN_PICTURE_HEIGHT`, so that a thumbnail's colour scale has room
    for "high" above "low"."""
    w, h = picture.size
    factor = min(max(-(-MIN_PICTURE_SIDE // max(w, h)), -(-MIN_PICTURE_HEIGHT // h)), max(1, MAX_PICTURE_SIDE // max(w, h)))
    return picture.resize((w * factor, h * factor), Image.Resampling.NEAREST) if factor > 1 else picture


def picture(image: Image.Image, heat_map: HeatMap, column: int, caption: str) -> Image.Image:
    """Label `column`'s map of `heat_map` over `image`, captioned, with its colour scale and the method's name."""
    return annotate(legible(overlay(image, heat_map.grid[column], heat_map.box)), f"{caption} ({heat_map.method})")


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


@dataclass(frozen=True)
class Explanation:
    """What `explain` did: the pictures it wrote, and the images it could not read (skipped, with why)."""

    written: list[Path]
    failures: list[ImageLoadError]


def explain(
    model: Backend,
    images: ImageSource | Sequence[ImageSource],
    labels: LabelsArg,
    out_dir: str | Path,
    adapter: CrossAttentionAdapter | str | Path | None = None,
    templates: TemplatesArg | None = None,
    method: str | None = None,
) -> Explanation:
    """Write one PNG per (image, label) into `out_dir`, `<image stem>__<label>.png` (see
    `output_stems`): the image at its own size with the label's map (`method`, see
    `clipzsl.maps.method_named`) over what the model saw, the label and its probability (among
    `labels`) below, the colour scale beside it. Unreadable images are skipped (logged, and listed in the
    `Explanation`), as `classify` skips them."""
    check_output(out_dir, images, writes_images=True)
    if isinstance(adapter, (str, Path)):
        adapter = CrossAttentionAdapter.load(adapter, model)
    saved = adapter.meta.get("templates") if adapter is not None else None
    clf = ZeroShotClassifier(model, labels=labels, templates=templates or saved or DEFAULT_TEMPLATES, cache=False,
                             adapter=adapter)
    sources = expand_sources(images)
    stems = output_stems(sources)
    pictures, failures = [], []
    for i, source in enumerate(sources):
        try:
            pictures.append((i, load_image(source)))
        except ImageLoadError as err:
            logger.warning("skipped %s", err)
            failures.append(err)
    probs = clf.predict_proba([picture for _, picture in pictures]) if pictures else np.zeros((0, len(clf.labels)))
    label_names = _distinct([_slug(name) for name in clf.labels])
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for (i, image), row in zip(pictures, probs):
        heat_map, = clf.heatmaps([image], method)
        for c, name in enumerate(clf.labels):
            path = out_dir / f"{stems[i]}__{label_names[c]}.png"
            picture(image, heat_map, c, f"{name}: {row[c]:.1%}").save(path)
            written.append(path)
    return Explanation(written, failures)
