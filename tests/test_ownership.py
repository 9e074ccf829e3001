"""clipzsl never touches what it did not create (issue 19, section 2): outputs never replace inputs,
only folders carrying its marker are written into or emptied, a re-index never empties a collection
silently, written files honour the umask, shard paths work from any directory, and a refused FAISS
factory leaves the previous index as it was."""
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import clipzsl
from clipzsl.cli import main
from clipzsl.image_index import ImageIndex
from clipzsl.images import check_output
from clipzsl.pipeline import embed_to_shards
from clipzsl.store import MARKER, EmbeddingStore, ForeignFolderError, StoreError, claim, is_store_folder

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tiny(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def make_images(folder: Path, colors=("red", "green")) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    for color in colors:
        Image.new("RGB", (40, 40), color).save(folder / f"{color}.png")
    return [folder / f"{color}.png" for color in colors]


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under a folder with a digest of its bytes: what "untouched" means (SQLite's -wal and
    -shm files, which a reader may create or touch, left out)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.endswith(("-wal", "-shm"))}


# -- outputs never replace inputs -------------------------------------------------------------

SPELLINGS = ("absolute", "relative", "dot", "dotdot", "symlink", "hardlink")


def spelled(path: Path, how: str, scratch: Path) -> str:
    """`path` written another way (the working directory is `path.parent`)."""
    if how == "absolute":
        return str(path)
    if how == "relative":
        return path.name
    if how == "dot":
        return f"./{path.name}"
    if how == "dotdot":
        return f"../{path.parent.name}/{path.name}"
    link = scratch / f"{how}-{path.name}"
    if not link.exists():
        (os.symlink if how == "symlink" else os.link)(path, link)
    return str(link)


@FAST
@given(how=st.sampled_from(SPELLINGS), second=st.booleans())
def test_classify_output_that_is_an_input_is_refused_and_the_photo_kept(tiny_clip, tmp_path, monkeypatch, capsys,
                                                                       how, second):
    photos = tmp_path / "photos"
    if not photos.exists():
        make_images(photos)
        (tmp_path / "links").mkdir()
    before = snapshot(photos)
    monkeypatch.chdir(photos)
    a, b = photos / "red.png", photos / "green.png"
    target = spelled(b if second else a, how, tmp_path / "links")
    code = main(["classify", str(a), str(b), "--labels", "cat,dog", "--model", f"hf:{tiny_clip}", "--output", target])
    assert code == 2
    assert "is the input" in capsys.readouterr().err
    assert snapshot(photos) == before


FOLDER_SPELLINGS = {"absolute": lambda photos: str(photos), "relative": lambda photos: ".",
                    "dot": lambda photos: "./", "dotdot": lambda photos: "../photos",
                    "symlink": lambda photos: str(photos.parent / "photos-link")}


@FAST
@given(how=st.sampled_from(sorted(FOLDER_SPELLINGS)), name=st.sampled_from(["new.png", "a.JPG", "sub/x.webp"]))
def test_an_image_written_into_an_input_folder_is_refused_other_files_are_not(tmp_path, monkeypatch, how, name):
    photos = tmp_path / "photos"
    if not photos.exists():
        make_images(photos)
        (photos / "sub").mkdir()
        os.symlink(photos, tmp_path / "photos-link")
    monkeypatch.chdir(photos)
    folder = FOLDER_SPELLINGS[how](photos)
    with pytest.raises(ValueError, match="would put images into the input folder"):
        check_output(os.path.join(folder, name), [str(photos)])
    check_output(os.path.join(folder, "results.csv"), [str(photos)])  # a table beside the photos is fine
    with pytest.raises(ValueError, match="is the input"):
        check_output(folder, [str(photos)], writes_images=True)
    with pytest.raises(ValueError, match="holds the input"):
        check_output(folder, [str(photos / "red.png")], writes_images=True)
    with pytest.raises(ValueError, match="would put images into the input folder"):
        check_output(os.path.join(folder, "sub"), [str(photos)], writes_images=True)


def test_every_command_refuses_an_output_over_its_inputs(tiny_clip, tmp_path, capsys):
    photos = tmp_path / "photos"
    make_images(photos)
    before = snapshot(photos)
    model = ["--model", f"hf:{tiny_clip}"]
    commands = [
        ["explain", str(photos / "red.png"), "--labels", "cat,dog", "--out", str(photos)],
        ["embed", str(photos), "--out", str(photos)],
        ["index", "images", str(photos), "--out", str(photos)],
        ["eval", str(photos), "--protocol", "zeroshot", "--output", str(photos / "r.png")],
    ]
    for command in commands:
        assert main(command + model) == 2, command
        assert str(photos) in capsys.readouterr().err
    assert snapshot(photos) == before


