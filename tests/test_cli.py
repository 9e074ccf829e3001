"""The command line, run as users run it."""
import csv
import io
import json
import subprocess
import sys

import pytest

from clipzsl import load_labels
from clipzsl.cli import main
from clipzsl.cli.options import labels_argument
from test_images import make_bad_files


def test_classify_folder_with_bad_files_reports_and_continues(tmp_path, tiny_clip, capsys):
    folder = make_bad_files(tmp_path / "imgs")
    code = main(["classify", str(folder), "--labels", "cat,dog,car", "--model", f"hf:{tiny_clip}",
                 "--templates", "photo_1", "--format", "json", "--top-k", "2"])
    out, err = capsys.readouterr()
    assert code == 1  # some images failed
    results = json.loads(out)
    assert [r["image"].split("imgs/")[1] for r in results] == ["good.png", "sub/good2.jpg"]
    for r in results:
        assert len(r["predictions"]) == 2
        assert {p["label"] for p in r["predictions"]} <= {"cat", "dog", "car"}
        assert r["predictions"][0]["probability"] >= r["predictions"][1]["probability"]
    for name in ("empty.jpg", "notes.png", "truncated.png"):
        assert f"skipped {folder / name}:" in err
    assert "3 of 5 images could not be read" in err


def test_classify_csv_to_file_exit_zero(tmp_path, tiny_clip):
    folder = tmp_path / "ok"
    make_bad_files(folder)
    for bad in ("empty.jpg", "notes.png", "truncated.png"):
        (folder / bad).unlink()
    out = tmp_path / "out.csv"
    code = main(["classify", str(folder / "good.png"), "--labels", "cifar10", "--model", f"hf:{tiny_clip}",
                 "--format", "csv", "--output", str(out), "--top-k", "3"])
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert [r["rank"] for r in rows] == ["1", "2", "3"]
    assert all(r["image"].endswith("good.png") for r in rows)


def test_bad_label_file_is_a_clean_error(tmp_path, tiny_clip, capsys):
    labels = tmp_path / "labels.txt"
    labels.write_text("cat\ncat\n")
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    code = main(["classify", str(tmp_path / "x.png"), "--labels", str(labels), "--model", f"hf:{tiny_clip}"])
    assert code == 2
    assert f"{labels}:2: 'cat'" in capsys.readouterr().err


def test_labels_argument():
    assert labels_argument("cifar10") == "cifar10"
    assert labels_argument("cat, dog ,,car") == ["cat", "dog", "car"]


def test_models_lists_offline_specs():
    result = subprocess.run([sys.executable, "-m", "clipzsl.cli", "models"], capture_output=True, text=True, check=True)
    assert "packaged" in result.stdout and "offline" in result.stdout
    assert "openclip:ViT-B-32/laion2b_s34b_b79k" in result.stdout


def test_packaged_default_classifies_sample_photos(tmp_path, capsys):
    """The README's demo: the offline default, a 14-label file, scikit-image's photos."""
    from benchmarks.samples import write_samples

    write_samples(tmp_path)
    assert main(["classify", str(tmp_path), "--labels", "demo", "--format", "json", "--top-k", "1"]) == 0
    top1 = {r["image"].split("/")[-1]: r["predictions"][0]["label"] for r in json.loads(capsys.readouterr().out)}
    assert len(load_labels("demo")) >= 10
    assert top1["chelsea.png"] == "cat"
    assert top1["coffee.png"] == "cup of coffee"
    assert top1["rocket.jpg"] == "rocket"
