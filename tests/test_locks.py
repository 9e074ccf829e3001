"""Locks and concurrent processes (issue 19 section 7): a waiting run says for what and whom, a long
label job never blocks another writer for its whole run, and readers never see a writer's upkeep."""
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clipzsl.saved_index import SavedIndex
from clipzsl.store import MAX_SEGMENTS, EmbeddingStore

DIM = 8

HOLDER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from clipzsl.store import locked
    directory, gate = Path(sys.argv[1]), Path(sys.argv[2])
    with locked(directory):
        print("holding", flush=True)
        while not gate.exists():
            time.sleep(0.02)
    """
)

ADDER = textwrap.dedent(
    """
    import logging, sys, numpy as np
    from clipzsl.store import EmbeddingStore
    logging.basicConfig(format="%(name)s: %(message)s")  # the application shows the library's warnings
    EmbeddingStore(sys.argv[1], "model-a", 8).add(["late"], np.ones((1, 8)))
    print("added", flush=True)
    """
)

# get_or_compute of argv[3] keys (comma-separated, or a count of "k{i}" keys); the first compute call
# says "computing", then waits for the gate file, if one is named
LABELLER = textwrap.dedent(
    """
    import sys, time, numpy as np
    from pathlib import Path
    import clipzsl.store
    directory, spec, gate = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    clipzsl.store.WRITE_CHUNK = int(sys.argv[4])
    keys = spec.split(",") if "," in spec else [f"k{i}" for i in range(int(spec))]
    store = clipzsl.store.EmbeddingStore(directory, "model-a", 8)

    def compute(todo):
        print("computing", len(todo), flush=True)
        deadline = time.monotonic() + 60
        while gate.name and not gate.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        return np.random.default_rng(len(todo)).normal(size=(len(todo), 8))

    store.get_or_compute(keys, compute)
    print("done", flush=True)
    """
)


def run(script: str, *args, **kwargs) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def line_within(stream, seconds: float) -> str:
    """The next line of a child's pipe, or "" if none comes within `seconds` (a test fails, never hangs)."""
    ready, _, _ = select.select([stream], [], [], seconds)
    return stream.readline() if ready else ""


def rows_on_disk(directory: Path) -> int:
    return sum(len(np.load(path, mmap_mode="r")) for path in directory.glob("seg-*.npy"))


def gave_up_waiting(directory: Path, gate: Path, timeout: str) -> str:
    """stderr of a writer that gave up ($CLIPZSL_LOCK_TIMEOUT) on a lock held until `gate` exists (then made)."""
    adder = run(ADDER, directory, env={**os.environ, "CLIPZSL_LOCK_TIMEOUT": timeout})
    try:
        _, err = adder.communicate(timeout=30)
    finally:
        gate.touch()
    assert adder.returncode != 0
    return err


def test_waiting_writer_says_what_it_waits_for_and_who_holds_it(tmp_path):
    directory, gate = tmp_path / "s", tmp_path / "gate"
    holder = run(HOLDER, directory, gate)
    assert holder.stdout.readline() == "holding\n"
    adder = run(ADDER, directory)
    try:
        line = line_within(adder.stderr, 30)  # said while waiting, before the holder lets go
        assert adder.poll() is None
    finally:
        gate.touch()
    assert f"waiting for the lock on {directory}" in line and f"pid {holder.pid}" in line
    assert "clipzsl.store import locked" in line  # the holder's command line
    assert adder.wait(timeout=60) == 0 and holder.wait(timeout=60) == 0
    assert "late" in EmbeddingStore(directory, "model-a", 8)


def test_lock_timeout_is_an_error_naming_the_holder(tmp_path):
    directory, gate = tmp_path / "s", tmp_path / "gate"
    holder = run(HOLDER, directory, gate)
    assert holder.stdout.readline() == "holding\n"
    err = gave_up_waiting(directory, gate, "0.5")
    assert "Traceback" in err
    assert f"{directory}: still locked after 0.5 s (held by pid {holder.pid}" in err
    assert "CLIPZSL_LOCK_TIMEOUT" in err
    assert holder.wait(timeout=60) == 0


