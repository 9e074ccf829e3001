"""clipzsl's open_clip backend against open_clip itself, on random-init ViT-B-32."""
import open_clip
import pytest
import torch

from clipzsl import class_embeddings, load_labels, load_model, load_templates
from clipzsl.backends.openclip import _encode_trimmed

LABELS = [
    "cat", "dog", "golden retriever", "tabby cat", "red sports car", "airliner", "rocket", "espresso",
    "astronaut", "horse", "a very long and oddly specific label about a small wooden boat on a lake",
    "tree", "house", "bicycle", "motorcycle", "coin", "camera", "bird", "frog", "ship",
]


def test_class_embeddings_match_build_zero_shot_classifier(vit_b32, openclip_backend):
    model, _, tokenizer = vit_b32
    templates = load_templates("openai_imagenet_80")
    assert len(templates) == 80
    reference = open_clip.build_zero_shot_classifier(model, tokenizer, LABELS, templates, num_classes_per_batch=10)
    ours = class_embeddings(openclip_backend, load_labels(LABELS), templates)
    assert ours.shape == (20, reference.shape[0])
    assert torch.allclose(ours, reference.T, atol=1e-5, rtol=0)


def test_trimmed_text_forward_equals_full_context(vit_b32, openclip_backend):
    model, _, tokenizer = vit_b32
    texts = ["a photo of a cat.", "x", "a photo of a " + "very " * 20 + "large dog."]
    full = model.encode_text(tokenizer(texts), normalize=True)
    with torch.inference_mode():
        trimmed = openclip_backend.encode_texts(texts)
    assert torch.allclose(trimmed, full, atol=1e-5, rtol=0)
    # and trimming really happened: the trimmed forward sees fewer than 77 positions
    tokens = tokenizer(texts)
    length = int((tokens != 0).sum(1).max())
    assert length < 77
    with torch.inference_mode():
        assert _encode_trimmed(model, tokens[:, :length]).shape == (3, 512)


def test_image_embeddings_and_tokens(vit_b32, openclip_backend):
    model, _, _ = vit_b32
    pixels = torch.randn(2, 3, 224, 224)
    with torch.inference_mode():
        reference = model.encode_image(pixels, normalize=True)
        pooled, tokens = openclip_backend.encode_images(pixels, return_tokens=True)
    assert torch.allclose(openclip_backend.encode_images(pixels), reference, atol=1e-5)
    assert torch.allclose(pooled, reference, atol=1e-5)
    assert tokens.shape == (2, 49, 512)  # 7x7 patches of 32 px, projected to the joint space


def test_fingerprint_tracks_weights(vit_b32, openclip_backend):
    from clipzsl.backends.openclip import OpenClipBackend

    model, preprocess, tokenizer = vit_b32
    other = open_clip.create_model("ViT-B-32", pretrained=None)
    other_backend = OpenClipBackend(other, preprocess, tokenizer, spec="openclip:ViT-B-32/random")
    assert other_backend.fingerprint != openclip_backend.fingerprint
    assert openclip_backend.fingerprint.startswith("openclip:ViT-B-32:")


def test_spec_errors():
    with pytest.raises(ValueError, match="Unknown open_clip architecture"):
        load_model("openclip:NoSuchNet/random")
    with pytest.raises(ValueError, match="no pretrained weights 'nope' for ViT-B-32"):
        load_model("openclip:ViT-B-32/nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("openclip:ViT-B-32//no/such/checkpoint.pt")
    with pytest.raises(ValueError, match="Unknown model spec"):
        load_model("clip:ViT-B-32")


def test_checkpoint_file_loads_same_weights(tmp_path, vit_b32, openclip_backend):
    model, _, _ = vit_b32
    path = tmp_path / "vit.pt"
    torch.save(model.state_dict(), path)
    loaded = load_model(f"openclip:ViT-B-32/{path}")
    assert loaded.fingerprint == openclip_backend.fingerprint


@pytest.mark.parametrize("spec", ["openclip:ViT-B-32/laion2b_s34b_b79k", "hf:openai/clip-vit-base-patch32"])
def test_hub_weights_fail_fast_when_the_hub_is_unreachable(spec, monkeypatch):
    import time

    import huggingface_hub.constants

    import clipzsl.backends.hub as hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="cannot be reached. Use local weights"):
        load_model(spec)
    assert time.monotonic() - start < 15
    assert not huggingface_hub.constants.HF_HUB_OFFLINE  # offline for that one load only, not the process
