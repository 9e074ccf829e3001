"""One pipeline for `embed` and `classify`, on either engine: reader -> mapper -> writer.

- The reader names the images: `shards.image_sources` (folders, files, .txt lists, webdataset .tar
  members) for embed, the files and folders `classify` takes for classify; each image once.
- The mapper embeds a batch of them (and, with a classifier, scores its top k); an unreadable image
  is a row with its `ImageLoadError`, never a failed run. It runs on an executor: `local` (this
  process: the threaded decoding of `images.embed_images`) or `ray` (Ray Data: decoding tasks and
  model actors of `clipzsl.distributed`; Ray stays an optional import).
- The writer consumes the batches in order: `shards.ShardWriter` (clip-retrieval shards with a run
  manifest) or `predictions.PredictionWriter` (table, csv, jsonl, json, parquet with its settings).

So both engines resume a run the same way (the manifest, or the rows already in a csv/jsonl file),
write the same formats, report unreadable images the same way and show the same progress bar.
"""
from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import numpy as np
from tqdm.auto import tqdm

from . import distributed
from .arrays import as_numpy
from .backends import DEFAULT_MODEL, Backend, load_model
from .classifier import ZeroShotClassifier
from .errors import InputError
from .images import (EmbeddedImages, ImageLoadError, check_output, each_image_once, embed_images, expand_sources,
                     image_key, source_name)
from .predictions import (ClassifySettings, Explained, Peak, Predictions, PredictionWriter, Row, check_resumable,
                          check_settings, classified_images, saved_settings)
from .prompts import DEFAULT_TEMPLATES, LabelsArg, TemplatesArg, load_prompts
from .shards import ShardCaptions, ShardReport, ShardWriter, image_sources, resume_state, run_identity
from .tars import ImageSourceItem, load_sources

log = logging.getLogger(__name__)

#: images embedded at once by the local engine, in batches: a writer gets (and flushes) a chunk at a
#: time, so a killed run loses at most one chunk and memory is bounded
CHUNK_BATCHES = 8


@dataclass(frozen=True)
class Engine:
    """Where the mapper runs: `local` (this process; `workers` decoding threads) or `ray` (Ray Data, on the
    cluster at `address` or a local runtime; `actors` model actors of `gpus_per_actor` GPUs each).
    `batch_size`: images per forward pass (default: the model's)."""

    kind: Literal["local", "ray"] = "local"
    batch_size: int | None = None
    workers: int | None = None
    address: str | None = None
    actors: int = 1
    gpus_per_actor: float = 0

    def __post_init__(self) -> None:
        if self.kind not in ("local", "ray"):
            raise InputError(f"engine {self.kind!r}: choose local or ray")
        if self.kind == "ray":
            distributed.require_ray()  # before any model loads: a missing Ray costs nothing


@dataclass
class Batch:
    """Rows of the pipeline, in input order: every image, read (`errors[i]` None) or not."""

    names: list[str]
    errors: list[ImageLoadError | None]
    vectors: np.ndarray  # [rows read, D], the embeddings of the rows read, in order
    predictions: list[Predictions] | None = None  # of the rows read, in order (classify)
    peaks: list[list[Peak]] | None = None  # of each prediction, of the rows read (classify --explain)

    def read(self) -> list[str]:
        """The names of the rows read."""
        return [name for name, error in zip(self.names, self.errors) if error is None]

    def failures(self) -> list[ImageLoadError]:
        return [error for error in self.errors if error is not None]

    def rows(self) -> list[Row]:
        """(image, its predictions or why it could not be read), for a `PredictionWriter`."""
        scored: Iterator[Predictions | Explained] = iter(
            self.predictions or [] if self.peaks is None else
            [Explained(preds, peaks) for preds, peaks in zip(self.predictions or [], self.peaks)])
        return [(name, error if error is not None else next(scored)) for name, error in zip(self.names, self.errors)]


