"""Interrupted work is kept: `clipzsl classify` writes rows as they are computed and `--resume` completes
an interrupted run; `ImageIndex.update` commits each checkpoint, and a rerun embeds only the rest."""
import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from PIL import Image

from clipzsl import pipeline, predictions
from clipzsl.classifier import ZeroShotClassifier
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.store import EmbeddingStore


def make_images(folder, count):
    folder.mkdir()
    for i in range(count):
        Image.new("RGB", (24, 24), (i * 7 % 256, i * 13 % 256, i * 29 % 256)).save(folder / f"{i:04d}.png")
    return sorted(str(p) for p in folder.iterdir())


def classify_args(folder, tiny_clip, out, fmt, *extra):
    return ["classify", str(folder), "--labels", "cat,dog,car", "--model", f"hf:{tiny_clip}", "--templates", "photo_1",
            "--top-k", "2", "--format", fmt, "--output", str(out), *extra]


def jsonl_images(path):
    return [json.loads(line)["image"] for line in path.read_text().splitlines()]


def csv_images(path):
    rows = list(csv.DictReader(path.open(newline="")))
    assert all(r["rank"] in ("1", "2") for r in rows)
    return [r["image"] for r in rows if r["rank"] == "1"]


def test_resume_after_kill9_has_every_image_once(tmp_path, tiny_clip):
    images = make_images(tmp_path / "imgs", 1500)
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "clipzsl.cli", *classify_args(tmp_path / "imgs", tiny_clip, out, "jsonl",
                                                                    "--batch-size", "1")]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    while run.poll() is None and time.monotonic() < deadline:  # kill once some rows are on disk
        if out.exists() and out.stat().st_size > 0:
            break
        time.sleep(0.02)
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL  # killed mid-run, not finished
    before = out.read_text()
    assert before  # the rows computed before the kill were written and survive it
    with out.open("a") as f:  # and a torn last row, as a kill inside a write leaves, is dropped on resume
        f.write('{"image": "' + images[-1][:10])
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "jsonl", "--resume")) == 0
    done = jsonl_images(out)
    assert sorted(done) == images  # every image exactly once
    assert out.read_text().startswith(before)  # the rows already there were kept, not recomputed


def test_resume_of_a_complete_output_does_nothing(tmp_path, tiny_clip, capsys, monkeypatch):
    make_images(tmp_path / "imgs", 5)
    out = tmp_path / "out.csv"
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "csv")) == 0
    before = out.read_bytes()
    # resuming a complete output with the model it was written with must not even load the model
    monkeypatch.setattr(pipeline, "load_model", lambda *a, **k: pytest.fail("loaded a model with nothing to do"))
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "csv", "--resume")) == 0
    assert out.read_bytes() == before
    assert "already in" in capsys.readouterr().err


def test_resume_csv_appends_only_the_missing_images(tmp_path, tiny_clip):
    images = make_images(tmp_path / "imgs", 6)
    out = tmp_path / "out.csv"
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "csv", "--resume")) == 0  # no output yet: all
    full = out.read_text().splitlines()
    assert len(full) == 1 + 2 * 6
    # header, 2 images, the third's rank 1 only and a torn rank 2: the third is classified again, once
    out.write_text("\n".join(full[:6]) + "\n" + full[6][:7])
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "csv", "--resume")) == 0
    assert sorted(csv_images(out)) == images
    assert out.read_text().splitlines()[:5] == full[:5]  # the complete images were kept as they were
    assert len(out.read_text().splitlines()) == len(full)  # and every image has both its ranks
    assert out.read_text().count("image,rank,label,probability") == 1


@pytest.mark.parametrize("extra", [[], ["--format", "json"], ["--format", "table"]])
def test_resume_refused_without_a_resumable_output(tmp_path, extra, capsys):
    (tmp_path / "a.png").touch()
    args = ["classify", str(tmp_path / "a.png"), "--labels", "a,b", "--resume", *extra]
    if extra:
        args += ["--output", str(tmp_path / "out")]
    assert main(args) == 2
    assert "--resume needs --output FILE and --format csv or jsonl" in capsys.readouterr().err


