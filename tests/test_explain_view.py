"""`explain` draws the map over what the model saw (the squeezed whole image or its centre crop),
with the label, its probability and a colour scale on the picture, one file per image even
when file stems repeat."""
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

import clipzsl
from clipzsl.backends.packaged import CROP_PADDING, image_transform
from clipzsl.explain import MIN_PICTURE_HEIGHT, annotate, explain, output_stems, overlay, picture
from clipzsl.maps import HeatMap, View, image_view


@pytest.fixture(scope="module")
def tiny_backend(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def siglip_like():
    from transformers import SiglipImageProcessor

    return SimpleNamespace(processor=SimpleNamespace(image_processor=SiglipImageProcessor(size={"height": 64,
                                                                                                "width": 64})))


def test_view_is_read_from_each_kind_of_preprocessing(openclip_backend, tiny_backend):
    assert image_view(SimpleNamespace(preprocess=image_transform(224))) == View(squeeze=True)  # packaged
    assert image_view(SimpleNamespace(preprocess=image_transform(224, crop=True))) == View(
        squeeze=False, crop=224 / (224 + CROP_PADDING))  # packaged+crop
    assert image_view(openclip_backend) == View(squeeze=False)  # resize shorter side, centre crop all of it
    assert image_view(tiny_backend) == View(squeeze=False)  # CLIPImageProcessor: shortest_edge + centre crop
    assert image_view(siglip_like()) == View(squeeze=True)  # height/width resize, no crop


def hottest_column(picture: Image.Image, width: int, height: int) -> int:
    """Column of the image area where the overlay is reddest (the top of the colour map)."""
    rgb = np.asarray(picture, float)[:height, :width]
    return int(np.argmax((rgb[..., 0] - rgb[..., 2]).mean(0)))


def right_column_peak():
    heat = np.zeros((7, 7))
    heat[:, -1] = 1.0
    return heat


def test_squeeze_view_puts_a_right_edge_peak_at_the_right_edge_of_a_wide_image():
    image = Image.new("RGB", (1200, 300), (128, 128, 128))
    view = image_view(SimpleNamespace(preprocess=image_transform(224)))
    out = overlay(image, right_column_peak(), view.box(*image.size))
    assert out.size == (1200, 300)
    assert hottest_column(out, 1200, 300) >= 1200 - 1200 // 7  # the last token column spans the last 7th
    assert not np.array_equal(np.asarray(out)[:, 0], np.asarray(image)[:, 0])  # the map covers the left edge too


def test_crop_view_puts_it_at_the_right_edge_of_the_centre_square(openclip_backend):
    image = Image.new("RGB", (1200, 300), (128, 128, 128))
    out = np.asarray(overlay(image, right_column_peak(), image_view(openclip_backend).box(*image.size)))
    assert 750 - 300 // 7 <= hottest_column(Image.fromarray(out), 1200, 300) < 750  # square is x in [450, 750)
    grey = np.asarray(image)
    assert np.array_equal(out[:, :450], grey[:, :450]) and np.array_equal(out[:, 750:], grey[:, 750:])
    assert not np.array_equal(out[:, 450:750], grey[:, 450:750])


def test_annotation_adds_a_colour_scale_and_the_caption():
    picture = Image.new("RGB", (200, 100), (128, 128, 128))
    cat, dog = annotate(picture, "cat: 87.3%"), annotate(picture, "dog: 12.7%")
    assert cat.width > 200 and cat.height > 100
    assert np.array_equal(np.asarray(cat)[:100, :200], np.asarray(picture))  # the picture itself is untouched
    scale = np.asarray(cat, int)[:100, 200:]
    reds, blues = scale[..., 0] - scale[..., 2], scale[..., 2] - scale[..., 0]
    assert reds[:10].max() > 100 and blues[-10:].max() > 100  # high (red) at the top, low (blue) at the bottom
    caption_cat, caption_dog = np.asarray(cat)[100:], np.asarray(dog)[100:]
    assert (caption_cat < 128).any()  # dark text on the white strip
    assert not np.array_equal(caption_cat, caption_dog)


def test_explain_writes_one_annotated_file_per_image_even_with_the_same_stem(tiny_backend, tmp_path):
    for folder, colour in (("a", (200, 30, 30)), ("b", (30, 30, 200))):
        (tmp_path / folder).mkdir()
        Image.new("RGB", (80, 60), colour).save(tmp_path / folder / "cat.png")
    out = explain(tiny_backend, [tmp_path / "a" / "cat.png", tmp_path / "b" / "cat.png"], ["cat", "dog"],
                  tmp_path / "out").written
    assert len(out) == len(set(out)) == 4 == len(list((tmp_path / "out").glob("*.png")))
    for path in out:
        with Image.open(path) as im:
            assert im.width > 80 and im.height > 60
    # each file shows its own image: the red one's top-left pixel is redder than the blue one's
    a = [p for p in out if p.name.startswith("a_")]
    b = [p for p in out if p.name.startswith("b_")]
    assert len(a) == len(b) == 2
    with Image.open(a[0]) as ia, Image.open(b[0]) as ib:
        assert ia.getpixel((0, 0))[0] > ib.getpixel((0, 0))[0]


def test_output_stems_are_distinct():
    pil = Image.new("RGB", (4, 4))
    stems = output_stems(["x/a/cat.png", "y/a/cat.png", "z/b/cat.png", "dog.png", pil, "dog.png"])
    assert len(set(stems)) == 6
    assert stems[2] == "b_cat" and stems[4] == "image4"
    assert stems[0].startswith("a_cat") and stems[3].startswith("dog")


def test_per_image_view_of_the_packaged_default_follows_the_image():
    """The default picks the whole image for a cut-out and the centred square for a photo; the heat
    map must be laid over the view that image got, not one fixed view."""
    from clipzsl.backends.packaged import AutoView

    backend = SimpleNamespace(preprocess=AutoView(224))
    cutout = Image.new("RGB", (1200, 300), "white")
    cutout.paste((200, 30, 30), (1000, 100, 1150, 250))
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 1200, 3), dtype=np.uint8))
    assert image_view(backend, cutout) == View(squeeze=True)
    assert image_view(backend, photo) == View(squeeze=False)


