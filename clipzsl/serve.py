"""The HTTP service behind `clipzsl serve`: search an image index, classify uploads and show where a
label is in them (/explain: a heat map of `clipzsl.maps`, by the model's default method or one asked for).

One process keeps the model loaded, keeps recently used label sets' classifiers in an LRU
(`Limits.classifiers` of them), and batches concurrent /classify and /search requests: uploads
are decoded and resized as they arrive (off the event loop), requests wait in a queue, a
batcher task takes whatever arrived within `Limits.batch_window_s` (at most `max_batch`), and
one worker thread runs the model on all of them (image forward passes of at most the model's
batch size), one head per label set and one index search per collection. Every model call goes
through that one thread. A new label set's text is encoded by a builder thread that hands the
model's thread one text-tower pass at a time, so batches run between the passes: a label set of
1000 labels x 100 templates delays a /search by one short pass, not by the whole encoding.

The on-disk label cache holds only the label sets the server names (its --labels sets and the
shipped ones, with its templates or a shipped template set), so a restart re-encodes none of
them; a set sent inline (a comma list, or templates one a line) is encoded in memory and kept
only in the LRU, so no client can grow the cache on disk.

Safety: a path from the client is never opened. Images are served by index id only, and only
when the indexed file still resolves inside the folder it was indexed from; labels and templates
name shipped or preloaded sets, or are given inline. Request bodies are capped (413), and so are
labels and templates per request (422); an upload is decoded only within a pixel budget (422
above it, read from its header; a JPEG decodes reduced to what the model needs), undecodable
uploads get 422 with the reason, unknown label sets and indexes 404. Ids are given once per
image while the service runs, whatever another process does to the index meanwhile. /docs is
a page of this package that reads /openapi.json: nothing is loaded from another host.
"""

import asyncio
import io
import logging
import os
import warnings
import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Callable, Iterator, Literal, Sequence, cast

import numpy as np
import uvicorn
from fastapi import FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, Response
from PIL import Image
from pydantic import BaseModel, Field, ValidationError
from starlette.datastructures import UploadFile as Upload
from starlette.requests import ClientDisconnect

from .arrays import as_numpy
from .backends import Backend, load_model
from .classifier import ZeroShotClassifier, label_embeddings
from .errors import ClipzslError, InputError
from .image_index import ImageIndex, is_under, model_spec_of
from .images import MAX_PIXELS, EmbeddedImages, ImageLoadError, TooManyPixels, decode_image, encode_pixels, load_image
from .where import FilterError
from .prompts import (DEFAULT_TEMPLATES, LABEL_SUFFIXES, LABELS_DIR, TEMPLATES_DIR, ClassEntry, PromptFileError,
                      available, content_lines, load_labels, load_templates, normalise_text, parse_label_list,
                      query_text)

if TYPE_CHECKING:
    from .maps import HeatMap

MB = 1 << 20
#: the hosts that only this machine reaches (any other is warned about: `run_service`)
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how requests are batched."""

    max_upload_bytes: int = 20 * MB  # a larger request body gets 413
    max_labels: int = 1000  # more labels in one request get 422
    max_templates: int = 100  # more templates in one request get 422 (the shipped sets have at most 80)
    max_pixels: int = MAX_PIXELS  # an upload with more pixels (after a JPEG's reduction on load) gets 422
    max_top_k: int = 100
    max_query_chars: int = 1000
    thumbnail_px: int = 256  # largest side of a thumbnail (and the most a client may ask for)
    batch_window_s: float = 0.005  # how long the batcher waits for more requests after the first
    max_batch: int = 64  # requests in one batch (1: one at a time)
    classifiers: int = 16  # label sets kept in memory


class SearchQuery(BaseModel):
    text: str = Field(min_length=1, description="what to look for")
    top_k: int = Field(10, ge=1)
    index: str | None = Field(None, description="index name (default: the first one loaded)")
    where: str | None = Field(None, description="only images whose metadata match, e.g. \"folder = 'cats' and "
                                                "width > 512\" (clipzsl.where); a bad filter is a 400 saying why")


class Hit(BaseModel):
    id: int
    path: str
    score: float


class SearchResults(BaseModel):
    results: list[Hit]


class Prediction(BaseModel):
    label: str
    probability: float


class Predictions(BaseModel):
    predictions: list[Prediction]


class HeatMapData(BaseModel):
    """/explain's `format=json` answer: one label's heat map as data, for a client to draw."""

    label: str
    probability: float
    method: str = Field(description="the heat-map method that drew it")
    width: int = Field(description="the image's width in pixels")
    height: int = Field(description="the image's height in pixels")
    box: list[int] = Field(description="left, top, right, bottom: the part of the image the grid covers")
    grid: list[list[float]] = Field(description="rows of the map over `box`, higher where the label is "
                                                "(on the method's own scale)")
    peak_box: list[int] = Field(description="left, top, right, bottom of the map's peak region (maps.peak_box)")
    peak_score: float = Field(description="the map's value at its peak")


class ServiceError(ClipzslError):
    """A request the service refuses: HTTP `status` with a one-line reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


