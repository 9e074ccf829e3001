"""`onnx:<folder>`: a model that `clipzsl export onnx` wrote, its two towers run on onnxruntime, without torch.

The folder (`clipzsl.export.export_onnx`) holds `image.onnx` (preprocessed pixels [N, 3, H, W] ->
L2-normalised embeddings [N, D]: for the packaged model the EfficientNet, its ImageNet softmax and
the ConSE step, top-k and concept table included), `text.onnx` (token ids -> L2-normalised
embeddings), the tokenizer's files (transformers' saved tokenizer; for open_clip's own tokenizer its
byte-pair merges, `MERGES`) and `manifest.json`: the source's spec and weight fingerprint, the
embedding size, the image preprocessing, the tokenizer, the opset, the versions, and the sha256 of
every file, checked on load, so a truncated or swapped file is refused before anything runs.

Nothing here imports torch, torchvision, timm or open_clip (tests/test_onnx.py runs it in a process
where they cannot be imported): images are preprocessed with Pillow and numpy (`backends.pixels`,
the same values as the source family's torchvision transform; for hf, transformers' Pillow image
processor, within one uint8 level of its torch one), texts tokenised by `backends.clip_bpe` or
transformers' tokenizers, and both towers take and give numpy arrays. The backend keeps the
source's fingerprint: the export checked that both towers match the source within `TOLERANCE`, so
label caches and image indexes made with either are shared. Embeddings only: no spatial tokens
(heat maps and the cross-attention adapter need the torch model).
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np
from PIL import Image

from ..arrays import as_numpy
from ..errors import ClipzslError, MissingExtra
from ..records import RecordError, load, rule
from .base import Backend
from .clip_bpe import ClipBpe, clean
from .pixels import open_clip_view, packaged_view

log = logging.getLogger(__name__)

#: the manifest's file name and format, and the kind of folder `store.claim` marks
MANIFEST = "manifest.json"
FORMAT = 2  # 2: open_clip's tokenizer as files (no open_clip at serving time)
FOLDER_KIND = "onnx-model"
IMAGE_FILE, TEXT_FILE = "image.onnx", "text.onnx"
#: open_clip's byte-pair merges, in the tokenizer folder (`clip_bpe`)
MERGES = "merges.txt"
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


def _preprocessor(manifest: Manifest, directory: Path) -> Callable[[Image.Image], np.ndarray]:
    """The source family's image transform, rebuilt from the manifest's settings with Pillow and numpy
    (`backends.pixels`; for hf, transformers' Pillow image processor)."""
    settings = manifest.preprocess
    if manifest.family == "packaged":
        return packaged_view(manifest.image_size[0], settings["view"])
    if manifest.family == "openclip":
        return open_clip_view(settings["open_clip"])
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(directory / settings["path"], local_files_only=True, backend="pil")
    return lambda image: np.asarray(processor(images=[image], return_tensors="np")["pixel_values"][0], np.float32)


def _trimmed(tokens: np.ndarray, trim: bool) -> np.ndarray:
    """As OpenClipBackend: padding after the end-of-text cannot change the embedding, so the batch is cut
    at its longest prompt."""
    return tokens[:, :max(1, int((tokens != 0).sum(axis=1).max()))] if trim else tokens


def _clip_bpe_tokens(settings: dict[str, Any], directory: Path) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """open_clip's own tokenizer (`SimpleTokenizer`), from the merges file the export wrote."""
    tokenize = ClipBpe.from_files(directory / settings["path"] / MERGES, settings["special"],
                                  settings["context_length"], settings["clean"])
    return lambda texts: {"tokens": _trimmed(tokenize(texts), settings["trim"])}


def _open_clip_hf_tokens(settings: dict[str, Any], directory: Path) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """open_clip's wrappers of a transformers tokenizer (HFTokenizer, SigLipTokenizer): its cleaning, padded
    to the context length, the separator zeroed where the model strips it."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory / settings["path"], local_files_only=True)
    length = settings["context_length"]

    def tokens(texts: list[str]) -> dict[str, np.ndarray]:
        ids = np.asarray(tokenizer([clean(t, settings["clean"]) for t in texts], return_tensors="np",
                                   max_length=length, padding="max_length", truncation=True)["input_ids"], np.int64)
        if settings["strip_sep_token"]:
            ids = np.where(ids == tokenizer.sep_token_id, 0, ids)
        return {"tokens": _trimmed(ids, settings["trim"])}

    return tokens


#: the call of a transformers tokenizer that `_fast_tokens` repeats on the `tokenizers` library alone
PAD_TO_LONGEST = {"padding": True, "truncation": True}


def _fast_tokens(settings: dict[str, Any], directory: Path) -> Callable[[list[str]], dict[str, np.ndarray]] | None:
    """A saved fast transformers tokenizer called with `padding=True, truncation=True, max_length=L` (the packaged
    model's MiniLM), run by the `tokenizers` library without transformers (which imports torch where it is
    installed); None for any other tokenizer or call."""
    kwargs, folder = dict(settings["kwargs"]), directory / settings["path"]
    if not (folder / "tokenizer.json").is_file() or {k: kwargs.pop(k, None) for k in PAD_TO_LONGEST} != PAD_TO_LONGEST \
            or set(kwargs) != {"max_length"}:
        return None
    from tokenizers import Tokenizer

    config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tokenizer.enable_truncation(kwargs["max_length"], strategy="longest_first", direction="right")
    tokenizer.enable_padding(pad_id=tokenizer.token_to_id(config["pad_token"]), pad_token=config["pad_token"],
                             pad_type_id=config.get("pad_token_type_id", 0), direction="right")

    def tokens(texts: list[str]) -> dict[str, np.ndarray]:
        encoded = tokenizer.encode_batch(texts)
        return {name: np.array([getattr(e, field) for e in encoded], dtype=np.int64).reshape(len(texts), -1)
                for name, field in (("input_ids", "ids"), ("attention_mask", "attention_mask"),
                                    ("token_type_ids", "type_ids"))}

    return tokens


def tokenizer_for(settings: dict[str, Any], directory: Path) -> Callable[[list[str]], dict[str, np.ndarray]]:
    """texts -> the text tower's named int64 inputs, as a manifest's `tokenizer` settings say (no torch)."""
    if settings["kind"] == "clip_bpe":
        return _clip_bpe_tokens(settings, directory)
    if settings["kind"] == "open_clip_hf":
        return _open_clip_hf_tokens(settings, directory)
    fast = _fast_tokens(settings, directory)
    if fast is not None:
        return fast
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

    def encode_images(self, pixels: Any, return_tokens: bool = False) -> np.ndarray:
        """Preprocessed pixels [N, 3, H, W] (numpy, or a torch tensor) -> float32 [N, D]."""
        if return_tokens:
            raise NotImplementedError(f"{self.spec} exports embeddings only; spatial tokens (heat maps, the "
                                      f"cross-attention adapter) need its source model, {self.manifest.source_spec}")
        return np.asarray(self._image.run(None, {"pixels": np.ascontiguousarray(as_numpy(pixels))})[0], np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Texts -> float32 [N, D]."""
        inputs = self._tokenize(list(texts))
        return np.asarray(self._text.run(None, {name: inputs[name] for name in self._text_inputs})[0], np.float32)
