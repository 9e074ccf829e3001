"""Image preprocessing with Pillow and numpy only, for `onnx:` models served without torch.

Each transform takes an RGB PIL image and gives float32 [3, H, W], the same values as the source
family's torch transform: torchvision resizes PIL images with Pillow itself, so resizing, cropping,
padding and the float32 scaling and normalisation here repeat its steps operation for operation.

Also the packaged model's view rules (its normalisation, crop padding and cut-out detector), which
`backends.packaged` builds its torchvision transforms from.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image, ImageOps

#: TF-Lite edge models were trained on (x*255 - 127) / 128, not on ImageNet mean/std.
MEAN, STD = (127 / 255,) * 3, (128 / 255,) * 3
#: TF's eval crop: resize the shorter side to size + 32, then centre-crop `size`.
CROP_PADDING = 32
#: The cut-out detector of the default view (`is_cutout`): the border is the outer 5% of each side;
#: a cut-out has at least half of it within 4 levels of one colour. Chosen on validation cut-outs
#: (Twemoji, Noto) and photos (CIFAR dogs and cats, train split): benchmarks/results/view_rule.md.
BORDER = 0.05
BORDER_TOLERANCE = 4
CUTOUT_SHARE = 0.5
#: open_clip's interpolation names -> Pillow's filters (torchvision maps its modes to the same ones)
RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}

Transform = Callable[[Image.Image], np.ndarray]


def border_uniformity(image: Image.Image, tolerance: int = BORDER_TOLERANCE) -> float:
    """Share of the pixels in the image's outer border (BORDER of each side) within `tolerance`
    levels, on every channel, of the border's median colour.

    A cut-out's background, transparent (composited on white by `clipzsl.images.to_rgb`) or a
    plain backdrop, makes most of its border one colour; a photo's border is its scene. Only the
    four strips are read, so a large photo costs no more than its border.
    """
    w, h = image.size
    bw, bh = max(1, round(BORDER * w)), max(1, round(BORDER * h))
    inner_top, inner_bottom = min(bh, h), max(bh, h - bh)
    boxes = [(0, 0, w, inner_top), (0, inner_bottom, w, h),
             (0, inner_top, bw, inner_bottom), (max(bw, w - bw), inner_top, w, inner_bottom)]
    pixels = np.concatenate([np.asarray(image.crop(box).convert("RGB"), np.int16).reshape(-1, 3) for box in boxes])
    if len(pixels) == 0:
        return 0.0
    median = np.median(pixels, axis=0)
    return float((np.abs(pixels - median).max(axis=1) <= tolerance).mean())


def is_cutout(image: Image.Image) -> bool:
    """Whether an image is a cut-out (object on a transparent or plain background) rather than a photo."""
    return border_uniformity(image) >= CUTOUT_SHARE


def to_array(image: Image.Image, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """RGB [H, W, 3] uint8 -> float32 [3, H, W]: /255, minus mean, over std, each step in float32 (ToTensor
    then Normalize)."""
    scaled = np.asarray(image.convert("RGB"), dtype=np.float32) / np.float32(255)
    normalised = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(normalised.transpose(2, 0, 1))


def resize(image: Image.Image, size: tuple[int, int], resample: int) -> Image.Image:
    """To (width, height); an image already that size is kept as it is."""
    return image if image.size == size else image.resize(size, resample)


def resize_shorter(image: Image.Image, side: int, resample: int) -> Image.Image:
    """The shorter side to `side`, the longer in proportion, rounded down (torchvision's Resize(int))."""
    w, h = image.size
    short, long = min(w, h), max(w, h)
    other = int(side * long / short)
    return resize(image, (side, other) if w <= h else (other, side), resample)


def resize_keep_ratio(image: Image.Image, size: tuple[int, int], longest: float, resample: int) -> Image.Image:
    """Scale to (height, width) `size` keeping the aspect ratio: longest=1 fits the longer side, 0 the
    shorter (open_clip's ResizeKeepRatio, without its training-time jitter)."""
    w, h = image.size
    ratio_h, ratio_w = h / size[0], w / size[1]
    ratio = max(ratio_h, ratio_w) * longest + min(ratio_h, ratio_w) * (1.0 - longest)
    return resize(image, (round(w / ratio), round(h / ratio)), resample)


def center_crop_or_pad(image: Image.Image, size: tuple[int, int], fill: int = 0) -> Image.Image:
    """The centred (height, width) `size` box; a side shorter than it is first padded with `fill`, evenly
    (the odd pixel after), as torchvision's CenterCrop (fill 0) and open_clip's CenterCropOrPad do."""
    height, width = size
    w, h = image.size
    if width > w or height > h:
        pad_w, pad_h = max(width - w, 0), max(height - h, 0)
        border = (pad_w // 2, pad_h // 2, (pad_w + 1) // 2, (pad_h + 1) // 2)
        image = ImageOps.expand(image, border=border, fill=(fill,) * len(image.getbands()))
        w, h = image.size
        if (w, h) == (width, height):
            return image
    top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
    return image.crop((left, top, left + width, top + height))


def packaged_view(size: int, view: str) -> Transform:
    """The packaged model's preprocessing (`backends.packaged.image_transform` / `AutoView`): "whole"
    squeezes the image to size x size, "crop" is TF-Lite's evaluation crop, "square" the largest centred
    square, "auto" whole for a cut-out and square for a photo."""
    bicubic = Image.Resampling.BICUBIC
    if view == "auto":
        whole, square = packaged_view(size, "whole"), packaged_view(size, "square")
        return lambda image: whole(image) if is_cutout(image) else square(image)
    if view == "whole":
        return lambda image: to_array(resize(image, (size, size), bicubic), MEAN, STD)
    padding = CROP_PADDING if view == "crop" else 0
    return lambda image: to_array(center_crop_or_pad(resize_shorter(image, size + padding, bicubic), (size, size)),
                                  MEAN, STD)


def _open_clip_geometry(size: tuple[int, int], mode: str, resample: int, fill: int) -> Callable[[Image.Image],
                                                                                                 Image.Image]:
    """open_clip's evaluation resize and crop for one `resize_mode`."""
    if mode == "longest":
        return lambda image: center_crop_or_pad(resize_keep_ratio(image, size, 1.0, resample), size, fill)
    if mode == "squash":
        return lambda image: resize(image, (size[1], size[0]), resample)
    if size[0] == size[1]:
        return lambda image: center_crop_or_pad(resize_shorter(image, size[0], resample), size)
    # a non-square shortest-side resize: open_clip's ResizeKeepRatio at its default, bicubic
    return lambda image: center_crop_or_pad(resize_keep_ratio(image, size, 0.0, Image.Resampling.BICUBIC), size)


def open_clip_view(cfg: dict[str, Any]) -> Transform:
    """open_clip's `image_transform_v2(PreprocessCfg(**cfg), is_train=False)`; `cfg` holds its size, mean,
    std, interpolation, resize_mode and fill_color (a model's `visual.preprocess_cfg`)."""
    raw = cfg["size"]
    size = (raw, raw) if isinstance(raw, int) else (int(raw[0]), int(raw[1]))
    mean, std = cfg.get("mean"), cfg.get("std")
    mean = tuple(mean) if isinstance(mean, (list, tuple)) else (mean,) * 3
    std = tuple(std) if isinstance(std, (list, tuple)) else (std,) * 3
    resample = RESAMPLE["bilinear" if cfg.get("interpolation") == "bilinear" else "bicubic"]
    geometry = _open_clip_geometry(size, cfg.get("resize_mode") or "shortest", resample, cfg.get("fill_color") or 0)
    return lambda image: to_array(geometry(image), mean, std)