class Collection:
    """An index with stable integer ids and the folders its files must stay in.

    Ids are given in the store's key order when the service starts, and to keys another process
    adds later as they are first seen; an id is never given to another image while the service
    runs (a removed image keeps its id, and the file is 404 once it is gone)."""

    def __init__(self, name: str, index: ImageIndex):
        self.name = name
        self.index = index
        self.keys: list[str] = []  # id -> path, only ever appended to
        self.ids: dict[str, int] = {}
        self.refresh()

    def refresh(self) -> None:
        """Give ids to the keys added since (another process may have updated the index)."""
        present = self.index.paths()
        for key in present:
            if key not in self.ids:
                self.ids[key] = len(self.keys)
                self.keys.append(key)
        self.size = len(present)
        self.roots = self.index.roots

    def id_of(self, path: str) -> int:
        if path not in self.ids:
            self.refresh()
        return self.ids[path]

    def file_of(self, image_id: int) -> str:
        """The real path of indexed image `image_id`, refused when it now resolves out of the folder it
        was indexed from (an index from before roots were noted: out of its own folder)."""
        if not 0 <= image_id < len(self.keys):
            raise ServiceError(404, f"no image {image_id} in index {self.name!r} (ids 0..{len(self.keys) - 1})")
        key = self.keys[image_id]
        real = os.path.realpath(key)
        # the innermost folder it was indexed from: a file of /data/a given as /data/a is held to it
        root = max((r for r in self.roots if is_under(key, r)), key=len, default=os.path.dirname(key))
        if not is_under(real, root):
            raise ServiceError(404, f"image {image_id} of index {self.name!r} links out of the folder it was indexed "
                                    f"from ({root}); it is not served")
        return real


@dataclass
class _Job:
    future: asyncio.Future
    top_k: int
    target: ZeroShotClassifier | Collection  # classify the image with it, or search it for the image or text
    pixels: Any = None  # an image as the model takes it (`Backend.pixels_uint8`)
    text: str | None = None
    where: str | None = None  # a search's metadata filter: searches are batched per collection and filter


@dataclass
class _Encoded:
    """A batch's images and texts through the model's towers, by the jobs' numbers in the batch."""

    images: EmbeddedImages | None
    image_row: dict[int, int]
    texts: np.ndarray
    text_row: dict[int, int]

    def images_of(self, members: list[int]) -> EmbeddedImages:
        """The embedded images of these jobs (each of which sent one)."""
        assert self.images is not None, "a classify job always sends an image"
        return self.images.subset([self.image_row[i] for i in members])

    def queries(self, members: list[int]) -> np.ndarray:
        """A query embedding [len(members), D] per job: its image's, else its text's."""
        images = self.images.embeddings if self.images is not None else None
        return np.stack([as_numpy(images[self.image_row[i]]) if images is not None and i in self.image_row
                         else self.texts[self.text_row[i]] for i in members])


