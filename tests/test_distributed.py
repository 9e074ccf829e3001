"""Batch embedding and classification on Ray Data (issue 14): same numbers as one process,
unreadable images reported, a killed actor retried, reruns resumed or refused."""
import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipzsl
from clipzsl import distributed
from clipzsl.cli import main
from clipzsl.pipeline import Classification, Engine, classify_to_file, embed_to_shards
from clipzsl.shards import MANIFEST

N_IMAGES = 240
needs_ray = pytest.mark.skipif(
    __import__("importlib").util.find_spec("ray") is None,
    reason="ray is not installed: `pip install 'clipzsl[ray]'` (the --engine ray tests need Ray Data)")


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray runtime for the module, started as `clipzsl --engine ray` starts one: its files in a
    temporary folder of its own, its token in the environment (nothing written in ~/.ray)."""
    import ray

    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        with distributed.ray_runtime():
            yield ray


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """A folder of real image files (JPEG and PNG, varied sizes and content) and one corrupt file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_IMAGES):
        h, w = rng.integers(24, 96, size=2)
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        pixels[: h // 2] //= 1 + i % 4  # some structure, not only noise
        Image.fromarray(pixels).save(folder / f"{i:04d}.{'png' if i % 3 else 'jpg'}")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder


@pytest.fixture(scope="module")
def spec(tiny_clip):
    return f"hf:{tiny_clip}"


def read_shards(directory: Path) -> dict[str, np.ndarray]:
    """path -> embedding row of every shard; fails on a path written twice."""
    rows = {}
    for emb in sorted((directory / "img_emb").glob("img_emb_*.npy")):
        number = emb.stem.rsplit("_", 1)[1]
        paths = pq.read_table(directory / "metadata" / f"metadata_{number}.parquet").column(0).to_pylist()
        for path, vector in zip(paths, np.load(emb)):
            assert path not in rows, f"{path} written twice"
            rows[path] = vector
    return rows


def good_images(images: Path) -> list[str]:
    return sorted(str(p) for p in images.iterdir() if p.name != "broken.jpg")


@needs_ray
def test_embeddings_equal_single_process(ray_session, images, spec, tmp_path, capsys):
    from clipzsl.distributed import embed_dataset

    assert main(["embed", str(images), "--out", str(tmp_path / "single"), "--model", spec]) == 1
    skipped = [line for line in capsys.readouterr().err.splitlines() if line.startswith("clipzsl: skipped")]
    assert len(skipped) == 1 and "broken.jpg: corrupt or truncated image" in skipped[0]
    assert main(["embed", str(images), "--out", str(tmp_path / "ray"), "--model", spec, "--engine", "ray",
                 "--shard-size", "100", "--batch-size", "16"]) == 1
    assert skipped[0] in capsys.readouterr().err.splitlines()  # the same failure report, path and reason
    single, distributed = read_shards(tmp_path / "single"), read_shards(tmp_path / "ray")
    assert sorted(distributed) == sorted(single) == good_images(images)
    assert len(list((tmp_path / "ray" / "img_emb").glob("*.npy"))) == 3  # 240 rows in shards of 100
    for path, vector in single.items():  # both are float16 casts of the same float32 rows
        np.testing.assert_allclose(distributed[path], vector, atol=np.spacing(np.float16(1)))

    # before the float16 cast: the same float32 numbers as one process, here from the files' bytes
    model = clipzsl.load_model(spec)
    files = ray_session.data.read_binary_files(str(images), include_paths=True)
    rows = embed_dataset(files, model, batch_size=7).take_all()
    reference = clipzsl.embed_images(model, [str(images)], skip_errors=True)
    by_path = {r["path"]: r for r in rows}
    assert len(rows) == N_IMAGES + 1 and by_path[str(images / "broken.jpg")]["error"]
    got = np.stack([by_path[p]["embedding"] for p in reference.sources])
    np.testing.assert_allclose(got, reference.embeddings.numpy(), atol=1e-6, rtol=0)


@needs_ray
def test_predictions_identical_and_corrupt_image_is_a_row(ray_session, images, spec, tmp_path, capsys):
    labels = "red,green,blue,a dark photo,noise"
    out = tmp_path / "preds.parquet"
    assert main(["classify", str(images), "--labels", labels, "--model", spec, "--top-k", "3", "--engine", "ray",
                 "--output", str(out), "--batch-size", "32"]) == 1
    assert "broken.jpg: corrupt or truncated image" in capsys.readouterr().err
    table = pq.read_table(out).to_pylist()
    by_path = {row["path"]: row for row in table}
    assert len(table) == len(by_path) == N_IMAGES + 1
    broken = by_path.pop(str(images / "broken.jpg"))
    assert broken["error"].startswith("corrupt or truncated image") and broken["probabilities"] is None

    clf = clipzsl.ZeroShotClassifier(spec, labels=labels.split(","))
    paths = good_images(images)
    for path, expected in zip(paths, clf.predict(paths, top_k=3)):
        row = by_path[path]
        assert row["error"] is None
        assert row["labels"] == [label for label, _ in expected]
        np.testing.assert_allclose(row["probabilities"], [p for _, p in expected], atol=1e-6, rtol=0)


def encoder_pids() -> list[int]:
    """Processes of the model actors (Ray titles them after the callable class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and b"_Encoder" in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@needs_ray
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the actor's process in /proc")
def test_killed_actor_is_retried_and_output_is_complete(ray_session, images, spec, tmp_path):
    model = clipzsl.load_model(spec)
    killed = []

    def kill_an_actor(report):
        if not killed:  # after the first shard: the run is under way
            pid = max(encoder_pids())
            os.kill(pid, signal.SIGKILL)
            killed.append((pid, report.rows))

    report = embed_to_shards([images], tmp_path, model, shard_size=20, engine=Engine("ray", batch_size=4),
                             on_shard=kill_an_actor)
    assert killed and killed[0][1] == 20 and not Path(f"/proc/{killed[0][0]}").exists()
    assert report.rows == N_IMAGES and [f.source for f in report.failures] == [str(images / "broken.jpg")]
    assert sorted(read_shards(tmp_path)) == good_images(images)  # every image once, none twice


@needs_ray
def test_rerun_resumes_the_same_run_and_refuses_another(ray_session, images, spec, tmp_path, capsys):
    out = tmp_path / "shards"
    model = clipzsl.load_model(spec)

    def interrupt(report):
        if len(report.shards) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # a run stopped after two shards
        embed_to_shards([images], out, model, shard_size=50, resume=True, engine=Engine("ray"), on_shard=interrupt)
    assert json.loads((out / MANIFEST).read_text())["complete"] is False
    first = read_shards(out)
    assert len(first) == 100

    args = ["embed", str(images), "--out", str(out), "--model", spec, "--engine", "ray"]
    assert main(args + ["--shard-size", "60"]) == 2  # another shard size: another run
    assert "written by another run (it differs in shard_size)" in capsys.readouterr().err
    assert main(args + ["--shard-size", "50"]) == 1
    assert f"resuming: 100 of {N_IMAGES + 1} images already done" in capsys.readouterr().err
    resumed = read_shards(out)  # every image once: the first two shards kept, the rest added
    assert sorted(resumed) == good_images(images)
    assert all(np.array_equal(resumed[p], v) for p, v in first.items())
    assert main(args + ["--shard-size", "50"]) == 1  # complete: nothing is run again
    assert "already complete (240 embeddings in 5 shard(s))" in capsys.readouterr().out

    local = ["embed", str(images), "--out", str(tmp_path / "local"), "--model", spec, "--shard-size", "50"]
    assert main(local) == 1
    capsys.readouterr()
    assert main(local + ["--engine", "ray"]) == 1  # one pipeline: the same run, whichever engine wrote it
    assert "already complete (240 embeddings in 5 shard(s))" in capsys.readouterr().out
    (tmp_path / "local" / MANIFEST).unlink()  # shards of no known run (an older clipzsl's, another tool's)
    assert main(local + ["--engine", "ray"]) == 2
    assert f"holds shards without a {MANIFEST}" in capsys.readouterr().err


def parquet_rows(path: Path) -> dict[str, dict]:
    return {row["path"]: row for row in pq.read_table(path).to_pylist()}


def jsonl_rows(path: Path) -> dict[str, list]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({r["image"] for r in rows}) == len(rows), "an image written twice"
    return {r["image"]: r["predictions"] for r in rows}


def assert_same_predictions(got: dict, expected: dict, labels: str, probabilities: str) -> None:
    assert sorted(got) == sorted(expected)
    for path, row in expected.items():
        assert [p[labels] for p in got[path]] == [p[labels] for p in row]
        np.testing.assert_allclose([p[probabilities] for p in got[path]], [p[probabilities] for p in row],
                                   atol=1e-6, rtol=0)


@needs_ray
def test_both_engines_write_the_same_rows_and_ray_resumes_a_classify(ray_session, images, spec, tmp_path):
    """One pipeline: the Ray engine writes what the local one writes (parquet, error rows included), and
    resumes a jsonl output as the local engine does (it once wrote parquet only, and never resumed)."""
    job = Classification(["red", "green", "blue", "a dark photo", "noise"], spec, top_k=3)
    ray = Engine("ray", batch_size=32)
    local_report = classify_to_file([images], str(tmp_path / "local.parquet"), job, fmt="parquet")
    ray_report = classify_to_file([images], str(tmp_path / "ray.parquet"), job, fmt="parquet", engine=ray)
    local, distributed_ = parquet_rows(tmp_path / "local.parquet"), parquet_rows(tmp_path / "ray.parquet")
    assert [str(f) for f in ray_report.failures] == [str(f) for f in local_report.failures] != []
    broken = str(images / "broken.jpg")
    assert local[broken] == distributed_[broken] and local[broken]["error"].startswith("corrupt or truncated")
    as_pairs = lambda rows: {p: [dict(label=l, p=q) for l, q in zip(r["labels"], r["probabilities"] or [])]
                             for p, r in rows.items()}
    assert_same_predictions(as_pairs(distributed_), as_pairs(local), "label", "p")

    first = good_images(images)[:100]  # an output with 100 images, as an interrupted run leaves it
    out = tmp_path / "ray.jsonl"
    assert classify_to_file(first, str(out), job, fmt="jsonl", engine=ray).written == 100
    before = out.read_text()
    report = classify_to_file([images], str(out), job, fmt="jsonl", resume=True, engine=ray)
    assert (report.already, report.written, len(report.failures)) == (100, N_IMAGES - 100, 1)
    assert out.read_text().startswith(before)  # the rows already there kept, the rest appended
    classify_to_file([images], str(tmp_path / "local.jsonl"), job, fmt="jsonl")
    assert_same_predictions(jsonl_rows(out), jsonl_rows(tmp_path / "local.jsonl"), "label", "probability")


def test_engine_ray_without_ray_says_how_to_install(images, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    assert main(["embed", str(images), "--out", str(tmp_path / "o"), "--engine", "ray"]) == 2
    assert "pip install 'clipzsl[ray]'" in capsys.readouterr().err


SEQUENTIAL_RUNTIMES = """
import os
os.environ.pop("RAY_ADDRESS", None)
import ray
from clipzsl import distributed
for n in range(2):
    with distributed.ray_runtime():
        assert ray.get(ray.put(n)) == n
print("both answered")
"""


def test_one_process_starts_a_second_local_runtime_after_the_first():
    """Ray keeps the first auth token it reads: a second runtime under a fresh token refused its own driver."""
    import subprocess

    done = subprocess.run([sys.executable, "-c", SEQUENTIAL_RUNTIMES], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")})
    assert done.returncode == 0 and "both answered" in done.stdout, done.stderr[-2000:]
