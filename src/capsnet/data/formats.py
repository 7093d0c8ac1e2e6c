"""Readers of the files of named data sets: each turns the verified bytes of a data set's files
(by file name) into its four arrays ``train_images``, ``train_labels``, ``test_images`` and
``test_labels``, images uint8 ``(N, H, W)`` or ``(N, C, H, W)``, labels 1-D.

Everything is read in memory, nothing is written to disk, and whatever the bytes hold becomes
one :class:`CapsNetError` line naming the file. ``source`` describes where the files came from.
"""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np

from ..errors import CapsNetError, reading
from ..utils.memory import check_memory
from .idx import FILE_NAMES, ROLES, parse_idx

CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR10_TRAIN = tuple(f"cifar-10-batches-bin/data_batch_{k}.bin" for k in range(1, 6))
CIFAR10_TEST = "cifar-10-batches-bin/test_batch.bin"
CIFAR10_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes
CIFAR10_MAX_RECORDS = 10_000  # per batch file of the real archive
MAX_TAR_ENTRIES = 100  # the real archive has 9; stop early in a hostile one

SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
SVHN_IMAGE = (32, 32, 3)  # height, width, channels; the images are the last axis of X


def _located(source: str, file_name: str) -> str:
    return f"{source.rstrip('/')}/{file_name}"


def read_idx_files(files: dict[str, bytes], source: str) -> dict[str, np.ndarray]:
    """The four IDX files of an MNIST-style data set."""
    return {role: parse_idx(files[FILE_NAMES[role]], _located(source, FILE_NAMES[role]))
            for role in ROLES}


# --- CIFAR-10, binary version ----------------------------------------------------------------


def read_cifar10_binary(files: dict[str, bytes], source: str) -> dict[str, np.ndarray]:
    """CIFAR-10 from ``cifar-10-binary.tar.gz``: images ``(N, 3, 32, 32)``; training is
    ``data_batch_1.bin`` .. ``data_batch_5.bin`` in order, test is ``test_batch.bin``."""
    where = _located(source, CIFAR10_ARCHIVE)
    with reading(where, "CIFAR-10 binary archive"):
        batches = _tar_members(files[CIFAR10_ARCHIVE], (*CIFAR10_TRAIN, CIFAR10_TEST),
                               CIFAR10_MAX_RECORDS * CIFAR10_RECORD, where)
    train = [_cifar10_records(batches[name], f"{where}:{name}") for name in CIFAR10_TRAIN]
    test_images, test_labels = _cifar10_records(batches[CIFAR10_TEST], f"{where}:{CIFAR10_TEST}")
    return {"train_images": np.concatenate([images for images, _ in train]),
            "train_labels": np.concatenate([labels for _, labels in train]),
            "test_images": test_images, "test_labels": test_labels}


def _tar_members(archive: bytes, wanted: tuple[str, ...], max_size: int,
                 where: str) -> dict[str, bytes]:
    """The bytes of the ``wanted`` members of a gzipped tar archive, each a regular file of at
    most ``max_size`` bytes; no other member is read."""
    found: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        for count, member in enumerate(tar):
            if count == MAX_TAR_ENTRIES:
                raise CapsNetError(f"{where}: more than {MAX_TAR_ENTRIES} entries")
            if member.name not in wanted:
                continue
            if member.name in found:
                raise CapsNetError(f"{where}: {member.name} appears twice")
            if not member.isfile():
                raise CapsNetError(f"{where}: {member.name} is not a regular file")
            if member.size > max_size:
                raise CapsNetError(f"{where}: {member.name} has {member.size} bytes, over the "
                                   f"limit of {max_size}")
            found[member.name] = tar.extractfile(member).read()
            if len(found) == len(wanted):
                break
    missing = [name for name in wanted if name not in found]
    if missing:
        raise CapsNetError(f"{where}: no {', '.join(missing)}")
    return found


def _cifar10_records(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    if not data or len(data) % CIFAR10_RECORD:
        raise CapsNetError(f"{where}: {len(data)} bytes is not a whole number of "
                           f"{CIFAR10_RECORD}-byte records")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR10_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        raise CapsNetError(f"{where}: label {int(labels.max())} out of range 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


# --- SVHN, cropped digits --------------------------------------------------------------------


def read_svhn_mat(files: dict[str, bytes], source: str) -> dict[str, np.ndarray]:
    """SVHN from ``train_32x32.mat`` and ``test_32x32.mat``: images ``(N, 3, 32, 32)``,
    labels 0..9 (the files use 10 for the digit 0)."""
    arrays = {}
    for part, file_name in SVHN_FILES.items():
        images, labels = _svhn_part(files[file_name], _located(source, file_name))
        arrays[f"{part}_images"], arrays[f"{part}_labels"] = images, labels
    return arrays


def _svhn_part(data: bytes, where: str) -> tuple[np.ndarray, np.ndarray]:
    import scipy.io  # 0.15 s that every command would pay at start-up

    with reading(where, "SVHN .mat file"):
        declared = {name: (shape, kind) for name, shape, kind in scipy.io.whosmat(io.BytesIO(data))}
        count = _svhn_count(declared, where)
        check_memory(2 * count * math.prod(SVHN_IMAGE), f"{where}: its images",
                     "a damaged header, or a data set too large for this machine")
        mat = scipy.io.loadmat(io.BytesIO(data), variable_names=("X", "y"))
        images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
        if images.dtype != np.uint8 or images.shape != (*SVHN_IMAGE, count) or len(labels) != count:
            raise CapsNetError(f"{where}: X {images.dtype} {images.shape} and y {len(labels)} "
                               f"labels differ from what the file declares")
        if not np.isin(labels, np.arange(1, 11)).all():  # a non-numeric y fails here too
            raise CapsNetError(f"{where}: labels outside 1..10")
    # X is (height, width, channel, image); the digit 0 is stored as label 10.
    return (np.ascontiguousarray(images.transpose(3, 2, 0, 1)),
            np.where(labels == 10, 0, labels).astype(np.uint8))


def _svhn_count(declared: dict[str, tuple[tuple[int, ...], str]], where: str) -> int:
    """The number of images the headers of ``X`` and ``y`` declare, checked before loading."""
    missing = [name for name in ("X", "y") if name not in declared]
    if missing:
        raise CapsNetError(f"{where}: no variable {' nor '.join(missing)} (found: "
                           f"{', '.join(declared) or 'none'})")
    (x_shape, x_kind), (y_shape, _) = declared["X"], declared["y"]
    if x_kind != "uint8" or len(x_shape) != 4 or x_shape[:3] != SVHN_IMAGE or not x_shape[3]:
        raise CapsNetError(f"{where}: X is {x_kind} {x_shape}, expected uint8 (32, 32, 3, N)")
    if math.prod(y_shape) != x_shape[3]:
        raise CapsNetError(f"{where}: {x_shape[3]} images but y has shape {y_shape}")
    return x_shape[3]
