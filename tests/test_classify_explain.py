"""classify --explain (issue 22): each top label's peak box and score, from the image's heat map, in every
output format; the settings sidecar records it, so --resume refuses a run that mixes explained and plain rows."""
import csv
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.maps import default_method, peak_box
from clipzsl.pipeline import Classification, Engine, classify_to_file
from clipzsl.predictions import PEAK_COLUMNS, Explained, Peak, format_predictions, settings_path

LABELS = ["cat", "dog", "car"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(scope="module")
def expected(tiny):
    """image -> [(label, probability, box, score)] computed straight from the classifier's heat maps."""
    def compute(paths):
        clf = clipzsl.ZeroShotClassifier(tiny, labels=LABELS, templates=TEMPLATES, cache=False)
        found = {}
        for path, preds, heat_map in zip(paths, clf.predict(paths, top_k=2), clf.heatmaps(paths)):
            found[path] = [(label, p, *peak_box(heat_map, LABELS.index(label))) for label, p in preds]
        return found
    return compute


def photos(folder, count=3, broken=False):
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):  # not square, not the model's size: boxes are in the image's own pixels
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 80, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def job(tiny, **kw):
    return Classification(LABELS, tiny, templates=TEMPLATES, top_k=2, cache=False, explain=True, **kw)


def test_json_and_jsonl_give_each_label_its_peak_box_and_score(tiny, tmp_path, expected):
    folder = photos(tmp_path / "photos", broken=True)
    want = expected(sorted(str(p) for p in folder.glob("[0-9].png")))
    for fmt in ("json", "jsonl"):
        out = tmp_path / f"p.{fmt}"
        report = classify_to_file([folder], str(out), job(tiny), fmt=fmt)
        assert report.written == 3 and len(report.failures) == 1
        text = out.read_text()
        records = json.loads(text) if fmt == "json" else [json.loads(line) for line in text.splitlines()]
        assert [r["image"] for r in records] == list(want)
        for record in records:
            for got, (label, p, box, score) in zip(record["predictions"], want[record["image"]], strict=True):
                assert got["label"] == label and got["box"] == list(box)
                assert got["peak_score"] == pytest.approx(score, abs=1e-5)
                assert 0 <= box[0] < box[2] <= 80 and 0 <= box[1] < box[3] <= Image.open(record["image"]).height
        assert json.loads(settings_path(out).read_text())["explain"] == default_method(tiny)


def test_csv_and_parquet_add_the_peak_columns(tiny, tmp_path, expected):
    folder = photos(tmp_path / "photos", broken=True)
    want = expected(sorted(str(p) for p in folder.glob("[0-9].png")))
    classify_to_file([folder], str(tmp_path / "p.csv"), job(tiny), fmt="csv")
    rows = list(csv.DictReader(open(tmp_path / "p.csv")))
    assert list(rows[0]) == ["image", "rank", "label", "probability", *PEAK_COLUMNS] and len(rows) == 6
    for row in rows:
        label, _, box, score = want[row["image"]][int(row["rank"]) - 1]
        assert row["label"] == label and [int(row[c]) for c in PEAK_COLUMNS[:4]] == list(box)
        assert float(row["peak_score"]) == pytest.approx(score, abs=1e-5)
    classify_to_file([folder], str(tmp_path / "p.parquet"), job(tiny), fmt="parquet")
    table = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert table[-1]["error"] and table[-1]["boxes"] is None and table[-1]["peak_scores"] is None
    for row in table[:-1]:
        assert row["boxes"] == [list(box) for _, _, box, _ in want[row["path"]]]
        np.testing.assert_allclose(row["peak_scores"], [s for *_, s in want[row["path"]]], atol=1e-5)


def test_plain_parquet_has_no_peak_columns(tiny, tmp_path):
    folder = photos(tmp_path / "photos", 1)
    classify_to_file([folder], str(tmp_path / "p.parquet"), Classification(LABELS, tiny, top_k=2, cache=False),
                     fmt="parquet")
    assert pq.read_table(tmp_path / "p.parquet").column_names == ["path", "labels", "probabilities", "error"]


def test_the_table_shows_the_box_only():
    row = ("a.png", Explained([("cat", 0.75), ("dog", 0.25)], [Peak((1, 2, 30, 40), 0.5), Peak((0, 0, 8, 8), 0.1)]))
    assert format_predictions([row], "table").splitlines()[1] == "a.png  cat (75.0%) @1,2,30,40  dog (25.0%) @0,0,8,8"
    assert format_predictions([("a.png", [("cat", 0.75)])], "csv") == "image,rank,label,probability\na.png,1,cat,0.750000\n"


def test_resume_continues_an_explained_csv_and_refuses_a_mismatch(tiny, tmp_path):
    folder = photos(tmp_path / "photos", 4)
    out = str(tmp_path / "p.csv")
    classify_to_file([folder / "0.png", folder / "1.png"], out, job(tiny), fmt="csv")
    report = classify_to_file([folder], out, job(tiny), fmt="csv", resume=True)
    assert (report.already, report.written) == (2, 2)
    assert [r["image"] for r in csv.DictReader(open(out)) if r["rank"] == "1"] == sorted(map(str, folder.iterdir()))
    plain = Classification(LABELS, tiny, templates=TEMPLATES, top_k=2, cache=False)
    with pytest.raises(InputError, match="written with --explain/--method giving --explain by heat-map method"):
        classify_to_file([folder], out, plain, fmt="csv", resume=True)
    classify_to_file([folder / "0.png"], str(tmp_path / "plain.csv"), plain, fmt="csv")
    with pytest.raises(InputError, match="giving no --explain") as refused:
        classify_to_file([folder], str(tmp_path / "plain.csv"), job(tiny), fmt="csv", resume=True)
    assert "method ''" not in str(refused.value)  # the default method is named as such, not as an empty name


def test_a_method_that_is_unknown_or_without_explain_is_refused(tiny, tmp_path):
    folder = photos(tmp_path / "photos", 1)
    with pytest.raises(InputError, match="unknown heat-map method 'nope'; pick one of"):
        classify_to_file([folder], str(tmp_path / "p.csv"), job(tiny, method="nope"), fmt="csv")
    plain_with_method = Classification(LABELS, tiny, method=default_method(tiny))
    with pytest.raises(InputError, match="add --explain"):
        classify_to_file([folder], str(tmp_path / "p.csv"), plain_with_method, fmt="csv")
    assert not (tmp_path / "p.csv").exists()


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="ray is not installed")
def test_explain_on_the_ray_engine_is_refused(tiny, tmp_path):
    with pytest.raises(InputError, match="--explain is not supported with --engine ray"):
        classify_to_file([photos(tmp_path / "photos", 1)], str(tmp_path / "p.csv"), job(tiny), fmt="csv",
                         engine=Engine("ray"))


def test_classify_explain_command(tiny_clip, tmp_path, capsys):
    folder = photos(tmp_path / "photos", 2)
    assert main(["classify", str(folder), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}", "--top-k", "1",
                 "--explain", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "image,rank,label,probability,left,top,right,bottom,peak_score" and len(lines) == 3
    assert main(["classify", str(folder), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}", "--explain",
                 "--method", "nope"]) == 2
    assert "unknown heat-map method 'nope'" in capsys.readouterr().err
