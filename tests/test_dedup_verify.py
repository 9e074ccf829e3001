"""Near-duplicate candidates verified by perceptual hashes of the files (clipzsl.dedup, `verify="hash"`)."""
import io
import shutil
import tarfile
from pathlib import Path

import imagehash
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageOps

from clipzsl.dedup import (DEFAULT_HASH_DISTANCE, HASH_BITS, ImageHashes, check_verify, find_duplicates, hash_images,
                           verify_pairs)
from clipzsl.errors import InputError
from clipzsl.image_index import ImageIndex

PHOTOS = Path(np.__file__).parents[1] / "skimage" / "data"
HASHERS = {"phash": imagehash.phash, "dhash": imagehash.dhash, "whash": imagehash.whash}


def direct(image: Image.Image, method: str) -> np.ndarray:
    """imagehash's own hash of an image, as bools."""
    return np.asarray(HASHERS[method](image).hash, bool).ravel()


def indexed(tmp_path, tiny, paths, vectors=None):
    """An index of `paths` (strings) holding `vectors` (default: all one vector: every pair a candidate)."""
    vectors = np.ones((len(paths), tiny.embed_dim), np.float32) if vectors is None else vectors
    vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    index = ImageIndex(tmp_path / "idx", tiny)
    index.add_vectors([(list(map(str, paths)), vectors.astype(np.float32))], "Flat")
    return index


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["RGB", "L"]), st.sampled_from(sorted(HASHERS)),
       st.integers(8, 80), st.integers(8, 80))
def test_hashes_are_imagehash_on_the_files(tmp_path_factory, seed, mode, method, width, height):
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, 3) if mode == "RGB" else (height, width), dtype=np.uint8)
    folder = tmp_path_factory.mktemp("hash")
    Image.fromarray(pixels, mode).save(folder / "a.png")
    Image.fromarray(pixels, mode).save(folder / "b.jpg", quality=70)
    paths = [str(folder / "a.png"), str(folder / "b.jpg")]
    hashes = hash_images(paths, [0, 1], method, progress=False)
    assert hashes.known.all() and not hashes.no_file and not hashes.unreadable
    for row, path in enumerate(paths):
        with Image.open(path) as image:
            np.testing.assert_array_equal(hashes.bits[row], direct(image, method))


def test_a_rotated_jpeg_and_a_tar_member_are_hashed_as_they_are_seen(tmp_path):
    photo = Image.open(PHOTOS / "chelsea.png").convert("RGB")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotated 90 degrees
    photo.save(tmp_path / "rotated.jpg", exif=exif, quality=90)
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        tar.add(PHOTOS / "coffee.png", arcname="000/coffee.png")
    paths = [str(tmp_path / "rotated.jpg"), f"{tmp_path / 'shard.tar'}/000/coffee.png", str(tmp_path / "gone.png")]
    hashes = hash_images(paths, [0, 1, 2], "phash", progress=False)
    with Image.open(tmp_path / "rotated.jpg") as image:
        np.testing.assert_array_equal(hashes.bits[0], direct(ImageOps.exif_transpose(image), "phash"))
    with Image.open(PHOTOS / "coffee.png") as image:
        np.testing.assert_array_equal(hashes.bits[1], direct(image, "phash"))
    assert hashes.known.tolist() == [True, True, False] and hashes.no_file == [paths[2]]


def test_verify_pairs_keeps_close_hashes_and_falls_back_to_the_embedding_without_one():
    bits = np.zeros((4, HASH_BITS), bool)
    bits[1, :3] = True  # 3 bits from row 0
    bits[2, :30] = True  # 30 bits from row 0
    hashes = ImageHashes(bits, np.array([True, True, True, False]))
    vectors = np.array([[1, 0], [0.6, 0.8], [1, 0], [0.99, np.sqrt(1 - 0.99**2)]], np.float32)
    pairs = np.array([[0, 1], [0, 2], [0, 3], [1, 3]])
    kept = verify_pairs(pairs, vectors, hashes, distance=3, fallback=0.98)
    assert kept.tolist() == [[0, 1], [0, 3]]  # 0-2: 30 bits apart though equal vectors; 1-3: no hash, cosine 0.77
    assert verify_pairs(pairs, vectors, hashes, distance=2, fallback=0.995).tolist() == []


