"""Near-duplicate images in an index: found, listed, hidden from search.

Two stages. Candidates: pairs of images whose stored vectors have a cosine similarity of at least a
threshold, found exactly by FAISS `range_search` of each block of `QUERY_BLOCK` rows against all of them,
with a progress bar (time grows with the square of the collection, memory with the collection).
Verification (`verify="hash"`, the default): a candidate pair is kept only when the two files look alike,
their perceptual hashes (imagehash's `HASH_METHOD`, each candidate image decoded once by `load_image`, as
everywhere else) at most `hash_distance` bits apart. The embedding alone confuses different images of one
class (the packaged model's vector is a mixture of its top classes' text embeddings); the hash does not,
and it survives re-encoding, resizing and small crops. An image with no file to read (vectors imported
from shards, a file deleted since) or an unreadable one falls back to the embedding alone at
`DEFAULT_THRESHOLD`, and `Duplicates` says how many. A group is a connected set of kept pairs
(union-find), so a chain a~b~c is one group even where a and c are further apart. benchmarks/results/dedup.md
measures precision and recall on planted copies (re-encoded, resized, cropped), from which the defaults
are chosen. `hide_duplicates` keeps the first image of each group (in index order) and hides the others
from search (`ImageIndex.hide`, reversible).
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .errors import InputError
from .image_index import ImageIndex, _shard_of
from .images import ImageLoadError, load_image
from .tars import ImageSourceItem, TarMember, load_sources, tar_members

logger = logging.getLogger(__name__)

#: cosine similarity at or above which two images count as near-duplicates on the embedding alone
#: (`verify="none"`, and pairs with an image without a readable file): the best F1 of the embedding alone on
#: planted copies (re-encoded, resized, cropped) of real images with the packaged model (benchmarks/results/dedup.md)
DEFAULT_THRESHOLD = 0.97
#: cosine similarity from which pairs are candidates for the hash's verification (`verify="hash"`): chosen with
#: `DEFAULT_HASH_DISTANCE` on a development half of the planted copies (benchmarks/results/dedup.md)
CANDIDATE_THRESHOLD = 0.85
#: imagehash's hash that verifies candidate pairs (chosen with the distance on the development half), and its size in
#: bits (8 x 8)
HASH_METHOD = "phash"
HASH_BITS = 64
#: the most bits two images' hashes may differ by to be near-duplicates (`verify="hash"`)
DEFAULT_HASH_DISTANCE = 14
#: how candidate pairs are verified: by their files' perceptual hashes, or not at all (the embedding alone)
VERIFY_CHOICES = ("hash", "none")
#: images decoded and hashed per task, and the threads that do it (Pillow releases the GIL while it decodes)
HASH_CHUNK = 32
HASH_THREADS = 4
#: query rows per range search: bounds the similarities FAISS holds at once
QUERY_BLOCK = 4096
#: the output formats of `format_groups`
GROUP_FORMATS = ("text", "json", "csv")


@dataclass(frozen=True)
class DuplicateGroup:
    """Near-duplicate images: `paths` in index order (the first is the one `hide_duplicates` keeps), and
    each one's cosine similarity to that first (`similarities[0]` is its own, 1)."""

    paths: list[str]
    similarities: list[float]


def check_threshold(threshold: float) -> float:
    """`threshold` as a float in (0, 1], or an InputError that says what to give."""
    if not 0 < threshold <= 1:
        raise InputError(f"threshold {threshold}: give a cosine similarity above 0 and at most 1 (e.g. "
                         f"{DEFAULT_THRESHOLD}); higher finds only closer copies")
    return float(threshold)