def test_long_label_job_does_not_block_a_writer_of_two_labels(tmp_path):
    """While one process computes 20,000 labels, another that needs two (one of them also in the long
    job) stores them at once; then the long job stores the rest, and no label is on disk twice."""
    directory, gate = tmp_path / "s", tmp_path / "gate"
    long_job = run(LABELLER, directory, 20_000, gate, 8192)
    assert long_job.stdout.readline().startswith("computing")
    started = time.monotonic()
    short = run(LABELLER, directory, "k5,new", "", 8192)
    try:
        out, err = short.communicate(timeout=30)
    finally:
        gate.touch()
    waited = time.monotonic() - started
    assert short.returncode == 0, err
    assert long_job.poll() is None  # the short one finished while the long one was still computing
    assert long_job.wait(timeout=120) == 0
    store = EmbeddingStore(directory, "model-a", 8)
    assert len(store) == 20_001 and rows_on_disk(directory) == 20_001, waited


def test_killed_long_label_job_keeps_the_chunks_it_stored(tmp_path):
    directory = tmp_path / "s"
    job = run(LABELLER, directory, 1000, "", 100)
    for _ in range(3):
        assert job.stdout.readline() == "computing 100\n"
    os.kill(job.pid, signal.SIGKILL)
    job.wait()
    kept = len(EmbeddingStore(directory, "model-a", 8))  # it loads
    assert kept >= 200 and kept % 100 == 0  # whole chunks, each stored once it was computed
    rerun = run(LABELLER, directory, 1000, "", 100)
    out, err = rerun.communicate(timeout=120)
    assert rerun.returncode == 0, err
    assert sum(int(line.split()[1]) for line in out.splitlines() if line.startswith("computing")) == 1000 - kept
    assert len(EmbeddingStore(directory, "model-a", 8)) == 1000 and rows_on_disk(directory) == 1000


# a long-lived reader (a service, say), driven line by line: "KEY ..." prints "ok N", or the error
READER = textwrap.dedent(
    """
    import sys
    from clipzsl.store import EmbeddingStore
    store = EmbeddingStore(sys.argv[1], "model-a", 8)
    for line in sys.stdin:
        try:
            print("ok", len(store.get(line.split())), flush=True)
        except Exception as err:
            print("error", type(err).__name__, err, flush=True)
    """
)


