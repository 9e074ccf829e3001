"""The scoring head: embedded images and class embeddings -> logits -> probabilities.

The formula `logit_scale * image_embeddings @ class_embeddings.T + logit_bias` lives here
once (`cosine_logits`), and so does the softmax/sigmoid switch (`probabilities`). A head is
any callable `(images, class_embeddings, logit_scale, logit_bias) -> logits [N, C]`: the
zero-shot head below, or a trained `CrossAttentionAdapter.head`. `top_k` ranks labels through
any head without ever holding the [N, C] matrix of a large vocabulary. The zero-shot head, `probabilities`
and `top_k` take torch tensors or numpy arrays (an `onnx:` model's, `clipzsl.arrays`) and answer in kind.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from .arrays import ops
from .errors import InputError
from .images import EmbeddedImages
from .search import check_top_k

if TYPE_CHECKING:
    import torch

#: labels scored at once by `top_k` (rows of class embeddings)
LABEL_CHUNK = 16_384
#: images scored at once by `top_k`
IMAGE_CHUNK = 1_024
KINDS = ("softmax", "sigmoid")


class Head(Protocol):
    """What `top_k` and the classifier score through."""

    def __call__(self, images: EmbeddedImages, class_embeddings: torch.Tensor, logit_scale: float,
                 logit_bias: float = 0.0) -> torch.Tensor: ...


def cosine_logits(image_embeddings: torch.Tensor, class_embeddings: torch.Tensor, logit_scale: float,
                  logit_bias: float = 0.0) -> torch.Tensor:
    """Logits [N, C] of L2-normalised image embeddings [N, D] against class embeddings [C, D]."""
    return logit_scale * image_embeddings @ class_embeddings.T + logit_bias


def zero_shot_head(images: EmbeddedImages, class_embeddings: torch.Tensor, logit_scale: float,
                   logit_bias: float = 0.0) -> torch.Tensor:
    """The plain dual-encoder head: cosine of the pooled embeddings, scaled and shifted."""
    return cosine_logits(images.embeddings, class_embeddings, logit_scale, logit_bias)


def calibrated_stacking(logits: torch.Tensor, seen_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Calibrated stacking (Chao et al. 2016): gamma subtracted from the seen-class columns of logits [N, C]."""
    return logits - gamma * seen_mask.to(logits.dtype)[None]


def probabilities(logits: Any, kind: str) -> Any:
    """Softmax over the classes (CLIP) or a sigmoid per class (SigLIP), as the model was trained."""
    if kind == "sigmoid":
        return ops(logits).sigmoid(logits)
    if kind == "softmax":
        return ops(logits).softmax(logits)
    raise InputError(f"unknown probability kind {kind!r}; expected one of {KINDS}")


def top_k(
    head: Head,
    images: EmbeddedImages,
    class_embeddings: Any,
    logit_scale: float,
    logit_bias: float,
    kind: str,
    k: int,
    image_chunk: int = IMAGE_CHUNK,
    label_chunk: int = LABEL_CHUNK,
) -> tuple[Any, Any]:
    """(probabilities, class ids), each [N, min(k, C)], best first, exact.

    Labels are scored in chunks: each chunk's best k are merged into a running top k and its
    log-sum-exp kept for the softmax normaliser, so memory is bounded by
    image_chunk x label_chunk whatever the vocabulary size. The probabilities equal those of
    the full softmax (or sigmoid) over every label.
    """
    check_top_k(k)
    if kind not in KINDS:
        raise InputError(f"unknown probability kind {kind!r}; expected one of {KINDS}")
    if not len(class_embeddings):
        raise InputError("top_k needs at least one class embedding")
    k = min(k, class_embeddings.shape[0])
    xp = ops(class_embeddings)
    all_probs, all_ids = [], []
    for start in range(0, len(images), image_chunk):
        part = images.subset(range(start, min(start + image_chunk, len(images))))
        best, ids, normalisers = _chunked_top_k(head, part, class_embeddings, (logit_scale, logit_bias), k,
                                                label_chunk)
        if kind == "sigmoid":
            all_probs.append(xp.sigmoid(best))
        else:
            all_probs.append(xp.exp(best - xp.logsumexp(xp.stack(normalisers, 1))[:, None]))
        all_ids.append(ids)
    if not all_probs:
        return xp.from_numpy(np.empty((0, k), np.float32)), xp.from_numpy(np.empty((0, k), np.int64))
    return xp.cat(all_probs), xp.cat(all_ids)


def _chunked_top_k(head: Head, images: EmbeddedImages, class_embeddings: Any, scale_bias: tuple[float, float],
                   k: int, label_chunk: int) -> tuple[Any, Any, list[Any]]:
    """The best k logits of `images` and their columns, label chunk by label chunk, and each chunk's
    log-sum-exp."""
    xp = ops(class_embeddings)
    best: Any = None
    ids: Any = None
    normalisers = []
    for first in range(0, class_embeddings.shape[0], label_chunk):
        logits = head(images, class_embeddings[first:first + label_chunk], *scale_bias)
        normalisers.append(xp.logsumexp(logits))
        values, columns = xp.top_k(logits, min(k, logits.shape[1]))
        if best is not None:
            values, columns = xp.cat([best, values], 1), xp.cat([ids, columns + first], 1)
            values, order = xp.top_k(values, k)
            columns = xp.take(columns, order)
        best, ids = values, columns
    return best, ids, normalisers
