"""clip-retrieval's shard layout both ways, and inputs beyond folders (issue 12)."""
import io
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.pipeline import embed_to_shards

COLORS = ("red", "green", "blue", "yellow")


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def png(color):
    out = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(out, "PNG")
    return out.getvalue()


def test_embed_folder_list_and_tar_then_index_from_shards(tiny, tiny_clip, tmp_path, capsys):
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "red.png").write_bytes(png("red"))
    (tmp_path / "green.png").write_bytes(png("green"))
    (tmp_path / "list.txt").write_text("# images\ngreen.png\n")
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for name, data in (("000.png", png("blue")), ("000.txt", b"a caption"), ("001.png", png("yellow")),
                           ("002.png", b"broken")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = tmp_path / "shards"
    code = main(["embed", str(tmp_path / "folder"), str(tmp_path / "list.txt"), str(tmp_path / "00000.tar"),
                 "--out", str(out), "--model", f"hf:{tiny_clip}", "--shard-size", "3"])
    assert code == 1 and "002.png" in capsys.readouterr().err  # the broken member is reported
    emb = [np.load(out / "img_emb" / f"img_emb_{i}.npy") for i in (0, 1)]
    paths = [pq.read_table(out / "metadata" / f"metadata_{i}.parquet").column("image_path").to_pylist() for i in (0, 1)]
    assert [len(e) for e in emb] == [3, 1] and emb[0].dtype == np.float16
    assert [p.rsplit("/", 1)[-1] for p in paths[0] + paths[1]] == ["red.png", "green.png", "000.png", "001.png"]
    expected = tiny.encode_images(tiny.preprocess(Image.new("RGB", (48, 48), "blue"))[None])[0].numpy()
    np.testing.assert_allclose(emb[0][2], expected, atol=2e-3)  # row order matches metadata order

    assert main(["index", "from-shards", str(out), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}"]) == 0
    index = ImageIndex(tmp_path / "idx")
    assert len(index) == 4
    assert index.search(expected, top_k=1)[0][0].endswith("00000.tar/000.png")


def test_from_shards_refuses_mismatched_pairs(tiny, tmp_path):
    from clipzsl.shards import index_from_shards

    (tmp_path / "s" / "img_emb").mkdir(parents=True)
    (tmp_path / "s" / "metadata").mkdir()
    np.save(tmp_path / "s" / "img_emb" / "img_emb_0.npy", np.ones((3, tiny.embed_dim), np.float16))
    pq.write_table(pa.table({"image_path": ["a", "b"]}), tmp_path / "s" / "metadata" / "metadata_0.parquet")
    with pytest.raises(ValueError, match=r"metadata_0.parquet: 2 rows, but .*img_emb_0.npy has 3"):
        index_from_shards(tmp_path / "s", tmp_path / "idx", tiny)
    np.save(tmp_path / "s" / "img_emb" / "img_emb_0.npy", np.ones((2, 7), np.float16))
    with pytest.raises(ValueError, match=r"img_emb_0.npy: vectors of shape \(2, 7\).*embeds 32 dimensions"):
        index_from_shards(tmp_path / "s", tmp_path / "idx", tiny)


# -- reading shards: import every row, or refuse naming the file and row (issue 19, section 3) ----------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from clipzsl.shards import index_from_shards  # noqa: E402

def _write(folder, vectors, paths):
    (folder / "img_emb").mkdir(parents=True)
    (folder / "metadata").mkdir()
    for i, (v, p) in enumerate(zip(vectors, paths)):
        np.save(folder / "img_emb" / f"img_emb_{i}.npy", v, allow_pickle=True)
        pq.write_table(pa.table({"image_path": pa.array(p, pa.string())}), folder / "metadata" / f"metadata_{i}.parquet")


def _set(array, row, value):
    array[row] = value
    return array


#: (what is wrong, before the files are written) -> change(vectors, paths, k, row) returning the error expected
DATA_FAULTS = {
    "NaN": lambda v, p, k, r: (_set(v[k], r, np.nan), rf"img_emb_{k}.npy: row {r} is not finite")[1],
    "inf": lambda v, p, k, r: (_set(v[k], r, -np.inf), rf"img_emb_{k}.npy: row {r} is not finite")[1],
    "zeros": lambda v, p, k, r: (_set(v[k], r, 0), rf"img_emb_{k}.npy: row {r} is all zeros")[1],
    "null path": lambda v, p, k, r: (_set(p[k], r, None), rf"metadata_{k}.parquet: row {r} has no image_path")[1],
    "duplicate path": lambda v, p, k, r: (_set(p[k], r, p[-1][-1]) if (k, r) != (len(p) - 1, len(p[-1]) - 1)
                                          else _set(p[0], 0, p[k][r]), r"row \d+ names .* again \(first at")[1],
    "object array": lambda v, p, k, r: (v.__setitem__(k, v[k].astype(object)), rf"img_emb_{k}.npy: not a readable")[1],
    "int array": lambda v, p, k, r: (v.__setitem__(k, (v[k] * 100).astype(np.int8)), rf"img_emb_{k}.npy: int8 values")[1],
    "row mismatch": lambda v, p, k, r: (p.__setitem__(k, p[k][:-1]), rf"metadata_{k}.parquet: \d+ rows, but")[1],
}


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


#: (what is wrong in the folder) -> change(folder, k) returning the error expected
FILE_FAULTS = {
    "truncated npy": lambda f, k: (_truncate(f / "img_emb" / f"img_emb_{k}.npy"), rf"img_emb_{k}.npy: not a readable")[1],
    "truncated parquet": lambda f, k: (_truncate(f / "metadata" / f"metadata_{k}.parquet"),
                                       rf"metadata_{k}.parquet: unreadable metadata shard")[1],
    "extra file": lambda f, k: ((f / "img_emb" / "notes.txt").write_text("x"), r"img_emb/notes.txt: not a shard file")[1],
    "unpaired metadata": lambda f, k: ((f / "metadata" / "metadata_9.parquet").write_bytes(
        (f / "metadata" / f"metadata_{k}.parquet").read_bytes()), r"metadata_9.parquet: no img_emb/img_emb_9.npy")[1],
    "unpaired npy": lambda f, k: ((f / "metadata" / f"metadata_{k}.parquet").unlink(),
                                  rf"metadata_{k}.parquet: missing")[1],
    "numbered twice": lambda f, k: ((f / "img_emb" / f"img_emb_0{k}.npy").write_bytes(
        (f / "img_emb" / f"img_emb_{k}.npy").read_bytes()), rf"two shards numbered {k}")[1],
}
HARMLESS = {"none": lambda f, k: None, "hidden leftover": lambda f, k: ((f / "img_emb" / ".img_emb_0.npy.tmp").write_bytes(b""), None)[1]}


@pytest.mark.parametrize("fault", sorted(DATA_FAULTS) + sorted(FILE_FAULTS) + sorted(HARMLESS))
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(st.integers(1, 6), min_size=1, max_size=3).filter(lambda r: sum(r) > 1),
       dtype=st.sampled_from(["<f2", "<f4", ">f4", "<f8"]), seed=st.integers(0, 2**16), where=st.integers(0, 99))
def test_shards_import_completely_or_are_refused_by_file_and_row(tiny, tmp_path_factory, rows, dtype, fault, seed,
                                                                 where):
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(seed)
    vectors = [rng.normal(size=(n, tiny.embed_dim)).astype(dtype) for n in rows]
    paths = [[f"s{k}/img{r}.jpg" for r in range(n)] for k, n in enumerate(rows)]
    k = where % len(rows)
    expected = DATA_FAULTS[fault](vectors, paths, k, where % rows[k]) if fault in DATA_FAULTS else None
    _write(folder / "in", vectors, paths)
    expected = (FILE_FAULTS.get(fault) or HARMLESS[fault])(folder / "in", k) if expected is None else expected
    if fault == "row mismatch" and rows[k] == 1:
        expected = r"metadata_\d+.parquet: 0 rows, but"
    out = folder / "idx"
    if expected is None:
        index = index_from_shards(folder / "in", out, tiny)  # today: float32 shards are refused as "read-only"
        assert len(index) == sum(rows)
        for v, p in zip(vectors, paths):
            for vector, path in zip(v, p):
                assert index.search(vector.astype(np.float32), top_k=1)[0][0] == path
        return
    with pytest.raises((ValueError, FileNotFoundError), match=expected):
        index_from_shards(folder / "in", out, tiny)  # today: most are imported, in part or with NaN rows
    assert not out.exists()  # nothing half-imported


def test_an_image_named_twice_is_embedded_and_indexed_once(tiny, tiny_clip, tmp_path, monkeypatch, capsys):
    """The same files given as relative, absolute, through a link, a .txt list and an overlapping folder:
    today `embed` wrote their rows twice (a shard folder `index from-shards` then refused) and
    `index images` embedded them twice and reported twice the images added."""
    photos = tmp_path / "photos"
    (photos / "sub").mkdir(parents=True)
    (photos / "red.png").write_bytes(png("red"))
    (photos / "sub" / "blue.png").write_bytes(png("blue"))
    (tmp_path / "link").symlink_to(photos)
    (tmp_path / "list.txt").write_text("photos/red.png\nlink/sub/blue.png\n")
    monkeypatch.chdir(tmp_path)
    given = ["photos", str(photos), "link", "list.txt", "./photos/sub/blue.png"]
    assert main(["embed", *given, "--out", "shards", "--model", f"hf:{tiny_clip}"]) == 0
    assert "7 of the paths given name images already given" in capsys.readouterr().err
    assert main(["index", "from-shards", "shards", "--out", "idx", "--model", f"hf:{tiny_clip}"]) == 0
    assert len(ImageIndex(tmp_path / "idx", tiny)) == 2
    index = ImageIndex(tmp_path / "idx2", tiny)
    report = index.update(["photos", str(photos), "photos/sub"], progress=False)
    assert (report.added, len(index), index.store.dead_rows()) == (2, 2, 0)


def test_an_embed_killed_midway_is_never_indexed_as_whole(tiny_clip, tmp_path):
    """kill -9 of `clipzsl embed` after its first shard: the folder says it is unfinished, so from-shards
    refuses it (it once indexed 250 of 300 images with status 0) and a second embed into it says why."""
    import os
    import signal
    import subprocess
    import sys
    import time

    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for i in range(400):
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(photos / f"{i:03d}.png")
    out = tmp_path / "emb"
    command = [sys.executable, "-m", "clipzsl.cli", "embed", str(photos), "--out", str(out), "--model",
               f"hf:{tiny_clip}", "--shard-size", "20", "--batch-size", "2"]
    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.monotonic() + 120
    while not list((out / "metadata").glob("*.parquet")) and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.05)
    run.send_signal(signal.SIGKILL)
    run.wait()
    written = sorted((out / "metadata").glob("*.parquet"))
    assert written and len(written) < 20, "the run was to be killed after its first shard, before its last"
    with pytest.raises(ValueError, match="not all there .*stopped before its end"):
        clipzsl.shards.index_from_shards(out, tmp_path / "idx", f"hf:{tiny_clip}")
    assert not (tmp_path / "idx").exists()
    assert main(["index", "from-shards", str(out), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}"]) == 2
    with pytest.raises(ValueError, match="earlier run .*stopped before its end"):
        embed_to_shards([photos], out, clipzsl.load_model(f"hf:{tiny_clip}"))
