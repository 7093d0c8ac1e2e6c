"""Your own images in class folders, the layout image libraries use:

    PATH/train/<class>/*.png|jpg|...    one folder per class; its name is the class name
    PATH/val/<class>/...                optional; else cut from train/
    PATH/test/<class>/...               optional; else cut from train/ as well

A part cut from train/ is stratified: it takes 10% of each class (rounded, at least one
image), or ``val_size`` images split across the classes in proportion to their sizes, and
every class keeps training images; the cut is the same in every run and on every machine. A
class too small to give each cut part an image and still train on one is refused.

Every image is read with :func:`capsnet.utils.images.read_pixels` (any size and mode), resized
to ``image_size`` x ``image_size`` and kept or converted to ``channels`` (1: grayscale, 3:
colour; by default colour when any image is). Classes are the train/ folders in sorted
order, named as a trained model can store them. A file that is not an image, an image that
cannot be read, anything in a class folder that is not a regular file (a folder, a FIFO, a
broken or looping link), a class with no images, a class name a model cannot store, fewer
than two classes or more than a CapsNet takes, or images that would not fit in memory at
``image_size`` is one :class:`~capsnet.errors.CapsNetError` line, before any image is read.
"""

from __future__ import annotations

import stat
from dataclasses import fields
from pathlib import Path

import numpy as np

from ..errors import CapsNetError
from ..nn.model import CapsNetConfig
from ..nn.pretrained import check_labels
from ..utils.images import match_channels, read_pixels
from ..utils.memory import check_memory
from ..utils.resample import resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PARTS = ("train", "val", "test")
SPLIT_SEED = 0  # the cut of val/ and test/ from train/ is the same in every run
HELD_OUT_PERCENT = 10  # of each class, per part cut from train/ when no val_size is given
DEFAULT_SIZE = 28
MAX_CLASSES = next(f.metadata["max"] for f in fields(CapsNetConfig) if f.name == "num_classes")
COPIES = 3  # of the pixels at once: as read, stacked, and as the splits' tensors


def is_class_folder_data_set(path: str | Path) -> bool:
    return (Path(path) / "train").is_dir()


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_names_of(root: Path) -> tuple[str, ...]:
    """The class names: train/'s folders, each name one a trained model can store."""
    folders = [p for p in visible(root / "train") if p.is_dir()]
    if len(folders) < 2:
        raise CapsNetError(f"{root}: train/ holds {len(folders)} class folder"
                           f"{'' if len(folders) == 1 else 's'}; a classifier needs at least 2")
    if len(folders) > MAX_CLASSES:
        raise CapsNetError(f"{root}: train/ holds {len(folders):,} class folders; a CapsNet "
                           f"takes at most {MAX_CLASSES:,} classes")
    for folder in folders:
        check_class_name(folder)
    return tuple(p.name for p in folders)


def check_class_name(folder: Path) -> None:
    """Refuse a class folder whose name a trained model could not store, by the rule its
    class names are read back with (rather than after a whole training)."""
    try:
        check_labels({"class_names": [folder.name]}, 1, str(folder))
    except CapsNetError:
        raise CapsNetError(f"{folder}: the folder's name cannot be a class name, which a "
                           f"trained model keeps short and printable; rename the folder") from None


