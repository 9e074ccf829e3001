"""The packaged model's confidence-keeping heat maps, the bias check `maps.border_share`, `maps.square_box`, and the
localisation benchmark's measures on hand-made masks and maps."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image
from skimage import data as skimage_data

import clipzsl
from benchmarks import bench_localisation as bench
from clipzsl import ZeroShotClassifier, maps, packaged_maps
from clipzsl.errors import InputError

LABELS = ["cat", "cup of coffee", "rocket"]


@pytest.fixture(scope="module")
def classifier():
    return ZeroShotClassifier(clipzsl.load_model("packaged"), LABELS, cache=False)


@pytest.fixture(scope="module")
def image():
    return Image.fromarray(skimage_data.chelsea()).resize((150, 100))


@pytest.fixture(scope="module")
def network(classifier, image):
    """The ImageNet classifier read by hand on the input at UPSCALE times its size: (image probabilities [1000],
    per-cell logits [T, 1000], the grid's side)."""
    model = classifier.model
    pixels = model.normalize_pixels(model.pixels_uint8(image)[None]).float()
    pixels = F.interpolate(pixels, scale_factor=packaged_maps.UPSCALE, mode="bilinear", align_corners=False)
    with torch.no_grad():
        features = model.image_model.forward_features(pixels)[0]  # [channels, h, w]
        fc = model.image_model.classifier
        cells = features.flatten(1).T @ fc.weight.T + fc.bias
        image_probs = (features.mean((1, 2)) @ fc.weight.T + fc.bias).softmax(-1)
    return image_probs, cells, features.shape[-1]


def top10_conse(model, probs):
    p, idx = probs.topk(10, dim=-1)
    return torch.einsum("tk,tkd->td", p, model.concepts[idx])


def drawn(classifier, image, method):
    heat_map, = classifier.heatmaps([image], method=method)
    assert heat_map.method == method and heat_map.box == maps.image_view(classifier.model, image).box(150, 100)
    return heat_map.grid


def test_conse_dot_is_each_cells_unnormalised_conse_embedding_dotted_with_each_label(classifier, image, network):
    _, cells, side = network
    expected = top10_conse(classifier.model, cells.softmax(-1)) @ classifier.class_embeddings.T  # [T, C]
    grid = drawn(classifier, image, "conse_dot")
    assert grid.shape == (3, side, side) and side == 7 * packaged_maps.UPSCALE
    assert np.allclose(grid, expected.T.reshape(3, side, side).numpy(), atol=1e-4)


def test_conse_centred_is_conse_dot_less_each_cells_mean_over_the_labels(classifier, image, network):
    _, cells, side = network
    tokens = top10_conse(classifier.model, cells.softmax(-1))
    centred = classifier.class_embeddings - classifier.class_embeddings.mean(0)  # the labels less their mean
    expected = (tokens @ centred.T).T.reshape(3, side, side).numpy()
    grid = drawn(classifier, image, "conse_centred")
    assert np.allclose(grid, expected, atol=1e-4) and np.allclose(grid.sum(0), 0, atol=1e-4)
    one = classifier.class_embeddings[:1]  # a single label keeps its conse_dot map
    pixels = classifier.model.normalize_pixels(classifier.model.pixels_uint8(image)[None])
    with torch.no_grad():
        assert torch.allclose(packaged_maps.conse_centred(classifier.model, pixels, one),
                              packaged_maps.conse_dot(classifier.model, pixels, one))


def test_confident_cosine_is_the_cosine_times_the_cells_top_class_probability(classifier, image, network):
    _, cells, side = network
    probs = cells.softmax(-1)
    cosine = F.normalize(top10_conse(classifier.model, probs), dim=-1) @ classifier.class_embeddings.T
    expected = cosine * probs.max(-1).values[:, None]
    assert np.allclose(drawn(classifier, image, "confident_cosine"), expected.T.reshape(3, side, side).numpy(),
                       atol=1e-5)


def test_cam_sums_the_top_classes_spatial_softmax_weighted_by_probability_and_relevance(classifier, image, network):
    image_probs, cells, side = network
    p, top = image_probs.topk(10)
    relevance = (classifier.model.concepts[top] @ classifier.class_embeddings.T).clamp_min(0)  # [10, C]
    activation = cells[:, top].softmax(0)  # [T, 10]
    expected = activation @ (p[:, None] * relevance)  # [T, C]
    assert np.allclose(drawn(classifier, image, "cam"), expected.T.reshape(3, side, side).numpy(), atol=1e-6)


def test_the_packaged_methods_apply_to_the_packaged_model_only_and_come_first(classifier, tiny_clip):
    tiny = clipzsl.load_model(f"hf:{tiny_clip}")
    packaged = maps.methods_for(classifier.model)
    assert packaged[:6] == ["conse_multiscale", "conse_dot", "conse_flip", "conse_centred", "confident_cosine", "cam"]
    assert "cosine" in packaged
    assert maps.default_method(classifier.model) == packaged[0]
    assert not set(packaged[:6]) & set(maps.methods_for(tiny))
    with pytest.raises(InputError, match="does not apply"):
        maps.method_named(tiny, "conse_dot")
    with pytest.raises(InputError, match="only the packaged model"):
        packaged_maps.conse_dot(tiny, torch.zeros(1, 3, 64, 64), torch.zeros(3, tiny.embed_dim))


def ring_map(side=10):
    grid = np.full((1, side, side), -1.0, np.float32)  # negative values are no energy
    grid[0, 0, :] = grid[0, -1, :] = grid[0, :, 0] = grid[0, :, -1] = 2.0
    return maps.HeatMap(grid, (0, 0, 100, 100), "test")


def test_border_share_is_the_positive_energy_in_the_outer_band():
    assert maps.border_share(ring_map(), 0, band=0.1) == pytest.approx(1.0)
    # half of each ring cell is in the band, three quarters of each corner cell
    assert maps.border_share(ring_map(), 0, band=0.05) == pytest.approx((32 * 0.5 + 4 * 0.75) / 36)
    even = maps.HeatMap(np.ones((1, 7, 7), np.float32), (0, 0, 70, 70), "test")
    assert maps.border_share(even, 0, band=0.1) == pytest.approx(1 - 0.8 ** 2)
    assert maps.border_share(maps.HeatMap(-even.grid, even.box, "test"), 0) == 0.0


def test_cell_shares_lays_the_grid_over_its_box():
    mask = np.zeros((40, 60), bool)
    mask[:, :30] = True  # the left half of the image
    heat_map = maps.HeatMap(np.zeros((1, 2, 2), np.float32), (10, 0, 50, 40), "test")  # a centre square
    assert np.allclose(bench.cell_shares(mask, heat_map), [[1.0, 0.0], [1.0, 0.0]])
    mask[:20, 10:20] = False  # a quarter of the top-left cell
    assert np.allclose(bench.cell_shares(mask, heat_map), [[0.5, 0.0], [1.0, 0.0]])


def hand_scene():
    """Two objects: 0 fills the top-left quadrant of a 40 x 40 image, 1 the bottom-right one."""
    masks = np.zeros((2, 40, 40), bool)
    masks[0, :20, :20] = masks[1, 20:, 20:] = True
    return bench.Scene(Image.new("RGB", (40, 40)), ["a", "b"], masks)


def test_scene_scores_point_share_and_compare_the_labels():
    grid = np.zeros((2, 2, 2), np.float32)
    grid[0, 0, 0], grid[0, 1, 1] = 3.0, 1.0  # label a: peak on a, a quarter of its energy on b
    grid[1, 0, 0] = 1.0  # label b: peaks on a
    scores = bench.scene_scores(hand_scene(), maps.HeatMap(grid, (0, 0, 40, 40), "test"))
    assert scores["pointing"] == [1.0, 0.0] and scores["own"] == [1.0, 0.0] and scores["other"] == [0.0, 1.0]
    assert scores["inside"] == pytest.approx([0.75, 0.0]) and scores["background"] == pytest.approx([0.0, 0.0])
    summary = bench.summary_of([scores])
    assert summary["sensitivity"] == pytest.approx(0.5 - 0.5) and summary["pointing"] == 0.5


def test_the_baselines():
    scene = hand_scene()
    centre = bench.scene_scores(scene, bench.centre_prior(scene))
    assert bench.summary_of([centre])["sensitivity"] == 0.0  # the same map for every label
    random = bench.random_point([scene])
    assert random["pointing"] == pytest.approx(0.25) and random["background"] == pytest.approx(0.5)


def test_square_box_by_hand():
    assert maps.square_box((40, 40, 60, 50), (100, 100)) == (35, 30, 65, 60)  # 1.5 x 20, centred
    assert maps.square_box((0, 0, 20, 10), (100, 100)) == (0, 0, 30, 30)  # shifted inside
    assert maps.square_box((0, 10, 100, 30), (100, 40)) == (30, 0, 70, 40)  # at most the shorter side, centred


@given(st.integers(1, 300), st.integers(1, 300), st.data())
def test_square_box_is_a_square_inside_the_image_around_the_box(width, height, data):
    left, right = sorted(data.draw(st.tuples(st.integers(0, width), st.integers(0, width))))
    top, bottom = sorted(data.draw(st.tuples(st.integers(0, height), st.integers(0, height))))
    x0, y0, x1, y1 = maps.square_box((left, top, right, bottom), (width, height))
    side = x1 - x0
    assert side == y1 - y0 and 1 <= side <= min(width, height)
    assert 0 <= x0 and 0 <= y0 and x1 <= width and y1 <= height
    if 1.5 * max(right - left, bottom - top) + 2 <= min(width, height):  # room for the square: it holds the box
        assert x0 <= left and y0 <= top and right <= x1 and bottom <= y1


def test_the_adapters_row_scores_its_attention(tiny_clip):
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    scene = hand_scene()
    scene.labels = ["cat", "dog"]
    adapter = clipzsl.CrossAttentionAdapter(model.embed_dim, heads=2).eval()
    row, drawn_maps = bench.method_scores(model, [scene], None, adapter)
    embeddings = torch.stack(list(bench.label_embeddings(model, [scene]).values()))
    expected, = maps.image_maps(model, [scene.image], embeddings, "adapter", adapter)
    assert drawn_maps[0].method == "adapter" and np.allclose(drawn_maps[0].grid, expected.grid)
    assert row["labels"] == 2 and row["pairs"] == 2 and row["grid"] == "4x4"


def test_the_pictures_are_palette_sheets_of_smaller_tiles(monkeypatch, tmp_path):
    monkeypatch.setattr(bench.report, "RESULTS_DIR", tmp_path)
    scene = hand_scene()
    heat_map = maps.HeatMap(np.random.default_rng(0).random((2, 4, 4)).astype(np.float32), (0, 0, 40, 40), "test")
    name, = bench.pictures([scene], {"a": [heat_map], "b": [heat_map]}, count=1, scale=0.5, colours=16)
    tile = clipzsl.explain.picture(scene.image, heat_map, 0, "a")
    with Image.open(tmp_path / name) as sheet:
        assert sheet.mode == "P" and len(sheet.getcolors()) <= 16
        assert sheet.size == (2 * round(tile.width / 2), 2 * round(tile.height / 2))


def conse_dot_at(model, image, embeddings, scale, flip=False):
    """conse_dot by hand at one scale ([C, h, w]): the ImageNet classifier on every cell of the (mirrored) input."""
    pixels = model.normalize_pixels(model.pixels_uint8(image)[None]).float()
    pixels = F.interpolate(pixels.flip(-1) if flip else pixels, scale_factor=scale, mode="bilinear",
                           align_corners=False)
    with torch.no_grad():
        features = model.image_model.forward_features(pixels)[0]
        fc = model.image_model.classifier
        cells = features.flatten(1).T @ fc.weight.T + fc.bias
    side = features.shape[-1]
    grid = (top10_conse(model, cells.softmax(-1)) @ embeddings.T).T.reshape(-1, side, side)
    return grid.flip(-1) if flip else grid


def test_conse_multiscale_averages_conse_dot_at_each_scale_on_the_finest_grid(classifier, image):
    model, embeddings = classifier.model, classifier.class_embeddings
    grids = [conse_dot_at(model, image, embeddings, scale) for scale in packaged_maps.SCALES]
    side = 7 * max(packaged_maps.SCALES)
    expected = sum(F.interpolate(g[None], size=(side, side), mode="bilinear", align_corners=False)[0]
                   for g in grids) / len(grids)
    grid = drawn(classifier, image, "conse_multiscale")
    assert grid.shape == (3, side, side) and np.allclose(grid, expected.numpy(), atol=1e-4)


def test_conse_flip_averages_conse_dot_of_the_image_and_of_its_mirror_mirrored_back(classifier, image):
    model, embeddings = classifier.model, classifier.class_embeddings
    plain, mirrored = (conse_dot_at(model, image, embeddings, packaged_maps.UPSCALE, flip) for flip in (False, True))
    assert not torch.allclose(plain, mirrored, atol=1e-3)  # the network is not mirror-symmetric
    assert np.allclose(drawn(classifier, image, "conse_flip"), ((plain + mirrored) / 2).numpy(), atol=1e-4)


@pytest.mark.parametrize("method", ["conse_multiscale", "conse_flip"])
def test_the_averaged_maps_find_each_label_on_a_real_picture(classifier, method):
    """chelsea (a cat) left, coffee (a cup) right: the cat's map peaks in the left half, the cup's in the right."""
    left, right = (Image.fromarray(f()).resize((112, 112)) for f in (skimage_data.chelsea, skimage_data.coffee))
    pair = Image.new("RGB", (224, 224), "grey")
    pair.paste(left, (0, 56))
    pair.paste(right, (112, 56))
    heat_map, = classifier.heatmaps([pair], method=method)
    width = heat_map.grid.shape[2]
    columns = [np.unravel_index(int(np.argmax(heat_map.grid[k])), heat_map.grid.shape[1:])[1] for k in (0, 1)]
    assert columns[0] < width // 2 <= columns[1]


def test_object_photos_paste_one_labelled_cut_out_on_a_background_photo():
    ds = bench.object_photos(3, seed=5)
    cutouts, grounds = bench.stamps(), bench.backgrounds()
    assert len(ds) == 3 and ds.classnames == [label for _, label in cutouts]
    for n, (image, label) in enumerate(zip(ds.images, ds.labels)):
        ground = np.asarray(grounds[n % len(grounds)], np.int16)
        changed = (np.abs(np.asarray(image, np.int16) - ground).max(-1) > 0).mean()
        assert image.size == (bench.SIDE, bench.SIDE) and 0 < label < len(cutouts)
        assert 0.02 < changed < max(bench.SIZES) ** 2  # one object, at most its box
    assert bench.object_photos(3, seed=5).labels == ds.labels != bench.object_photos(3, seed=6).labels


def test_the_held_out_table_shows_each_candidate_pooled_and_per_seed():
    row = {"pointing": 0.5, "per_seed": {5: 0.4, 6: 0.5, 7: 0.6}, "sensitivity": 0.3, "inside": 0.2, "grid": "28x28",
           "s_per_image": 4.0, "labels": 150}
    lines = bench.protocol_lines({"held_out": {"conse_multiscale": row}, "heldout_scenes": 20})
    assert "seeds 5, 6, 7, 20 each, 150 labels" in lines[0] and "seeds 3, 4 only" in lines[0]
    assert "| conse_multiscale | 0.500 | 0.400 / 0.500 / 0.600 | 0.300 | 0.200 | 28x28, 4.00 s |" in lines
    assert bench.protocol_lines({"held_out": {}}) == []