class Batcher:
    """Runs queued classify/search jobs in one worker thread, a batch at a time."""

    def __init__(self, model: Backend, limits: Limits, adapter_loaded: bool):
        self.model = model
        self.limits = limits
        self.tokens = adapter_loaded  # an adapter scores the spatial tokens
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clipzsl-model")
        weakref.finalize(self, self.worker.shutdown, wait=False, cancel_futures=True)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()  # a new one for each start (its event loop)
        self.task: asyncio.Task | None = None
        self.batches: list[int] = []  # sizes of the batches run (the health endpoint reports them)

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._loop())

    async def stop(self, last: Callable[[], object] | None = None) -> None:
        """Stop taking batches and run `last()` in the model's thread (after the batch it may be running).
        The thread itself stays for the next start (the index tables it opens work only in that thread)
        and ends with the batcher."""
        if self.task is not None:
            self.task.cancel()
        if last is not None:
            await self.call(last)

    async def call(self, function, *args):
        """`function(*args)` in the model's thread (the only thread that runs the model)."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def submit(self, **job: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(future=future, **job))
        return await future

    async def _loop(self) -> None:
        while True:
            await self._answer(await self._collect())  # a batch's jobs live only in these two calls

    async def _collect(self) -> list[_Job]:
        """The first waiting job and whatever joins it within the window, at most `max_batch`."""
        loop = asyncio.get_running_loop()
        jobs = [await self.queue.get()]
        deadline = loop.time() + self.limits.batch_window_s
        while len(jobs) < self.limits.max_batch:
            if not self.queue.empty():
                jobs.append(self.queue.get_nowait())
                continue
            wait = deadline - loop.time()
            if wait <= 0:
                break
            try:
                jobs.append(await asyncio.wait_for(self.queue.get(), wait))
            except asyncio.TimeoutError:
                break
        return [job for job in jobs if not job.future.done()]  # the client went away

    async def _answer(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        self.batches.append(len(jobs))
        del self.batches[:-1000]
        try:
            results = await self.call(self._run, jobs)
        except Exception as err:  # a failure of the batch is every job's failure, never the loop's end
            results = [err] * len(jobs)
        for job, result in zip(jobs, results):
            if job.future.done():
                continue
            if isinstance(result, Exception):
                job.future.set_exception(result)
            else:
                job.future.set_result(result)

    def _run(self, jobs: list[_Job]) -> list[Any]:
        """The image tower over every job's image (forward passes of at most the model's batch size),
        the text tower once over every text query, then one head per label set and one index
        search per collection, each over all of its jobs."""
        encoded = self._encode(jobs)
        groups: dict[tuple[int, str | None], list[int]] = {}  # jobs by label set, or by collection and filter
        for i, job in enumerate(jobs):
            groups.setdefault((id(job.target), job.where), []).append(i)
        results: list[Any] = [None] * len(jobs)
        for members in groups.values():
            first = jobs[members[0]]
            try:
                found = self._answer_group(first.target, encoded, members, max(jobs[i].top_k for i in members),
                                           first.where)
            except FilterError as err:  # that filter's jobs are refused, the others answered
                found = [ServiceError(400, str(err))] * len(members)
            for i, best in zip(members, found):
                results[i] = best if isinstance(best, Exception) else best[: jobs[i].top_k]
        return results

    def _encode(self, jobs: list[_Job]) -> _Encoded:
        """Every job's image through the image tower (passes of at most the model's batch size), every
        text query through the text tower in one pass."""
        pixels = [job.pixels for job in jobs if job.pixels is not None]
        texts = [job.text for job in jobs if job.text is not None]
        size = self.model.batch_size
        images = EmbeddedImages.cat([encode_pixels(self.model, pixels[first:first + size], self.tokens)
                                     for first in range(0, len(pixels), size)]) if pixels else None
        vectors = as_numpy(self.model.encode_texts(texts)) if texts else np.empty((0, self.model.embed_dim))
        return _Encoded(images, _rows([job.pixels is not None for job in jobs]), vectors,
                        _rows([job.text is not None for job in jobs]))

    @staticmethod
    def _answer_group(target: ZeroShotClassifier | Collection, encoded: _Encoded, members: list[int],
                      top_k: int, where: str | None = None) -> list[Any]:
        """The `top_k` answers of each of `members`, all for one label set or one collection (and filter)."""
        if isinstance(target, ZeroShotClassifier):
            return target.predict(encoded.images_of(members), top_k=top_k)
        return Batcher._search(target, encoded.queries(members), top_k, where)

    @staticmethod
    def _search(collection: Collection, queries: np.ndarray, top_k: int,
                where: str | None = None) -> list[list[tuple[int, str, float]]]:
        """Per query, its `top_k` hits as (id, path, score): one index search for the whole batch (a
        shorter top_k is the head of a longer one's hits, exactly so for exact and IVF indexes), inside
        the metadata filter `where` (a FilterError when it is bad)."""
        found = collection.index.search_many(queries, top_k, where)
        return [[(collection.id_of(path), path, score) for path, score in hits] for hits in found]


def map_methods(model: Backend) -> list[str]:
    """The heat-map methods `model` has (`maps.methods_for`): none for an onnx: model, whose towers are not
    torch modules (asked without importing torch and the maps)."""
    if not model.needs_torch:
        return []
    from .maps import methods_for

    return methods_for(model)


def _draws_attention(adapter: Any) -> bool:
    """`tip_adapter.draws_attention`, imported only when there is an adapter (adapters are torch modules)."""
    if adapter is None:
        return False
    from .tip_adapter import draws_attention

    return draws_attention(adapter)


def _rows(chosen: list[bool]) -> dict[int, int]:
    """Job number -> row among the chosen jobs' rows (in their order)."""
    return {job: row for row, job in enumerate(i for i, yes in enumerate(chosen) if yes)}


class _TextTower:
    """The model as a label set's encoding in a builder thread sees it: each text-tower pass is a job
    of its own in the model's thread, so the batches queued meanwhile run between the passes. A pass
    takes at most `text_batch_size` prompts, which bounds how long a batch waits for it: with 32, a
    /search waited at most 0.27 s (p50 0.14 s) while the packaged model on two CPU cores encoded
    4000 prompts for 25 s, where before it waited for all of them (60 s)."""

    text_batch_size = 32

    def __init__(self, model: Backend, worker: ThreadPoolExecutor):
        self._model = model
        self._worker = worker
        self.text_batch_size = min(model.text_batch_size, self.text_batch_size)

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def encode_texts(self, texts: Sequence[str]) -> Any:
        return self._worker.submit(self._model.encode_texts, texts).result()


class Service:
    """What the endpoints share: the model, the indexes, the label sets, the classifier LRU, the batcher."""

    def __init__(self, model: Backend, indexes: dict[str, str | os.PathLike], label_sets: dict[str, list[ClassEntry]],
                 templates: Sequence[str], adapter, cache, limits: Limits):
        self.model = model
        self.attends = _draws_attention(adapter)  # a cross-attention adapter: it needs tokens and draws maps
        self.batcher = Batcher(model, limits, self.attends)
        # an index's SQLite table may only be used by the thread that opened it: the model's thread
        self.collections = self.batcher.worker.submit(
            lambda: {name: Collection(name, ImageIndex(path, model)) for name, path in indexes.items()}).result()
        self.label_sets = label_sets
        self.shipped_labels = available(LABELS_DIR, LABEL_SUFFIXES)
        self.shipped_templates = available(TEMPLATES_DIR, (".txt",))
        self.templates = list(templates)
        self.adapter = adapter
        self.cache = cache
        self.limits = limits
        self.classifiers: OrderedDict[tuple, ZeroShotClassifier] = OrderedDict()
        self.building: dict[tuple, asyncio.Task] = {}  # label sets being encoded, each once however many wait
        self.builders = ThreadPoolExecutor(max_workers=4, thread_name_prefix="clipzsl-labels")
        # the side of the model's input: a JPEG upload is decoded reduced towards twice it
        self.model_side = max(model.pixels_uint8(Image.new("RGB", (64, 64))).shape[-2:])

    # -- what a request names ---------------------------------------------------------------

    def collection(self, name: str | None) -> Collection:
        if not self.collections:
            raise ServiceError(404, "no index loaded; start the service with `clipzsl serve --index DIR`")
        if name is None:
            return next(iter(self.collections.values()))
        if name not in self.collections:
            raise ServiceError(404, f"unknown index {name!r}; loaded: {', '.join(self.collections)}")
        return self.collections[name]

    def labels(self, spec: str) -> list[ClassEntry]:
        """A comma list of labels (`parse_label_list`, as the CLI reads it), or the name of a loaded or
        shipped label set (never a path)."""
        names, spec = parse_label_list(spec), normalise_text(spec)
        if names:
            entries = load_labels(names)
        elif spec in self.label_sets:
            entries = self.label_sets[spec]
        elif spec in self.shipped_labels:
            entries = load_labels(spec)
        else:
            known = sorted(set(self.label_sets) | set(self.shipped_labels))
            raise ServiceError(404, f"unknown label set {spec!r}; known: {', '.join(known)} "
                                    "(or give a comma list; one label is written 'cat,')")
        if len(entries) > self.limits.max_labels:
            raise ServiceError(422, f"labels: {len(entries)} labels, more than the {self.limits.max_labels} "
                                    "a request may have; send fewer, or start the service with a higher --max-labels")
        return entries

    def template_list(self, spec: str | None) -> list[str]:
        """The service's templates, a shipped template set's name, or templates one a line (read as a
        template file's lines are: `content_lines`)."""
        text = spec or ""
        name = normalise_text(text)
        if not name:
            return self.templates
        if "{" not in text and name in self.shipped_templates:
            found = load_templates(name)
        elif "{" not in text:
            raise ServiceError(404, f"unknown template set {spec!r}; shipped: {', '.join(self.shipped_templates)} "
                                    "(or give templates one a line, each with a {} for the label)")
        else:
            found = load_templates([line for _, line in content_lines(text)])
        if len(found) > self.limits.max_templates:
            raise ServiceError(422, f"templates: {len(found)} templates, more than the {self.limits.max_templates} a "
                                    "request may have; send fewer, or start the service with a higher --max-templates")
        return found

    def on_disk(self, labels: str, templates: str | None) -> bool:
        """Whether a label set's embeddings go to the on-disk label cache: only for the sets the server
        names, with its templates or a shipped set of them (see the module's docstring)."""
        name = normalise_text(labels)  # as `labels` reads it
        named_labels = name in self.label_sets or name in self.shipped_labels
        named_templates = templates is None or not templates.strip() or templates.strip() in self.shipped_templates
        return named_labels and named_templates

    async def classifier(self, labels: str, templates: str | None) -> ZeroShotClassifier:
        """The classifier of a label set, from the LRU or built once by a builder thread (`_TextTower`)."""
        try:
            entries, template_list = self.labels(labels), self.template_list(templates)
        except PromptFileError as err:
            raise ServiceError(422, str(err)) from err
        key = (tuple(entries), tuple(template_list))
        if key in self.classifiers:
            self.classifiers.move_to_end(key)
            return self.classifiers[key]
        if key not in self.building:
            task = asyncio.create_task(self._build(key, self.cache if self.on_disk(labels, templates) else False))
            task.add_done_callback(lambda done: done.cancelled() or done.exception())  # read, whoever still waits
            self.building[key] = task
        return await asyncio.shield(self.building[key])  # a client that leaves does not cancel the others' build

    async def _build(self, key: tuple, cache) -> ZeroShotClassifier:
        try:
            built = await asyncio.get_running_loop().run_in_executor(self.builders, self._classifier_of, key, cache)
        except ValueError as err:  # e.g. one label under a softmax model
            raise ServiceError(422, str(err)) from err
        finally:
            del self.building[key]
        self.classifiers[key] = built
        while len(self.classifiers) > self.limits.classifiers:
            self.classifiers.popitem(last=False)
        return built

    def _classifier_of(self, key: tuple, cache) -> ZeroShotClassifier:
        entries, templates = (list(part) for part in key)
        tower = cast(Backend, _TextTower(self.model, self.batcher.worker))  # a Backend, its text tower queued
        embeddings = label_embeddings(tower, entries, templates, cache, progress=False)
        return ZeroShotClassifier(self.model, labels=entries, templates=templates, cache=False,
                                  class_embeddings=embeddings, adapter=self.adapter)

    async def close(self) -> None:
        """Finish the batch in hand, close the indexes' tables (in the thread that opened them), end the threads."""
        self.builders.shutdown(wait=False, cancel_futures=True)
        await self.batcher.stop(self._close_indexes)

    def _close_indexes(self) -> None:
        for collection in self.collections.values():
            collection.index.close()

    def map_method(self, method: str | None) -> str | None:
        """A heat-map method a request may name (`maps.methods_for` the model, and "adapter" with a
        cross-attention adapter loaded (a Tip adapter has no attention); None: the default, the adapter's attention
        or the model's default); otherwise 422 naming the choices."""
        choices = map_methods(self.model) + (["adapter"] if self.attends else [])
        if not choices:
            raise ServiceError(422, f"no heat-map method draws maps for {self.model.spec}")
        if method and method not in choices:
            raise ServiceError(422, f"method {method[:40]!r}: pick one of {', '.join(choices)}")
        return method or None

    def check_top_k(self, top_k: int) -> int:
        if not 1 <= top_k <= self.limits.max_top_k:
            raise ServiceError(422, f"top_k must be 1..{self.limits.max_top_k}, got {top_k}")
        return top_k

    # -- uploads -------------------------------------------------------------------------------

    async def image(self, upload: Upload | str | None, field_name: str = "image") -> Image.Image:
        """An uploaded image, decoded within the pixel budget (a JPEG reduced towards the model's size), or 422."""
        return await self._decoded(upload, field_name, lambda image: image)

    async def pixels(self, upload: Upload | str | None, field_name: str = "image") -> Any:
        """An uploaded image as the model takes it, decoded and resized as `image` arrives, in a
        thread off the event loop: the model's thread then only runs forward passes."""
        return await self._decoded(upload, field_name, self.model.pixels_uint8)

    async def _decoded(self, upload: Upload | str | None, field_name: str, prepare):
        """The upload decoded in memory (never written to disk), then `prepare`d, off the event loop."""
        if not isinstance(upload, Upload):  # FastAPI's UploadFile is one too
            raise ServiceError(422, f"{field_name}: expected an image file upload (multipart/form-data)")
        data = await upload.read(self.limits.max_upload_bytes + 1)
        if len(data) > self.limits.max_upload_bytes:
            raise ServiceError(413, self.too_large())
        name = upload.filename or field_name
        try:
            return await asyncio.to_thread(
                lambda: prepare(decode_image(data, name, self.limits.max_pixels, self.model_side)))
        except ImageLoadError as err:
            hint = " (or start the service with a higher --max-megapixels)" if isinstance(err, TooManyPixels) else ""
            raise ServiceError(422, f"upload {name!r}: {err.reason}{hint}") from err

    def too_large(self) -> str:
        return (f"request body is larger than the {self.limits.max_upload_bytes / MB:g} MB upload limit; "
                "send a smaller image (or start the service with a higher --max-upload-mb)")


def _thumbnail(path: str, side: int, max_pixels: int) -> bytes:
    image = load_image(path, max_pixels, shrink_to=side)
    image.thumbnail((side, side))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=85)
    return out.getvalue()