def test_explain_skips_an_unreadable_image_and_the_command_exits_1(tiny_clip, tmp_path, capsys):
    """As classify does: the readable images get their pictures, the unreadable one is named (found by a probe:
    one bad file in a folder wrote nothing)."""
    from clipzsl.cli import main

    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a", "c"):
        Image.new("RGB", (40, 30), (120, 60, 30)).save(folder / f"{name}.png")
    (folder / "b.png").write_bytes(b"not an image")
    code = main(["explain", str(folder), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}", "--out", str(tmp_path / "o")])
    printed = capsys.readouterr()
    assert code == 1 and "b.png" in printed.err
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["a__cat.png", "a__dog.png", "c__cat.png", "c__dog.png"]


@pytest.mark.parametrize("size", [(1, 1), (3, 40), (200, 9)])
def test_a_tiny_image_is_enlarged_so_its_scale_and_caption_do_not_overlap(size):
    heat = HeatMap(grid=np.arange(4.0).reshape(1, 2, 2), box=(0, 0, *size), method="cosine")
    image = Image.new("RGB", size, (128, 128, 128))
    out = np.asarray(picture(image, heat, 0, "cat 90%"))
    factor = next(f for f in range(1, 300) if f * size[1] >= MIN_PICTURE_HEIGHT and f * max(size) >= 256)
    drawn = np.asarray(overlay(image, heat.grid[0], heat.box))
    area = out[:size[1] * factor, :size[0] * factor]
    assert np.array_equal(area, drawn.repeat(factor, 0).repeat(factor, 1))  # enlarged whole, nothing written over it
    assert out.shape[0] > size[1] * factor  # the caption strip is below it
