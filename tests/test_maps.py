"""`ZeroShotClassifier.heatmaps`: one [C, h, w] grid per image, the image box it covers, and the method named."""
import numpy as np
import pytest
import torch.nn.functional as F
from PIL import Image

import clipzsl
from clipzsl import ZeroShotClassifier
from clipzsl.adapter import CrossAttentionAdapter
from clipzsl.errors import InputError
from clipzsl.maps import image_view


@pytest.fixture(scope="module")
def classifier(tiny_clip):
    return ZeroShotClassifier(clipzsl.load_model(f"hf:{tiny_clip}"), ["cat", "red car", "tree"], cache=False)


def wide_image():
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 90, 3), dtype=np.uint8))


def test_cosine_maps_are_each_tokens_cosine_to_each_label(classifier):
    image = wide_image()
    heat_map, = classifier.heatmaps([image], method="cosine")
    embedded = classifier.embed([image], return_tokens=True)
    tokens = F.normalize(embedded.tokens[0], dim=-1)
    expected = (tokens @ classifier.class_embeddings.T).T.reshape(heat_map.grid.shape)
    assert heat_map.grid.shape[0] == 3 and heat_map.grid.shape[1] == heat_map.grid.shape[2] > 1
    assert np.allclose(heat_map.grid, expected.numpy(), atol=1e-5)
    assert heat_map.box == image_view(classifier.model, image).box(90, 40) == (25, 0, 65, 40)  # CLIP's centre square
    assert heat_map.method == "cosine"


def test_an_adapter_draws_its_attention_unless_another_method_is_asked_for(classifier):
    adapter = CrossAttentionAdapter(classifier.model.embed_dim)
    with_adapter = ZeroShotClassifier(classifier.model, classifier.labels, cache=False, adapter=adapter)
    image = wide_image()
    heat_map, = with_adapter.heatmaps([image])
    attention = with_adapter.attention([image])[0].mean(1)[:, 1:]  # [C, T], global token left out
    assert heat_map.method == "adapter"
    assert np.allclose(heat_map.grid.reshape(3, -1), attention.numpy(), atol=1e-6)
    assert with_adapter.heatmaps([image], method="cosine")[0].method == "cosine"


def test_unknown_methods_and_an_adapter_method_without_one_are_refused(classifier):
    with pytest.raises(InputError, match="unknown heat-map method 'nope'; pick one of .*cosine"):
        classifier.heatmaps([wide_image()], method="nope")
    with pytest.raises(InputError, match="needs a trained adapter"):
        classifier.heatmaps([wide_image()], method="adapter")


def test_peak_box_covers_the_connected_cells_near_the_peak_in_image_pixels():
    from clipzsl.maps import HeatMap, peak_box

    grid = np.zeros((1, 4, 4), np.float32)
    grid[0, 1, 2], grid[0, 1, 3], grid[0, 2, 2] = 1.0, 0.6, 0.7
    grid[0, 3, 0] = 0.9  # above the threshold but not connected to the peak
    box, score = peak_box(HeatMap(grid, (10, 0, 50, 40), "cosine"), 0)
    assert score == 1.0
    assert box == (30, 10, 50, 30)  # cells are 10 x 10 pixels: columns 2-3, rows 1-2, shifted by the box's left
