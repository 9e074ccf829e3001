"""The store at scale (issue 12): O(batch) appends, memory-mapped open, float16, a saved FAISS
index updated incrementally, compaction, and faults (checksums, set-aside names, full disk)."""
import errno
import json
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

import clipzsl
import clipzsl.store as store_module
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.saved_index import SavedIndex
from clipzsl.store import SMALL_SEGMENT_ROWS, EmbeddingStore, StoreError


def unit(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def clustered(n, dim=16, centres=20, seed=0):
    """Unit vectors around a few centres: neighbours exist, as in real embeddings."""
    rng = np.random.default_rng(seed)
    c = rng.normal(size=(centres, dim))
    v = c[rng.integers(0, centres, n)] + 0.3 * rng.normal(size=(n, dim))
    return (v / np.linalg.norm(v, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def count_loads(monkeypatch):
    """How many times numpy reads an array file (segments of either format)."""
    calls = []
    original = np.load
    monkeypatch.setattr(np, "load", lambda *a, **k: (calls.append(a[0]), original(*a, **k))[1])
    return calls


def test_append_reads_nothing_already_stored(tmp_path, count_loads):
    store = EmbeddingStore(tmp_path / "s", "m", 8)
    for i in range(6):
        store.add([f"b{i}-{j}" for j in range(SMALL_SEGMENT_ROWS)], unit(SMALL_SEGMENT_ROWS, seed=i))
    assert count_loads == []  # an append costs O(batch): no earlier segment is re-read
    assert len(store) == 6 * SMALL_SEGMENT_ROWS


def test_open_maps_lazily_and_reads_only_what_is_asked(tmp_path, monkeypatch, count_loads):
    v = unit(300)
    writer = EmbeddingStore(tmp_path / "s", "m", 8)
    for i in range(3):
        writer.add([f"k{j}" for j in range(100 * i, 100 * i + 100)], v[100 * i : 100 * i + 100])
    monkeypatch.setattr(store_module, "VERIFY_ON_OPEN_BYTES", 0)  # as a large store is opened
    count_loads.clear()
    reader = EmbeddingStore(tmp_path / "s", "m", 8)
    assert len(reader) == 300 and count_loads == []  # opening reads only the table
    np.testing.assert_array_equal(reader.get(["k150", "k151"]), v[150:152])
    assert len(count_loads) == 1  # only the segment holding them, memory-mapped
    assert isinstance(reader._maps[reader.segments[1].name], np.memmap)


def test_float16_store_agrees_and_is_half_the_size(tmp_path):
    v = unit(2000, dim=64)
    keys = [str(i) for i in range(2000)]
    full = EmbeddingStore(tmp_path / "f32", "m", 64)
    half = EmbeddingStore(tmp_path / "f16", "m", 64, dtype="float16")
    full.add(keys, v)
    half.add(keys, v)
    again = EmbeddingStore(tmp_path / "f16", "m", 64)  # the dtype is the store's, not the opener's
    assert again.dtype == np.float16 and again.get(keys).dtype == np.float32
    assert np.abs(again.get(keys) - v).max() < 1e-3  # cosine agreement far below any ranking gap
    seg = lambda d: sum(p.stat().st_size for p in d.glob("seg-*.npy"))
    assert seg(tmp_path / "f16") < 0.55 * seg(tmp_path / "f32")


def test_saved_index_is_updated_not_rebuilt(tmp_path, monkeypatch):
    import clipzsl.saved_index as saved_index_module

    v = clustered(3000)
    keys = [f"k{i}" for i in range(3000)]
    store = EmbeddingStore(tmp_path / "s", "m", 16)
    store.add(keys[:2000], v[:2000])
    state = SavedIndex(store).save("IVF16,Flat")
    assert state["factory"] == "IVF16,Flat" and state["rows"] == 2000 and state["recall"] >= 0.95
    assert (tmp_path / "s" / "index.faiss").exists()

    def no_rebuild(*args, **kwargs):
        raise AssertionError("the saved index was rebuilt")

    monkeypatch.setattr(saved_index_module, "build_index", no_rebuild)
    store.add(keys[2000:], v[2000:])
    reader = EmbeddingStore(tmp_path / "s", "m", 16)
    hits = SavedIndex(reader).search(v[2500:2501], 5)[0]  # a row newer than the saved index is found
    assert hits[0][0] == "k2500" and abs(hits[0][1] - 1) < 1e-5
    assert SavedIndex(reader).save()["rows"] == 3000  # only the new rows were added (no training)
    mapped = SavedIndex(EmbeddingStore(tmp_path / "s", "m", 16))
    assert mapped.search(v[:1], 1)[0][0][0] == "k0"  # the saved index, memory-mapped (read-only)
    store.add(["late"], v[1:2] * -1)  # another writer appends: the open reader sees it on its next search
    assert mapped.search(-v[1:2], 1)[0][0][0] == "late"
    # replaced and removed rows are never returned
    reader.add(["k7"], -v[7:8])
    reader.remove(["k8"])
    found = [k for hits in SavedIndex(EmbeddingStore(tmp_path / "s", "m", 16)).search(v[7:9], 50) for k, _ in hits]
    assert "k8" not in found and "k7" not in found[:1]


def test_compact_drops_replaced_rows_and_keeps_every_entry(tmp_path):
    v = unit(400)
    store = EmbeddingStore(tmp_path / "s", "m", 8)
    store.add([f"k{i}" for i in range(200)], v[:200], info=[str(i) for i in range(200)])
    store.add([f"k{i}" for i in range(100)], v[200:300])  # replaces half
    store.remove([f"k{i}" for i in range(150, 200)])
    assert store.dead_rows() == 150
    store.compact()
    again = EmbeddingStore(tmp_path / "s", "m", 8)
    assert again.dead_rows() == 0 and len(again) == 150
    np.testing.assert_array_equal(again.get([f"k{i}" for i in range(150)]), np.concatenate([v[200:300], v[100:150]]))
    assert again.info("k120") == "120"
    assert sum(len(np.load(p, mmap_mode="r")) for p in (tmp_path / "s").glob("seg-*.npy")) == 150


def test_set_aside_segment_name_is_never_reused_and_updates_survive(tmp_path):
    v = unit(6)
    store = EmbeddingStore(tmp_path / "s", "m", 8)
    store.add(["a"], v[0:1])
    store.add(["b"], v[1:2])
    newest = sorted((tmp_path / "s").glob("seg-*.npy"))[-1]
    newest.write_bytes(newest.read_bytes()[:-4])
    with pytest.warns(UserWarning, match="corrupt store segment"):
        healed = EmbeddingStore(tmp_path / "s", "m", 8)
    for i in range(2, 6):  # the update of "a" and new keys, each a new segment
        healed.add(["a" if i == 2 else f"k{i}"], v[i : i + 1])
    names = sorted(p.name for p in (tmp_path / "s").glob("seg-*"))
    assert f"{newest.name}.corrupt" in names and newest.name not in names
    np.testing.assert_array_equal(EmbeddingStore(tmp_path / "s", "m", 8).get(["a"]), v[2:3])


def test_mismatch_names_both_models_by_spec_and_fingerprint(tmp_path):
    EmbeddingStore(tmp_path / "s", "fp-a", 8, spec="spec-a").add(["a"], unit(1))
    with pytest.raises(StoreError, match=r"'fp-a' \(spec 'spec-a', dim 8\), not of 'fp-b' \(spec 'spec-b', dim 8\)"):
        EmbeddingStore(tmp_path / "s", "fp-b", 8, spec="spec-b")


def no_temp_files(directory):
    return [p.name for p in directory.rglob("*") if p.name.endswith(".tmp")]


def test_full_disk_is_one_clear_error_and_changes_nothing(tmp_path, monkeypatch):
    """ENOSPC simulated at fsync (see the tmpfs test for a real full disk)."""
    store = EmbeddingStore(tmp_path / "s", "m", 8)
    store.add(["a"], unit(1))

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(StoreError, match=r"no space left on device; nothing was written"):
        store.add(["b", "a"], unit(2, seed=1))
    monkeypatch.undo()
    again = EmbeddingStore(tmp_path / "s", "m", 8)
    assert again.keys() == ["a"] and np.array_equal(again.get(["a"]), unit(1))
    assert no_temp_files(tmp_path / "s") == [] and len(list((tmp_path / "s").glob("seg-*"))) == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MB tmpfs (needs root and mount); skipped where it cannot be mounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                                           capture_output=True).returncode:
        pytest.skip("cannot mount a small tmpfs here")
    yield mount
    subprocess.run(["umount", "--lazy", str(mount)], check=True)  # store objects may still map files


def test_really_full_disk(small_disk):
    store = EmbeddingStore(small_disk / "s", "m", 256)
    v = unit(1000, dim=256)
    store.add([f"k{i}" for i in range(1000)], v)  # about 1 MB
    with pytest.raises(StoreError, match="no space left on device") as err:
        store.add([f"n{i}" for i in range(1500)], unit(1500, dim=256, seed=1))
    assert "\n" not in str(err.value)
    again = EmbeddingStore(small_disk / "s", "m", 256)
    assert len(again) == 1000 and np.array_equal(again.get(["k999"]), v[999:1000])
    assert no_temp_files(small_disk) == [] and len(list((small_disk / "s").glob("seg-*"))) == 1
    again.add(["late"], unit(1, dim=256))  # still usable once a write fits
    assert len(EmbeddingStore(small_disk / "s", "m", 256)) == 1001


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def test_label_cache_write_failure_warns_and_classifies(tiny, tmp_path, monkeypatch):
    fresh = clipzsl.ZeroShotClassifier(tiny, labels=["cat", "dog"], templates=["a {}."], cache=False)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_module, "atomic_write", full)
    with pytest.warns(UserWarning, match="could not write the cache"):
        clf = clipzsl.ZeroShotClassifier(tiny, labels=["cat", "dog"], templates=["a {}."], cache=tmp_path)
    torch.testing.assert_close(clf.class_embeddings, fresh.class_embeddings)


def test_corrupt_label_meta_blocks_neither_classify_nor_clear(tiny_clip, tmp_path, capsys):
    Image.new("RGB", (40, 40), "red").save(tmp_path / "red.png")
    args = ["classify", str(tmp_path / "red.png"), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}",
            "--cache-dir", str(tmp_path / "c"), "--format", "json"]
    assert main(args) == 0
    expected = json.loads(capsys.readouterr().out)
    [meta] = (tmp_path / "c" / "labels").glob("*/meta.json")
    meta.write_text("{trunc")
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "clipzsl: warning: label cache not used" in captured.err  # main() prints library warnings so
    assert json.loads(captured.out) == expected
    assert main(["cache", "clear", "--cache-dir", str(tmp_path / "c")]) == 0
    assert not list((tmp_path / "c" / "labels").glob("*"))


