"""`clipzsl export onnx` and `onnx:<folder>`: each family's towers under onnxruntime against the torch backend."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl.backends.onnx import IMAGE_FILE, MANIFEST, TEXT_FILE, TOLERANCE, OnnxBackend, OnnxModelError, read_manifest
from clipzsl.export import ExportMismatch, export_onnx
from clipzsl.records import dumps
from clipzsl.store import ForeignFolderError

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


def max_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


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
    # the same preprocessing, rebuilt from the manifest
    torch.testing.assert_close(torch.stack([model.preprocess(image) for image in images]), pixels, atol=0, rtol=0)
    for batch in (pixels[:1], pixels):  # dynamic batch: 1 and 5, the export traced 2
        assert max_difference(model.encode_images(batch), source.encode_images(batch)) <= TOLERANCE
    assert max_difference(model.encode_texts(LABELS), source.encode_texts(LABELS)) <= TOLERANCE
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
    torch.testing.assert_close(again, cached, atol=0, rtol=0)


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
            answers.append(([p["label"] for p in classified.json()["predictions"]],
                            [r["path"] for r in searched.json()["results"]]))
    assert answers[0] == answers[1]
