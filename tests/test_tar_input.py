"""webdataset .tar shards as input of `index images` and of the Ray engine: the same vectors as the folder."""
import importlib.util
import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import clipzsl
from clipzsl import distributed
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.tars import member_bytes, tar_members

PHOTOS = Path(np.__file__).parents[1] / "skimage" / "data"
NAMES = ["astronaut.png", "chelsea.png", "coffee.png", "hubble_deep_field.jpg", "rocket.jpg"]


@pytest.fixture
def photos(tmp_path):
    """(a folder of real photos, a webdataset shard in it of the same files, a caption and a corrupt member)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    shard = folder / "00000.tar"
    with tarfile.open(shard, "w") as tar:
        for number, name in enumerate(NAMES):
            data = (PHOTOS / name).read_bytes()
            (folder / name).write_bytes(data)
            add(tar, f"{number:05d}/{name}", data)
        add(tar, "00009.txt", b"a caption, not an image")
        add(tar, "broken.jpg", b"\xff\xd8\xff\xe0 not really a jpeg")
    return folder, shard


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def by_name(paths, vectors):
    return {Path(p).name: v for p, v in zip(paths, vectors)}


def test_a_tar_indexes_to_the_same_vectors_as_the_folder(tiny, photos, tmp_path):
    folder, shard = photos
    ImageIndex(tmp_path / "folder.idx", tiny).update(folder)
    report = ImageIndex(tmp_path / "tar.idx", tiny).update(shard)
    assert report.added == len(NAMES) and [f.source for f in report.failures] == [f"{shard}/broken.jpg"]
    expected, got = by_name(*ImageIndex(tmp_path / "folder.idx").vectors()), ImageIndex(tmp_path / "tar.idx").vectors()
    assert sorted(got[0]) == sorted(f"{shard}/{n:05d}/{name}" for n, name in enumerate(NAMES))
    for name, vector in by_name(*got).items():
        np.testing.assert_allclose(vector, expected[name], atol=1e-6)
    hits = ImageIndex(tmp_path / "tar.idx").search(folder / "chelsea.png", top_k=1)
    assert hits[0][0] == f"{shard}/00001/chelsea.png" and hits[0][1] > 0.999


def test_a_tar_is_embedded_again_only_when_it_changes_and_its_members_are_kept(tiny, photos, tmp_path):
    folder, shard = photos
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update([shard, folder])
    again = index.update(shard)
    assert (again.added, again.updated, again.removed, again.unchanged) == (0, 0, 0, len(NAMES))
    assert index.update(folder).removed == 0  # the shard's folder, whose walk lists no .tar: its members are kept
    with tarfile.open(shard, "w") as tar:  # rewritten with one image fewer
        for number, name in enumerate(NAMES[1:], 1):
            add(tar, f"{number:05d}/{name}", (PHOTOS / name).read_bytes())
    changed = index.update(shard)
    assert (changed.added, changed.updated, changed.removed) == (0, len(NAMES) - 1, 1)
    assert len(index) == 2 * len(NAMES) - 1
    os.unlink(shard)
    with pytest.raises(clipzsl.ClipzslError, match="now missing"):
        index.update(shard)  # an indexed shard gone is refused, as an unmounted folder is
    assert index.update(shard, prune=True).removed == len(NAMES) - 1


@pytest.mark.parametrize("compression", ["", "gz"])
def test_member_bytes_are_what_tarfile_extracts(photos, tmp_path, compression):
    _, plain = photos
    shard = tmp_path / "shard.tar"
    with tarfile.open(plain) as source, tarfile.open(shard, f"w:{compression}") as tar:
        for member in source:
            tar.addfile(member, source.extractfile(member))
    listed = list(tar_members(shard))
    assert len(listed) == len(NAMES) + 1  # the images and the corrupt one, not the caption
    with tarfile.open(shard) as tar:
        for _, member in listed:
            expected = tar.extractfile(member.info.name).read()
            assert member_bytes(shard, member.info.offset_data, member.info.size) == expected


def read_shards(directory: Path) -> dict[str, np.ndarray]:
    rows = {}
    for emb in sorted((directory / "img_emb").glob("img_emb_*.npy")):
        number = emb.stem.rsplit("_", 1)[1]
        paths = pq.read_table(directory / "metadata" / f"metadata_{number}.parquet").column(0).to_pylist()
        rows.update(zip(paths, np.load(emb)))
    return rows


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs Ray Data (pip install 'clipzsl[ray]')")
def test_ray_engine_embeds_a_tar_as_the_local_engine_embeds_the_folder(tiny_clip, photos, tmp_path, capsys,
                                                                        monkeypatch):
    folder, shard = photos
    spec = f"hf:{tiny_clip}"
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(["embed", str(folder), "--out", str(tmp_path / "local"), "--model", spec]) == 0
    with distributed.ray_runtime():
        code = main(["embed", str(shard), "--out", str(tmp_path / "ray"), "--model", spec, "--engine", "ray",
                     "--batch-size", "2"])
    assert code == 1 and f"{shard}/broken.jpg: corrupt or truncated image" in capsys.readouterr().err
    local, ray = by_name(*zip(*read_shards(tmp_path / "local").items())), read_shards(tmp_path / "ray")
    assert sorted(ray) == sorted(f"{shard}/{n:05d}/{name}" for n, name in enumerate(NAMES))
    for path, vector in ray.items():  # float16 casts of the same float32 rows
        np.testing.assert_allclose(vector, local[Path(path).name], atol=np.spacing(np.float16(1)))


def test_index_images_command_takes_a_tar(tiny_clip, photos, tmp_path, capsys):
    _, shard = photos
    assert main(["index", "images", str(shard), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}"]) == 1
    out, err = capsys.readouterr()
    assert f"{len(NAMES)} images ({len(NAMES)} added" in out and f"{shard}/broken.jpg" in err
