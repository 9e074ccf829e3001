"""Metadata columns and search inside a filter: the filter language against a pure-Python evaluation of
the same expression, searches against brute force over the filtered subset on every search path, and
the table's durability (checked on load, kept over compaction, rebuilt by repair)."""
import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl import saved_index
from clipzsl.image_index import ImageIndex
from clipzsl.metadata import METADATA_FILE, Metadata, read_sidecar
from clipzsl.saved_index import Allowed, SavedIndex
from clipzsl.store import EmbeddingStore, StoreError
from clipzsl.where import And, Compare, FilterError, In, Not, Or, matching, parse

# -- the language, against a pure-Python reading of the same tree -------------------------------------------

COLUMNS = {"t": st.sampled_from(["cats", "dogs", "it's", "", "Cats"]), "n": st.integers(-3, 3),
           "f": st.floats(-2, 2, allow_nan=False, width=32), "b": st.booleans()}
TYPES = {"t": pa.string(), "n": pa.int64(), "f": pa.float64(), "b": pa.bool_()}


def tables():
    row = st.fixed_dictionaries({name: st.none() | values for name, values in COLUMNS.items()})
    return st.lists(row, min_size=0, max_size=12)


def comparisons():
    def of(column):
        ops = st.sampled_from(["=", "!=", "<>"] if column == "b" else ["=", "!=", "<>", "<", "<=", ">", ">="])
        values = COLUMNS[column] if column != "n" else st.integers(-3, 3) | st.floats(-3, 3, allow_nan=False, width=32)
        compare = st.builds(Compare, st.just(column), ops, values, st.just(0))
        listed = st.builds(In, st.just(column), st.lists(values, min_size=1, max_size=3).map(tuple), st.booleans(),
                           st.just(0))
        return compare | listed
    return st.sampled_from(sorted(COLUMNS)).flatmap(of)


EXPRS = st.recursive(comparisons(), lambda inner: st.builds(Not, inner) | st.builds(And, inner, inner)
                     | st.builds(Or, inner, inner), max_leaves=6)


def literal(value):
    if isinstance(value, bool):
        return "TRUE" if value else "false"
    return "'" + value.replace("'", "''") + "'" if isinstance(value, str) else repr(value)


def text(expr):
    """The tree as a filter, every operand in parentheses (with odd spacing and keyword case)."""
    if isinstance(expr, Not):
        return f"NOT ({text(expr.operand)})"
    if isinstance(expr, (And, Or)):
        return f"({text(expr.left)}) {'and' if isinstance(expr, And) else 'Or'}  ({text(expr.right)})"
    if isinstance(expr, In):
        return f"{expr.column} {'not in' if expr.negated else 'in'}({', '.join(map(literal, expr.values))})"
    return f"{expr.column}{expr.op}{literal(expr.value)}"


def truth(expr, row):
    """SQL's three-valued reading of the tree on one row (dict): True, False or None (unknown)."""
    if isinstance(expr, Not):
        value = truth(expr.operand, row)
        return None if value is None else not value
    if isinstance(expr, (And, Or)):
        left, right = truth(expr.left, row), truth(expr.right, row)
        decisive = isinstance(expr, Or)  # True decides an `or`, False an `and`
        if decisive in (left, right):
            return decisive
        return None if None in (left, right) else not decisive
    value = row[expr.column]
    if value is None:
        return None
    if isinstance(expr, In):
        return (value in expr.values) != expr.negated
    ops = {"=": value == expr.value, "!=": value != expr.value, "<>": value != expr.value, "<": value < expr.value,
           "<=": value <= expr.value, ">": value > expr.value, ">=": value >= expr.value}
    return ops[expr.op]


@settings(max_examples=300, deadline=None)
@given(tables(), EXPRS)
def test_filter_matches_python_evaluation(rows, expr):
    table = pa.table({name: pa.array([r[name] for r in rows], type) for name, type in TYPES.items()})
    assert parse(text(expr)) == expr
    assert matching(text(expr), table).tolist() == [truth(expr, row) is True for row in rows]


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40))
def test_any_text_parses_or_is_a_filter_error(source):
    table = pa.table({name: pa.array([], type) for name, type in TYPES.items()})
    try:
        matching(source, table)
    except FilterError as err:
        assert "at position" in str(err)


@pytest.mark.parametrize("source, position, says", [
    ("colour = 'red'", 1, "no column 'colour'; the columns are t, n, f, b"),
    ("t = 'a' and n = 'x'", 13, "column 'n' holds number values, not text like 'x'; compare it with number such as n = 512"),
    ("t = cats", 5, "text goes in single quotes: 'cats'"),
    ("(n > 1", 7, "expected `)`, found the end of the filter"),
    ("n > 1 n", 7, "expected `and`, `or` or the end of the filter, found 'n'"),
    ("b < true", 1, "compare it with = or != only"),
    ("n ; 1", 3, "unexpected ';'"),
    ("t not 'a'", 7, "expected `in` after `not`"),
])
def test_errors_name_position_column_and_fix(source, position, says):
    table = pa.table({name: pa.array([], type) for name, type in TYPES.items()})
    with pytest.raises(FilterError, match="") as err:
        matching(source, table)
    assert f"at position {position}:" in str(err.value) and says in str(err.value)
    assert err.value.position == position - 1


