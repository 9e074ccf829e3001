"""The cache folder: what it holds, and how it is emptied.

Under the cache root (`store.cache_root`: the folder given, else $CLIPZSL_CACHE_DIR, else
~/.cache/clipzsl) clipzsl keeps

- `labels/<fingerprint digest>/`: one label-embedding store per model (`EmbeddingStore.for_labels`);
- `conse-imagenet-minilm-*.npy` (and its checksum): the packaged model's concept embeddings;
- `image-features/*.safetensors`: image embeddings of fixed image sets (`images.embed_images_cached`).

`cache_info` lists them (a label store whose metadata is damaged is listed as damaged, with why);
`clear_cache` deletes them, only from a root clipzsl made and only label folders clipzsl made,
checked before anything is deleted (`store.own_cache_root`, `store.check_owned`). `cache_dir=None`
is the default cache folder in both.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from .backends.base import CONCEPTS_PREFIX
from .images import FEATURES_DIR
from .store import STORE_KINDS, EmbeddingStore, StoreError, cache_root, check_owned, is_store_folder, own_cache_root

__all__ = ["CacheInfo", "ClearedCache", "LabelCache", "cache_info", "clear_cache"]

#: the label-embedding stores' folder under the cache root
LABELS_DIR = "labels"


@dataclass(frozen=True)
class LabelCache:
    """One model's label-embedding store; `damage` says why it cannot be read (None: it can)."""

    folder: Path
    spec: str | None = None  # the model spec it was written for
    labels: int = 0
    size_bytes: int = 0
    fingerprint: str = ""
    damage: str | None = None

    def describe(self) -> str:
        if self.damage is not None:
            return f"{self.folder.name}  damaged, unusable ({self.damage}); `clipzsl cache clear` removes it"
        return f"{self.spec or '?'}  {self.labels} labels  {self.size_bytes / 1e6:.1f} MB  {self.fingerprint}"


@dataclass(frozen=True)
class CacheInfo:
    """What the cache root holds (`cache_info`)."""

    root: Path
    label_caches: list[LabelCache]
    concept_files: list[Path]  # the packaged model's concept embeddings and their checksums
    feature_files: list[Path]

    def describe(self) -> str:
        """The report of `clipzsl cache info`."""
        lines = [f"label cache: {self.root / LABELS_DIR}"]
        lines += [f"  {store.describe()}" for store in self.label_caches]
        lines.append(f"packaged concept embeddings: {len(self.concept_files)} file(s), "
                     f"{_megabytes(self.concept_files):.1f} MB")
        lines.append(f"image features ({self.root / FEATURES_DIR}): {len(self.feature_files)} file(s), "
                     f"{_megabytes(self.feature_files):.1f} MB")
        return "".join(line + "\n" for line in lines)


@dataclass(frozen=True)
class ClearedCache:
    """How many of each kind `clear_cache` deleted."""

    root: Path
    label_caches: int
    concept_files: int
    feature_files: int

    def describe(self) -> str:
        return (f"cleared {self.label_caches} label cache(s), {self.concept_files} packaged concept file(s) and "
                f"{self.feature_files} image-feature file(s) under {self.root}")


def _megabytes(paths: list[Path]) -> float:
    return sum(p.stat().st_size for p in paths) / 1e6


def _layout(root: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """(label store folders, concept files, image-feature files) under a cache root, sorted."""
    stores = sorted(p for p in (root / LABELS_DIR).glob("*") if p.is_dir())
    concepts = sorted(root.glob(f"{CONCEPTS_PREFIX}*")) if root.is_dir() else []  # .npy and its checksum
    features = sorted((root / FEATURES_DIR).glob("*.safetensors"))
    return stores, concepts, features


def _label_cache(directory: Path) -> LabelCache:
    """A label store's size and model, or why it cannot be read."""
    try:
        meta = EmbeddingStore.read_meta(directory)
        with contextlib.closing(EmbeddingStore(directory, meta["fingerprint"], meta["embed_dim"])) as store:
            return LabelCache(directory, meta.get("spec"), len(store), store.size_bytes(), meta["fingerprint"])
    except (StoreError, KeyError, TypeError) as err:
        return LabelCache(directory, damage=str(err))


def cache_info(cache_dir: str | os.PathLike | None = None) -> CacheInfo:
    """Every cache under the cache root (None: the default folder); nothing is written."""
    root = cache_root(cache_dir)
    stores, concepts, features = _layout(root)
    return CacheInfo(root, [_label_cache(directory) for directory in stores], concepts, features)


def clear_cache(cache_dir: str | os.PathLike | None = None) -> ClearedCache:
    """Delete every cache under the cache root (None: the default folder), a damaged label store
    included. A root that was never a cache, or a label folder clipzsl did not make, is refused
    (`store.ForeignFolderError`) before anything is deleted."""
    root = cache_root(cache_dir)
    stores, concepts, features = _layout(root)
    if root.exists():
        own_cache_root(root)
        for directory in stores:
            check_owned(directory, STORE_KINDS, is_store_folder)
    for directory in stores:  # whatever state it is in: an unreadable meta.json must not block this
        EmbeddingStore.destroy(directory)
    for path in concepts + features:
        path.unlink(missing_ok=True)
    return ClearedCache(root, len(stores), len(concepts), len(features))
