"""open_clip backend: `openclip:<arch>/<pretrained tag | checkpoint path | random>`."""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import torch

from ..errors import InputError
from .base import Backend, normalize, split_preprocess, state_dict_digest
from .hub import hub_error, hub_offline, offline_for_this_load, root_logs_held


class OpenClipBackend(Backend):
    """Wraps an open_clip model; text batches are trimmed to their longest prompt.

    open_clip pads every prompt to the full context (77 tokens). With a causal
    attention mask and end-of-text pooling, the tokens after the end-of-text never
    influence the pooled feature, so cutting each batch at its longest prompt gives
    the same embedding for a fraction of the compute.
    """

    def __init__(self, network: Any, preprocess: Callable, tokenizer: Callable, spec: str, device: str = "cpu"):
        """`network`: an open_clip model (untyped: its towers' attributes vary by architecture)."""
        self.network = network.to(device).eval().requires_grad_(False)
        self.preprocess = preprocess
        split = split_preprocess(preprocess)
        self.pixel_stats = split[1:] if split else None
        self.tokenizer = tokenizer
        self.spec = spec
        self.device = device
        visual = network.visual  # a plain ViT tower gives its patch tokens; attention-pooled ones (ResNet, CoCa) do not
        self.spatial_tokens = hasattr(visual, "output_tokens") and getattr(visual, "attn_pool", None) is None
        self.logit_scale = float(network.logit_scale.exp())
        bias = getattr(network, "logit_bias", None)
        self.logit_bias = float(bias) if bias is not None else 0.0
        self.probability = "sigmoid" if bias is not None else "softmax"
        arch = spec.split(":", 1)[-1].split("/", 1)[0]
        self.fingerprint = f"openclip:{arch}:{state_dict_digest(self.network)}"
        self._text_tower = network.text if hasattr(network, "text") else network
        self.embed_dim = int(self.encode_texts(["a"]).shape[-1])

    @classmethod
    def from_spec(cls, spec: str, device: str = "cpu") -> "OpenClipBackend":
        import open_clip

        body = spec.split(":", 1)[1]
        arch, _, weights = body.partition("/")
        if arch not in open_clip.list_models():
            raise InputError(
                f"Unknown open_clip architecture {arch!r} in {spec!r}; "
                f"see `open_clip.list_models()` (e.g. ViT-B-32)."
            )
        pretrained = _pretrained(arch, weights, spec)
        offline = pretrained is not None and not os.path.exists(pretrained) and hub_offline()
        try:
            with offline_for_this_load(offline), root_logs_held(open_clip):
                network, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=pretrained,
                                                                               device=device)
        except Exception as err:  # a failed download surfaces as many exception types
            if pretrained is None or os.path.exists(pretrained):
                raise
            raise hub_error(spec) from err
        return cls(network, preprocess, open_clip.get_tokenizer(arch), spec, device)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        tokens = self.tokenizer(list(texts)).to(self.device)
        with self.autocast():
            if not _trimmable(self._text_tower):
                return normalize(self.network.encode_text(tokens).float())
            length = int((tokens != 0).sum(dim=1).max())
            return normalize(_encode_trimmed(self._text_tower, tokens[:, :length]).float())

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor, return_tokens: bool = False):
        pixels = pixels.to(self.device)
        with self.autocast():
            if not return_tokens:
                return normalize(self.network.encode_image(pixels).float())
            pooled, tokens = self._image_tokens(pixels)
        return normalize(pooled.float()), tokens.float()

    def _image_tokens(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        visual = self.network.visual
        if not self.spatial_tokens:
            raise NotImplementedError(f"spatial tokens need a plain ViT image tower; {self.spec} has none")
        visual.output_tokens = True
        try:
            pooled, tokens = visual(pixels)
        finally:
            visual.output_tokens = False
        if visual.final_ln_after_pool:
            tokens = visual.ln_post(tokens)
        if visual.proj is not None:
            tokens = tokens @ visual.proj
        return pooled, tokens


def _pretrained(arch: str, weights: str, spec: str) -> str | None:
    """What open_clip's `pretrained=` gets for the part of `spec` after the architecture: None for random
    weights, a checkpoint file, or a pretrained tag open_clip knows for `arch`."""
    import open_clip

    if weights in ("", "random"):
        return None
    if os.path.sep in weights or os.path.exists(weights):
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"open_clip checkpoint {weights!r} (from {spec!r}) does not exist.")
        return weights
    tags = [t for a, t in open_clip.list_pretrained() if a == arch]
    if weights not in tags:
        raise InputError(
            f"open_clip has no pretrained weights {weights!r} for {arch}; known: {', '.join(tags) or 'none'}. "
            f"Use 'random' or a local checkpoint path."
        )
    return weights


def _trimmable(tower: Any) -> bool:
    """True when padding after the end-of-text token cannot change the pooled feature."""
    return (
        getattr(tower, "attn_mask", None) is not None
        and getattr(tower, "cls_emb", None) is None
        and not getattr(tower, "use_pad_mask", False)
        and getattr(tower, "text_pool_type", getattr(tower, "pool_type", None)) in ("argmax", "eos")
    )


def _encode_trimmed(tower: Any, tokens: torch.Tensor) -> torch.Tensor:
    """open_clip's text forward on a sequence shorter than the context length."""
    length = tokens.shape[1]
    cast_dtype = tower.transformer.get_cast_dtype()
    x = tower.token_embedding(tokens).to(cast_dtype)
    x = x + tower.positional_embedding[:length].to(cast_dtype)
    x = tower.transformer(x, attn_mask=tower.attn_mask[:length, :length])
    x = tower.ln_final(x)
    pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
    if pool_type == "argmax":
        pooled = x[torch.arange(x.shape[0]), tokens.argmax(dim=-1)]
    else:
        eos_id: Any = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))  # an int token id
        pooled = x[torch.arange(x.shape[0]), (tokens == eos_id).int().argmax(dim=-1)]
    projection = tower.text_projection
    if projection is None:
        return pooled
    return projection(pooled) if isinstance(projection, torch.nn.Linear) else pooled @ projection
