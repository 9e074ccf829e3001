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

`write_embedding_shards` streams the result into clip-retrieval's shard layout (the writer of
`clipzsl.shards`), with a manifest that lets a rerun resume the same run and refuses another.
"""
from __future__ import annotations

import hashlib
import io
import os
import secrets
import subprocess
import sys
import tempfile
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from .backends import DEFAULT_MODEL, Backend, load_model
from .classifier import ZeroShotClassifier
from .head import top_k as top_k_labels
from .head import zero_shot_head
from .images import EmbeddedImages, ImageLoadError, load_image
from .prompts import DEFAULT_TEMPLATES, LabelsArg, TemplatesArg
from .records import RecordError, dumps, load, rule
from .shards import (MANIFEST, ShardReport, _write_shard, claim_shard_folder, has_shards, image_sources,
                     mark_unfinished)
from .store import atomic_write

if TYPE_CHECKING:
    import ray.data


def require_ray():
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as err:
        raise ImportError(f"--engine ray needs Ray Data ({err}); install it with `pip install 'clipzsl[ray]'`") from err
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
    with _private_runtime() if local else nullcontext({}) as options:
        ray.init(address=address, log_to_driver=False, **options)
        try:
            yield
        finally:
            ray.shutdown()


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
        os.environ["RAY_AUTH_TOKEN"] = secrets.token_hex(32)  # ray.init turns token auth on (RAY_AUTH_MODE)
    try:
        yield {"include_dashboard": False, "_temp_dir": folder}
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        watchdog.stdin.close()
        with suppress(subprocess.TimeoutExpired):
            watchdog.wait(timeout=60)


def image_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """Every image file the inputs name (folders, files, .txt lists), in the order `clipzsl embed`
    reads them. webdataset .tar shards are read with `ray.data.read_webdataset` in Python instead."""
    tars = [str(p) for p in paths if Path(p).suffix == ".tar"]
    if tars:
        raise ValueError(f"{tars[0]}: webdataset .tar input is not read by --engine ray; pass image folders or a "
                         ".txt list, or build the dataset with ray.data.read_webdataset and call embed_dataset")
    names = [name for name, _ in image_sources(paths)]
    if not names:
        raise ValueError(f"no images in {', '.join(map(str, paths))}; check the paths")
    return names


def paths_dataset(paths: Sequence[str]) -> "ray.data.Dataset":
    """A dataset of `path` rows, one per image file, for `embed_dataset` / `classify_dataset`."""
    return require_ray().data.from_items([{"path": path} for path in paths])


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


def _decode_batch(batch: dict[str, np.ndarray], preprocess: Callable[[Image.Image], torch.Tensor]) -> dict:
    """The CPU stage: decode and preprocess; a row that fails keeps its place with zero pixels and
    its reason in `error`, so the reason reaches the output."""
    paths = [str(p) for p in batch["path"]]
    images = batch.get("bytes", batch.get("image", [None] * len(paths)))
    pixels, errors = [], []
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
    stacked = torch.stack([p if p is not None else torch.zeros(shape) for p in pixels])
    return {"path": np.array(paths, dtype=object), "pixels": stacked.numpy(), "error": np.array(errors, dtype=object)}


class _Encoder:
    """The model stage, one per actor: the model is loaded once, in the constructor."""

    def __init__(self, spec: str, cache: bool | str, num_gpus: float, classes: Any = None, top_k: int = 5):
        device = "cuda" if num_gpus and torch.cuda.is_available() else "cpu"
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
            embeddings[good] = self.model.encode_images(torch.from_numpy(batch["pixels"][good])).float().cpu().numpy()
        out = {"path": batch["path"], "error": batch["error"]}
        if self.classes is None:
            return {**out, "embedding": embeddings}
        class_embeddings, labels = self.classes
        k = min(self.top_k, len(labels))
        probs = np.full((len(good), k), np.nan, dtype=np.float32)
        names = np.empty(len(good), dtype=object)
        names[:] = [[] for _ in range(len(good))]
        if good.any():
            p, ids = top_k_labels(zero_shot_head, EmbeddedImages(torch.from_numpy(embeddings[good])), class_embeddings,
                                  self.model.logit_scale, self.model.logit_bias, self.model.probability, k)
            probs[good] = p.numpy()
            names[np.flatnonzero(good)] = [[labels[j] for j in row] for row in ids.tolist()]
        return {**out, "labels": names, "probabilities": probs}


def _pipeline(ds: "ray.data.Dataset", model: Backend, batch_size: int, concurrency: int, num_gpus: float,
              cache: bool | str, classes: Any = None, top_k: int = 5) -> "ray.data.Dataset":
    ray = require_ray()
    gpus = ray.cluster_resources().get("GPU", 0)
    if num_gpus and gpus < concurrency * num_gpus:
        raise ValueError(f"{concurrency} actor(s) x {num_gpus} GPU(s) asked for, but the Ray cluster has {gpus:g} GPU(s); "
                         "lower --actors or --gpus-per-actor, or connect to a cluster with GPUs (--address)")
    decoded = ds.map_batches(_decode_batch, fn_kwargs={"preprocess": model.preprocess},
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
    ray = require_ray()
    clf = ZeroShotClassifier(_model(model, cache), labels=labels, templates=templates, cache=cache)
    classes = ray.put((clf.class_embeddings, clf.labels))
    return _pipeline(ds, clf.model, batch_size, concurrency, num_gpus, cache, classes, top_k)


@dataclass
class RunState:
    """What a shard directory's manifest records: the run that writes it and how far it got."""

    identity: dict
    shards: list[str] = field(default_factory=list)
    rows: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)
    done: set[str] = field(default_factory=set)  # paths in the shards written so far
    complete: bool = False


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


