"""Your own images in class folders, the layout image libraries use:

    PATH/train/<class>/*.png|jpg|...    one folder per class; its name is the class name
    PATH/val/<class>/...                optional; else cut from train/ (a fixed seed)
    PATH/test/<class>/...               optional; else cut from train/ as well

Every image is read with :func:`capsnet.data.images.read_pixels` (any size and mode), resized
to ``image_size`` x ``image_size`` and kept or converted to ``channels`` (1: grayscale, 3:
colour; by default colour when any image is). Classes are the train/ folders in sorted
order. A folder that is not an image, an image that cannot be read, a class with no images,
or fewer than two classes is one :class:`~capsnet.errors.CapsNetError` line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import CapsNetError
from .images import match_channels, read_pixels, resize

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}
PARTS = ("train", "val", "test")
SPLIT_SEED = 0  # the cut of val/ and test/ from train/ is the same in every run
DEFAULT_SIZE = 28


def is_class_folder_data_set(path: str | Path) -> bool:
    return (Path(path) / "train").is_dir()


def visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def class_names_of(root: Path) -> tuple[str, ...]:
    names = tuple(p.name for p in visible(root / "train") if p.is_dir())
    if len(names) < 2:
        raise CapsNetError(f"{root}: train/ holds {len(names)} class folder"
                           f"{'' if len(names) == 1 else 's'}; a classifier needs at least 2")
    return names


def image_files(folder: Path, classes: tuple[str, ...]) -> list[tuple[Path, int]]:
    """``(file, class index)`` of every image in ``folder``'s class folders."""
    found = []
    for entry in visible(folder):
        if not entry.is_dir():
            raise CapsNetError(f"{entry}: expected only class folders in {folder}")
        if entry.name not in classes:
            raise CapsNetError(f"{entry}: class {entry.name!r} is not one of train/'s classes")
        files = [p for p in visible(entry) if p.is_file()]
        others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES]
        if others:
            raise CapsNetError(f"{others[0]}: not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
        if not files and folder.name == "train":
            raise CapsNetError(f"{entry}: no images in this class folder")
        found += [(p, classes.index(entry.name)) for p in files]
    return found


def read_images(files: list[tuple[Path, int]], size: int) -> tuple[list[np.ndarray], np.ndarray]:
    """Each file's pixels ``(size, size, 1 or 3)`` float in [0, 1], and the labels."""
    pixels = []
    for path, _ in files:
        image = read_pixels(path)  # (height, width, 1 or 3)
        pixels.append(np.stack([resize(image[:, :, c], size, size)
                                for c in range(image.shape[2])], axis=-1))
    return pixels, np.array([label for _, label in files], dtype=np.uint8)


def to_uint8(pixels: list[np.ndarray], channels: int) -> np.ndarray:
    """``(N, channels, size, size)`` uint8 of images of 1 or 3 channels."""
    converted = [match_channels(p, channels, Path("")) for p in pixels]
    return np.stack([np.round(np.clip(p, 0, 1) * 255).astype(np.uint8).transpose(2, 0, 1)
                     for p in converted])


def read_class_folders(root: str | Path, val_size: int, image_size: int = 0, channels: int = 0
                       ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], tuple[str, ...]]:
    """``{"train" | "val" | "test": (images (N, C, S, S) uint8, labels (N,) uint8)}`` of a
    class-folder data set, and its class names."""
    root = Path(root)
    if channels not in (0, 1, 3):
        raise CapsNetError(f"channels must be 1 (grayscale) or 3 (colour), got {channels}")
    classes = class_names_of(root)
    size = image_size or DEFAULT_SIZE
    parts = {part: image_files(root / part, classes) for part in PARTS if (root / part).is_dir()}
    for part, files in parts.items():
        if not files:
            raise CapsNetError(f"{root / part}: no images")
    read = {part: read_images(files, size) for part, files in parts.items()}
    channels = channels or max(p.shape[2] for pixels, _ in read.values() for p in pixels)
    arrays = {part: (to_uint8(pixels, channels), labels) for part, (pixels, labels) in read.items()}
    return cut_missing(arrays, val_size, root), classes


def cut_missing(arrays: dict[str, tuple[np.ndarray, np.ndarray]], val_size: int,
                root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cut ``val_size`` images each for a missing val/ and test/ from a seeded shuffle of
    train/."""
    missing = [part for part in ("val", "test") if part not in arrays]
    if not missing:
        return arrays
    images, labels = arrays["train"]
    if len(labels) <= len(missing) * val_size:
        raise CapsNetError(f"{root}: train/ has {len(labels)} images, too few to cut "
                           f"{' and '.join(missing)} of {val_size} images each from it (set "
                           f"--val-size, or add {'/ and '.join(missing)}/)")
    order = np.random.default_rng(SPLIT_SEED).permutation(len(labels))
    images, labels = images[order], labels[order]
    for part in missing:
        arrays[part] = (images[:val_size], labels[:val_size])
        images, labels = images[val_size:], labels[val_size:]
    arrays["train"] = (images, labels)
    return arrays
