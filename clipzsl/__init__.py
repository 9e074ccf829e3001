"""clipzsl: zero-shot image classification over CLIP-style dual encoders.

The public API, everything a user needs; the modules behind it are layered (see the
`[tool.importlinter]` contracts in pyproject.toml): images -> model -> embeddings -> head -> scores.
"""
import importlib
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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

#: module -> the public names it gives; each is imported on first use (PEP 562), so that `import clipzsl`
#: costs nothing and a process that uses only torch-free parts (an `onnx:` model's service) never imports torch
_EXPORTS = {
    "adapter": ("AdapterError", "AdapterMismatch", "CrossAttentionAdapter"),
    "backends": ("DEFAULT_MODEL", "Backend", "available_models", "load_model"),
    "backends.hub": ("ModelUnavailable",),
    "classifier": ("ZeroShotClassifier",),
    "errors": ("ClipzslError", "InputError", "MissingExtra"),
    "image_index": ("ImageIndex",),
    "images": ("EmbeddedImages", "ImageLoadError", "embed_images", "load_image"),
    "prompts": ("ClassEntry", "PromptFileError", "load_labels", "load_prompts", "load_templates"),
    "store": ("StoreError",),
    "text_encoding": ("class_embeddings", "encode_prompts"),
    "training": ("TrainConfig", "fit_adapter", "train_adapter", "train_adapter_from_folder"),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}


def __getattr__(name: str) -> Any:
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_MODULE_OF[name]}", __name__), name)
    globals()[name] = value  # the next lookup is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_MODULE_OF))


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
