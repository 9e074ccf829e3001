"""clip-retrieval's embedding shards, both ways (what clip-retrieval writes and autofaiss reads).

    DIR/img_emb/img_emb_{i}.npy          float16 [n_i, D], L2-normalised rows
    DIR/metadata/metadata_{i}.parquet    columns `image_path` (as given) and `resolved_path` (absolute,
                                         symlinks resolved), row j describing row j of img_emb_{i}
    DIR/text_emb/text_emb_{i}.npy        of a captioned collection (`ShardCaptions`): float16 [n_i, D], row j the
                                         L2-normalised text embedding of row j's image's caption, which
                                         the metadata's `caption` column holds (clip-retrieval's --enable_text)
    DIR/.clipzsl.json                    the ownership marker (`clipzsl.store.claim`), kind "shards"

`ShardWriter` writes that layout (with a run manifest, so a run resumes; `clipzsl.pipeline.embed_to_shards`
embeds images into it on either engine); `index_from_shards` turns such shards,
whoever wrote them, into a searchable `ImageIndex`. Inputs beyond folders and files: a
`.txt` file listing image paths (one a line, relative to the list) and webdataset `.tar`
shards (what img2dataset writes), whose images are named `SHARD.tar/MEMBER` (listed first, read
when their turn comes: `clipzsl.tars`).
"""
from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from .arrays import as_numpy
from .backends import Backend, load_model
from .captions import CaptionedImages
from .errors import InputError
from .image_index import ImageIndex
from .images import ImageLoadError, each_image_once, expand_sources
from .prompts import content_lines
from .records import RecordError, dumps, load, rule
from .metadata import shard_columns
from .saved_index import factory_within, parse_size
from .store import MARKER, atomic_write, claim
from .tars import ImageSourceItem, tar_members
from .text_encoding import encode_prompts

#: the file in a shard folder that says which embed run wrote its shards and how far it got
MANIFEST = "clipzsl-run.json"
#: in a shard folder while a run writes it (either engine), gone once the run wrote its last shard: an
#: import refuses a folder that has it, so a killed run is never indexed as if it were whole
UNFINISHED = ".clipzsl-unfinished"


@dataclass
class ShardReport:
    """What an embed run wrote: rows, shard files (img_emb paths) and the images it could not read."""

    rows: int = 0
    shards: list[str] = field(default_factory=list)
    failures: list[ImageLoadError] = field(default_factory=list)
    complete_before: bool = False  # the run was already complete: nothing was done


def image_sources(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, ImageSourceItem]]:
    """(name, image file path | webdataset member | why not) for every image the inputs name, in order,
    each file once (`each_image_once`): `embed photos /abs/photos` writes no row twice, so its shards
    import. A .tar member is only listed here; `load_sources` decodes it when its turn comes."""
    return each_image_once(_named_sources(paths), lambda item: item[1] if isinstance(item[1], str) else None)


def _named_sources(paths: Sequence[str | os.PathLike]) -> Iterator[tuple[str, ImageSourceItem]]:
    """`image_sources` before repeats are dropped."""
    for path in map(Path, paths):
        if path.is_dir():
            yield from ((str(f), str(f)) for f in expand_sources([str(path)]))
        elif path.suffix == ".txt":
            for _, line in content_lines(path.read_text(encoding="utf-8")):  # lines end at \n or \r\n only
                target = str((path.parent / line) if not os.path.isabs(line) else Path(line))
                yield target, target
        elif path.suffix == ".tar":
            yield from tar_members(path)
        else:
            yield str(path), str(path)


