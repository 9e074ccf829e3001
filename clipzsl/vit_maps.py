"""Training-free heat maps for ViT CLIP image towers: open_clip's VisionTransformer and transformers' CLIP.

CLIP's last block mixes every patch token with the image-wide tokens its query-key attention favours,
so the raw patch-to-text map is noisy and often lights up the background. Each method here reads the
tokens differently, with the model's own weights and no training:

- `maskclip` (Zhou et al., "Extract Free Dense Labels from CLIP", ECCV 2022): the last block's value
  path only, out_proj(v_proj(ln_1(x))), no query-key attention, no residual, no FFN;
- `surgery` (Li et al., "CLIP Surgery", 2023): a second path through the last six blocks that adds
  each block's value-value attention output (no FFN), then the "feature surgery" similarity that
  takes away what every label shares;
- `sclip` (Wang et al., "SCLIP", 2023): the last block with correlative self-attention,
  softmax(q q^T) + softmax(k k^T), residual and FFN kept;
- `clearclip` (Lan et al., "ClearCLIP", ECCV 2024): the last block's q-q attention alone, no residual,
  no FFN;
- `gradcam` (Selvaraju et al., 2017): Grad-CAM on the tokens entering the last block, for the gradient
  of each label's cosine score.

Each takes (model, pixels [N, 3, H, W], class embeddings [C, D]) and gives [N, C, T] scores over the
T patch tokens (`clipzsl.maps` lays them on the grid). The blocks before the ones a method changes run
as the model runs them: their output is caught by a hook on the next block's input (`block_input`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F

from .backends import Backend
from .errors import InputError

#: attention weights [N, H, L, L] from per-head (q, k, v) [N, H, L, d]; None: each token keeps its own value
Weights = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], "torch.Tensor | None"]
#: blocks that CLIP Surgery's second path runs through (its code: the last 6 of ViT-B)
SURGERY_DEPTH = 6


@dataclass(frozen=True)
class Block:
    """One pre-norm transformer block, read from its weights: x + scale(out(attention(norm(x)))), then
    + ffn(that). `module` is the model's own block (its input is caught there)."""

    module: torch.nn.Module
    norm: Callable[[torch.Tensor], torch.Tensor]
    qkv: Callable[[torch.Tensor], Sequence[torch.Tensor]]
    out: Callable[[torch.Tensor], torch.Tensor]
    scale: Callable[[torch.Tensor], torch.Tensor]
    ffn: Callable[[torch.Tensor], torch.Tensor]
    heads: int


@dataclass(frozen=True)
class Tower:
    """A ViT image tower: its blocks, the model's forward on pixels (`run`), and `head`: width-space
    tokens [..., W] into the joint space [..., D] (the final norm, then the projection)."""

    blocks: list[Block]
    run: Callable[[torch.Tensor], Any]
    head: Callable[[torch.Tensor], torch.Tensor]


def _openclip_tower(visual: Any) -> Tower:
    def block(b: Any) -> Block:
        attn = b.attn
        return Block(b, b.ln_1, lambda h: F.linear(h, attn.in_proj_weight, attn.in_proj_bias).chunk(3, dim=-1),
                     attn.out_proj, b.ls_1, lambda x: b.ls_2(b.mlp(b.ln_2(x))), attn.num_heads)

    proj = visual.proj
    return Tower([block(b) for b in visual.transformer.resblocks], visual,
                 lambda x: visual.ln_post(x) if proj is None else visual.ln_post(x) @ proj)


def _hf_tower(network: Any) -> Tower:
    vision = network.vision_model

    def block(layer: Any) -> Block:
        attn = layer.self_attn
        return Block(layer, layer.layer_norm1, lambda h: (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)),
                     attn.out_proj, lambda x: x, lambda x: layer.mlp(layer.layer_norm2(x)), attn.num_heads)

    return Tower([block(layer) for layer in vision.encoder.layers], lambda pixels: vision(pixel_values=pixels),
                 lambda x: network.visual_projection(vision.post_layernorm(x)))