def test_reader_never_sees_another_process_merging_segments(tmp_path):
    """A reader lists segments it has not opened yet; another process concatenates them (deleting
    their files): the reader's next read finds the rows in the merged file, with no error."""
    directory = tmp_path / "s"
    writer = EmbeddingStore(directory, "model-a", 8)
    vectors = np.random.default_rng(0).normal(size=(MAX_SEGMENTS + 1, DIM)).astype(np.float32)
    writer.add(["k0"], vectors[:1])
    reader = subprocess.Popen([sys.executable, "-c", READER, str(directory)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def ask(*keys: str) -> str:
        reader.stdin.write(" ".join(keys) + "\n")
        reader.stdin.flush()
        return reader.stdout.readline().strip()

    try:
        assert ask("k0") == "ok 1"
        for i in range(1, 8):
            writer.add([f"k{i}"], vectors[i : i + 1])
        assert ask("k7") == "ok 1"  # the reader now lists k1..k6's segments without having opened them
        for i in range(8, MAX_SEGMENTS + 1):
            writer.add([f"k{i}"], vectors[i : i + 1])
        assert len(writer.segments) == 1 and not (directory / "seg-000005.npy").exists()  # all merged
        assert ask("k5") == "ok 1"
        assert ask(*(f"k{i}" for i in range(MAX_SEGMENTS + 1))) == f"ok {MAX_SEGMENTS + 1}"
    finally:
        reader.stdin.close()
        reader.wait(timeout=60)
    np.testing.assert_array_equal(EmbeddingStore(directory, "model-a", 8).get(["k5"]), vectors[5:6])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(st.lists(st.sampled_from([f"k{i}" for i in range(40)]), max_size=30), min_size=1, max_size=4),
       chunk=st.integers(1, 12))
def test_chunked_get_or_compute_stores_each_key_once_and_returns_its_vector(tmp_path_factory, batches, chunk,
                                                                              monkeypatch):
    monkeypatch.setattr("clipzsl.store.WRITE_CHUNK", chunk)
    directory = tmp_path_factory.mktemp("s")
    store = EmbeddingStore(directory, "model-a", DIM)
    computed: list[str] = []

    def compute(keys):
        assert len(keys) <= chunk and not set(keys) & set(computed)  # bounded chunks, nothing computed twice
        computed.extend(keys)
        return np.stack([np.full(DIM, int(k[1:]), np.float32) for k in keys])

    for keys in batches:
        vectors = store.get_or_compute(keys, compute)
        assert vectors.shape == (len(keys), DIM)
        np.testing.assert_array_equal(vectors[:, 0], [int(k[1:]) for k in keys])
    assert sorted(computed) == sorted({k for keys in batches for k in keys})
    assert rows_on_disk(directory) == len(store) == len(computed)


def test_damaged_segment_found_by_a_writers_upkeep_is_set_aside_not_raised(tmp_path):
    """Another writer's segments, unread by this one, are concatenated by this one's next write; one
    of them is damaged: it is set aside with a warning (its keys are recomputed later), and both
    this write and the next compaction go through."""
    directory = tmp_path / "s"
    writer = EmbeddingStore(directory, "model-a", DIM)
    writer.add(["first"], np.ones((1, DIM)))
    other = EmbeddingStore(directory, "model-a", DIM)
    for i in range(MAX_SEGMENTS - 1):
        other.add([f"k{i}"], np.full((1, DIM), i))
    damaged = directory / other.segments[5].name
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.warns(UserWarning, match=f"ignoring corrupt store segment {damaged}"):
        writer.add(["last"], np.zeros((1, DIM)))  # its upkeep concatenates every small segment
    assert "k4" not in writer and {"first", "last", "k3", "k5"} <= set(writer.keys())
    np.testing.assert_array_equal(writer.get(["k3", "k5"]), np.stack([np.full(DIM, 3.0), np.full(DIM, 5.0)]))
    for i in range(20, 23):
        other.add([f"k{i}"], np.full((1, DIM), i))
    damaged = directory / other.segments[-2].name  # k21's, unread by `writer`
    damaged.write_bytes(damaged.read_bytes()[:-8])
    with pytest.warns(UserWarning, match="ignoring corrupt store segment"):
        writer.compact()
    assert "k21" not in writer and writer.dead_rows() == 0
    np.testing.assert_array_equal(writer.get(["k20", "k22"]), np.stack([np.full(DIM, 20.0), np.full(DIM, 22.0)]))


REWRITER = textwrap.dedent(
    """
    import sys, numpy as np
    from clipzsl.store import EmbeddingStore
    store = EmbeddingStore(sys.argv[1], "model-a", 8)
    keys = store.keys()
    store.add(keys, np.random.default_rng(1).normal(size=(len(keys), 8)))  # every entry replaced
    if sys.argv[2] == "compact":
        store.compact()  # every row renumbered, the old segments deleted
    """
)


@pytest.mark.parametrize("rewrite", ["replace", "compact"])
def test_search_is_whole_when_another_process_rewrites_the_store_midway(tmp_path, monkeypatch, rewrite):
    """Another process replaces every entry (and compacts) between a search's index scan and its
    lookup of the keys found: the search starts again on the new rows, never returns fewer hits."""
    directory = tmp_path / "s"
    keys = [f"k{i}" for i in range(200)]
    EmbeddingStore(directory, "model-a", DIM).add(keys, np.random.default_rng(0).normal(size=(200, DIM)))
    reader = EmbeddingStore(directory, "model-a", DIM)
    queries = reader.get(keys[:3])
    row_keys, rewritten = reader.row_keys, []

    def row_keys_after_a_rewrite(rows):
        if not rewritten:
            rewritten.append(subprocess.run([sys.executable, "-c", REWRITER, str(directory), rewrite], check=True))
        return row_keys(rows)

    monkeypatch.setattr(reader, "row_keys", row_keys_after_a_rewrite)
    hits = SavedIndex(reader).search(queries, 5)
    assert rewritten and [len(h) for h in hits] == [5, 5, 5]
    again = SavedIndex(EmbeddingStore(directory, "model-a", DIM))
    assert [h[0][0] for h in hits] == [h[0][0] for h in again.search(queries, 5)]


RAW_HOLDER = textwrap.dedent(
    """
    import fcntl, os, sys, time
    from pathlib import Path
    fd = os.open(Path(sys.argv[1]) / ".lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)
    print("holding", flush=True)
    while not Path(sys.argv[2]).exists():
        time.sleep(0.02)
    """
)


def test_a_finished_holder_is_never_named_as_the_one_holding_the_lock(tmp_path):
    """Today the holder's note outlives its lock: a run blocked by anything else (an older clipzsl, a
    backup tool's flock) was told it waits for a process that has long exited."""
    directory, gate = tmp_path / "s", tmp_path / "gate"
    gate.touch()
    first = run(HOLDER, directory, gate)
    assert first.wait(timeout=60) == 0
    gate.unlink()
    holder = run(RAW_HOLDER, directory, gate)
    assert holder.stdout.readline() == "holding\n"
    err = gave_up_waiting(directory, gate, "0.3")
    assert "still locked after 0.3 s (held by another process)" in err and f"pid {first.pid}" not in err
    assert holder.wait(timeout=60) == 0
