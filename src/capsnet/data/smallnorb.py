"""smallNORB (LeCun, Huang and Bottou, CVPR 2004): 24,300 stereo pairs of 96x96 grayscale
photographs of toys in 5 classes for training and as many for testing, in NORB's binary matrix
format, read into the four arrays of :mod:`capsnet.data.formats`.

Each example is its stereo pair as two channels, downsampled to 48x48 by averaging 2x2 blocks,
as in the smallNORB experiments of both capsule papers: the official code of Sabour et al.
(2017; tensorflow/models, research/capsules) resizes the pair, as two channels, to 48x48, and
Hinton et al. (2018) "downsample smallNORB to 48 x 48 pixels". Both train on random 32x32 crops
and test on the centre one, which is ``--crop 32``; their per-image standardisation and random
brightness and contrast are not applied here.

The binary matrix format (https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/): a little-endian
int32 magic number naming the element type, an int32 number of dimensions ``ndim``,
``max(3, ndim)`` int32 sizes (those past ``ndim`` are padding), then the elements in C order.
"""

from __future__ import annotations

import math
import struct

import numpy as np

from ..errors import CapsNetError

SMALLNORB_URL = "https://cs.nyu.edu/~ylclab/data/norb-v1.0-small/"
SMALLNORB_FILES = {  # dat: image pairs, cat: labels, info: each pair's viewpoint
    "train": {"dat": "smallnorb-5x46789x9x18x6x2x96x96-training-dat.mat",
              "cat": "smallnorb-5x46789x9x18x6x2x96x96-training-cat.mat",
              "info": "smallnorb-5x46789x9x18x6x2x96x96-training-info.mat"},
    "test": {"dat": "smallnorb-5x01235x9x18x6x2x96x96-testing-dat.mat",
             "cat": "smallnorb-5x01235x9x18x6x2x96x96-testing-cat.mat",
             "info": "smallnorb-5x01235x9x18x6x2x96x96-testing-info.mat"},
}
SMALLNORB_CLASSES = ("animal", "human", "airplane", "truck", "car")

BYTE_MATRIX = 0x1E3D4C55
INTEGER_MATRIX = 0x1E3D4C54
ELEMENT_TYPES = {BYTE_MATRIX: np.dtype("u1"), INTEGER_MATRIX: np.dtype("<i4")}
MATRIX_NAMES = {ELEMENT_TYPES[BYTE_MATRIX]: "a byte matrix",
                ELEMENT_TYPES[INTEGER_MATRIX]: "an integer matrix"}
MAX_NDIM = 8  # the smallNORB files have 1, 2 and 4
PAIR_SHAPE = (2, 96, 96)  # the two cameras' images of one example
INFO_COLUMNS = 4  # instance, elevation, azimuth, lighting
DOWNSAMPLE = 2
CHUNK = 1024  # pairs downsampled at once: bounds the temporary sums to a few MB


