"""Batch embedding and classification on Ray Data, for more images than one machine holds.

Optional (`pip install clipzsl[ray]`): ray is imported only when a function here runs. The
pipeline has two stages: decoding + preprocessing in CPU tasks, then the model in a pool of
actors (`concurrency` of them, `num_gpus` each) that load it once. (With CPU-only actors, whose
resources equal the decode tasks', Ray Data fuses the two stages into the actors; with GPU
actors they stay apart.) For classification the
class embeddings are built once on the driver (through the label cache) and shared with the
actors through the object store; an actor returns only each image's top k. An unreadable
image is a row whose `error` says why, never a failed job. Ray restarts a killed actor and
retries its batches, so the output holds every image once.

This module is the Ray executor of `clipzsl.pipeline` (which writes the rows, shards or
predictions, the same way for both engines, with resume).
"""
from __future__ import annotations

import functools
import io
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .arrays import as_numpy
from .backends import DEFAULT_MODEL, Backend, load_model, resolve_device
from .classifier import ZeroShotClassifier
from .head import top_k as top_k_labels
from .head import zero_shot_head
from .images import EmbeddedImages, ImageLoadError, load_image
from .prompts import DEFAULT_TEMPLATES, LabelsArg, TemplatesArg
from .errors import ClipzslError, InputError
from .shards import image_sources
from .tars import ImageSourceItem, TarMember, member_bytes

if TYPE_CHECKING:
    import ray.data


class RayMissing(ClipzslError, ImportError):
    """`--engine ray` asked for where Ray Data is not installed."""


