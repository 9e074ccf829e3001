"""ViT CLIP heat-map methods (`clipzsl.vit_maps`): each against a re-computation from its paper's definition,
open_clip and transformers agreeing on the same weights, the hook point proven by the model's own tokens."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl import maps, vit_maps
from clipzsl.cli import main
from clipzsl.errors import InputError

NAMES = ["maskclip", "surgery", "sclip", "clearclip", "gradcam"]


@pytest.fixture(scope="module")
def hf_clip(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def openclip_copy(hf):
    """An open_clip CLIP whose image tower holds the HF model's vision weights (same sizes, QuickGELU)."""
    import open_clip
    from open_clip.model import CLIP

    from clipzsl.backends.openclip import OpenClipBackend

    config = hf.network.config.vision_config
    network = CLIP(hf.embed_dim, dict(image_size=config.image_size, patch_size=config.patch_size, layers=2,
                                      width=config.hidden_size, head_width=config.hidden_size // 4, mlp_ratio=2.0),
                   dict(width=32, heads=2, layers=1), quick_gelu=True)
    vision, visual = hf.network.vision_model, network.visual
    state = {"conv1.weight": vision.embeddings.patch_embedding.weight,
             "class_embedding": vision.embeddings.class_embedding,
             "positional_embedding": vision.embeddings.position_embedding.weight,
             "proj": hf.network.visual_projection.weight.T}
    for ours, theirs in (("ln_pre", vision.pre_layrnorm), ("ln_post", vision.post_layernorm)):
        state |= {f"{ours}.{k}": v for k, v in theirs.state_dict().items()}
    for i, layer in enumerate(vision.encoder.layers):
        state |= block_state(f"transformer.resblocks.{i}.", layer)
    visual.load_state_dict(state)
    preprocess = open_clip.transform.image_transform(config.image_size, is_train=False)
    return OpenClipBackend(network, preprocess, open_clip.get_tokenizer("ViT-B-32"), "openclip:tiny/copied")


def block_state(prefix, layer):
    """open_clip's names for one HF CLIP encoder layer's weights."""
    attn = layer.self_attn
    pairs = {"ln_1": layer.layer_norm1, "ln_2": layer.layer_norm2, "attn.out_proj": attn.out_proj,
             "mlp.c_fc": layer.mlp.fc1, "mlp.c_proj": layer.mlp.fc2}
    state = {f"{prefix}{ours}.{k}": v for ours, module in pairs.items() for k, v in module.state_dict().items()}
    projections = (attn.q_proj, attn.k_proj, attn.v_proj)
    state[prefix + "attn.in_proj_weight"] = torch.cat([p.weight for p in projections])
    state[prefix + "attn.in_proj_bias"] = torch.cat([p.bias for p in projections])
    return state


@pytest.fixture(scope="module")
def oc_clip(hf_clip):
    return openclip_copy(hf_clip)


def batch(n=2, side=64, seed=0):
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


def labels(model, c=3, seed=1):
    return F.normalize(torch.randn(c, model.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


# --- straightforward re-computations from the definitions, on the HF CLIP's own modules ---------------------

def hidden_states(model, pixels):
    """Every block's input and the last block's output, from transformers' own forward."""
    with torch.no_grad():
        return model.network.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states


def head_cosines(model, tokens, class_embeddings):
    """[N, L, W] width-space tokens (class token first) -> [N, C, T] patch cosines."""
    projected = model.network.visual_projection(model.network.vision_model.post_layernorm(tokens[:, 1:]))
    return (F.normalize(projected, dim=-1) @ class_embeddings.T).transpose(1, 2)


def by_hand(layer, x, attention):
    """out_proj of the heads' `attention(q_h, k_h, v_h)` @ v_h, head by head, on layer_norm1(x)."""
    attn = layer.self_attn
    h = layer.layer_norm1(x)
    q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
    d = q.shape[-1] // attn.num_heads
    heads = []
    for i in range(attn.num_heads):
        part = slice(i * d, (i + 1) * d)
        weights = attention(q[..., part], k[..., part], v[..., part], d)
        heads.append(v[..., part] if weights is None else weights @ v[..., part])
    return attn.out_proj(torch.cat(heads, dim=-1))


def soft(a, b, d):
    return torch.softmax(a @ b.transpose(1, 2) / d ** 0.5, dim=-1)


def test_maskclip_is_the_value_path_out_proj_v_proj_ln_1_through_the_head(hf_clip):
    pixels, ce = batch(), labels(hf_clip)
    layer = hf_clip.network.vision_model.encoder.layers[-1]
    x = hidden_states(hf_clip, pixels)[-2]
    with torch.no_grad():
        expected = head_cosines(hf_clip, layer.self_attn.out_proj(layer.self_attn.v_proj(layer.layer_norm1(x))), ce)
    assert torch.allclose(vit_maps.maskclip(hf_clip, pixels, ce), expected, atol=1e-5)


def test_clearclip_is_the_q_q_attention_alone_and_sclip_adds_k_k_with_residual_and_ffn(hf_clip):
    pixels, ce = batch(), labels(hf_clip)
    layer = hf_clip.network.vision_model.encoder.layers[-1]
    x = hidden_states(hf_clip, pixels)[-2]
    with torch.no_grad():
        clear = head_cosines(hf_clip, by_hand(layer, x, lambda q, k, v, d: soft(q, q, d)), ce)
        mid = x + by_hand(layer, x, lambda q, k, v, d: soft(q, q, d) + soft(k, k, d))
        correlative = head_cosines(hf_clip, mid + layer.mlp(layer.layer_norm2(mid)), ce)
    assert torch.allclose(vit_maps.clearclip(hf_clip, pixels, ce), clear, atol=1e-5)
    assert torch.allclose(vit_maps.sclip(hf_clip, pixels, ce), correlative, atol=1e-5)
    assert not torch.allclose(clear, correlative, atol=1e-3)


def test_surgery_is_the_value_value_path_then_feature_surgery(hf_clip):
    pixels, ce = batch(), labels(hf_clip, c=4)
    states = hidden_states(hf_clip, pixels)  # the tiny tower has 2 blocks: the path runs through both
    layers = hf_clip.network.vision_model.encoder.layers
    with torch.no_grad():
        path = states[0] + sum(by_hand(layer, states[i], lambda q, k, v, d: soft(v, v, d))
                               for i, layer in enumerate(layers))
        path = torch.cat([states[-1][:, :1], path[:, 1:]], dim=1)  # the class token of the original path
        feats = F.normalize(hf_clip.network.visual_projection(hf_clip.network.vision_model.post_layernorm(path)),
                            dim=-1)
        prob = torch.softmax(2 * feats[:, :1] @ ce.T, dim=-1)  # [N, 1, C]
        weighted = feats[:, :, None, :] * ce[None, None] * (prob / prob.mean(-1, keepdim=True))[..., None]
        expected = (weighted - weighted.mean(2, keepdim=True)).sum(-1)[:, 1:].transpose(1, 2)  # the paper's form
    assert torch.allclose(vit_maps.surgery(hf_clip, pixels, ce), expected, atol=1e-5)


def test_surgery_with_one_label_gives_its_value_value_cosines(hf_clip):
    pixels, ce = batch(), labels(hf_clip, c=3)
    three, one = vit_maps.surgery(hf_clip, pixels, ce), vit_maps.surgery(hf_clip, pixels, ce[:1])
    assert one.abs().max() > 0 and not torch.allclose(one, three[:, :1], atol=1e-4)
    tokens, _ = vit_maps.surgery_tokens(vit_maps.tower_of(hf_clip), pixels)
    assert torch.allclose(one, vit_maps.patch_cosines(vit_maps.tower_of(hf_clip), tokens, ce[:1]), atol=1e-6)


def test_gradcam_is_relu_of_the_patch_mean_gradient_times_the_last_blocks_input(hf_clip):
    pixels, ce = batch().requires_grad_(True), labels(hf_clip)
    with torch.enable_grad():
        output = hf_clip.network.vision_model(pixel_values=pixels, output_hidden_states=True)
        pooled = F.normalize(hf_clip.network.visual_projection(output.pooler_output), dim=-1)
        a = output.hidden_states[-2]
        expected = []
        for c in range(3):
            grad, = torch.autograd.grad((pooled @ ce[c]).sum(), a, retain_graph=True)
            expected.append(torch.relu((a[:, 1:] * grad[:, 1:].mean(1, keepdim=True)).sum(-1)))
    got = vit_maps.gradcam(hf_clip, pixels.detach(), ce)
    assert torch.allclose(got, torch.stack(expected, 1).detach(), atol=1e-5)
    assert not torch.allclose(got[:, 0], got[:, 1])  # the maps change with the label


def test_gradcam_runs_inside_inference_mode(hf_clip):
    with torch.inference_mode():
        pixels, ce = batch(), labels(hf_clip)
        maps_ = vit_maps.gradcam(hf_clip, pixels, ce)
    assert maps_.shape == (2, 3, 16) and maps_.min() >= 0 and maps_.max() > 0


@pytest.mark.parametrize("name", NAMES)
def test_bf16_autocast_gives_float32_maps_close_to_fp32(name, hf_clip):
    pixels, ce = batch(), labels(hf_clip)
    exact = vit_maps.METHODS[name](hf_clip, pixels, ce)
    hf_clip.precision = "bf16"
    try:
        low = vit_maps.METHODS[name](hf_clip, pixels, ce)
    finally:
        hf_clip.precision = "fp32"
    assert low.dtype == torch.float32
    assert torch.corrcoef(torch.stack([low.flatten(), exact.flatten()]))[0, 1] > 0.999


# --- the hook point, and both families --------------------------------------------------------------------

@pytest.mark.parametrize("which", ["hf", "openclip", "vit_b32"])
def test_the_last_block_rebuilt_from_its_weights_gives_the_models_own_tokens(which, hf_clip, oc_clip,
                                                                              openclip_backend):
    model = {"hf": hf_clip, "openclip": oc_clip, "vit_b32": openclip_backend}[which]
    side = 224 if which == "vit_b32" else 64
    pixels = batch(side=side)
    tower = vit_maps.tower_of(model)
    with torch.no_grad():
        x = vit_maps.block_input(tower, pixels, -1)
        rebuilt = tower.head(vit_maps.through_block(tower.blocks[-1], x, vit_maps.standard))[:, 1:]
    _, tokens = model.encode_images(pixels, return_tokens=True)
    assert torch.allclose(rebuilt, tokens, atol=1e-4)
    wrong = tower.head(vit_maps.through_block(tower.blocks[-1], x, vit_maps.query_query))[:, 1:]
    assert not torch.allclose(wrong, tokens, atol=1e-3)  # the check can fail


@pytest.mark.parametrize("name", NAMES)
def test_open_clip_and_transformers_give_the_same_maps_for_the_same_weights(name, hf_clip, oc_clip):
    pixels, ce = batch(), labels(hf_clip)
    hf_maps, oc_maps = (vit_maps.METHODS[name](m, pixels, ce) for m in (hf_clip, oc_clip))
    assert hf_maps.shape == (2, 3, 16)
    assert torch.allclose(hf_maps, oc_maps, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_every_method_draws_vit_b32_maps_on_its_grid(name, openclip_backend):
    ce = labels(openclip_backend, c=2)
    grid = maps.METHODS[name].draw(openclip_backend, batch(n=1, side=224), ce)
    assert grid.shape == (1, 2, 7, 7) and torch.isfinite(grid).all()


@settings(max_examples=6, deadline=None)
@given(n=st.integers(1, 3), c=st.integers(1, 4), name=st.sampled_from(NAMES))
def test_shapes_follow_the_batch_and_the_labels(hf_clip, n, c, name):
    grid = maps.METHODS[name].draw(hf_clip, batch(n=n), labels(hf_clip, c=c))
    assert grid.shape == (n, c, 4, 4) and torch.isfinite(grid).all()


def test_cosine_stays_the_default_and_the_raw_tokens_cosine(hf_clip):
    pixels, ce = batch(), labels(hf_clip)
    assert maps.methods_for(hf_clip) == ["cosine", *NAMES]
    assert maps.default_method(hf_clip) == "cosine"
    _, tokens = hf_clip.encode_images(pixels, return_tokens=True)
    expected = (F.normalize(tokens, dim=-1) @ ce.T).transpose(1, 2).reshape(2, 3, 4, 4)
    assert torch.allclose(maps.METHODS["cosine"].draw(hf_clip, pixels, ce), expected, atol=1e-6)


# --- models the methods do not apply to -------------------------------------------------------------------

def tiny_siglip():
    from transformers import SiglipConfig, SiglipImageProcessor, SiglipModel

    from clipzsl.backends.hf import HFBackend

    small = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    config = SiglipConfig(text_config=small, vision_config={**small, "image_size": 32, "patch_size": 16})
    processor = SimpleNamespace(image_processor=SiglipImageProcessor(size={"height": 32, "width": 32}))
    return HFBackend(SiglipModel(config), processor, "hf:tiny-siglip")


def tiny_resnet():
    import open_clip
    from open_clip.model import CLIP

    from clipzsl.backends.openclip import OpenClipBackend

    network = CLIP(32, dict(layers=(1, 1, 1, 1), width=8, image_size=64), dict(width=32, heads=2, layers=1))
    preprocess = open_clip.transform.image_transform(64, is_train=False)
    return OpenClipBackend(network, preprocess, open_clip.get_tokenizer("RN50"), "openclip:tiny-resnet/random")


@pytest.mark.parametrize("build", [tiny_siglip, tiny_resnet])
def test_siglip_and_resnet_towers_are_refused_by_name(build):
    model = build()
    assert not vit_maps.applies(model)
    for name in ("surgery", "sclip", "clearclip"):  # last-block readings of a ViT only
        with pytest.raises(InputError, match="does not apply"):
            maps.method_named(model, name)
    assert "maskclip" in maps.methods_for(model)  # the attention pool's value path (clipzsl.family_maps) serves it
    with pytest.raises(InputError, match="no plain ViT"):
        vit_maps.tower_of(model)


def test_cli_explain_draws_surgery_maps(tiny_clip, tmp_path, capsys):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["explain", str(tmp_path / "x.png"), "--labels", "cat,dog", "--method", "surgery",
                 "--model", f"hf:{tiny_clip}", "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out.split()
    assert code == 0
    assert sorted(printed) == sorted(str(p) for p in (tmp_path / "out").glob("*.png")) and len(printed) == 2
