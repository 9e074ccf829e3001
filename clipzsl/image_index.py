"""A collection of images embedded once and searched by text, by image or by vector.

The index is an `EmbeddingStore` keyed by absolute file path, with each file's size
and modification time stored beside its vector: re-running `update` embeds only new
or changed files and forgets deleted ones (never a whole folder that is merely unmounted or
unreadable: that needs `prune`). Every `checkpoint_every` images become a
segment as they are embedded, so an interrupted run loses at most one checkpoint's
work; the FAISS index is brought up to date (new rows added, never retrained) at the end.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Sequence, Union, cast

import numpy as np

from .arrays import as_numpy, is_torch
from .backends import Backend, load_model
from .errors import InputError, MissingExtra
from .images import EmbeddedImages, ImageLoadError, check_output, embed_images, expand_sources
from .prompts import query_text
from .metadata import Metadata, read_sidecar
from .records import RecordError, dumps, parse, rule
from .saved_index import Allowed, SavedIndex, describe_tuning, factory_within, parse_size, save_streamed
from .store import EmbeddingStore, StoreError
from .tars import TarMember, embed_named, is_tar, tar_members
from .text_encoding import vocabulary_queries

if TYPE_CHECKING:
    import torch

logger = logging.getLogger(__name__)

#: what a search takes: a text, an image file (as a `pathlib.Path`) or a query embedding
Query = Union[str, "torch.Tensor", np.ndarray, os.PathLike]


@dataclass
class UpdateReport:
    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    failures: list[ImageLoadError] = field(default_factory=list)

    def summary(self, name: str, size: int) -> str:
        """One line: the index `name` now holds `size` images, and what this update did."""
        return (f"{name}: {size} images ({self.added} added, {self.updated} updated, {self.removed} removed, "
                f"{self.unchanged} unchanged)")


@dataclass
class RepairReport:
    damaged: list[str] = field(default_factory=list)  # segment files set aside, with what was wrong
    reembedded: int = 0  # lost images embedded again from their files
    unrecoverable: list[str] = field(default_factory=list)  # lost images whose files are gone or unreadable
    index_rebuilt: bool = False

    def summary(self, name: str, size: int) -> str:
        """One line: the index `name` now holds `size` images, and what the repair found and did."""
        return (f"{name}: {size} images; {len(self.damaged)} damaged segments, {self.reembedded} images re-embedded, "
                f"{len(self.unrecoverable)} lost" + (", index rebuilt" if self.index_rebuilt else ""))


@dataclass(frozen=True)
class IndexInfo:
    """What `ImageIndex.info` measures: size on disk, model, saved FAISS index, its recall@10 on each
    kind of query measured now, and what its search parameter was tuned on."""

    images: int
    bytes: int
    dtype: str
    model: str
    segments: int
    dead_rows: int  # replaced or removed rows still on disk (`compact` drops them)
    factory: str
    search_parameter: int | None  # nprobe / efSearch; None for exact search
    recall_at_10: float | None  # on stored vectors as queries, against exact search; None for an empty index
    recall_sample: int  # stored vectors used as queries for it
    text_recall_at_10: float | None = None  # on text-like queries from the model; None: not measured
    text_sample: int = 0  # text-like queries used for it
    tuning: str = "exact search: nothing tuned"  # what the search parameter was tuned on (`describe_tuning`)

    def text(self, name: str) -> str:
        """The report `clipzsl index info` prints for the index `name`."""
        parameter = f" (search parameter {self.search_parameter})" if self.search_parameter else ""
        return (f"{name}: {self.images} images, {self.bytes / 1e6:.1f} MB on disk ({self.dtype}, {self.segments} "
                f"segments, {self.dead_rows} replaced rows)\nmodel: {self.model}\nfaiss factory: {self.factory}"
                f"{parameter}\nimage recall@10: {self._measured(self.recall_at_10, self.recall_sample, 'stored vectors')}"
                f"\ntext recall@10: {self._measured(self.text_recall_at_10, self.text_sample, VOCABULARY)}"
                f"\ntuning: {self.tuning}")

    def _measured(self, recall: float | None, queries: int, what: str) -> str:
        """A recall as `text` shows it: the number and on what queries, or why there is none."""
        if recall is not None:
            return f"{recall:.3f} against exact search on {queries} {what}, measured now"
        return "n/a (empty)" if not self.images else "not measured (the model's text tower is not at hand)"


#: the prefix in the store's state table of the images hidden from search (`ImageIndex.hide`)
HIDDEN_STATE = "hidden_"


@dataclass(frozen=True)
class HiddenImages:
    """The schema of what `ImageIndex.hide` keeps out of search results (a JSON record in the store's
    state table, read through `clipzsl.records`): the images' paths, and why."""

    paths: list[str] = field(metadata=rule(lambda v: len(set(v)) == len(v) > 0, "a list of paths without repeats"))
    reason: str


