"""Heat maps: where in an image each label is, as one [C, h, w] grid per image, by a named method.

Pictures (`clipzsl.explain`), the service's /explain and the benchmarks all read maps through
`image_maps` (or `ZeroShotClassifier.heatmaps`). A method turns a preprocessed batch and the class
embeddings into [N, C, h, w] scores, higher where the label is (`MapMethod`); `METHODS` names them
and `default_method` picks one for a model. The grid covers the part of the image the model was
shown (`View`: the whole image squeezed to the input size, or a centre square), which `HeatMap.box`
gives in the image's own pixels.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, is_dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .adapter import CrossAttentionAdapter
from .backends import Backend
from .errors import InputError
from .family_maps import gradcam_spatial, gscorecam, has_conv_feature_map, has_feature_map, is_attention_pooled, maskclip_pooled
from .packaged_maps import cam, confident_cosine, conse_centred, conse_dot, conse_flip, conse_multiscale, is_packaged
from .vit_maps import METHODS as VIT_METHODS
from .vit_maps import applies as vit_applies

#: (model, pixels [N, 3, H, W] on the model's device, class embeddings [C, D]) -> maps [N, C, h, w]
MapMethod = Callable[[Backend, torch.Tensor, torch.Tensor], torch.Tensor]


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


@dataclass(frozen=True)
class HeatMap:
    """One image's maps. `grid`: [C, h, w] float32, one map per label in the classifier's order, higher
    where the label is (the scale is the method's own); `box`: (left, top, right, bottom), the part of
    the image the grid covers, in the image's pixels; `method`: the name of the method that drew it."""

    grid: np.ndarray
    box: tuple[int, int, int, int]
    method: str


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


def grid_of(values: torch.Tensor) -> torch.Tensor:
    """[..., T] -> [..., h, w] (a square grid; T must be a square number)."""
    t = values.shape[-1]
    side = int(round(math.sqrt(t)))
    if side * side != t:
        raise InputError(f"cannot lay {t} tokens out on a square grid")
    return values.reshape(*values.shape[:-1], side, side)


def cosine(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Each spatial token's cosine to each label: the raw patch-to-text map."""
    _, tokens = model.encode_images(pixels, return_tokens=True)
    return grid_of(torch.einsum("ntd,cd->nct", F.normalize(tokens.float(), dim=-1), class_embeddings))


def adapter_attention(adapter: CrossAttentionAdapter) -> MapMethod:
    """The method of a trained adapter: each label's attention over the spatial tokens (mean over
    heads, the global token left out)."""
    def attention(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        pooled, tokens = model.encode_images(pixels, return_tokens=True)
        attn = adapter.attention(class_embeddings, tokens.float(), pooled.float()).mean(2)  # [N, C, T']
        return grid_of(attn[..., 1:] if adapter.config.global_token else attn)
    return attention


@dataclass(frozen=True)
class Method:
    """A training-free method: `draw` makes the maps, `applies` says whether it can for a model."""

    draw: MapMethod
    applies: Callable[[Backend], bool]


def has_tokens(model: Backend) -> bool:
    """Whether the model gives spatial tokens in the joint space (`encode_images(return_tokens=True)`)."""
    return model.spatial_tokens


def on_grid(scores: Callable[[Backend, torch.Tensor, torch.Tensor], torch.Tensor]) -> MapMethod:
    """A method giving [N, C, T] scores over a square map's positions as a `MapMethod` (laid out by `grid_of`)."""
    def draw(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        return grid_of(scores(model, pixels, class_embeddings))
    return draw


def by_family(*methods: Method) -> Method:
    """One method's name over several model families: drawn by the first of `methods` that applies."""
    def draw(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        return next(m for m in methods if m.applies(model)).draw(model, pixels, class_embeddings)
    return Method(draw, lambda model: any(m.applies(model) for m in methods))


#: per family, its implementations: ViT CLIP's last-block readings (`clipzsl.vit_maps`), and the value path
#: and gradient maps of attention-pooled and convolutional towers (`clipzsl.family_maps`)
_VIT = {name: Method(on_grid(scores), vit_applies) for name, scores in VIT_METHODS.items()}
_POOLED = {"maskclip": Method(on_grid(maskclip_pooled), is_attention_pooled),
           "gradcam": Method(on_grid(gradcam_spatial), has_feature_map),
           "gscorecam": Method(on_grid(gscorecam), has_conv_feature_map)}

#: the training-free methods, by name; the first that applies to a model is its default (`default_method`)
#: (the packaged model's maps that keep each cell's confidence come first: they point at the object far more
#: often than its cosine; `conse_multiscale` leads, chosen by bench_localisation's development/held-out
#: protocol, benchmarks/results/localisation.md)
METHODS: dict[str, Method] = {
    "conse_multiscale": Method(conse_multiscale, is_packaged), "conse_dot": Method(conse_dot, is_packaged),
    "conse_flip": Method(conse_flip, is_packaged), "conse_centred": Method(conse_centred, is_packaged),
    "confident_cosine": Method(confident_cosine, is_packaged),
    "cam": Method(cam, is_packaged), "cosine": Method(cosine, has_tokens),
    **{name: by_family(*(family[name] for family in (_VIT, _POOLED) if name in family)) for name in {**_VIT, **_POOLED}},
}


def methods_for(model: Backend) -> list[str]:
    """The names of the training-free methods that can draw `model`'s maps, its default first."""
    return [name for name, method in METHODS.items() if method.applies(model)]


def default_method(model: Backend) -> str:
    """The method a model's maps use unless another is asked for: the first of `METHODS` that applies."""
    names = methods_for(model)
    if not names:
        raise InputError(f"no heat-map method draws maps for {model.spec}")
    return names[0]


def method_named(model: Backend, method: str | None, adapter: CrossAttentionAdapter | None = None) -> tuple[str, MapMethod]:
    """(name, function) of `method` for `model`: None is the adapter's attention where there is an
    adapter, else `default_method`; "adapter" needs one; an unknown name is an InputError listing the known."""
    if method == "adapter" or (method is None and adapter is not None):
        if adapter is None:
            raise InputError("method 'adapter' needs a trained adapter: pass adapter=PATH_OR_OBJECT (--adapter)")
        return "adapter", adapter_attention(adapter)
    name = method or default_method(model)
    if name not in METHODS:
        raise InputError(f"unknown heat-map method {name!r}; pick one of {', '.join([*METHODS, 'adapter'])}")
    if not METHODS[name].applies(model):
        raise InputError(f"heat-map method {name!r} does not apply to {model.spec}; pick one of "
                         f"{', '.join(methods_for(model))}")
    return name, METHODS[name].draw


def image_maps(model: Backend, images: Sequence[Image.Image], class_embeddings: torch.Tensor,
               method: str | None = None, adapter: CrossAttentionAdapter | None = None) -> list[HeatMap]:
    """One `HeatMap` per image (decoded RGB images): `method`'s maps of every label (`method_named`)."""
    name, function = method_named(model, method, adapter)
    maps = []
    for image in images:
        pixels = model.normalize_pixels(model.pixels_uint8(image)[None])
        with torch.no_grad():
            grid = function(model, pixels, class_embeddings.to(pixels.device))[0]
        maps.append(HeatMap(grid.float().cpu().numpy(), image_view(model, image).box(*image.size), name))
    return maps


def peak_region(grid: np.ndarray, share: float = 0.5) -> np.ndarray:
    """[h, w] bool: the cells 4-connected to the map's peak whose value is at least `share` of the way from
    the map's lowest value to its peak (the peak alone when the map is flat)."""
    peak = np.unravel_index(int(np.argmax(grid)), grid.shape)
    lo, hi = float(grid.min()), float(grid[peak])
    above = grid >= lo + share * (hi - lo) if hi > lo else np.zeros(grid.shape, bool)
    region = np.zeros(grid.shape, bool)
    region[peak] = True
    frontier = [peak]
    while frontier:
        y, x = frontier.pop()
        for cell in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
            if 0 <= cell[0] < grid.shape[0] and 0 <= cell[1] < grid.shape[1] and above[cell] and not region[cell]:
                region[cell] = True
                frontier.append(cell)
    return region


def peak_box(heat_map: HeatMap, column: int, share: float = 0.5) -> tuple[tuple[int, int, int, int], float]:
    """(box, score) of label `column`'s peak: the (left, top, right, bottom) pixels of the image covered by
    `peak_region`'s cells, and the map's value at the peak."""
    grid = heat_map.grid[column]
    rows, cols = np.nonzero(peak_region(grid, share))
    left, top, right, bottom = heat_map.box
    h, w = grid.shape
    cell_w, cell_h = (right - left) / w, (bottom - top) / h
    box = (left + math.floor(cols.min() * cell_w), top + math.floor(rows.min() * cell_h),
           left + math.ceil((cols.max() + 1) * cell_w), top + math.ceil((rows.max() + 1) * cell_h))
    return box, float(grid.max())


def square_box(box: tuple[int, int, int, int], size: tuple[int, int], scale: float = 1.5) -> tuple[int, int, int, int]:
    """The square of side `scale` times `box`'s longer side (at most the image's shorter side), centred on
    `box` and shifted to lie inside an image of `size` (width, height): a crop a model that views a centred
    square (the packaged one) sees whole, with some context around the peak."""
    left, top, right, bottom = box
    width, height = size
    side = max(1, min(round(scale * max(right - left, bottom - top)), width, height))
    x = min(max(round((left + right - side) / 2), 0), width - side)
    y = min(max(round((top + bottom - side) / 2), 0), height - side)
    return x, y, x + side, y + side


def positive_share(grid: np.ndarray, weights: np.ndarray) -> float:
    """The share of a map's positive energy (its values clipped at 0) on a region given per cell as the
    share of the cell it covers (`weights`, the grid's shape, in [0, 1]); 0 for a map with no positive value."""
    positive = np.clip(grid, 0, None)
    total = float(positive.sum())
    return float((positive * weights).sum()) / total if total > 0 else 0.0


def border_share(heat_map: HeatMap, column: int, band: float = 0.1) -> float:
    """A bias check: the share of label `column`'s positive energy on the border of the part of the image
    the map covers (`HeatMap.box`), the outer `band` of each side, the grid laid over the box cell by cell.
    An even map gives 1 - (1 - 2 band)^2 (0.36 at 0.1); much more says the label rests on the edges."""
    grid = heat_map.grid[column]
    inner = _inner_share(grid.shape[0], band)[:, None] * _inner_share(grid.shape[1], band)[None, :]
    return positive_share(grid, 1 - inner)


def _inner_share(cells: int, band: float) -> np.ndarray:
    """[cells]: the share of each of `cells` equal cells of [0, 1] that lies inside [band, 1 - band]."""
    low = np.arange(cells) / cells
    return np.clip(np.minimum(low + 1 / cells, 1 - band) - np.maximum(low, band), 0, None) * cells