def require_ray() -> Any:
    """The ray module, or a `RayMissing` error that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise RayMissing(f"--engine ray needs Ray Data ({err}); install it with `pip install 'clipzsl[ray]'`") from err
    return ray


@contextmanager
def ray_runtime(address: str | None = None) -> Iterator[None]:
    """Connect to the cluster at `address` (auto, ray://HOST:PORT), or start a local runtime for
    the run when there is none (`_private_runtime`); one already connected (a notebook, a test) is
    used as it is."""
    ray = require_ray()
    if ray.is_initialized():
        yield
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    local = address is None and not os.environ.get("RAY_ADDRESS")
    runtime: AbstractContextManager[dict] = _private_runtime() if local else nullcontext({})
    with runtime as options:
        ray.init(address=address, log_to_driver=False, **options)
        try:
            yield
        finally:
            ray.shutdown()


@functools.cache
def process_token() -> str:
    """The auth token of every local runtime this process starts: Ray keeps the first token it reads for the
    life of the process, so a second runtime under a new token would refuse its own driver."""
    return secrets.token_hex(32)


@contextmanager
def _private_runtime() -> Iterator[dict]:
    """ray.init options for a local runtime that lives and dies with this process: its files in a
    temporary folder of its own (not /tmp/ray), token auth through the environment (no
    ~/.ray/auth_token written), and a watchdog (clipzsl/_ray_reaper.py) that kills every process
    of it and deletes the folder once this process ends, however it ends (Ctrl-C, SIGTERM, kill -9)."""
    folder = tempfile.mkdtemp(prefix="clipzsl-ray-", dir=os.environ.get("RAY_TMPDIR"))
    watchdog = subprocess.Popen([sys.executable, "-I", str(Path(__file__).with_name("_ray_reaper.py")), folder,
                                 str(os.getpid())], stdin=subprocess.PIPE, start_new_session=True)
    saved = {name: os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    if not any(os.environ.get(name) for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")):
        os.environ["RAY_AUTH_TOKEN"] = process_token()  # ray.init turns token auth on (RAY_AUTH_MODE)
    try:
        yield {"include_dashboard": False, "_temp_dir": folder}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        if watchdog.stdin is not None:
            watchdog.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=60)


def image_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every image file the inputs name (folders, files, .txt lists), in the order `clipzsl embed`
    reads them (`file_paths`)."""
    names = file_paths(list(image_sources(paths)))
    if not names:
        raise InputError(f"no images in {', '.join(map(str, paths))}; check the paths")
    return names


def file_paths(items: Sequence[tuple[str, ImageSourceItem]]) -> list[str]:
    """The names of `shards.image_sources` items (image files, and webdataset .tar members as `SHARD.tar/MEMBER`)."""
    return [name for name, _ in items]


def paths_dataset(paths: Sequence[str]) -> "ray.data.Dataset":
    """A dataset of `path` rows, one per image file, for `embed_dataset` / `classify_dataset`."""
    return require_ray().data.from_items([{"path": path} for path in paths])


def sources_dataset(items: Sequence[tuple[str, ImageSourceItem]]) -> "ray.data.Dataset":
    """`paths_dataset` of `shards.image_sources` items: a webdataset .tar member's row also names its shard
    (`tar`) and where its data lies in it (`offset`, `size`), which the decoding task reads (`member_bytes`)."""
    def row(name: str, source: ImageSourceItem) -> dict:
        if isinstance(source, TarMember):
            return {"path": name, "tar": str(source.tar), "offset": source.info.offset_data, "size": source.info.size}
        return {"path": name, "tar": "", "offset": 0, "size": 0}
    return require_ray().data.from_items([row(name, source) for name, source in items])


def _decoded(row_image: Any, path: str) -> Image.Image:
    """A row's image: a file path, its bytes, or an array already decoded by ray.data.read_images."""
    if row_image is None:
        return load_image(path)
    if isinstance(row_image, (bytes, bytearray)):
        try:
            with Image.open(io.BytesIO(row_image)) as image:
                image.load()
                return load_image(image)
        except (OSError, SyntaxError, ValueError) as err:
            raise ImageLoadError(path, f"corrupt or truncated image ({err})") from err
    return load_image(Image.fromarray(np.asarray(row_image)))


def _decode_batch(batch: dict[str, np.ndarray], preprocess: Callable[[Image.Image], Any]) -> dict:
    """The CPU stage: decode and preprocess; a row that fails keeps its place with zero pixels and
    its reason in `error`, so the reason reaches the output."""
    paths = [str(p) for p in batch["path"]]
    images: Any = batch.get("bytes", batch.get("image", [None] * len(paths)))
    if "tar" in batch:  # `sources_dataset`'s rows: a .tar member's data read from its shard
        images = [member_bytes(tar, offset, size) if tar else None
                  for tar, offset, size in zip(batch["tar"], batch["offset"].tolist(), batch["size"].tolist())]
    pixels: list[Any] = []
    errors: list[str] = []
    for path, image in zip(paths, images):
        try:
            pixels.append(preprocess(_decoded(image, path)))
            errors.append("")
        except ImageLoadError as err:
            pixels.append(None)
            errors.append(err.reason)
    shape = next((p.shape for p in pixels if p is not None), None)
    if shape is None:  # every row failed: any image gives the model's input shape
        shape = preprocess(Image.new("RGB", (32, 32))).shape
    stacked = np.stack([as_numpy(p) if p is not None else np.zeros(shape, np.float32) for p in pixels])
    return {"path": np.array(paths, dtype=object), "pixels": stacked, "error": np.array(errors, dtype=object)}


class _Encoder:
    """The model stage, one per actor: the model is loaded once, in the constructor."""

    def __init__(self, spec: str, cache: bool | str, num_gpus: float, classes: Any = None, top_k: int = 5):
        device = "cuda" if num_gpus and resolve_device() == "cuda" else "cpu"
        self.model = load_model(spec, device=device, cache=cache)
        self.classes = None
        if classes is not None:  # (class embeddings, label names) put once by the driver
            import ray

            self.classes = ray.get(classes) if isinstance(classes, ray.ObjectRef) else classes
        self.top_k = top_k

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        good = np.array([not e for e in batch["error"]], dtype=bool)
        embeddings = np.full((len(good), self.model.embed_dim), np.nan, dtype=np.float32)
        if good.any():
            # no tokens asked for: the embeddings alone
            embeddings[good] = as_numpy(self.model.encode_images(self.model.from_numpy(batch["pixels"][good])))
        out = {"path": batch["path"], "error": batch["error"]}
        if self.classes is None:
            return {**out, "embedding": embeddings}
        class_embeddings, labels = self.classes
        k = min(self.top_k, len(labels))
        probs = np.full((len(good), k), np.nan, dtype=np.float32)
        names = np.empty(len(good), dtype=object)
        names[:] = [[] for _ in range(len(good))]
        if good.any():
            p, ids = top_k_labels(zero_shot_head, EmbeddedImages(self.model.from_numpy(embeddings[good])),
                                  class_embeddings, self.model.logit_scale, self.model.logit_bias,
                                  self.model.probability, k)
            probs[good] = as_numpy(p)
            names[np.flatnonzero(good)] = [[labels[j] for j in row] for row in ids.tolist()]
        return {**out, "labels": names, "probabilities": probs}


def _pipeline(ds: "ray.data.Dataset", model: Backend, batch_size: int, concurrency: int, num_gpus: float,
              cache: bool | str, classes: Any = None, top_k: int = 5) -> "ray.data.Dataset":
    ray = require_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus and gpus < concurrency * num_gpus:
        raise InputError(f"{concurrency} actor(s) x {num_gpus} GPU(s) asked for, but the Ray cluster has {gpus:g} GPU(s); "
                         "lower --actors or --gpus-per-actor, or connect to a cluster with GPUs (--address)")
    # Ray's stubs type map_batches' function as one-argument; fn_kwargs gives it its second
    decoded = ds.map_batches(_decode_batch, fn_kwargs={"preprocess": model.preprocess},  # type: ignore[arg-type]
                             batch_size=batch_size, batch_format="numpy")
    return decoded.map_batches(
        _Encoder, fn_constructor_kwargs={"spec": model.spec, "cache": cache, "num_gpus": num_gpus,
                                         "classes": classes, "top_k": top_k},
        batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_gpus=num_gpus,
    )  # Ray Data's defaults for an actor pool: a dead actor is recreated and its batches retried


def _model(model: Backend | str, cache: bool | str) -> Backend:
    return model if isinstance(model, Backend) else load_model(model, cache=cache)


def embed_dataset(ds: "ray.data.Dataset", model: Backend | str = DEFAULT_MODEL, batch_size: int = 32,
                  concurrency: int = 1, num_gpus: float = 0, cache: bool | str = True) -> "ray.data.Dataset":
    """Rows `path`, `embedding` (float32 [D], L2-normalised; NaN where unreadable) and `error` ("" or
    why the image could not be read), from a dataset with a `path` column and optionally the
    image as `bytes` (read_binary_files) or a decoded `image` (read_images(include_paths=True))."""
    return _pipeline(ds, _model(model, cache), batch_size, concurrency, num_gpus, cache)


def classify_dataset(ds: "ray.data.Dataset", labels: LabelsArg, templates: TemplatesArg = DEFAULT_TEMPLATES,
                     top_k: int = 5, model: Backend | str = DEFAULT_MODEL, batch_size: int = 32,
                     concurrency: int = 1, num_gpus: float = 0, cache: bool | str = True) -> "ray.data.Dataset":
    """Rows `path`, `labels` (the top k, best first), `probabilities` ([k]) and `error`, as
    `ZeroShotClassifier.predict` gives them; the [C, D] class embeddings are built once here."""
    clf = ZeroShotClassifier(_model(model, cache), labels=labels, templates=templates, cache=cache)
    return classifier_dataset(ds, clf, top_k, batch_size, concurrency, num_gpus, cache)


def classifier_dataset(ds: "ray.data.Dataset", clf: ZeroShotClassifier, top_k: int = 5, batch_size: int = 32,
                       concurrency: int = 1, num_gpus: float = 0, cache: bool | str = True) -> "ray.data.Dataset":
    """`classify_dataset` with a classifier already built (its class embeddings are shared, not rebuilt);
    a classifier with an adapter is refused: the actors score with the zero-shot head."""
    if clf.adapter is not None:
        raise InputError("a classifier with an adapter is not supported on Ray: its actors score with the zero-shot "
                         "head; classify in this process")
    classes = require_ray().put((clf.class_embeddings, clf.labels))
    return _pipeline(ds, clf.model, batch_size, concurrency, num_gpus, cache, classes, top_k)