@dataclass(frozen=True)
class _Explained:
    """One label's heat map over an uploaded image (what /explain draws or sends)."""

    image: Image.Image
    label: str
    column: int
    probability: float
    heat_map: "HeatMap"

    def png(self) -> bytes:
        from .explain import picture

        out = io.BytesIO()
        picture(self.image, self.heat_map, self.column, f"{self.label}: {self.probability:.1%}").save(out, "PNG")
        return out.getvalue()

    def data(self) -> HeatMapData:
        from .maps import peak_box

        box, score = peak_box(self.heat_map, self.column)
        return HeatMapData(label=self.label, probability=self.probability, method=self.heat_map.method,
                           width=self.image.width, height=self.image.height, box=list(self.heat_map.box),
                           grid=self.heat_map.grid[self.column].tolist(), peak_box=list(box), peak_score=score)


def _explained(classifier: ZeroShotClassifier, image: Image.Image, label: str | None, method: str | None
               ) -> _Explained:
    """`label`'s (None: the top label's) heat map by `method` (`Service.map_method`) over `image`."""
    probs = classifier.predict_proba(classifier.embed([image], progress=False))[0]
    if label is None:
        column = int(np.argmax(probs))
    elif (label := normalise_text(label)) in classifier.labels:  # as the labels were
        column = classifier.labels.index(label)
    else:
        raise ServiceError(422, f"label {label!r} is not one of the labels sent; pick one of them")
    try:
        heat_map, = classifier.heatmaps([image], method)
    except InputError as err:  # e.g. a method that needs more than this model gives
        raise ServiceError(422, str(err)) from err
    return _Explained(image, classifier.labels[column], column, float(probs[column]), heat_map)


