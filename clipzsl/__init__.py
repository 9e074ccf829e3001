"""clipzsl: zero-shot image classification over CLIP-style dual encoders."""
from .adapter import AdapterError, AdapterMismatch, CrossAttentionAdapter, Features, extract_features, train_adapter
from .backends import DEFAULT_MODEL, Backend, available_models, load_model
from .classifier import ZeroShotClassifier, class_embeddings, encode_prompts
from .images import ImageLoadError, embed_images, load_image
from .prompts import ClassEntry, PromptFileError, load_labels, load_templates

__version__ = "0.1.0"

__all__ = [
    "AdapterError",
    "AdapterMismatch",
    "CrossAttentionAdapter",
    "Features",
    "extract_features",
    "train_adapter",
    "DEFAULT_MODEL",
    "Backend",
    "ClassEntry",
    "ImageLoadError",
    "PromptFileError",
    "ZeroShotClassifier",
    "available_models",
    "class_embeddings",
    "embed_images",
    "encode_prompts",
    "load_image",
    "load_labels",
    "load_model",
    "load_templates",
]
