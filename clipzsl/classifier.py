"""Prompt-ensembled zero-shot classification: label set -> class embeddings -> head -> probabilities.

The class embeddings come from `clipzsl.text_encoding` (cached per model under the cache
directory); the images are embedded once (`clipzsl.images`), and every score goes through
one head (`clipzsl.head`): the zero-shot cosine, or a trained cross-attention adapter.
"""
from __future__ import annotations

import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from safetensors import safe_open
from safetensors.numpy import save as safetensors_bytes

from .arrays import as_numpy, ops
from .backends import DEFAULT_MODEL, Backend, load_model
from .backends.base import CacheArg, cache_dir_of
from .errors import ClipzslError, InputError
from .head import Head, check_top_k, probabilities, zero_shot_head
from .head import top_k as top_k_labels
from .images import EmbeddedImages, ImageSource, embed_images, expand_sources, load_image
from .prompts import DEFAULT_TEMPLATES, ClassEntry, LabelsArg, TemplatesArg, load_prompts
from .store import EmbeddingStore, StoreError, atomic_write, cache_root
from .text_encoding import cached_class_embeddings
from .text_encoding import class_embeddings as class_embeddings_of

if TYPE_CHECKING:
    import torch

    from .maps import HeatMap
    from .tip_adapter import Adapter

#: the "format" metadata entry of a classifier file written by `ZeroShotClassifier.save`
CLASSIFIER_FORMAT = "clipzsl-zero-shot-classifier"

Images = ImageSource | Sequence[ImageSource] | EmbeddedImages

#: how `ZeroShotClassifier.zoomed_proba` zooms: which labels it scores again on a crop ("top": each of the
#: best few on a crop around its own peak; "all": every label on one crop around the best label's peak), how it
#: combines a label's score on the whole image with its score on the crop, and which crop it takes; the defaults
#: chosen by bench_zoom's selection protocol
ZOOM_RESCORES, ZOOM_COMBINES, ZOOM_CROPS = ("top", "all"), ("probability", "logit"), ("peak", "square")
ZOOM_RESCORE, ZOOM_COMBINE, ZOOM_CROP = "top", "probability", "peak"


def _check_zoom(top: int, rescore: str, combine: str, crop: str) -> None:
    if isinstance(top, bool) or not isinstance(top, int) or top < 0:
        raise InputError(f"top must be a whole number of labels to zoom on, 0 or more, not {top!r}")
    for name, value, choices, what in (
            ("rescore", rescore, ZOOM_RESCORES, "each top label on its own crop, or every label on the best one's"),
            ("combine", combine, ZOOM_COMBINES, "how the whole image's and the crop's scores are combined"),
            ("crop", crop, ZOOM_CROPS, "the peak box, or the square around it")):
        if value not in choices:
            raise InputError(f"{name} must be one of {choices} ({what}), not {value!r}")


def _zoom_box(heat_map: HeatMap, column: int, size: tuple[int, int], crop: str) -> tuple[int, int, int, int]:
    """The crop a zoom on label `column` takes from an image of `size`: its peak box, or the square around it."""
    from .maps import peak_box, square_box

    box = peak_box(heat_map, column)[0]
    return square_box(box, size) if crop == "square" else box


class ClassifierMismatch(ClipzslError, ValueError):
    """A saved classifier whose class embeddings were built with another model."""


def label_embeddings(model: Backend, entries: Sequence[ClassEntry], templates: Sequence[str],
                     cache: CacheArg = True, progress: bool | None = None) -> Any:
    """Class embeddings [C, D] through the label cache (`cache` as `ZeroShotClassifier` takes it; False: in
    memory only). Best effort: an unusable cache costs time, never the classification. The cache's
    table is closed before returning, so no connection (nor SQLite's -wal file) outlives the call."""
    if cache is not False:
        try:
            with contextlib.closing(EmbeddingStore.for_labels(model, cache_root(cache_dir_of(cache)))) \
                    as store:
                return cached_class_embeddings(model, entries, templates, store, progress)
        except (StoreError, OSError) as err:
            warnings.warn(f"label cache not used ({err}); `clipzsl cache clear` resets it")
    return class_embeddings_of(model, entries, templates, progress)


