"""Your own images as model input: read, checked, and prepared the way MNIST's digits were.

:func:`load_image` reads any image Pillow can open (PNG, JPEG, GIF, BMP, TIFF, WebP, ...) of
any size and mode, or a NumPy ``.npy`` array, and returns ``(channels, size, size)`` float32
pixels in [0, 1]. With ``preprocess`` (the default) a grayscale image goes through MNIST's own
normalisation, so a photo or a drawing of a digit looks like the data the model learnt from:

1. dark ink on a light background is inverted to bright ink on black;
2. the background level is removed and the contrast stretched to [0, 1];
3. the image is cropped to the ink's bounding box;
4. scaled, keeping the aspect ratio and anti-aliased, so its longer side is 20 pixels
   (``round(size * 20 / 28)`` for other sizes);
5. pasted into a ``size`` x ``size`` black image so that its centre of mass lies at the
   centre (moved the least needed to keep all ink inside, for very lopsided shapes).

Without ``preprocess`` the image is only resized to ``size`` x ``size``. Every problem is a
:class:`~capsnet.errors.CapsNetError` whose one-line message starts with the file's path.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CapsNetError, error_line, reading

MNIST_BOX = 20 / 28  # MNIST digits fit a 20x20 box inside the 28x28 image
MIN_CONTRAST = 0.05  # ink must differ from the background by this much (about 13/255)
INK_LEVEL = 0.2  # after contrast stretching, pixels above this count as ink for the crop
MAX_IMAGE_PIXELS = 4096 * 4096  # a digit photo needs far less; bounds time and memory
NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_BYTES = 256 * 2**20
MAX_SIDE = 1 << 20  # pixels along one axis: more is not an image (and overflows numpy)


def load_image(path: str | os.PathLike, size: int = 28, channels: int = 1,
               preprocess: bool = True) -> np.ndarray:
    """The image at ``path`` as float32 ``(channels, size, size)`` in [0, 1]; see the module."""
    path = Path(path)
    pixels = read_pixels(path)  # (height, width, c) float64 in [0, 1]
    pixels = match_channels(pixels, channels, path)
    if preprocess and channels == 1:
        plane = mnist_normalise(pixels[:, :, 0], size, path)
        return plane[np.newaxis].astype(np.float32)
    planes = [resize(pixels[:, :, c], size, size) for c in range(channels)]
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)


# -- reading ----------------------------------------------------------------------------

def read_pixels(path: Path) -> np.ndarray:
    """Pixels of the file at ``path`` as ``(height, width, channels)`` float64 in [0, 1]."""
    if not path.exists():
        raise CapsNetError(f"{path}: no such file")
    if not path.is_file():
        raise CapsNetError(f"{path}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise CapsNetError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise CapsNetError(f"{path}: empty file")
    if head == NPY_MAGIC or path.suffix.lower() == ".npy":
        pixels = array_pixels(read_npy(path), path)
    else:
        pixels = image_pixels(path)
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise CapsNetError(f"{path}: image has no pixels (shape {pixels.shape[:2]})")
    return pixels


def read_npy(path: Path) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (never unpickling objects)."""
    with reading(path, ".npy array"):
        with open(path, "rb") as f:
            # Checked first: np.load would also open .npz archives, and the declared size
            # must be sane before anything is allocated.
            version = np.lib.format.read_magic(f)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(f)
        if math.prod(shape) * dtype.itemsize > MAX_NPY_BYTES or max(shape, default=0) > MAX_SIDE:
            raise ValueError(f"declared shape {shape} is too large for an image")
        return np.load(path, allow_pickle=False)