def test_resume_of_another_format_names_the_file_and_line(tmp_path, tiny_clip, capsys):
    make_images(tmp_path / "imgs", 3)
    out = tmp_path / "out.txt"
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "csv")) == 0
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "jsonl", "--resume")) == 2
    assert f"{out}: written with --format giving csv, but this run has jsonl" in capsys.readouterr().err
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "jsonl")) == 0
    rows = out.read_text().splitlines()
    out.write_text("\n".join(["image,rank,label,probability", *rows[1:]]) + "\n")  # a line that is not JSON
    assert main(classify_args(tmp_path / "imgs", tiny_clip, out, "jsonl", "--resume")) == 2
    assert f"{out}:1: not a classify JSON-lines row" in capsys.readouterr().err


def test_classify_embeds_in_bounded_chunks(tmp_path, tiny_clip, monkeypatch, capsys):
    images = make_images(tmp_path / "imgs", 40)
    sizes = []
    embed = ZeroShotClassifier.embed

    def recording(self, sources, **kwargs):
        sizes.append(len(sources))
        return embed(self, sources, **kwargs)

    monkeypatch.setattr(ZeroShotClassifier, "embed", recording)
    code = main(["classify", str(tmp_path / "imgs"), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}",
                 "--templates", "photo_1", "--format", "jsonl", "--batch-size", "2"])
    assert code == 0
    assert max(sizes) == 2 * pipeline.CHUNK_BATCHES and sum(sizes) == 40  # never all N at once
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["image"] for line in lines] == images


def test_table_streamed_matches_one_piece_format(tmp_path, tiny_clip, capsys):
    make_images(tmp_path / "imgs", 20)
    base = ["classify", str(tmp_path / "imgs"), "--labels", "cat,dog,car", "--model", f"hf:{tiny_clip}",
            "--templates", "photo_1", "--batch-size", "1"]
    assert main(base + ["--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)  # json stays one document
    assert main(base) == 0
    rows = [(r["image"], [(p["label"], p["probability"]) for p in r["predictions"]]) for r in document]
    assert capsys.readouterr().out == predictions.format_predictions(rows, "table")


INDEXER = "import sys; from clipzsl.image_index import ImageIndex; " \
          "ImageIndex(sys.argv[1], sys.argv[2]).update(sys.argv[3], batch_size=1, checkpoint_every=8, progress=False)"


def test_index_update_killed_keeps_its_checkpoints_and_a_rerun_completes(tmp_path, tiny_clip):
    images = make_images(tmp_path / "imgs", 600)
    directory = tmp_path / "index"
    run = subprocess.Popen([sys.executable, "-c", INDEXER, str(directory), f"hf:{tiny_clip}", str(tmp_path / "imgs")],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, stored = time.monotonic() + 240, 0
    while run.poll() is None and time.monotonic() < deadline and stored < 16:  # two checkpoints committed
        time.sleep(0.05)
        if (directory / "table.sqlite").exists():
            meta = EmbeddingStore.read_meta(directory)
            stored = len(EmbeddingStore(directory, meta["fingerprint"], meta["embed_dim"], repair_hint="-"))
    os.kill(run.pid, signal.SIGKILL)
    assert run.wait() == -signal.SIGKILL  # killed mid-update
    index = ImageIndex(directory)
    survived = len(index)
    assert 16 <= survived < 600 and survived % 8 == 0  # whole checkpoints, readable after the kill
    report = index.update(tmp_path / "imgs", batch_size=8, checkpoint_every=8, progress=False)
    assert (report.unchanged, report.added) == (survived, 600 - survived)  # nothing embedded twice
    assert sorted(index.store.keys()) == images