class ZeroShotClassifier:
    """A classifier over any label set, from a frozen dual encoder and prompt templates.

    >>> clf = ZeroShotClassifier(load_model(), labels=["cat", "dog"], templates=["a photo of a {}."])
    >>> clf.predict("photos/", top_k=1)
    """

    def __init__(
        self,
        model: Backend | str | None = None,
        labels: LabelsArg = (),
        templates: TemplatesArg = DEFAULT_TEMPLATES,
        cache: CacheArg = True,
        progress: bool | None = None,
        adapter: Adapter | str | os.PathLike | None = None,
        class_embeddings: Any = None,
        device: str = "auto",
        precision: str = "auto",
    ):
        """`cache`: True for the default cache directory, a directory, or False for none (then
        nothing is written anywhere: a model given as a spec builds its own caches in memory).
        `adapter`: a `CrossAttentionAdapter` or the directory it was saved to; it becomes the head
        (it must have been trained on this model).
        `class_embeddings`: [len(labels), D] already built from these labels and templates
        with this model (what `load` passes); no text is encoded then.
        `device`, `precision`: for a model given as a spec (`load_model`'s). Class embeddings and image
        embeddings come back float32 on the CPU, and the head (zero-shot or adapter) scores them there:
        an [N, D] x [D, C] product, or a small adapter over the cached tokens, costs less than
        moving them back to the device."""
        # labels and templates before the model: a bad file fails at once, not after a model load
        self.entries, self.templates = load_prompts(labels, templates)
        self.model = model if isinstance(model, Backend) else load_model(model or DEFAULT_MODEL, device, precision,
                                                                          cache=cache)
        if len(self.entries) == 1 and self.model.probability == "softmax":
            raise InputError(
                f"one label ({self.entries[0].name!r}) with {self.model.spec}, whose softmax over the labels "
                "would always give it 100%; give at least two labels (e.g. add 'something else'), or use a "
                "sigmoid model (SigLIP), which scores each label on its own."
            )
        if class_embeddings is not None:
            expected = (len(self.entries), self.model.embed_dim)
            if tuple(class_embeddings.shape) != expected:
                raise InputError(f"class embeddings have shape {tuple(class_embeddings.shape)}, but "
                                 f"{len(self.entries)} labels and model {self.model.spec!r} need {expected}")
            self.class_embeddings = self.model.from_numpy(as_numpy(class_embeddings))
        else:
            self.class_embeddings = label_embeddings(self.model, self.entries, self.templates, cache, progress)
        self.adapter: Adapter | None = None
        self._head: Head = zero_shot_head
        if adapter is not None:  # adapters are torch modules: imported only when there is one
            from .tip_adapter import bind_head, resolve_any_adapter

            self.adapter = resolve_any_adapter(adapter, self.model)
            self._head = bind_head(self.adapter, self.labels, self.class_embeddings)

    @property
    def labels(self) -> list[str]:
        """Class names, in score-column order."""
        return [entry.name for entry in self.entries]

    @property
    def head(self) -> Head:
        """The adapter's head when there is one, else the zero-shot head."""
        return self._head

    def embed(self, images: ImageSource | Sequence[ImageSource], **kwargs) -> EmbeddedImages:
        """Image embeddings (with the spatial tokens when an adapter needs them); keyword
        arguments go to `clipzsl.images.embed_images`."""
        kwargs.setdefault("return_tokens", self._attending() is not None)
        return embed_images(self.model, images, **kwargs)

    def _embedded(self, images: Images, batch_size: int | None) -> EmbeddedImages:
        return images if isinstance(images, EmbeddedImages) else self.embed(images, batch_size=batch_size)

    def _attending(self) -> Any:
        """The cross-attention adapter, if the adapter is one (`tip_adapter.attending`)."""
        if self.adapter is None:
            return None
        from .tip_adapter import attending

        return attending(self.adapter)

    def logits(self, images: Images, batch_size: int | None = None) -> Any:
        """Logits [N, C] through the head: rank by these, since far-down probabilities underflow
        to equal zeros."""
        return self.head(self._embedded(images, batch_size), self.class_embeddings, self.model.logit_scale,
                         self.model.logit_bias)

    def predict_proba(self, images: Images, batch_size: int | None = None) -> np.ndarray:
        """Probabilities [N, C]; images are paths, PIL images, folders (walked recursively) or
        already-embedded `EmbeddedImages`."""
        return as_numpy(probabilities(self.logits(images, batch_size), self.model.probability))

    def predict(self, images: Images, top_k: int = 5, batch_size: int | None = None) -> list[list[tuple[str, float]]]:
        """Per image: the `top_k` (label, probability) pairs, best first, without an [N, C] matrix."""
        check_top_k(top_k)  # before the images are embedded, not after
        embedded = self._embedded(images, batch_size)
        probs, ids = top_k_labels(self.head, embedded, self.class_embeddings, self.model.logit_scale,
                                  self.model.logit_bias, self.model.probability, top_k)
        return self._named(probs, ids)

    def _named(self, probs: Any, ids: Any) -> list[list[tuple[str, float]]]:
        labels = self.labels
        return [[(labels[j], float(p)) for j, p in zip(row_ids, row_p)]
                for row_ids, row_p in zip(ids.tolist(), probs.tolist())]

    def attention(self, images: Images, batch_size: int | None = None) -> torch.Tensor:
        """The adapter's attention [N, C, heads, 1 + T] (global token first) over each image's tokens."""
        adapter = self._attending()
        if adapter is None:
            raise InputError("attention needs a cross-attention adapter: ZeroShotClassifier(..., adapter=PATH_OR_OBJECT)")
        import torch

        from .adapter import tokens_of

        embedded = self._embedded(images, batch_size)
        with torch.no_grad():
            return adapter.attention(self.class_embeddings, tokens_of(embedded), embedded.embeddings)

    def heatmaps(self, images: ImageSource | Sequence[ImageSource], method: str | None = None) -> list[HeatMap]:
        """Per image, where each label is: a `HeatMap` ([C, h, w] grid and the image box it covers) drawn by
        `method` (`clipzsl.maps.METHODS`; None: the adapter's attention if there is one, else the
        model's default; a Tip adapter has no attention)."""
        from .maps import image_maps

        if method == "adapter" and self.adapter is not None and self._attending() is None:
            raise InputError("method 'adapter' draws a cross-attention adapter's attention, and a Tip adapter has "
                             "none: pick another method (the default is the model's)")
        return image_maps(self.model, [load_image(s) for s in expand_sources(images)], self.class_embeddings,
                          method, self._attending())

    def zoomed_proba(self, images: ImageSource | Sequence[ImageSource], top: int = 5, method: str | None = None,
                     batch_size: int | None = None, *, rescore: str = ZOOM_RESCORE, combine: str = ZOOM_COMBINE,
                     crop: str = ZOOM_CROP, heat_maps: Sequence[HeatMap] | None = None,
                     embedded: EmbeddedImages | None = None) -> np.ndarray:
        """Probabilities [N, C] with an attention-guided zoom, from the image's heat maps (`heatmaps(method)`,
        or `heat_maps` already drawn for these images). rescore "top": each of the image's `top` labels is
        scored again on a crop around its own peak; "all": every label is scored again on one crop, around
        the best label's peak (top=0 turns either off). crop "peak" is `maps.peak_box`, "square" the square
        around it (`maps.square_box`). combine "logit": a rescored label gets the mean of its logits on the
        whole image and on the crop, and the probabilities are taken after; "probability": it gets the mean of
        its probabilities, and the labels not rescored keep theirs (so with "top" a row sums to 1 only when
        the zoom leaves their share unchanged). The defaults, and what they gain: bench_zoom's results."""
        _check_zoom(top, rescore, combine, crop)
        pictures = [load_image(s) for s in expand_sources(images)]
        heat_maps = self._zoom_maps(pictures, top, method, heat_maps)
        if embedded is not None and len(embedded) != len(pictures):
            raise InputError(f"{len(embedded)} embedded images for {len(pictures)} images: pass the embedding of "
                             "the same images (ZeroShotClassifier.embed), or none")
        kind = self.model.probability
        logits = as_numpy(self.logits(pictures if embedded is None else embedded, batch_size))
        probs = probabilities(logits, kind)
        zoomed = (logits if combine == "logit" else probs).copy()
        if top:
            rows = [np.argsort(-row, kind="stable")[:1 if rescore == "all" else top] for row in probs]
            crops = [picture.crop(_zoom_box(heat_map, int(c), picture.size, crop))
                     for picture, heat_map, columns in zip(pictures, heat_maps, rows) for c in columns]
            on_crops = as_numpy(self.logits(crops, batch_size))
            if combine == "probability":
                on_crops = probabilities(on_crops, kind)
            self._combine(zoomed, on_crops, rows, rescore)
        return probabilities(zoomed, kind) if combine == "logit" else zoomed

    @staticmethod
    def _combine(zoomed: np.ndarray, on_crops: np.ndarray, rows: list[np.ndarray], rescore: str) -> None:
        """Average, in place, each image's rescored labels' scores with their scores on the crops (one crop
        per entry of `rows[i]`, in order): every label on an image's one crop ("all"), or each label on its own."""
        at = 0
        for i, columns in enumerate(rows):
            if rescore == "all":
                zoomed[i] = (zoomed[i] + on_crops[at]) / 2
            else:
                zoomed[i, columns] = (zoomed[i, columns] + on_crops[at + np.arange(len(columns)), columns]) / 2
            at += len(columns)

    def _zoom_maps(self, pictures: list, top: int, method: str | None,
                   heat_maps: Sequence[HeatMap] | None) -> Sequence[HeatMap]:
        """The zoom's heat maps: those given (one per picture), else drawn by `method` (none when `top` is 0)."""
        if heat_maps is None:
            return self.heatmaps(pictures, method) if top else []
        if len(heat_maps) != len(pictures):
            raise InputError(f"{len(heat_maps)} heat maps for {len(pictures)} images: pass one per image "
                             "(ZeroShotClassifier.heatmaps of the same images), or none")
        return heat_maps

    def zoomed_predict(self, images: ImageSource | Sequence[ImageSource], top_k: int = 5,
                       heat_maps: Sequence[HeatMap] | None = None,
                       embedded: EmbeddedImages | None = None) -> list[list[tuple[str, float]]]:
        """`predict` through the default zoom (`zoomed_proba`): what `classify --zoom` and the service's
        zoom give."""
        check_top_k(top_k)
        probs = self.zoomed_proba(images, heat_maps=heat_maps, embedded=embedded)
        return self._named(*ops(probs).top_k(probs, min(top_k, probs.shape[1])))

    def save(self, path: str | os.PathLike) -> Path:
        """Write the class embeddings as safetensors, with the model fingerprint and spec, the
        labels and the templates as metadata, so a later run can skip the text encoder (`load`).
        An adapter is not included; it is saved on its own."""
        metadata = {
            "format": CLASSIFIER_FORMAT,
            "fingerprint": self.model.fingerprint,
            "spec": self.model.spec,
            "labels": json.dumps([{"name": e.name, "synonyms": list(e.synonyms), "prompts": list(e.prompts)}
                                  for e in self.entries]),
            "templates": json.dumps(self.templates),
        }
        path = Path(path)
        data = safetensors_bytes({"class_embeddings": as_numpy(self.class_embeddings)}, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Backend | str | None = None, **kwargs) -> "ZeroShotClassifier":
        """A classifier written by `save`; refuses one built with another model than `model`
        (its weights, not just its name: the fingerprint). Keyword arguments go to the constructor."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such classifier file; write one with ZeroShotClassifier.save "
                                    "(clipzsl eval --save-classifier)")
        try:
            with safe_open(str(path), framework="np") as f:
                meta = f.metadata() or {}
                saved = f.get_tensor("class_embeddings") if "class_embeddings" in f.keys() else None
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise InputError(f"{path}: not a readable safetensors file ({err}); save the classifier again") from err
        if meta.get("format") != CLASSIFIER_FORMAT or saved is None:
            raise InputError(f"{path}: not a clipzsl classifier file (no {CLASSIFIER_FORMAT!r} metadata); "
                             "write one with ZeroShotClassifier.save (clipzsl eval --save-classifier)")
        model = model if isinstance(model, Backend) else load_model(model or DEFAULT_MODEL,
                                                                    cache=kwargs.get("cache", True))
        if meta["fingerprint"] != model.fingerprint:
            raise ClassifierMismatch(
                f"{path}: class embeddings were built with model {meta['spec']!r} (fingerprint "
                f"{meta['fingerprint']}), but the model in use is {model.spec!r} (fingerprint "
                f"{model.fingerprint}); use that model, or build the classifier again for this one")
        return cls(model, labels=json.loads(meta["labels"]), templates=json.loads(meta["templates"]),
                   class_embeddings=saved, **kwargs)