# -- only clipzsl's own folders are written or emptied ------------------------------------------

def user_folder(path: Path) -> Path:
    """A folder of someone's own files, named like a store's."""
    path.mkdir(parents=True)
    np.save(path / "seg-000001.npy", np.arange(4))
    (path / ".x.tmp").write_text("mine")
    (path / "notes.txt").write_text("mine")
    return path


def test_index_into_a_user_folder_is_refused_and_nothing_is_deleted(tiny, tiny_clip, tmp_path, capsys):
    photos = tmp_path / "photos"
    make_images(photos)
    mine = user_folder(tmp_path / "mine")
    before = snapshot(mine)
    assert main(["index", "images", str(photos), "--out", str(mine), "--model", f"hf:{tiny_clip}"]) == 2
    assert f"{mine}: not empty, and not a folder clipzsl made" in capsys.readouterr().err
    with pytest.raises(ForeignFolderError, match=str(mine)):
        ImageIndex(mine, tiny).update(photos)
    with pytest.raises(ForeignFolderError, match=str(mine)):
        EmbeddingStore.destroy(mine)
    assert snapshot(mine) == before and sorted(p.name for p in mine.iterdir()) == [".x.tmp", "notes.txt",
                                                                                    "seg-000001.npy"]


OTHER_FILES = {"seg-000001.npy": b"\x93NUMPY", ".x.tmp": b"mine", "table.sqlite": b"not a database",
               "notes.txt": b"mine", "photo.jpg": b"mine"}
METAS = {None: None, "user": '{"mine": true}', "damaged": '{"fingerp',
         "clipzsl": '{"format": 2, "fingerprint": "fp", "embed_dim": 8, "spec": "", "dtype": "float32"}'}


@FAST
@given(names=st.sets(st.sampled_from(sorted(OTHER_FILES))), meta=st.sampled_from(sorted(METAS, key=str)))
def test_a_store_folder_is_claimed_only_when_empty_or_recognisably_clipzsls(tmp_path_factory, names, meta):
    folder = tmp_path_factory.mktemp("claim")
    for name in names:
        (folder / name).write_bytes(OTHER_FILES[name])
    if meta is not None:
        (folder / "meta.json").write_text(METAS[meta])
    before = snapshot(folder)
    # a clipzsl store's meta.json (or a damaged one) beside nothing but store files; else nothing at all
    ours = not (names & {"notes.txt", "photo.jpg"}) and meta in ("clipzsl", "damaged") or (not names and meta is None)
    if ours:
        assert claim(folder, "label-cache", is_store_folder) == folder
        assert json.loads((folder / MARKER).read_text())["kind"] == "label-cache"
        return
    with pytest.raises(ForeignFolderError, match=f"{folder}: not empty, and not a folder clipzsl made"):
        claim(folder, "label-cache", is_store_folder)
    with pytest.raises(ForeignFolderError):
        EmbeddingStore.destroy(folder)
    assert snapshot(folder) == before


def test_a_folder_of_another_kind_is_refused(tiny, tmp_path):
    EmbeddingStore(tmp_path / "cache", "fp", 8).add(["a"], np.eye(8, dtype=np.float32)[:1])
    assert json.loads((tmp_path / "cache" / MARKER).read_text())["kind"] == "label-cache"
    with pytest.raises(ForeignFolderError, match="clipzsl made it as a folder of kind label-cache, not shards"):
        embed_to_shards([], tmp_path / "cache", tiny)


def test_an_index_made_before_markers_is_adopted(tiny, tmp_path):
    photos = tmp_path / "photos"
    make_images(photos)
    ImageIndex(tmp_path / "idx", tiny).update(photos)
    (tmp_path / "idx" / MARKER).unlink()  # as an older clipzsl left it
    make_images(photos, ["blue"])
    assert ImageIndex(tmp_path / "idx", tiny).update(photos).added == 1
    assert json.loads((tmp_path / "idx" / MARKER).read_text()) == {"kind": "image-index", "format": 1}


