"""Issue 11: one head and one top-k for every path, explicit caches (--no-cache writes nothing,
`cache info/clear` see every cache, even a damaged one), no hidden process state."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipzsl
from clipzsl.adapter import CrossAttentionAdapter
from clipzsl.cli import main
from clipzsl.head import cosine_logits, probabilities, top_k, zero_shot_head
from clipzsl.images import EmbeddedImages, embed_images_cached
from clipzsl.training import TrainConfig


def rand_images(n=7, t=4, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EmbeddedImages(F.normalize(torch.randn(n, d, generator=g), dim=-1), torch.randn(n, t, d, generator=g))


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_streaming_top_k_equals_the_dense_probabilities_through_either_head(kind):
    images = rand_images()
    classes = F.normalize(torch.randn(50, 16, generator=torch.Generator().manual_seed(1)), dim=-1)
    adapter = CrossAttentionAdapter(16, heads=2)
    with torch.no_grad():
        adapter.alpha.fill_(0.7)
    for head in (zero_shot_head, adapter.head):
        dense = probabilities(head(images, classes, 12.0, -1.0), kind)
        probs, ids = top_k(head, images, classes, 12.0, -1.0, kind, 5, image_chunk=3, label_chunk=8)
        expected, expected_ids = dense.topk(5, dim=1)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(probs, expected, atol=1e-6, rtol=1e-5)


def test_top_k_caps_k_at_the_number_of_labels_and_refuses_k_below_one():
    images, classes = rand_images(), F.normalize(torch.randn(3, 16), dim=-1)
    assert top_k(zero_shot_head, images, classes, 10.0, 0.0, "softmax", 10)[1].shape == (7, 3)
    with pytest.raises(ValueError, match="top_k must be at least 1"):
        top_k(zero_shot_head, images, classes, 10.0, 0.0, "softmax", 0)


def test_the_zero_shot_head_is_the_cosine_formula():
    images, classes = rand_images(), F.normalize(torch.randn(4, 16), dim=-1)
    assert torch.equal(zero_shot_head(images, classes, 3.0, 0.5), 3.0 * images.embeddings @ classes.T + 0.5)
    assert torch.equal(cosine_logits(images.embeddings, classes, 3.0, 0.5), zero_shot_head(images, classes, 3.0, 0.5))


def test_classifier_predict_goes_through_the_adapter_head(tiny_clip):
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    adapter = CrossAttentionAdapter(model.embed_dim)
    with torch.no_grad():
        adapter.alpha.fill_(2.0)
        adapter.out.weight.mul_(-1)
    clf = clipzsl.ZeroShotClassifier(model, labels=["cat", "dog", "car", "tree"], cache=False, adapter=adapter)
    images = [Image.new("RGB", (40, 40), c) for c in ("red", "green", "blue")]
    embedded = clf.embed(images)
    assert embedded.tokens is not None  # an adapter needs them
    dense = clf.predict_proba(embedded)
    for row, preds in zip(dense, clf.predict(embedded, top_k=2)):
        order = np.argsort(-row)[:2]
        assert [label for label, _ in preds] == [clf.labels[j] for j in order]
        np.testing.assert_allclose([p for _, p in preds], row[order], atol=1e-6)


def test_train_config_is_frozen_and_adapter_meta_is_a_constructor_field(tmp_path):
    with pytest.raises(Exception):
        TrainConfig().epochs = 3  # a shared default cannot be changed by one caller
    assert CrossAttentionAdapter(8).meta == {}
    CrossAttentionAdapter(8).save(tmp_path / "ad", fingerprint="fp", templates=["a {}."])
    assert CrossAttentionAdapter.load(tmp_path / "ad").meta["templates"] == ["a {}."]


def test_classify_no_cache_writes_nothing_anywhere(tmp_path):
    """The packaged model included: its concepts are built in memory, not under HOME or XDG."""
    empty = tmp_path / "home"
    empty.mkdir()
    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    env = {**os.environ, "HOME": str(empty), "XDG_CACHE_HOME": str(empty / "xdg"),
           "CLIPZSL_CACHE_DIR": str(empty / "clipzsl")}
    result = subprocess.run([sys.executable, "-m", "clipzsl.cli", "classify", str(tmp_path / "a.png"),
                             "--labels", "cat,dog", "--no-cache", "--format", "json"],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)[0]["predictions"]
    assert "in memory only" in result.stderr
    assert list(empty.rglob("*")) == []


def test_cache_info_and_clear_cover_every_cache_even_a_damaged_one(tiny_clip, tmp_path, capsys):
    cache = tmp_path / "c"
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    Image.new("RGB", (40, 40), "red").save(tmp_path / "a.png")
    clipzsl.ZeroShotClassifier(model, labels=["cat", "dog"], cache=cache)
    embed_images_cached(model, [str(tmp_path / "a.png")], cache)
    (cache / "conse-imagenet-minilm-0123456789abcdef.npy").write_bytes(b"x" * 10)
    damaged = cache / "labels" / "damaged"
    damaged.mkdir(parents=True)
    (damaged / "meta.json").write_text("{not json")
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "2 labels" in out and "damaged" in out
    assert "packaged concept embeddings: 1 file(s)" in out and "image features" in out and ": 1 file(s)" in out
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert "cleared 2 label cache(s), 1 packaged concept file(s) and 1 image-feature file(s)" in capsys.readouterr().out
    assert not damaged.exists()
    assert not list(cache.glob("conse-*")) and not list((cache / "image-features").glob("*"))
    assert main(["cache", "info", "--cache-dir", str(cache)]) == 0
    assert "labels  " not in capsys.readouterr().out


def test_loading_a_hub_model_offline_leaves_the_process_online(monkeypatch):
    import huggingface_hub.constants

    import clipzsl.backends.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    with pytest.raises(RuntimeError, match="cannot be reached"):
        clipzsl.load_model("hf:openai/clip-vit-base-patch32")
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False
    assert "HF_HUB_OFFLINE" not in os.environ