#: what the text-like queries are, as `index info` names them (`text_encoding.vocabulary_queries`)
VOCABULARY = "prompts of the model's vocabulary"


@dataclass(frozen=True)
class _Plan:
    """What an update does: the files found, those to embed (with their stamps), the indexed ones gone."""

    roots: list[str]
    files: list[str]
    stored: dict[str, str]
    todo: list[str]
    stamps: dict[str, str]
    gone: list[str]
    members: dict[str, TarMember]  # the webdataset .tar members among `files`


def file_stamp(path: str) -> str:
    stat = os.stat(path)
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def is_under(path: str, root: str) -> bool:
    """Whether `path` is `root` or lies below it (both resolved)."""
    return path == root or path.startswith(root + os.sep)


def _gone(path: str, shards: Sequence[str] = ()) -> bool:
    """Whether an indexed file is confirmed missing (not merely unreadable where it is). A webdataset .tar
    member is when its shard is: read now (one of `shards`) without it, or itself gone."""
    shard = _shard_of(path)
    if shard is not None:
        return shard in shards
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return True
    except OSError:
        pass  # permission denied on the way: still there, as far as anyone can tell
    return False


def _gone_keys(stored: dict[str, str], present: set[str], roots: Sequence[str], prune: bool) -> list[str]:
    """The indexed images under `roots` not `present` now that are to be forgotten: every one with `prune`,
    else those confirmed gone (`_gone`)."""
    shards = [r for r in roots if is_tar(r)]
    return [k for k in stored if k not in present and any(is_under(k, r) for r in roots)
            and (prune or _gone(k, shards))]


def _shard_of(path: str) -> str | None:
    """The webdataset .tar shard a `SHARD.tar/MEMBER` path names an image of, while that file exists."""
    cut = path.find(".tar" + os.sep)
    return path[:cut + 4] if cut >= 0 and os.path.isfile(path[:cut + 4]) else None


def check_roots(roots: Sequence[str], files: Sequence[str], stored: dict[str, str], prune: bool) -> None:
    """Refuse an update (StoreError) when a given folder holds indexed images but yields none now:
    missing, unreadable or empty, which is far more often an unmounted drive or a permission
    change than a collection deleted on purpose (`prune` says it was). A missing path that
    holds no indexed image is a typo: FileNotFoundError."""
    for root in roots:
        held = sum(is_under(k, root) for k in stored)
        if not held and not os.path.exists(root):
            raise FileNotFoundError(f"{root}: no such file or folder; check the path")
        if held and not prune and not any(is_under(f, root) for f in files):
            raise StoreError(
                f"{root}: now missing, unreadable or without images, but the index holds {held} images from it; "
                "nothing was changed. Mount it or fix its permissions and run again, or run again with --prune "
                "(Python: prune=True) to remove its images from the index.")



