"""An index under a memory budget, built in one streaming pass over clip-retrieval shards (issue 21, item 3)."""
import weakref

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

import clipzsl
from clipzsl import shards as shards_module
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.image_index import ImageIndex
from clipzsl.saved_index import PQ_TRAINING, factory_within, parse_size, resident_bytes, train_size
from clipzsl.search import factory_for
from clipzsl.shards import index_from_shards, training_sample

ROWS, SHARDS = 20_000, 20


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def clustered(count, dim, seed, centres=4096):
    """Unit vectors around fixed random centres (neighbourhoods, as real embeddings have)."""
    rng = np.random.default_rng(seed)
    c = np.random.default_rng(12345).normal(size=(centres, dim))
    v = c[rng.integers(0, centres, count)] / np.sqrt(dim) + rng.normal(scale=0.5 / np.sqrt(dim), size=(count, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def shard_dir(tiny, tmp_path_factory):
    """ROWS clustered vectors in SHARDS float16 shards of clip-retrieval's layout."""
    folder = tmp_path_factory.mktemp("shards")
    (folder / "img_emb").mkdir()
    (folder / "metadata").mkdir()
    vectors = clustered(ROWS, tiny.embed_dim, seed=0).astype(np.float16)
    per = ROWS // SHARDS
    for k in range(SHARDS):
        np.save(folder / "img_emb" / f"img_emb_{k}.npy", vectors[k * per : (k + 1) * per])
        pq.write_table(pa.table({"image_path": [f"s{k}/{j}.jpg" for j in range(per)]}),
                       folder / "metadata" / f"metadata_{k}.parquet")
    return folder, vectors.astype(np.float32)


def recall_of(index, vectors, queries):
    """recall@10 of `index`'s search against exact search over `vectors` (rows named as in `shard_dir`)."""
    exact = faiss.IndexFlatIP(vectors.shape[1])
    exact.add(vectors / np.linalg.norm(vectors, axis=1, keepdims=True))
    truth = exact.search(queries, 10)[1]
    per = ROWS // SHARDS
    found = index.search_many(queries, top_k=10)
    return np.mean([len({p for p, _ in hits} & {f"s{i // per}/{i % per}.jpg" for i in row}) / 10
                    for hits, row in zip(found, truth)])


@pytest.mark.parametrize("size, expected", [("2G", 2 << 30), ("512M", 512 << 20), ("1.5GiB", 3 << 29), ("64kb", 65536),
                                            ("1000", 1000), (4096, 4096)])
def test_parse_size_reads_sizes(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "2X", "-1G", "0", "0.1", "G", "two gigabytes", "1e9", True, 0])
def test_parse_size_refuses_nonsense_saying_the_format(size):
    with pytest.raises(InputError, match=r"not a size; .*K, M, G or T .*for example 2G"):
        parse_size(size)


def test_factory_within_keeps_the_usual_index_when_it_fits_and_compresses_below():
    count, dim = 1_000_000, 384
    raw_float16 = count * dim * 2
    assert factory_within(count, dim, raw_float16 // 4) == factory_for(count, dim) == "PQ192x4fs"  # 1/8 of float16
    shares = (0.12, 0.08, 0.04, 0.02)
    chosen = [factory_within(count, dim, int(raw_float16 * share)) for share in shares]
    sizes = [resident_bytes(f, count, dim) for f in chosen]
    assert all(size <= raw_float16 * share for size, share in zip(sizes, shares))
    assert sizes == sorted(sizes, reverse=True) and len(set(chosen)) == 4
    assert all(f.startswith("PQ") and f.endswith("x4fs") for f in chosen)  # fewer sub-quantizers, re-ranked
    with pytest.raises(InputError, match=r"fits a memory budget of 1,000,000 bytes: .*PQ1x4fs needs"):
        factory_within(count, dim, 1_000_000)
    with pytest.raises(InputError, match="IVF1024,Flat needs"):  # a factory given is checked, not replaced
        factory_within(count, dim, raw_float16, "IVF1024,Flat")
    with pytest.raises(InputError, match="not 'HNSW32'"):
        factory_within(count, dim, raw_float16, "HNSW32")


def test_training_sample_is_strided_over_every_shard(shard_dir, tiny):
    folder, vectors = shard_dir
    checked = shards_module._read_shards(folder, tiny)
    sample = training_sample(checked, 1000)
    expected = vectors[:: ROWS // 1000]
    np.testing.assert_allclose(sample, expected / np.linalg.norm(expected, axis=1, keepdims=True), atol=1e-6)
    assert len(training_sample(checked, 10 * ROWS)) == ROWS  # all rows when fewer than asked


@pytest.mark.parametrize("budget, code, floor", [(700_000, "x4fs", 0.9), (200_000, "x4fs", 0.9)])
def test_budgeted_index_fits_its_budget_recalls_and_searches_like_any_index(shard_dir, tiny, tmp_path, budget, code,
                                                                           floor):
    folder, vectors = shard_dir
    index_from_shards(folder, tmp_path / "idx", tiny, max_memory=budget)
    index = ImageIndex(tmp_path / "idx")  # opened afresh, as the service and the Ray engine open it
    state = index.saved_index.state()
    assert code in state["factory"] and len(index) == ROWS
    assert (tmp_path / "idx" / "index.faiss").stat().st_size <= budget
    assert resident_bytes(state["factory"], ROWS, tiny.embed_dim) <= budget
    assert recall_of(index, vectors, clustered(200, tiny.embed_dim, seed=99)) >= floor  # new in-distribution queries
    assert index.search(vectors[123], top_k=10)[0][0].startswith("s0/")  # a stored vector finds its own shard's rows
    assert index.info().factory == state["factory"]


def test_build_is_streaming_one_block_at_a_time(shard_dir, tiny, tmp_path, monkeypatch):
    folder, _ = shard_dir
    live, most, blocks, asked = set(), [0], [0], []
    unit_rows, sample = shards_module._unit_rows, shards_module.training_sample

    def spy_unit_rows(vectors, emb):
        for start, block in unit_rows(vectors, emb):
            if len(vectors) == ROWS // SHARDS:  # a shard's rows, not the training sample's
                blocks[0] += 1
                live.add(id(block))
                weakref.finalize(block, live.discard, id(block))
                most[0] = max(most[0], len(live))
            yield start, block

    monkeypatch.setattr(shards_module, "_unit_rows", spy_unit_rows)
    monkeypatch.setattr(shards_module, "training_sample", lambda checked, n: (asked.append(n), sample(checked, n))[1])
    index_from_shards(folder, tmp_path / "idx", tiny, max_memory=700_000)
    factory = ImageIndex(tmp_path / "idx").saved_index.state()["factory"]
    assert blocks[0] == 2 * SHARDS  # every shard checked, then added: one pass each
    assert most[0] <= 2  # the block being added, and at most the one before it not yet freed
    assert asked == [max(train_size(factory), PQ_TRAINING if ",PQ" in factory else 0)]


def test_bad_max_memory_is_refused_by_the_command_with_exit_2(shard_dir, tiny_clip, tmp_path, capsys):
    folder, _ = shard_dir
    code = main(["index", "from-shards", str(folder), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}",
                 "--max-memory", "lots"])
    assert code == 2 and "'lots': not a size" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()
    code = main(["index", "from-shards", str(folder), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}",
                 "--max-memory", "10K"])
    assert code == 2 and "fits a memory budget of 10,240 bytes" in capsys.readouterr().err
    assert not (tmp_path / "idx").exists()  # refused before the index was written
    code = main(["index", "from-shards", str(folder), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}",
                 "--max-memory", "0.7M"])
    assert code == 0 and f"{ROWS} images" in capsys.readouterr().out
    assert (tmp_path / "idx" / "index.faiss").stat().st_size <= 0.7 * 2**20


def test_index_images_fits_max_memory_and_refuses_a_budget_nothing_fits(tiny_clip, tmp_path, capsys):
    rng = np.random.default_rng(0)
    (tmp_path / "imgs").mkdir()
    for i in range(200):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    args = ["index", "images", str(tmp_path / "imgs"), "--model", f"hf:{tiny_clip}", "--out"]
    assert main([*args, str(tmp_path / "none"), "--max-memory", "100"]) == 2
    assert "fits a memory budget of 100 bytes" in capsys.readouterr().err
    assert not (tmp_path / "none").exists()  # refused before anything was embedded or written
    flat = resident_bytes("Flat", 200, 32)
    assert main([*args, str(tmp_path / "idx"), "--max-memory", str(flat - 1)]) == 0
    index = ImageIndex(tmp_path / "idx")
    factory = index.saved_index.state()["factory"]
    assert "x4fs" in factory and resident_bytes(factory, 200, 32) < flat  # the exact index did not fit
    hits = index.search(tmp_path / "imgs" / "7.png", top_k=1)
    assert hits[0][0].endswith("7.png")  # re-ranked with the exact rows: an image finds itself