def similar_pairs(vectors: np.ndarray, threshold: float, block: int = QUERY_BLOCK,
                  progress: bool | None = None) -> np.ndarray:
    """Pairs (i, j), i < j, [P, 2] of rows of unit `vectors` [N, D] whose inner product is at least
    `threshold`: an exact FAISS range search of `block` rows at a time against all of them."""
    import faiss

    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    flat = faiss.IndexFlatIP(vectors.shape[1])
    flat.add(vectors)
    radius = float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))  # FAISS keeps those above the radius
    found = [np.empty((0, 2), np.int64)]
    starts = range(0, len(vectors), block)
    for start in tqdm(starts, desc="near-duplicates", unit="block", disable=None if progress is None else not progress):
        limits, _, ids = flat.range_search(vectors[start:start + block], radius)
        rows = np.repeat(np.arange(start, start + len(limits) - 1), np.diff(limits).astype(np.int64))
        later = ids > rows
        found.append(np.stack([rows[later], ids[later]], axis=1))
    return np.concatenate(found)


def connected_groups(count: int, pairs: np.ndarray) -> list[list[int]]:
    """The groups of at least two of `count` items that `pairs` (i, j) connect (union-find), each in
    increasing order, ordered by their first item."""
    parent = list(range(count))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]  # path halving
            i = parent[i]
        return i

    for i, j in pairs.tolist():
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)  # the root is a group's first item
    members: dict[int, list[int]] = {}
    for i in np.unique(pairs).tolist():
        members.setdefault(root(i), []).append(i)
    return [sorted(group) for _, group in sorted(members.items())]


def check_verify(verify: str, hash_distance: int) -> tuple[str, int]:
    """(`verify`, `hash_distance`) checked: one of `VERIFY_CHOICES`, and a Hamming distance from 0 to the hash's
    bits; an InputError that says what to give otherwise."""
    if verify not in VERIFY_CHOICES:
        raise InputError(f"verify {verify!r}: choose one of {', '.join(VERIFY_CHOICES)} (hash: candidate pairs "
                         "must also look alike, by a perceptual hash of their files)")
    if not 0 <= hash_distance <= HASH_BITS or int(hash_distance) != hash_distance:
        raise InputError(f"hash distance {hash_distance}: give a whole number of differing bits from 0 to {HASH_BITS} "
                         f"(e.g. {DEFAULT_HASH_DISTANCE}); lower accepts only closer copies")
    return verify, int(hash_distance)


def image_hash(image: Image.Image, method: str = HASH_METHOD) -> np.ndarray:
    """The perceptual hash `method` (imagehash's phash, dhash or whash, `HASH_BITS` bits) of an RGB image, as bools."""
    import imagehash

    hasher = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash}[method]
    return np.asarray(hasher(image).hash, dtype=bool).ravel()


@dataclass(frozen=True)
class ImageHashes:
    """Perceptual hashes of some of an index's images, by row: `bits` [N, HASH_BITS], `known` [N] (the rows
    hashed); `no_file` the images asked for that have no file (vectors only, or deleted since), `unreadable`
    those whose file could not be decoded."""

    bits: np.ndarray
    known: np.ndarray
    no_file: list[str] = field(default_factory=list)
    unreadable: list[ImageLoadError] = field(default_factory=list)


def image_sources(paths: Sequence[str]) -> list[ImageSourceItem | None]:
    """What each image is read from: its file, its webdataset .tar member (`SHARD.tar/MEMBER`, each shard listed
    once), or None where there is neither; an unreadable shard is logged and its members have none."""
    members: dict[str, TarMember] = {}
    for shard in {s for s in map(_shard_of, paths) if s is not None}:
        try:
            members.update(tar_members(Path(shard)))
        except InputError as err:
            logger.warning("%s", err)
    return [members.get(path) or (path if os.path.isfile(path) else None) for path in paths]


def _hashed(loaded: str | Image.Image | ImageLoadError, method: str) -> np.ndarray | ImageLoadError:
    try:
        if isinstance(loaded, ImageLoadError):
            return loaded
        return image_hash(load_image(loaded), method)
    except ImageLoadError as err:
        return err


