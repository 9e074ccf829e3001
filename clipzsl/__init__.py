"""clipzsl: zero-shot image classification over CLIP-style dual encoders.

The public API, everything a user needs; the modules behind it are layered (see the
`[tool.importlinter]` contracts in pyproject.toml): images -> model -> embeddings -> head -> scores.
"""
import logging

from .adapter import AdapterError, AdapterMismatch, CrossAttentionAdapter
from .backends import DEFAULT_MODEL, Backend, available_models, load_model
from .backends.hub import ModelUnavailable
from .classifier import ZeroShotClassifier
from .errors import ClipzslError, InputError, MissingExtra
from .image_index import ImageIndex
from .images import EmbeddedImages, ImageLoadError, embed_images, load_image
from .prompts import ClassEntry, PromptFileError, load_labels, load_prompts, load_templates
from .store import StoreError
from .text_encoding import class_embeddings, encode_prompts
from .training import TrainConfig, fit_adapter, train_adapter, train_adapter_from_folder

__version__ = "0.1.0"

# operational notices go to logging.getLogger("clipzsl"); silent until the application configures logging
logging.getLogger(__name__).addHandler(logging.NullHandler())

__all__ = [
    "AdapterError",
    "AdapterMismatch",
    "Backend",
    "ClassEntry",
    "ClipzslError",
    "CrossAttentionAdapter",
    "DEFAULT_MODEL",
    "EmbeddedImages",
    "ImageIndex",
    "ImageLoadError",
    "InputError",
    "MissingExtra",
    "ModelUnavailable",
    "PromptFileError",
    "StoreError",
    "TrainConfig",
    "ZeroShotClassifier",
    "__version__",
    "available_models",
    "class_embeddings",
    "embed_images",
    "encode_prompts",
    "fit_adapter",
    "load_image",
    "load_labels",
    "load_model",
    "load_prompts",
    "load_templates",
    "train_adapter",
    "train_adapter_from_folder",
]
