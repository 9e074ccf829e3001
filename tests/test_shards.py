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