def array_pixels(array: np.ndarray, path: Path) -> np.ndarray:
    """Check a NumPy image (H x W, H x W x C or C x H x W; uint8 0-255 or float 0-1) and
    return it as ``(height, width, channels)`` float64 in [0, 1]."""
    if array.dtype.kind not in "biuf":
        raise CapsNetError(f"{path}: array of {array.dtype} is not an image; expected uint8 or float")
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # C x H x W -> H x W x C
    elif array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise CapsNetError(f"{path}: array of shape {array.shape} is not an image; expected "
                           f"H x W, H x W x C or C x H x W with 1, 3 or 4 channels")
    if array.size == 0:
        raise CapsNetError(f"{path}: array of shape {array.shape} has no pixels")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise CapsNetError(f"{path}: array holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if array.dtype.kind == "f":
        if low < 0 or high > 1:
            raise CapsNetError(f"{path}: float pixel values must lie in [0, 1], found "
                               f"{low:g} to {high:g} (divide 0-255 data by 255)")
    elif low < 0 or high > 255:
        raise CapsNetError(f"{path}: integer pixel values must lie in 0..255, found "
                           f"{low:g} to {high:g}")
    else:
        values /= 1.0 if array.dtype.kind == "b" else 255.0
    if values.shape[-1] == 4:
        values = flatten_alpha(values)
    return values


def image_pixels(path: Path) -> np.ndarray:
    """Decode an image file with Pillow into ``(height, width, 1 or 3)`` float64 in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise CapsNetError(f"{path}: image of {image.width}x{image.height} pixels is "
                                       f"too large (at most {MAX_IMAGE_PIXELS:,} pixels)")
                image.load()
                return decoded_pixels(ImageOps.exif_transpose(image))
    except CapsNetError:
        raise
    except UnidentifiedImageError:
        raise CapsNetError(f"{path}: not an image file this program can read "
                           f"(PNG, JPEG, BMP, GIF, TIFF, WebP or .npy)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CapsNetError(f"{path}: image too large ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises any type on hostile bytes
        raise CapsNetError(f"{path}: corrupt or truncated image ({error_line(exc, 150)})") from None


def decoded_pixels(image: Image.Image) -> np.ndarray:
    """``(height, width, 1 or 3)`` float64 in [0, 1] of a loaded Pillow image of any mode."""
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ValueError("image holds NaN or infinite values")
        peak = float(values.max())
        top = (65535.0 if image.mode.startswith("I;16") or peak > 255
               else 1.0 if image.mode == "F" and peak <= 1 else 255.0)
        return np.clip(values / top, 0.0, 1.0)[:, :, np.newaxis]
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        return flatten_alpha(np.asarray(image.convert("RGBA"), dtype=np.float64) / 255.0)
    if image.mode in ("1", "L"):
        return np.asarray(image.convert("L"), dtype=np.float64)[:, :, np.newaxis] / 255.0
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def flatten_alpha(rgba: np.ndarray) -> np.ndarray:
    """Composite ``(h, w, 4)`` pixels onto the background that contrasts with their opaque
    part: white behind dark strokes (a drawing on a transparent layer), black behind light."""
    colour, alpha = rgba[:, :, :3], rgba[:, :, 3:]
    opaque = alpha[:, :, 0] > 0.5
    luminance = colour @ np.array([0.299, 0.587, 0.114])
    background = 1.0 if opaque.any() and luminance[opaque].mean() < 0.5 else 0.0
    return colour * alpha + background * (1.0 - alpha)


def match_channels(pixels: np.ndarray, channels: int, path: Path) -> np.ndarray:
    """``pixels`` with ``channels`` channels: RGB to gray by luminance, gray repeated."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if channels == 1 and have == 3:
        return (pixels @ np.array([0.299, 0.587, 0.114]))[:, :, np.newaxis]
    if have == 1:
        return np.repeat(pixels, channels, axis=-1)
    raise CapsNetError(f"{path}: image has {have} channels; the model takes {channels}")


# -- MNIST-style normalisation ------------------------------------------------------------

def mnist_normalise(plane: np.ndarray, size: int, path: Path) -> np.ndarray:
    """Bright-on-black, cropped, scaled into the 20/28 box and centred by mass in ``size``."""
    plane = bright_on_black(plane, path)
    patch = crop_to_ink(plane)
    box = max(1, round(size * MNIST_BOX))
    height, width = patch.shape
    scale = box / max(height, width)
    patch = np.clip(resize(patch, max(1, round(height * scale)), max(1, round(width * scale))),
                    0.0, 1.0)
    return paste_centred(patch, size)


def bright_on_black(plane: np.ndarray, path: Path) -> np.ndarray:
    """Invert dark-on-light images, subtract the background and stretch the ink to 1."""
    if border_level(plane) > 0.5:
        plane = 1.0 - plane
    background = border_level(plane)
    contrast = float(plane.max()) - background
    if contrast < MIN_CONTRAST:
        raise CapsNetError(f"{path}: the image is blank (no ink stands out from the background)")
    return np.clip((plane - background) / contrast, 0.0, 1.0)


def border_level(plane: np.ndarray) -> float:
    """Median of the outermost pixels: the background level of a digit drawn inside."""
    border = np.concatenate([plane[0], plane[-1], plane[:, 0], plane[:, -1]])
    return float(np.median(border))


def crop_to_ink(plane: np.ndarray) -> np.ndarray:
    """The smallest rectangle of ``plane`` holding every pixel above :data:`INK_LEVEL`."""
    rows = np.flatnonzero((plane > INK_LEVEL).any(axis=1))
    cols = np.flatnonzero((plane > INK_LEVEL).any(axis=0))
    return plane[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def resize(plane: np.ndarray, height: int, width: int) -> np.ndarray:
    """``plane`` resized to ``height`` x ``width`` with Lanczos (anti-aliased) resampling."""
    if plane.shape == (height, width):
        return plane.astype(np.float64)
    image = Image.fromarray(plane.astype(np.float32))
    resized = image.resize((width, height), Image.Resampling.LANCZOS)
    return np.asarray(resized, dtype=np.float64)


def paste_centred(patch: np.ndarray, size: int) -> np.ndarray:
    """A black ``size`` x ``size`` image with ``patch`` placed so that its centre of mass is
    at the image centre, rounded to whole pixels, and all of it inside."""
    canvas = np.zeros((size, size))
    mass = patch.sum()
    rows, cols = np.indices(patch.shape)
    centre = (size - 1) / 2
    offsets = []
    for axis, index in enumerate((rows, cols)):
        com = float((index * patch).sum() / mass) if mass > 0 else (patch.shape[axis] - 1) / 2
        offset = int(np.floor(centre - com + 0.5))
        offsets.append(min(max(offset, 0), size - patch.shape[axis]))
    top, left = offsets
    canvas[top:top + patch.shape[0], left:left + patch.shape[1]] = patch
    return canvas
