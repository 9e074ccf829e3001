"""clipzsl: zero-shot image classification over CLIP-style dual encoders.

The public API, everything a user needs; the modules behind it are layered (see the
`[tool.importlinter]` contracts in pyproject.toml): images -> model -> embeddings -> head -> scores.
"""
from .adapter import AdapterError, AdapterMismatch, CrossAttentionAdapter
from .backends import DEFAULT_MODEL, Backend, available_models, load_model
from .classifier import ZeroShotClassifier
from .image_index import ImageIndex
from .images import EmbeddedImages, ImageLoadError, embed_images, load_image
from .prompts import ClassEntry, PromptFileError, load_labels, load_templates
from .store import StoreError
from .text_encoding import class_embeddings, encode_prompts
from .training import TrainConfig, train_adapter

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterMismatch",
    "Backend",
    "ClassEntry",
    "CrossAttentionAdapter",
    "DEFAULT_MODEL",
    "EmbeddedImages",
    "ImageIndex",
    "ImageLoadError",
    "PromptFileError",
    "StoreError",
    "TrainConfig",
    "ZeroShotClassifier",
    "__version__",
    "available_models",
    "class_embeddings",
    "embed_images",
    "encode_prompts",
    "load_image",
    "load_labels",
    "load_model",
    "load_templates",
    "train_adapter",
]
