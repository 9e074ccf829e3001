"""Every file clipzsl persists is validated on load (clipzsl.records): a hand-edited or damaged adapter.json,
store meta.json, run manifest or packaged concept cache is an error naming the file (or, for a cache, rebuilt
with a warning), never a different score. And train-adapter says when the adapter it saved is untrained."""
import copy
import json
import shutil
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from clipzsl import shards, store
from clipzsl.adapter import AdapterError, CrossAttentionAdapter
from clipzsl.backends import packaged
from clipzsl.cli import main
from clipzsl.images import EmbeddedImages
from clipzsl.shards import _write_shard
from clipzsl.store import EmbeddingStore, StoreError
from clipzsl.training import TrainConfig, fit_with_selection

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=4)


def field_paths(value, prefix=()):
    """Every field of a decoded JSON document, as key/index paths."""
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        yield prefix + (key,)
        yield from field_paths(child, prefix + (key,))


def nudged(value):
    """A value of the same type, changed a little: what a hand edit looks like."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    if isinstance(value, str):
        return value + "x"
    if isinstance(value, list):
        return value[:-1] if value else [0]
    return {**value, "x": 1} if isinstance(value, dict) else 0


@st.composite
def edited(draw, document):
    """`document` with one field deleted, replaced by any JSON value, nudged, or one unknown field added."""
    document = copy.deepcopy(document)
    path = draw(st.sampled_from(list(field_paths(document))))
    parent = document
    for key in path[:-1]:
        parent = parent[key]
    kind = draw(st.sampled_from(["delete", "replace", "nudge", "add"]))
    if kind == "delete":
        del parent[path[-1]]
    elif kind == "replace":
        parent[path[-1]] = draw(JSON)
    elif kind == "nudge":
        parent[path[-1]] = nudged(parent[path[-1]])
    else:
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        if isinstance(target, dict):
            target["unexpected"] = draw(JSON)
        else:
            target.append(draw(JSON))
    return document


def refused_or_unchanged(path, document, read, errors=ValueError):
    """Write `document` over the JSON file at `path` and `read()`: an error naming the file, or what was read
    before the edit (the file is restored after)."""
    original = path.read_text()
    expected = read()
    path.write_text(json.dumps(document))
    try:
        got = read()
    except errors as err:
        assert str(path) in str(err)
    else:
        if isinstance(got, torch.Tensor):
            assert torch.equal(got, expected)
        elif isinstance(got, np.ndarray):
            np.testing.assert_array_equal(got, expected)
        else:
            assert got == expected
    finally:
        path.write_text(original)


# ------------------------------------------------------------------ adapter.json

DIM = 24  # divisible by 3 and 4: "heads": 3 used to load and silently change the scores


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    torch.manual_seed(0)
    adapter = CrossAttentionAdapter(DIM, heads=4)
    with torch.no_grad():
        for p in adapter.parameters():
            p.add_(0.05 * torch.randn_like(p))
        adapter.alpha.fill_(0.5)
    directory = tmp_path_factory.mktemp("adapter") / "ad"
    adapter.save(directory, fingerprint="fp-test", templates=["a photo of a {}."], labels=["cat", "dog"],
                 extra={"training": {"best_epoch": 3, "untrained": False}})
    return directory


def scores(directory):
    g = torch.Generator().manual_seed(1)
    images = EmbeddedImages(F.normalize(torch.randn(3, DIM, generator=g), dim=-1), torch.randn(3, 5, DIM, generator=g))
    text = F.normalize(torch.randn(4, DIM, generator=g), dim=-1)
    model = types.SimpleNamespace(fingerprint="fp-test", embed_dim=DIM, spec="test")
    return CrossAttentionAdapter.load(directory, model).head(images, text, 10.0)


@pytest.mark.parametrize("heads, expected", [(3, r"field 'config\.heads' differs"), (0, r"heads must be at least 1"),
                                             ("4", r"field 'config\.heads': expected an integer")])
def test_edited_adapter_heads_is_refused_naming_the_field(adapter_dir, tmp_path, heads, expected):
    directory = shutil.copytree(adapter_dir, tmp_path / "ad")
    meta = json.loads((directory / "adapter.json").read_text())
    meta["config"]["heads"] = heads
    (directory / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(AdapterError, match=rf"ad/adapter\.json: .*{expected}"):
        scores(directory)


@SETTINGS
@given(data=st.data())
def test_any_edit_of_adapter_json_is_refused_or_changes_nothing(adapter_dir, data):
    config = adapter_dir / "adapter.json"
    refused_or_unchanged(config, data.draw(edited(json.loads(config.read_text()))), lambda: scores(adapter_dir),
                         AdapterError)


# ------------------------------------------------------------------ store meta.json

def store_with_vectors(directory, repair_hint=None):
    vectors = np.random.default_rng(0).normal(size=(3, 8)).astype(np.float32)
    EmbeddingStore(directory, "model-a", 8, spec="spec-a", repair_hint=repair_hint).add(["a", "b", "c"], vectors)
    return vectors


@SETTINGS
@given(data=st.data(), index=st.booleans())
def test_any_edit_of_store_meta_is_refused_or_changes_nothing(tmp_path_factory, data, index):
    directory = tmp_path_factory.mktemp("store") / "s"
    hint = "rebuild it" if index else None  # an index refuses damage; a cache recomputes it
    vectors = store_with_vectors(directory, hint)

    def read():
        store = EmbeddingStore(directory, "model-a", 8, repair_hint=hint)
        return store.get_or_compute(["a", "b", "c"], lambda keys: vectors[[ord(k) - ord("a") for k in keys]])

    meta = directory / "meta.json"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a cache may drop what it cannot trust (and recompute it)
        refused_or_unchanged(meta, data.draw(edited(json.loads(meta.read_text()))), read, StoreError)


def test_store_meta_with_a_wrong_type_names_the_field(tmp_path):
    store_with_vectors(tmp_path / "s")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["embed_dim"] = "8"
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"s/meta\.json: unreadable store metadata \(field 'embed_dim': expected an "
                                         r"integer"):
        EmbeddingStore.read_meta(tmp_path / "s")


def test_store_meta_dtype_that_disagrees_with_the_segments_is_refused(tmp_path):
    store_with_vectors(tmp_path / "s", "rebuild it")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["dtype"] = "float16"
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"meta\.json: field 'dtype' says float16, but the store's segments hold "
                                         r"float32"):
        EmbeddingStore(tmp_path / "s", "model-a", 8, repair_hint="rebuild it")


@pytest.mark.parametrize("dim", [4, 16])
def test_store_meta_embed_dim_edited_names_the_field_not_another_model(tmp_path, dim):
    """Today: "holds embeddings of model 'model-a' (dim 16), not of 'model-a' (dim 8); use the model it was
    built with", which sends the user after a model that is already the right one."""
    store_with_vectors(tmp_path / "s", "rebuild it")
    meta = json.loads((tmp_path / "s" / "meta.json").read_text())
    meta["embed_dim"] = dim
    (tmp_path / "s" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=rf"meta\.json: field 'embed_dim' says {dim}, but its model 'model-a' embeds "
                                         r"8 dimensions \(edited by hand\?\); set it back to 8"):
        EmbeddingStore(tmp_path / "s", "model-a", 8, repair_hint="rebuild it")


