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
