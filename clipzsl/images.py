"""From paths, folders and PIL images to embeddings, skipping what cannot be read.

`EmbeddedImages` is the one type of embedded images (pooled embeddings, optional
spatial tokens, where they came from, what failed); every head, the adapter's
training and the evaluation take it. Decoding and resizing run in a thread pool
(Pillow releases the GIL while it decodes and resizes), at most two batches ahead of
the encoder, and hand over uint8 pixels: a quarter of float32's bytes in memory and
on the way to the device (pinned for an asynchronous copy to CUDA), where the model
converts and normalises them. JPEG files can instead be decoded on the device
(`decode="device"`, nvJPEG on CUDA). `embed_images_cached` keeps (pooled, tokens) of a fixed image
list on disk under `<cache_dir>/image-features/`, for training and evaluation,
which embed the same images again and again.
"""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import os
import stat
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence, TypeVar, Union

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .arrays import is_torch, ops
from .backends.base import Backend, CacheArg, cache_dir_of, device_kind
from .errors import ClipzslError, InputError
from .store import atomic_write, own_cache_root

if TYPE_CHECKING:
    import torch

ImageSource = Union[str, Path, Image.Image]
IMAGE_SUFFIXES = {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class ImageLoadError(ClipzslError, ValueError):
    """An image that cannot be decoded; `source` says which."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


#: the sub-folder of the cache directory that `embed_images_cached` writes to
FEATURES_DIR = "image-features"


@dataclass
class EmbeddedImages:
    """Images as a frozen backbone sees them: what every head scores."""

    embeddings: Any  # [N, D] pooled, L2-normalised, in `sources` order: a torch tensor (numpy for an onnx: model)
    tokens: Any = None  # [N, T, D] spatial tokens (unnormalised), with `return_tokens`
    sources: list[str] = field(default_factory=list)  # names of the images that were embedded
    failures: list[ImageLoadError] = field(default_factory=list)  # images that were skipped, with why

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    def subset(self, index: Sequence[int] | range | np.ndarray) -> "EmbeddedImages":
        """The rows `index` (failures are not rows, so they stay behind)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        sources = [self.sources[i] for i in index.tolist()] if self.sources else []
        tokens = self.tokens[index] if self.tokens is not None else None
        return EmbeddedImages(self.embeddings[index], tokens, sources)

    @staticmethod
    def cat(parts: Sequence["EmbeddedImages"]) -> "EmbeddedImages":
        """The parts one after the other (tokens only when every part has them)."""
        tokens = [p.tokens for p in parts if p.tokens is not None]
        xp = ops(parts[0].embeddings)
        return EmbeddedImages(xp.cat([p.embeddings for p in parts]),
                              xp.cat(tokens) if len(tokens) == len(parts) else None,
                              [s for p in parts for s in p.sources], [f for p in parts for f in p.failures])


class NoImagesWarning(UserWarning):
    """A folder that holds no image files: most often a wrong path, so it is not passed over silently."""

    def __init__(self, folder: str):
        super().__init__(f"{folder}: no image files (.jpg, .png, .webp, ...) in this folder or its "
                         "sub-folders; check the path")
        self.folder = folder


def expand_sources(sources: ImageSource | Sequence[ImageSource]) -> list[ImageSource]:
    """Files stay, folders become their image files (recursively, sorted), PIL images pass.

    A folder without images warns with `NoImagesWarning`.
    """
    if isinstance(sources, (str, Path, Image.Image)):
        sources = [sources]
    expanded: list[ImageSource] = []
    for source in sources:
        if isinstance(source, Image.Image):
            expanded.append(source)
        elif Path(source).is_dir():
            files = folder_images(str(source))
            if not files:
                warnings.warn(NoImagesWarning(str(source)), stacklevel=2)
            expanded.extend(files)
        else:
            expanded.append(str(source))
    return expanded


def _same_path(a: Path, b: Path) -> bool:
    """Two resolved paths naming one file or folder (hard links and case-insensitive disks included)."""
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def image_key(path: str, base: str = "") -> str:
    """An image's identity: its resolved path (`photos/a.jpg`, `/abs/photos/a.jpg` and a link to it are one).
    Folders are resolved once each: one lstat per image, 6 µs against 22 for `realpath` (1M-image resumes)."""
    folder, name = os.path.split(os.path.join(base or os.getcwd(), path))
    if name in ("", ".", "..") or _link_or_missing(os.path.join(folder, name)):
        return os.path.realpath(os.path.join(folder, name))
    return os.path.join(real_folder(folder), name)


def _link_or_missing(path: str) -> bool:
    """A link, or no file as written (a missing folder before a `..`): only `realpath` says what it names."""
    try:
        return stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        return True


@functools.lru_cache(maxsize=4096)
def real_folder(folder: str) -> str:
    return os.path.realpath(folder)


Item = TypeVar("Item")


def each_image_once(items: Iterable[Item], path_of: Callable[[Item], str | None]) -> Iterator[Item]:
    """`items` less those naming an image file (`path_of`; None: not a file) already named under another
    path (`image_key`), so no image is embedded or classified twice; one warning counts them."""
    seen: set[str] = set()
    repeats = 0
    for item in items:
        path = path_of(item)
        key = None if path is None else image_key(path)
        if key in seen:
            repeats += 1
            continue
        if key is not None:
            seen.add(key)
        yield item
    if repeats:
        warnings.warn(f"{repeats} of the paths given name images already given (the same file under another "
                      "path); each image is used once", stacklevel=2)


def check_output(output: str | os.PathLike, inputs: ImageSource | Sequence[ImageSource],
                 writes_images: bool = False) -> None:
    """Refuse, before anything is written, an output that would replace or join the inputs: one of
    the inputs however it is spelled (relative, absolute, ./, through a symlink, a hard link), an
    image file inside an input folder, or (`writes_images`: a folder the output images are written
    into) a folder that is, holds or lies inside an input. A ValueError names both."""
    target = Path(os.path.realpath(output))
    for given in [inputs] if isinstance(inputs, (str, os.PathLike, Image.Image)) else inputs:
        if isinstance(given, Image.Image):
            continue
        source = Path(os.path.realpath(given))
        inside = source.is_dir() and target.is_relative_to(source)
        if _same_path(target, source):
            problem = f"is the input {given}"
        elif inside and (writes_images or target.suffix.lower() in IMAGE_SUFFIXES):
            problem = f"would put images into the input folder {given}"
        elif writes_images and source.is_relative_to(target):
            problem = f"holds the input {given}"
        else:
            continue
        raise InputError(f"{output}: {problem}; writing there would replace or mix with the inputs: choose an "
                         "output outside the inputs")


def folder_images(folder: str) -> list[str]:
    """Image files under `folder`, in sorted order, following symlinked sub-folders.

    `Path.rglob` does not follow symlinked folders, so a photo library linked in from
    another disk came out empty. Each real folder (device, inode) is walked once, which
    stops symlink loops and lists a folder reached by two paths once.
    """
    seen: set[tuple[int, int]] = set()
    files: list[Path] = []
    for directory, subdirs, names in os.walk(folder, followlinks=True):
        status = os.stat(directory)
        if (status.st_dev, status.st_ino) in seen:
            subdirs.clear()
            continue
        seen.add((status.st_dev, status.st_ino))
        subdirs.sort()  # which of two links to one folder is kept does not depend on the file system
        files.extend(
            path for path in (Path(directory, name) for name in names)
            if path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()
        )
    return [str(path) for path in sorted(files)]


def source_name(source: ImageSource, index: int) -> str:
    return source if isinstance(source, str) else f"<image {index}>"


#: premultiplied-alpha modes, and the straight-alpha ones Pillow converts them to before anything else
_STRAIGHT_ALPHA = {"RGBa": "RGBA", "La": "LA"}
#: ranges a 32-bit integer ("I") or float ("F") image's values are taken to span, the first that holds them
#: all: 0..1 (floats), 0..255 (what Pillow's own conversions write), 0..65535 (16-bit data widened)
_NOMINAL_RANGES = {"I": ((0, 255), (0, 65535)), "F": ((0, 1), (0, 255), (0, 65535))}


def to_rgb(image: Image.Image) -> Image.Image:
    """The image as a person sees it, in 8-bit RGB: EXIF orientation honoured, 16-bit, 32-bit and float
    values scaled from their range (`_eight_bit`), transparent pixels put on white; CMYK, YCbCr, palettes and
    the other modes converted by Pillow. Every decode goes through here: files, uploads, PIL images, Ray rows."""
    image = ImageOps.exif_transpose(image)
    if image.mode in _STRAIGHT_ALPHA:
        image = image.convert(_STRAIGHT_ALPHA[image.mode])  # Pillow converts "La" to nothing else
    if image.mode.startswith("I") or image.mode == "F":
        image = _eight_bit(image)
    transparent = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
    if transparent or (image.mode == "P" and image.palette is not None and image.palette.mode == "RGBA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _eight_bit(image: Image.Image) -> Image.Image:
    """An "L" image ("LA" when a value is marked transparent) from a 16-bit, 32-bit or float one.

    Pillow's own conversion clips at 255, so a 16-bit picture came out all white. 16-bit values ("I;16",
    "I;16B", "I;16L") span 0..65535, as their file formats say. 32-bit integers and floats have no range
    of their own: the first of `_NOMINAL_RANGES` that holds every finite value, else the image's own
    finite min..max (a flat image outside them all is black). NaN is black; +inf and -inf are the ends.
    """
    values = np.asarray(image).astype(np.float32)
    if image.mode.startswith("I;16"):
        low, high = 0.0, 65535.0
    else:
        finite = values[np.isfinite(values)]
        low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        low, high = next(((a, b) for a, b in _NOMINAL_RANGES[image.mode] if a <= low and high <= b), (low, high))
    with np.errstate(invalid="ignore", over="ignore"):
        scaled = np.nan_to_num((values - low) / max(high - low, 1e-30), nan=0.0, posinf=1.0, neginf=0.0)
    gray = Image.fromarray(np.round(np.clip(scaled, 0, 1) * 255).astype(np.uint8), "L")
    if "transparency" not in image.info:
        return gray
    alpha = Image.fromarray(np.where(values == image.info["transparency"], 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (gray, alpha))


#: the most pixels an image may have as it is decoded (a JPEG after its reduction on load, `shrink_to`).
#: Decoding takes about 18 bytes a pixel at its peak (0.7 GB here), and the model needs under a
#: megapixel: a larger image, often a few-kB file that inflates to gigabytes, is refused unread.
MAX_PIXELS = 40_000_000


class TooManyPixels(ImageLoadError):
    """An image over the pixel budget, refused from its header before any pixel is decoded."""


def load_image(source: ImageSource, max_pixels: int = MAX_PIXELS, shrink_to: int | None = None) -> Image.Image:
    """Open and fully decode one image; raises ImageLoadError naming the file and the cause.
    `max_pixels`: the budget (`MAX_PIXELS`); `shrink_to`: see `decode_image`."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = str(source)
    if not os.path.exists(path):
        raise ImageLoadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    return _decode(path, path, max_pixels, shrink_to)


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS, shrink_to: int | None = None) -> Image.Image:
    """`load_image` for bytes in memory (an upload), with the same checks and reasons; `name` says
    where they came from in the error. `shrink_to`: the side the caller needs; a JPEG then decodes
    at 1/2, 1/4 or 1/8 scale (Pillow's draft mode, in the decoder) while both sides stay at least
    twice that, so resampling it down gives what a full decode would, at a fraction of the memory."""
    if not data:
        raise ImageLoadError(name, "empty file (0 bytes)")
    return _decode(io.BytesIO(data), name, max_pixels, shrink_to)


def _decode(file: str | io.BytesIO, name: str, max_pixels: int, shrink_to: int | None) -> Image.Image:
    try:
        with Image.open(file) as image:  # lazy: only the header is read here
            if shrink_to:
                image.draft(image.mode, (2 * shrink_to, 2 * shrink_to))  # only JPEG does anything
            _check_pixels(image, name, max_pixels)
            image.load()
            return to_rgb(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageLoadError(name, f"refused as a possible decompression bomb ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(name, "not an image Pillow can read") from err
    except PermissionError as err:
        raise ImageLoadError(name, "permission denied (this user may not read it; check its permissions)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(name, f"corrupt or truncated image ({err})") from err


def _check_pixels(image: Image.Image, name: str, max_pixels: int) -> None:
    width, height = image.size
    if width * height > max_pixels:
        raise TooManyPixels(name, f"{width}x{height} pixels ({width * height / 1e6:.1f} megapixels), more than the "
                                  f"{max_pixels / 1e6:g} megapixels an image may have (a possible decompression "
                                  "bomb); downscale it")


#: `embed_images(decode=...)`: Pillow on the CPU workers, or JPEG files on the model's device
DECODE_CHOICES = ("cpu", "device")
_JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class _Jpeg:
    """A JPEG file's bytes, read by a worker, to be decoded on the device."""

    source: str
    data: torch.Tensor  # uint8 [bytes] (decode="device" runs only with a torch model)


#: what a worker makes of one image: uint8 pixels, a JPEG's bytes for the device, or why it failed
_Prepared = Union["torch.Tensor", np.ndarray, _Jpeg, ImageLoadError]


def _prepared(backend: Backend, source: ImageSource, decode: str = "cpu") -> _Prepared:
    try:
        if decode == "device" and isinstance(source, (str, Path)) and os.path.isfile(source):
            with open(source, "rb") as f:
                data = f.read()
            if data.startswith(_JPEG_MAGIC):
                import torch

                return _Jpeg(str(source), torch.frombuffer(bytearray(data), dtype=torch.uint8))
        return backend.pixels_uint8(load_image(source))
    except ImageLoadError as err:
        return err
    except OSError as err:
        return ImageLoadError(str(source), f"unreadable ({err})")


def device_geometry(backend: Backend) -> list:
    """The resize/crop steps of a backend's fixed torchvision preprocessing, to run on decoded
    tensors (`decode="device"`); ValueError naming what is in the way for any other preprocessing."""
    from torchvision import transforms as T

    from .backends.base import split_preprocess

    split = split_preprocess(backend.preprocess) if backend.pixel_stats is not None else None
    steps = list(getattr(split[0], "transforms", [])) if split else None
    # open_clip's RGB conversion (`_convert_to_rgb`, `MaybeConvertMode`) is a no-op here: the decoder is asked for RGB
    kept = [t for t in steps or []
            if getattr(t, "__name__", "") != "_convert_to_rgb" and type(t).__name__ != "MaybeConvertMode"]
    if steps is None or not all(isinstance(t, (T.Resize, T.CenterCrop)) for t in kept):
        raise InputError(f"decode='device' needs a fixed resize/crop preprocessing ending in ToTensor + Normalize; "
                         f"{backend.spec} has {backend.preprocess!r}: use decode='cpu'")
    return kept


def _decode_on_device(backend: Backend, jpegs: list[_Jpeg], steps: list) -> list[torch.Tensor | ImageLoadError]:
    """Decode JPEG bytes on the model's device (one batched call; one by one if that fails, to
    name the bad file), honour EXIF orientation, then resize and crop there: uint8 [3, H, W] each."""
    from torchvision.io import ImageReadMode, decode_jpeg

    def geometry(image: torch.Tensor) -> torch.Tensor:
        for step in steps:
            image = step(image)
        return image

    options = dict(mode=ImageReadMode.RGB, device=backend.device, apply_exif_orientation=True)
    try:
        return [geometry(image) for image in decode_jpeg([j.data for j in jpegs], **options)]
    except RuntimeError:
        out: list[torch.Tensor | ImageLoadError] = []
        for jpeg in jpegs:
            try:
                out.append(geometry(decode_jpeg(jpeg.data, **options)))
            except RuntimeError as err:
                out.append(ImageLoadError(jpeg.source, f"corrupt JPEG ({err})"))
        return out


def _batches(
    backend: Backend, sources: list[ImageSource], batch_size: int, workers: int, decode: str = "cpu"
) -> Iterator[list[tuple[int, _Prepared]]]:
    """Batches of decoded images, in order; at most 2 batches + `workers` images are decoded
    ahead of the consumer, so memory does not grow with N when the model is the slower side."""
    ahead = 2 * batch_size + workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        upcoming = iter(sources)
        batch: list[tuple[int, _Prepared]] = []
        for index in range(len(sources)):
            for source in itertools.islice(upcoming, ahead - len(pending)):
                pending.append(pool.submit(_prepared, backend, source, decode))
            batch.append((index, pending.popleft().result()))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


def embed_images(
    model: Backend,
    images: ImageSource | Sequence[ImageSource],
    batch_size: int | None = None,
    skip_errors: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    return_tokens: bool = False,
    decode: str = "cpu",
) -> EmbeddedImages:
    """Embed images in batches. Unreadable ones raise, or with `skip_errors` are reported back.

    With `return_tokens`, the model's spatial tokens come back too (what an adapter attends over).
    `batch_size` and `workers` (decoding threads) default to the model's (`load_model`'s, per device).
    `decode="device"` decodes JPEG files on the model's device (nvJPEG on CUDA) and resizes them
    there (tensor resize: close to, not bit-equal with, Pillow's); other formats still go through Pillow.
    Embeddings (and tokens) come back as float32 on the CPU, whatever the model's device and precision.
    """
    batch_size = model.batch_size if batch_size is None else batch_size
    _check_options(batch_size, decode)
    steps = device_geometry(model) if decode == "device" else []
    sources = expand_sources(images)
    chunks: list[EmbeddedImages] = []
    kept: list[str] = []
    failures: list[ImageLoadError] = []
    with tqdm(total=len(sources), unit="img", desc="images", disable=_quiet(progress, len(sources))) as bar:
        for batch in _batches(model, sources, batch_size, workers or model.workers, decode):
            good = _usable(_jpegs_decoded(model, batch, steps), skip_errors, failures)
            if good:
                chunks.append(encode_pixels(model, [t for _, t in good], return_tokens))
                kept.extend(source_name(sources[i], i) for i, _ in good)
            bar.update(len(batch))
    if not chunks:
        return EmbeddedImages(_no_rows(model, model.embed_dim), None, kept, failures)
    embedded = EmbeddedImages.cat(chunks)
    return EmbeddedImages(embedded.embeddings, embedded.tokens, kept, failures)


def _check_options(batch_size: int, decode: str) -> None:
    if batch_size < 1:
        raise InputError(f"batch_size must be at least 1, got {batch_size}")
    if decode not in DECODE_CHOICES:
        raise InputError(f"decode must be one of {DECODE_CHOICES}, got {decode!r}")


def _jpegs_decoded(model: Backend, batch: list[tuple[int, _Prepared]], steps: list) -> list[tuple[int, _Prepared]]:
    """The batch with its JPEG files (`decode="device"`) decoded on the model's device."""
    jpegs = [(i, t) for i, t in batch if isinstance(t, _Jpeg)]
    if not jpegs:
        return batch
    decoded = dict(zip([i for i, _ in jpegs], _decode_on_device(model, [j for _, j in jpegs], steps)))
    return [(i, decoded.get(i, t)) for i, t in batch]


def _usable(batch: list[tuple[int, _Prepared]], skip_errors: bool,
            failures: list[ImageLoadError]) -> list[tuple[int, Any]]:
    """The batch's decoded images; its first unreadable image raises, or with `skip_errors` every one
    is added to `failures`."""
    for _, err in ((i, t) for i, t in batch if isinstance(t, ImageLoadError)):
        if not skip_errors:
            raise err
        failures.append(err)
    return [(i, t) for i, t in batch if not isinstance(t, (ImageLoadError, _Jpeg))]


def encode_pixels(model: Backend, pixels: Sequence[Any], return_tokens: bool = False) -> EmbeddedImages:
    """One forward pass over prepared images (`Backend.pixels_uint8`'s, or decoded on the device), as
    float32 on the CPU. Apart from `embed_images`, so a caller that prepared its images as they
    arrived (the service) runs only this in the model's thread."""
    if not is_torch(pixels[0]):  # an onnx: model's float pixels, and embeddings, are numpy arrays
        return EmbeddedImages(np.asarray(model.encode_images(np.stack(list(pixels))), dtype=np.float32))
    if any(t.device.type != "cpu" for t in pixels):
        pixels = [t.to(model.device) for t in pixels]
    batch = ops(pixels[0]).stack(pixels)
    if batch.device.type == "cpu" and device_kind(model.device) == "cuda":
        batch = batch.pin_memory()  # an asynchronous copy to the device
    encoded = model.encode_images(model.normalize_pixels(batch), return_tokens=return_tokens)
    if isinstance(encoded, tuple):  # with return_tokens
        pooled, tokens = encoded
        return EmbeddedImages(pooled.float().cpu(), tokens.float().cpu())
    return EmbeddedImages(encoded.float().cpu())


def _no_rows(model: Backend, *shape: int) -> Any:
    """An empty float32 [0, *shape] in the model's kind of array (numpy for an onnx: model)."""
    return model.from_numpy(np.empty((0, *shape), np.float32))


def _image_identity(source: ImageSource) -> str:
    """What a cached feature row depends on: a file's path, size and mtime, or a PIL image's pixels."""
    if isinstance(source, (str, Path)):
        try:
            st = os.stat(source)
            return f"{os.path.abspath(source)}|{st.st_size}|{st.st_mtime_ns}"
        except OSError:
            return f"{source}|missing"
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{source.mode}|{source.size}".encode())
    h.update(source.tobytes())
    return f"<pil {h.hexdigest()}>"


def features_key(model: Backend, sources: Sequence[ImageSource]) -> str:
    """Cache key of a list of images under one model: its fingerprint and every image's identity."""
    h = hashlib.sha256(model.fingerprint.encode())
    for source in sources:
        h.update(b"\n" + _image_identity(source).encode())
    return h.hexdigest()[:32]


def embed_images_cached(
    model: Backend,
    images: ImageSource | Sequence[ImageSource],
    cache: CacheArg = True,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> EmbeddedImages:
    """Pooled embeddings and tokens of every image, kept in `<cache folder>/image-features/`.

    `cache` as everywhere (`load_model`, `ZeroShotClassifier`): True for the default cache folder,
    a folder, or False for none (nothing is read or written).

    The cache file is keyed by the model fingerprint and the images (path + size +
    mtime, or a PIL image's pixels), so a second call costs one file read. Tokens are
    stored as float16 (half the disk; far below the adapter's sensitivity); pooled stays
    float32 so the zero-shot scores from cached embeddings equal the uncached ones.
    Unreadable images raise `ImageLoadError` naming the file.
    """
    sources = expand_sources(images)
    path = None
    if cache is not False:
        path = own_cache_root(cache_dir_of(cache)) / FEATURES_DIR / f"{features_key(model, sources)}.safetensors"
        cached = _cached_features(path, sources)
        if cached is not None:
            return cached
    if not sources:
        return EmbeddedImages(_no_rows(model, model.embed_dim), _no_rows(model, 0, model.embed_dim))
    embedded = embed_images(model, sources, batch_size=batch_size, progress=progress, return_tokens=True)
    if path is not None:
        from safetensors.torch import save as safetensors_bytes

        assert embedded.tokens is not None  # asked for with return_tokens
        tensors = {"pooled": embedded.embeddings.contiguous(), "tokens": embedded.tokens.half().contiguous()}
        atomic_write(path, lambda f: f.write(safetensors_bytes(tensors)))
    return embedded


def _cached_features(path: Path, sources: list[ImageSource]) -> EmbeddedImages | None:
    """The features `embed_images_cached` kept at `path`; None when there are none (or they are unusable)."""
    if not path.exists():
        return None
    from safetensors.torch import load_file

    try:
        data = load_file(str(path))
        if data["pooled"].shape[0] == len(sources):
            return EmbeddedImages(data["pooled"], data["tokens"].float(),
                                  [source_name(s, i) for i, s in enumerate(sources)])
    except Exception:  # a truncated/corrupt cache file is recomputed
        pass
    return None


def _quiet(progress: bool | None, total: int) -> bool | None:
    """tqdm's `disable`: explicit choice wins; by default only long runs on a terminal show a bar."""
    if progress is None:
        return None if total > 64 else True
    return not progress