# ------------------------------------------------------------------ run manifest (clipzsl-run.json)

@pytest.fixture
def run_dir(tmp_path):
    identity = {"model": "m", "fingerprint": "fp", "images": 5, "paths_sha256": "0" * 64, "shard_size": 2}
    state = shards.RunState(identity)
    vectors = np.ones((2, 4), np.float32)
    state.shards = [_write_shard(tmp_path, 0, vectors, ["a.png", "b.png"]),
                    _write_shard(tmp_path, 1, vectors, ["c.png", "d.png"])]
    state.rows, state.failures = 4, [("e.png", "corrupt")]
    shards.save_state(tmp_path, state)
    return tmp_path, identity


def as_tuple(state):
    return state.identity, state.shards, state.rows, state.failures, state.done, state.complete


@SETTINGS
@given(data=st.data())
def test_any_edit_of_the_run_manifest_is_refused_or_changes_nothing(run_dir, data):
    out, identity = run_dir
    manifest = out / shards.MANIFEST
    refused_or_unchanged(manifest, data.draw(edited(json.loads(manifest.read_text()))),
                         lambda: as_tuple(shards.resume_state(out, identity)))


def test_manifest_with_a_changed_count_is_refused(run_dir):
    out, identity = run_dir
    manifest = out / shards.MANIFEST
    record = json.loads(manifest.read_text())
    record["complete"], record["failures"] = True, []  # as if the run had finished: it had not
    manifest.write_text(json.dumps(record))
    with pytest.raises(ValueError, match=r"clipzsl-run\.json: field 'record_sha256': the content differs from what "
                                         r"clipzsl wrote .*choose a new --out"):
        shards.resume_state(out, identity)


# ------------------------------------------------------------------ the packaged model's concept cache

GOOD = np.arange(4096, dtype=np.float32).reshape(64, 64) / 4096


