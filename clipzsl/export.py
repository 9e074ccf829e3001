"""`clipzsl export onnx`: a model's two towers as ONNX graphs, for `onnx:<folder>` (`backends.onnx`).

The graphs are what the backend computes, traced by torch's exporter (`torch.onnx.export(dynamo=True)`;
the TorchScript exporter fails on open_clip's fused attention): the image tower is the backend's
`encode_images` on preprocessed pixels (for the packaged model the EfficientNet, the softmax and
ConSE's top-k weighted sum of the concept embeddings, which the graph carries as a constant), the text
tower its `encode_texts` after tokenising. Image decoding, resizing and tokenising stay in Python, where
`onnx:` does them without torch: the folder gets what its tokenizer needs as files (open_clip's
byte-pair merges and settings, or the transformers tokenizer open_clip wraps, `_open_clip_tokenizer`)
and the manifest the image preprocessing's settings (`backends.pixels` rebuilds it).
Both have a dynamic batch (and, where the model allows it, a dynamic text length). The export is
checked against the torch model under onnxruntime before its manifest is written: a difference
above `TOLERANCE` is refused, so the folder may keep the source's fingerprint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
import os
import shutil
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Literal

import torch

from .backends import load_model
from .backends.base import Backend, normalize
from .backends.clip_bpe import CLEANINGS, write_merges
from .backends.onnx import (FOLDER_KIND, FORMAT, IMAGE_FILE, MANIFEST, MERGES, TEXT_FILE, TOLERANCE, Manifest,
                            OnnxBackend, sha256_file, tokenizer_for)
from .errors import ClipzslError, InputError, MissingExtra
from .records import dumps
from .store import atomic_write, claim

log = logging.getLogger(__name__)

__all__ = ["ExportMismatch", "export_onnx"]

#: the ONNX opset the graphs are written in
OPSET = 18
#: the prompts and the batch the export is checked on (varied lengths: the text length is dynamic)
PROBE_TEXTS = ["a photo of a dog.", "a blurry photo of a large red fire truck parked in the snow at night.",
               "x", "an emoji of a grinning face with big eyes, tears of joy and a raised hand, drawn in the flat style."]
PROBE_IMAGES = 3
_VERSIONED = ("clipzsl", "torch", "onnx", "onnxruntime", "onnxscript", "transformers", "open_clip_torch", "timm")


class ExportMismatch(ClipzslError, RuntimeError):
    """The exported graphs do not reproduce the torch model within `TOLERANCE`; no manifest was written."""


class _ImageTower(torch.nn.Module):
    """The backend's own `encode_images`, as a module the exporter can trace."""

    def __init__(self, backend: Backend):
        super().__init__()
        self.backend = backend

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.backend.encode_images(pixels)
        assert isinstance(out, torch.Tensor)
        return out


class _MiniLMText(torch.nn.Module):
    """The packaged text tower after its tokenizer: MiniLM, mean pooling over the mask, L2 (`TextTower.encode`)."""

    def __init__(self, network: torch.nn.Module):
        super().__init__()
        self.network = network

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor) -> torch.Tensor:
        hidden = self.network(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))


class _OpenClipText(torch.nn.Module):
    """open_clip's text tower on its tokens, trimmed to the longest prompt where that cannot change it
    (`OpenClipBackend.encode_texts`)."""

    def __init__(self, network: Any, tower: Any, trim: bool):
        super().__init__()
        self.network, self.tower, self.trim = network, tower, trim

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from .backends.openclip import _encode_trimmed

        return normalize(_encode_trimmed(self.tower, tokens) if self.trim else self.network.encode_text(tokens))


class _HFText(torch.nn.Module):
    """A transformers dual encoder's `get_text_features` (`HFBackend.encode_texts`)."""

    def __init__(self, network: Any):
        super().__init__()
        self.network = network

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        from .backends.hf import _pooled

        return normalize(_pooled(self.network.get_text_features(input_ids=input_ids, attention_mask=attention_mask)))


@dataclass
class _Recipe:
    """One family's text side: the module traced, its tokenizer settings, what saves the tokenizer."""

    family: Literal["packaged", "openclip", "hf"]
    text: torch.nn.Module
    tokenizer: dict[str, Any]
    preprocess: dict[str, Any]
    save_tokenizer: Callable[[Path], None] | None
    dynamic_length: bool = True


def _packaged(backend: Any) -> _Recipe:
    tower = backend.text
    view = backend.spec.partition("+")[2] or "auto"
    kwargs = {"padding": True, "truncation": True, "max_length": tower.max_length}
    return _Recipe("packaged", _MiniLMText(tower.network), {"kind": "hf", "path": "tokenizer", "kwargs": kwargs},
                   {"view": view}, tower.tokenizer.save_pretrained)