def make_images(folder, colors):
    folder.mkdir(parents=True, exist_ok=True)
    for name, color in colors.items():
        Image.new("RGB", (48, 48), color).save(folder / f"{name}.png")


COLORS = {"red": "red", "green": "green", "blue": "blue", "pink": "pink", "white": "white", "olive": "olive"}


def test_damaged_index_segment_is_an_error_then_repaired(tiny, tmp_path, capsys):
    make_images(tmp_path / "p", COLORS)
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(tmp_path / "p", checkpoint_every=3)  # two segments
    seg = sorted((tmp_path / "idx").glob("seg-*.npy"))[-1]
    data = bytearray(seg.read_bytes())
    data[140] ^= 0xFF
    seg.write_bytes(bytes(data))
    with pytest.raises(StoreError, match=rf"{seg.name}: damaged store segment.*clipzsl index repair"):
        ImageIndex(tmp_path / "idx").search("a red square", top_k=10)
    assert main(["search", str(tmp_path / "idx"), "a red square"]) == 2
    assert "clipzsl index repair" in capsys.readouterr().err
    assert main(["index", "repair", str(tmp_path / "idx")]) == 0
    assert "1 damaged segments, 3 images re-embedded, 0 lost" in capsys.readouterr().out
    results = ImageIndex(tmp_path / "idx").search("a red square", top_k=10)
    assert sorted(p.rsplit("/", 1)[-1] for p, _ in results) == sorted(f"{c}.png" for c in COLORS)
    assert main(["index", "info", str(tmp_path / "idx")]) == 0
    out = capsys.readouterr().out
    assert "6 images" in out and "faiss factory: Flat" in out and "recall@10: 1.000" in out


def test_search_formats_image_query_and_factory(tiny, tmp_path, capsys):
    make_images(tmp_path / "p", COLORS)
    idx = str(tmp_path / "idx")
    assert main(["index", "images", str(tmp_path / "p"), "--out", idx, "--model", f"hf:{tiny.spec.split(':', 1)[1]}",
                 "--faiss-factory", "HNSW8"]) == 0
    capsys.readouterr()
    assert main(["index", "info", idx]) == 0
    assert "faiss factory: HNSW8" in capsys.readouterr().out
    assert main(["search", idx, "--image", str(tmp_path / "p" / "pink.png"), "--top-k", "3", "--format", "json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["path"].endswith("pink.png") and len(hits) == 3
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert main(["search", idx, "a red square", "--top-k", "2", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "rank,path,score" and len(lines) == 3 and lines[1].startswith("1,")
    python = ImageIndex(idx).search("a red square", top_k=2)
    assert [p for p, _ in python] == [line.split(",")[1] for line in lines[1:]]
    assert main(["search", idx]) == 2 and "exactly one" in capsys.readouterr().err