def run_identity(model: Backend, paths: Sequence[str], shard_size: int) -> dict:
    """What makes two runs the same run: the model's weights, the image list and the shard size."""
    digest = hashlib.sha256("\n".join(sorted(paths)).encode()).hexdigest()
    return {"model": model.spec, "fingerprint": model.fingerprint, "images": len(paths), "paths_sha256": digest,
            "shard_size": shard_size}


def resume_state(out: str | os.PathLike, identity: dict) -> RunState:
    """The state to continue from: empty for a new directory, the manifest's for the same run;
    refuses a directory with shards of another run, or of no known run, so two never mix, and a
    folder clipzsl did not make (`claim_shard_folder`), as the local writer does,
    and a manifest that is damaged or was edited."""
    import pyarrow.parquet as pq

    out = claim_shard_folder(out)
    manifest = out / MANIFEST
    if not manifest.is_file():
        if has_shards(out):
            raise ValueError(f"{out}: holds shards without a {MANIFEST}, so they are of another run; "
                             "choose a new --out or delete that directory")
        return RunState(identity)
    try:
        saved = load(Manifest, manifest)
    except RecordError as err:
        raise ValueError(f"{err}; the run cannot be resumed from it: choose a new --out, or delete {out} to start "
                         "over") from err
    state = RunState(saved.identity, saved.shards, saved.rows, saved.failures, complete=saved.complete)
    if state.identity != identity:
        changed = sorted(k for k in set(identity) | set(state.identity) if identity.get(k) != state.identity.get(k))
        raise ValueError(f"{out}: written by another run (it differs in {', '.join(changed)}); resuming would mix two "
                         "runs: choose a new --out, or rerun with the same images, model and --shard-size")
    for number in range(len(state.shards)):
        state.done.update(pq.read_table(out / "metadata" / f"metadata_{number}.parquet").column(0).to_pylist())
    return state


def _save_state(out: Path, state: RunState) -> None:
    record = Manifest(state.identity, state.shards, state.rows, state.failures, state.complete, "")
    atomic_write(out / MANIFEST, lambda f: f.write(dumps(record)))


def write_embedding_shards(ds: "ray.data.Dataset", out: str | os.PathLike, state: RunState,
                           shard_size: int = 100_000, on_shard: Callable[[ShardReport], None] | None = None) -> ShardReport:
    """Stream the rows of `embed_dataset` into clip-retrieval shards under `out`, continuing `state`
    (from `resume_state`); after each shard the manifest records it and the failures so far, so
    an interrupted run resumes from its last shard. `on_shard` sees the report after each shard.
    A folder clipzsl did not make is refused (`claim_shard_folder`), as by the local writer."""
    out = claim_shard_folder(out)
    report = ShardReport(rows=state.rows, shards=list(state.shards),
                         failures=[ImageLoadError(p, r) for p, r in state.failures])
    vectors: list[np.ndarray] = []
    names: list[str] = []
    pending_failures: list[tuple[str, str]] = []

    def flush() -> None:
        stacked = np.concatenate(vectors)[:shard_size]
        report.shards.append(_write_shard(out, len(report.shards), stacked, names[:shard_size]))
        report.rows += len(stacked)
        rest = np.concatenate(vectors)[shard_size:]
        del names[:shard_size]
        vectors[:] = [rest] if len(rest) else []
        state.shards, state.rows = report.shards, report.rows
        state.failures += pending_failures
        pending_failures.clear()
        _save_state(out, state)
        if on_shard is not None:
            on_shard(report)

    _save_state(out, state)  # before any shard: the directory now belongs to this run
    mark_unfinished(out, True)
    for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
        errors = batch["error"]
        good = np.array([not e for e in errors], dtype=bool)
        for path, reason in zip(batch["path"][~good], errors[~good]):
            pending_failures.append((str(path), str(reason)))
            report.failures.append(ImageLoadError(str(path), str(reason)))
        vectors.append(batch["embedding"][good])
        names.extend(str(p) for p in batch["path"][good])
        while len(names) >= shard_size:
            flush()
    if names:
        flush()
    state.failures += pending_failures
    state.complete = True
    _save_state(out, state)
    mark_unfinished(out, False)
    return report


def write_predictions(ds: "ray.data.Dataset", output: str | os.PathLike) -> list[ImageLoadError]:
    """Write the rows of `classify_dataset` to a parquet file (path, labels, probabilities, error:
    null when read), whole or not at all; returns the images that could not be read."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([("path", pa.string()), ("labels", pa.list_(pa.string())),
                        ("probabilities", pa.list_(pa.float32())), ("error", pa.string())])
    failures: list[ImageLoadError] = []

    def write(f) -> None:
        with pq.ParquetWriter(f, schema) as writer:
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                errors = [str(e) or None for e in batch["error"]]
                failures.extend(ImageLoadError(str(p), e) for p, e in zip(batch["path"], errors) if e)
                probs = [None if e else [float(x) for x in row] for row, e in zip(batch["probabilities"], errors)]
                writer.write_table(pa.table({
                    "path": [str(p) for p in batch["path"]], "labels": [list(l) for l in batch["labels"]],
                    "probabilities": probs, "error": errors}, schema=schema))

    atomic_write(Path(output), write)
    return failures
