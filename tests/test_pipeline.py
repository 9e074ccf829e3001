"""One pipeline for embed and classify (issue 20): the local engine resumes an embed run from its manifest as
the Ray engine does (a run killed with kill -9 included), and writes every prediction format, parquet with
its error rows included."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.pipeline import Classification, Engine, classify_to_file, embed_to_shards
from clipzsl.predictions import settings_path
from clipzsl.shards import MANIFEST, UNFINISHED


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def make_images(folder, count, broken=False):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png")
    if broken:
        (folder / "broken.png").write_bytes(b"not a png")
    return folder


def shard_rows(directory):
    """path -> float16 row of every shard, in shard order; fails on a path written twice."""
    rows = {}
    for number in range(len(list((directory / "img_emb").glob("*.npy")))):
        paths = pq.read_table(directory / "metadata" / f"metadata_{number}.parquet").column(0).to_pylist()
        for path, vector in zip(paths, np.load(directory / "img_emb" / f"img_emb_{number}.npy")):
            assert path not in rows, f"{path} written twice"
            rows[path] = vector
    return rows


def test_an_interrupted_local_embed_resumes_to_the_rows_of_a_whole_run(tiny, tmp_path):
    photos = make_images(tmp_path / "photos", 30, broken=True)
    whole = embed_to_shards([photos], tmp_path / "whole", tiny, shard_size=8, engine=Engine(batch_size=4))
    assert (whole.rows, len(whole.shards), [f.source for f in whole.failures]) == (30, 4, [str(photos / "broken.png")])

    def interrupt(report):
        if len(report.shards) == 2:
            raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        embed_to_shards([photos], out, tiny, shard_size=8, engine=Engine(batch_size=4), on_shard=interrupt)
    assert (out / UNFINISHED).exists() and json.loads((out / MANIFEST).read_text())["rows"] == 16
    with pytest.raises(InputError, match="holds the shards of an earlier run .*stopped before its end"):
        embed_to_shards([photos], out, tiny, shard_size=8)  # without resume: never mixed
    with pytest.raises(InputError, match=r"written by another run \(it differs in shard_size\)"):
        embed_to_shards([photos], out, tiny, shard_size=9, resume=True)
    report = embed_to_shards([photos], out, tiny, shard_size=8, resume=True, engine=Engine(batch_size=4))
    assert (report.rows, len(report.shards), len(report.failures)) == (30, 4, 1) and not (out / UNFINISHED).exists()
    resumed, expected = shard_rows(out), shard_rows(tmp_path / "whole")
    assert list(resumed) == list(expected)  # the same rows, in the same order
    for path, vector in expected.items():
        np.testing.assert_allclose(resumed[path], vector, atol=2e-3)
    again = embed_to_shards([photos], out, tiny, shard_size=8, resume=True)
    assert again.complete_before and (again.rows, len(again.failures)) == (30, 1)


def test_embed_killed_with_kill_9_resumes_with_every_image_once(tiny_clip, tmp_path, capsys):
    """kill -9 of a real `clipzsl embed` after its first shard, then `embed --resume`: the rows of an
    uninterrupted run, each image once (it once refused: the local engine could not resume)."""
    photos = make_images(tmp_path / "photos", 160)
    model = ["--model", f"hf:{tiny_clip}", "--shard-size", "20", "--batch-size", "2"]
    out = tmp_path / "emb"
    run = subprocess.Popen([sys.executable, "-m", "clipzsl.cli", "embed", str(photos), "--out", str(out), *model],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not list((out / "metadata").glob("*.parquet")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = len(list((out / "metadata").glob("*.parquet")))
    assert 0 < written < 8, "the run was to be killed after its first shard, before its last"
    assert main(["embed", str(photos), "--out", str(out), *model]) == 2  # without --resume: refused
    assert "stopped before its end" in capsys.readouterr().err
    assert main(["embed", str(photos), "--out", str(out), "--resume", *model]) == 0
    done = int(re.search(r"resuming: (\d+) of 160 images already done", capsys.readouterr().err)[1])
    assert done % 20 == 0 and 0 < done <= 20 * written  # whole shards (the last may have missed its manifest)
    assert main(["embed", str(photos), "--out", str(tmp_path / "whole"), *model]) == 0
    resumed, whole = shard_rows(out), shard_rows(tmp_path / "whole")
    assert list(resumed) == list(whole) == sorted(str(p) for p in photos.iterdir())
    for path, vector in whole.items():
        np.testing.assert_allclose(resumed[path], vector, atol=2e-3)
    assert main(["embed", str(photos), "--out", str(out), "--resume", *model]) == 0
    assert "already complete (160 embeddings in 8 shard(s))" in capsys.readouterr().out


def test_classify_to_file_writes_every_format_and_error_rows_in_parquet(tiny, tmp_path):
    photos = make_images(tmp_path / "photos", 5, broken=True)
    job = Classification(["cat", "dog", "car"], tiny, templates=["a photo of a {}."], top_k=2, cache=False)
    report = classify_to_file([photos], str(tmp_path / "p.parquet"), job, fmt="parquet")
    assert (report.images, report.written, [f.source for f in report.failures]) == (6, 5, [str(photos / "broken.png")])
    rows = pq.read_table(tmp_path / "p.parquet").to_pylist()
    assert [r["path"] for r in rows] == sorted(str(p) for p in photos.iterdir())  # input order, error row in place
    broken = rows[-1]
    assert broken["error"] == "not an image Pillow can read" and broken["probabilities"] is None
    expected = clipzsl.ZeroShotClassifier(tiny, labels=["cat", "dog", "car"], templates=["a photo of a {}."],
                                          cache=False).predict([r["path"] for r in rows[:-1]], top_k=2)
    for row, preds in zip(rows, expected):
        assert row["error"] is None and row["labels"] == [label for label, _ in preds]
        np.testing.assert_allclose(row["probabilities"], [p for _, p in preds], atol=1e-6)
    assert json.loads(settings_path(tmp_path / "p.parquet").read_text())["format"] == "parquet"
    classify_to_file([photos], str(tmp_path / "p.json"), job, fmt="json")
    document = json.loads((tmp_path / "p.json").read_text())
    assert [d["image"] for d in document] == [r["path"] for r in rows[:-1]]
    assert [[p["label"] for p in d["predictions"]] for d in document] == [r["labels"] for r in rows[:-1]]
    with pytest.raises(InputError, match="--resume needs --output FILE and --format csv or jsonl"):
        classify_to_file([photos], str(tmp_path / "p.parquet"), job, fmt="parquet", resume=True)


def test_classify_command_writes_parquet_for_a_parquet_output(tiny_clip, tmp_path, capsys):
    photos = make_images(tmp_path / "photos", 3, broken=True)
    out = tmp_path / "preds.parquet"
    assert main(["classify", str(photos), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}", "--output",
                 str(out)]) == 1
    captured = capsys.readouterr()
    assert captured.out == f"{out}: predictions for 3 of 4 images\n"
    assert f"skipped {photos / 'broken.png'}: not an image Pillow can read" in captured.err
    assert len(pq.read_table(out)) == 4


@pytest.mark.skipif(__import__("importlib").util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_classify_with_an_adapter_is_refused_before_any_model_loads(tmp_path, monkeypatch):
    import clipzsl.pipeline

    photos = make_images(tmp_path / "photos", 1)
    monkeypatch.setattr(clipzsl.pipeline, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    job = Classification(["cat", "dog"], "hf:nowhere", adapter=str(tmp_path / "adapter"))
    with pytest.raises(InputError, match="--adapter is not supported with --engine ray"):
        classify_to_file([photos], str(tmp_path / "p.csv"), job, fmt="csv", engine=Engine("ray"))
    assert not (tmp_path / "p.csv").exists()