def hash_images(paths: Sequence[str], rows: Iterable[int], method: str = HASH_METHOD,
                progress: bool | None = None) -> ImageHashes:
    """`ImageHashes` of the images `paths[rows]`, each decoded once as everywhere else (`load_image`: EXIF
    orientation, modes, transparency on white), `HASH_CHUNK` at a time on a few threads, with a progress bar."""
    rows = sorted(set(rows))
    sources = image_sources([paths[i] for i in rows])
    todo = [(i, (paths[i], s)) for i, s in zip(rows, sources) if s is not None]
    bits, known = np.zeros((len(paths), HASH_BITS), bool), np.zeros(len(paths), bool)
    unreadable = []
    chunks = [todo[start:start + HASH_CHUNK] for start in range(0, len(todo), HASH_CHUNK)]

    def run(chunk: list[tuple[int, tuple[str, ImageSourceItem]]]) -> list[np.ndarray | ImageLoadError]:
        return [_hashed(loaded, method) for loaded in load_sources([item for _, item in chunk])]

    bar = tqdm(total=len(todo), desc="image hashes", unit="image", disable=None if progress is None else not progress)
    with bar, ThreadPoolExecutor(HASH_THREADS) as pool:
        for chunk, results in zip(chunks, pool.map(run, chunks)):
            for (i, _), result in zip(chunk, results):
                if isinstance(result, ImageLoadError):
                    unreadable.append(result)
                else:
                    bits[i], known[i] = result, True
            bar.update(len(chunk))
    return ImageHashes(bits, known, [paths[i] for i, s in zip(rows, sources) if s is None], unreadable)


