"""Image loading as people see images: EXIF orientation, transparency, and bad files named."""
import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
from clipzsl.images import ImageLoadError, embed_images, expand_sources, load_image


def test_exif_orientation_is_honoured(tmp_path):
    pixels = np.zeros((20, 40, 3), dtype=np.uint8)  # 40 wide, 20 high
    pixels[:, :20] = 255  # left half white
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = load_image(tmp_path / "rotated.jpg")
    assert loaded.size == (20, 40)  # shown upright: 20 wide, 40 high
    top, bottom = np.asarray(loaded)[:5].mean(), np.asarray(loaded)[-5:].mean()
    assert top > 200 and bottom < 50  # the white left half ends up on top


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_composited_on_white(tmp_path, mode):
    rgba = Image.new("RGBA", (8, 8), (0, 0, 0, 0))  # fully transparent black
    rgba.putpixel((0, 0), (255, 0, 0, 255))
    if mode == "P":
        image = rgba.convert("RGB").convert("P")
        image.info["transparency"] = image.getpixel((1, 1))
    else:
        image = rgba.convert(mode)
    image.save(tmp_path / "alpha.png")
    loaded = np.asarray(load_image(tmp_path / "alpha.png"))
    assert loaded.shape == (8, 8, 3)
    assert (loaded[1:, 1:] == 255).all()  # transparent -> white, not black
    assert loaded[0, 0].tolist() != [255, 255, 255]


def make_bad_files(folder):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (200, 30, 30)).save(folder / "good.png")
    (folder / "sub").mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (30, 200, 30)).save(folder / "sub" / "good2.jpg")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image")
    png = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "readme.txt").write_text("not listed: not an image suffix")
    return folder


def test_bad_files_raise_with_their_path(tmp_path):
    folder = make_bad_files(tmp_path / "imgs")
    for name, reason in [("empty.jpg", "empty file"), ("notes.png", "not an image"), ("truncated.png", "truncated")]:
        with pytest.raises(ImageLoadError, match=reason) as info:
            load_image(folder / name)
        assert info.value.source == str(folder / name)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png")


def test_folders_are_walked_recursively_and_failures_skipped(tmp_path, tiny_clip):
    folder = make_bad_files(tmp_path / "imgs")
    names = [str(p).split("imgs/")[1] for p in expand_sources(folder)]
    assert names == ["empty.jpg", "good.png", "notes.png", "sub/good2.jpg", "truncated.png"]  # no readme.txt
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    result = embed_images(backend, folder, batch_size=2, skip_errors=True)
    assert [s.split("/")[-1] for s in result.sources] == ["good.png", "good2.jpg"]
    assert sorted(f.source.split("/")[-1] for f in result.failures) == ["empty.jpg", "notes.png", "truncated.png"]
    assert result.embeddings.shape == (2, backend.embed_dim)
    torch.testing.assert_close(result.embeddings.norm(dim=1), torch.ones(2))
    with pytest.raises(ImageLoadError):
        embed_images(backend, folder)


# -- every Pillow mode looks to the model as it looks to a person (issue 19, section 3) ---------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from clipzsl.images import decode_image, to_rgb  # noqa: E402

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
pictures = hnp.arrays(np.uint8, st.tuples(st.integers(2, 12), st.integers(2, 12), st.just(3)))


def _gray(rgb: np.ndarray) -> np.ndarray:
    """The 8-bit grayscale a person sees, with its darkest pixel black and its brightest white (so a
    min..max stretch of it is itself)."""
    gray = np.asarray(Image.fromarray(rgb).convert("L")).copy()
    gray.flat[0], gray.flat[-1] = 0, 255
    return gray


def _raw16(gray: np.ndarray, mode: str) -> Image.Image:
    """`gray` as full-range 16-bit values in `mode` (Pillow's own convert clips 16-bit values to 255)."""
    order = ">u2" if mode == "I;16B" else "<u2"
    return Image.frombytes(mode, gray.shape[::-1], (gray.astype(np.uint32) * 257).astype(order).tobytes())


#: the same grayscale picture in every wide mode, in each of the ranges a file may mean
GRAY_RENDERINGS = {
    "I;16": lambda g: _raw16(g, "I;16"),
    "I;16L": lambda g: _raw16(g, "I;16L"),
    "I;16B": lambda g: _raw16(g, "I;16B"),
    "I 0..255": lambda g: Image.fromarray(g.astype(np.int32)),
    "I 0..65535": lambda g: Image.fromarray(g.astype(np.int32) * 257),
    "I other range": lambda g: Image.fromarray(g.astype(np.int32) * 1000 - 70_000),
    "F 0..1": lambda g: Image.fromarray(g.astype(np.float32) / 255),
    "F 0..255": lambda g: Image.fromarray(g.astype(np.float32)),
    "F other range": lambda g: Image.fromarray(g.astype(np.float32) * 0.01 - 3),
}


