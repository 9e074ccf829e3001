"""Tip-Adapter and Tip-Adapter-F (clipzsl.tip_adapter, clipzsl.tip_training): the cache logits against the
official code's formula, unseen labels at zero-shot, saving and loading (and refusing what is damaged or
made with another model), classify/serve through either kind, and calibrated stacking's gamma."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl.adapter import AdapterError, AdapterMismatch, Calibration, CrossAttentionAdapter
from clipzsl.head import top_k, zero_shot_head
from clipzsl.images import EmbeddedImages
from clipzsl.tip_adapter import (TipAdapter, adapter_format, bind_head, load_adapter, matching_rows,
                                 write_calibration)
from clipzsl.tip_training import TipConfig, fit_tip, hold_out, search_alpha_beta, search_values


def unit(x):
    return F.normalize(x, dim=-1)


def official_tip_logits(test_features, cache_keys, cache_values, clip_weights, alpha, beta):
    """main.py's run_tip_adapter, as written there (features [N, D], cache_keys [D, N_c] after utils.py's
    permute, cache_values one-hot [N_c, K], clip_weights [D, K])."""
    clip_logits = 100. * test_features @ clip_weights
    affinity = test_features @ cache_keys
    cache_logits = ((-1) * (beta - beta * affinity)).exp() @ cache_values
    return clip_logits + cache_logits * alpha


def random_cache(seed=0, n_classes=5, shots=3, d=16, n_test=7):
    g = torch.Generator().manual_seed(seed)
    keys = unit(torch.randn(n_classes * shots, d, generator=g))
    labels = torch.arange(n_classes).repeat_interleave(shots)
    texts = unit(torch.randn(n_classes, d, generator=g))
    test = unit(torch.randn(n_test, d, generator=g))
    return keys, labels, texts, test


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), alpha=st.floats(0.0, 10.0), beta=st.floats(0.0, 15.0),
       scale=st.sampled_from([100.0, 10.8, 1.0]), bias=st.floats(-5, 5))
def test_head_is_the_official_formula_scaled(seed, alpha, beta, scale, bias):
    keys, labels, texts, test = random_cache(seed)
    adapter = TipAdapter(keys, labels, texts, alpha, beta)
    ours = adapter.head(EmbeddedImages(test), texts, scale, bias)
    official = official_tip_logits(test, keys.T, F.one_hot(labels).float(), texts.T, alpha, beta)
    torch.testing.assert_close(ours, scale / 100 * official + bias, rtol=1e-5, atol=1e-4)


def test_unseen_labels_get_zero_shot_logits_and_columns_follow_the_embeddings():
    keys, labels, texts, test = random_cache(1)
    adapter = TipAdapter(keys, labels, texts, 2.0, 5.0)
    unseen = unit(torch.randn(3, 16, generator=torch.Generator().manual_seed(9)))
    mixed = torch.cat([unseen[:1], texts[3:], unseen[1:], texts[:3]])  # seen classes shuffled among unseen
    logits = adapter.head(EmbeddedImages(test), mixed, 100.0)
    official = official_tip_logits(test, keys.T, F.one_hot(labels).float(), texts.T, 2.0, 5.0)
    zero_shot = zero_shot_head(EmbeddedImages(test), mixed, 100.0)
    torch.testing.assert_close(logits[:, [0, 3, 4]], zero_shot[:, [0, 3, 4]])
    torch.testing.assert_close(logits[:, [1, 2, 5, 6, 7]], official[:, [3, 4, 0, 1, 2]], rtol=1e-5, atol=1e-4)
    assert matching_rows(mixed, texts).tolist() == [-1, 3, 4, -1, -1, 0, 1, 2]


def test_top_k_over_label_chunks_equals_the_full_head():
    keys, labels, texts, test = random_cache(2, n_classes=6)
    adapter = TipAdapter(keys, labels, texts, 3.0, 4.0)
    others = unit(torch.randn(20, 16, generator=torch.Generator().manual_seed(3)))
    emb = torch.cat([others[:10], texts, others[10:]])
    images = EmbeddedImages(test)
    probs, ids = top_k(adapter.head, images, emb, 100.0, 0.0, "softmax", 5, label_chunk=7)
    full = torch.softmax(adapter.head(images, emb, 100.0), 1)
    expected, expected_ids = full.topk(5, 1)
    assert torch.equal(ids, expected_ids)
    torch.testing.assert_close(probs, expected)


def test_search_grid_and_choice_are_the_official_search_hp():
    assert search_values(7, 200)[:2] == [0.1, 0.1 + 6.9 / 200] and len(search_values(3, 20)) == 20
    keys, labels, texts, _ = random_cache(4, n_classes=4, shots=4)
    val = unit(keys[::2] + 0.3 * torch.randn(8, 16, generator=torch.Generator().manual_seed(5)))
    targets = labels[::2].tolist()
    adapter = TipAdapter(keys, labels, texts)
    config = TipConfig(search_scale=(5.0, 3.0), search_steps=(10, 6))
    alpha, beta, acc = search_alpha_beta(adapter, val, targets, config)
    best = (0.0, 0.0, 0.0)  # search_hp's loop, as written there (best_acc starts at 0)
    for b in search_values(5.0, 10):
        for a in search_values(3.0, 6):
            score = float((official_tip_logits(val, keys.T, F.one_hot(labels).float(), texts.T, a, b).argmax(1)
                           == torch.tensor(targets)).float().mean())
            if score > best[0]:
                best = (score, a, b)
    assert (acc, alpha, beta) == pytest.approx(best)


def test_hold_out_keeps_single_images_and_holds_one_of_few():
    keep, held = hold_out([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 0.2, seed=0)
    assert sorted(keep + held) == list(range(13)) and not set(keep) & set(held)
    assert 0 in keep and sum(1 for i in held if i in (1, 2)) == 1 and sum(1 for i in held if i >= 3) == 2


def clustered(seed=0, n_classes=4, per_class=8, d=16, noise_seed=None):
    g = torch.Generator().manual_seed(seed)
    centres = unit(torch.randn(n_classes, d, generator=g))
    texts = unit(centres + 0.9 * torch.randn(n_classes, d, generator=g))  # poor zero-shot weights
    noise = torch.Generator().manual_seed(seed if noise_seed is None else noise_seed)
    targets = torch.arange(n_classes).repeat_interleave(per_class)
    x = unit(centres[targets] + 0.35 * torch.randn(len(targets), d, generator=noise))
    return EmbeddedImages(x), targets.tolist(), texts


def test_fit_tip_caches_every_image_and_beats_poor_zero_shot():
    images, targets, texts = clustered()
    adapter, info = fit_tip(images, targets, texts, TipConfig(search_steps=(20, 10)))
    assert adapter.keys.shape[0] == len(targets) and info["searched"] and info["validation_images"] == 8
    torch.testing.assert_close(adapter.keys.detach(), images.embeddings)
    test, test_targets, _ = clustered(noise_seed=99, per_class=25)  # new images of the same classes
    y = torch.tensor(test_targets)
    acc_tip = float((adapter.head(test, texts, 100.0).argmax(1) == y).float().mean())
    acc_zs = float((zero_shot_head(test, texts, 100.0).argmax(1) == y).float().mean())
    assert acc_tip > acc_zs


def test_one_shot_keeps_the_official_defaults():
    images, targets, texts = clustered(per_class=1)
    adapter, info = fit_tip(images, targets, texts)
    assert not info["searched"] and (adapter.alpha, adapter.beta) == (1.17, 1.0)


def test_tip_f_trains_the_keys_leaving_each_own_key_out():
    images, targets, texts = clustered(per_class=10)
    adapter, info = fit_tip(images, targets, texts, TipConfig(kind="tip-f", epochs=5, search_steps=(10, 5)))
    keep, held = hold_out(targets, 0.2, 0)
    assert adapter.kind == "tip-f" and adapter.keys.shape[0] == len(keep) and info["validation_images"] == len(held)
    assert info["best_epoch"] == 0 or not torch.allclose(adapter.keys.detach(), images.embeddings[keep])
    x, keys = images.embeddings[keep][:3], adapter.keys.detach()
    weights = torch.exp(-(adapter.beta - adapter.beta * x @ keys.T))
    weights[[0, 1, 2], [0, 1, 2]] = 0  # image i leaves key i out
    expected = adapter.alpha * weights @ F.one_hot(adapter.labels, 4).float()
    torch.testing.assert_close(adapter.cache_logits(x, leave_out=torch.arange(3)).detach(), expected)


# ---------------------------------------------------------------- saved, loaded, served


@pytest.fixture(scope="module")
def backend(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def saved_tip(backend, directory, kind="tip", names=("cat", "dog", "red car")):
    keys, labels, texts, _ = random_cache(7, n_classes=len(names), d=backend.embed_dim)
    adapter = TipAdapter(keys, labels, texts, 2.0, 3.0, kind)
    adapter.save(directory, backend, ["a photo of a {}."], list(names), training={"note": "test"})
    return adapter


def test_save_load_roundtrip_kind_in_the_header_and_other_model_refused(backend, tmp_path):
    adapter = saved_tip(backend, tmp_path / "tip", kind="tip-f")
    assert adapter_format(tmp_path / "tip") == "clipzsl-tip-adapter"
    loaded = load_adapter(tmp_path / "tip", backend)
    assert isinstance(loaded, TipAdapter) and loaded.kind == "tip-f" and (loaded.alpha, loaded.beta) == (2.0, 3.0)
    for name, tensor in adapter.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[name])

    class Other:
        fingerprint, spec, embed_dim = "another-model", "other", backend.embed_dim
    with pytest.raises(AdapterMismatch, match="trained on backbone 'another-model'|model in use is 'another-model'"):
        load_adapter(tmp_path / "tip", Other())


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def edit_json(field, value):
    def damage(path):
        meta = json.loads(path.with_name("adapter.json").read_text())
        meta[field] = value
        path.with_name("adapter.json").write_text(json.dumps(meta))
    return damage


@pytest.mark.parametrize("damage, message", [
    (truncate, r"adapter\.safetensors: its sha256 differs"),
    (edit_json("alpha", 9.0), r"adapter\.json: field 'alpha' differs from the one the weights"),
    (edit_json("cache_size", 2), r"adapter\.json: field 'cache_size' differs"),
    (edit_json("beta", -1.0), r"adapter\.json: field 'beta': -1.0 \(float\) is not 0 or more"),
    (edit_json("kind", "tip-x"), r"field 'kind': expected one of"),
    (edit_json("format", "something"), r"field 'format': expected one of"),
])
def test_damaged_or_edited_tip_adapter_is_refused(backend, tmp_path, damage, message):
    saved_tip(backend, tmp_path / "tip")
    damage(tmp_path / "tip" / "adapter.safetensors")
    with pytest.raises(AdapterError, match=message):
        load_adapter(tmp_path / "tip", backend)


def test_wrong_tensor_shapes_are_refused_even_with_a_matching_checksum(backend, tmp_path):
    from clipzsl.adapter import write_adapter
    meta = {"format": "clipzsl-tip-adapter", "version": 1, "kind": "tip", "dim": backend.embed_dim,
            "cache_size": 4, "alpha": 1.0, "beta": 1.0, "backbone_fingerprint": backend.fingerprint,
            "backbone_spec": backend.spec, "templates": ["{}"], "trained_labels": ["a", "b"], "training": None}
    state = {"keys": torch.zeros(3, backend.embed_dim), "labels": torch.zeros(3, dtype=torch.long),
             "class_embeddings": torch.zeros(2, backend.embed_dim)}
    from clipzsl.tip_adapter import TipRecord
    write_adapter(tmp_path / "bad", TipRecord, meta, state)
    with pytest.raises(AdapterError, match="do not fit the config"):
        load_adapter(tmp_path / "bad", backend)
    state = {"keys": torch.zeros(4, backend.embed_dim), "labels": torch.full((4,), 5),
             "class_embeddings": torch.zeros(2, backend.embed_dim)}
    write_adapter(tmp_path / "bad2", TipRecord, meta, state)
    with pytest.raises(AdapterError, match="cache labels must index the 2 classes"):
        load_adapter(tmp_path / "bad2", backend)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    root = tmp_path_factory.mktemp("tip-pics")
    rng = np.random.default_rng(0)
    paths = []
    for name in "abc":
        p = root / f"{name}.png"
        Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    return paths


def test_classifier_scores_through_a_saved_tip_adapter_by_label_name(backend, pictures, tmp_path, caplog):
    adapter = saved_tip(backend, tmp_path / "tip")
    labels = ["boat", "dog", "cat"]  # two seen classes, by name, in another order; one unseen
    with caplog.at_level("INFO", logger="clipzsl.tip_adapter"):
        clf = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False, adapter=tmp_path / "tip")
    assert "2 of 3 labels are classes of its cache" in caplog.text
    zs = clipzsl.ZeroShotClassifier(backend, labels=labels, cache=False)
    images = zs.embed(pictures)
    assert images.tokens is None and clf.embed(pictures).tokens is None  # a Tip adapter needs no tokens
    x, emb, s, b = images.embeddings, zs.class_embeddings, backend.logit_scale, backend.logit_bias
    cache = 2.0 * torch.exp(-(3.0 - 3.0 * x @ adapter.keys.detach().T)) @ F.one_hot(adapter.labels, 3).float()
    expected = s * x @ emb.T + b + s / 100 * torch.stack([torch.zeros(len(x)), cache[:, 1], cache[:, 0]], 1)
    torch.testing.assert_close(clf.logits(images), expected, rtol=1e-5, atol=1e-5)
    assert [p[0][0] for p in clf.predict(images, top_k=1)] == [labels[i] for i in expected.argmax(1).tolist()]


def test_calibrated_stacking_only_when_labels_mix_seen_and_unseen(backend, pictures, tmp_path, caplog):
    saved_tip(backend, tmp_path / "tip")
    calibration = Calibration(0.75, ["cat", "dog", "red car"], "data", 0, 10, 0.4, 0.5)
    record = write_calibration(tmp_path / "tip", calibration)
    assert record["calibration"]["gamma"] == 0.75
    plain = clipzsl.ZeroShotClassifier(backend, labels=["boat", "dog", "cat"], cache=False)
    images = plain.embed(pictures)
    uncalibrated = TipAdapter.load(tmp_path / "tip", backend)
    uncalibrated.meta["calibration"] = None
    raw = bind_head(uncalibrated, plain.labels, plain.class_embeddings)(images, plain.class_embeddings,
                                                                       backend.logit_scale, backend.logit_bias)
    with caplog.at_level("INFO", logger="clipzsl.tip_adapter"):
        mixed = clipzsl.ZeroShotClassifier(backend, labels=["boat", "dog", "cat"], cache=False,
                                           adapter=tmp_path / "tip")
    assert "calibrated stacking: gamma 0.75 subtracted from the logits of the 2 seen labels" in caplog.text
    torch.testing.assert_close(mixed.logits(images), raw - torch.tensor([0.0, 0.75, 0.75]))
    seen_only = clipzsl.ZeroShotClassifier(backend, labels=["dog", "cat"], cache=False, adapter=tmp_path / "tip")
    alone = bind_head(uncalibrated, ["dog", "cat"], seen_only.class_embeddings)
    torch.testing.assert_close(seen_only.logits(images), alone(images, seen_only.class_embeddings,
                                                               backend.logit_scale, backend.logit_bias))


def test_gamma_field_is_validated_and_the_weights_untouched(backend, tmp_path):
    saved_tip(backend, tmp_path / "tip")
    weights = (tmp_path / "tip" / "adapter.safetensors").read_bytes()
    write_calibration(tmp_path / "tip", Calibration(0.5, ["cat"], "d", 0, 4, 0.1, 0.2))
    assert (tmp_path / "tip" / "adapter.safetensors").read_bytes() == weights
    meta = json.loads((tmp_path / "tip" / "adapter.json").read_text())
    meta["calibration"]["gamma"] = "big"
    (tmp_path / "tip" / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match="field 'calibration': expected Calibration or null"):
        load_adapter(tmp_path / "tip", backend)


def test_cross_attention_adapter_takes_a_gamma_too(backend, pictures, tmp_path):
    adapter = CrossAttentionAdapter(backend.embed_dim)
    adapter.save(tmp_path / "ca", backend, templates=["a photo of a {}."], labels=["cat", "dog"])
    write_calibration(tmp_path / "ca", Calibration(1.5, ["cat", "dog"], "d", 0, 4, 0.1, 0.2))
    clf = clipzsl.ZeroShotClassifier(backend, labels=["cat", "boat", "dog"], cache=False, adapter=tmp_path / "ca")
    zs = clipzsl.ZeroShotClassifier(backend, labels=["cat", "boat", "dog"], cache=False)
    images = clf.embed(pictures)
    torch.testing.assert_close(clf.logits(images), zs.logits(images) - torch.tensor([1.5, 0.0, 1.5]))
