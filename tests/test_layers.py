"""The layering of pyproject.toml's import-linter contracts holds, and a cycle breaks it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")


def lint(cwd: Path) -> subprocess.CompletedProcess:
    """lint-imports with pyproject.toml's contracts over the clipzsl package found in `cwd`."""
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run([LINT, "--config", str(cwd / "pyproject.toml"), "--no-cache"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def package_copy(tmp_path_factory) -> Path:
    if not Path(LINT).exists():
        pytest.fail("lint-imports not found: pip install -e '.[test]' installs import-linter")
    copy = tmp_path_factory.mktemp("layers")
    shutil.copytree(ROOT / "clipzsl", copy / "clipzsl", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", copy / "pyproject.toml")
    return copy


def test_the_package_keeps_its_layers():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_an_added_cycle_breaks_the_contract(package_copy):
    assert lint(package_copy).returncode == 0  # the copy as it is passes
    store = package_copy / "clipzsl" / "store.py"
    text = store.read_text()
    store.write_text(text.replace("from __future__ import annotations\n",
                                  "from __future__ import annotations\n\nimport clipzsl.classifier  # a cycle\n", 1))
    result = lint(package_copy)
    assert result.returncode != 0
    assert "clipzsl.store -> clipzsl.classifier" in result.stdout
