"""Tests never write into the user's cache: conftest points every cache at a session temp directory."""
import os
from pathlib import Path

from clipzsl import ZeroShotClassifier
from clipzsl.store import cache_root


def test_default_caches_are_under_the_pytest_temp_dir(tmp_path_factory):
    base = tmp_path_factory.getbasetemp()
    assert cache_root().is_relative_to(base)
    assert Path(os.environ["XDG_CACHE_HOME"]).is_relative_to(base)
    assert not cache_root().is_relative_to(Path.home())


def test_a_classifier_with_the_default_cache_writes_there(openclip_backend, tmp_path_factory):
    assert cache_root().is_relative_to(tmp_path_factory.getbasetemp())  # else this test would write into ~/.cache
    before = set(cache_root().rglob("seg-*.npy"))
    clf = ZeroShotClassifier(openclip_backend, labels=["session cache check", "another unseen label"],
                             templates=["a photo of a {}."])
    written = set(cache_root().rglob("seg-*.npy")) - before
    assert written and len(clf.labels) == 2
