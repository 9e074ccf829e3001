"""`onnx:<folder>`: a model that `clipzsl export onnx` wrote, its two towers run on onnxruntime.

The folder (`clipzsl.export.export_onnx`) holds `image.onnx` (preprocessed pixels [N, 3, H, W] ->
L2-normalised embeddings [N, D]: for the packaged model the EfficientNet, its ImageNet softmax and
the ConSE step, top-k and concept table included), `text.onnx` (token ids -> L2-normalised
embeddings), the tokenizer's files (or, for open_clip, the name of its tokenizer) and
`manifest.json`: the source's spec and weight fingerprint, the embedding size, the image
preprocessing, the tokenizer, the opset, the versions, and the sha256 of every file, checked on
load, so a truncated or swapped file is refused before anything runs.

What stays in Python: decoding and preprocessing images (the source family's own transform) and
tokenising. The backend keeps the source's fingerprint: the export checked that both towers match
the source within `TOLERANCE`, so label caches and image indexes made with either are shared.
Embeddings only: no spatial tokens (heat maps and the cross-attention adapter need the torch model).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
import torch
from PIL import Image

from ..errors import ClipzslError, MissingExtra
from ..records import RecordError, load, rule
from .base import Backend

log = logging.getLogger(__name__)

#: the manifest's file name and format, and the kind of folder `store.claim` marks
MANIFEST = "manifest.json"
FORMAT = 1
FOLDER_KIND = "onnx-model"
IMAGE_FILE, TEXT_FILE = "image.onnx", "text.onnx"
#: the largest max-abs difference of the L2-normalised embeddings, onnxruntime against torch, an export accepts
TOLERANCE = 1e-4


class OnnxModelError(ClipzslError, ValueError):
    """An export folder that cannot be used as it is: the message says what is wrong and how to remake it."""


@dataclass(frozen=True)
class Manifest:
    """The schema of `manifest.json` (read through `clipzsl.records`, sealed: an edit is refused)."""

    format: int = field(metadata=rule(lambda v: v == FORMAT, f"format {FORMAT} (re-export with this clipzsl)"))
    source_spec: str
    fingerprint: str  # the source's weight fingerprint: every cache is keyed on it
    family: Literal["packaged", "openclip", "hf"]
    embed_dim: int = field(metadata=rule(lambda v: v > 0, "a positive size"))
    logit_scale: float
    logit_bias: float
    probability: Literal["softmax", "sigmoid"]
    image_size: list[int]  # [H, W] of the pixels the image tower takes
    preprocess: dict[str, Any]  # the family's image preprocessing (`_preprocessor`)
    tokenizer: dict[str, Any]  # how texts become the text tower's inputs (`tokenizer_for`)
    files: dict[str, str]  # every file the export wrote, relative to the folder -> its sha256
    opset: int
    max_abs_diff: float  # measured at export, onnxruntime against torch, on probe images and prompts
    versions: dict[str, str]
    record_sha256: str = ""


def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_manifest(directory: Path) -> Manifest:
    """The folder's validated manifest, every file it lists checked against its sha256."""
    path = directory / MANIFEST
    if not path.is_file():
        raise OnnxModelError(f"{directory}: no {MANIFEST}, so not a complete `clipzsl export onnx` folder (an "
                             "interrupted export leaves none); export again into it")
    try:
        manifest = load(Manifest, path)
    except RecordError as err:
        raise OnnxModelError(f"{err}; export the model again") from err
    for name, expected in manifest.files.items():
        file = directory / name
        if not file.is_file() or sha256_file(file) != expected:
            state = "missing" if not file.is_file() else "damaged or replaced (its sha256 differs from the manifest's)"
            raise OnnxModelError(f"{file}: {state}; export the model again")
    return manifest


def _session(path: Path, threads: int | None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise MissingExtra("onnx: models need onnxruntime: pip install 'clipzsl[onnx]'") from err
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as err:  # onnxruntime raises its own exception types for an unreadable graph
        raise OnnxModelError(f"{path}: onnxruntime cannot load it ({err}); export the model again") from err


def _preprocessor(manifest: Manifest, directory: Path) -> Callable[[Image.Image], torch.Tensor]:
    """The source family's own image transform, rebuilt from the manifest's settings."""
    settings = manifest.preprocess
    if manifest.family == "packaged":
        from .packaged import AutoView, image_transform

        size = manifest.image_size[0]
        return AutoView(size) if settings["view"] == "auto" else image_transform(size, settings["view"] == "crop")
    if manifest.family == "openclip":
        from open_clip.transform import PreprocessCfg, image_transform_v2

        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in settings["open_clip"].items()}
        return image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory / settings["path"], local_files_only=True)
    return lambda image: processor(images=[image], return_tensors="pt")["pixel_values"][0]


def tokenizer_for(settings: dict[str, Any], directory: Path) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """texts -> the text tower's named int64 inputs, as a manifest's `tokenizer` settings say."""
    if settings["kind"] == "open_clip":
        import open_clip

        tokenize = open_clip.get_tokenizer(settings["name"])

        def open_clip_tokens(texts: list[str]) -> dict[str, np.ndarray]:
            tokens = tokenize(texts).numpy().astype(np.int64)
            if settings["trim"]:  # as OpenClipBackend: padding after the end-of-text cannot change the embedding
                tokens = tokens[:, :max(1, int((tokens != 0).sum(axis=1).max()))]
            return {"tokens": tokens}

        return open_clip_tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory / settings["path"], local_files_only=True)
    return lambda texts: {k: np.asarray(v, dtype=np.int64)
                          for k, v in tokenizer(texts, return_tensors="np", **settings["kwargs"]).items()}


class OnnxBackend(Backend):
    """Both towers on onnxruntime (CPU); preprocessing and tokenising as the source model does them."""

    spatial_tokens = False
    needs_torch = False

    def __init__(self, directory: str | Path, manifest: Manifest | None = None, threads: int | None = None):
        """`manifest`: None reads and checks the folder's; `threads`: onnxruntime's intra-op threads
        (None: its default, one per core)."""
        self.directory = Path(directory)
        manifest = manifest or read_manifest(self.directory)
        self.manifest = manifest
        self.spec = f"onnx:{directory}"
        self.fingerprint = manifest.fingerprint
        self.embed_dim = manifest.embed_dim
        self.logit_scale, self.logit_bias = manifest.logit_scale, manifest.logit_bias
        self.probability = manifest.probability
        self.device = "cpu"
        self.preprocess = _preprocessor(manifest, self.directory)
        self._tokenize = tokenizer_for(manifest.tokenizer, self.directory)
        self._image = _session(self.directory / IMAGE_FILE, threads)
        self._text = _session(self.directory / TEXT_FILE, threads)
        self._text_inputs = [i.name for i in self._text.get_inputs()]

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def encode_images(self, pixels: torch.Tensor, return_tokens: bool = False) -> torch.Tensor:
        if return_tokens:
            raise NotImplementedError(f"{self.spec} exports embeddings only; spatial tokens (heat maps, the "
                                      f"cross-attention adapter) need its source model, {self.manifest.source_spec}")
        array = pixels.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self._image.run(None, {"pixels": array})[0])

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self._tokenize(list(texts))
        return torch.from_numpy(self._text.run(None, {name: inputs[name] for name in self._text_inputs})[0])
