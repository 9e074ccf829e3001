"""The embedding store: cache precedence, durability under SIGKILL, corruption, concurrency."""
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from clipzsl.store import MAX_SEGMENTS, EmbeddingStore, StoreError, cache_root


def vectors(n, dim=8, seed=0):
    v = np.random.default_rng(seed).normal(size=(n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def test_cache_root_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    assert cache_root() == tmp_path / "explicit"
    monkeypatch.delenv("CLIPZSL_CACHE_DIR")
    assert cache_root() == tmp_path / "xdg" / "clipzsl"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "clipzsl"


def test_add_get_replace_remove_and_reopen(tmp_path):
    store = EmbeddingStore(tmp_path / "s", "model-a", 8)
    v = vectors(5)
    store.add(["a", "b", "c"], v[:3])
    store.add(["b"], v[3:4], info=["changed"])  # a later write replaces
    store.remove(["c"])
    again = EmbeddingStore(tmp_path / "s", "model-a", 8)
    assert again.keys() == ["a", "b"] and len(again) == 2 and "c" not in again
    np.testing.assert_array_equal(again.get(["b", "a"]), np.stack([v[3], v[0]]))
    assert again.info("b") == "changed"


def test_get_or_compute_encodes_only_missing(tmp_path):
    store = EmbeddingStore(tmp_path / "s", "model-a", 8)
    calls = []

    def compute(keys):
        calls.append(list(keys))
        return vectors(len(keys), seed=len(calls))

    first = store.get_or_compute(["x", "y"], compute)
    second = store.get_or_compute(["y", "z", "x"], compute)
    assert calls == [["x", "y"], ["z"]]
    np.testing.assert_array_equal(second[[0, 2]], first[[1, 0]])


def test_compaction_keeps_every_entry(tmp_path):
    store = EmbeddingStore(tmp_path / "s", "model-a", 8)
    v = vectors(MAX_SEGMENTS + 3)
    for i in range(MAX_SEGMENTS + 3):
        store.add([f"k{i}"], v[i : i + 1])
    assert len(list((tmp_path / "s").glob("seg-*.npy"))) < MAX_SEGMENTS
    again = EmbeddingStore(tmp_path / "s", "model-a", 8)
    np.testing.assert_array_equal(again.get([f"k{i}" for i in range(MAX_SEGMENTS + 3)]), v)


def test_other_model_is_refused_naming_both(tmp_path):
    EmbeddingStore(tmp_path / "s", "model-a", 8).add(["a"], vectors(1))
    with pytest.raises(StoreError, match=r"embeddings of model 'model-a' .*not of 'model-b'"):
        EmbeddingStore(tmp_path / "s", "model-b", 8)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_corrupt_segment_is_detected_not_served(tmp_path, damage):
    store = EmbeddingStore(tmp_path / "s", "model-a", 8)
    v = vectors(4)
    store.add(["a", "b"], v[:2])
    store.add(["c", "d"], v[2:])
    newest = sorted((tmp_path / "s").glob("seg-*.npy"))[-1]
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[128 + 5] ^= 0xFF  # inside the vector bytes, after the 128-byte .npy header
    else:
        data = bytearray(b"not a zip at all")
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="corrupt store segment"):
        again = EmbeddingStore(tmp_path / "s", "model-a", 8)
    assert again.keys() == ["a", "b"]  # the damaged entries are missing, never wrong
    np.testing.assert_array_equal(again.get(["a", "b"]), v[:2])
    recomputed = again.get_or_compute(["a", "c", "d"], lambda keys: v[2:])  # rerunning completes it
    np.testing.assert_array_equal(recomputed, v[[0, 2, 3]])


def test_unreadable_meta_is_a_clear_error(tmp_path):
    EmbeddingStore(tmp_path / "s", "model-a", 8).add(["a"], vectors(1))
    (tmp_path / "s" / "meta.json").write_text("{trunc")
    with pytest.raises(StoreError, match="unreadable store metadata"):
        EmbeddingStore(tmp_path / "s", "model-a", 8)


WRITER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from clipzsl.store import EmbeddingStore
    store = EmbeddingStore(sys.argv[1], "model-a", 8)
    prefix, count, pause = sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
    rng = np.random.default_rng(abs(hash(prefix)) % 1000)
    for i in range(count):
        key = f"{prefix}{i}"
        store.get_or_compute([key], lambda keys: (time.sleep(pause), rng.normal(size=(len(keys), 8)))[1])
        print(key, flush=True)
    """
)


def test_sigkill_mid_write_leaves_previous_state_and_rerun_completes(tmp_path):
    directory = str(tmp_path / "s")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, directory, "k", "200", "0.005"], stdout=subprocess.PIPE, text=True)
    done = [proc.stdout.readline() for _ in range(25)]  # let it get well into its writes
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert all(line.startswith("k") for line in done)
    survived = EmbeddingStore(directory, "model-a", 8)
    assert len(survived) >= 25  # everything acknowledged is there, and it loads
    assert not [p for p in (tmp_path / "s").glob("seg-*.npy") if p.stat().st_size == 0]
    subprocess.run([sys.executable, "-c", WRITER, directory, "k", "200", "0"], check=True, capture_output=True)
    complete = EmbeddingStore(directory, "model-a", 8)
    assert sorted(complete.keys()) == sorted(f"k{i}" for i in range(200))


def test_two_processes_adding_at_once_keep_everything_once(tmp_path):
    directory = str(tmp_path / "s")
    shared = ["shared0", "shared1", "shared2"]
    procs = [
        subprocess.Popen([sys.executable, "-c", WRITER, directory, prefix, "30", "0.002"], stdout=subprocess.DEVNULL)
        for prefix in ("p", "q")
    ]
    procs += [subprocess.Popen([sys.executable, "-c", WRITER, directory, "shared", "3", "0.01"]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0, 0]
    store = EmbeddingStore(directory, "model-a", 8)
    expected = [f"p{i}" for i in range(30)] + [f"q{i}" for i in range(30)] + shared
    assert sorted(store.keys()) == sorted(expected)
    # "exactly once": no key was ever computed and written twice (every row on disk is one key)
    written = sum(len(np.load(path, mmap_mode="r")) for path in (tmp_path / "s").glob("seg-*.npy"))
    assert written == len(expected)