# -- search inside a filter, against brute force over the subset ----------------------------------------------

N, D = 3000, 32


@pytest.fixture(scope="module")
def vectors():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((N, D)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def filled(tmp_path, vectors, factory):
    store = EmbeddingStore(tmp_path / factory.replace(",", "_"), "fp", D, "spec")
    keys = [f"/data/{['cats', 'dogs', 'birds'][i % 3]}/{i:05d}.jpg" for i in range(N)]
    store.add(keys[:1000], vectors[:1000])
    store.add(keys[1000:], vectors[1000:])
    store.add(keys[:50], vectors[:50])  # replaced rows: dead ones in the index
    index = SavedIndex(store)
    index.save(factory)
    return store, index, keys


def brute_force(vectors, keys, queries, chosen, k):
    sims = queries @ vectors[chosen].T
    order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return [[keys[chosen[j]] for j in row] for row in order], np.take_along_axis(sims, order, 1)


@pytest.mark.parametrize("factory, scan_rows", [("Flat", 0), ("IVF8,Flat", 10 ** 9), ("IVF8,Flat", 0),
                                                ("PQ16x4fs", 0), ("IVF8,PQ16x4fs", 0)])
@pytest.mark.parametrize("where", ["folder = 'cats'", "folder = 'dogs' and name < '00300.jpg'",
                                   "name in ('00007.jpg', '02999.jpg') or folder = 'nowhere'", "folder = 'none'"])
def test_filtered_search_is_brute_force_over_the_subset(tmp_path, vectors, monkeypatch, factory, scan_rows, where):
    store, index, keys = filled(tmp_path, vectors, factory)
    metadata = Metadata(store)
    metadata.update([])
    table = metadata.table()
    chosen = np.array(sorted(int(p.rsplit("/", 1)[1][:5]) for p in np.asarray(table.column("path"))[matching(where, table)]),
                      np.int64)
    if "IVF" in factory or "PQ" in factory:  # every allowed candidate re-ranked / probed: exact inside the filter
        state = index.state()
        store.set_state("index_", {**state, "param": 8, "rerank": 3200 if "PQ" in factory else 0})
    monkeypatch.setattr(saved_index, "SCAN_ROWS", scan_rows)
    queries = vectors[[1, 7, 500]] + 0.05
    found = SavedIndex(store).search(queries, 10, metadata.allowed(where))
    expected, sims = brute_force(vectors, keys, queries, chosen, 10)
    assert [[p for p, _ in hits] for hits in found] == expected
    assert np.allclose(np.array([[s for _, s in hits] for hits in found]).reshape(sims.shape), sims, atol=1e-5)


@pytest.mark.parametrize("factory, scans", [("Flat", False), ("IVF8,Flat", True), ("PQ16x4fs", True)])
def test_only_an_inexact_index_lets_few_allowed_rows_be_scanned(tmp_path, vectors, monkeypatch, factory, scans):
    """A Flat index's selector search is exact and skips the rows filtered out: never the store scan."""
    store, _, keys = filled(tmp_path, vectors, factory)
    scanned, real = [], saved_index.scan
    monkeypatch.setattr(saved_index, "scan", lambda *args: scanned.append(1) or real(*args))
    allowed = Allowed.of_rows(np.arange(100, 200) + store.row_span[0], store.row_span)  # keys 100..199
    found = SavedIndex(store).search(vectors[[3, 60]], 10, allowed)
    expected, _ = brute_force(vectors, keys, vectors[[3, 60]], np.arange(100, 200), 10)
    assert bool(scanned) == scans and [[p for p, _ in hits] for hits in found] == expected


def test_fast_scan_without_selector_still_reaches_unfiltered_recall(tmp_path, vectors):
    """The tuned setting (no override), post-filtered with `spread` times the candidates."""
    store, index, keys = filled(tmp_path, vectors, "PQ8x4fs")
    allowed = Allowed.of_rows(np.arange(0, N, 10) + store.row_span[0] + 50, store.row_span)
    queries = vectors[:40] + 0.02
    chosen = (allowed.rows() - store.row_span[0] - 50)
    expected, _ = brute_force(vectors, keys, queries, chosen, 10)
    found = index.search(queries, 10, allowed)
    recall = np.mean([len({p for p, _ in f} & set(e)) / 10 for f, e in zip(found, expected)])
    unfiltered = saved_index.recall_on(store, queries, index)
    assert recall >= min(0.9, unfiltered - 0.05)


def test_allowed_combines_and_excludes(vectors):
    span = (100, 120)
    a = Allowed.of_rows(np.array([100, 105, 119, 130, 5]), span)
    b = Allowed.all_but(np.array([105]), span)
    assert a.rows().tolist() == [100, 105, 119] and (a & b).rows().tolist() == [100, 119]
    assert a.positions(base=104, size=4).tolist() == [False, True, False, False]


# -- the table: from a sidecar CSV and the files, durable -----------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def photos(folder):
    for sub, color, size in (("cats", "red", (640, 480)), ("cats", "pink", (100, 80)), ("dogs", "blue", (800, 600))):
        (folder / sub).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", size, color).save(folder / sub / f"{color}.png")


def test_index_keeps_path_columns_and_a_sidecar_csv(tiny, tmp_path):
    photos(tmp_path / "p")
    (tmp_path / "p" / "meta.csv").write_text("path,stars,night\ncats/red.png,5,true\ndogs/blue.png,2,false\n"
                                             "gone.png,1,true\n")
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(tmp_path / "p", metadata=tmp_path / "p" / "meta.csv")
    table = index.metadata.table().sort_by("path")
    assert table.column_names == ["path", "folder", "name", "width", "height", "stars", "night"]
    assert table.column("width").to_pylist() == [100, 640, 800] and table.column("stars").to_pylist() == [None, 5, 2]
    hits = index.search("a red square", top_k=5, where="folder = 'cats' and width > 512")
    assert [p.rsplit("/", 2)[-2:] for p, _ in hits] == [["cats", "red.png"]]
    assert [p.rsplit("/", 1)[1] for p, _ in index.search("x", 5, where="not night")] == ["blue.png"]
    assert {p.rsplit("/", 1)[1] for p, _ in index.search("x", 5, where="stars >= 2")} == {"red.png", "blue.png"}
    with pytest.raises(FilterError, match="no column 'colour'; the columns are path, folder, name, width, height, "
                                          "stars, night"):
        index.search("x", where="colour = 'red'")


def test_metadata_survives_compaction_and_repair_rebuilds_it(tiny, tmp_path):
    photos(tmp_path / "p")
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(tmp_path / "p", metadata=_csv(tmp_path))
    before = index.search("x", 5, where="stars = 5")
    index.store.compact()  # every row renumbered
    assert index.search("x", 5, where="stars = 5") == before != []
    data = (tmp_path / "idx" / METADATA_FILE).read_bytes()
    (tmp_path / "idx" / METADATA_FILE).write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(StoreError, match="damaged metadata.*clipzsl index repair"):
        ImageIndex(tmp_path / "idx").search("x", 5, where="stars = 5")
    ImageIndex(tmp_path / "idx").repair()
    again = ImageIndex(tmp_path / "idx")
    assert again.metadata.table().num_rows == 3 and "stars" not in again.metadata.table().column_names
    assert len(again.search("x", 5, where="folder = 'cats'")) == 2


def test_a_compaction_between_the_filter_and_the_search_starts_both_again(tiny, tmp_path, monkeypatch):
    """The filter's rows are worked out inside the search's consistent read: a compaction right after them
    (every row renumbered) makes the search run again on the new rows, not return stale or no rows."""
    photos(tmp_path / "p")
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(tmp_path / "p")
    before = index.search("x", 5, where="folder = 'cats'")
    computed, spans = Metadata.allowed, []

    def compacting(self, where):
        allowed = computed(self, where)
        spans.append(self.store.row_span)
        if len(spans) == 1:
            ImageIndex(tmp_path / "idx").store.compact()  # by another handle, as another process would
        return allowed

    monkeypatch.setattr(Metadata, "allowed", compacting)
    assert index.search("x", 5, where="folder = 'cats'") == before and len(before) == 2
    assert len(spans) == 2 and spans[1][0] >= spans[0][1]  # worked out again over the renumbered rows


def _csv(tmp_path):
    path = tmp_path / "meta.csv"
    path.write_text(f"path,stars\n{tmp_path}/p/cats/red.png,5\n")
    return path


@pytest.mark.parametrize("content, says", [("name,x\na,1\n", "no `path` column"),
                                           ("path,width\na,1\n", "derived from the path"),
                                           ("path,x\na,1\na,2\n", "given twice"),
                                           ("path,and\na,1\n", "not a plain name")])
def test_bad_sidecar_is_refused_before_any_work(tiny, tmp_path, content, says):
    (tmp_path / "m.csv").write_text(content)
    with pytest.raises(clipzsl.errors.InputError, match=says):
        read_sidecar(tmp_path / "m.csv")
    index = ImageIndex(tmp_path / "idx", tiny)
    with pytest.raises(clipzsl.errors.InputError, match=says):
        index.update(tmp_path, metadata=tmp_path / "m.csv")
    assert not (tmp_path / "idx" / METADATA_FILE).exists() and len(index) == 0