def test_a_reencoded_copy_is_grouped_and_two_different_photos_alike_to_the_model_are_not(tmp_path, tiny):
    for name in ("chelsea.png", "grass.png", "gravel.png"):
        shutil.copy(PHOTOS / name, tmp_path / name)
    Image.open(PHOTOS / "chelsea.png").convert("RGB").save(tmp_path / "chelsea-q50.jpg", quality=50)
    paths = [tmp_path / n for n in ("chelsea.png", "chelsea-q50.jpg", "grass.png", "gravel.png")]
    index = indexed(tmp_path, tiny, paths)  # one vector for all four: what the embedding alone cannot tell apart
    assert [len(g.paths) for g in find_duplicates(index, verify="none", progress=False).groups] == [4]
    found = find_duplicates(index, progress=False)
    assert [g.paths for g in found.groups] == [[str(paths[0]), str(paths[1])]]
    assert found.candidates == 6 and not found.no_file and not found.unreadable


def test_an_unreadable_file_is_reported_and_its_pairs_fall_back_to_the_embedding(tmp_path, tiny):
    shutil.copy(PHOTOS / "coffee.png", tmp_path / "coffee.png")
    (tmp_path / "broken.png").write_bytes((PHOTOS / "coffee.png").read_bytes()[:300])
    paths = [tmp_path / "coffee.png", tmp_path / "broken.png"]
    found = find_duplicates(indexed(tmp_path, tiny, paths), 0.9, progress=False)
    assert [f.source for f in found.unreadable] == [str(paths[1])] and "truncated" in found.unreadable[0].reason
    assert [len(g.paths) for g in found.groups] == [2]  # cosine 1 >= the fallback 0.97
    assert "0 images without a file and 1 unreadable" in found.describe()
    vectors = np.array([[1, 0], [0.95, np.sqrt(1 - 0.95**2)]], np.float32)
    vectors = np.pad(vectors, ((0, 0), (0, tiny.embed_dim - 2)))
    (tmp_path / "b").mkdir()
    found = find_duplicates(indexed(tmp_path / "b", tiny, paths, vectors), 0.9, progress=False)
    assert found.candidates == 1 and not found.groups  # 0.95 is a candidate, not enough on the embedding alone


@pytest.mark.parametrize("verify, distance, message", [("phash", 8, "choose one of hash, none"),
                                                       ("hash", -1, "from 0 to 64"), ("hash", 65, "from 0 to 64"),
                                                       ("hash", 2.5, "whole number")])
def test_a_wrong_verification_is_refused(verify, distance, message):
    with pytest.raises(InputError, match=message):
        check_verify(verify, distance)
    assert check_verify("none", DEFAULT_HASH_DISTANCE) == ("none", DEFAULT_HASH_DISTANCE)


def photo_index(tmp_path, tiny_clip, capsys):
    """An index (tiny random model) of a photo, its JPEG copy and a corrupt file, built by the command line."""
    from clipzsl.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(PHOTOS / "chelsea.png", photos / "chelsea.png")
    Image.open(PHOTOS / "chelsea.png").convert("RGB").save(photos / "copy.jpg", quality=50)
    idx = str(tmp_path / "idx")
    assert main(["index", "images", str(photos), "--out", idx, "--model", f"hf:{tiny_clip}"]) == 0
    capsys.readouterr()
    return photos, idx


def test_index_dedup_verify_and_hash_distance_options(tmp_path, tiny_clip, capsys):
    from clipzsl.cli import main

    photos, idx = photo_index(tmp_path, tiny_clip, capsys)
    assert main(["index", "dedup", idx, "--threshold", "0.5", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert len(out.splitlines()) == 3 and "cosine similarity >= 0.5 and phash distance <= " in err
    assert main(["index", "dedup", idx, "--threshold", "0.5", "--hash-distance", "0", "--verify", "none"]) == 0
    assert "cosine similarity >= 0.5; --hide" in capsys.readouterr().err
    (photos / "copy.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    assert main(["index", "dedup", idx, "--threshold", "0.5"]) == 1
    err = capsys.readouterr().err
    assert f"clipzsl: unreadable {photos / 'copy.jpg'}: " in err and "1 unreadable: their pairs by the embedding" in err
    assert main(["index", "dedup", idx, "--hash-distance", "65"]) == 2
    assert "from 0 to 64" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_status:
        main(["index", "dedup", idx, "--verify", "pixels"])
    assert exit_status.value.code == 2 and "invalid choice: 'pixels'" in capsys.readouterr().err