def _open_clip_tokenizer(tokenizer: Any, trim: bool) -> tuple[dict[str, Any], Callable[[Path], None]]:
    """open_clip's tokenizer as settings and files that `tokenizer_for` reads without open_clip: its
    byte-pair merges (`SimpleTokenizer`) or the transformers tokenizer it wraps, with its cleaning and
    context length."""
    from open_clip.tokenizer import HFTokenizer, SigLipTokenizer, SimpleTokenizer, get_clean_fn

    cleaning = {get_clean_fn(name): name for name in CLEANINGS}
    settings: dict[str, Any] = {"path": "tokenizer", "context_length": tokenizer.context_length, "trim": trim}
    if isinstance(tokenizer, SimpleTokenizer) and tokenizer.reduction_fn is None:
        merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)

        def save(folder: Path) -> None:
            folder.mkdir()
            write_merges(folder / MERGES, merges)

        special = [tokenizer.decoder[i] for i in tokenizer.all_special_ids]
        return {**settings, "kind": "clip_bpe", "special": special, "clean": cleaning[tokenizer.clean_fn]}, save
    if isinstance(tokenizer, SigLipTokenizer):
        return {**settings, "kind": "open_clip_hf", "clean": "canonicalize", "strip_sep_token": False}, \
            tokenizer.save_pretrained
    if isinstance(tokenizer, HFTokenizer) and not tokenizer.tokenizer_mode:
        return {**settings, "kind": "open_clip_hf", "clean": cleaning[tokenizer.clean_fn],
                "strip_sep_token": tokenizer.strip_sep_token}, tokenizer.save_pretrained
    raise InputError(f"open_clip's {type(tokenizer).__name__} with a reduction mask or a tokenizer mode cannot be "
                     "exported: only its plain tokenizers can")


def _openclip(backend: Any) -> _Recipe:
    from .backends.openclip import _trimmable

    trim = _trimmable(backend._text_tower)
    cfg = {k: list(v) if isinstance(v, tuple) else v for k, v in backend.network.visual.preprocess_cfg.items()}
    tokenizer, save = _open_clip_tokenizer(backend.tokenizer, trim)
    return _Recipe("openclip", _OpenClipText(backend.network, backend._text_tower, trim), tokenizer,
                   {"open_clip": cfg}, save, dynamic_length=trim)


def _hf(backend: Any) -> _Recipe:
    return _Recipe("hf", _HFText(backend.network), {"kind": "hf", "path": "processor", "kwargs": backend._text_kwargs},
                   {"path": "processor"}, backend.processor.save_pretrained)


def _recipe(backend: Backend) -> _Recipe:
    from .backends.hf import HFBackend
    from .backends.openclip import OpenClipBackend
    from .backends.packaged import PackagedBackend

    for kind, make in ((PackagedBackend, _packaged), (OpenClipBackend, _openclip), (HFBackend, _hf)):
        if isinstance(backend, kind):
            return make(backend)
    raise InputError(f"{backend.spec}: only packaged, openclip: and hf: models can be exported to ONNX")


def _graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor], dims: dict[str, dict[int, Any]]) -> bytes:
    """One tower as serialised ONNX (the exporter's progress lines go to the debug log, not stdout)."""
    try:
        import onnxscript  # noqa: F401  (the exporter needs it; say so here rather than deep inside torch)
    except ImportError as err:
        raise MissingExtra("exporting to ONNX needs onnx and onnxscript: pip install 'clipzsl[onnx]'") from err
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed), torch.no_grad(), warnings.catch_warnings():
        # each input's batch (and length) axis shares one Dim, which the exporter names once and says so
        warnings.filterwarnings("ignore", message=".*will not be used, since it shares the same shape constraints")
        program = torch.onnx.export(module.eval(), (), kwargs=inputs, dynamo=True, dynamic_shapes=dims,
                                    opset_version=OPSET, verbose=False)
    log.debug("torch.onnx.export: %s", printed.getvalue())
    assert program is not None
    return program.model_proto.SerializeToString()


def _text_example(recipe: _Recipe, directory: Path) -> dict[str, torch.Tensor]:
    """Tokenised probe prompts (two of differing length) as the exporter's example inputs."""
    tokens = tokenizer_for(recipe.tokenizer, directory)(PROBE_TEXTS[:2])
    return {name: torch.from_numpy(array) for name, array in tokens.items()}


