"""Cross-attention adapter: equality to zero-shot at init, class-agnosticism, persistence,
training, protocol metrics, explain and the CLI. Fast: random tensors and the tiny HF CLIP."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import clipzsl
from clipzsl import baselines
from clipzsl import evaluation as ev
from clipzsl import metrics
from clipzsl.adapter import AdapterMismatch, CrossAttentionAdapter
from clipzsl.images import EmbeddedImages, embed_images_cached
from clipzsl.training import TrainConfig, fit_adapter, fit_with_selection, seen_split
from clipzsl.cli import main


def rand_feats(n=8, t=9, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return EmbeddedImages(F.normalize(torch.randn(n, d, generator=g), dim=-1), torch.randn(n, t, d, generator=g))


def rand_classes(c=5, d=16, seed=1):
    return F.normalize(torch.randn(c, d, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_equals_zero_shot_at_init_and_with_alpha_zero():
    f, t = rand_feats(), rand_classes()
    adapter = CrossAttentionAdapter(16, heads=4)
    zs = 20.0 * f.embeddings @ t.T + 0.5
    for mode in (adapter.eval, adapter.train):
        mode()
        out = adapter(t, f.tokens, f.embeddings, 20.0, 0.5)
        assert torch.equal(out, zs)
    # trained weights but alpha forced back to 0: still exactly zero-shot
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.1 * torch.randn_like(p))
        adapter.alpha.zero_()
    assert torch.equal(adapter.head(f, t, 20.0, 0.5), zs)
    with torch.no_grad():
        adapter.alpha.fill_(1.0)
    assert not torch.allclose(adapter.head(f, t, 20.0, 0.5), zs)


def test_class_agnostic_any_number_of_new_classes():
    adapter = CrossAttentionAdapter(16, heads=2)
    count = adapter.num_parameters()
    f = rand_feats()
    with torch.no_grad():
        adapter.alpha.fill_(0.5)
    for c in (1, 3, 50):
        t = rand_classes(c, seed=c)
        assert adapter.head(f, t, 10.0).shape == (8, c)
        assert adapter.attention(t, f.tokens, f.embeddings).shape == (8, c, 2, 9 + 1)
        assert adapter.num_parameters() == count
    # a class's score does not depend on which other classes are present
    t = rand_classes(6, seed=3)
    full = adapter.head(f, t, 10.0)
    assert torch.allclose(adapter.head(f, t[[4, 1]], 10.0), full[:, [4, 1]], atol=1e-5)


def test_attention_rows_are_distributions():
    adapter = CrossAttentionAdapter(16, heads=4)
    f, t = rand_feats(), rand_classes()
    attn = adapter.attention(t, f.tokens, f.embeddings)
    assert torch.allclose(attn.sum(-1), torch.ones(8, 5, 4), atol=1e-5)
    assert (attn >= 0).all()


def toy_problem(seed=0, n_classes=6, per_class=12, d=16, t=9):
    """Classes whose zero-shot signal is weak but whose tokens carry the class text strongly."""
    g = torch.Generator().manual_seed(seed)
    text = rand_classes(n_classes, d, seed=seed + 100)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    noise = torch.randn(len(labels), d, generator=g)
    pooled = F.normalize(noise + 0.3 * text[labels], dim=-1)
    tokens = torch.randn(len(labels), t, d, generator=g)
    tokens[:, 0] += 4 * text[labels]  # one region shows the object
    return EmbeddedImages(pooled, tokens), labels, text


def test_training_reduces_seen_loss_and_leaves_zero_shot_at_start():
    feats, labels, text = toy_problem()
    cfg = TrainConfig(epochs=15, lr=1e-2, batch_size=16, consistency=0.0, seed=0)
    before = F.cross_entropy(10.0 * feats.embeddings @ text.T, labels)
    result = fit_adapter(feats, labels, text, 10.0, cfg)
    after = F.cross_entropy(result.adapter.head(feats, text, 10.0), labels)
    assert float(after) < 0.7 * float(before)
    assert float(result.adapter.alpha.detach()) > 0
    assert result.epoch_seconds > 0


def test_consistency_keeps_logits_closer_to_zero_shot():
    feats, labels, text = toy_problem()
    zs = 10.0 * feats.embeddings @ text.T
    kl = {}
    for lam in (0.0, 10.0):
        res = fit_adapter(feats, labels, text, 10.0, TrainConfig(epochs=10, lr=1e-2, batch_size=16,
                                                                   consistency=lam, seed=0))
        kl[lam] = float(ev_kl(res.adapter.head(feats, text, 10.0), zs))
    assert kl[10.0] < kl[0.0]


def ev_kl(logits, zs):
    from clipzsl.training import kl_to_zero_shot
    return kl_to_zero_shot(logits, zs)


def test_fit_with_selection_never_sees_unseen_classes():
    feats, labels, text = toy_problem(n_classes=10, per_class=6)
    seen = list(range(6))
    keep = [i for i, y in enumerate(labels.tolist()) if y in seen]
    calls = []
    orig = text.clone()
    result, info = fit_with_selection(feats.subset(keep), labels[keep].tolist(), text, seen, 10.0, seed=0,
                                      grid=({"lr": 1e-2},), base=TrainConfig(epochs=3, batch_size=16),
                                      log=calls.append)
    split = info["val_split"]
    assert set(split["train_classes"]) | set(split["val_classes"]) == set(seen)
    assert not set(split["train_classes"]) & set(split["val_classes"])
    assert torch.equal(text, orig) and calls


def test_seen_split_is_disjoint_and_deterministic():
    labels = np.repeat(np.arange(10), 5)
    a = seen_split(labels, range(10), seed=1)
    b = seen_split(labels, range(10), seed=1)
    assert a == b
    tr, vb, vn, trc, vc = a
    assert not (set(tr) & set(vb)) and not (set(tr) & set(vn)) and len(tr) + len(vb) + len(vn) == 50
    assert set(labels[vn]) == set(vc) and not set(labels[tr]) & set(vc)


def test_save_load_roundtrip_and_wrong_backbone(tiny_clip, tmp_path):
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    adapter = CrossAttentionAdapter(backend.embed_dim, heads=4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
    adapter.save(tmp_path / "ad", backend, templates=["a photo of a {}."], labels=["cat", "dog"])
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["backbone_fingerprint"] == backend.fingerprint and meta["trained_labels"] == ["cat", "dog"]
    loaded = CrossAttentionAdapter.load(tmp_path / "ad", backend)
    for (k, v), (k2, v2) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)

    class Other:
        fingerprint, spec, embed_dim = "something-else", "other", backend.embed_dim
    with pytest.raises(AdapterMismatch, match="trained on backbone"):
        CrossAttentionAdapter.load(tmp_path / "ad", Other())
    with pytest.raises(AdapterMismatch, match="dim"):
        clipzsl.ZeroShotClassifier(backend, labels=["cat", "dog"], adapter=CrossAttentionAdapter(backend.embed_dim + 4),
                                   cache=False)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("pics")
    rng = np.random.default_rng(0)
    paths = []
    for name, size in (("a", (80, 60)), ("b", (50, 70)), ("c", (64, 64))):
        p = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_classifier_with_adapter_equals_zero_shot_at_init(tiny_clip, pictures, tmp_path):
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    labels = ["cat", "dog", "car"]
    zs = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False)
    adapter = CrossAttentionAdapter(backend.embed_dim)
    adapter.save(tmp_path / "ad", backend)
    with_adapter = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False, adapter=tmp_path / "ad")
    np.testing.assert_allclose(with_adapter.predict_proba(pictures), zs.predict_proba(pictures), atol=1e-6)
    attn = with_adapter.attention(pictures)
    assert attn.shape[:3] == (3, 3, 4)
    assert [p[0][0] for p in with_adapter.predict(pictures, top_k=1)] == [p[0][0] for p in zs.predict(pictures, top_k=1)]


def test_feature_cache_roundtrip(tiny_clip, pictures, tmp_path):
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    a = embed_images_cached(backend, pictures, tmp_path)
    files = list((tmp_path / "image-features").glob("*.safetensors"))
    assert len(files) == 1
    b = embed_images_cached(backend, pictures, tmp_path)
    assert torch.equal(a.embeddings, b.embeddings)
    assert torch.allclose(a.tokens, b.tokens, atol=1e-2)
    assert a.tokens.shape == (3, 16, backend.embed_dim)  # 64 px / 16 px patches


# ---------------------------------------------------------------- protocol metrics on hand-made scores


def test_harmonic_mean_and_base_novel_split():
    assert metrics.harmonic_mean(0.5, 0.5) == 0.5
    assert metrics.harmonic_mean(1.0, 0.0) == 0.0
    assert math.isclose(metrics.harmonic_mean(0.8, 0.4), 2 * 0.32 / 1.2)
    assert math.isnan(metrics.harmonic_mean(0.8, math.nan))
    base, novel = ev.base_novel_split(["zebra", "apple", "mango", "cat", "bee"])
    assert base == [1, 4] and novel == [0, 2, 3]  # apple, bee | cat, mango, zebra


def test_gzsl_metrics_and_calibrated_stacking():
    # columns: 0, 1 seen; 2, 3 unseen. Unseen images are beaten by seen columns by a margin of 1.
    logits = torch.tensor([[5.0, 1, 0, 0], [1, 5, 0, 0], [3, 0, 2, 0], [0, 3, 0, 2]])
    labels = [0, 1, 2, 3]
    mask = torch.tensor([True, True, False, False])
    plain = ev.gzsl_metrics(logits, labels, mask)
    assert (plain["seen"], plain["unseen"], plain["H"]) == (1.0, 0.0, 0.0)
    cs = ev.gzsl_metrics(logits, labels, mask, gamma=1.5)
    assert (cs["seen"], cs["unseen"], cs["H"]) == (1.0, 1.0, 1.0)
    assert ev.gzsl_metrics(logits, labels, mask, gamma=6)["seen"] == 0.0


def test_choose_gamma_uses_validation_scores_only():
    mask = torch.tensor([True, True, False, False])
    val = torch.tensor([[5.0, 1, 0, 0], [1, 5, 0, 0], [3, 0, 2.5, 0], [0, 3, 0, 2.5]])  # needs gamma in (0.5, 4)
    gamma = ev.choose_gamma(val, [0, 1, 2, 3], mask)
    assert 0.5 < gamma < 4
    # a different validation set gives a different gamma: it is derived from val, not fixed
    val2 = torch.tensor([[5.0, 1, 0, 0], [1, 5, 0, 0], [1, 0, 2, 0], [0, 1, 0, 2]])  # already right at 0
    assert ev.choose_gamma(val2, [0, 1, 2, 3], mask) == 0.0


def test_base_to_novel_scores_each_subset_separately():
    feats = EmbeddedImages(torch.eye(4), torch.zeros(4, 1, 4))
    emb = torch.eye(4)
    p = baselines.Problem(feats, [0, 1], emb, [0, 1], 10.0)
    res = ev.base_to_novel(baselines.zero_shot(p), feats, [0, 1, 2, 3], [0, 1], [2, 3])
    assert res == {"base": 1.0, "novel": 1.0, "H": 1.0}
    # swap the novel images' labels: novel accuracy drops to 0, base untouched
    res = ev.base_to_novel(baselines.zero_shot(p), feats, [0, 1, 3, 2], [0, 1], [2, 3])
    assert res["base"] == 1.0 and res["novel"] == 0.0 and res["H"] == 0.0


def test_baselines_run_and_linear_probe_cannot_score_novel():
    feats, labels, text = toy_problem(n_classes=8, per_class=8)
    seen = [0, 1, 2, 3, 4, 5]
    keep = [i for i, y in enumerate(labels.tolist()) if y in seen]
    p = baselines.Problem(feats.subset(keep), labels[keep].tolist(), text, seen, 10.0)
    test_idx = list(range(len(labels)))
    for name in ("linear probe", "CLIP-Adapter", "Tip-Adapter-F"):
        fitted = baselines.METHODS[name](p, seed=0)
        res = ev.base_to_novel(fitted, feats.subset(test_idx), labels.tolist(), seen, [6, 7])
        assert 0 <= res["base"] <= 1
        assert math.isnan(res["novel"]) == (name == "linear probe")


# ---------------------------------------------------------------- explain and CLI


def test_explain_writes_pngs_of_image_size_plus_scale_and_caption(tiny_clip, pictures, tmp_path):
    from clipzsl.explain import explain

    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    out = explain(backend, pictures[:2], ["cat", "red car"], tmp_path / "sim").written
    assert len(out) == 4
    for path in out:
        with Image.open(path) as im, Image.open(pictures[0 if path.name.startswith("a__") else 1]) as src:
            assert im.width > src.width and im.height > src.height and im.format == "PNG"
    adapter = CrossAttentionAdapter(backend.embed_dim)
    out2 = explain(backend, pictures[2:], ["cat", "dog"], tmp_path / "att", adapter=adapter).written
    with Image.open(out2[0]) as im:
        assert im.width > 64 and im.height > 64


def test_cli_train_adapter_and_explain(tiny_clip, tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    data = tmp_path / "data"
    for k, name in enumerate(["cat", "dog", "red_car", "tree", "boat"]):
        (data / name).mkdir(parents=True)
        for j in range(4):
            arr = np.full((48, 48, 3), 40 * k, np.uint8) + rng.integers(0, 30, (48, 48, 3), dtype=np.uint8)
            Image.fromarray(arr).save(data / name / f"{j}.png")
    (tmp_path / "seen.txt").write_text("cat\ndog\nred_car\ntree\n")
    out = tmp_path / "adapter"
    status = main(["train-adapter", str(data), "--out", str(out), "--seen", str(tmp_path / "seen.txt"),
                   "--model", f"hf:{tiny_clip}", "--epochs", "2", "--lr", "0.01"])
    meta = json.loads((out / "adapter.json").read_text())
    assert status == (1 if meta["training"]["untrained"] else 0)  # a random tiny model may not beat epoch 0
    assert meta["trained_labels"] == ["cat", "dog", "red car", "tree"]
    assert (out / "adapter.safetensors").exists()
    assert main(["explain", str(data / "boat" / "0.png"), "--labels", "boat,cat", "--adapter", str(out),
                 "--model", f"hf:{tiny_clip}", "--out", str(tmp_path / "ex")]) == 0
    assert sorted(p.name for p in (tmp_path / "ex").iterdir()) == ["0__boat.png", "0__cat.png"]
    assert main(["eval", str(data), "--model", f"hf:{tiny_clip}", "--seeds", "1",
                 "--methods", "zero-shot,ours", "--output", str(tmp_path / "ev.json")]) == 0
    res = json.loads((tmp_path / "ev.json").read_text())
    assert set(res) == {"zero-shot", "ours"} and "calibrated" in res["ours"][0]["gzsl"]