@dataclass(frozen=True)
class ShardCaptions:
    """The captions of the images an embed run writes, as clip-retrieval's inference writes them with
    --enable_text: each shard gets text_emb/text_emb_N.npy (float16 [n, D], row j `model`'s L2-normalised
    embedding of row j's caption) and a `caption` column in its metadata. A row is one image and one text,
    as clip-retrieval's are: an image with several captions is written with its first."""

    model: Backend
    by_path: dict[str, str]  # resolved image path -> its caption

    @classmethod
    def of(cls, collection: CaptionedImages, model: Backend) -> "ShardCaptions":
        """The first caption of each image of `collection` (`CaptionedImages.read`), encoded by `model`."""
        return cls(model, {os.path.realpath(p): c[0] for p, c in zip(collection.paths, collection.captions)})

    @classmethod
    def read(cls, paths: Sequence[str | os.PathLike], captions: str | os.PathLike | None,
             model: Backend) -> "ShardCaptions":
        """`of` the collection of the one folder `paths` names, with `captions` (a .csv or .jsonl file) or a
        .txt beside each image (`CaptionedImages.read`)."""
        if len(paths) != 1:
            raise InputError(f"captions go with one folder (the one their image paths are relative to), not "
                             f"{len(paths)} inputs; embed each captioned folder into its own --out")
        return cls.of(CaptionedImages.read(paths[0], captions), model)

    def texts(self, names: Sequence[str]) -> list[str]:
        """The caption of each image of `names` (as written in the shards); one without is an InputError."""
        missing = [name for name in names if os.path.realpath(name) not in self.by_path]
        if missing:
            raise InputError(f"{missing[0]}: no caption ({len(missing)} such images); give every image a caption, or "
                             "leave out --captions")
        return [self.by_path[os.path.realpath(name)] for name in names]

    def digest(self) -> str:
        """What identifies the captions in a run's identity (`run_identity`)."""
        return hashlib.sha256("\n".join(f"{p}\t{c}" for p, c in sorted(self.by_path.items())).encode()).hexdigest()


def _write_shard(out: Path, number: int, vectors: np.ndarray, names: list[str],
                 captions: ShardCaptions | None = None) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    columns = {"image_path": pa.array(names, pa.string()),
               "resolved_path": pa.array([os.path.realpath(n) for n in names], pa.string())}
    if captions is not None:
        texts = captions.texts(names)
        text_vectors = as_numpy(encode_prompts(captions.model, texts)).astype(np.float16)
        atomic_write(out / "text_emb" / f"text_emb_{number}.npy", lambda f: np.save(f, text_vectors, allow_pickle=False))
        columns["caption"] = pa.array(texts, pa.string())
    emb = out / "img_emb" / f"img_emb_{number}.npy"
    atomic_write(emb, lambda f: np.save(f, vectors.astype(np.float16), allow_pickle=False))
    atomic_write(out / "metadata" / f"metadata_{number}.parquet", lambda f: pq.write_table(pa.table(columns), f))
    return str(emb)


def is_shard_folder(directory: Path) -> bool:
    """Whether a folder is recognisably one an older clipzsl wrote shards into (no marker yet):
    nothing but img_emb/img_emb_*.npy, text_emb/text_emb_*.npy, metadata/metadata_*.parquet and a run manifest."""
    layout = {"img_emb": "img_emb_*.npy", "text_emb": "text_emb_*.npy", "metadata": "metadata_*.parquet"}
    names = {p.name for p in directory.iterdir()}
    return bool(names & set(layout)) and names <= {*layout, MANIFEST, MARKER, UNFINISHED} and all(
        p.match(pattern) or p.name.endswith(".tmp")
        for sub, pattern in layout.items() if (directory / sub).is_dir() for p in (directory / sub).iterdir())


def has_shards(directory: Path) -> bool:
    """Whether a folder already holds shard files (of some run)."""
    return any(any((directory / sub).glob(pattern))
               for sub, pattern in (("img_emb", "*.npy"), ("text_emb", "*.npy"), ("metadata", "*.parquet")))


def claim_shard_folder(out: str | os.PathLike) -> Path:
    """`out` made clipzsl's shard folder (`claim`) before any shard is written into it."""
    return claim(out, "shards", is_shard_folder)


def mark_unfinished(out: Path, unfinished: bool) -> None:
    """Mark a shard folder as being written (before its first shard) or as whole (after its last)."""
    if unfinished:
        atomic_write(out / UNFINISHED, lambda f: f.write(b"an embed run is writing these shards\n"))
    else:
        (out / UNFINISHED).unlink(missing_ok=True)