def _openclip_vit(model: Backend) -> bool:
    """open_clip's plain VisionTransformer: batch-first standard blocks, a class token, no attention pooling."""
    visual = getattr(getattr(model, "network", None), "visual", None)
    if not type(visual).__module__.startswith("open_clip."):
        return False
    from open_clip.transformer import ResidualAttentionBlock, VisionTransformer

    return (isinstance(visual, VisionTransformer) and getattr(visual, "attn_pool", None) is None
            and getattr(visual, "pool_type", "tok") in ("tok", "avg")
            and getattr(visual.transformer, "batch_first", True)
            and all(type(b) is ResidualAttentionBlock for b in visual.transformer.resblocks))


def _hf_clip(model: Backend) -> bool:
    """A transformers CLIP-style tower (not SigLIP): encoder layers with q/k/v projections, a projection head."""
    network = getattr(model, "network", None)
    vision = getattr(network, "vision_model", None)
    layers = getattr(getattr(vision, "encoder", None), "layers", None)
    return (not getattr(model, "is_siglip", True) and layers is not None and hasattr(network, "visual_projection")
            and hasattr(vision, "post_layernorm") and all(hasattr(layer.self_attn, "q_proj") for layer in layers))


def applies(model: Backend) -> bool:
    """Whether the methods here draw `model`'s maps: an open_clip ViT without attention pooling, or an HF CLIP."""
    return _openclip_vit(model) or _hf_clip(model)


def tower_of(model: Backend) -> Tower:
    """The `Tower` of a model the methods apply to; an InputError for any other."""
    if _openclip_vit(model):
        return _openclip_tower(model.network.visual)  # type: ignore[attr-defined]
    if _hf_clip(model):
        return _hf_tower(model.network)  # type: ignore[attr-defined]
    raise InputError(f"{model.spec} has no plain ViT CLIP image tower (open_clip ViT or HF CLIP)")


class _Caught(Exception):
    """Stops the model's forward once the wanted block's input is caught."""