@dataclass
class Mapper:
    """Embeds images with `model`, and with a `classifier` scores each image's `top_k` labels (with `zoom`,
    a heat-map method's name, through the attention-guided zoom by its maps: `zoomed_predict`) and with
    `explain`, a heat-map method's name, finds each label's peak (a heat map per image; one map serves both
    when the methods are the same)."""

    model: Backend
    classifier: ZeroShotClassifier | None = None
    top_k: int = 5
    cache: bool | str = True  # where a Ray actor's model keeps its caches
    explain: str | None = None
    zoom: str | None = None

    def local(self, items: Sequence[tuple[str, ImageSourceItem]], engine: Engine) -> Batch:
        """One chunk, in this process."""
        loaded = load_sources(items)
        todo = [(name, s) for (name, _), s in zip(items, loaded) if not isinstance(s, ImageLoadError)]
        embed: Callable = self.classifier.embed if self.classifier is not None else (
            lambda images, **kw: embed_images(self.model, images, **kw))
        embedded = embed([s for _, s in todo], batch_size=engine.batch_size, workers=engine.workers,
                         skip_errors=True, progress=False)
        name_of = {source_name(s, i): name for i, (name, s) in enumerate(todo)}  # "<image i>" for decoded ones
        why = {name_of.get(f.source, f.source): f.reason for f in embedded.failures}
        why.update((name, s.reason) for (name, _), s in zip(items, loaded) if isinstance(s, ImageLoadError))
        errors = [ImageLoadError(name, why[name]) if name in why else None for name, _ in items]
        batch = Batch([name for name, _ in items], errors, as_numpy(embedded.embeddings))
        if self.classifier is not None:
            source = dict(todo)
            self.score(batch, embedded, [source[name] for name in batch.read()])
        return batch

    def score(self, batch: Batch, embedded: EmbeddedImages, images: list) -> None:
        """Fill in the predictions of the rows read (`images`, in order), and their peaks with `explain`."""
        assert self.classifier is not None
        drawn = {method: self.classifier.heatmaps(images, method) if images else []
                 for method in {self.explain, self.zoom} - {None}}
        if self.zoom is not None:
            batch.predictions = self.classifier.zoomed_predict(images, self.top_k, drawn[self.zoom],
                                                               embedded) if images else []
        else:
            batch.predictions = self.classifier.predict(embedded, self.top_k) if len(embedded) else []
        if self.explain is not None:
            from .maps import peak_box

            column = {label: i for i, label in enumerate(self.classifier.labels)}
            batch.peaks = [[Peak(*peak_box(heat_map, column[label])) for label, _ in preds]
                           for heat_map, preds in zip(drawn[self.explain], batch.predictions)]

    def ray(self, items: Sequence[tuple[str, ImageSourceItem]], engine: Engine) -> Iterator[Batch]:
        """Every image, on Ray Data, as the cluster delivers them."""
        batch_size = engine.batch_size or self.model.batch_size
        with distributed.ray_runtime(engine.address):
            ds = distributed.sources_dataset(items)
            if self.classifier is not None:
                ds = distributed.classifier_dataset(ds, self.classifier, self.top_k, batch_size, engine.actors,
                                                    engine.gpus_per_actor, self.cache)
            else:
                ds = distributed.embed_dataset(ds, self.model, batch_size, engine.actors, engine.gpus_per_actor,
                                               self.cache)
            for rows in ds.iter_batches(batch_format="numpy", batch_size=None):
                yield _ray_batch(rows)


def _ray_batch(rows: dict[str, np.ndarray]) -> Batch:
    """A batch of `distributed.embed_dataset` or `classify_dataset` rows."""
    names = [str(p) for p in rows["path"]]
    errors = [ImageLoadError(name, str(e)) if e else None for name, e in zip(names, rows["error"])]
    read = np.array([e is None for e in errors], dtype=bool)
    if "embedding" in rows:
        return Batch(names, errors, rows["embedding"][read])
    predictions = [[(str(label), float(p)) for label, p in zip(labels, probs)]
                   for labels, probs, ok in zip(rows["labels"], rows["probabilities"], read) if ok]
    return Batch(names, errors, np.empty((int(read.sum()), 0), np.float32), predictions)


def run(items: Sequence[tuple[str, ImageSourceItem]], mapper: Mapper, engine: Engine) -> Iterator[Batch]:
    """The mapper's batches over `items`, on `engine`, in order, with a progress bar."""
    if engine.kind == "ray":
        batches = mapper.ray(items, engine)
    else:
        chunk = (engine.batch_size or mapper.model.batch_size) * CHUNK_BATCHES
        batches = (mapper.local(items[start : start + chunk], engine) for start in range(0, len(items), chunk))
    with tqdm(total=len(items), unit="img", desc="images", disable=None if len(items) > 64 else True) as bar:
        for batch in batches:
            bar.update(len(batch.names))
            yield batch


