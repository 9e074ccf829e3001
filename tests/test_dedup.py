"""Near-duplicate groups (clipzsl.dedup) and hiding them from search (ImageIndex.hide)."""
import json
import shutil
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from clipzsl.dedup import (DuplicateGroup, check_threshold, connected_groups, deduplicate, find_duplicates,
                           format_groups, similar_pairs)
from clipzsl.errors import InputError
from clipzsl.image_index import ImageIndex
from clipzsl.store import StoreError


def unit(rows):
    rows = np.asarray(rows, np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def planted(count, dim, copies, seed=0, noise=0.02):
    """`count` random unit vectors, then `copies` noisy copies of the first ones: rows count + i copy row i."""
    rng = np.random.default_rng(seed)
    base = unit(rng.normal(size=(count, dim)))
    return unit(np.concatenate([base, base[:copies] + noise * rng.normal(size=(copies, dim))]))


@settings(max_examples=25, deadline=None)
@given(st.integers(2, 60), st.integers(0, 20), st.sampled_from([0.5, 0.9, 0.97]), st.integers(0, 10**6),
       st.sampled_from([1, 7, 64]))
def test_similar_pairs_are_every_pair_at_or_above_the_threshold(count, copies, threshold, seed, block):
    vectors = planted(count, 8, min(copies, count), seed, noise=0.3)
    sims = vectors @ vectors.T
    found = {tuple(p) for p in similar_pairs(vectors, threshold, block, progress=False).tolist()}
    clear = np.abs(sims - threshold) > 1e-5  # float rounding decides pairs on the threshold itself
    expected = {(i, j) for i, j in zip(*np.nonzero(np.triu(sims >= threshold, 1) & clear))}
    assert expected <= found and all(i < j for i, j in found)
    assert {p for p in found if clear[p]} == expected


def test_a_pair_exactly_at_the_threshold_is_found():
    vectors = unit([[1, 0], [1, 0]])
    assert similar_pairs(vectors, 1.0, progress=False).tolist() == [[0, 1]]


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 40).flatmap(lambda n: st.tuples(st.just(n), st.lists(
    st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)).filter(lambda p: p[0] < p[1]), max_size=60))))
def test_groups_are_scipys_connected_components(case):
    count, pairs = case
    pairs = np.array(pairs, np.int64).reshape(-1, 2)
    groups = connected_groups(count, pairs)
    graph = coo_matrix((np.ones(len(pairs)), (pairs[:, 0], pairs[:, 1])), shape=(count, count))
    _, labels = connected_components(graph, directed=False)
    expected = sorted(sorted(np.flatnonzero(labels == c).tolist()) for c in np.unique(labels))
    assert sorted(groups) == [g for g in expected if len(g) > 1]
    assert [g[0] for g in groups] == sorted(g[0] for g in groups)


def vector_index(tmp_path, tiny, vectors, factory="Flat"):
    index = ImageIndex(tmp_path / "idx", tiny)
    index.add_vectors([([f"/img/{i:04d}.png" for i in range(len(vectors))], vectors)], factory)
    return index


def test_find_duplicates_groups_the_planted_copies_in_index_order(tmp_path, tiny):
    vectors = planted(300, tiny.embed_dim, 20, noise=0.01)
    found = find_duplicates(vector_index(tmp_path, tiny, vectors), 0.97, block=64, progress=False)
    groups = found.groups
    assert [g.paths for g in groups] == [[f"/img/{i:04d}.png", f"/img/{300 + i:04d}.png"] for i in range(20)]
    for group, i in zip(groups, range(20)):
        np.testing.assert_allclose(group.similarities, [1.0, vectors[i] @ vectors[300 + i]], atol=1e-5)
    assert len(found.no_file) == 40 and found.candidates == 20  # vectors without files: the embedding alone, said so
    assert "40 images without a file and 0 unreadable: their pairs by the embedding alone, cosine >= 0.97" in found.describe()