@FAST
@given(rgb=pictures, rendering=st.sampled_from(sorted(GRAY_RENDERINGS)))
def test_wide_modes_are_scaled_to_their_range(rgb, rendering):
    gray = _gray(rgb)
    image = GRAY_RENDERINGS[rendering](gray)
    assert image.mode == rendering.split()[0]
    seen = np.asarray(to_rgb(image)).astype(int)
    assert np.abs(seen - gray[..., None]).max() <= 1  # today: 16-bit and 0..65535 come out white


def test_nan_and_inf_in_a_float_image():
    values = np.array([[np.nan, np.inf], [-np.inf, 0.5], [0.0, 1.0]], np.float32)
    seen = np.asarray(to_rgb(Image.fromarray(values)))[..., 0]
    assert seen.tolist() == [[0, 255], [0, 128], [0, 255]]  # NaN black, the infinities the ends, 0..1 by the finite


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    return (rgb.astype(float) * alpha[..., None] + 255.0 * (255 - alpha[..., None])) / 255


def _paletted(rgb: np.ndarray) -> tuple[np.ndarray, list[int], np.ndarray]:
    """(indices, palette, what the palette shows) of `rgb` in at most 255 colours, leaving entry 255 free."""
    quantized = Image.fromarray(rgb).quantize(colors=255, method=Image.Quantize.MEDIANCUT)
    return np.asarray(quantized), quantized.getpalette()[: 255 * 3] + [0, 0, 0], np.asarray(quantized.convert("RGB"))


def _alpha_renderings(rgb: np.ndarray, alpha: np.ndarray) -> dict[str, tuple[Image.Image, np.ndarray]]:
    """The same picture with transparency in every mode that carries it, and what a person sees (it on white)."""
    rgba = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    gray = np.asarray(Image.fromarray(rgb).convert("L"))
    la = Image.fromarray(np.dstack([gray, alpha]), "LA")
    binary = np.where(alpha > 127, 255, 0).astype(np.uint8)  # what a colour key or one palette entry can say
    indices, palette, shown = _paletted(rgb)
    pa = Image.frombytes("PA", indices.shape[::-1], np.dstack([indices, alpha]).tobytes())
    pa.putpalette(palette)
    trns = Image.fromarray(np.where(binary == 0, 255, indices).astype(np.uint8), "P")
    trns.putpalette(palette)
    trns.info["transparency"] = 255
    keyed = Image.fromarray(np.where(binary[..., None] == 0, np.uint8([1, 2, 3]), rgb).astype(np.uint8))
    keyed.info["transparency"] = (1, 2, 3)
    gray3 = np.dstack([gray] * 3)
    return {
        "RGBA": (rgba, _on_white(rgb, alpha)),
        "RGBa": (rgba.convert("RGBa"), _on_white(rgb, alpha)),
        "LA": (la, _on_white(gray3, alpha)),
        "La": (la.convert("La"), _on_white(gray3, alpha)),
        "PA": (pa, _on_white(shown, alpha)),
        "P with tRNS": (trns, _on_white(shown, binary)),
        "RGB with a colour key": (keyed, _on_white(rgb, binary)),
    }


ALPHA_MODES = sorted(_alpha_renderings(np.zeros((2, 2, 3), np.uint8), np.zeros((2, 2), np.uint8)))


@FAST
@given(rgb=pictures, data=st.data(), mode=st.sampled_from(ALPHA_MODES))
def test_transparency_in_every_mode_is_on_white(rgb, data, mode):
    alpha = data.draw(hnp.arrays(np.uint8, rgb.shape[:2]))
    image, expected = _alpha_renderings(rgb, alpha)[mode]
    seen = np.asarray(to_rgb(image)).astype(float)
    assert seen.shape == expected.shape
    assert np.abs(seen - expected).max() <= 2.5  # rounding of premultiplied alpha; today 'La' raises


@FAST
@given(rgb=pictures)
def test_cmyk_ycbcr_and_friends_look_like_rgb(rgb):
    for mode in ("CMYK", "YCbCr", "RGBX", "HSV"):
        seen = np.asarray(to_rgb(Image.fromarray(rgb).convert(mode))).astype(int)
        assert np.abs(seen - rgb).max() <= (8 if mode in ("YCbCr", "HSV") else 0), mode  # lossy colour spaces