def test_cache_clear_on_a_folder_that_was_never_a_cache_deletes_nothing(tmp_path, capsys):
    folder = tmp_path / "documents"
    (folder / "labels" / "mine").mkdir(parents=True)
    (folder / "labels" / "mine" / "meta.json").write_text('{"mine": true}')
    (folder / "image-features").mkdir()
    (folder / "image-features" / "weights.safetensors").write_bytes(b"mine")
    (folder / "conse-imagenet-minilm-0123456789abcdef.npy").write_bytes(b"mine")
    (folder / "thesis.tex").write_text("mine")
    before = snapshot(folder)
    assert main(["cache", "clear", "--cache-dir", str(folder)]) == 2
    assert f"{folder}: not empty, and not a folder clipzsl made" in capsys.readouterr().err
    assert snapshot(folder) == before


def test_cache_clear_refuses_a_foreign_folder_inside_a_cache_before_deleting_anything(tiny, tmp_path, capsys):
    cache = tmp_path / "c"
    clipzsl.ZeroShotClassifier(tiny, labels=["cat", "dog"], templates=["a {}."], cache=cache)
    gc.collect()  # its store's SQLite connection closes (and checkpoints) now, not during the clear
    user_folder(cache / "labels" / "zz-mine")
    before = snapshot(cache)
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 2
    assert "zz-mine: not a folder clipzsl made of kind image-index or label-cache" in capsys.readouterr().err
    assert snapshot(cache) == before
    shutil.rmtree(cache / "labels" / "zz-mine")
    assert main(["cache", "clear", "--cache-dir", str(cache)]) == 0
    assert not list((cache / "labels").iterdir()) and (cache / MARKER).exists()


def test_embed_into_another_runs_folder_is_refused_and_its_shards_kept(tiny_clip, tmp_path, capsys):
    make_images(tmp_path / "a", ["red"])
    make_images(tmp_path / "b", ["blue", "green"])
    out = tmp_path / "shards"
    model = ["--model", f"hf:{tiny_clip}"]
    assert main(["embed", str(tmp_path / "a"), "--out", str(out)] + model) == 0
    assert json.loads((out / MARKER).read_text())["kind"] == "shards"
    before = snapshot(out)
    assert main(["embed", str(tmp_path / "b"), "--out", str(out)] + model) == 2
    assert "holds the shards of an earlier run" in capsys.readouterr().err
    assert snapshot(out) == before
    mine = user_folder(tmp_path / "mine")
    assert main(["embed", str(tmp_path / "b"), "--out", str(mine)] + model) == 2
    assert "not a folder clipzsl made" in capsys.readouterr().err
    assert sorted(p.name for p in mine.iterdir()) == [".x.tmp", "notes.txt", "seg-000001.npy"]


def test_the_shard_writer_refuses_a_folder_clipzsl_did_not_make(tmp_path):
    from clipzsl.shards import RunState, ShardWriter, resume_state

    mine = user_folder(tmp_path / "mine")
    with pytest.raises(ForeignFolderError, match="not a folder clipzsl made"):
        resume_state(mine, {"model": "m"})
    with pytest.raises(ForeignFolderError, match="not a folder clipzsl made"):
        ShardWriter(mine, RunState({"model": "m"}))
    assert sorted(p.name for p in mine.iterdir()) == [".x.tmp", "notes.txt", "seg-000001.npy"]


# -- a re-index never empties a collection silently --------------------------------------------

def vanish(folder: Path, how: str) -> None:
    """The folder as an unmounted drive leaves it (missing, or an empty mount point), or unreadable."""
    if how == "unreadable":
        folder.chmod(0)
    else:
        shutil.rmtree(folder)
        if how == "empty":
            folder.mkdir()


VANISHINGS = ["missing", "empty", pytest.param("unreadable", marks=pytest.mark.skipif(
    os.geteuid() == 0, reason="root reads a chmod 000 folder; the missing and empty cases stand in for it"))]


@pytest.mark.parametrize("how", VANISHINGS)
def test_reindex_of_a_vanished_folder_refuses_unless_pruned(tiny, tiny_clip, tmp_path, capsys, how):
    photos = tmp_path / "photos"
    make_images(photos)
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(photos)
    vanish(photos, how)
    try:
        with pytest.raises(StoreError, match=rf"{photos}: now missing, unreadable or without images.*--prune"):
            index.update(photos)
        args = ["index", "images", str(photos), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}"]
        assert main(args) == 2 and "nothing was changed" in capsys.readouterr().err
        assert len(ImageIndex(tmp_path / "idx", tiny)) == 2
        assert main(args + ["--prune"]) in (0, 1)
        assert "0 images (0 added, 0 updated, 2 removed" in capsys.readouterr().out
    finally:
        if photos.exists():
            photos.chmod(0o755)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a chmod 000 folder")