@pytest.mark.parametrize("threshold", [0, -0.5, 1.01, float("nan")])
def test_a_threshold_outside_0_1_is_refused(threshold):
    with pytest.raises(InputError, match="above 0 and at most 1"):
        check_threshold(threshold)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF4,Flat", "PQ8x4fs"])
def test_hidden_images_never_come_back_and_k_results_still_do(tmp_path, tiny, factory):
    vectors = planted(400, tiny.embed_dim, 50, noise=0.005)
    index = vector_index(tmp_path, tiny, vectors, factory)
    groups = deduplicate(index, 0.97, hide=True, progress=False).groups
    hidden = {p for g in groups for p in g.paths[1:]}
    assert len(hidden) == 50 and ImageIndex(tmp_path / "idx").hidden() == hidden  # persisted
    reopened = ImageIndex(tmp_path / "idx")
    for hits in reopened.search_many(vectors[300:400], top_k=10):
        assert len(hits) == 10 and not {p for p, _ in hits} & hidden
    reopened.hide([])  # shown again: each copy finds itself among its top 2 (itself and its original)
    hits = ImageIndex(tmp_path / "idx").search_many(vectors[400:], top_k=2)
    assert sum(f"/img/{400 + i:04d}.png" in {p for p, _ in h} for i, h in enumerate(hits)) >= 45


@pytest.mark.parametrize("factory", ["Flat", "PQ8x4fs"])
def test_a_filter_and_hidden_duplicates_narrow_one_search_together(tmp_path, tiny, factory):
    vectors = planted(400, tiny.embed_dim, 50, noise=0.005)
    index = vector_index(tmp_path, tiny, vectors, factory)
    hidden = {p for g in deduplicate(index, 0.97, hide=True, progress=False).groups for p in g.paths[1:]}
    paths = [f"/img/{i:04d}.png" for i in range(len(vectors))]
    allowed = [i for i, p in enumerate(paths) if Path(p).name >= "0350.png" and p not in hidden]
    queries = vectors[:20]
    found = ImageIndex(tmp_path / "idx").search_many(queries, top_k=5, where="name >= '0350.png'")
    for query, hits in zip(queries, found):
        best = np.argsort(-(vectors[allowed] @ query), kind="stable")[:5]
        assert [p for p, _ in hits] == [paths[allowed[i]] for i in best]  # exact inside both, in order


def test_hidden_rows_stay_hidden_after_a_compaction(tmp_path, tiny):
    vectors = planted(100, tiny.embed_dim, 10, noise=0.005)
    index = vector_index(tmp_path, tiny, vectors)
    deduplicate(index, 0.97, hide=True, progress=False)
    index.store.remove([f"/img/{i:04d}.png" for i in range(20, 40)])
    index.store.compact()  # every row renumbered
    hits = ImageIndex(tmp_path / "idx").search_many(vectors[100:], top_k=5)
    assert all(len(h) == 5 and all(int(Path(p).stem) < 100 for p, _ in h) for h in hits)


@pytest.mark.parametrize("value", ["not json", '{"paths": []}', '{"paths": ["a", "a"], "reason": ""}',
                                   '{"paths": ["a"], "reason": "", "extra": 1}', "[1]"])
def test_a_damaged_hidden_record_is_refused_by_name_and_unhide_repairs_it(tmp_path, tiny, value):
    index = vector_index(tmp_path, tiny, planted(20, tiny.embed_dim, 2, noise=0.001))
    deduplicate(index, 0.97, hide=True, progress=False)
    index.close()
    with sqlite3.connect(tmp_path / "idx" / "table.sqlite") as db:
        db.execute("UPDATE state SET value = ? WHERE name = 'hidden_record'", (value,))
    db.close()
    with pytest.raises(StoreError, match=r"table.sqlite \(hidden images\): damaged .*--show"):
        ImageIndex(tmp_path / "idx").search(np.ones(tiny.embed_dim), top_k=3)
    ImageIndex(tmp_path / "idx").hide([])
    assert len(ImageIndex(tmp_path / "idx").search(np.ones(tiny.embed_dim), top_k=3)) == 3