@dataclass
class RunState:
    """What a shard directory's manifest records: the run that writes it and how far it got."""

    identity: dict
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    done: set[str] = field(default_factory=set)  # paths in the shards written so far
    complete: bool = False

    def seen(self) -> set[str]:
        """The images this run has already written or found unreadable: a resumed run skips them."""
        return self.done | {path for path, _ in self.failures}

    def report(self) -> ShardReport:
        """What the run has written so far."""
        return ShardReport(self.rows, list(self.shards), [ImageLoadError(p, r) for p, r in self.failures])


@dataclass(frozen=True)
class Manifest:
    """The schema of MANIFEST (read through `clipzsl.records`); sealed, so an edit that keeps every type
    right (a count, a path) is refused too, never resumed from."""

    identity: dict  # `run_identity`'s
    shards: list[str]
    rows: int = field(metadata=rule(lambda v: v >= 0, "0 or more"))
    failures: list[tuple[str, str]]
    complete: bool
    record_sha256: str


def run_identity(model: Backend, paths: Sequence[str], shard_size: int, captions: ShardCaptions | None = None) -> dict:
    """What makes two runs the same run: the model's weights, the image list, the shard size and the captions."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()
    identity = {"model": model.spec, "fingerprint": model.fingerprint, "images": len(paths), "paths_sha256": digest,
                "shard_size": shard_size}
    return identity if captions is None else {**identity, "captions_sha256": captions.digest()}


def resume_state(out: str | os.PathLike, identity: dict, resume: bool = True) -> RunState:
    """The state to continue from: empty for a new directory, the manifest's for the same run (with
    `resume`); refuses a directory with shards of another run, or of no known run, or any earlier
    run's without `resume`, so two never mix; a folder clipzsl did not make (`claim_shard_folder`);
    and a manifest that is damaged or was edited."""
    out = claim_shard_folder(out)
    if not resume:
        if has_shards(out) or (out / MANIFEST).exists() or (out / UNFINISHED).exists():
            raise InputError(f"{out}: holds the shards of an earlier run{_unfinished_note(out)}; writing here would "
                             "overwrite them and mix two runs: choose a new --out, delete that folder, or continue "
                             "that run with --resume")
        return RunState(identity)
    if not (out / MANIFEST).is_file():
        if has_shards(out):
            raise InputError(f"{out}: holds shards without a {MANIFEST}, so they are of another run; "
                             "choose a new --out or delete that directory")
        return RunState(identity)
    return _saved_state(out, identity)


def _saved_state(out: Path, identity: dict) -> RunState:
    """The manifest's state, refused unless it is this run's."""
    import pyarrow.parquet as pq

    try:
        saved = load(Manifest, out / MANIFEST)
    except RecordError as err:
        raise InputError(f"{err}; the run cannot be resumed from it: choose a new --out, or delete {out} to start "
                         "over") from err
    state = RunState(saved.identity, saved.shards, saved.rows, saved.failures, complete=saved.complete)
    if state.identity != identity:
        changed = sorted(k for k in set(identity) | set(state.identity) if identity.get(k) != state.identity.get(k))
        raise InputError(f"{out}: written by another run (it differs in {', '.join(changed)}); resuming would mix "
                         "two runs: choose a new --out, or rerun with the same images, model and --shard-size")
    for number in range(len(state.shards)):
        state.done.update(pq.read_table(out / "metadata" / f"metadata_{number}.parquet").column(0).to_pylist())
    return state


class ShardWriter:
    """Rows into clip-retrieval shards under `out`, continuing `state` (from `resume_state`): after each
    shard the manifest records it and the failures so far, so an interrupted run resumes from its last
    shard, whichever engine runs it. The folder is marked unfinished from the start to `close`.
    `on_shard` sees the report after each shard. A folder clipzsl did not make is refused."""

    def __init__(self, out: str | os.PathLike, state: RunState, shard_size: int = 100_000,
                 on_shard: Callable[[ShardReport], None] | None = None, captions: ShardCaptions | None = None):
        self.out = claim_shard_folder(out)
        self.state, self.shard_size, self.on_shard, self.captions = state, shard_size, on_shard, captions
        self.report = state.report()
        self.vectors: list[np.ndarray] = []
        self.names: list[str] = []
        self.pending: list[tuple[str, str]] = []
        self._save()  # before any shard: the directory now belongs to this run
        mark_unfinished(self.out, True)

    def add(self, names: Sequence[str], vectors: np.ndarray, failures: Sequence[ImageLoadError]) -> None:
        """Rows `names` with their `vectors` ([len(names), D]), and the images that could not be read."""
        self.pending += [(f.source, f.reason) for f in failures]
        self.report.failures += failures
        self.vectors.append(vectors)
        self.names.extend(names)
        while len(self.names) >= self.shard_size:
            self._flush()

    def close(self) -> ShardReport:
        """Write the last shard, and mark the run complete."""
        if self.names:
            self._flush()
        self.state.failures += self.pending
        self.state.complete = True
        self._save()
        mark_unfinished(self.out, False)
        return self.report

    def _flush(self) -> None:
        stacked = np.concatenate(self.vectors)
        report = self.report
        report.shards.append(_write_shard(self.out, len(report.shards), stacked[: self.shard_size],
                                          self.names[: self.shard_size], self.captions))
        report.rows += len(stacked[: self.shard_size])
        rest = stacked[self.shard_size :]
        del self.names[: self.shard_size]
        self.vectors = [rest] if len(rest) else []
        self.state.shards, self.state.rows = list(report.shards), report.rows
        self.state.failures += self.pending
        self.pending = []
        self._save()
        if self.on_shard is not None:
            self.on_shard(report)

    def _save(self) -> None:
        save_state(self.out, self.state)


def save_state(out: Path, state: RunState) -> None:
    """Record `state` in the folder's manifest (atomically)."""
    record = Manifest(state.identity, state.shards, state.rows, state.failures, state.complete, "")
    atomic_write(out / MANIFEST, lambda f: f.write(dumps(record)))


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
            raise InputError(f"{path}: not a shard file ({pattern.pattern}) of clip-retrieval's layout; move it out "
                             f"of {folder}, or rename it if it is one")
        if int(match[1]) in found:
            raise InputError(f"{found[int(match[1])]} and {path}: two shards numbered {int(match[1])}; keep one")
        found[int(match[1])] = path
    return found