class ImageIndex:
    """Image embeddings of one model, stored in `directory`, searchable by text, image or vector.

    Its rows are an `EmbeddingStore` (`store`) and its FAISS index a `SavedIndex` (`saved_index`);
    no other module of clipzsl reaches into either: what they need is a method here."""

    def __init__(self, directory: str | os.PathLike, model: Backend | str | None = None, dtype: str = "float32",
                 device: str = "auto", precision: str = "auto"):
        """Open or create an index. Without `model`, an existing index loads the model it was built with.
        `dtype`: float32, or float16 (half the disk, as clip-retrieval stores embeddings) for a new index.
        `device`, `precision`: for a model given as a spec (`load_model`'s). The vectors are float32 on
        the CPU whatever they are, and FAISS searches them there: the installed build is faiss-cpu, and a
        query is one vector, so the device would only add a copy."""
        if model is None:
            model = model_spec_of(directory) or "packaged"
        self.model = load_model(model, device=device, precision=precision) if isinstance(model, str) else model
        self.directory = Path(directory)
        self.store = EmbeddingStore(
            directory, self.model.fingerprint, self.model.embed_dim, self.model.spec, dtype=dtype,
            repair_hint=f"Run `clipzsl index repair {directory}` to re-embed what was lost.",
            precision=self.model.precision,
        )
        self.saved_index = SavedIndex(self.store, self.text_queries)
        self._hidden: tuple[object, frozenset[str]] = (None, frozenset())  # (the record as stored, its paths)
        self.metadata = Metadata(self.store)

    def __len__(self) -> int:
        return len(self.store)

    @property
    def roots(self) -> list[str]:
        """The folders `update` was given (resolved): each indexed file lies under one of them."""
        return self.store.noted("roots")

    def paths(self) -> list[str]:
        """The indexed image paths, in the order they were (last) indexed: the id list a service numbers."""
        return self.store.keys()

    def close(self) -> None:
        """Close the index's table, in the thread that used it (a later call opens it again)."""
        self.store.close()

    def update(
        self,
        folders: str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int | None = None,
        checkpoint_every: int = 1024,
        progress: bool | None = None,
        factory: str = "auto",
        workers: int | None = None,
        prune: bool = False,
        max_memory: int | str | None = None,
        metadata: str | os.PathLike | None = None,
    ) -> UpdateReport:
        """Embed new and changed images under `folders`; forget indexed files that are gone.
        `factory`: FAISS factory string of the saved index ("auto": the saved one, else by size),
        checked before anything is embedded or written.
        `batch_size`, `workers`: as in `embed_images` (None: the model's).
        `prune`: a re-index never empties a collection silently. Without it, a given folder that
        holds indexed images but now yields none (missing, unreadable, empty: an unmounted drive, a
        permission change) refuses the update with nothing changed, and an indexed file is forgotten
        only once it is confirmed gone (a file in a folder that cannot be read is kept). With it,
        every indexed file under `folders` that was not found now is forgotten.
        `max_memory` (bytes, or a size such as "2G") bounds the saved index's size in RAM, as in
        `index_from_shards`: the factory is chosen to fit the collection's size after the update.
        `metadata`: a sidecar CSV of extra columns keyed by `path` (`clipzsl.metadata.read_sidecar`),
        stored with the index beside the path-derived ones (folder, name, width, height) for `where`."""
        extra = read_sidecar(metadata) if metadata is not None else None  # a bad CSV: refused before any work
        plan = self._plan(folders, prune)
        count = len(plan.stored) - len(plan.gone) + sum(f not in plan.stored for f in plan.todo)
        if max_memory is not None:  # a bad budget, or none that fits: refused before anything is embedded
            factory = factory_within(count, self.model.embed_dim, parse_size(max_memory), factory)
        self.saved_index.check_factory(factory, count)
        self.store.claim()  # a folder clipzsl did not make is refused before the first write
        self.store.note("roots", sorted(set(self.roots) | set(plan.roots)))  # what each image is served from
        self.store.remove(plan.gone)
        report = UpdateReport(removed=len(plan.gone), unchanged=len(plan.files) - len(plan.todo))
        for result in self._embed(plan.todo, plan.stamps.__getitem__, checkpoint_every, plan.members,
                                  batch_size=batch_size, progress=progress, workers=workers):
            report.failures += result.failures
            report.updated += sum(1 for f in result.sources if f in plan.stored)
            report.added += sum(1 for f in result.sources if f not in plan.stored)
        self.saved_index.save(factory)
        self.metadata.update(plan.todo, extra)
        return report

    def _plan(self, folders: str | os.PathLike | Sequence[str | os.PathLike], prune: bool) -> _Plan:
        """The files under `folders` (each once), the ones new or changed since indexed, the indexed ones gone."""
        given = [os.fspath(p) for p in ([folders] if isinstance(folders, (str, os.PathLike)) else folders)]
        check_output(self.directory, given)
        roots = [str(Path(p).resolve()) for p in given]
        files, members = _files_under(roots)
        stored = self.store.infos()
        check_roots(roots, files, stored, prune)
        gone = _gone_keys(stored, set(files), roots, prune)
        stamps = {f: file_stamp(str(members[f].tar) if f in members else f) for f in files}  # a member: its shard's
        todo = [f for f in files if stored.get(f) != stamps[f]]
        return _Plan(roots, files, stored, todo, stamps, gone, members)

    def _embed(self, files: list[str], stamp: Callable[[str], str], chunk: int,
               members: dict[str, TarMember] | None = None, **options) -> Iterator[EmbeddedImages]:
        """Embed `files` (webdataset .tar `members` among them) `chunk` at a time (unreadable ones reported
        back), each chunk added as it comes, with its files' `stamp`s: an interrupted run loses at most one chunk."""
        members = members or {}
        for start in range(0, len(files), chunk):
            result = embed_named([(f, members.get(f, f)) for f in files[start : start + chunk]],
                                 lambda images, **kw: embed_images(self.model, images, **kw), **options)
            if result.sources:
                self.store.add(result.sources, as_numpy(result.embeddings), [stamp(f) for f in result.sources])
            yield result

    def add_vectors(self, blocks: Iterable[tuple[Sequence[str], np.ndarray]], factory: str = "auto",
                    training: Callable[[int], np.ndarray] | None = None, metadata: Any = None) -> dict:
        """Add (paths, vectors [N, D]) blocks embedded elsewhere (e.g. by `clipzsl embed` into shards),
        then bring the saved FAISS index up to date; `factory` is refused (an InputError) before the
        first row is written. With `training` (n -> n vectors drawn from the blocks' data) the index is
        built as the blocks come, in one pass (`save_streamed`). Returns the saved index's state
        (`SavedIndex.state`). `metadata`: extra columns keyed by `path` (a pyarrow table, e.g.
        `clipzsl.metadata.shard_columns`) stored beside the path-derived ones (no width or height read:
        the files may be elsewhere)."""
        self.saved_index.check_factory(factory)
        if training is not None:
            state = save_streamed(self.saved_index, factory, blocks, training)
        else:
            for paths, vectors in blocks:
                self.store.add(paths, vectors)
            state = self.saved_index.save(factory)
        self.metadata.update([], metadata, sizes=False)
        return state

    def query_vector(self, query: Query) -> np.ndarray:
        """A query as one embedding [1, D]: text, an image file (`pathlib.Path`), or a vector."""
        if isinstance(query, str):
            return as_numpy(self.model.encode_texts([query_text(query)]))
        if isinstance(query, os.PathLike):
            return as_numpy(embed_images(self.model, [str(query)], progress=False).embeddings)
        return as_numpy(query).reshape(1, -1)

    def query_vectors(self, queries: Sequence[Query] | np.ndarray | torch.Tensor) -> np.ndarray:
        """Queries as embeddings [N, D], in their order: the texts in one text-tower pass, the image
        files in one `embed_images` call, vectors as given (a [N, D] array or tensor is N vectors)."""
        if _is_array(queries):
            return as_numpy(queries).reshape(-1, self.model.embed_dim)
        items = list(queries)
        out = np.empty((len(items), self.model.embed_dim), np.float32)
        texts = [i for i, q in enumerate(items) if isinstance(q, str)]
        images = [i for i, q in enumerate(items) if isinstance(q, os.PathLike)]
        if texts:
            out[texts] = as_numpy(self.model.encode_texts([query_text(str(items[i])) for i in texts]))
        if images:
            out[images] = self._image_vectors([os.fspath(q) for q in items if isinstance(q, os.PathLike)])
        for i, query in enumerate(items):
            if _is_array(query):
                out[i] = as_numpy(query).reshape(-1)
        return out

    def _image_vectors(self, paths: list[str]) -> np.ndarray:
        """Embeddings of image files, each file embedded once however often it is named."""
        unique = list(dict.fromkeys(paths))
        embedded = embed_images(self.model, unique, progress=False)
        if len(embedded.sources) != len(unique):
            raise InputError(f"image queries {unique}: {len(embedded.sources)} images found in {len(unique)} "
                             "paths; give image files, not folders")
        row = {path: r for r, path in enumerate(unique)}
        return as_numpy(embedded.embeddings)[[row[p] for p in paths]]

    def search(self, query: Query, top_k: int = 10, where: str | None = None) -> list[tuple[str, float]]:
        """The `top_k` (path, cosine similarity) pairs, best first, for a text query, an image
        file (as a `pathlib.Path`) or a query embedding. `where`: a filter over the metadata columns
        (`clipzsl.where`, e.g. "folder = 'cats' and width > 512"): only images it holds true for. The
        `hidden` images are left out."""
        queries = cast(np.ndarray, query) if _is_array(query) else [query]  # a [N, D] array is N queries
        return self.search_many(queries, top_k, where)[0] if self.store else []

    def search_many(self, queries: Sequence[Query] | np.ndarray | torch.Tensor, top_k: int = 10,
                    where: str | None = None) -> list[list[tuple[str, float]]]:
        """Per query, what `search` returns for it, in one call: the queries are embedded together
        (`query_vectors`) and searched as one batch (a FAISS matrix product, not one scan each)."""
        allowed = self.allowed(where)  # a bad filter: refused before any query is embedded
        if not self.store:
            return [[] for _ in range(len(queries))]
        return self.saved_index.search(self.query_vectors(queries), top_k, allowed)

    def allowed(self, where: str | None) -> Callable[[], Allowed] | None:
        """The rows a search may return, as `SavedIndex.search` takes them: those the filter `where` holds
        true for, less the `hidden` images, worked out inside the search's consistent read (None: every
        row). The filter is checked now (`clipzsl.where.FilterError`)."""
        if where is not None:
            self.metadata.check(where)
        hidden = self.hidden()
        if where is None and not hidden:
            return None

        def rows() -> Allowed:
            span = self.store.row_span
            found = (self.metadata.allowed(where) if where is not None
                     else Allowed(span[0], np.ones(span[1] - span[0], bool)))
            if not hidden:
                return found
            return found & Allowed.all_but(np.fromiter(self.store.rows_of(list(hidden)).values(), np.int64), span)
        return rows

    def hide(self, paths: Sequence[str], reason: str = "") -> None:
        """Keep the images `paths` out of every search from now on, in place of those hidden before (none:
        every image is found again), noting `reason`; written in one transaction of the index's table."""
        record = HiddenImages(sorted(set(paths)), reason)
        with self.store.writing():
            self.store.set_state(HIDDEN_STATE, {"record": dumps(record).decode()} if record.paths else {})

    def hidden(self) -> frozenset[str]:
        """The images `hide` keeps out of search results; a damaged record is a StoreError that says how to
        write it again."""
        value = self.store.state(HIDDEN_STATE).get("record")
        if value is None:
            return frozenset()
        if value != self._hidden[0]:
            self._hidden = (value, frozenset(self._hidden_record(value).paths))
        return self._hidden[1]

    def _hidden_record(self, value: object) -> HiddenImages:
        where = f"{self.store.directory / 'table.sqlite'} (hidden images)"
        try:
            return parse(HiddenImages, json.loads(value) if isinstance(value, str) else value, where)
        except (ValueError, RecordError) as err:
            raise StoreError(f"{where}: damaged ({err}); run `clipzsl index dedup {self.directory} --show` to "
                             "show every image again (or --hide to hide the duplicates afresh)") from err

    def vectors(self) -> tuple[list[str], np.ndarray]:
        """Every indexed image's path and vector [N, D], in index order, read as one consistent state."""
        def read() -> tuple[list[str], np.ndarray]:
            rows = np.sort(self.store.live_rows())
            keys = self.store.row_keys(rows)
            return [keys[int(r)] for r in rows], self.store.read_rows(rows)
        return self.store.consistent(read)

    def text_queries(self, count: int, part: int = 0) -> np.ndarray | None:
        """`count` text-like queries from the model's text tower (`vocabulary_queries`: part 0 tunes the
        saved index, part 1 checks it), or None where the model has no text tower installed."""
        try:
            return vocabulary_queries(self.model, count, part)
        except MissingExtra as err:
            logger.warning("text queries not measured: %s", err)
            return None

    def info(self, sample: int = 200) -> IndexInfo:
        """Size, dtype, FAISS factory, what the search parameter was tuned on, and recall@10 of the
        saved index against exact search measured now on new queries of each kind (`SavedIndex.measure`:
        `sample` stored vectors and `sample` text-like queries); every checksum is verified first."""
        damaged = self.store.verify()
        if damaged:
            segment, problem = damaged[0]
            raise StoreError(f"{self.directory / segment.name}: damaged store segment ({problem}); "
                             f"{len(damaged)} damaged in all. {self.store.repair_hint}")
        state = self.saved_index.state()
        measured = self.saved_index.measure(sample)
        image, text = measured["image"], measured["text"]
        return IndexInfo(images=len(self.store), bytes=self.store.size_bytes(), dtype=self.store.dtype.name,
                         model=self.model.spec, segments=len(self.store.segments), dead_rows=self.store.dead_rows(),
                         factory=state.get("factory", "Flat"), search_parameter=state.get("param"),
                         recall_at_10=image.value, recall_sample=image.queries, text_recall_at_10=text.value,
                         text_sample=text.queries, tuning=describe_tuning(state))

    def repair(self, batch_size: int | None = None, progress: bool | None = None,
               workers: int | None = None) -> RepairReport:
        """Set damaged segments aside, embed their images again from their files, rebuild a damaged index."""
        report = RepairReport()
        damaged = self.store.verify()
        report.damaged = [f"{segment.name} ({problem})" for segment, problem in damaged]
        lost = self.store.set_aside([segment for segment, _ in damaged]) if damaged else []
        readable = [k for k in lost if os.path.isfile(k)]
        report.unrecoverable = [k for k in lost if not os.path.isfile(k)]
        for result in self._embed(readable, file_stamp, 1024, batch_size=batch_size, progress=progress,
                                  workers=workers):
            report.unrecoverable += [failure.source for failure in result.failures]
            report.reembedded += len(result.sources)
        report.index_rebuilt = self.saved_index.problem() is not None
        self.saved_index.save()  # a damaged one is built afresh
        if self.metadata.problem() is not None:
            self.metadata.rebuild()
        return report