class BodyLimit:
    """ASGI middleware: 413 for a request body over `limit` bytes, by its Content-Length or as it streams in."""

    def __init__(self, app, limit: int, message: str):
        self.app = app
        self.limit = limit
        self.message = message

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"0")
        if not length.isdigit() or int(length) > self.limit:
            status, detail = (413, self.message) if length.isdigit() else (400, "bad Content-Length header")
            return await JSONResponse({"detail": detail}, status_code=status)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise HTTPException(413, self.message)  # FastAPI passes HTTPException through body parsing
            return message

        await self.app(scope, limited, send)


def create_app(
    model: Backend,
    indexes: dict[str, str | os.PathLike] | None = None,
    label_sets: dict[str, list[ClassEntry]] | None = None,
    templates: Sequence[str] | str = DEFAULT_TEMPLATES,
    adapter=None,
    cache: bool | str | os.PathLike = True,
    limits: Limits = Limits(),
) -> FastAPI:
    """The service over explicit state: the model, named index directories (built with this model), named label
    sets the page and clients may ask for by name, the default templates, an optional adapter
    (a `CrossAttentionAdapter` or its directory: /classify scores through it, /explain draws its attention
    unless asked for another method), the label cache (as
    `ZeroShotClassifier` takes it) and the limits."""
    service = Service(model, indexes or {}, label_sets or {}, load_templates(templates), adapter, cache, limits)
    app = FastAPI(title="clipzsl", description="Search an image collection and classify images, zero-shot.",
                  lifespan=_lifespan(service), docs_url=None, redoc_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, limit=limits.max_upload_bytes, message=service.too_large())

    @app.exception_handler(ServiceError)
    async def refused(request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": err.detail}, status_code=err.status)

    @app.exception_handler(ClientDisconnect)
    async def left(request: Request, err: ClientDisconnect) -> Response:
        """A client that hung up before its request was read: one line in the log, not a traceback."""
        client = f"{request.client.host}:{request.client.port}" if request.client else "a client"
        log.warning("%s hung up before its %s %s was read; nothing was done", client, request.method,
                    request.url.path)
        return Response(status_code=400)  # nobody is there to read it

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(_static("index.html"))

    @app.get("/docs", response_class=HTMLResponse, include_in_schema=False)
    async def docs() -> HTMLResponse:
        """The API's reference, drawn from /openapi.json by the page itself: it works with no network."""
        return HTMLResponse(_static("docs.html"))

    @app.get("/health")
    async def health() -> dict:
        """The model, what is loaded, and the sizes of recent batches."""
        recent = service.batcher.batches[-100:]
        return {"status": "ok", "model": model.spec, "adapter": adapter is not None,
                "map_methods": (["adapter"] if service.attends else []) + map_methods(model),
                "indexes": {name: c.size for name, c in service.collections.items()},
                "label_sets": sorted(service.label_sets), "shipped_label_sets": service.shipped_labels,
                "limits": {"max_upload_bytes": limits.max_upload_bytes, "max_labels": limits.max_labels,
                           "max_templates": limits.max_templates, "max_pixels": limits.max_pixels,
                           "max_top_k": limits.max_top_k},
                "mean_batch": float(np.mean(recent)) if recent else None}

    search_body = {
        "requestBody": {"required": True, "content": {
            "application/json": {"schema": SearchQuery.model_json_schema()},
            "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
                "image": {"type": "string", "format": "binary"}, "top_k": {"type": "integer", "minimum": 1},
                "index": {"type": "string"}, "where": {"type": "string"}}}},
        }},
    }

    @app.post("/search", response_model=SearchResults, openapi_extra=search_body,
              responses={404: {"description": "unknown index"}, 413: {"description": "body too large"},
                         422: {"description": "bad query or image"}, 400: {"description": "bad filter (where)"}})
    async def search(request: Request) -> SearchResults:
        """The `top_k` indexed images closest to a text (JSON) or an image (multipart `image`)."""
        kind = request.headers.get("content-type", "")
        pixels: Any = None
        text: str | None = None
        if kind.startswith("multipart/form-data"):
            async with request.form(max_files=1, max_fields=5) as form:
                top_k = _form_int(form.get("top_k"), 10, "top_k")
                name = index if isinstance(index := form.get("index"), str) else None
                where = given if isinstance(given := form.get("where"), str) else None
                pixels = await service.pixels(form.get("image"))
        elif kind.startswith("application/json"):
            try:
                body = SearchQuery.model_validate_json(await request.body())
            except ValidationError as err:
                raise ServiceError(422, "search: " + "; ".join(
                    f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in err.errors())) from err
            if len(body.text) > limits.max_query_chars:
                raise ServiceError(422, f"text: {len(body.text)} characters, more than {limits.max_query_chars}")
            try:
                text = query_text(body.text)
            except PromptFileError as err:
                raise ServiceError(422, str(err)) from err
            top_k, name, where = body.top_k, body.index, body.where
        else:
            raise ServiceError(415, "send JSON {\"text\": ..., \"top_k\": 10} or a multipart form with an image")
        collection = service.collection(name)
        hits = await service.batcher.submit(top_k=service.check_top_k(top_k), target=collection, pixels=pixels,
                                            text=text, where=where)
        return SearchResults(results=[Hit(id=i, path=path, score=score) for i, path, score in hits])

    @app.post("/classify", response_model=Predictions,
              responses={404: {"description": "unknown label or template set"}, 413: {"description": "too large"},
                         422: {"description": "not an image, or bad labels"}})
    async def classify(
        image: Annotated[UploadFile, File(description="the image to classify")],
        labels: Annotated[str, Form(description="a comma list (cat,dog) or a label set's name")],
        templates: Annotated[str | None, Form(description="a template set's name, or templates one a line")] = None,
        top_k: Annotated[int, Form(ge=1)] = 5,
        zoom: Annotated[bool, Form(description="score the image again on crops around its labels' heat-map peaks "
                                               "(the attention-guided zoom: a heat map and up to 5 crops scored)")
                        ] = False,
    ) -> Predictions:
        """The image's `top_k` labels among `labels`, with their probabilities (through the zoom with `zoom`)."""
        service.check_top_k(top_k)
        if zoom:
            service.map_method(None)  # 422 for a model that draws no heat maps
        classifier = await service.classifier(labels, templates)
        if zoom:
            found = (await service.batcher.call(classifier.zoomed_predict, [await service.image(image)], top_k))[0]
        else:
            found = await service.batcher.submit(pixels=await service.pixels(image), target=classifier, top_k=top_k)
        return Predictions(predictions=[Prediction(label=label, probability=p) for label, p in found])

    @app.post("/explain", response_class=Response,
              responses={200: {"content": {"image/png": {},
                                           "application/json": {"schema": HeatMapData.model_json_schema()}},
                               "description": "the heat map: a PNG, or with format=json the map as data"},
                         404: {"description": "unknown label or template set"},
                         422: {"description": "not an image, bad labels, or a method this model has not"}})
    async def explain(
        image: Annotated[UploadFile, File(description="the image")],
        labels: Annotated[str, Form(description="a comma list (cat,dog) or a label set's name")],
        label: Annotated[str | None, Form(description="the label to show (default: the top one)")] = None,
        templates: Annotated[str | None, Form()] = None,
        method: Annotated[str | None, Form(description="heat-map method (default: the adapter's attention with "
                                                       "--adapter, else the model's default; /health lists them)")
                          ] = None,
        format: Annotated[Literal["png", "json"], Form(description="png: the picture, with its colour scale "
                                                                   "and the method's name; json: the map as data")
                          ] = "png",
    ) -> Response:
        """Where `label` is in the image: its heat map over the image (a PNG), or the map as data."""
        chosen = service.map_method(method)
        classifier = await service.classifier(labels, templates)
        decoded = await service.image(image)
        explained = await service.batcher.call(_explained, classifier, decoded, label or None, chosen)
        if format == "json":
            return JSONResponse(explained.data().model_dump())
        return Response(await asyncio.to_thread(explained.png), media_type="image/png")

    @app.get("/images/{image_id}", response_class=Response,
             responses={200: {"content": {"image/jpeg": {}}, "description": "thumbnail"},
                        404: {"description": "no such image"}})
    async def image(image_id: int, index: str | None = None,
                    size: Annotated[int, Query(ge=16, le=limits.thumbnail_px)] = limits.thumbnail_px) -> Response:
        """A JPEG thumbnail of indexed image `image_id` (ids come from /search)."""
        collection = service.collection(index)
        path = collection.file_of(image_id)
        try:
            data = await asyncio.to_thread(_thumbnail, path, size, limits.max_pixels)
        except ImageLoadError as err:
            raise ServiceError(404, f"image {image_id} of index {collection.name!r} cannot be read now "
                                    f"({err.reason})") from err
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "max-age=3600"})

    return app