def _shard_vectors(emb: Path, embed_dim: int, spec: str) -> np.ndarray:
    """A shard's vectors, memory-mapped (read-only); refused, named, unless a float [n, embed_dim] array."""
    try:
        vectors = np.load(emb, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise InputError(f"{emb}: not a readable .npy array of embeddings ({err}); a truncated copy, or an "
                         "array of Python objects? Copy or export the shard again") from err
    if vectors.dtype.kind != "f":
        raise InputError(f"{emb}: {vectors.dtype} values; embedding shards hold float16, float32 or float64 vectors")
    if vectors.ndim != 2 or vectors.shape[1] != embed_dim:
        raise InputError(f"{emb}: vectors of shape {vectors.shape}, but model {spec} embeds "
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
        raise InputError(f"{meta}: unreadable metadata shard, need an `image_path` column ({err})") from err
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise InputError(f"{meta}: `{name}` holds {column.type}, not text; it must name each row's image")
    paths = column.to_pylist()
    if column.null_count:
        raise InputError(f"{meta}: row {paths.index(None)} has no {name} (null); every row must name its "
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
            raise InputError(f"{emb}: row {row} is {what}, so no embedding ({len(bad)} such rows from there in "
                             f"this block); re-embed that image, or drop the row here and in its metadata")
        yield start, block / norms


def _unfinished_note(directory: Path) -> str:
    return " (the embed run writing them was stopped before its end)" if (directory / UNFINISHED).exists() else ""


def _read_shards(directory: str | os.PathLike, backend: Backend) -> list[tuple[Path, np.ndarray, list[str]]]:
    """(npy file, vectors, image paths) of every shard, each checked in full before any row is added: the
    pairs match, every row is a finite non-zero vector, every image_path is given and given once."""
    if (Path(directory) / UNFINISHED).exists():
        raise InputError(f"{directory}: its shards are not all there{_unfinished_note(Path(directory))}; an index of "
                         "them would quietly miss images: rerun `clipzsl embed --resume` into the same folder to finish them")
    shards: list[tuple[Path, np.ndarray, list[str]]] = []
    seen: dict[str, tuple[Path, int]] = {}
    for emb, meta in shard_files(directory):
        vectors, paths = _shard_vectors(emb, backend.embed_dim, backend.spec), _shard_paths(meta)
        if len(paths) != len(vectors):
            raise InputError(f"{meta}: {len(paths)} rows, but {emb} has {len(vectors)}; the pair does not match")
        for row, path in enumerate(paths):
            if seen.setdefault(path, (meta, row)) != (meta, row):
                raise InputError(f"{meta}: row {row} names {path!r} again (first at {seen[path][0]} row "
                                 f"{seen[path][1]}); one image, one row: drop one of them")
        for _ in _unit_rows(vectors, emb):
            pass
        shards.append((emb, vectors, paths))
    return shards


def training_sample(shards: Sequence[tuple[Path, np.ndarray, list[str]]], count: int) -> np.ndarray:
    """`count` rows (all, when there are fewer) of checked shards (`_read_shards`) as float32 unit vectors,
    evenly strided over the rows in shard order: deterministic, and read from the memory maps row by row,
    never a whole shard at a time."""
    total = sum(len(vectors) for _, vectors, _ in shards)
    wanted = (np.arange(min(count, total), dtype=np.int64) * total) // max(count, 1)
    out = np.empty((len(wanted), shards[0][1].shape[1] if shards else 0), np.float32)
    offset = 0
    for emb, vectors, _ in shards:
        chosen = np.flatnonzero((wanted >= offset) & (wanted < offset + len(vectors)))
        for start, block in _unit_rows(vectors[wanted[chosen] - offset], emb):
            out[chosen[start : start + len(block)]] = block
        offset += len(vectors)
    return out


def _shards_metadata(directory: str | os.PathLike, shards: Sequence[tuple[Path, np.ndarray, list[str]]]):
    """The metadata shards' extra columns (caption, url, width...: `shard_columns`) of checked `shards`, as one table."""
    import pyarrow as pa

    metas = dict(shard_files(directory))
    return pa.concat_tables([shard_columns(metas[emb], paths) for emb, _, paths in shards], promote_options="permissive")


def index_from_shards(directory: str | os.PathLike, out: str | os.PathLike, model: Backend | str,
                      factory: str = "auto", dtype: str = "float32", max_memory: int | str | None = None):
    """An `ImageIndex` at `out` holding every row of the shards (keys from `image_path`), its FAISS
    index saved. `model` must be the one that embedded them: it encodes the text queries. All the
    shards are checked before the index is opened: they are imported completely, or refused.
    `max_memory` (bytes, or a size such as "2G": `parse_size`) bounds the saved index's size in RAM:
    the factory is chosen to fit it (`factory_within`: the usual one, else a compressed SQ or PQ
    index), trained on a strided sample of the shards (`training_sample`), and built in one pass
    over the shards, one block of one shard in memory at a time (`save_streamed`). The metadata shards'
    other columns (caption, url, width, height...) are kept as the index's metadata (`clipzsl.metadata`)."""
    budget = None if max_memory is None else parse_size(max_memory)  # a bad budget: refused before any work
    backend = load_model(model) if isinstance(model, str) else model
    shards = _read_shards(directory, backend)
    index = ImageIndex(out, backend, dtype=dtype)
    blocks = ((paths[start : start + len(block)], block) for emb, vectors, paths in shards
              for start, block in _unit_rows(vectors, emb))
    extra = _shards_metadata(directory, shards)
    if budget is None:
        index.add_vectors(blocks, factory, metadata=extra)  # a bad factory: refused first
        return index
    count = len(index) + sum(len(vectors) for _, vectors, _ in shards)
    index.add_vectors(blocks, factory_within(count, backend.embed_dim, budget, factory),
                      lambda n: training_sample(shards, n), metadata=extra)
    return index
