"""Heat maps of the families without patch tokens (`clipzsl.family_maps`), on random weights: SigLIP (transformers,
and open_clip's timm ViT with an attention-pooling head), ResNet CLIP (open_clip's AttentionPool2d) and MobileCLIP
(open_clip's timm FastViT). Each method is checked against the model's own modules run another way."""
import copy
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipzsl
from clipzsl import ZeroShotClassifier
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.family_maps import (activations_and_gradients, gradcam_spatial, gscorecam, has_feature_map,
                                 is_attention_pooled, maskclip_pooled, spatial, tower)
from clipzsl.maps import method_named, methods_for

TINY_RESNET = {"embed_dim": 32, "vision_cfg": {"image_size": 128, "layers": [1, 1, 1, 1], "width": 8, "patch_size": None},
               "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
TINY_TIMM_SIGLIP = {"embed_dim": 192, "init_logit_bias": -10,
                    "vision_cfg": {"image_size": 224, "timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                                   "timm_pool": "map", "timm_proj": "none"},
                    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def open_clip_configs(tmp_path_factory):
    """Tiny open_clip architectures registered under clipzsl-test-* names (open_clip builds them offline)."""
    import open_clip

    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, config in (("clipzsl-test-RN", TINY_RESNET), ("clipzsl-test-MAP", TINY_TIMM_SIGLIP)):
        (folder / f"{name}.json").write_text(json.dumps(config))
    open_clip.add_model_config(folder)


@pytest.fixture(scope="module")
def resnet(open_clip_configs):
    torch.manual_seed(0)
    return clipzsl.load_model("openclip:clipzsl-test-RN/random")


@pytest.fixture(scope="module")
def timm_siglip(open_clip_configs):
    torch.manual_seed(0)
    return clipzsl.load_model("openclip:clipzsl-test-MAP/random")


@pytest.fixture(scope="module")
def mobileclip():
    torch.manual_seed(0)
    return clipzsl.load_model("openclip:MobileCLIP-S1/random")


@pytest.fixture(scope="module")
def hf_siglip(tmp_path_factory):
    """A tiny random transformers SiglipModel saved with a SigLIP image processor (CLIP's BPE as its tokenizer)."""
    from transformers import CLIPTokenizer, SiglipConfig, SiglipImageProcessor, SiglipModel, SiglipProcessor

    from clipzsl.backends.hf import write_clip_tokenizer

    folder = tmp_path_factory.mktemp("tiny_siglip")
    sizes = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4}
    torch.manual_seed(0)
    SiglipModel(SiglipConfig(text_config={**sizes, "vocab_size": 49408, "max_position_embeddings": 64},
                             vision_config={**sizes, "image_size": 64, "patch_size": 16})).save_pretrained(folder)
    write_clip_tokenizer(folder)
    tokenizer = CLIPTokenizer(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"))
    SiglipProcessor(image_processor=SiglipImageProcessor(size={"height": 64, "width": 64}),
                    tokenizer=tokenizer).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def siglip(hf_siglip):
    return clipzsl.load_model(f"hf:{hf_siglip}")


def pixels_for(model, seed=0):
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (80, 100, 3), dtype=np.uint8))
    return model.normalize_pixels(model.pixels_uint8(image)[None])


def labels(model, count=3, seed=0):
    return F.normalize(torch.randn(count, model.embed_dim, generator=torch.Generator().manual_seed(seed)), dim=-1)


def pool_input(pool, run):
    """The input `pool` gets while `run()` runs, caught by a forward hook of the test's own."""
    caught = []
    handle = pool.register_forward_hook(lambda module, args, out: caught.append(args[0]))
    try:
        run()
    finally:
        handle.remove()
    return caught[-1]


def assert_each_position_is_the_pool_attending_to_it_alone(maps, features, pooled_of, class_embeddings):
    """maps [1, C, T]: at position t, the cosine of what the model's pool makes of a map holding feature t at
    every position (all attention then falls on copies of that one feature, whatever the weights)."""
    expected = torch.stack([F.normalize(pooled_of(t), dim=-1)[0] for t in range(maps.shape[-1])]) @ class_embeddings.T
    assert torch.allclose(maps[0].T, expected, atol=1e-4)


def test_resnet_value_path_is_the_attention_pool_on_a_map_holding_one_position(resnet):
    pixels, classes = pixels_for(resnet), labels(resnet)
    pool = resnet.network.visual.attnpool
    features = pool_input(pool, lambda: resnet.network.encode_image(pixels))  # [1, K, 4, 4]
    flat = features.flatten(2)
    unplaced = copy.deepcopy(pool)
    with torch.no_grad():
        unplaced.positional_embedding.zero_()  # MaskCLIP's path has no positional embedding
        maps = maskclip_pooled(resnet, pixels, classes)
        assert maps.shape == (1, 3, 16)
        assert_each_position_is_the_pool_attending_to_it_alone(
            maps, features, lambda t: unplaced(flat[:, :, t, None, None].expand_as(features)), classes)


def test_resnet_value_path_recomputed_from_its_definition(resnet):
    pixels, classes = pixels_for(resnet, seed=1), labels(resnet)
    pool = resnet.network.visual.attnpool
    tokens = pool_input(pool, lambda: resnet.network.encode_image(pixels)).flatten(2).transpose(1, 2)  # [1, T, K]
    value = tokens @ pool.v_proj.weight.T + pool.v_proj.bias
    out = value @ pool.c_proj.weight.T + pool.c_proj.bias
    expected = F.normalize(out, dim=-1) @ classes.T
    assert torch.allclose(maskclip_pooled(resnet, pixels, classes), expected.transpose(1, 2), atol=1e-5)


def test_hf_siglip_value_path_is_its_head_on_tokens_holding_one_position(siglip):
    pixels, classes = pixels_for(siglip), labels(siglip)
    head = siglip.network.vision_model.head
    tokens = pool_input(head, lambda: siglip.network.vision_model(pixel_values=pixels))  # [1, 16, 64]
    with torch.no_grad():
        maps = maskclip_pooled(siglip, pixels, classes)
        assert maps.shape == (1, 3, 16)
        assert_each_position_is_the_pool_attending_to_it_alone(
            maps, tokens, lambda t: head(tokens[:, t:t + 1].expand_as(tokens)), classes)


def test_open_clip_siglip_value_path_is_its_attention_pool_and_head_on_tokens_holding_one_position(timm_siglip):
    pixels, classes = pixels_for(timm_siglip), labels(timm_siglip)
    visual = timm_siglip.network.visual
    trunk = visual.trunk
    assert trunk.attn_pool.pos_embed is None and trunk.num_prefix_tokens == 1 and not trunk.pool_include_prefix
    tokens = pool_input(trunk.attn_pool, lambda: timm_siglip.network.encode_image(pixels))  # [1, 196, 192], no class token
    with torch.no_grad():
        maps = maskclip_pooled(timm_siglip, pixels, classes)
        assert maps.shape == (1, 3, 196)
        assert_each_position_is_the_pool_attending_to_it_alone(
            maps, tokens, lambda t: visual.head(trunk.head(trunk.fc_norm(trunk.attn_pool(tokens[:, t:t + 1].expand_as(tokens))))),
            classes)


def independent_gradcam(model, pixels, classes, column):
    """Grad-CAM before its ReLU, with the gradient taken from the pixels up through the whole tower."""
    pool = tower(model).pool
    pixels = pixels.clone().requires_grad_(True)
    caught = []

    def keep(module, args, out):
        args[0].retain_grad()
        caught.append(args[0])

    handle = pool.register_forward_hook(keep)
    try:
        with torch.enable_grad():
            pooled = tower(model).embed(pixels)
            (F.normalize(pooled, dim=-1) @ classes[column]).sum().backward()
    finally:
        handle.remove()
    acts, grads = caught[0].flatten(2), caught[0].grad.flatten(2)  # [N, K, T] (conv maps)
    return torch.einsum("nk,nkt->nt", grads.mean(2), acts).detach()


def test_gradcam_is_the_relu_of_the_gradient_weighted_channels_and_changes_with_the_label(resnet):
    pixels, e = pixels_for(resnet), labels(resnet, 2)
    classes = torch.stack([e[0], -e[0], e[1]])
    maps = gradcam_spatial(resnet, pixels, classes)
    assert maps.shape == (1, 3, 16) and (maps >= 0).all()
    before_relu = independent_gradcam(resnet, pixels, classes, 0)
    assert before_relu.abs().sum() > 0
    assert torch.allclose(maps[:, 0] - maps[:, 1], before_relu, atol=1e-6 * float(before_relu.abs().max()))
    assert (maps[:, 0] * maps[:, 1] == 0).all()  # a label and its opposite light up disjoint positions
    assert not torch.allclose(maps[:, 0], maps[:, 1])


@pytest.mark.parametrize("family", ["siglip", "timm_siglip", "mobileclip"])
def test_gradcam_draws_every_family_and_differs_by_label(family, request):
    model = request.getfixturevalue(family)
    e = labels(model, 2, seed=3)
    maps = gradcam_spatial(model, pixels_for(model), torch.stack([e[0], -e[0], e[1]]))
    side = {"siglip": 4, "timm_siglip": 14, "mobileclip": 8}[family]
    assert maps.shape == (1, 3, side * side)
    assert (maps[:, 0] * maps[:, 1] == 0).all() and (maps[:, 0] + maps[:, 1]).sum() > 0
    assert not torch.allclose(maps[:, 0], maps[:, 2])


def test_gscorecam_weighs_the_top_gradient_channels_by_the_softmax_of_their_masked_logits(resnet):
    pixels, classes = pixels_for(resnet), labels(resnet)
    maps = gscorecam(resnet, pixels, classes, channels=5)
    acts, grads = activations_and_gradients(tower(resnet), pixels, classes)
    for c in range(3):
        top = grads[c, 0].mean((1, 2)).topk(5).indices
        logits = []
        for k in top:
            mask = F.interpolate(acts[:, k, None], size=pixels.shape[-2:], mode="bilinear", align_corners=True)
            mask = (mask - mask.min()) / (mask.max() - mask.min() + 1e-6)
            logits.append(resnet.logit_scale * float(resnet.encode_images(pixels * mask)[0] @ classes[c]))
        weights = torch.tensor(logits).softmax(0)
        expected = F.relu((weights[:, None] * acts[0, top].flatten(1)).sum(0))
        assert torch.allclose(maps[0, c], expected, atol=1e-5)
    assert maps.shape == (1, 3, 16) and not torch.allclose(maps[0, 0], maps[0, 1])


def test_gscorecam_runs_on_mobileclip(mobileclip):
    maps = gscorecam(mobileclip, pixels_for(mobileclip), labels(mobileclip), channels=3)
    assert maps.shape == (1, 3, 64) and (maps >= 0).all() and maps.sum() > 0


@pytest.mark.parametrize("family, default, others", [
    ("siglip", "maskclip", ["gradcam"]), ("timm_siglip", "maskclip", ["gradcam"]),
    ("resnet", "maskclip", ["gradcam", "gscorecam"]), ("mobileclip", "gradcam", ["gscorecam"])])
def test_classifier_heatmaps_work_for_every_family(family, default, others, request):
    model = request.getfixturevalue(family)
    assert methods_for(model) == [default, *others]
    classifier = ZeroShotClassifier(model, ["cat", "red car"], cache=False)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    heat_map, = classifier.heatmaps([image])
    assert heat_map.method == default
    assert heat_map.grid.shape[0] == 2 and heat_map.grid.shape[1] == heat_map.grid.shape[2] > 1
    assert np.isfinite(heat_map.grid).all()
    if family == "resnet":
        assert classifier.heatmaps([image], method="gscorecam")[0].grid.shape == heat_map.grid.shape


def test_methods_that_do_not_apply_are_refused(siglip, mobileclip, tiny_clip):
    assert is_attention_pooled(siglip) and not is_attention_pooled(mobileclip) and has_feature_map(mobileclip)
    plain = clipzsl.load_model(f"hf:{tiny_clip}")
    assert tower(plain) is None  # a CLIP ViT gives patch tokens: not these methods' family
    for model, method in ((mobileclip, "maskclip"), (siglip, "gscorecam"), (siglip, "cosine")):
        with pytest.raises(InputError, match=f"'{method}' does not apply"):
            method_named(model, method)
    with pytest.raises(InputError, match="does not pool by attention"):
        maskclip_pooled(mobileclip, pixels_for(mobileclip), labels(mobileclip))
    with pytest.raises(InputError, match="no convolutional feature map"):
        gscorecam(siglip, pixels_for(siglip), labels(siglip))


def test_spatial_drops_prefix_tokens_and_lays_conv_maps_out_row_major(resnet, siglip):
    conv = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(1, 2, 3, 4)
    assert spatial(tower(resnet), conv)[0, 5].tolist() == [5.0, 17.0]  # row 1, column 1 of both channels
    assert spatial(tower(siglip), torch.zeros(1, 16, 8)).shape == (1, 16, 8)


@pytest.mark.parametrize("family", ["siglip", "resnet"])
def test_explain_command_draws_siglip_and_resnet_pictures(family, request, tmp_path, capsys):
    model = request.getfixturevalue(family)
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (50, 70, 3), dtype=np.uint8)).save(tmp_path / "x.png")
    code = main(["explain", str(tmp_path / "x.png"), "--labels", "cat,dog", "--model", model.spec,
                 "--out", str(tmp_path / "out"), "--device", "cpu"])
    out = capsys.readouterr().out.split()
    assert code == 0
    assert sorted(os.path.basename(p) for p in out) == ["x__cat.png", "x__dog.png"]
    assert all(Image.open(p).size[0] > 70 for p in out)  # the image with its colour scale beside it