def app_from_folders(
    index_dirs: Sequence[str | os.PathLike],
    label_sets: dict[str, str | list[str]] | None = None,
    model_spec: str | None = None,
    *,
    templates: Sequence[str] | str = DEFAULT_TEMPLATES,
    adapter=None,
    cache: bool | str | os.PathLike = True,
    limits: Limits = Limits(),
    **model_options: Any,
) -> FastAPI:
    """The service as `clipzsl serve` starts it, from folders and names rather than loaded objects: each
    index is named by its folder's name (two with one name are refused: an InputError), the model is
    `model_spec`, else the one the first index was built with, else the packaged one (`model_options`:
    `load_model`'s); `label_sets`: name -> what `load_labels` reads (a label file or set, or class names)."""
    names = [Path(d).resolve().name for d in index_dirs]
    if len(set(names)) != len(names):
        raise InputError(f"two --index folders share a name ({', '.join(names)}); the service tells them apart by "
                         "folder name, so rename one")
    spec = model_spec or (model_spec_of(index_dirs[0]) if index_dirs else None) or "packaged"
    model = load_model(spec, cache=cache, **model_options)
    loaded = {name: load_labels(labels) for name, labels in (label_sets or {}).items()}
    return create_app(model, dict(zip(names, index_dirs)), loaded, templates=templates, adapter=adapter,
                      cache=cache, limits=limits)