def _files_under(roots: list[str]) -> tuple[list[str], dict[str, TarMember]]:
    """The image files under `roots` (a root that is a file: itself, while it exists; a webdataset .tar: its
    image members, `SHARD.tar/MEMBER`), each once, and the .tar members among them."""
    members = {name: member for root in roots if is_tar(root) for name, member in tar_members(Path(root))}
    found = [str(f) for f in expand_sources([r for r in roots if not is_tar(r)])]  # paths: roots are no PIL images
    return list(dict.fromkeys([*(f for f in found if f not in roots or os.path.exists(f)), *members])), members


def format_hits(hits: Sequence[tuple[str, float]], fmt: str = "table") -> str:
    """Search results (`ImageIndex.search`) as a table, JSON (a list of {path, score}) or CSV (rank, path,
    score): what `clipzsl search` prints."""
    if fmt == "json":
        return json.dumps([{"path": path, "score": score} for path, score in hits], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["rank", "path", "score"])
        writer.writerows([rank, path, f"{score:.6f}"] for rank, (path, score) in enumerate(hits, 1))
        return out.getvalue()
    width = max([len("image")] + [len(path) for path, _ in hits])
    return "".join([f"{'image':<{width}}  similarity\n"] + [f"{path:<{width}}  {s:.4f}\n" for path, s in hits])


def model_spec_of(directory: str | os.PathLike) -> str | None:
    """The model spec an existing index was built with (its meta.json), or None when it noted none."""
    return EmbeddingStore.read_meta(directory).get("spec") or None


def _is_array(query: Any) -> bool:
    """Whether a query is an embedding (a numpy array or a torch tensor) rather than a text or a path."""
    return isinstance(query, np.ndarray) or is_torch(query)
