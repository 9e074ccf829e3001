"""clip-retrieval's embedding shards, both ways (what clip-retrieval writes and autofaiss reads).

    DIR/img_emb/img_emb_{i}.npy          float16 [n_i, D], L2-normalised rows
    DIR/metadata/metadata_{i}.parquet    columns `image_path` (as given) and `resolved_path` (absolute,
                                         symlinks resolved), row j describing row j of img_emb_{i}
    DIR/.clipzsl.json                    the ownership marker (`clipzsl.store.claim`), kind "shards"

`write_shards` embeds images into that layout; `index_from_shards` turns such shards,
whoever wrote them, into a searchable `ImageIndex`. Inputs beyond folders and files: a
`.txt` file listing image paths (one a line, relative to the list) and webdataset `.tar`
shards (what img2dataset writes), whose images are named `SHARD.tar/MEMBER`.
"""
from __future__ import annotations

import io
import os
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
from PIL import Image

from .backends import Backend, load_model
from .image_index import ImageIndex
from .images import (IMAGE_SUFFIXES, ImageLoadError, check_output, each_image_once, embed_images, expand_sources,
                     load_image)
from .prompts import content_lines
from .store import MARKER, atomic_write, claim

#: the file in a shard folder that says which `--engine ray` run wrote its shards and how far it got
MANIFEST = "clipzsl-run.json"
#: in a shard folder while a run writes it (either engine), gone once the run wrote its last shard: an
#: import refuses a folder that has it, so a killed run is never indexed as if it were whole
UNFINISHED = ".clipzsl-unfinished"


@dataclass
class ShardReport:
    rows: int = 0
    shards: list[str] = field(default_factory=list)
    failures: list[ImageLoadError] = field(default_factory=list)


def image_sources(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str | Image.Image | ImageLoadError]]:
    """(name, image file path | decoded image | why not) for every image the inputs name, in order, each
    file once (`each_image_once`): `embed photos /abs/photos` writes no row twice, so its shards import."""
    return each_image_once(_named_sources(paths), lambda item: item[1] if isinstance(item[1], str) else None)


def _named_sources(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, str | Image.Image | ImageLoadError]]:
    """`image_sources` before repeats are dropped."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from ((f, f) for f in expand_sources([str(path)]))
        elif path.suffix == ".txt":
            for _, line in content_lines(path.read_text(encoding="utf-8")):  # lines end at \n or \r\n only
                target = str((path.parent / line) if not os.path.isabs(line) else Path(line))
                yield target, target
        elif path.suffix == ".tar":
            yield from _tar_images(path)
        else:
            yield str(path), str(path)


def _tar_images(path: Path) -> Iterator[tuple[str, Image.Image | ImageLoadError]]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    name = f"{path}/{member.name}"
                    try:
                        with Image.open(io.BytesIO(tar.extractfile(member).read())) as image:
                            yield name, load_image(image)
                    except (OSError, SyntaxError, ValueError) as err:
                        yield name, ImageLoadError(name, f"corrupt or truncated image ({err})")
    except tarfile.TarError as err:
        raise ValueError(f"{path}: not a readable webdataset .tar shard ({err})") from err


def _write_shard(out: Path, number: int, vectors: np.ndarray, names: list[str]) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    emb = out / "img_emb" / f"img_emb_{number}.npy"
    atomic_write(emb, lambda f: np.save(f, vectors.astype(np.float16), allow_pickle=False))
    table = pa.table({"image_path": pa.array(names, pa.string()),
                      "resolved_path": pa.array([os.path.realpath(n) for n in names], pa.string())})
    atomic_write(out / "metadata" / f"metadata_{number}.parquet", lambda f: pq.write_table(table, f))
    return str(emb)


def is_shard_folder(directory: Path) -> bool:
    """Whether a folder is recognisably one an older clipzsl wrote shards into (no marker yet):
    nothing but img_emb/img_emb_*.npy, metadata/metadata_*.parquet and a run manifest."""
    layout = {"img_emb": "img_emb_*.npy", "metadata": "metadata_*.parquet"}
    names = {p.name for p in directory.iterdir()}
    return bool(names & set(layout)) and names <= {*layout, MANIFEST, MARKER, UNFINISHED} and all(
        p.match(pattern) or p.name.endswith(".tmp")
        for sub, pattern in layout.items() if (directory / sub).is_dir() for p in (directory / sub).iterdir())


def has_shards(directory: Path) -> bool:
    """Whether a folder already holds shard files (of some run)."""
    return any((directory / "img_emb").glob("*.npy")) or any((directory / "metadata").glob("*.parquet"))


def claim_shard_folder(out: str | os.PathLike) -> Path:
    """`out` made clipzsl's shard folder (`claim`) before any shard is written into it."""
    return claim(out, "shards", is_shard_folder)


