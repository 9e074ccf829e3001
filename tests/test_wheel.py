"""The built wheel works on its own: the top-level prompts/ ships inside it, and the installed package (not
this checkout) loads the shipped template and label sets by name and classifies, from any directory."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipzsl import ZeroShotClassifier, load_model
from clipzsl.prompts import load_labels, load_templates

REPO = Path(__file__).resolve().parents[1]
SPEC = "openclip:ViT-B-32/random"

# Run by the installed package: where it was imported from, what it loads by name, one classification.
PROBE = """
import json, sys
import torch
import clipzsl
from clipzsl.prompts import PROMPTS_DIR, load_labels, load_templates

torch.manual_seed(0)
clf = clipzsl.ZeroShotClassifier(clipzsl.load_model(sys.argv[1]), labels="cifar10")
print(json.dumps({
    "module": clipzsl.__file__,
    "prompts": str(PROMPTS_DIR),
    "templates": {name: load_templates(name) for name in ("simple_7", "openai_imagenet_80")},
    "labels": [[e.name, *e.synonyms] for e in load_labels("cifar10")],
    "scores": clf.predict_proba(sys.argv[2]).tolist(),
}))
"""


def pip(*args: str | Path) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-cache-dir", *map(str, args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built from a copy of the sources: a build writes build/ and *.egg-info beside them."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    for name in ("clipzsl", "prompts"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    dist = tmp_path_factory.mktemp("dist")
    pip("wheel", "--no-deps", "--no-build-isolation", "-w", dist, src)
    (built,) = dist.glob("clipzsl-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh directory holding only the installed wheel (its dependencies stay in site-packages)."""
    target = tmp_path_factory.mktemp("site")
    pip("install", "--no-deps", "--target", target, wheel)
    return target


@pytest.fixture
def elsewhere(tmp_path) -> Path:
    """A working directory with no prompts/ in reach, holding one image."""
    Image.fromarray(np.linspace(0, 255, 64 * 64 * 3).reshape(64, 64, 3).astype(np.uint8)).save(tmp_path / "img.png")
    return tmp_path


def run_installed(installed: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    """`python *args` with only the installed wheel on PYTHONPATH (an editable install's finder comes after it)."""
    env = {**os.environ, "PYTHONPATH": str(installed), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_wheel_ships_every_module_and_prompt_file(wheel):
    """pyproject.toml lists the packages by hand (prompts/ is mapped in): a new subpackage must be added there,
    and package data (the page of `clipzsl serve`) to its package-data."""
    modules = {f"clipzsl/{p.relative_to(REPO / 'clipzsl').as_posix()}": p for p in (REPO / "clipzsl").rglob("*.py")}
    prompts = {f"clipzsl/_prompts/{p.relative_to(REPO / 'prompts').as_posix()}": p
               for p in (REPO / "prompts").rglob("*") if p.is_file()}
    static = {f"clipzsl/static/{p.name}": p for p in (REPO / "clipzsl" / "static").iterdir()}  # the serve page
    assert modules and prompts and static
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        for member, path in {**modules, **prompts, **static}.items():
            assert member in names, f"{member} missing from {wheel.name}"
            assert archive.read(member) == path.read_bytes()


def test_installed_package_loads_shipped_sets_by_name_and_classifies(installed, elsewhere):
    done = run_installed(installed, elsewhere, "-c", PROBE, SPEC, "img.png")
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    assert Path(probe["module"]).resolve().is_relative_to(installed.resolve())
    assert Path(probe["prompts"]).resolve().is_relative_to(installed.resolve())
    assert probe["templates"] == {name: load_templates(name) for name in ("simple_7", "openai_imagenet_80")}
    assert probe["labels"] == [[e.name, *e.synonyms] for e in load_labels("cifar10")]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        checkout = ZeroShotClassifier(load_model(SPEC), labels="cifar10", cache=False)
    np.testing.assert_allclose(probe["scores"], checkout.predict_proba(elsewhere / "img.png"), atol=1e-5)


def test_installed_cli_classifies_with_a_shipped_label_set(installed, elsewhere):
    done = run_installed(installed, elsewhere, "-m", "clipzsl.cli", "classify", "img.png", "--labels", "cifar10",
                         "--model", SPEC, "--top-k", "3", "--format", "json")
    assert done.returncode == 0, done.stderr
    (row,) = json.loads(done.stdout)
    assert row["image"] == "img.png"
    names = {e.name for e in load_labels("cifar10")}
    probabilities = [p["probability"] for p in row["predictions"]]
    assert len(probabilities) == 3 and {p["label"] for p in row["predictions"]} <= names
    assert probabilities == sorted(probabilities, reverse=True)
