"""Text embeddings in the shards (text_emb/) for a captioned collection, in clip-retrieval's layout."""
import io
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clipzsl.captions import CaptionedImages
from clipzsl.errors import InputError
from clipzsl.pipeline import embed_to_shards
from clipzsl.shards import ShardCaptions, index_from_shards

PHOTOS = Path(np.__file__).parents[1] / "skimage" / "data"
CAPTIONS = {"astronaut.png": "an astronaut in a white suit", "chelsea.png": "a ginger cat",
            "coffee.png": "a cup of coffee on a saucer", "rocket.jpg": "a rocket on its launch pad",
            "hubble_deep_field.jpg": "galaxies in the deep field"}


@pytest.fixture
def collection(tmp_path):
    """A folder of real photos with a captions CSV (two captions for one of them)."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in CAPTIONS:
        shutil.copy(PHOTOS / name, folder / name)
    rows = [f'{name},"{caption}"' for name, caption in CAPTIONS.items()] + ["chelsea.png,a cat on a rug"]
    (tmp_path / "captions.csv").write_text("image,caption\n" + "\n".join(rows) + "\n")
    return folder, tmp_path / "captions.csv"


def clip_retrieval_reference(image_names, captions, model, out: Path, partition_count: int = 1) -> None:
    """What clip-retrieval 2.45's inference writes for one partition of images with captions (--enable_text,
    no metadata): clip_inference/mapper.py's text embeddings (the text tower's features / their norm, cast
    to float16) and clip_inference/writer.py's OutputSink (np.save of text_emb_N.npy; a DataFrame with the
    columns image_path, caption written with to_parquet); N zero-padded to int(log10(partition count)) + 1."""
    import pandas as pd

    with torch.no_grad():
        features = model.encode_texts(captions).float()
    text_embs = (features / features.norm(dim=-1, keepdim=True)).cpu().to(torch.float16).numpy()
    number = str(0).zfill(int(np.log10(partition_count)) + 1)
    (out / "text_emb").mkdir(parents=True)
    (out / "metadata").mkdir()
    npb = io.BytesIO()
    np.save(npb, text_embs)
    (out / "text_emb" / f"text_emb_{number}.npy").write_bytes(npb.getbuffer())
    pd.DataFrame(data=list(zip(image_names, captions)), columns=["image_path", "caption"]).to_parquet(
        out / "metadata" / f"metadata_{number}.parquet")


def test_text_emb_matches_clip_retrievals_layout_and_the_models_text_embeddings(tiny, collection, tmp_path):
    folder, captions_file = collection
    captions = ShardCaptions.of(CaptionedImages.read(folder, captions_file), tiny)
    report = embed_to_shards([folder], tmp_path / "emb", tiny, captions=captions)
    assert report.rows == len(CAPTIONS)
    ours = tmp_path / "emb"
    table = pq.read_table(ours / "metadata" / "metadata_0.parquet")
    names = table.column("image_path").to_pylist()
    expected_captions = [CAPTIONS[Path(n).name] for n in names]  # chelsea: its first caption
    clip_retrieval_reference(names, expected_captions, tiny, tmp_path / "reference")
    reference = tmp_path / "reference"
    assert sorted(p.relative_to(ours).as_posix() for p in (ours / "text_emb").iterdir()) == sorted(
        p.relative_to(reference).as_posix() for p in (reference / "text_emb").iterdir())
    text_emb, expected = np.load(ours / "text_emb" / "text_emb_0.npy"), np.load(reference / "text_emb" / "text_emb_0.npy")
    assert text_emb.dtype == expected.dtype == np.float16 and text_emb.shape == expected.shape == (5, tiny.embed_dim)
    np.testing.assert_allclose(text_emb.astype(np.float32), expected.astype(np.float32), atol=np.spacing(np.float16(1)))
    assert np.load(ours / "img_emb" / "img_emb_0.npy").shape[0] == len(text_emb)  # row j: one image, one text
    reference_table = pq.read_table(reference / "metadata" / "metadata_0.parquet")
    assert table.column("caption").to_pylist() == reference_table.column("caption").to_pylist()
    text = (pa.types.is_string, pa.types.is_large_string)  # pandas 3 writes large_string, older pandas string
    assert [any(t(f.type) for t in text) for f in (table.schema.field("caption"), reference_table.schema.field("caption"))] == [True, True]
    assert table.column_names[0] == reference_table.column_names[0] == "image_path"
    assert len(index_from_shards(ours, tmp_path / "idx", tiny)) == 5  # the folder still imports, text_emb beside


def test_sidecar_captions_and_a_resumed_run_keep_rows_aligned(tiny, collection, tmp_path):
    folder, _ = collection
    for name, caption in CAPTIONS.items():
        (folder / name).with_suffix(".txt").write_text(caption + "\n")
    captions = ShardCaptions.of(CaptionedImages.read(folder), tiny)
    embed_to_shards([folder], tmp_path / "emb", tiny, shard_size=2, captions=captions)
    for number in range(3):
        table = pq.read_table(tmp_path / "emb" / "metadata" / f"metadata_{number}.parquet")
        text_emb = np.load(tmp_path / "emb" / "text_emb" / f"text_emb_{number}.npy")
        expected = tiny.encode_texts(table.column("caption").to_pylist()).float().numpy()
        assert table.column("caption").to_pylist() == [CAPTIONS[Path(n).name] for n in table.column(0).to_pylist()]
        np.testing.assert_allclose(text_emb.astype(np.float32), expected, atol=2e-3)
    other = ShardCaptions(tiny, {**captions.by_path, next(iter(captions.by_path)): "something else"})
    with pytest.raises(InputError, match="captions_sha256"):  # other captions: another run, never mixed in
        embed_to_shards([folder], tmp_path / "emb", tiny, shard_size=2, captions=other, resume=True)


def test_an_image_without_a_caption_is_refused_before_anything_is_written(tiny, collection, tmp_path):
    folder, captions_file = collection
    captions = ShardCaptions.of(CaptionedImages.read(folder, captions_file), tiny)
    shutil.copy(PHOTOS / "camera.png", folder / "camera.png")
    with pytest.raises(InputError, match=r"camera.png: no caption \(1 such images\)"):
        embed_to_shards([folder], tmp_path / "emb", tiny, captions=captions)
    assert not (tmp_path / "emb").exists()


def test_embed_command_with_captions_writes_text_emb(tiny_clip, collection, tmp_path, capsys):
    from clipzsl.cli import main

    folder, captions_file = collection
    assert main(["embed", str(folder), "--captions", str(captions_file), "--out", str(tmp_path / "emb"),
                 "--model", f"hf:{tiny_clip}"]) == 0
    assert "5 embeddings in 1 shard(s) (img_emb/, text_emb/, metadata/)" in capsys.readouterr().out
    assert np.load(tmp_path / "emb" / "text_emb" / "text_emb_0.npy").shape[0] == 5
    assert main(["embed", str(folder), str(folder), "--captions", "--out", str(tmp_path / "two"),
                 "--model", f"hf:{tiny_clip}"]) == 2
    assert "captions go with one folder" in capsys.readouterr().err