def regular_file(path: Path) -> Path:
    """``path``, a regular file (links followed); a folder, a FIFO, a device, a broken or
    looping link is one line naming it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise CapsNetError(f"{path}: a folder inside a class folder, which holds only images")
    if not stat.S_ISREG(mode):
        raise CapsNetError(f"{path}: not a regular file (a FIFO, a socket or a device); a class "
                           f"folder holds only images")
    return path


def image_files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """``(file, class index)`` of every image in ``folder``'s class folders."""
    found = []
    for entry in visible(folder):
        if not entry.is_dir():
            raise CapsNetError(f"{entry}: expected only class folders in {folder}")
        if entry.name not in classes:
            raise CapsNetError(f"{entry}: class {entry.name!r} is not one of train/'s classes")
        files = [regular_file(p) for p in visible(entry)]
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise CapsNetError(f"{others[0]}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not files and folder.name == "train":
            raise CapsNetError(f"{entry}: no images in this class folder")
        found += [(p, classes.index(entry.name)) for p in files]
    return found


def read_images(files: list[tuple[Path, int]], size: int, channels: int
                ) -> tuple[list[np.ndarray], np.ndarray]:
    """Each file's pixels ``(size, size, channels)`` uint8 (with ``channels`` 0: 1 or 3, as
    read), and the labels."""
    pixels = []
    for path, _ in files:
        image = read_pixels(path)  # (height, width, 1 or 3)
        resized = np.stack([resize(image[:, :, c], size, size)
                            for c in range(image.shape[2])], axis=-1)
        if channels:
            resized = match_channels(resized, channels, path)
        pixels.append(np.round(np.clip(resized, 0, 1) * 255).astype(np.uint8))
    return pixels, np.array([label for _, label in files], dtype=np.int64)


def stacked(pixels: list[np.ndarray], channels: int) -> np.ndarray:
    """``(N, channels, size, size)`` of images of ``channels`` channels or 1 (repeated)."""
    return np.stack([np.repeat(p, channels // p.shape[2], axis=2).transpose(2, 0, 1)
                     for p in pixels])


def read_class_folders(root: str | Path, val_size: int | None = None, image_size: int = 0,
                       channels: int = 0
                       ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
    """``{"train" | "val" | "test": (images (N, C, S, S) uint8, labels (N,) int64)}`` of a
    class-folder data set, and its class names. A missing val/ or test/ is cut from train/
    (``val_size`` images each, by default 10% of each class)."""
    root = Path(root)
    if channels not in (0, 1, 3):
        raise CapsNetError(f"channels must be 1 (grayscale) or 3 (colour), got {channels}")
    classes = class_names_of(root)
    size = image_size or DEFAULT_SIZE
    parts = {part: image_files(root / part, classes) for part in PARTS if (root / part).is_dir()}
    for part, files in parts.items():
        if not files:
            raise CapsNetError(f"{root / part}: no images")
    count = sum(len(files) for files in parts.values())
    check_memory(COPIES * count * size * size * (channels or 3),
                 f"{root}: {count:,} images of {size}x{size}", "lower --image-size")
    read = {part: read_images(files, size, channels) for part, files in parts.items()}
    channels = channels or max(p.shape[2] for pixels, _ in read.values() for p in pixels)
    arrays = {part: (stacked(pixels, channels), labels) for part, (pixels, labels) in read.items()}
    return cut_missing(arrays, val_size, root, classes), classes


def cut_missing(arrays: dict[str, tuple[np.ndarray, np.ndarray]], val_size: int | None,
                root: Path, classes: tuple[str, ...]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cut a missing val/ and test/ from train/, each taking :func:`held_out_counts` images of
    every class, the first ones of that class in a fixed shuffle; all three parts keep the
    shuffled order (so ``train_limit`` takes a sample of every class)."""
    missing = [part for part in ("val", "test") if part not in arrays]
    if not missing:
        return arrays
    images, labels = arrays["train"]
    sizes = np.bincount(labels, minlength=len(classes))
    counts = held_out_counts(sizes, val_size, missing, root, classes)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    shuffled = labels[order]
    rank = np.empty(len(order), dtype=np.int64)  # each image's place among its class's
    for label, size in enumerate(sizes):
        rank[shuffled == label] = np.arange(size)
    part = np.minimum(rank // counts[shuffled], len(missing))  # len(missing): training
    for index, name in enumerate([*missing, "train"]):
        chosen = order[part == index]
        arrays[name] = (images[chosen], labels[chosen])
    return arrays


def held_out_counts(sizes: np.ndarray, val_size: int | None, missing: list[str], root: Path,
                    classes: tuple[str, ...]) -> np.ndarray:
    """Images of each class (of ``sizes`` training images) that each ``missing`` part takes:
    ``val_size`` split across the classes in proportion to their sizes, or without it
    HELD_OUT_PERCENT of each class (rounded half up, at least one)."""
    cuts = " and ".join(missing)
    for name, size in zip(classes, sizes):
        if size <= len(missing):
            raise CapsNetError(f"{root / 'train' / name}: {size} image{'' if size == 1 else 's'}, "
                               f"too few to hold out one for {cuts} and train on another; add "
                               f"images, or add {'/ and '.join(missing)}/")
    if val_size is None:
        return np.maximum(1, (sizes * HELD_OUT_PERCENT + 50) // 100)
    if val_size < len(sizes):
        raise CapsNetError(f"{root}: --val-size {val_size} is fewer than the {len(sizes)} "
                           f"classes, and {cuts} take at least one image of each; give at "
                           f"least {len(sizes)}, or leave it out for {HELD_OUT_PERCENT}% of "
                           f"each class")
    counts = apportion(sizes, val_size)
    for name, size, count in zip(classes, sizes, counts):
        if size <= count * len(missing):
            raise CapsNetError(f"{root / 'train' / name}: {size} images, too few to hold out "
                               f"{count} for {'each of ' if len(missing) > 1 else ''}{cuts} "
                               f"and train on the rest; lower --val-size")
    return counts


def apportion(sizes: np.ndarray, total: int) -> np.ndarray:
    """``total`` (at least ``len(sizes)``) split in proportion to ``sizes`` by largest
    remainders, ties to the earlier class, at least one each: a class whose share is under
    one gets one and the rest is shared among the others. Integers only, so every machine
    splits alike."""
    small = np.zeros(len(sizes), dtype=bool)
    while True:
        left, whole = total - small.sum(), sizes[~small].sum()
        under = ~small & (left * sizes < whole)
        if not under.any():
            break
        small |= under
    counts = np.ones(len(sizes), dtype=np.int64)
    if whole:
        shares = left * sizes[~small]
        floors, remainders = shares // whole, shares % whole
        floors[np.argsort(-remainders, kind="stable")[:left - floors.sum()]] += 1
        counts[~small] = floors
    return counts