def _write_towers(backend: Backend, recipe: _Recipe, directory: Path, size: list[int]) -> list[str]:
    """image.onnx and text.onnx written atomically into `directory`; returns the text inputs' names."""
    batch, length = torch.export.Dim("batch"), torch.export.Dim("length")
    pixels = torch.randn(2, 3, *size)
    image = _graph(_ImageTower(backend), {"pixels": pixels}, {"pixels": {0: batch}})
    atomic_write(directory / IMAGE_FILE, lambda f: f.write(image))
    example = _text_example(recipe, directory)
    dims = {name: {0: batch, 1: length} if recipe.dynamic_length else {0: batch} for name in example}
    text = _graph(recipe.text, example, dims)
    atomic_write(directory / TEXT_FILE, lambda f: f.write(text))
    return list(example)


def _versions() -> dict[str, str]:
    found = {}
    for name in _VERSIONED:
        with contextlib.suppress(PackageNotFoundError):
            found[name] = version(name)
    return found


def _max_difference(backend: Backend, exported: OnnxBackend, size: list[int]) -> float:
    """Max abs difference of both towers' normalised embeddings, onnxruntime against torch, on probe inputs:
    random pixels, the probe image through each side's own preprocessing, the probe prompts through each
    side's own tokenizer."""
    pixels = torch.randn(PROBE_IMAGES, 3, *size, generator=torch.Generator().manual_seed(0))
    image = _probe_image()
    pairs = [(backend.encode_images(pixels), exported.encode_images(pixels.numpy())),
             (backend.encode_images(backend.preprocess(image)[None]),
              exported.encode_images(exported.preprocess(image)[None])),
             (backend.encode_texts(PROBE_TEXTS), exported.encode_texts(PROBE_TEXTS))]
    return max(float((torch.as_tensor(a).float() - torch.from_numpy(b)).abs().max()) for a, b in pairs)


def _prepare(directory: Path, recipe: _Recipe) -> None:
    """Claim the folder; drop a previous export's manifest first, so an interrupted export leaves an
    incomplete folder that `onnx:` refuses, never an old manifest over new graphs."""
    claim(directory, FOLDER_KIND)
    (directory / MANIFEST).unlink(missing_ok=True)
    for sub in ("tokenizer", "processor"):
        if (directory / sub).is_dir():
            shutil.rmtree(directory / sub)
    if recipe.save_tokenizer is not None:
        recipe.save_tokenizer(directory / str(recipe.tokenizer["path"]))


def _manifest(backend: Backend, recipe: _Recipe, directory: Path, size: list[int]) -> Manifest:
    """What the folder holds, every file's sha256 included (`max_abs_diff` is filled in once measured)."""
    files = sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith("."))
    return Manifest(
        format=FORMAT, source_spec=backend.spec, fingerprint=backend.fingerprint, family=recipe.family,
        embed_dim=backend.embed_dim, logit_scale=backend.logit_scale, logit_bias=backend.logit_bias,
        probability="sigmoid" if backend.probability == "sigmoid" else "softmax", image_size=size,
        preprocess=recipe.preprocess, tokenizer=recipe.tokenizer,
        files={str(p.relative_to(directory)): sha256_file(p) for p in files if p.name != MANIFEST}, opset=OPSET,
        max_abs_diff=0.0, versions=_versions())


def export_onnx(model: Backend | str, out: str | os.PathLike) -> Manifest:
    """Export `model` (a backend on the CPU, or a spec) into the folder `out`, which clipzsl creates and
    marks (a non-empty folder it did not make is refused); returns the manifest written last.

    Raises ExportMismatch when onnxruntime's embeddings differ from torch's by more than TOLERANCE."""
    backend = load_model(model, device="cpu") if isinstance(model, str) else model
    if backend.device != "cpu":
        raise InputError(f"export a model on the CPU: load_model({backend.spec!r}, device='cpu')")
    directory, recipe = Path(out), _recipe(backend)
    size = list(backend.preprocess(_probe_image()).shape[-2:])
    _prepare(directory, recipe)
    _write_towers(backend, recipe, directory, size)
    manifest = _manifest(backend, recipe, directory, size)
    difference = _max_difference(backend, OnnxBackend(directory, manifest), size)
    if difference > TOLERANCE:
        raise ExportMismatch(f"{backend.spec}: onnxruntime's embeddings differ from torch's by {difference:.2e} "
                             f"(> {TOLERANCE:g}); no manifest written in {directory}")
    manifest = dataclasses.replace(manifest, max_abs_diff=difference)
    atomic_write(directory / MANIFEST, lambda f: f.write(dumps(manifest)))
    log.info("exported %s to %s (max abs difference %.1e)", backend.spec, directory, difference)
    return manifest


def _probe_image() -> Any:
    from PIL import Image

    return Image.new("RGB", (320, 240), (120, 80, 40))
