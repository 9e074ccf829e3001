"""The packaged default's view per image: the whole image for cut-outs, the centre crop for photos."""
import pytest
import torch
from PIL import Image

skimage_data = pytest.importorskip("skimage.data")

from clipzsl import ZeroShotClassifier, load_image, load_model  # noqa: E402
from clipzsl.backends import packaged  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A fresh cache directory, so nothing is written outside tmp."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CLIPZSL_CACHE_DIR", str(tmp_path_factory.mktemp("clipzsl_cache")))
        yield


@pytest.fixture(scope="module")
def models(cache):
    return {spec: load_model(spec) for spec in ("packaged", "packaged+whole", "packaged+crop")}


def chelsea() -> Image.Image:
    return Image.fromarray(skimage_data.chelsea())


def transparent_cutout() -> Image.Image:
    """A photo of a cat cut out onto a transparent canvas, as a sticker or a stamp is."""
    canvas = Image.new("RGBA", (240, 200), (0, 0, 0, 0))
    canvas.paste(chelsea().resize((180, 120)), (30, 40))
    return canvas


def plain_background_cutout() -> Image.Image:
    """The same cat on a plain blue backdrop, no transparency at all."""
    canvas = Image.new("RGB", (240, 200), (40, 90, 160))
    canvas.paste(chelsea().resize((180, 120)), (30, 40))
    return canvas


def test_detector_calls_cutouts_cutouts():
    # load_image composites transparency on white before the backend sees the image
    assert packaged.is_cutout(load_image(transparent_cutout()))
    assert packaged.is_cutout(load_image(Image.fromarray(skimage_data.logo())))  # a real RGBA logo
    assert packaged.is_cutout(load_image(plain_background_cutout()))


def test_detector_calls_photos_photos():
    for photo in (skimage_data.chelsea(), skimage_data.astronaut(), skimage_data.coffee(), skimage_data.rocket()):
        assert not packaged.is_cutout(load_image(Image.fromarray(photo)))


def test_detector_handles_images_of_a_pixel_or_two():
    for size in ((1, 1), (1, 7), (7, 2)):
        assert packaged.border_uniformity(Image.new("RGB", size, (9, 9, 9))) == 1.0


def test_default_view_is_chosen_per_image(models):
    default = models["packaged"]
    crop, whole = packaged.image_transform(224, crop=True), packaged.image_transform(224, crop=False)
    square = packaged.image_transform(224, crop=True, padding=0)  # the largest centred square
    photo, cutout = load_image(chelsea()), load_image(transparent_cutout())
    assert torch.equal(default.preprocess(photo), square(photo))
    assert torch.equal(default.preprocess(cutout), whole(cutout))
    assert not torch.equal(square(photo), whole(photo)) and not torch.equal(square(cutout), whole(cutout))
    # the forced views ignore the image's kind
    assert torch.equal(models["packaged+whole"].preprocess(photo), whole(photo))
    assert torch.equal(models["packaged+crop"].preprocess(cutout), crop(cutout))


def test_default_model_is_more_confident_on_the_demo_cat_than_the_whole_view(models):
    """The demo's labels on scikit-image's cat: the default's top-1 is 'cat', and surer than the squeeze."""
    top = {spec: ZeroShotClassifier(model, labels="demo", cache=False).predict(chelsea(), top_k=1)[0][0]
           for spec, model in models.items() if spec != "packaged+crop"}
    assert top["packaged"][0] == "cat"
    assert top["packaged+whole"][0] == "cat" and top["packaged"][1] > top["packaged+whole"][1]


def test_view_specs_round_trip_and_name_the_policy(models):
    for spec, view in (("packaged", ":auto"), ("packaged+whole", ":whole:"), ("packaged+crop", ":crop:")):
        model = models[spec]
        assert model.spec == spec and view in model.fingerprint
        assert load_model(model.spec).fingerprint == model.fingerprint
    assert len({m.fingerprint for m in models.values()}) == 3
    with pytest.raises(ValueError, match=r"'\+crop'.*'\+whole'"):
        load_model("packaged+squash")