def block_input(tower: Tower, pixels: torch.Tensor, index: int) -> torch.Tensor:
    """The tokens [N, L, W] (class token first) entering block `index`, as the model's own forward makes
    them; the forward stops there."""
    caught: list[torch.Tensor] = []

    def catch(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        caught.append(args[0] if args else kwargs["hidden_states"])
        raise _Caught

    handle = tower.blocks[index].module.register_forward_pre_hook(catch, with_kwargs=True)
    try:
        tower.run(pixels)
    except _Caught:
        pass
    finally:
        handle.remove()
    return caught[0]


def _split(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[N, L, W] -> [N, heads, L, W / heads]."""
    n, length, width = x.shape
    return x.reshape(n, length, heads, width // heads).transpose(1, 2)


def attention_output(block: Block, x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """The block's attention branch on x [N, L, W] with attention `weights` in place of its own:
    scale(out(weights @ v)), before any residual."""
    q, k, v = (_split(t, block.heads) for t in block.qkv(block.norm(x)))
    attn = weights(q, k, v)
    mixed = v if attn is None else attn @ v
    n, _, length, _ = mixed.shape
    return block.scale(block.out(mixed.transpose(1, 2).reshape(n, length, -1)))


def through_block(block: Block, x: torch.Tensor, weights: Weights) -> torch.Tensor:
    """The whole block, residuals and FFN included, with attention `weights`."""
    x = x + attention_output(block, x, weights)
    return x + block.ffn(x)


def _softmax(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.softmax(a @ b.transpose(-2, -1) * a.shape[-1] ** -0.5, dim=-1)


def standard(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The model's own attention: softmax(q k^T / sqrt(d))."""
    return _softmax(q, k)


def own_value(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """MaskCLIP: no mixing, each token keeps its own value."""
    return None


def value_value(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery: softmax(v v^T / sqrt(d))."""
    return _softmax(v, v)


def correlative(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SCLIP: softmax(q q^T / sqrt(d)) + softmax(k k^T / sqrt(d))."""
    return _softmax(q, q) + _softmax(k, k)


def query_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """ClearCLIP: softmax(q q^T / sqrt(d))."""
    return _softmax(q, q)


def patch_cosines(tower: Tower, tokens: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Width-space tokens [N, L, W] (class token first) -> each patch token's cosine to each label [N, C, T]
    (in the precision of the caller's autocast, if any)."""
    patches = F.normalize(tower.head(tokens[:, 1:]).float(), dim=-1)
    return torch.einsum("ntd,cd->nct", patches, class_embeddings.float())


def _last_block(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor, weights: Weights,
                residual: bool) -> torch.Tensor:
    """[N, C, T] cosines of the last block's tokens with attention `weights`: the whole block (`residual`),
    or its attention branch alone."""
    tower = tower_of(model)
    with torch.no_grad():
        with model.autocast():
            x = block_input(tower, pixels, -1)
            block = tower.blocks[-1]
            tokens = through_block(block, x, weights) if residual else attention_output(block, x, weights)
        return patch_cosines(tower, tokens.float(), class_embeddings)


def maskclip(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """MaskCLIP: the last block's value path, out_proj(v), with no attention, residual or FFN."""
    return _last_block(model, pixels, class_embeddings, own_value, residual=False)


def clearclip(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """ClearCLIP: the last block's q-q attention output alone (no residual, no FFN)."""
    return _last_block(model, pixels, class_embeddings, query_query, residual=False)


def sclip(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """SCLIP: the last block with correlative self-attention (q-q + k-k), its residuals and FFN kept."""
    return _last_block(model, pixels, class_embeddings, correlative, residual=True)


def surgery_tokens(tower: Tower, pixels: torch.Tensor, depth: int = SURGERY_DEPTH) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP Surgery's two paths through the last `depth` blocks: (surgery tokens, original tokens), both
    [N, L, W]. The second path starts from the first such block's input and adds, block by block, the
    value-value attention output of the original path's tokens, without FFN; its class token is the original's."""
    start = max(0, len(tower.blocks) - depth)
    original = block_input(tower, pixels, start)
    path = original
    for block in tower.blocks[start:]:
        path = path + attention_output(block, original, value_value)
        original = through_block(block, original, standard)
    return torch.cat([original[:, :1], path[:, 1:]], dim=1), original


def feature_surgery(cosines: torch.Tensor, global_cosines: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery's similarity: cosines [N, C, T] weighted per label by w = p / mean(p), p the softmax over
    labels of 2 x the global cosines [N, C], less their mean over labels (what every label shares). One label
    has nothing to compare with: its cosines are returned as they are."""
    if cosines.shape[1] < 2:
        return cosines
    prob = torch.softmax(2 * global_cosines, dim=-1)
    weighted = cosines * (prob / prob.mean(-1, keepdim=True))[..., None]
    return weighted - weighted.mean(1, keepdim=True)


def surgery(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """CLIP Surgery: the value-value path's patch cosines after feature surgery."""
    tower = tower_of(model)
    with torch.no_grad():
        with model.autocast():
            tokens = surgery_tokens(tower, pixels)[0].float()
        cosines = patch_cosines(tower, tokens, class_embeddings)
        global_cosines = F.normalize(tower.head(tokens[:, 0]).float(), dim=-1) @ class_embeddings.float().T
    return feature_surgery(cosines, global_cosines)


def gradcam(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Grad-CAM on the tokens A [N, L, W] entering the last block: per label, ReLU(sum_w alpha_w A_tw) over the
    patch tokens, alpha_w the mean over patches of the gradient of the label's cosine to the image's class
    token (after the last block, the final norm and the projection) with respect to A."""
    tower = tower_of(model)
    with torch.inference_mode(False), torch.enable_grad(), model.autocast():
        with torch.no_grad():
            activations = block_input(tower, pixels.clone(), -1).clone()
        activations.requires_grad_(True)
        pooled = tower.head(through_block(tower.blocks[-1], activations, standard)[:, 0])
        scores = F.normalize(pooled.float(), dim=-1) @ class_embeddings.float().clone().T  # [N, C]
        maps = [_cam(activations, torch.autograd.grad(scores[:, c].sum(), activations, retain_graph=True)[0])
                for c in range(scores.shape[1])]
    return torch.stack(maps, dim=1).float()


def _cam(activations: torch.Tensor, gradients: torch.Tensor) -> torch.Tensor:
    """[N, L, W] activations and gradients -> [N, T] Grad-CAM over the patch tokens (class token left out)."""
    patches, grads = activations[:, 1:].detach().float(), gradients[:, 1:].float()
    return torch.relu(torch.einsum("ntw,nw->nt", patches, grads.mean(1)))


#: the methods by name (`clipzsl.maps.METHODS` registers them with `applies`)
METHODS: dict[str, Callable[[Backend, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "maskclip": maskclip, "surgery": surgery, "sclip": sclip, "clearclip": clearclip, "gradcam": gradcam}