def test_images_in_an_unreadable_sub_folder_are_kept(tiny, tmp_path):
    photos = tmp_path / "photos"
    make_images(photos)
    make_images(photos / "locked", ["blue"])
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(photos)
    (photos / "locked").chmod(0)
    try:
        report = index.update(photos)
        assert report.removed == 0 and len(index) == 3
        (photos / "red.png").unlink()
        assert index.update(photos).removed == 1  # a file confirmed deleted is still forgotten
    finally:
        (photos / "locked").chmod(0o755)


# -- files honour the umask -----------------------------------------------------------------------

UMASK_SCRIPT = """
import os, sys
os.umask(int(sys.argv[2], 8))
import numpy as np
from clipzsl.store import EmbeddingStore
EmbeddingStore(sys.argv[1], "fp", 8).add(["a"], np.eye(8, dtype=np.float32)[:1])
"""


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_mode_the_umask_gives(tmp_path, umask, mode):
    store = tmp_path / "s"
    subprocess.run([sys.executable, "-c", UMASK_SCRIPT, str(store), f"{umask:o}"], check=True)
    written = {p.name: p.stat().st_mode & 0o777 for p in store.iterdir()}
    assert written == {name: mode for name in written}, written
    assert {"meta.json", "table.sqlite", "seg-000001.npy", MARKER} <= set(written)


# -- paths work from any directory -----------------------------------------------------------------

def test_embed_keeps_given_and_resolved_paths_and_from_shards_works_elsewhere(tiny, tiny_clip, tmp_path, monkeypatch):
    work = tmp_path / "work"
    make_images(work / "photos")
    monkeypatch.chdir(work)
    assert main(["embed", "photos", "--out", "shards", "--model", f"hf:{tiny_clip}"]) == 0
    table = pq.read_table(work / "shards" / "metadata" / "metadata_0.parquet").to_pydict()
    assert table["image_path"] == ["photos/green.png", "photos/red.png"]  # clip-retrieval's column, as given
    real = Path(os.path.realpath(work))
    assert table["resolved_path"] == [str(real / "photos" / n) for n in ("green.png", "red.png")]
    elsewhere = tmp_path / "service"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["index", "from-shards", str(work / "shards"), "--out", "idx", "--model", f"hf:{tiny_clip}"]) == 0
    hits = ImageIndex("idx", tiny).search(Path(work / "photos" / "red.png"), top_k=2)
    assert hits[0][0] == str(real / "photos" / "red.png") and all(Path(path).is_file() for path, _ in hits)


# -- a refused FAISS factory leaves the previous index as it was -------------------------------------

@pytest.mark.parametrize("factory", ["Bogus", "PQ5", "IVF64,Flat"])  # unparsable; 32 % 5 != 0; too few to train
def test_a_refused_factory_leaves_the_previous_index_loadable_and_searchable(tiny, tiny_clip, tmp_path, capsys,
                                                                             factory):
    photos = tmp_path / "photos"
    make_images(photos)
    index = ImageIndex(tmp_path / "idx", tiny)
    index.update(photos, factory="HNSW8")
    before, state = snapshot(tmp_path / "idx"), index.saved_index.state()
    make_images(photos, ["blue"])
    with pytest.raises(ValueError, match=factory):
        index.update(photos, factory=factory)
    args = ["index", "images", str(photos), "--out", str(tmp_path / "idx"), "--model", f"hf:{tiny_clip}"]
    assert main(args + ["--faiss-factory", factory]) == 2 and factory in capsys.readouterr().err
    assert snapshot(tmp_path / "idx") == before
    again = ImageIndex(tmp_path / "idx")
    assert len(again) == 2 and again.saved_index.state() == state
    assert again.search(Path(photos / "red.png"), top_k=1)[0][0] == str(photos / "red.png")


def test_from_shards_with_a_refused_factory_writes_no_index(tiny_clip, tmp_path, capsys):
    make_images(tmp_path / "photos")
    model = ["--model", f"hf:{tiny_clip}"]
    assert main(["embed", str(tmp_path / "photos"), "--out", str(tmp_path / "shards")] + model) == 0
    out = tmp_path / "idx"
    assert main(["index", "from-shards", str(tmp_path / "shards"), "--out", str(out), "--faiss-factory", "Bogus"]
                + model) == 2
    assert "Bogus" in capsys.readouterr().err
    assert not out.exists() or not list(out.iterdir())
