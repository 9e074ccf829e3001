"""From paths, folders and PIL images to batches of embeddings, skipping what cannot be read.

Decoding and preprocessing run in a small thread pool (Pillow releases the GIL
while it decodes and resizes) so the encoder is not kept waiting.
"""
from __future__ import annotations

import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import torch
from PIL import Image, ImageOps
from tqdm.auto import tqdm

from .backends.base import Backend

ImageSource = Union[str, Path, Image.Image]
IMAGE_SUFFIXES = {suffix for suffix, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


class ImageLoadError(ValueError):
    """An image that cannot be decoded; `source` says which."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"{source}: {reason}")
        self.source = source
        self.reason = reason


@dataclass
class EmbeddedImages:
    embeddings: torch.Tensor  # [N, D], L2-normalised, in `sources` order
    sources: list[str]  # names of the images that were embedded
    failures: list[ImageLoadError]  # images that were skipped, with why
    tokens: torch.Tensor | None = None  # [N, T, D] spatial tokens, with `return_tokens`


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


def to_rgb(image: Image.Image) -> Image.Image:
    """Honour EXIF orientation and put transparent pixels on white, as people see them."""
    image = ImageOps.exif_transpose(image)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or image.mode.endswith("a"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """Open and fully decode one image; raises ImageLoadError naming the file and the cause."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = str(source)
    if not os.path.exists(path):
        raise ImageLoadError(path, "no such file")
    if os.path.getsize(path) == 0:
        raise ImageLoadError(path, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.load()
                return to_rgb(image)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageLoadError(path, f"refused as a possible decompression bomb ({err})") from err
    except Image.UnidentifiedImageError as err:
        raise ImageLoadError(path, "not an image Pillow can read") from err
    except PermissionError as err:
        raise ImageLoadError(path, "permission denied (this user may not read it; check its permissions)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageLoadError(path, f"corrupt or truncated image ({err})") from err


def _prepared(backend: Backend, source: ImageSource) -> torch.Tensor | ImageLoadError:
    try:
        return backend.preprocess(load_image(source))
    except ImageLoadError as err:
        return err


def _batches(
    backend: Backend, sources: list[ImageSource], batch_size: int, workers: int
) -> Iterator[list[tuple[int, torch.Tensor | ImageLoadError]]]:
    """Batches of decoded images, in order; at most 2 batches + `workers` images are decoded
    ahead of the consumer, so memory does not grow with N when the model is the slower side."""
    ahead = 2 * batch_size + workers
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque = deque()
        upcoming = iter(sources)
        batch: list[tuple[int, torch.Tensor | ImageLoadError]] = []
        for index in range(len(sources)):
            while len(pending) < ahead and (source := next(upcoming, _END)) is not _END:
                pending.append(pool.submit(_prepared, backend, source))
            batch.append((index, pending.popleft().result()))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


_END = object()


def embed_images(
    backend: Backend,
    images: ImageSource | Sequence[ImageSource],
    batch_size: int = 32,
    skip_errors: bool = False,
    progress: bool | None = None,
    workers: int | None = None,
    return_tokens: bool = False,
) -> EmbeddedImages:
    """Embed images in batches. Unreadable ones raise, or with `skip_errors` are reported back.

    With `return_tokens`, the backend's spatial tokens come back too (what an adapter attends over).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    sources = expand_sources(images)
    workers = workers or min(4, os.cpu_count() or 1)
    chunks: list[torch.Tensor] = []
    token_chunks: list[torch.Tensor] = []
    kept: list[str] = []
    failures: list[ImageLoadError] = []
    with tqdm(total=len(sources), unit="img", desc="images", disable=_quiet(progress, len(sources))) as bar:
        for batch in _batches(backend, sources, batch_size, workers):
            good = [(i, t) for i, t in batch if isinstance(t, torch.Tensor)]
            for _, err in ((i, t) for i, t in batch if isinstance(t, ImageLoadError)):
                if not skip_errors:
                    raise err
                failures.append(err)
            if good:
                encoded = backend.encode_images(torch.stack([t for _, t in good]), return_tokens=return_tokens)
                if return_tokens:
                    encoded, tokens = encoded
                    token_chunks.append(tokens.float().cpu())
                chunks.append(encoded)
                kept.extend(source_name(sources[i], i) for i, _ in good)
            bar.update(len(batch))
    embeddings = torch.cat(chunks) if chunks else torch.empty(0, backend.embed_dim)
    tokens = torch.cat(token_chunks) if token_chunks else None
    return EmbeddedImages(embeddings.float().cpu(), kept, failures, tokens)


def _quiet(progress: bool | None, total: int) -> bool | None:
    """tqdm's `disable`: explicit choice wins; by default only long runs on a terminal show a bar."""
    if progress is None:
        return None if total > 64 else True
    return not progress