def built(calls):
    def build():
        calls.append(1)
        return GOOD.copy()
    return build


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(start=st.integers(0, GOOD.nbytes + 127), length=st.integers(1, 4096), how=st.sampled_from(["zero", "cut"]))
def test_damaged_cache_bytes_are_detected_and_rebuilt(tmp_path_factory, start, length, how):
    path = tmp_path_factory.mktemp("cache") / "arr.npy"
    calls = []
    packaged.load_or_build(path, GOOD.shape, built(calls))
    original = path.read_bytes()
    blob = bytearray(original)
    if how == "zero":
        blob[start:start + length] = bytes(len(blob[start:start + length]))
    else:
        del blob[min(start, len(blob) - 1):]
    changed = bytes(blob) != original  # zeroing bytes that were zero changes nothing
    path.write_bytes(bytes(blob))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        np.testing.assert_array_equal(packaged.load_or_build(path, GOOD.shape, built(calls)), GOOD)
    assert len(calls) == 1 + changed
    assert changed == any(f"{path}: cached array not used" in str(w.message) for w in caught)


def test_edited_checksum_record_is_rebuilt(tmp_path):
    path, calls = tmp_path / "arr.npy", []
    packaged.load_or_build(path, GOOD.shape, built(calls))
    record = json.loads(packaged.checksum_path(path).read_text())
    record["shape"] = "64x64"
    packaged.checksum_path(path).write_text(json.dumps(record))
    with pytest.warns(UserWarning, match=r"arr\.npy: cached array not used .*arr\.npy\.json: field 'shape'"):
        packaged.load_or_build(path, GOOD.shape, built(calls))
    assert len(calls) == 2


def test_zeroed_concept_cache_of_the_packaged_model_is_rebuilt_never_used(tmp_path, monkeypatch):
    from skimage import data as skimage_data
    from clipzsl import ZeroShotClassifier, load_model

    labels = ["cat", "dog", "car", "house"]
    cat = Image.fromarray(skimage_data.chelsea())
    intact = load_model("packaged")  # the session's concept cache, built once
    (source,) = store.cache_root().glob("conse-imagenet-minilm-*.npy")
    cache = tmp_path / "cache"
    cache.mkdir()
    for path in store.cache_root().glob("conse-imagenet-minilm-*"):  # the array and its checksum
        shutil.copy(path, cache / path.name)
    blob = bytearray((cache / source.name).read_bytes())
    blob[600_000:604_096] = bytes(4096)  # a few KB of ImageNet concepts zeroed
    (cache / source.name).write_bytes(bytes(blob))
    rebuilt = []
    monkeypatch.setattr(packaged, "build_concepts", lambda backend: rebuilt.append(1) or intact.concepts.numpy())
    with pytest.warns(UserWarning, match=rf"{source.name}: cached array not used \(its sha256 differs"):
        damaged = load_model("packaged", cache=cache)
    assert rebuilt and torch.equal(damaged.concepts, intact.concepts)
    expected = ZeroShotClassifier(intact, labels=labels, cache=False).predict(cat, top_k=1)
    assert ZeroShotClassifier(damaged, labels=labels, cache=False).predict(cat, top_k=1) == expected


# ------------------------------------------------------------------ an untrained adapter is said to be one

def test_best_epoch_zero_warns_and_is_recorded():
    g = torch.Generator().manual_seed(0)
    feats = EmbeddedImages(F.normalize(torch.randn(8, 16, generator=g), dim=-1), torch.randn(8, 4, 16, generator=g))
    text = F.normalize(torch.randn(2, 16, generator=g), dim=-1)
    with pytest.warns(UserWarning, match="the adapter kept is untrained: it scores exactly as zero-shot"):
        result, info = fit_with_selection(feats, [0, 1] * 4, text, [0, 1], 10.0, grid=[{"lr": 0.0}],
                                          base=TrainConfig(epochs=2, patience=1))
    assert info["untrained"] and info["best_epoch"] == 0 and float(result.adapter.alpha.detach()) == 0.0


def test_cli_train_adapter_says_so_when_nothing_beat_epoch_0(tiny_clip, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    for name in ("cat", "dog"):  # the same picture in both classes: no epoch can beat another
        (tmp_path / "data" / name).mkdir(parents=True)
        for j in range(5):
            Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "data" / name / f"{j}.png")
    assert main(["train-adapter", str(tmp_path / "data"), "--out", str(tmp_path / "ad"), "--model", f"hf:{tiny_clip}",
                 "--epochs", "2", "--lr", "0.01"]) == 1
    assert "the adapter kept is untrained" in capsys.readouterr().err
    meta = json.loads((tmp_path / "ad" / "adapter.json").read_text())
    assert meta["training"]["untrained"] is True and meta["training"]["best_epoch"] == 0

