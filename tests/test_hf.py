"""clipzsl's hf: backend against transformers' own zero-shot pipeline, on a tiny random CLIPModel."""
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import CLIPModel, CLIPTokenizer, pipeline

import clipzsl
from clipzsl.backends.hf import save_random_clip

from conftest import TINY

LABELS = ["cat", "dog", "cup of coffee", "rocket", "astronaut", "a small red wooden boat on a lake"]


@pytest.fixture(scope="module")
def images():
    from skimage import data

    rng = np.random.default_rng(0)
    noise = Image.fromarray(rng.integers(0, 255, (80, 120, 3), dtype=np.uint8))
    return [Image.fromarray(data.chelsea()), Image.fromarray(data.coffee()), noise]


def test_probabilities_match_transformers_pipeline(tiny_clip, images):
    template = "This is a photo of {}."
    pipe = pipeline("zero-shot-image-classification", model=tiny_clip)
    clf = clipzsl.ZeroShotClassifier(f"hf:{tiny_clip}", labels=LABELS, templates=[template])
    ours = clf.predict_proba(images)
    for row, image in zip(ours, images):
        result = pipe(image, candidate_labels=LABELS, hypothesis_template=template)
        reference = np.array([next(r["score"] for r in result if r["label"] == label) for label in LABELS])
        np.testing.assert_allclose(row, reference, atol=1e-5, rtol=0)
    # a random model is close to uniform; the check above is only meaningful if rows differ
    assert np.abs(ours - 1 / len(LABELS)).max() > 1e-4


def test_text_and_image_features_match_clipmodel(tiny_clip, images):
    model = CLIPModel.from_pretrained(tiny_clip).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_clip)
    backend = clipzsl.load_model(f"hf:{tiny_clip}")
    assert backend.embed_dim == 32
    with torch.inference_mode():
        inputs = tokenizer(LABELS, padding=True, return_tensors="pt")
        text = model.get_text_features(**inputs)
        text = text if isinstance(text, torch.Tensor) else text.pooler_output
        pixels = torch.stack([backend.preprocess(im) for im in images])
        image = model.get_image_features(pixel_values=pixels)
        image = image if isinstance(image, torch.Tensor) else image.pooler_output
    torch.testing.assert_close(backend.encode_texts(LABELS), torch.nn.functional.normalize(text, dim=-1), atol=1e-5, rtol=0)
    pooled, tokens = backend.encode_images(pixels, return_tokens=True)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(image, dim=-1), atol=1e-5, rtol=0)
    assert tokens.shape == (3, 16, 32)  # 4x4 patches of 16 px, projected to the joint space


def test_fingerprint_is_weight_identity(tiny_clip, tmp_path):
    other = save_random_clip(tmp_path / "other", seed=2, **TINY)
    first, again = clipzsl.load_model(f"hf:{tiny_clip}"), clipzsl.load_model(f"hf:{tiny_clip}")
    assert first.fingerprint == again.fingerprint
    assert clipzsl.load_model(f"hf:{other}").fingerprint != first.fingerprint
