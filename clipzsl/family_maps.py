"""Heat maps for the image towers that give no patch tokens in the joint space: attention-pooled ones
(ResNet CLIP's AttentionPool2d, SigLIP's attention-pooling "MAP" head, in transformers and in open_clip's
timm ViTs) and average-pooled convolutional trunks (MobileCLIP's timm FastViT).

Each such tower reduces a last spatial feature map to the pooled embedding in one module, its pool
(`Tower.pool`); the methods read that map as the pool's input. Each method is (model, pixels [N, 3, H, W],
class embeddings [C, D]) -> scores [N, C, T] over the map's T positions (row-major), with a predicate
saying which models it applies to:

- `maskclip_pooled` / `is_attention_pooled`: MaskCLIP's value path (Zhou, Loy and Dai, "Extract Free Dense
  Labels from CLIP", ECCV 2022; its MaskClipHead for ResNets: c_proj(v_proj(x)) at every position, no
  positional embedding, then the cosine to each label). For an attention-pooling head the same path is each
  position's value through the pool's output projection and whatever follows it up to the embedding (the
  head's residual MLP, the projection): the pooled embedding the model would give if its query attended
  to that position alone.
- `gradcam_spatial` / `has_feature_map`: Grad-CAM (Selvaraju et al., ICCV 2017): channel weights are the
  spatial mean of the gradient of the label's cosine with respect to the map; the map is the ReLU of the
  weighted sum of the channels.
- `gscorecam` / `has_conv_feature_map`: gScoreCAM (Chen, Li, Nguyen et al., "gScoreCAM: What objects is
  CLIP looking at?", ACCV 2022): Score-CAM restricted to the k channels with the largest mean gradient;
  each channel, upsampled to the input and scaled to [0, 1], masks the image, the masked image's logit for
  the label scores the channel, and the softmax of those scores weighs the channels. As in the authors' code
  (anguyen8/gScoreCAM), channels rank by their signed mean gradient and the score is the model's logit; unlike
  it, only the k scored channels enter the softmax (it gives the others a score of 0), and k defaults to 100,
  not 300.

Positional embeddings stay out of the value path (as in MaskCLIP); none of these methods changes the model.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .backends import Backend
from .errors import InputError

#: channels gScoreCAM scores per label (the paper's default is 300 of RN50's 2048; fewer is faster)
GSCORECAM_CHANNELS = 100


@dataclass(frozen=True)
class Tower:
    """Where an image tower's last spatial feature map is. `pool`: the module that takes it; `embed`: pixels ->
    the pooled image embedding (not normalised); `conv`: the map is [N, K, h, w] (else tokens [N, prefix + T, K],
    the first `prefix` not spatial); `values`: the value path of an attention pool, [N, T, K] -> [N, T, D]."""

    pool: nn.Module
    embed: Callable[[torch.Tensor], torch.Tensor]
    conv: bool
    prefix: int = 0
    values: Callable[[torch.Tensor], torch.Tensor] | None = None


def tower(model: Backend) -> Tower | None:
    """The `Tower` of an open_clip or transformers model of a family these methods cover, else None."""
    network = getattr(model, "network", None)
    if hasattr(network, "visual"):
        return _openclip_tower(network)
    vision: Any = getattr(network, "vision_model", None)
    head: Any = getattr(vision, "head", None)
    if vision is None or not hasattr(head, "probe"):
        return None
    return Tower(head, lambda pixels: vision(pixel_values=pixels).pooler_output, conv=False,
                 values=lambda x: _residual_mlp(head.layernorm, head.mlp, head.attention.out_proj(_mha_values(head.attention, x))))


def _openclip_tower(network: Any) -> Tower | None:
    """A ResNet's AttentionPool2d, a timm ViT's attention pool (SigLIP), or a timm conv trunk's global pool."""
    visual = network.visual
    attnpool: Any = getattr(visual, "attnpool", None)
    if hasattr(attnpool, "v_proj"):
        return Tower(attnpool, network.encode_image, conv=True, values=lambda x: attnpool.c_proj(attnpool.v_proj(x)))
    trunk: Any = getattr(visual, "trunk", None)
    latent: Any = getattr(trunk, "attn_pool", None)
    if hasattr(latent, "kv"):
        prefix = int(getattr(trunk, "num_prefix_tokens", 0)) if getattr(trunk, "pool_include_prefix", True) else 0
        return Tower(latent, network.encode_image, conv=False, prefix=prefix,
                     values=lambda x: _timm_tail(visual, _latent_values(latent, x)))
    pool = getattr(getattr(trunk, "head", None), "global_pool", getattr(trunk, "global_pool", None))
    if isinstance(pool, nn.Module) and getattr(trunk, "default_cfg", {}).get("pool_size"):
        return Tower(pool, network.encode_image, conv=True)  # a conv trunk (a ViT's pool is a string or token-wise)
    return None


