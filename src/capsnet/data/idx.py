"""The IDX format of MNIST-style data sets: four files of unsigned bytes (raw or gzipped),
read with every corruption case reported in one line, and written atomically."""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import CapsNetError
from ..utils.files import atomic_write_bytes
from ..utils.memory import check_memory

ROLES = ("train_images", "train_labels", "test_images", "test_labels")
FILE_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
IDX_UBYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"
TRAILING_READ = 2**20  # bytes read past the declared data, to report trailing data
MAX_FILE_BYTES = 2**30  # twice the largest file of a named data set (smallNORB's images, 448 MB)


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
    shape, header = parse_header(data, name)
    check_length(len(data) - header, shape, name)
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape)


def parse_header(data: bytes, name: str) -> tuple[tuple[int, ...], int]:
    """The shape the IDX header at the start of ``data`` declares, and the header's length."""
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
    return shape, header


def check_length(actual: int, shape: tuple[int, ...], name: str) -> None:
    """Refuse ``actual`` data bytes for an IDX header declaring ``shape``."""
    expected = math.prod(shape)  # exact: numpy's product overflows for huge headers
    if actual < expected:
        raise CapsNetError(f"{name}: truncated: {actual} data bytes, header {shape} needs {expected}")
    if actual > expected:
        raise CapsNetError(f"{name}: {actual - expected} bytes of trailing data after {shape}")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (raw or gzipped) from ``path``; see :func:`parse_idx`. The size its
    header declares is checked against the memory available, and a raw file's size against
    it, before the data is read; no more than that (plus 1 MiB, to report trailing data) is
    read, whatever the file's size."""
    name = str(path)
    try:
        with open(path, "rb") as raw:
            gzipped = raw.read(2) == GZIP_MAGIC
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        with (gzip.open if gzipped else open)(path, "rb") as f:
            head = f.read(4)
            head += f.read(4 * head[3]) if len(head) == 4 and 1 <= head[3] <= 3 else b""
            shape, header = parse_header(head, name)
            declared = math.prod(shape)
            check_memory(declared, f"{path}: the data its header declares",
                         "a damaged header, or a data set too large for this machine")
            if not gzipped:
                check_length(os.fstat(f.fileno()).st_size - header, shape, name)
            data = f.read(declared + TRAILING_READ)
    except (OSError, EOFError, zlib.error) as exc:
        what = "corrupt gzip stream" if gzipped else "cannot read"
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CapsNetError(f"{path}: {what} ({reason})") from None
    check_length(len(data), shape, name)
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def read_limited(path: str | os.PathLike, limit: int = MAX_FILE_BYTES,
                 decompress: bool = False) -> bytes:
    """The bytes of the file at ``path`` (decompressed with ``decompress`` when it is
    gzipped), refused in one line when they are more than ``limit``: a raw file by its size
    before anything is read, a gzipped one after ``limit`` bytes."""
    try:
        with open(path, "rb") as raw:
            size = os.fstat(raw.fileno()).st_size
            gzipped = decompress and raw.read(2) == GZIP_MAGIC
            if not gzipped and size > limit:
                raise CapsNetError(f"{path}: {size:,} bytes, more than the {limit:,} a data "
                                   f"set file may have")
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if gzipped else raw
            data = f.read(limit + 1)
    except (OSError, EOFError, zlib.error) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise CapsNetError(f"{path}: cannot read ({reason})") from None
    if len(data) > limit:
        raise CapsNetError(f"{path}: decompresses to more than the {limit:,} bytes a data set "
                           f"file may have")
    return data


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
    """Raise unless ``images`` (N, H, W) or (N, C, H, W) and ``labels`` (N,) belong together."""
    if images.ndim not in (3, 4):
        raise CapsNetError(f"{name}: images must have 3 dimensions (N, H, W) or 4 (N, C, H, W), "
                           f"got {images.shape}")
    if labels.ndim != 1:
        raise CapsNetError(f"{name}: labels must have 1 dimension, got {labels.shape}")
    if len(images) != len(labels):
        raise CapsNetError(f"{name}: {len(images)} images but {len(labels)} labels")
    if labels.size and labels.max() >= num_classes:
        raise CapsNetError(f"{name}: label {int(labels.max())} out of range 0..{num_classes - 1}")
