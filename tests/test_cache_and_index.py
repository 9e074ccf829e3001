"""The label-embedding cache, FAISS top-k, and the image index, through the API and the CLI."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.store import StoreError

LABELS = ["cat", "dog | puppy", "car", "tree", "boat", "house", "bird"]


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def count_encoded(backend, monkeypatch):
    seen = []
    original = backend.encode_texts

    def counting(texts):
        seen.extend(texts)
        return original(texts)

    monkeypatch.setattr(backend, "encode_texts", counting)
    return seen


def test_second_classifier_encodes_nothing(tiny, tmp_path, monkeypatch):
    seen = count_encoded(tiny, monkeypatch)
    cold = clipzsl.ZeroShotClassifier(tiny, labels=LABELS, templates="simple_7", cache=tmp_path)
    assert len(seen) == 8 * 7  # 7 classes + 1 synonym, 7 templates
    warm = clipzsl.ZeroShotClassifier(tiny, labels=LABELS, templates="simple_7", cache=tmp_path)
    assert len(seen) == 8 * 7  # nothing encoded again
    torch.testing.assert_close(warm.class_embeddings, cold.class_embeddings)
    # one new label, or another template set: only what is missing is encoded
    clipzsl.ZeroShotClassifier(tiny, labels=LABELS + ["frog"], templates="simple_7", cache=tmp_path)
    assert len(seen) == 8 * 7 + 7 and sorted(seen[-7:]) == sorted(t.replace("{}", "frog") for t in clipzsl.load_templates())
    clipzsl.ZeroShotClassifier(tiny, labels=["cat", "car"], templates=["a photo of a {}."], cache=tmp_path)
    assert sorted(seen[-2:]) == ["a photo of a car.", "a photo of a cat."] and len(seen) == 8 * 7 + 9
    uncached = clipzsl.ZeroShotClassifier(tiny, labels=LABELS, templates="simple_7", cache=False)
    torch.testing.assert_close(warm.class_embeddings, uncached.class_embeddings)


def test_embeddings_of_one_model_never_serve_another(tiny_clip, tmp_path):
    from clipzsl.backends.hf import save_random_clip
    from conftest import TINY

    other = clipzsl.load_model(f"hf:{save_random_clip(tmp_path / 'other', seed=7, **TINY)}")
    first = clipzsl.ZeroShotClassifier(f"hf:{tiny_clip}", labels=LABELS, cache=tmp_path / "c")
    second = clipzsl.ZeroShotClassifier(other, labels=LABELS, cache=tmp_path / "c")
    fresh = clipzsl.ZeroShotClassifier(other, labels=LABELS, cache=False)
    torch.testing.assert_close(second.class_embeddings, fresh.class_embeddings)
    assert not torch.allclose(first.class_embeddings, second.class_embeddings)


def test_top_k_matches_dense_scores(tiny):
    clf = clipzsl.ZeroShotClassifier(tiny, labels=LABELS, cache=False)
    images = [Image.new("RGB", (40, 40), color) for color in ("red", "green", "blue", "white")]
    embedded = clf.embed(images)
    dense = clf.predict_proba(embedded)
    top = clf.predict(embedded, top_k=3)
    for row, preds in zip(dense, top):
        order = np.argsort(-row)[:3]
        assert [label for label, _ in preds] == [clf.labels[j] for j in order]
        np.testing.assert_allclose([p for _, p in preds], row[order], atol=1e-5)


def make_images(folder, colors):
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in colors.items():
        Image.new("RGB", (48, 48), color).save(folder / f"{name}.png")


def test_image_index_is_resumable_and_searchable(tiny, tmp_path):
    photos = tmp_path / "photos"
    make_images(photos, {"red": "red", "green": "green", "blue": "blue"})
    (photos / "broken.png").write_bytes(b"\x89PNG not really")
    index = ImageIndex(tmp_path / "idx", tiny)
    first = index.update(photos)
    assert (first.added, first.unchanged, len(first.failures)) == (3, 0, 1)
    again = ImageIndex(tmp_path / "idx", tiny).update(photos)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 3)  # nothing embedded twice
    make_images(photos, {"green": "yellow", "pink": "pink"})  # one changed, one new
    (photos / "red.png").unlink()
    changed = ImageIndex(tmp_path / "idx", tiny).update(photos)
    assert (changed.added, changed.updated, changed.removed, changed.unchanged) == (1, 1, 1, 1)
    results = ImageIndex(tmp_path / "idx").search("a photo of a pink square", top_k=10)  # model from meta
    assert sorted(p.split("/")[-1] for p, _ in results) == ["blue.png", "green.png", "pink.png"]
    assert [s for _, s in results] == sorted((s for _, s in results), reverse=True)
    # the best match for an image's own embedding is that image
    pink = tiny.encode_images(tiny.preprocess(Image.new("RGB", (48, 48), "pink"))[None])[0]
    assert ImageIndex(tmp_path / "idx").search(pink, top_k=1)[0][0].endswith("pink.png")


def test_index_opened_with_another_model_names_both(tiny, tmp_path):
    make_images(tmp_path / "p", {"red": "red"})
    ImageIndex(tmp_path / "idx", tiny).update(tmp_path / "p")
    with pytest.raises(StoreError, match=rf"model '{tiny.fingerprint}'.*not of 'packaged:"):
        ImageIndex(tmp_path / "idx", "packaged")


def test_cli_cache_index_search(tiny_clip, tmp_path, capsys):
    make_images(tmp_path / "p", {"red": "red", "blue": "blue"})
    model = f"hf:{tiny_clip}"
    args = ["classify", str(tmp_path / "p"), "--labels", "cat,dog", "--model", model, "--format", "json"]
    assert main(args + ["--cache-dir", str(tmp_path / "c")]) == 0
    first = json.loads(capsys.readouterr().out)
    assert main(args + ["--cache-dir", str(tmp_path / "c")]) == 0
    assert json.loads(capsys.readouterr().out) == first
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "2 labels" in capsys.readouterr().out
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c")]) == 0
    assert main(["cache", "info", "--cache-dir", str(tmp_path / "c")]) == 0
    assert "labels" not in capsys.readouterr().out.split("\n", 2)[-1]
    assert main(args + ["--no-cache", "--cache-dir", str(tmp_path / "none")]) == 0
    assert not (tmp_path / "none").exists()
    capsys.readouterr()
    assert main(["index", "images", str(tmp_path / "p"), "--out", str(tmp_path / "idx"), "--model", model]) == 0
    assert "2 images (2 added" in capsys.readouterr().out
    assert main(["search", str(tmp_path / "idx"), "a red thing", "--top-k", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[1].split()[0].endswith(".png")
    assert main(["search", str(tmp_path / "nope"), "x"]) == 2
