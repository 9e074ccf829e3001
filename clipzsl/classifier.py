"""Prompt-ensembled zero-shot classification: label set -> class embeddings -> scores.

A class embedding is the mean of the L2-normalised embeddings of all its prompts
(every template x every name and synonym, plus free-text prompts), renormalised,
as CLIP does. Identical prompts are encoded once, and prompts are batched by
length so a batch is padded only as far as its longest member.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .backends import Backend, load_model
from .images import EmbeddedImages, ImageSource, embed_images
from .prompts import DEFAULT_TEMPLATES, ClassEntry, LabelsArg, TemplatesArg, load_labels, load_templates
from .search import build_index, check_top_k, search
from .store import EmbeddingStore, StoreError, digest

#: rows of labels scored at once when normalising over a large vocabulary
LABEL_CHUNK = 16_384

#: the "format" metadata entry of a classifier file written by `ZeroShotClassifier.save`
CLASSIFIER_FORMAT = "clipzsl-zero-shot-classifier"


class ClassifierMismatch(ValueError):
    """A saved classifier whose class embeddings were built with another model."""


def encode_prompts(backend: Backend, prompts: Sequence[str], progress: bool | None = None) -> torch.Tensor:
    """L2-normalised embeddings [len(prompts), D] of possibly repeated prompts, each encoded once."""
    unique = list(dict.fromkeys(prompts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    by_length = [unique[i] for i in order]
    size = backend.text_batch_size
    disable = (len(unique) <= 4 * size) if progress is None else not progress
    chunks = [
        backend.encode_texts(by_length[start : start + size])
        for start in tqdm(range(0, len(by_length), size), desc="prompts", unit="batch", disable=disable)
    ]
    encoded = torch.empty(len(unique), chunks[0].shape[1], dtype=chunks[0].dtype)
    encoded[torch.tensor(order)] = torch.cat(chunks)
    row = {prompt: i for i, prompt in enumerate(unique)}
    return encoded[torch.tensor([row[p] for p in prompts])]


def class_embeddings(
    backend: Backend,
    entries: Sequence[ClassEntry],
    templates: Sequence[str],
    progress: bool | None = None,
) -> torch.Tensor:
    """Prompt-ensembled, renormalised class embeddings [C, D] (rows in `entries` order)."""
    texts = [entry.texts(templates) for entry in entries]
    flat = encode_prompts(backend, [t for group in texts for t in group], progress)
    counts = torch.tensor([len(group) for group in texts])
    owner = torch.repeat_interleave(torch.arange(len(entries)), counts)
    sums = torch.zeros(len(entries), flat.shape[1], dtype=flat.dtype).index_add_(0, owner, flat)
    means = sums / counts[:, None].to(flat.dtype)
    return means / means.norm(dim=-1, keepdim=True)


def class_key(entry: ClassEntry, templates_digest: str) -> str:
    """Cache key of one class embedding: the template set's content hash and the class entry."""
    return digest(json.dumps([templates_digest, entry.name, entry.synonyms, entry.prompts]))


