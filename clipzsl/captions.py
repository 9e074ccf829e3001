"""Captioned image collections, what retrieval evaluation scores: one reader for the three ways
captions come, normalised at the boundary into images and their captions (`CaptionedImages.read`).

- CSV: a header row naming the columns `image` and `caption` (others are ignored), then one row per
  caption; an image with several captions has several rows.
- JSON lines (.jsonl, .ndjson): one object a line, {"image": ..., "caption": "..."} or
  {"image": ..., "captions": ["...", ...]}; an image may have several lines.
- webdataset-style, no captions file: each image under the folder has a `.txt` of the same stem beside
  it, one caption a line (blank lines skipped), as CLIP_benchmark reads webdataset retrieval sets.

Image names in a captions file are paths relative to the folder (or absolute). The collection is what
the captions name: a listed image that is not there, an empty caption, an image without a caption or
a caption file without an image is refused (InputError naming the file, the line and the fix), never
evaluated on part of the data; images under the folder that a captions file does not name are left out,
with a notice saying how many. Captions are normalised as labels are (`prompts.normalise_text`).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .errors import InputError
from .images import folder_images
from .prompts import normalise_text

__all__ = ["CAPTION_SUFFIXES", "CaptionedImages"]

#: captions file suffix -> format
CAPTION_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
#: one caption: (image as written, caption, where: "file:line")
_Row = tuple[str, str, str]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CaptionedImages:
    """Images and their captions (at least one each), in the order the captions name the images."""

    root: str  # the folder as given: what messages and records name
    paths: list[str]  # image files
    captions: list[list[str]]  # per image, its captions

    @property
    def texts(self) -> list[str]:
        """Every caption, image after image."""
        return [c for per_image in self.captions for c in per_image]

    @property
    def text_image(self) -> list[int]:
        """Per caption of `texts`, the index of its image in `paths`."""
        return [i for i, per_image in enumerate(self.captions) for _ in per_image]

    def subset(self, paths: list[str]) -> CaptionedImages:
        """The images `paths` (some of `self.paths`, e.g. those that could be read) with their captions."""
        of = dict(zip(self.paths, self.captions))
        return CaptionedImages(self.root, list(paths), [of[p] for p in paths])

    @classmethod
    def read(cls, root: str | os.PathLike, captions: str | os.PathLike | None = None) -> CaptionedImages:
        """The collection under the folder `root`: the images `captions` (a .csv or .jsonl file) names,
        or, without one, every image with its `.txt` beside it. Checked before any model is loaded."""
        if not Path(root).is_dir():
            raise InputError(f"{root}: not a folder; give the folder the captions' image paths are relative to")
        if not captions:
            return _collected(str(root), _sidecar_rows(Path(root)), str(root))
        collection = _collected(str(root), _file_rows(Path(captions)), str(captions))
        _note_uncaptioned(collection, captions)
        return collection


def _note_uncaptioned(collection: CaptionedImages, captions: str | os.PathLike) -> None:
    """A notice naming how many images under the folder `captions` leaves out, if any."""
    named = {os.path.realpath(p) for p in collection.paths}
    left = [p for p in folder_images(collection.root) if os.path.realpath(p) not in named]
    if left:
        log.info("%d images under %s have no caption in %s and are not evaluated (the first: %s)", len(left),
                 collection.root, captions, left[0])


def _collected(root: str, rows: Iterator[_Row], source: str) -> CaptionedImages:
    """Rows grouped by image (in order of first mention), each image checked to exist."""
    by_image: dict[str, list[str]] = {}
    for image, caption, where in rows:
        path = Path(root, image)
        if not path.is_file():
            raise InputError(f"{where}: image {image!r} is not a file under {root}; fix the path (relative to "
                             f"{root}) or remove the line")
        text = normalise_text(caption)
        if not text:
            raise InputError(f"{where}: the caption of {image!r} is empty; write one or remove the line")
        by_image.setdefault(str(path), []).append(text)
    if not by_image:
        raise InputError(f"{source}: no captioned image; a captions file needs at least one image with a caption")
    return CaptionedImages(root, list(by_image), list(by_image.values()))


def _file_rows(path: Path) -> Iterator[_Row]:
    """The captions of a .csv or .jsonl file."""
    kind = CAPTION_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise InputError(f"{path}: captions are read from {', '.join(CAPTION_SUFFIXES)} files; rename it, or "
                         "leave --captions out to read a .txt beside each image")
    text = _text(path)
    return _csv_rows(path, text) if kind == "csv" else _jsonl_rows(path, text)


def _text(path: Path) -> str:
    """A file's UTF-8 text (a byte-order mark dropped)."""
    try:
        return path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8") from err


def _csv_rows(path: Path, text: str) -> Iterator[_Row]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in reader.fieldnames or []]
    if "image" not in columns or "caption" not in columns:
        raise InputError(f"{path}:1: the header row is {reader.fieldnames}; it must name the columns image and "
                         "caption (comma-separated): add the header `image,caption`")
    reader.fieldnames = columns
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if row["image"] is None or row["caption"] is None:
            raise InputError(f"{where}: fewer columns than the header's {columns}; quote a caption with commas")
        yield row["image"].strip(), row["caption"], where


def _jsonl_rows(path: Path, text: str) -> Iterator[_Row]:
    for number, line in enumerate(text.split("\n"), 1):
        if line.strip():
            where = f"{path}:{number}"
            image, captions = _json_entry(line, where)
            yield from ((image, caption, where) for caption in captions)


def _json_entry(line: str, where: str) -> tuple[str, list[str]]:
    """(image, captions) of one JSON line, refused unless it is an object with an image and a caption
    (a string) or captions (a list of strings)."""
    try:
        entry: Any = json.loads(line)
    except json.JSONDecodeError as err:
        raise InputError(f"{where}: not JSON ({err.msg}); write one object a line") from err
    if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
        raise InputError(f'{where}: not an object with an "image" path; write {{"image": "a.jpg", "caption": "..."}}')
    if ("caption" in entry) == ("captions" in entry):
        raise InputError(f'{where}: give either "caption" (a string) or "captions" (a list of strings), not '
                         f"{'both' if 'caption' in entry else 'neither'}")
    captions = [entry["caption"]] if "caption" in entry else entry["captions"]
    if not isinstance(captions, list) or not captions or not all(isinstance(c, str) for c in captions):
        raise InputError(f'{where}: "captions" must be a list of strings with at least one; got {captions!r:.60}')
    return entry["image"], captions


def _sidecar_rows(root: Path) -> Iterator[_Row]:
    """webdataset style: each image's captions in the .txt of the same stem beside it, one a line."""
    images = folder_images(str(root))
    captioned = {Path(image).with_suffix(".txt") for image in images}
    orphans = sorted(set(root.rglob("*.txt")) - captioned)
    if orphans:
        raise InputError(f"{orphans[0]}: a caption file without an image of the same name beside it "
                         f"({len(orphans)} such); add the image, or move the file out of {root}")
    for image in images:
        txt = Path(image).with_suffix(".txt")
        if not txt.is_file():
            raise InputError(f"{image}: no caption file {txt.name} beside it; write its captions there (one a "
                             "line), or give a captions file with --captions")
        lines = [(n, line) for n, line in enumerate(_text(txt).split("\n"), 1) if line.strip()]
        if not lines:
            raise InputError(f"{txt}: no caption in it; write one a line")
        yield from ((os.path.relpath(image, root), line, f"{txt}:{n}") for n, line in lines)