def verify_pairs(pairs: np.ndarray, vectors: np.ndarray, hashes: ImageHashes, distance: int,
                 fallback: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """The `pairs` [P, 2] that pass: both images hashed and at most `distance` bits apart, or, where one has no
    hash (no file, unreadable), the embedding alone: cosine similarity of their `vectors` at least `fallback`."""
    first, second = pairs[:, 0], pairs[:, 1]
    both = hashes.known[first] & hashes.known[second]
    apart = np.count_nonzero(hashes.bits[first] != hashes.bits[second], axis=1)
    similar = np.einsum("pd,pd->p", vectors[first], vectors[second]) >= np.float32(fallback)
    return pairs[np.where(both, apart <= distance, similar)]


@dataclass(frozen=True)
class Duplicates:
    """What `find_duplicates` found: the `groups`, from `candidates` pairs at cosine similarity >= `threshold`,
    verified by `verify` ("hash": `hash_distance` bits at most between the images' perceptual hashes; "none");
    the candidate images with no file to hash (`no_file`) or an unreadable one (`unreadable`), whose pairs
    were kept on the embedding alone at >= `fallback`."""

    groups: list[DuplicateGroup]
    threshold: float
    verify: str = "none"
    hash_distance: int | None = None
    candidates: int = 0
    fallback: float | None = None
    no_file: list[str] = field(default_factory=list)
    unreadable: list[ImageLoadError] = field(default_factory=list)

    def describe(self) -> str:
        """How the groups were found, in words (the reason `hide_duplicates` records, the CLI's summary)."""
        text = f"near-duplicates at cosine similarity >= {self.threshold:g}"
        if self.verify == "hash":
            text += f" and {HASH_METHOD} distance <= {self.hash_distance} ({self.candidates} candidate pairs)"
        unhashed = len(self.no_file) + len(self.unreadable)
        if unhashed:
            text += (f"; {len(self.no_file)} images without a file and {len(self.unreadable)} unreadable: their "
                     f"pairs by the embedding alone, cosine >= {self.fallback:g}")
        return text


def find_duplicates(index: ImageIndex, threshold: float | None = None, block: int = QUERY_BLOCK,
                    progress: bool | None = None, verify: str = "hash",
                    hash_distance: int = DEFAULT_HASH_DISTANCE) -> Duplicates:
    """The groups of near-duplicate images of `index` (hidden ones included), in index order: pairs whose
    cosine similarity is at least `threshold` (`similar_pairs`; default `CANDIDATE_THRESHOLD` with
    `verify="hash"`, `DEFAULT_THRESHOLD` with "none"), with "hash" kept only when their files' perceptual
    hashes are at most `hash_distance` bits apart (`hash_images`, `verify_pairs`: an image with no readable
    file falls back to the embedding alone at `DEFAULT_THRESHOLD`), then connected (`connected_groups`)."""
    verify, hash_distance = check_verify(verify, hash_distance)
    threshold = check_threshold(threshold if threshold is not None else
                                CANDIDATE_THRESHOLD if verify == "hash" else DEFAULT_THRESHOLD)
    paths, vectors = index.vectors()
    pairs = candidates = similar_pairs(vectors, threshold, block, progress)
    if verify == "none":
        return Duplicates(groups_of(paths, vectors, pairs), threshold, candidates=len(candidates))
    hashes = hash_images(paths, np.unique(candidates).tolist(), progress=progress)
    fallback = max(threshold, DEFAULT_THRESHOLD)
    pairs = verify_pairs(candidates, vectors, hashes, hash_distance, fallback)
    return Duplicates(groups_of(paths, vectors, pairs), threshold, verify, hash_distance, len(candidates), fallback,
                      hashes.no_file, hashes.unreadable)


def groups_of(paths: Sequence[str], vectors: np.ndarray, pairs: np.ndarray) -> list[DuplicateGroup]:
    """The `DuplicateGroup`s that `pairs` of rows connect (`connected_groups`), with each one's similarities."""
    return [DuplicateGroup([paths[i] for i in group], (vectors[group] @ vectors[group[0]]).tolist())
            for group in connected_groups(len(paths), pairs)]


def hide_duplicates(index: ImageIndex, found: Duplicates) -> int:
    """Hide from search every image of `found`'s groups but each group's first (`ImageIndex.hide`, in place of
    what was hidden before); returns how many are hidden."""
    hidden = [path for group in found.groups for path in group.paths[1:]]
    index.hide(hidden, found.describe())
    return len(hidden)


def deduplicate(index: ImageIndex, threshold: float | None = None, hide: bool = False, progress: bool | None = None,
                **verification) -> Duplicates:
    """`find_duplicates` (`verification`: its `verify`, `hash_distance`), and with `hide` `hide_duplicates`
    too: what `clipzsl index dedup` runs."""
    found = find_duplicates(index, threshold, progress=progress, **verification)
    if hide:
        hide_duplicates(index, found)
    return found


def format_groups(groups: Sequence[DuplicateGroup], fmt: str = "text") -> str:
    """Groups as text (a block per group, the kept image marked), JSON (a list of {group, paths,
    similarities}) or CSV (group, path, similarity, kept): what `clipzsl index dedup` prints."""
    if fmt == "json":
        return json.dumps([{"group": n, "paths": g.paths, "similarities": g.similarities}
                           for n, g in enumerate(groups, 1)], indent=2) + "\n"
    rows = [(n, path, similarity, i == 0) for n, g in enumerate(groups, 1)
            for i, (path, similarity) in enumerate(zip(g.paths, g.similarities))]
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["group", "path", "similarity", "kept"])
        writer.writerows((n, path, f"{s:.6f}", int(kept)) for n, path, s, kept in rows)
        return out.getvalue()
    if fmt != "text":
        raise InputError(f"format {fmt!r}: choose one of {', '.join(GROUP_FORMATS)}")
    lines = [f"group {n}\n" if kept else "" for n, _, _, kept in rows]
    return "".join(head + f"  {'kept' if kept else f'{s:.4f}'}  {path}\n"
                   for head, (n, path, s, kept) in zip(lines, rows))