def embed_to_shards(sources: Sequence[str | os.PathLike], out: str | os.PathLike, model: Backend, *,
                    shard_size: int = 100_000, resume: bool = False, engine: Engine = Engine(),
                    on_shard: Callable[[ShardReport], None] | None = None,
                    captions: ShardCaptions | None = None) -> ShardReport:
    """Embed every image the inputs name (`shards.image_sources`) into clip-retrieval shards of
    `shard_size` rows under `out`, on `engine`; unreadable images are skipped and reported. Memory holds
    one shard's vectors, never all. `out` must be new or empty (or an empty folder clipzsl made); with
    `resume`, it may hold this same run (model, images, shard size) interrupted, which is continued
    from its manifest: a rerun writes no image twice and ends with the same rows as an uninterrupted run.
    `on_shard` sees the report after each shard written. With `captions`, every image must have one, and
    each shard also gets its text embeddings and a caption column (`shards.ShardCaptions`)."""
    check_output(out, [str(s) for s in sources])
    items = list(image_sources(sources))
    if engine.kind == "ray" and not items:
        raise InputError(f"no images in {', '.join(map(str, sources))}; check the paths")
    names = [name for name, _ in items]
    if captions is not None:
        captions.texts(names)  # an image without a caption: refused before anything is written
    state = resume_state(out, run_identity(model, names, shard_size, captions), resume)
    seen = state.seen()
    todo = [item for item in items if item[0] not in seen]
    if state.complete or (seen and not todo):
        return replace(state.report(), complete_before=True)
    if seen:
        log.info("%s: resuming: %d of %d images already done", out, len(seen), len(items))
    writer = ShardWriter(out, state, shard_size, on_shard, captions)
    for batch in run(todo, Mapper(model), engine):
        writer.add(batch.read(), batch.vectors, batch.failures())
    return writer.close()


@dataclass(frozen=True)
class Classification:
    """What `classify_to_file` computes: each image's `top_k` of `labels` (prompted by `templates`) by
    `model` (a spec, loaded with `device` and `precision` only when there is work, or a Backend),
    through `adapter` (a saved adapter's directory) when given. `cache`: as `ZeroShotClassifier`'s.
    `explain`: also give each label's peak box and score (`predictions.Peak`) from the image's heat map by
    `method` (`clipzsl.maps`; None: the adapter's attention with a cross-attention adapter, else the model's
    default; a Tip adapter has no attention), one more forward pass per image (local engine only).
    `zoom`: score each image through the attention-guided zoom (`ZeroShotClassifier.zoomed_predict`, by the
    default map: the adapter's attention with a cross-attention adapter, else the model's): a heat map and its
    crops (one per top label, at most 5) scored per image (local engine only)."""

    labels: LabelsArg
    model: Backend | str = DEFAULT_MODEL
    templates: TemplatesArg = DEFAULT_TEMPLATES
    top_k: int = 5
    cache: bool | str = True
    adapter: str | None = None
    device: str = "auto"
    precision: str = "auto"
    explain: bool = False
    method: str | None = None
    zoom: bool = False

    @property
    def model_spec(self) -> str:
        return self.model.spec if isinstance(self.model, Backend) else self.model

    def settings(self, fmt: str) -> ClassifySettings:
        """The settings the rows depend on, the model's weights not yet known."""
        with warnings.catch_warnings():  # read again, with its warnings, by the classifier (if it has work)
            warnings.simplefilter("ignore")
            entries, templates = load_prompts(self.labels, self.templates)
        return ClassifySettings.of(self.model_spec, entries, templates, self.top_k, fmt,
                                   (self.method or "") if self.explain else None, self.zoom)

    def map_method(self, model: Backend) -> str | None:
        """The name of --explain's heat-map method on `model` (None without --explain); an InputError when
        it is unknown or does not apply (`maps.method_named`)."""
        if not self.explain:
            return None
        from .maps import method_named
        from .tip_adapter import draws_attention

        if draws_attention(self.adapter) and self.method in (None, "adapter"):
            return "adapter"
        if self.adapter is not None and self.method == "adapter":
            raise InputError(f"{self.adapter} is a Tip adapter, which has no attention to draw; pick another --method "
                             "(the default is the model's)")
        return method_named(model, self.method)[0]

    def zoom_method(self, model: Backend) -> str | None:
        """The heat-map method --zoom crops by on `model` (None without --zoom): --explain's default."""
        return replace(self, explain=True, method=None).map_method(model) if self.zoom else None

    def load_model(self) -> Backend:
        if isinstance(self.model, Backend):
            return self.model
        return load_model(self.model, self.device, self.precision, cache=self.cache)

    def classifier(self, model: Backend) -> ZeroShotClassifier:
        return ZeroShotClassifier(model, labels=self.labels, templates=self.templates, cache=self.cache,
                                  adapter=self.adapter)


