"""Near-duplicate images in an index: found, listed, hidden from search.

Two images are near-duplicates when the cosine similarity of their stored vectors is at least a
threshold; a group is a connected set of such pairs (union-find), so a chain a~b~c is one group even
where a and c are further apart. `find_duplicates` scans the index's vectors exactly: FAISS
`range_search` of each block of `QUERY_BLOCK` rows against all of them, with a progress bar, so time
grows with the square of the collection and memory with the collection (its float32 rows once);
benchmarks/results/dedup.md measures both, and precision and recall on planted copies (re-encoded,
resized, cropped), from which `DEFAULT_THRESHOLD` is chosen. `hide_duplicates` keeps the first image of
each group (in index order) and hides the others from search (`ImageIndex.hide`, reversible).
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from tqdm.auto import tqdm

from .errors import InputError
from .image_index import ImageIndex

#: cosine similarity at or above which two images count as near-duplicates: the best F1 on planted copies
#: (re-encoded, resized, cropped) of real images with the packaged model (benchmarks/results/dedup.md)
DEFAULT_THRESHOLD = 0.97
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


def find_duplicates(index: ImageIndex, threshold: float = DEFAULT_THRESHOLD, block: int = QUERY_BLOCK,
                    progress: bool | None = None) -> list[DuplicateGroup]:
    """The groups of near-duplicate images of `index` (hidden ones included): connected pairs whose
    cosine similarity is at least `threshold` (`similar_pairs`, `connected_groups`), in index order."""
    threshold = check_threshold(threshold)
    paths, vectors = index.vectors()
    groups = connected_groups(len(paths), similar_pairs(vectors, threshold, block, progress))
    return [DuplicateGroup([paths[i] for i in group], (vectors[group] @ vectors[group[0]]).tolist())
            for group in groups]


def hide_duplicates(index: ImageIndex, groups: Sequence[DuplicateGroup], threshold: float) -> int:
    """Hide from search every image of `groups` but each group's first (`ImageIndex.hide`, in place of what
    was hidden before); returns how many are hidden."""
    hidden = [path for group in groups for path in group.paths[1:]]
    index.hide(hidden, f"near-duplicates at cosine similarity >= {threshold:g}")
    return len(hidden)


def deduplicate(index: ImageIndex, threshold: float = DEFAULT_THRESHOLD, hide: bool = False,
                progress: bool | None = None) -> list[DuplicateGroup]:
    """`find_duplicates`, and with `hide` `hide_duplicates` too: what `clipzsl index dedup` runs."""
    groups = find_duplicates(index, threshold, progress=progress)
    if hide:
        hide_duplicates(index, groups, threshold)
    return groups


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
