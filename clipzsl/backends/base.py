"""The one interface every vision-language backend implements.

A backend owns its weights, its image preprocessing and its tokenizer. Everything
downstream (classifier, store, adapter) sees only normalised tensors in a shared
embedding space, so swapping open_clip for transformers or the packaged model
changes nothing else.

torch is imported only where a torch model is met: a model run on onnxruntime (`onnx:DIR`) gives
numpy arrays, and a process serving it needs no torch installed.
"""
from __future__ import annotations

import abc
import contextlib
import hashlib
import importlib.util
import os
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Sequence, Union

import numpy as np
from PIL import Image

from ..errors import InputError

if TYPE_CHECKING:
    import torch

#: file-name prefix of the packaged model's cached concept embeddings in the cache directory; here,
#: not in packaged.py, so that `clipzsl cache` finds them without importing timm and transformers
CONCEPTS_PREFIX = "conse-imagenet-minilm-"

#: precision name -> the name of the torch dtype autocast computes in ("fp32": no autocast)
PRECISIONS = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
#: images per forward pass when the user names none: an accelerator needs large batches to be kept
#: busy, two CPU cores gain nothing past a few dozen (and hold less in memory)
DEFAULT_BATCH_SIZE = {"cpu": 32, "mps": 64, "cuda": 256}

#: a `cache=` argument, one meaning everywhere: True for the default cache folder, a folder, or False for none
CacheArg = Union[bool, str, os.PathLike]


def cache_dir_of(cache: CacheArg) -> str | os.PathLike | None:
    """The folder a `cache=` other than False names, as `store.cache_root` takes it (None: the default)."""
    return None if isinstance(cache, bool) else cache


def has_torch() -> bool:
    """Whether torch can be imported, found without importing it (so a torch-free process stays so)."""
    try:
        return importlib.util.find_spec("torch") is not None
    except (ImportError, ValueError):  # an import hook that refuses it, or a half-removed install
        return False


def device_kind(device: str) -> str:
    """"cuda:1" -> "cuda": the kind of a device name, without asking torch."""
    return device.partition(":")[0]