#: EXIF orientation -> how the stored pixels are turned to show the picture upright
UPRIGHT = {1: lambda a: a, 2: lambda a: a[:, ::-1], 3: lambda a: a[::-1, ::-1], 4: lambda a: a[::-1],
           5: lambda a: a.swapaxes(0, 1), 6: lambda a: np.rot90(a, -1), 7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
           8: lambda a: np.rot90(a, 1)}


@FAST
@given(rgb=pictures, orientation=st.integers(1, 8), rendering=st.sampled_from(["I;16", "F 0..1", "I 0..65535"]))
def test_exif_orientation_in_wide_modes(rgb, orientation, rendering):
    gray = _gray(rgb)
    image = GRAY_RENDERINGS[rendering](gray)
    image.getexif()[0x0112] = orientation
    seen = np.asarray(to_rgb(image))[..., 0].astype(int)
    expected = UPRIGHT[orientation](gray)
    assert seen.shape == expected.shape and np.abs(seen - expected).max() <= 1


def _wide_files(folder, gray: np.ndarray) -> dict[str, str]:
    """`gray` saved as an 8-bit PNG and in the wide and colour modes files carry."""
    files = {"8-bit": "ref.png", "I;16 png": "16.png", "I tiff": "32.tif", "F tiff": "float.tif", "CMYK jpeg": "c.jpg"}
    Image.fromarray(gray).save(folder / files["8-bit"])
    _raw16(gray, "I;16").save(folder / files["I;16 png"])
    Image.fromarray(gray.astype(np.int32) * 257).save(folder / files["I tiff"])
    Image.fromarray(gray.astype(np.float32) / 255).save(folder / files["F tiff"])
    Image.fromarray(gray).convert("CMYK").save(folder / files["CMYK jpeg"], quality=100)
    return {label: str(folder / name) for label, name in files.items()}


def _smooth_picture(seed: int, size: int = 64) -> np.ndarray:
    """A picture with structure (a blurred random field, full range), not noise."""
    field = np.random.default_rng(seed).normal(size=(size // 8, size // 8))
    big = np.asarray(Image.fromarray(field.astype(np.float32)).resize((size, size), Image.BICUBIC))
    return np.round((big - big.min()) / (big.max() - big.min()) * 255).astype(np.uint8)


@pytest.mark.parametrize("seed", [0, 1])
def test_wide_mode_files_embed_and_classify_like_8bit(tmp_path, tiny_clip, seed):
    """Through files (load_image), uploads (decode_image) and the Ray engine's rows: today a 16-bit PNG
    embeds exactly like an all-white image."""
    from clipzsl import distributed

    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    gray = _smooth_picture(seed)
    files = _wide_files(tmp_path, gray)
    embedded = embed_images(backend, list(files.values()))
    white = embed_images(backend, [Image.new("RGB", gray.shape[::-1], "white")]).embeddings[0]
    reference = embedded.embeddings[0]
    for label, row in zip(files, embedded.embeddings):
        assert float(row @ reference) > 0.999, label
        assert float(row @ white) < float(reference @ white) + 1e-3, label
    classifier = clipzsl.ZeroShotClassifier(backend, labels=["cat", "dog", "car", "tree"], cache=False)
    tops = [top for [top] in classifier.predict(list(files.values()), top_k=1)]
    assert all(label == tops[0][0] for label, _ in tops)
    for path in files.values():
        data = open(path, "rb").read()
        assert np.array_equal(np.asarray(decode_image(data, path)), np.asarray(load_image(path)))
        assert np.array_equal(np.asarray(distributed._decoded(data, path)), np.asarray(load_image(path)))
    as_array = distributed._decoded(gray.astype(np.uint16) * 257, "row")  # ray.data.read_images' 16-bit rows
    assert np.abs(np.asarray(as_array)[..., 0].astype(int) - gray).max() <= 1


def test_packaged_model_sees_a_16bit_photo_as_the_8bit_one(tmp_path):
    """One real check: the photographer of scikit-image's `camera`, as a 16-bit and as an 8-bit PNG."""
    skimage_data = pytest.importorskip("skimage.data")
    gray = skimage_data.camera()
    Image.fromarray(gray).save(tmp_path / "8.png")
    _raw16(gray, "I;16").save(tmp_path / "16.png")
    Image.new("L", gray.shape[::-1], 255).save(tmp_path / "white.png")
    classifier = clipzsl.ZeroShotClassifier(clipzsl.load_model("packaged"), labels="demo", cache=False)
    eight, sixteen, white = classifier.predict([tmp_path / n for n in ("8.png", "16.png", "white.png")], top_k=3)
    assert [label for label, _ in sixteen] == [label for label, _ in eight]
    assert np.allclose([p for _, p in sixteen], [p for _, p in eight], atol=0.01)
    assert sixteen != white  # today the 16-bit photo scores exactly as the white image
