"""The scoring head: embedded images and class embeddings -> logits -> probabilities.

The formula `logit_scale * image_embeddings @ class_embeddings.T + logit_bias` lives here
once (`cosine_logits`), and so does the softmax/sigmoid switch (`probabilities`). A head is
any callable `(images, class_embeddings, logit_scale, logit_bias) -> logits [N, C]`: the
zero-shot head below, or a trained `CrossAttentionAdapter.head`. `top_k` ranks labels through
any head without ever holding the [N, C] matrix of a large vocabulary.
"""
from __future__ import annotations

from typing import Protocol

import torch

from .errors import InputError
from .images import EmbeddedImages
from .search import check_top_k

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


def probabilities(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """Softmax over the classes (CLIP) or a sigmoid per class (SigLIP), as the model was trained."""
    if kind == "sigmoid":
        return torch.sigmoid(logits)
    if kind == "softmax":
        return torch.softmax(logits, dim=-1)
    raise InputError(f"unknown probability kind {kind!r}; expected one of {KINDS}")


def top_k(
    head: Head,
    images: EmbeddedImages,
    class_embeddings: torch.Tensor,
    logit_scale: float,
    logit_bias: float,
    kind: str,
    k: int,
    image_chunk: int = IMAGE_CHUNK,
    label_chunk: int = LABEL_CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
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
    all_probs, all_ids = [], []
    for start in range(0, len(images), image_chunk):
        part = images.subset(torch.arange(start, min(start + image_chunk, len(images))))
        best: torch.Tensor | None = None
        ids: torch.Tensor | None = None
        normalisers = []
        for first in range(0, class_embeddings.shape[0], label_chunk):
            logits = head(part, class_embeddings[first:first + label_chunk], logit_scale, logit_bias)
            normalisers.append(torch.logsumexp(logits, dim=1))
            values, columns = logits.topk(min(k, logits.shape[1]), dim=1)
            if best is not None and ids is not None:
                values, columns = torch.cat([best, values], 1), torch.cat([ids, columns + first], 1)
                values, order = values.topk(k, dim=1)
                columns = columns.gather(1, order)
            best, ids = values, columns
        assert best is not None and ids is not None  # class_embeddings is not empty: one chunk at least
        if kind == "sigmoid":
            all_probs.append(torch.sigmoid(best))
        else:
            all_probs.append(torch.exp(best - torch.logsumexp(torch.stack(normalisers, 1), 1)[:, None]))
        all_ids.append(ids)
    if not all_probs:
        return torch.empty(0, k), torch.empty(0, k, dtype=torch.long)
    return torch.cat(all_probs), torch.cat(all_ids)
