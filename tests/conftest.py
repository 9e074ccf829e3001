import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    """Every cache in a temporary directory for the whole session (subprocesses inherit it): tests never
    write into the user's ~/.cache, and the packaged model's concept embeddings are built once a session."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(root))
        mp.setenv("CLIPZSL_CACHE_DIR", str(root / "clipzsl"))
        mp.setenv("CLIPZSL_DATA_DIR", str(root / "clipzsl" / "datasets"))
        yield root


@pytest.fixture(scope="session")
def vit_b32():
    """A random-init open_clip ViT-B-32 with its preprocessing and tokenizer (no download)."""
    import open_clip

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="session")
def openclip_backend(vit_b32):
    from clipzsl.backends.openclip import OpenClipBackend

    model, preprocess, tokenizer = vit_b32
    return OpenClipBackend(model, preprocess, tokenizer, spec="openclip:ViT-B-32/random")


TINY = dict(
    text_hidden_size=64, text_intermediate_size=128, text_num_hidden_layers=2, text_num_attention_heads=4,
    vision_hidden_size=64, vision_intermediate_size=128, vision_num_hidden_layers=2, vision_num_attention_heads=4,
    vision_image_size=64, vision_patch_size=16, projection_dim=32,
)


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A tiny random-init HF CLIPModel saved with its processor: a fast `hf:` model for tests."""
    from clipzsl.backends.hf import save_random_clip

    return save_random_clip(tmp_path_factory.mktemp("tiny_clip"), seed=1, **TINY)


@pytest.fixture(scope="session")
def tiny(tiny_clip):
    """`tiny_clip` loaded as clipzsl loads a model spec (`hf:DIR`)."""
    import clipzsl

    return clipzsl.load_model(f"hf:{tiny_clip}")
