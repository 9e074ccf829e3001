"""Hugging Face backend: `hf:<hub id | local directory>` (CLIPModel, SigLIP)."""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
from PIL import Image

from ..errors import InputError
from .base import Backend, normalize, state_dict_digest
from .hub import hub_error, hub_offline


class HFBackend(Backend):
    """A transformers dual encoder with its own processor, as the HF pipeline runs it."""

    def __init__(self, network: Any, processor: Any, spec: str, device: str = "cpu"):
        """`network`: a transformers CLIPModel or SiglipModel; `processor`: its AutoProcessor."""
        self.network = network.to(device).eval().requires_grad_(False)
        self.processor = processor
        self.spec = spec
        self.device = device
        config = network.config
        self.is_siglip = "siglip" in config.model_type
        self.spatial_tokens = not self.is_siglip
        self.embed_dim = int(getattr(config, "projection_dim", 0) or config.text_config.hidden_size)
        self.logit_scale = float(network.logit_scale.exp())
        self.logit_bias = float(network.logit_bias) if self.is_siglip else 0.0
        self.probability = "sigmoid" if self.is_siglip else "softmax"
        # SigLIP was trained on prompts padded to 64 tokens; the HF pipeline does the same.
        self._text_kwargs = (
            {"padding": "max_length", "max_length": 64, "truncation": True}
            if self.is_siglip
            else {"padding": True, "truncation": True}
        )
        self.fingerprint = f"hf:{config.model_type}:{state_dict_digest(self.network)}"
        self.pixel_stats = _uint8_split(processor.image_processor)

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu") -> "HFBackend":
        from transformers import AutoModel, AutoProcessor

        name = spec.split(":", 1)[1]
        local = os.path.isdir(name)
        if not local and os.path.sep in name and name.startswith((".", os.path.sep)):
            raise FileNotFoundError(f"model directory {name!r} (from {spec!r}) does not exist.")
        cache_only = local or hub_offline()
        try:
            with quiet_loading():
                network = AutoModel.from_pretrained(name, local_files_only=cache_only)
            processor = AutoProcessor.from_pretrained(name, local_files_only=cache_only)
        except OSError as err:
            if local:
                raise
            raise hub_error(spec) from err
        if not hasattr(network, "get_image_features") or not hasattr(network, "get_text_features"):
            raise InputError(f"{spec!r} is a {type(network).__name__}, not a CLIP-style dual encoder.")
        return cls(network, processor, spec, device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"][0]

    def pixels_uint8(self, image: Image.Image) -> torch.Tensor:
        """The processor's resize and crop without its rescale and normalisation: uint8 [3, H, W]."""
        if self.pixel_stats is None:
            return self.preprocess(image)
        return self.processor.image_processor(images=[image], return_tensors="pt", do_rescale=False,
                                              do_normalize=False)["pixel_values"][0]

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        inputs = self.processor.tokenizer(list(texts), return_tensors="pt", **self._text_kwargs).to(self.device)
        with self.autocast():
            return normalize(_pooled(self.network.get_text_features(**inputs)).float())

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, return_tokens: bool = False):
        pixels = pixels.to(self.device)
        if return_tokens and not self.spatial_tokens:
            raise NotImplementedError(f"spatial tokens are not projected into the joint space for {self.spec}")
        with self.autocast():
            if not return_tokens:
                return normalize(_pooled(self.network.get_image_features(pixel_values=pixels)).float())
            vision = self.network.vision_model(pixel_values=pixels)
            pooled = self.network.visual_projection(vision.pooler_output)
            patches = self.network.vision_model.post_layernorm(vision.last_hidden_state[:, 1:])
            tokens = self.network.visual_projection(patches)
        return normalize(pooled.float()), tokens.float()


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' own progress bars while a model loads, then restore them.

    transformers 5 draws a "Loading weights" bar on every load, local files included, so
    every command printed one. Where transformers has `set_tqdm_hook`, only its own bars
    are silenced and hub download bars still show; elsewhere all its bars are, for the load.
    """
    from transformers.utils import logging as hf_logging

    if hasattr(hf_logging, "set_tqdm_hook"):
        def silent(factory, args, kwargs):
            kwargs = {**kwargs, "disable": True}
            return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

        previous = hf_logging.set_tqdm_hook(silent)
        try:
            yield
        finally:
            hf_logging.set_tqdm_hook(previous)
    elif hf_logging.is_progress_bar_enabled():
        hf_logging.disable_progress_bar()
        try:
            yield
        finally:
            hf_logging.enable_progress_bar()
    else:
        yield


def _uint8_split(image_processor) -> tuple[tuple, tuple] | None:
    """(mean, std) when the processor rescales by 1/255 and normalises last, and without those two
    steps hands back uint8 (checked on a small image): then its workers can send uint8 and the
    device normalise. None otherwise (its float output is sent as is)."""
    if not (getattr(image_processor, "do_rescale", False) and getattr(image_processor, "do_normalize", False)
            and abs(image_processor.rescale_factor - 1 / 255) < 1e-12):
        return None
    probe = Image.new("RGB", (16, 12), (10, 200, 30))
    out = image_processor(images=[probe], return_tensors="pt", do_rescale=False, do_normalize=False)["pixel_values"]
    if out.dtype != torch.uint8:
        return None
    return tuple(image_processor.image_mean), tuple(image_processor.image_std)


def _pooled(output) -> torch.Tensor:
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def write_clip_tokenizer(directory: str | os.PathLike) -> None:
    """Write a Hugging Face CLIPTokenizer (vocab.json + merges.txt) from open_clip's BPE vocabulary.

    open_clip's wheel ships CLIP's byte-pair vocabulary, so HF CLIP models can be
    built and run without the hub (random weights for tests and speed benchmarks).
    """
    import json

    from open_clip.tokenizer import SimpleTokenizer

    bpe = SimpleTokenizer()
    renamed = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {renamed.get(token, token): index for token, index in bpe.encoder.items()}
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(vocab, f, ensure_ascii=False)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))


def save_random_clip(directory: str | os.PathLike, seed: int = 0, **config) -> str:
    """Save a random-init CLIPModel with its processor; `config` overrides ViT-B/32's sizes.

    Returns the directory, ready for ``load_model("hf:<directory>")`` or a
    transformers pipeline.
    """
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    text = {k[5:]: v for k, v in config.items() if k.startswith("text_")}
    vision = {k[7:]: v for k, v in config.items() if k.startswith("vision_")}
    rest = {k: v for k, v in config.items() if not k.startswith(("text_", "vision_"))}
    torch.manual_seed(seed)
    network = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, **rest)).eval()
    network.save_pretrained(directory)
    write_clip_tokenizer(directory)
    tokenizer = CLIPTokenizer(os.path.join(directory, "vocab.json"), os.path.join(directory, "merges.txt"))
    size = network.config.vision_config.image_size
    image_processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(directory)
    return str(directory)