def mark_unfinished(out: Path, unfinished: bool) -> None:
    """Mark a shard folder as being written (before its first shard) or as whole (after its last)."""
    if unfinished:
        atomic_write(out / UNFINISHED, lambda f: f.write(b"an embed run is writing these shards\n"))
    else:
        (out / UNFINISHED).unlink(missing_ok=True)


def write_shards(
    backend: Backend,
    paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    shard_size: int = 100_000,
    batch_size: int | None = None,
    progress: bool | None = None,
) -> ShardReport:
    """Embed every image the inputs name into clip-retrieval shards of `shard_size` rows under `out`;
    unreadable images are skipped and reported. Memory holds one shard's vectors, never all.
    `out` must be new or empty (or an empty folder clipzsl made): shards of another run are never
    overwritten or mixed with these (`--engine ray` resumes a run through its manifest instead)."""
    check_output(out, paths)
    out = claim_shard_folder(out)
    if has_shards(out) or (out / MANIFEST).exists() or (out / UNFINISHED).exists():
        raise ValueError(f"{out}: holds the shards of an earlier run{_unfinished_note(out)}; writing here would "
                         "overwrite them and mix two runs: choose a new --out or delete that folder")
    mark_unfinished(out, True)
    report = ShardReport()
    chunk: list[tuple[str, str | Image.Image]] = []
    vectors: list[np.ndarray] = []
    names: list[str] = []

    def embed_chunk() -> None:
        result = embed_images(backend, [s for _, s in chunk], batch_size=batch_size, skip_errors=True,
                              progress=progress)
        by_index = {f"<image {i}>": name for i, (name, _) in enumerate(chunk)}
        report.failures.extend(ImageLoadError(by_index.get(f.source, f.source), f.reason) for f in result.failures)
        vectors.append(result.embeddings.numpy())
        names.extend(by_index.get(s, s) for s in result.sources)
        chunk.clear()

    def flush() -> None:
        stacked = np.concatenate(vectors)
        report.shards.append(_write_shard(out, len(report.shards), stacked, names[:]))
        report.rows += len(stacked)
        vectors.clear()
        names.clear()

    for name, source in image_sources(paths):
        if isinstance(source, ImageLoadError):
            report.failures.append(source)
            continue
        chunk.append((name, source))
        if len(chunk) == min(1024, shard_size):
            embed_chunk()
            if len(names) >= shard_size:
                flush()
    if chunk:
        embed_chunk()
    if names:
        flush()
    mark_unfinished(out, False)
    return report


#: the shard files of clip-retrieval's layout, by sub-folder; the number pairs an img_emb file with its metadata
SHARD_NAMES = {"img_emb": re.compile(r"img_emb_(\d+)\.npy"), "metadata": re.compile(r"metadata_(\d+)\.parquet")}
#: rows normalised and added at a time
_BLOCK = 65_536


def shard_files(directory: str | os.PathLike) -> list[tuple[Path, Path]]:
    """(img_emb_i.npy, metadata_i.parquet) pairs of a clip-retrieval directory, by shard number.

    Every visible file in img_emb/ and metadata/ must be one half of a pair: an extra, unpaired or
    twice-numbered file is refused by name (importing around it would quietly drop its rows)."""
    directory = Path(directory)
    embeddings, metadata = (_numbered(directory / folder, pattern) for folder, pattern in SHARD_NAMES.items())
    if not embeddings:
        raise FileNotFoundError(f"{directory}: no img_emb/img_emb_*.npy shards (clip-retrieval's layout)")
    for number, meta in metadata.items():
        if number not in embeddings:
            raise FileNotFoundError(f"{meta}: no img_emb/img_emb_{number}.npy beside it; every metadata_i.parquet "
                                    "needs its img_emb_i.npy (copy it, or move this file out)")
    pairs = []
    for number, emb in sorted(embeddings.items()):
        if number not in metadata:
            meta = directory / "metadata" / f"metadata_{number}.parquet"
            raise FileNotFoundError(f"{meta}: missing; every img_emb_i.npy needs its metadata_i.parquet")
        pairs.append((emb, metadata[number]))
    return pairs


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    """The shard files of one sub-folder by number (hidden files, such as an interrupted copy's, are passed over)."""
    found: dict[int, Path] = {}
    for path in sorted(folder.iterdir()) if folder.is_dir() else []:
        if path.name.startswith("."):
            continue
        match = pattern.fullmatch(path.name)
        if not match or not path.is_file():
            raise ValueError(f"{path}: not a shard file ({pattern.pattern}) of clip-retrieval's layout; move it out "
                             f"of {folder}, or rename it if it is one")
        if int(match[1]) in found:
            raise ValueError(f"{found[int(match[1])]} and {path}: two shards numbered {int(match[1])}; keep one")
        found[int(match[1])] = path
    return found


