"""Label set -> class embeddings, through nothing but the Backend interface.

A class embedding is the mean of the L2-normalised embeddings of all its prompts
(every template x every name and synonym, plus free-text prompts), renormalised,
as CLIP does. Identical prompts are encoded once, and prompts are batched by
length so a batch is padded only as far as its longest member.

This module sits below the backends (the packaged model builds its concept
embeddings with it), so it names `Backend` only for type checking.
"""
from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from .arrays import as_numpy, ops
from .prompts import ClassEntry, load_labels, load_templates
from .store import EmbeddingStore, digest

if TYPE_CHECKING:
    from .backends.base import Backend


def encode_prompts(model: Backend, prompts: Sequence[str], progress: bool | None = None) -> Any:
    """L2-normalised embeddings [len(prompts), D] of possibly repeated prompts, each encoded once:
    float32 on the CPU, whatever the model's device and precision (label stores and heads take them there)."""
    unique = list(dict.fromkeys(prompts))
    order = sorted(range(len(unique)), key=lambda i: len(unique[i]))
    by_length = [unique[i] for i in order]
    size = model.text_batch_size
    disable = (len(unique) <= 4 * size) if progress is None else not progress
    chunks = [
        model.encode_texts(by_length[start : start + size])
        for start in tqdm(range(0, len(by_length), size), desc="prompts", unit="batch", disable=disable)
    ]
    encoded = np.empty((len(unique), chunks[0].shape[1]), np.float32)
    encoded[order] = np.concatenate([as_numpy(chunk) for chunk in chunks])
    row = {prompt: i for i, prompt in enumerate(unique)}
    return ops(chunks[0]).from_numpy(encoded[[row[p] for p in prompts]])


#: the shipped vocabulary and templates text-like queries are drawn from (`vocabulary_queries`): every
#: index of a model is tuned and checked on the same texts, with and without a template around the name
QUERY_LABELS, QUERY_TEMPLATES = "imagenet1k", ("bare", "simple_7")
#: disjoint parts the vocabulary's prompts are dealt into: part 0 tunes an index, part 1 checks it afresh
QUERY_PARTS = 2


def vocabulary_queries(model: Backend, count: int, part: int = 0) -> np.ndarray:
    """`count` text-like queries [count, D] (float32, L2-normalised) from `model`'s text tower: prompts
    of the shipped vocabulary (`QUERY_LABELS` names in `QUERY_TEMPLATES`), a fixed shuffle of all of them
    dealt into `QUERY_PARTS` disjoint parts, the first `count` of `part`. Nothing is cached on disk."""
    templates = [t for spec in QUERY_TEMPLATES for t in load_templates(spec)]
    prompts = [text for entry in load_labels(QUERY_LABELS) for text in ClassEntry(entry.name).texts(templates)]
    order = np.random.default_rng(0).permutation(len(prompts))[part::QUERY_PARTS][:count]
    return as_numpy(encode_prompts(model, [prompts[i] for i in order.tolist()], progress=False))


def class_embeddings(
    model: Backend,
    entries: Sequence[ClassEntry],
    templates: Sequence[str],
    progress: bool | None = None,
) -> Any:
    """Prompt-ensembled, renormalised class embeddings [C, D] (rows in `entries` order), float32 on the CPU
    in the model's kind of array."""
    texts = [entry.texts(templates) for entry in entries]
    encoded = encode_prompts(model, [t for group in texts for t in group], progress)
    flat = as_numpy(encoded)
    counts = np.array([len(group) for group in texts])
    assert counts.min(initial=1) > 0, "every class entry has a text (`ClassEntry.texts`)"
    means = np.add.reduceat(flat, np.cumsum(counts) - counts, axis=0) / counts[:, None].astype(np.float32) \
        if len(entries) else flat[:0]
    return ops(encoded).from_numpy(means / np.linalg.norm(means, axis=-1, keepdims=True))


def class_key(entry: ClassEntry, templates_digest: str) -> str:
    """Cache key of one class embedding: the template set's content hash and the class entry."""
    return digest(json.dumps([templates_digest, entry.name, entry.synonyms, entry.prompts]))


def cached_class_embeddings(
    model: Backend,
    entries: Sequence[ClassEntry],
    templates: Sequence[str],
    store: EmbeddingStore,
    progress: bool | None = None,
) -> Any:
    """`class_embeddings`, encoding only the classes the store does not hold yet."""
    templates_digest = digest(json.dumps(list(templates)))
    keys = [class_key(entry, templates_digest) for entry in entries]
    by_key = dict(zip(keys, entries))

    def compute(todo: list[str]) -> np.ndarray:
        return as_numpy(class_embeddings(model, [by_key[k] for k in todo], templates, progress))

    return model.from_numpy(store.get_or_compute(keys, compute, best_effort=True))
