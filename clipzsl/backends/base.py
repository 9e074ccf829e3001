"""The one interface every vision-language backend implements.

A backend owns its weights, its image preprocessing and its tokenizer. Everything
downstream (classifier, store, adapter) sees only normalised tensors in a shared
embedding space, so swapping open_clip for transformers or the packaged model
changes nothing else.
"""
from __future__ import annotations

import abc
import hashlib
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image

#: file-name prefix of the packaged model's cached concept embeddings in the cache directory; here,
#: not in packaged.py, so that `clipzsl cache` finds them without importing timm and transformers
CONCEPTS_PREFIX = "conse-imagenet-minilm-"


class Backend(abc.ABC):
    """A frozen dual encoder: images and texts into one L2-normalised space."""

    #: the spec string that `load_model` was given, e.g. "openclip:ViT-B-32/random"
    spec: str
    #: size of the joint embedding space
    embed_dim: int
    #: stable identity of architecture + weights; the cache key of every embedding
    fingerprint: str
    #: multiplier applied to cosine similarities before the softmax (CLIP's exp(logit_scale))
    logit_scale: float
    #: added to the scaled similarities (SigLIP); 0 for CLIP-style models
    logit_bias: float = 0.0
    #: how logits become probabilities: "softmax" over classes (CLIP) or "sigmoid" per class (SigLIP)
    probability: str = "softmax"
    #: turns one PIL image (RGB) into a [3, H, W] float tensor
    preprocess: Callable[[Image.Image], torch.Tensor]
    #: how many prompts one forward pass of the text tower takes
    text_batch_size: int = 256

    @abc.abstractmethod
    def encode_images(
        self, pixels: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Embed a preprocessed batch [N, 3, H, W].

        Returns L2-normalised pooled embeddings [N, D]; with `return_tokens`, also
        the spatial tokens [N, T, D] projected into the same space (unnormalised),
        which an adapter attends over and which give patch-to-text similarity maps.
        """

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Embed one batch of texts into L2-normalised [len(texts), D]."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(spec={self.spec!r}, embed_dim={self.embed_dim})"


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (kept here so every backend agrees on eps)."""
    return F.normalize(x, dim=-1)


def state_dict_digest(module: torch.nn.Module, length: int = 16) -> str:
    """Hash of every parameter and buffer: the weights' identity, whatever their origin.

    Tags and paths can point at different bytes (random init, a retrained file), so
    cache keys hash the tensors themselves.
    """
    digest = hashlib.blake2b(digest_size=length)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
