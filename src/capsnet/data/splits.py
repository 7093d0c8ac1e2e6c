"""Splits and batches: a data set's files as uint8 tensors split 55,000 / 5,000 / 10,000 as
in the notebook, served as float batches on any device with optional random shifts."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


import numpy as np
import torch
from torch import Tensor

from ..errors import CapsNetError
from .idx import FILE_NAMES, ROLES, check_images_labels, read_idx
from .folders import is_class_folder_data_set, read_class_folders
from .sources import DATASETS, acquire

DEFAULT_VAL_SIZE = 5000  # held out when none is asked for: the notebook's (read_data_sets)


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



def classes_of(labels: np.ndarray, dataset: str) -> int:
    """Number of classes of a user's data set: its training labels must be 0 .. K-1, every
    one of them used, K >= 2 (a gap is almost always a mistake in the files)."""
    if labels.ndim != 1 or labels.size == 0:
        return 0  # check_images_labels names the problem
    used = np.unique(labels)
    if len(used) < 2:
        raise CapsNetError(f"{dataset}: every training label is {int(used[0])}; a classifier "
                           f"needs at least 2 classes")
    missing = sorted(set(range(int(used[-1]) + 1)) - set(used.tolist()))
    if missing:
        shown = ", ".join(map(str, missing[:5])) + (", ..." if len(missing) > 5 else "")
        raise CapsNetError(f"{dataset}: the training labels use {len(used)} classes between 0 "
                           f"and {int(used[-1])} but not {shown}; labels must be 0 .. K-1, "
                           f"every class present")
    return len(used)


@dataclass
class Split:
    images: Tensor  # (n, channels, height, width) uint8
    labels: Tensor  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    def to(self, device: torch.device | str) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))

    def first(self, n: int) -> "Split":
        """The first ``n`` examples; all of them when ``n`` is 0 (``train_limit``'s "no limit")."""
        return Split(self.images[:n], self.labels[:n]) if n else self


@dataclass
class Splits:
    train: Split
    val: Split
    test: Split
    num_classes: int
    class_names: tuple[str, ...]
    prepare: str = "mnist"  # how to prepare a user's image for these models: see utils.images

    @property
    def image_size(self) -> int:
        return self.train.images.shape[-1]

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]


def load_splits(dataset: str, data_dir: str | os.PathLike | None = None,
                val_size: int | None = None, val_split: str = "first", image_size: int = 0,
                channels: int = 0) -> Splits:
    """Training, validation and test splits. The validation set is the first ``val_size``
    images of the training file (``val_split="first"``, as TensorFlow's ``read_data_sets``
    that the notebook uses) or the last ones (``"last"``); training gets the rest. Without
    ``val_size``, the data set's default: :data:`DEFAULT_VAL_SIZE` images, or for class
    folders 10% of each class (stratified, see :mod:`capsnet.data.folders`).

    ``dataset`` is a registered name (:data:`~capsnet.data.sources.DATASETS`), a folder
    holding the four IDX files of the user's own data (square grayscale images, labels 0 ..
    K-1), or a folder of class folders (:mod:`capsnet.data.folders`, whose images are
    resized to ``image_size`` and given ``channels``).
    """
    if is_class_folder_data_set(dataset):
        parts, class_names = read_class_folders(dataset, val_size, image_size, channels)
        return Splits(*(to_split(*parts[part]) for part in ("train", "val", "test")),
                      len(class_names), class_names, prepare="resize")
    if dataset in DATASETS:
        arrays = acquire(dataset, data_dir)
        spec = DATASETS[dataset]
        num_classes, class_names = spec.num_classes, spec.class_names
    else:
        arrays = read_folder(dataset)
        num_classes = classes_of(arrays["train_labels"], dataset)
        class_names = tuple(str(i) for i in range(num_classes))
    return split_arrays(arrays, dataset, num_classes, class_names,
                        DEFAULT_VAL_SIZE if val_size is None else val_size, val_split)


def is_folder_data_set(dataset: str) -> bool:
    """Whether :func:`load_splits` reads ``dataset`` as a folder rather than a name."""
    return is_class_folder_data_set(dataset) or dataset not in DATASETS


def recorded_dataset(dataset: str) -> str:
    """``dataset`` as a new run records it: a folder as an absolute path, so that the run
    works from any working folder and wherever it is moved; a name as it is."""
    if is_folder_data_set(dataset) and Path(dataset).is_dir():
        return os.path.abspath(dataset)
    return dataset


def locate_dataset(dataset: str, run_dir: str | os.PathLike) -> str:
    """The data set recorded by the run in ``run_dir``, found. Older runs recorded a folder
    relative to where they were trained; one that is not there from here is looked for from
    the run folder's parent and grandparent (``--run-dir NAME``, ``--run-dir runs/NAME``)."""
    path = Path(dataset)
    if not is_folder_data_set(dataset) or path.is_absolute() or path.exists():
        return dataset
    run_dir = Path(os.path.abspath(run_dir))
    tried = list(dict.fromkeys([Path.cwd() / path, run_dir.parent / path,
                                run_dir.parent.parent / path]))
    for candidate in tried[1:]:
        if candidate.is_dir():
            return str(candidate)
    raise CapsNetError(f"{run_dir}: the run's data set folder {dataset} was not found (tried "
                       f"{', '.join(map(str, tried))}); give --dataset")


def split_arrays(arrays: dict[str, np.ndarray], dataset: str, num_classes: int,
                 class_names: tuple[str, ...], val_size: int, val_split: str) -> Splits:
    """Check the four arrays of a data set and cut validation off its training part."""
    for part in ("train", "test"):
        check_images_labels(arrays[f"{part}_images"], arrays[f"{part}_labels"], num_classes,
                            f"{dataset} {part}")
    train_images, train_labels = arrays["train_images"], arrays["train_labels"]
    if arrays["test_images"].shape[1:] != train_images.shape[1:]:
        raise CapsNetError(f"{dataset}: test images {arrays['test_images'].shape[1:]} differ "
                           f"from training images {train_images.shape[1:]}")
    if train_images.shape[-1] != train_images.shape[-2]:
        raise CapsNetError(f"{dataset}: images must be square, got {train_images.shape[1:]}")
    if not 0 < val_size < len(train_images):
        raise CapsNetError(f"validation size {val_size} must be between 1 and "
                           f"{len(train_images) - 1} for {len(train_images)} training images")
    if val_split not in ("first", "last"):
        raise CapsNetError(f"val_split must be 'first' or 'last', got {val_split!r}")
    cut = val_size if val_split == "first" else len(train_images) - val_size
    head, tail = slice(None, cut), slice(cut, None)
    train_part, val_part = (tail, head) if val_split == "first" else (head, tail)

    return Splits(to_split(train_images[train_part], train_labels[train_part]),
                  to_split(train_images[val_part], train_labels[val_part]),
                  to_split(arrays["test_images"], arrays["test_labels"]),
                  num_classes, class_names)


def to_split(images: np.ndarray, labels: np.ndarray) -> Split:
    """uint8 images ``(N, H, W)`` or ``(N, C, H, W)`` and labels as a :class:`Split`."""
    tensor = torch.from_numpy(images.copy())
    return Split(tensor.unsqueeze(1) if tensor.dim() == 3 else tensor,
                 torch.from_numpy(labels.astype(np.int64)))