def resolve_device(device: str = "auto") -> str:
    """"auto" -> cuda, then mps, then cpu; a named device is checked to exist (one clear error, not a
    CUDA stack trace from deep inside the first forward pass). Without torch installed only the CPU is."""
    if not has_torch():
        if device in ("auto", "cpu"):
            return "cpu"
        raise InputError(f"device {device!r}: torch is not installed, so only the CPU is used (models run on "
                         "onnxruntime); use --device cpu, or install torch")
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    try:
        kind = torch.device(device).type
    except RuntimeError as err:
        raise InputError(f"unknown device {device!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if kind == "cuda":
        _check_cuda(device)
    if kind == "mps" and not _mps_available():
        raise InputError(f"device {device!r}: MPS is not available here; use --device cpu (or auto)")
    if kind not in ("cpu", "cuda", "mps"):
        raise InputError(f"device {device!r} is not supported: use auto, cpu, cuda, cuda:N or mps")
    return device


def _mps_available() -> bool:
    import torch

    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def _check_cuda(device: str) -> None:
    """A CUDA device that this torch sees, else an InputError saying which ones there are."""
    import torch

    if not torch.cuda.is_available():
        raise InputError(f"device {device!r}: this torch sees no CUDA GPU; use --device cpu (or auto)")
    if (torch.device(device).index or 0) >= torch.cuda.device_count():
        raise InputError(f"device {device!r}: only {torch.cuda.device_count()} CUDA GPU(s) here; use cuda:0 .. "
                         f"cuda:{torch.cuda.device_count() - 1}")


def resolve_precision(precision: str, device: str) -> str:
    """"auto" -> bf16 on a CUDA GPU that supports it (fp16 on one that does not), fp32 elsewhere.

    fp32 stays the CPU default: bf16 there agrees to cosine >= 0.999 but is not faster on CPUs
    without bf16 instructions (benchmarks/results/gpu.md). fp16 is refused on the CPU, where
    autocast runs it slowly and with no benefit."""
    kind = device_kind(device)
    if precision == "auto":
        if kind == "cuda":
            import torch

            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision not in PRECISIONS:
        raise InputError(f"unknown precision {precision!r}: use auto, fp32, bf16 or fp16")
    if precision == "fp16" and kind == "cpu":
        raise InputError("precision fp16 needs a GPU (cuda or mps); on the CPU use bf16 or fp32")
    return precision


def default_batch_size(device: str) -> int:
    return DEFAULT_BATCH_SIZE.get(device_kind(device), 32)


def default_workers(device: str) -> int:
    """Decoding threads: on the CPU the model needs the cores too, so at most 4; an accelerator is
    fed by every core."""
    cores = os.cpu_count() or 1
    return min(4, cores) if device_kind(device) == "cpu" else cores


def split_preprocess(transform: Callable) -> tuple[Callable, tuple, tuple] | None:
    """A torchvision Compose ending in ToTensor + Normalize as (geometric part, mean, std).

    The geometric part (resize, crop: PIL in, PIL out) runs on CPU workers and yields uint8; the
    float conversion and normalisation, the same arithmetic as ToTensor + Normalize, run on the
    device (`Backend.normalize_pixels`), so a batch travels as uint8, a quarter of float32's bytes.
    None for any other preprocessing."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-2], T.ToTensor) or not isinstance(steps[-1], T.Normalize):
        return None
    return T.Compose(steps[:-2]), tuple(steps[-1].mean), tuple(steps[-1].std)


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
    #: turns one PIL image (RGB) into a [3, H, W] float tensor (a numpy array for a model run on onnxruntime)
    preprocess: Callable[[Image.Image], Any]
    #: how many prompts one forward pass of the text tower takes
    text_batch_size: int = 256
    #: where the weights live ("cpu", "cuda", "cuda:1", "mps"); inputs are moved there
    device: str = "cpu"
    #: "fp32", or the autocast dtype ("bf16", "fp16") the forward passes run in. The weights stay
    #: fp32 whatever it is, so the fingerprint (and every cache keyed on it) does not change with it
    precision: str = "fp32"
    #: images per forward pass and decoding threads (`clipzsl.images.embed_images`), by default per device
    batch_size: int = 32
    workers: int = 4
    #: (mean, std) of the normalisation `normalize_pixels` applies to a uint8 batch; None when the
    #: backend's preprocessing cannot be split, and its workers hand over float pixels
    pixel_stats: tuple[Sequence[float], Sequence[float]] | None = None
    #: whether the towers are torch modules (heat maps, adapters and training need them); an onnx: model's are not
    needs_torch: bool = True
    #: whether `encode_images(return_tokens=True)` gives spatial tokens in the joint space (adapters and the
    #: cosine heat map need them)
    spatial_tokens: bool = True

    @abc.abstractmethod
    def encode_images(self, pixels: Any, return_tokens: bool = False) -> Any:
        """Embed a preprocessed batch [N, 3, H, W] (a torch tensor; numpy arrays for onnxruntime).

        Returns L2-normalised pooled embeddings [N, D]; with `return_tokens`, also
        the spatial tokens [N, T, D] projected into the same space (unnormalised),
        which an adapter attends over and which give patch-to-text similarity maps.
        """

    @abc.abstractmethod
    def encode_texts(self, texts: Sequence[str]) -> Any:
        """Embed one batch of texts into L2-normalised [len(texts), D] (a torch tensor; numpy for onnxruntime)."""

    def autocast(self) -> ContextManager:
        """The forward passes' precision: autocast to bf16/fp16 (weights stay fp32), none for fp32."""
        if self.precision == "fp32":
            return contextlib.nullcontext()
        import torch

        return torch.autocast(device_kind(self.device), dtype=getattr(torch, PRECISIONS[self.precision]))

    def pixels_uint8(self, image: Image.Image) -> Any:
        """What a CPU worker makes of one RGB image: `preprocess` without its final ToTensor +
        Normalize, as uint8 [3, H, W] (float `preprocess` output if it cannot be split)."""
        transform = self.preprocess
        if hasattr(transform, "transform_for"):  # a per-image view (the packaged default)
            transform = transform.transform_for(image)
        split = split_preprocess(transform) if self.pixel_stats is not None else None
        if split is None:
            return transform(image)
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(split[0](image))

    def normalize_pixels(self, pixels: Any) -> Any:
        """A batch from `pixels_uint8` moved to the device, then converted and normalised there
        exactly as ToTensor + Normalize do (float batches are only moved; numpy ones, for onnxruntime,
        stay as they are). Pinned memory makes the copy asynchronous on CUDA."""
        if isinstance(pixels, np.ndarray):
            return pixels
        import torch

        pixels = pixels.to(self.device, non_blocking=True)
        if pixels.dtype != torch.uint8:
            return pixels
        assert self.pixel_stats is not None  # uint8 pixels come only from a preprocessing split with its stats
        mean, std = (torch.tensor(v, dtype=torch.float32, device=pixels.device)[:, None, None]
                     for v in self.pixel_stats)
        return pixels.float().div_(255).sub_(mean).div_(std)

    def from_numpy(self, array: np.ndarray) -> Any:
        """`array` in the kind of array this model's towers give: a torch tensor sharing its memory (an
        onnx: model keeps the numpy array)."""
        import torch

        return torch.from_numpy(array)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(spec={self.spec!r}, embed_dim={self.embed_dim}, device={self.device!r}, "
                f"precision={self.precision!r})")


def normalize(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (kept here so every backend agrees on eps)."""
    import torch.nn.functional as F

    return F.normalize(x, dim=-1)


def state_dict_digest(module: torch.nn.Module, length: int = 16) -> str:
    """Hash of every parameter and buffer: the weights' identity, whatever their origin.

    Tags and paths can point at different bytes (random init, a retrained file), so
    cache keys hash the tensors themselves.
    """
    import torch

    digest = hashlib.blake2b(digest_size=length)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