def _shard_vectors(emb: Path, embed_dim: int, spec: str) -> np.ndarray:
    """A shard's vectors, memory-mapped (read-only); refused, named, unless a float [n, embed_dim] array."""
    try:
        vectors = np.load(emb, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise ValueError(f"{emb}: not a readable .npy array of embeddings ({err}); a truncated copy, or an "
                         "array of Python objects? Copy or export the shard again") from err
    if vectors.dtype.kind != "f":
        raise ValueError(f"{emb}: {vectors.dtype} values; embedding shards hold float16, float32 or float64 vectors")
    if vectors.ndim != 2 or vectors.shape[1] != embed_dim:
        raise ValueError(f"{emb}: vectors of shape {vectors.shape}, but model {spec} embeds "
                         f"{embed_dim} dimensions; pass the model that wrote the shards (--model)")
    return vectors


def _shard_paths(meta: Path) -> list[str]:
    """A metadata shard's image paths: its `resolved_path` column where clipzsl wrote one (absolute, so
    usable from any directory), else clip-retrieval's `image_path`; refused, naming the row, where a
    value is missing."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        name = "resolved_path" if "resolved_path" in pq.read_schema(meta).names else "image_path"
        column = pq.read_table(meta, columns=[name]).column(0)
    except (OSError, KeyError, ValueError) as err:
        raise ValueError(f"{meta}: unreadable metadata shard, need an `image_path` column ({err})") from err
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"{meta}: `{name}` holds {column.type}, not text; it must name each row's image")
    paths = column.to_pylist()
    if column.null_count:
        raise ValueError(f"{meta}: row {paths.index(None)} has no {name} (null); every row must name its "
                         "image (drop that row, and the same row of its img_emb .npy)")
    return paths


def _unit_rows(vectors: np.ndarray, emb: Path) -> Iterator[tuple[int, np.ndarray]]:
    """(first row, block of rows as float32 unit vectors): copies, as np.load's memory map is read-only. A row
    that is not finite or all zeros is refused by file and row: it would match nothing, or everything."""
    for start in range(0, len(vectors), _BLOCK):
        block = np.array(vectors[start : start + _BLOCK], dtype=np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            norms = np.linalg.norm(block, axis=1, keepdims=True)
        bad = np.flatnonzero(~np.isfinite(block).all(axis=1) | ~(norms[:, 0] > 0) | ~np.isfinite(norms[:, 0]))
        if len(bad):
            row = start + int(bad[0])
            what = "all zeros" if not block[bad[0]].any() else "not finite (NaN or inf, or beyond float32)"
            raise ValueError(f"{emb}: row {row} is {what}, so no embedding ({len(bad)} such rows from there in "
                             f"this block); re-embed that image, or drop the row here and in its metadata")
        yield start, block / norms


def _unfinished_note(directory: Path) -> str:
    return " (the embed run writing them was stopped before its end)" if (directory / UNFINISHED).exists() else ""


def _read_shards(directory: str | os.PathLike, backend: Backend) -> list[tuple[Path, np.ndarray, list[str]]]:
    """(npy file, vectors, image paths) of every shard, each checked in full before any row is added: the
    pairs match, every row is a finite non-zero vector, every image_path is given and given once."""
    if (Path(directory) / UNFINISHED).exists():
        raise ValueError(f"{directory}: its shards are not all there{_unfinished_note(Path(directory))}; an index of "
                         "them would quietly miss images: embed again into a new folder (--engine ray resumes)")
    shards, seen = [], {}
    for emb, meta in shard_files(directory):
        vectors, paths = _shard_vectors(emb, backend.embed_dim, backend.spec), _shard_paths(meta)
        if len(paths) != len(vectors):
            raise ValueError(f"{meta}: {len(paths)} rows, but {emb} has {len(vectors)}; the pair does not match")
        for row, path in enumerate(paths):
            if seen.setdefault(path, (meta, row)) != (meta, row):
                raise ValueError(f"{meta}: row {row} names {path!r} again (first at {seen[path][0]} row "
                                 f"{seen[path][1]}); one image, one row: drop one of them")
        for _ in _unit_rows(vectors, emb):
            pass
        shards.append((emb, vectors, paths))
    return shards


def index_from_shards(directory: str | os.PathLike, out: str | os.PathLike, model: Backend | str,
                      factory: str = "auto", dtype: str = "float32"):
    """An `ImageIndex` at `out` holding every row of the shards (keys from `image_path`), its FAISS
    index saved. `model` must be the one that embedded them: it encodes the text queries. All the
    shards are checked before the index is opened: they are imported completely, or refused."""
    backend = load_model(model) if isinstance(model, str) else model
    shards = _read_shards(directory, backend)
    index = ImageIndex(out, backend, dtype=dtype)
    index.add_vectors(((paths[start : start + len(block)], block) for emb, vectors, paths in shards
                       for start, block in _unit_rows(vectors, emb)), factory)  # a bad factory: refused first
    return index