def parse_binary_matrix(data: bytes, where: str) -> np.ndarray:
    """The byte or integer matrix in the bytes of a binary matrix file, without a copy.

    Every header field is checked before the data is touched; the declared size must be the
    number of bytes that follow the header. Raises :class:`CapsNetError` naming ``where``.
    """
    if len(data) < 8:
        raise CapsNetError(f"{where}: too short for a binary matrix header ({len(data)} bytes)")
    magic, ndim = struct.unpack_from("<Ii", data)
    if magic not in ELEMENT_TYPES:
        raise CapsNetError(f"{where}: bad magic number 0x{magic:08X} (expected 0x{BYTE_MATRIX:08X} "
                           f"for a byte matrix or 0x{INTEGER_MATRIX:08X} for an integer matrix)")
    if not 1 <= ndim <= MAX_NDIM:
        raise CapsNetError(f"{where}: binary matrix has {ndim} dimensions, expected 1 to "
                           f"{MAX_NDIM}")
    header = 8 + 4 * max(3, ndim)
    if len(data) < header:
        raise CapsNetError(f"{where}: truncated binary matrix header ({len(data)} bytes, "
                           f"{ndim} dimensions need {header})")
    # The padding sizes (set to 1 by the format) describe nothing, so they are not read.
    shape = struct.unpack_from(f"<{ndim}i", data, 8)
    if min(shape) <= 0:
        raise CapsNetError(f"{where}: binary matrix sizes {shape} must be positive")
    dtype = ELEMENT_TYPES[magic]
    expected = math.prod(shape) * dtype.itemsize  # exact: numpy's product overflows
    actual = len(data) - header
    if actual < expected:
        raise CapsNetError(f"{where}: truncated: {actual} data bytes, {shape} needs {expected}")
    if actual > expected:
        raise CapsNetError(f"{where}: {actual - expected} bytes of trailing data after {shape}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape)


def read_smallnorb(files: dict[str, bytes], source: str) -> dict[str, np.ndarray]:
    """smallNORB from its six ``.mat`` files: images uint8 ``(N, 2, 48, 48)``, the two
    cameras' images as channels, and labels 0..4 (:data:`SMALLNORB_CLASSES`)."""
    arrays = {}
    for part, names in SMALLNORB_FILES.items():
        where = {kind: f"{source.rstrip('/')}/{name}" for kind, name in names.items()}
        data = {kind: files[name] for kind, name in names.items()}
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = _part(data, where)
    return arrays


def _part(data: dict[str, bytes], where: dict[str, str]) -> tuple[np.ndarray, np.ndarray]:
    """The downsampled images and the labels of one part, its three files checked together."""
    pairs = _matrix(data["dat"], where["dat"], BYTE_MATRIX, (None, *PAIR_SHAPE))
    n = len(pairs)
    labels = _matrix(data["cat"], where["cat"], INTEGER_MATRIX, (n,))
    _matrix(data["info"], where["info"], INTEGER_MATRIX, (n, INFO_COLUMNS))
    if labels.min() < 0 or labels.max() >= len(SMALLNORB_CLASSES):
        raise CapsNetError(f"{where['cat']}: labels outside 0..{len(SMALLNORB_CLASSES) - 1}")
    return downsample(pairs), labels.astype(np.uint8)


def _matrix(data: bytes, where: str, magic: int, shape: tuple[int | None, ...]) -> np.ndarray:
    """The matrix in ``data``, of ``magic``'s element type and of ``shape`` (None: any size)."""
    matrix = parse_binary_matrix(data, where)
    if matrix.dtype != ELEMENT_TYPES[magic]:
        raise CapsNetError(f"{where}: {MATRIX_NAMES[matrix.dtype]}, expected "
                           f"{MATRIX_NAMES[ELEMENT_TYPES[magic]]}")
    if matrix.ndim != len(shape) or any(want not in (None, have)
                                        for want, have in zip(shape, matrix.shape)):
        wanted = str(tuple("N" if size is None else size for size in shape)).replace("'", "")
        raise CapsNetError(f"{where}: shape {matrix.shape}, expected {wanted}")
    return matrix


def downsample(images: np.ndarray) -> np.ndarray:
    """uint8 images ``(N, C, H, W)`` halved in size: each pixel is the mean of a 2x2 block (what
    area or half-pixel bilinear resizing give for this factor), rounded half up."""
    n, channels, height, width = images.shape
    size = (height // DOWNSAMPLE, width // DOWNSAMPLE)
    out = np.empty((n, channels, *size), dtype=np.uint8)
    for start in range(0, n, CHUNK):
        blocks = images[start:start + CHUNK].reshape(-1, channels, size[0], DOWNSAMPLE, size[1],
                                                     DOWNSAMPLE)
        sums = blocks.sum(axis=(3, 5), dtype=np.uint16)
        out[start:start + CHUNK] = (sums + DOWNSAMPLE ** 2 // 2) // DOWNSAMPLE ** 2
    return out