def cached_class_embeddings(
    backend: Backend,
    entries: Sequence[ClassEntry],
    templates: Sequence[str],
    store: EmbeddingStore,
    progress: bool | None = None,
) -> torch.Tensor:
    """`class_embeddings`, encoding only the classes the store does not hold yet."""
    templates_digest = digest(json.dumps(list(templates)))
    keys = [class_key(entry, templates_digest) for entry in entries]
    by_key = dict(zip(keys, entries))

    def compute(todo: list[str]) -> np.ndarray:
        return class_embeddings(backend, [by_key[k] for k in todo], templates, progress).numpy()

    return torch.from_numpy(store.get_or_compute(keys, compute, best_effort=True))


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
        cache: bool | str | os.PathLike = True,
        index: str = "auto",
        progress: bool | None = None,
        adapter=None,
        weights: torch.Tensor | None = None,
    ):
        """`cache`: True for the default cache directory, a directory, or False for none.
        `index`: FAISS factory string for top-k search over the labels ("auto", "Flat", "HNSW32").
        `adapter`: a `clipzsl.adapter.CrossAttentionAdapter` or the directory it was saved to; its
        scores are added to the zero-shot ones (it must have been trained on this backbone).
        `weights`: class embeddings [len(labels), D] already built from these labels and templates
        with this model (what `load` passes); no text is encoded then."""
        # labels and templates before the model: a bad file fails at once, not after a model load
        self.entries = load_labels(labels)
        self.templates = load_templates(templates)
        self.model = load_model(model) if isinstance(model, str) else model or load_model()
        if len(self.entries) == 1 and self.model.probability == "softmax":
            raise ValueError(
                f"one label ({self.entries[0].name!r}) with {self.model.spec}, whose softmax over the labels "
                "would always give it 100%; give at least two labels (e.g. add 'something else'), or use a "
                "sigmoid model (SigLIP), which scores each label on its own."
            )
        store = None
        if weights is not None:
            expected = (len(self.entries), self.model.embed_dim)
            if tuple(weights.shape) != expected:
                raise ValueError(f"weights have shape {tuple(weights.shape)}, but {len(self.entries)} labels "
                                 f"and model {self.model.spec!r} need {expected}")
            self.weights = weights.float()
        elif cache:  # best effort: an unusable cache costs time, never the classification
            try:
                store = EmbeddingStore.for_labels(self.model, None if cache is True else cache)
                self.weights = cached_class_embeddings(self.model, self.entries, self.templates, store, progress)
            except (StoreError, OSError) as err:
                warnings.warn(f"label cache not used ({err}); `clipzsl cache clear` resets it")
                store = None
        if weights is None and store is None:
            self.weights = class_embeddings(self.model, self.entries, self.templates, progress)
        self.index_spec = index
        self._index = None
        self.adapter = None
        if adapter is not None:
            from .adapter import resolve_adapter

            self.adapter = resolve_adapter(adapter, self.model)

    @property
    def labels(self) -> list[str]:
        """Class names, in score-column order."""
        return [entry.name for entry in self.entries]

    def embed(self, images: ImageSource | Sequence[ImageSource], **kwargs) -> EmbeddedImages:
        """Image embeddings; keyword arguments go to `clipzsl.images.embed_images`."""
        return embed_images(self.model, images, **kwargs)

    def logits_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Logits [N, C] for already-embedded images: rank by these, since far-down
        probabilities underflow to equal zeros."""
        return self.model.logit_scale * embeddings @ self.weights.T + self.model.logit_bias

    def scores_from_embeddings(self, embeddings: torch.Tensor) -> np.ndarray:
        """Probabilities [N, C] for already-embedded images."""
        logits = self.logits_from_embeddings(embeddings)
        if self.model.probability == "sigmoid":
            return torch.sigmoid(logits).numpy()
        return torch.softmax(logits, dim=-1).numpy()

    def scores(self, images: ImageSource | Sequence[ImageSource], batch_size: int = 32) -> np.ndarray:
        """Probabilities [N, C]; images are paths, PIL images or folders (walked recursively)."""
        if self.adapter is not None:
            return self.scores_from_features(self.features(images, batch_size=batch_size))
        return self.scores_from_embeddings(self.embed(images, batch_size=batch_size).embeddings)

    def features(self, images, batch_size: int = 32, cache: bool = False):
        """Pooled embeddings and spatial tokens (`clipzsl.adapter.Features`) of the images."""
        from .adapter import extract_features

        return extract_features(self.model, images, batch_size=batch_size, cache=cache)

    def scores_from_features(self, features) -> np.ndarray:
        """Probabilities [N, C] from `features(...)`, through the adapter when there is one."""
        if self.adapter is None:
            return self.scores_from_embeddings(features.pooled)
        logits = self.adapter.logits(self.weights, features, self.model.logit_scale, self.model.logit_bias)
        if getattr(self.model, "probability", "softmax") == "sigmoid":
            return torch.sigmoid(logits).numpy()
        return torch.softmax(logits, dim=-1).numpy()

    def attention(self, images, batch_size: int = 32) -> torch.Tensor:
        """The adapter's attention [N, C, heads, 1 + T] (global token first) over each image's tokens."""
        if self.adapter is None:
            raise ValueError("attention needs an adapter: ZeroShotClassifier(..., adapter=PATH_OR_OBJECT)")
        feats = self.features(images, batch_size=batch_size)
        with torch.no_grad():
            return self.adapter.attention(self.weights, feats.tokens, feats.pooled)

    def save(self, path: str | os.PathLike) -> Path:
        """Write the class embeddings as safetensors, with the model fingerprint and spec, the
        labels and the templates as metadata, so a later run can skip the text encoder (`load`).
        An adapter is not included; it is saved on its own."""
        from safetensors.torch import save

        from .store import atomic_write

        metadata = {
            "format": CLASSIFIER_FORMAT,
            "fingerprint": self.model.fingerprint,
            "spec": self.model.spec,
            "labels": json.dumps([{"name": e.name, "synonyms": list(e.synonyms), "prompts": list(e.prompts)}
                                  for e in self.entries]),
            "templates": json.dumps(self.templates),
        }
        path = Path(path)
        data = save({"class_embeddings": self.weights.contiguous()}, metadata=metadata)
        atomic_write(path, lambda f: f.write(data))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, model: Backend | str | None = None, **kwargs) -> "ZeroShotClassifier":
        """A classifier written by `save`; refuses one built with another model than `model`
        (its weights, not just its name: the fingerprint). Keyword arguments go to the constructor."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such classifier file; write one with ZeroShotClassifier.save "
                                    "(clipzsl eval --save-classifier)")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                weights = f.get_tensor("class_embeddings") if "class_embeddings" in f.keys() else None
        except Exception as err:  # safetensors raises its own error type for a damaged file
            raise ValueError(f"{path}: not a readable safetensors file ({err}); save the classifier again") from err
        if meta.get("format") != CLASSIFIER_FORMAT or weights is None:
            raise ValueError(f"{path}: not a clipzsl classifier file (no {CLASSIFIER_FORMAT!r} metadata); "
                             "write one with ZeroShotClassifier.save (clipzsl eval --save-classifier)")
        backend = load_model(model) if isinstance(model, str) else model or load_model()
        if meta["fingerprint"] != backend.fingerprint:
            raise ClassifierMismatch(
                f"{path}: class embeddings were built with model {meta['spec']!r} (fingerprint "
                f"{meta['fingerprint']}), but the model in use is {backend.spec!r} (fingerprint "
                f"{backend.fingerprint}); use that model, or build the classifier again for this one")
        return cls(backend, labels=json.loads(meta["labels"]), templates=json.loads(meta["templates"]),
                   weights=weights, **kwargs)

    @property
    def index(self):
        """FAISS index over the class embeddings, built on first use."""
        if self._index is None:
            self._index = build_index(self.weights.numpy(), self.index_spec)
        return self._index

    def top_k_from_embeddings(self, embeddings: torch.Tensor, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """(label, probability) pairs per image, best first, without an [N, C] score matrix.

        The index finds the best labels; the softmax normaliser is accumulated over
        label chunks, so memory stays bounded for vocabularies of 100k labels.
        """
        similarities, ids = search(self.index, embeddings.numpy(), top_k)
        logits = self.model.logit_scale * torch.from_numpy(similarities) + self.model.logit_bias
        if self.model.probability == "sigmoid":
            probabilities = torch.sigmoid(logits)
        else:
            probabilities = torch.exp(logits - self._log_normaliser(embeddings)[:, None])
        labels = self.labels
        return [
            [(labels[j], float(p)) for j, p in zip(row_ids, row_p) if j >= 0]
            for row_ids, row_p in zip(ids.tolist(), probabilities.tolist())
        ]

    def _log_normaliser(self, embeddings: torch.Tensor) -> torch.Tensor:
        parts = [
            torch.logsumexp(self.model.logit_scale * embeddings @ chunk.T + self.model.logit_bias, dim=1)
            for chunk in self.weights.split(LABEL_CHUNK)
        ]
        return torch.logsumexp(torch.stack(parts, dim=1), dim=1)

    def predict(
        self, images: ImageSource | Sequence[ImageSource], top_k: int = 5, batch_size: int = 32
    ) -> list[list[tuple[str, float]]]:
        """Per image: the `top_k` (label, probability) pairs, best first."""
        check_top_k(top_k)  # before the images are embedded, not after
        if self.adapter is not None:
            return self.top_k_from_features(self.features(images, batch_size=batch_size), top_k)
        return self.top_k_from_embeddings(self.embed(images, batch_size=batch_size).embeddings, top_k)

    def top_k_from_features(self, features, top_k: int = 5) -> list[list[tuple[str, float]]]:
        """Per image of `features(...)`: the `top_k` (label, probability) pairs, through the adapter if any."""
        check_top_k(top_k)
        probs = torch.from_numpy(self.scores_from_features(features))
        p, ids = probs.topk(min(top_k, probs.shape[1]), dim=1)
        return [[(self.labels[j], float(q)) for j, q in zip(r_ids, r_p)]
                for r_ids, r_p in zip(ids.tolist(), p.tolist())]
