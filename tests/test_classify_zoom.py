"""The zoom as a view option (issue 22): `classify --zoom`, `Classification(zoom=True)` and the service's /classify
`zoom` field give `ZeroShotClassifier.zoomed_predict`'s answers; the settings record it, so --resume cannot mix
zoomed and plain rows; where no heat map can be drawn it is refused."""
import csv
import io
import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.maps import peak_box
from clipzsl.pipeline import Classification, Engine, classify_to_file
from clipzsl.predictions import settings_path
from clipzsl.serve import create_app

LABELS = ["cat", "dog", "car", "tree"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(scope="module")
def classifier(tiny):
    return clipzsl.ZeroShotClassifier(tiny, labels=LABELS, templates=TEMPLATES, cache=False)


def photos(folder, count=3):
    folder.mkdir()
    rng = np.random.default_rng(2)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (56 + 8 * i, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return sorted(str(p) for p in folder.iterdir())


def job(tiny, **kw):
    return Classification(LABELS, tiny, templates=TEMPLATES, top_k=3, cache=False, zoom=True, **kw)


def test_classify_zoom_writes_the_zoomed_predictions(tiny, classifier, tmp_path):
    paths = photos(tmp_path / "photos")
    want = dict(zip(paths, classifier.zoomed_predict(paths, top_k=3)))
    assert want != dict(zip(paths, classifier.predict(paths, top_k=3)))  # the option changes the answer
    out = tmp_path / "p.jsonl"
    report = classify_to_file([tmp_path / "photos"], str(out), job(tiny), fmt="jsonl")
    assert report.written == 3
    for record in map(json.loads, out.read_text().splitlines()):
        got = [(p["label"], p["probability"]) for p in record["predictions"]]
        assert [label for label, _ in got] == [label for label, _ in want[record["image"]]]
        assert np.allclose([p for _, p in got], [p for _, p in want[record["image"]]], atol=1e-6)
    assert json.loads(settings_path(out).read_text())["zoom"] is True


def test_zoom_with_explain_gives_the_zoomed_labels_peaks(tiny, classifier, tmp_path):
    paths = photos(tmp_path / "photos", 2)
    out = tmp_path / "p.json"
    classify_to_file([tmp_path / "photos"], str(out), job(tiny, explain=True), fmt="json")
    for record, heat_map, want in zip(json.loads(out.read_text()), classifier.heatmaps(paths),
                                      classifier.zoomed_predict(paths, top_k=3)):
        assert [p["label"] for p in record["predictions"]] == [label for label, _ in want]
        assert [p["box"] for p in record["predictions"]] == [list(peak_box(heat_map, LABELS.index(label))[0])
                                                            for label, _ in want]


def test_resume_refuses_to_mix_zoomed_and_plain_rows(tiny, tmp_path):
    photos(tmp_path / "photos", 2)
    out = str(tmp_path / "p.csv")
    classify_to_file([tmp_path / "photos" / "0.png"], out, job(tiny), fmt="csv")
    report = classify_to_file([tmp_path / "photos"], out, job(tiny), fmt="csv", resume=True)
    assert (report.already, report.written) == (1, 1)
    plain = Classification(LABELS, tiny, templates=TEMPLATES, top_k=3, cache=False)
    with pytest.raises(InputError, match="written with --zoom giving --zoom, but this run has no --zoom"):
        classify_to_file([tmp_path / "photos"], out, plain, fmt="csv", resume=True)


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="ray is not installed")
def test_zoom_on_the_ray_engine_is_refused(tiny, tmp_path):
    photos(tmp_path / "photos", 1)
    with pytest.raises(InputError, match="--zoom is not supported with --engine ray"):
        classify_to_file([tmp_path / "photos"], str(tmp_path / "p.csv"), job(tiny), fmt="csv", engine=Engine("ray"))
    assert not (tmp_path / "p.csv").exists()


def test_classify_zoom_command(tiny_clip, classifier, tmp_path, capsys):
    paths = photos(tmp_path / "photos", 2)
    assert main(["classify", str(tmp_path / "photos"), "--labels", ",".join(LABELS), "--model", f"hf:{tiny_clip}",
                 "--templates", str(_templates(tmp_path)), "--top-k", "1", "--zoom", "--format", "csv"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [row["label"] for row in rows] == [preds[0][0] for preds in classifier.zoomed_predict(paths, top_k=1)]


def _templates(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("\n".join(TEMPLATES) + "\n")
    return path


def test_the_service_zooms_when_asked(tiny, classifier):
    image = Image.fromarray(np.random.default_rng(5).integers(0, 255, (60, 90, 3), dtype=np.uint8))
    body = io.BytesIO()
    image.save(body, "PNG")
    with TestClient(create_app(tiny, templates=TEMPLATES, cache=False)) as client:
        def ask(**fields):
            answer = client.post("/classify", data={"labels": ",".join(LABELS), "top_k": "3", **fields},
                                 files={"image": ("a.png", body.getvalue(), "image/png")})
            assert answer.status_code == 200, answer.text
            return [(p["label"], p["probability"]) for p in answer.json()["predictions"]]

        zoomed, plain = ask(zoom="true"), ask()
    for got, want in ((zoomed, classifier.zoomed_predict([image], top_k=3)[0]),
                      (plain, classifier.predict([image], top_k=3)[0])):
        assert [label for label, _ in got] == [label for label, _ in want]
        assert np.allclose([p for _, p in got], [p for _, p in want], atol=1e-5)
    assert zoomed != plain