def _mha_values(attention: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """torch MultiheadAttention's value projection of `x` [N, T, E] (before its output projection)."""
    e = attention.embed_dim
    weight = attention.in_proj_weight[2 * e:] if attention.in_proj_weight is not None else attention.v_proj_weight
    bias = attention.in_proj_bias[2 * e:] if attention.in_proj_bias is not None else None
    return F.linear(x, weight, bias)


def _residual_mlp(norm: nn.Module, mlp: nn.Module | None, x: torch.Tensor) -> torch.Tensor:
    """x + mlp(norm(x)), the end of an attention-pooling head (x alone without an MLP)."""
    return x if mlp is None else x + mlp(norm(x))


def _latent_values(pool: Any, x: torch.Tensor) -> torch.Tensor:
    """timm AttentionPoolLatent's value path: its kv layer's value half, its output projection, its residual MLP."""
    dim = pool.proj.in_features
    bias = pool.kv.bias[dim:] if pool.kv.bias is not None else None
    return _residual_mlp(pool.norm, pool.mlp, pool.proj(F.linear(x, pool.kv.weight[dim:], bias)))


def _timm_tail(visual: Any, x: torch.Tensor) -> torch.Tensor:
    """What open_clip's timm tower applies after the trunk's pool: the trunk's fc_norm and head, its own head."""
    trunk = visual.trunk
    for layer in (getattr(trunk, "fc_norm", None), getattr(trunk, "head", None), visual.head):
        x = x if layer is None else layer(x)
    return x


def is_attention_pooled(model: Backend) -> bool:
    """Whether `maskclip_pooled` applies: a ResNet's or SigLIP's attention pool."""
    found = tower(model)
    return found is not None and found.values is not None


def has_feature_map(model: Backend) -> bool:
    """Whether `gradcam_spatial` applies: a tower of these families (attention-pooled or a conv trunk)."""
    return tower(model) is not None


def has_conv_feature_map(model: Backend) -> bool:
    """Whether `gscorecam` applies: a tower whose last feature map has channels to mask with (ResNet, MobileCLIP)."""
    found = tower(model)
    return found is not None and found.conv


def _tower_of(model: Backend, conv: bool = False) -> Tower:
    found = tower(model)
    if found is None or (conv and not found.conv):
        raise InputError(f"{model.spec} has no {'convolutional ' if conv else ''}feature map these heat maps read")
    return found


@contextlib.contextmanager
def _pool_inputs(pool: nn.Module) -> Iterator[list[torch.Tensor]]:
    """While open, every input `pool` gets is replaced by a leaf copy (requiring grad where grad is on) and
    appended to the yielded list: the last spatial feature map, from which gradients can be taken."""
    seen: list[torch.Tensor] = []

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        x = args[0].detach().requires_grad_(torch.is_grad_enabled())
        seen.append(x)
        return (x, *args[1:]), kwargs

    handle = pool.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def _forward(found: Tower, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(pooled embeddings [N, D], the pool's input as the model ran it)."""
    with _pool_inputs(found.pool) as seen:
        pooled = found.embed(pixels)
    return pooled, seen[-1]


def spatial(found: Tower, x: torch.Tensor) -> torch.Tensor:
    """A pool input (or its gradient) as [N, T, K]: a conv map's positions row-major, tokens without the prefix."""
    return x.flatten(2).transpose(1, 2) if found.conv else x[:, found.prefix:]


def _cosines(values: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """[..., D] embeddings, [C, D] labels -> [..., C] cosines."""
    return F.normalize(values.float(), dim=-1) @ class_embeddings.float().T


def maskclip_pooled(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """MaskCLIP's value path through an attention pool: [N, C, T], each position's cosine to each label."""
    found = _tower_of(model)
    if found.values is None:
        raise InputError(f"{model.spec}'s image tower does not pool by attention")
    with torch.no_grad():
        _, x = _forward(found, pixels)
        return _cosines(found.values(spatial(found, x)), class_embeddings).transpose(1, 2)


def activations_and_gradients(found: Tower, pixels: torch.Tensor,
                              class_embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the pool's input A, as the model gives it; [C, *A.shape], the gradient of each label's cosine to the
    pooled embedding with respect to A). Runs with grad on, inference mode or not."""
    with torch.inference_mode(False), torch.enable_grad():
        pooled, x = _forward(found, pixels.clone())
        cosines = _cosines(pooled, class_embeddings.clone())  # [N, C]
        count = cosines.shape[1]
        grads = [torch.autograd.grad(cosines[:, c].sum(), x, retain_graph=c < count - 1)[0] for c in range(count)]
    return x.detach(), torch.stack(grads)


def gradcam_spatial(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the last spatial feature map: [N, C, T], ReLU(sum_k mean_t(dcos_c/dA_k) A_k)."""
    found = _tower_of(model)
    acts, grads = activations_and_gradients(found, pixels, class_embeddings)
    weights = torch.stack([spatial(found, g) for g in grads]).mean(2)  # [C, N, K]
    return F.relu(torch.einsum("cnk,ntk->nct", weights, spatial(found, acts).float()))


def gscorecam(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor,
              channels: int = GSCORECAM_CHANNELS) -> torch.Tensor:
    """gScoreCAM on a conv tower's last feature map: [N, C, T]. The masked images of the channels that some
    label ranks in its top `channels` are embedded once and scored for every label."""
    found = _tower_of(model, conv=True)
    acts, grads = activations_and_gradients(found, pixels, class_embeddings)  # [N, K, h, w], [C, N, K, h, w]
    top = grads.mean((3, 4)).topk(min(channels, acts.shape[1]), dim=-1).indices  # [C, N, k]
    maps = []
    for n in range(acts.shape[0]):
        chosen = top[:, n].unique()  # sorted
        logits = _masked_logits(model, found, pixels[n], _unit_masks(acts[n, chosen], pixels.shape[-2:]),
                                class_embeddings)  # [U, C]
        weights = logits.T.gather(1, torch.searchsorted(chosen, top[:, n])).softmax(-1)  # [C, k]
        maps.append(F.relu(torch.einsum("ck,ckt->ct", weights, acts[n].flatten(1)[top[:, n]].float())))
    return torch.stack(maps)


def _unit_masks(maps: torch.Tensor, size: torch.Size) -> torch.Tensor:
    """[U, h, w] channel maps -> [U, H, W]: bilinearly upsampled (corners aligned) and each scaled to [0, 1]."""
    up = F.interpolate(maps[None].float(), size=tuple(size), mode="bilinear", align_corners=True)[0]
    lo, hi = up.amin((1, 2), keepdim=True), up.amax((1, 2), keepdim=True)
    return (up - lo) / (hi - lo + 1e-6)


def _masked_logits(model: Backend, found: Tower, image: torch.Tensor, masks: torch.Tensor,
                   class_embeddings: torch.Tensor) -> torch.Tensor:
    """The model's logits (scale * cosine + bias) of `image` [3, H, W] under each mask [U, H, W]: [U, C]."""
    out = []
    with torch.no_grad():
        for start in range(0, len(masks), model.batch_size):
            batch = image[None] * masks[start:start + model.batch_size, None]
            out.append(_cosines(found.embed(batch), class_embeddings))
    return torch.cat(out) * model.logit_scale + model.logit_bias
