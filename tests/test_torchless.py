"""A service of an `onnx:` model runs where torch is not installed (issue 23, item 6).

The child processes run with torch, torchvision, timm and open_clip unimportable (`torchless`): any
import of them on the way fails the test. The answers are checked against the torch model's in this process.
"""
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("onnxruntime", reason="onnx: models need the onnx extra: pip install 'clipzsl[onnx]'")
pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")

import clipzsl  # noqa: E402
from benchmarks.bench_serve import running_server  # noqa: E402
from clipzsl.export import export_onnx  # noqa: E402
from tests.torchless import BLOCKED, cli_without_torch, run_without_torch  # noqa: E402

LABELS = ["cat", "coffee cup", "rocket", "astronaut", "dog"]


def test_package_command_line_and_service_import_without_torch(tmp_path):
    result = run_without_torch("""
        import clipzsl, clipzsl.cli, clipzsl.serve
        from clipzsl.backends.base import has_torch, resolve_device
        assert not has_torch() and resolve_device("auto") == "cpu"
        try:
            resolve_device("cuda")
        except clipzsl.InputError as err:
            print("refused:", err)
        parser = clipzsl.cli.build_parser()
        print("commands:", sorted(parser._subparsers._group_actions[0].choices))
        print("loaded:", sorted(name for name in sys.modules if name.partition(".")[0] in
                                ("torch", "torchvision", "timm", "open_clip") and sys.modules[name] is not None))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "refused: device 'cuda': torch is not installed" in result.stdout
    assert "'serve'" in result.stdout and "loaded: []" in result.stdout


def test_a_torch_model_without_torch_is_one_clear_error(tmp_path):
    result = run_without_torch("""
        import clipzsl
        for spec in ("packaged", "openclip:ViT-B-32/random"):
            try:
                clipzsl.load_model(spec)
            except clipzsl.MissingExtra as err:
                print("refused:", err)
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    refusals = result.stdout.splitlines()
    assert len(refusals) == 2 and all("is not installed here" in line and "onnx:DIR" in line for line in refusals)
    assert {line.split(", and ")[1].split()[0] for line in refusals} <= set(BLOCKED)


def test_a_command_that_needs_torch_is_one_line_and_status_2(tmp_path):
    image = tmp_path / "red.png"
    Image.new("RGB", (32, 24), "red").save(image)
    result = run_without_torch(f"""
        from clipzsl.cli import main
        print("status", main(["explain", {str(image)!r}, "--labels", "cat,dog", "--out", {str(tmp_path / "maps")!r}]))
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "status 2" in result.stdout
    assert result.stderr.startswith("clipzsl: error: this command needs torch (") and "Traceback" not in result.stderr
    assert not (tmp_path / "maps").exists()


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    from skimage import data

    folder = tmp_path_factory.mktemp("photos")
    for name in ("chelsea", "coffee", "rocket", "astronaut"):
        Image.fromarray(getattr(data, name)()).save(folder / f"{name}.png")
    return folder


@pytest.fixture(scope="module")
def packaged_export(tmp_path_factory):
    """The packaged model (torch, real weights) and its onnx: export."""
    model = clipzsl.load_model("packaged", device="cpu", cache=False)
    folder = tmp_path_factory.mktemp("onnx") / "packaged"
    export_onnx(model, folder)
    return model, folder


def test_an_onnx_service_classifies_and_searches_without_torch(packaged_export, photos, tmp_path):
    model, folder = packaged_export
    spec = f"onnx:{folder}"
    index = clipzsl.ImageIndex(tmp_path / "index", spec)
    index.update(photos)
    expected_hits = index.search("a cup of coffee", top_k=4)
    index.close()
    cat = (photos / "chelsea.png").read_bytes()
    expected = clipzsl.ZeroShotClassifier(model, labels=LABELS, cache=False).predict(Image.open(io.BytesIO(cat)), 3)[0]
    args = ["--model", spec, "--index", str(tmp_path / "index"), "--cache-dir", str(tmp_path / "cache")]
    with running_server(args, clipzsl=cli_without_torch()) as (url, _):
        import httpx

        health = httpx.get(f"{url}/health").json()
        classified = httpx.post(f"{url}/classify", files={"image": ("c.png", cat, "image/png")},
                                data={"labels": ",".join(LABELS), "top_k": "3"}, timeout=120)
        found = httpx.post(f"{url}/search", json={"text": "a cup of coffee", "top_k": 4}, timeout=120)
        explained = httpx.post(f"{url}/explain", files={"image": ("c.png", cat, "image/png")},
                               data={"labels": ",".join(LABELS)}, timeout=120)
    assert health["model"] == spec and health["indexes"] == {"index": 4}
    assert classified.status_code == 200, classified.text
    got = [(p["label"], p["probability"]) for p in classified.json()["predictions"]]
    assert [label for label, _ in got] == [label for label, _ in expected]
    np.testing.assert_allclose([p for _, p in got], [p for _, p in expected], atol=1e-4)
    assert found.status_code == 200, found.text
    assert [r["path"] for r in found.json()["results"]] == [path for path, _ in expected_hits]
    assert explained.status_code == 422 and "no heat-map method" in explained.text


def test_onnx_index_and_classify_commands_without_torch(packaged_export, photos, tmp_path):
    model, folder = packaged_export
    spec, index, output = f"onnx:{folder}", tmp_path / "index", tmp_path / "labels.jsonl"
    result = run_without_torch(f"""
        from clipzsl.cli import main
        assert main(["index", "images", {str(photos)!r}, "--out", {str(index)!r}, "--model", {spec!r}]) == 0
        assert main(["classify", {str(photos)!r}, "--labels", {",".join(LABELS)!r}, "--model", {spec!r}, "--top-k", "2",
                     "--format", "jsonl", "--output", {str(output)!r}, "--cache-dir", {str(tmp_path / "cache")!r}]) == 0
        print("loaded:", [name for name in ("torch", "torchvision", "timm", "open_clip") if sys.modules.get(name)])
    """, tmp_path)
    assert result.returncode == 0, result.stderr
    assert "loaded: []" in result.stdout
    rows = {Path(row["image"]).name: row for row in map(json.loads, output.read_text().splitlines())}
    expected = clipzsl.ZeroShotClassifier(model, labels=LABELS, cache=False).predict(sorted(photos.iterdir()), 2)
    for path, predictions in zip(sorted(photos.iterdir()), expected):
        got = rows[path.name]
        assert [p["label"] for p in got["predictions"]] == [label for label, _ in predictions]
        np.testing.assert_allclose([p["probability"] for p in got["predictions"]], [p for _, p in predictions], atol=1e-4)
    built = clipzsl.ImageIndex(index, spec)
    assert built.search(photos / "rocket.png", top_k=1)[0][0] == str(photos / "rocket.png")
    reference = clipzsl.ImageIndex(tmp_path / "torch-index", model)
    reference.update([photos])
    assert [p for p, _ in built.search("a cup of coffee", 4)] == [p for p, _ in reference.search("a cup of coffee", 4)]