@dataclass
class ClassifyReport:
    """What `classify_to_file` did: of `images`, `already` were in the output before, `written` rows
    were added, and `failures` could not be read."""

    output: str | None
    images: int = 0
    already: int = 0
    written: int = 0
    failures: list[ImageLoadError] = field(default_factory=list)


def classify_sources(sources: Sequence[str | os.PathLike]) -> list[str]:
    """The image files `classify` reads from files and folders (walked recursively), each image once."""
    return [str(s) for s in each_image_once(expand_sources([str(s) for s in sources]), str)]


def _check_request(output: str | None, fmt: str, resume: bool, job: Classification, engine: Engine) -> None:
    """Refuse, before any model loads, what cannot be written or run."""
    check_resumable(output, fmt, resume)
    if engine.kind == "ray" and job.adapter is not None:
        raise InputError("--adapter is not supported with --engine ray; classify with the default engine")
    if job.method is not None and not job.explain:
        raise InputError(f"--method {job.method} chooses the heat maps of --explain; add --explain")
    for flag, asked in (("--explain", job.explain), ("--zoom", job.zoom)):
        if engine.kind == "ray" and asked:
            raise InputError(f"{flag} is not supported with --engine ray (the model actors give no heat maps); "
                             "classify with the default engine")


def _resume_point(output: str | None, saved: ClassifySettings | None, wanted: ClassifySettings,
                  top_k: int) -> set[str]:
    """The images (`image_key`) already in the output written with `saved` settings; none without them.
    The settings are checked before the output is read (and a torn last line cut off)."""
    if saved is None or not output:
        return set()
    check_settings(output, saved, wanted, ("labels", "templates", "top_k", "format", "explain", "zoom"))
    return {image_key(name, saved.base) for name in classified_images(Path(output), wanted.format, top_k)}


def classify_to_file(sources: Sequence[str | os.PathLike], output: str | None, job: Classification, *,
                     fmt: str = "table", resume: bool = False, engine: Engine = Engine()) -> ClassifyReport:
    """Classify every image of `sources` (files, folders) into `output` (None: stdout) in `fmt` (any of
    `predictions.PREDICTION_FORMATS`), rows written as they are computed, on `engine`. With `resume`
    (csv or jsonl), the images already in `output` are skipped and the rest appended, provided the file
    was written with the same settings (`predictions.ClassifySettings`, kept next to it, --explain and its
    method included); the model is not even loaded when nothing is left to do under the same spec."""
    _check_request(output, fmt, resume, job, engine)
    names = classify_sources(sources)
    report = ClassifyReport(output, len(names))
    if not names:
        return report
    wanted = job.settings(fmt)
    saved = saved_settings(output) if resume and output else None
    done = _resume_point(output, saved, wanted, job.top_k)
    todo = [name for name in names if image_key(name) not in done]
    report.already = len(names) - len(todo)
    if todo or (saved is not None and saved.model != job.model_spec):  # same spec, nothing to add: not loaded
        model = job.load_model()
        wanted = replace(wanted, fingerprint=model.fingerprint, explain=job.map_method(model))
        if saved is not None:
            check_settings(str(output), saved, wanted, ("fingerprint", "explain"))
    if not todo:
        log.info("all %d images are already in %s; nothing to do", len(names), output)
        return report
    if done:
        log.info("resuming: %d of %d images already in %s, classifying the remaining %d", report.already,
                 len(names), output, len(todo))
    clf = job.classifier(model)
    width = max([len("image")] + [len(s) for s in todo])
    with PredictionWriter(output, fmt, wanted, append=resume, width=width) as writer:
        mapper = Mapper(clf.model, clf, job.top_k, job.cache, wanted.explain, job.zoom_method(clf.model))
        for batch in run([(name, name) for name in todo], mapper, engine):
            writer.add(batch.rows())
            report.written += len(batch.names) - len(batch.failures())
            report.failures += batch.failures()
    return report