PHOTOS = Path(np.__file__).parents[1] / "skimage" / "data"


def photos_with_a_copy(tmp_path, names, copied):
    """A folder of scikit-image's photos `names`, and in copy/ a second copy of the photo `copied`."""
    photos = tmp_path / "photos"
    (photos / "copy").mkdir(parents=True)
    for name in names:
        shutil.copy(PHOTOS / name, photos / name)
    shutil.copy(PHOTOS / copied, photos / "copy" / copied)
    return photos


def test_the_same_photo_indexed_twice_is_one_group_and_comes_back_once_when_hidden(tmp_path, tiny):
    photos = photos_with_a_copy(tmp_path, ["astronaut.png", "camera.png", "chelsea.png", "coffee.png", "rocket.jpg",
                                           "hubble_deep_field.jpg"], "chelsea.png")
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(photos)
    query = photos / "chelsea.png"
    assert sum(Path(p).name == "chelsea.png" for p, _ in index.search(query, top_k=3)) == 2  # today: twice
    groups = deduplicate(index, 0.999, hide=True, progress=False).groups
    assert [sorted(Path(p).parent.name for p in g.paths) for g in groups] == [["copy", "photos"]]
    hits = index.search(query, top_k=3)
    assert len(hits) == 3 and sum(Path(p).name == "chelsea.png" for p, _ in hits) == 1


def test_format_groups_text_json_csv():
    groups = [DuplicateGroup(["/a.png", "/b.png"], [1.0, 0.975]), DuplicateGroup(["/c,d.png", "/e.png"], [1.0, 0.95])]
    assert json.loads(format_groups(groups, "json"))[1] == {"group": 2, "paths": ["/c,d.png", "/e.png"],
                                                            "similarities": [1.0, 0.95]}
    assert format_groups(groups, "csv").splitlines() == [
        "group,path,similarity,kept", "1,/a.png,1.000000,1", "1,/b.png,0.975000,0", '2,"/c,d.png",1.000000,1',
        "2,/e.png,0.950000,0"]
    assert format_groups(groups) == "group 1\n  kept  /a.png\n  0.9750  /b.png\ngroup 2\n  kept  /c,d.png\n  0.9500  /e.png\n"
    with pytest.raises(InputError, match="choose one of text, json, csv"):
        format_groups(groups, "xml")


def test_index_dedup_command_lists_hides_and_shows(tmp_path, tiny_clip, capsys):
    from clipzsl.cli import main

    photos = photos_with_a_copy(tmp_path, ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"], "chelsea.png")
    idx = str(tmp_path / "idx")
    assert main(["index", "images", str(photos), "--out", idx, "--model", f"hf:{tiny_clip}"]) == 0
    capsys.readouterr()
    assert main(["index", "dedup", idx, "--threshold", "0.999", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    rows = out.splitlines()
    assert rows[0] == "group,path,similarity,kept" and len(rows) == 3 and {r.split(",")[0] for r in rows[1:]} == {"1"}
    assert "1 groups of near-duplicates at cosine similarity >= 0.999 and phash distance <= " in err
    assert "; --hide keeps" in err and "without a file" not in err
    assert main(["index", "dedup", idx, "--threshold", "0.999", "--hide"]) == 0
    assert "1 images hidden from search" in capsys.readouterr().err
    assert main(["search", idx, "--image", str(photos / "chelsea.png"), "--top-k", "4", "--format", "csv"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:]
    assert len(lines) == 4 and sum("chelsea.png" in line for line in lines) == 1  # 5 images, one hidden
    assert main(["index", "dedup", idx, "--show"]) == 0 and not ImageIndex(idx).hidden()
    assert main(["index", "dedup", idx, "--threshold", "1.5"]) == 2
    assert "above 0 and at most 1" in capsys.readouterr().err