def run_service(app: FastAPI, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serve `app` until stopped (uvicorn), each warning a client can provoke logged once
    (`warnings_once`); a host other than the loopback is warned about first."""
    if host not in LOCAL_HOSTS:
        log.warning("listening on %s: anyone who can reach this machine can use the service", host)
    with warnings_once():
        uvicorn.run(app, host=host, port=port, log_level="warning")


def _static(name: str) -> str:
    return (resources.files(__package__) / "static" / name).read_text(encoding="utf-8")


@contextmanager
def warnings_once() -> Iterator[None]:
    """Show each warning once, by its place in the code and by its text: what a client can provoke on
    every request (a repeated label, an odd image) is then one line of the service's log, not one a request."""
    show, shown = warnings.showwarning, set[tuple]()

    def once(message, category, filename, lineno, file=None, line=None) -> None:
        place, text = (category, filename, lineno), (category, str(message))
        if place not in shown and text not in shown:
            shown.update((place, text))
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = once
    try:
        yield
    finally:
        warnings.showwarning = show


def _form_int(value, default: int, name: str) -> int:
    if value is None or value == "":
        return default
    if not isinstance(value, str) or not value.strip().lstrip("-").isdigit() or len(value) > 9:
        raise ServiceError(422, f"{name}: expected a whole number, got {str(value)[:40]!r}")
    return int(value)


def _lifespan(service: Service):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await service.batcher.start()
        try:
            yield
        finally:
            await service.close()

    return lifespan
