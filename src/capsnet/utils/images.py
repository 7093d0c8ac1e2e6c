"""Your own images as model input: read, checked, and prepared the way MNIST's digits were.

:func:`load_image` takes an image file (anything Pillow opens: PNG, JPEG, GIF, BMP, TIFF,
WebP, ...; or a NumPy ``.npy`` array), a Pillow image, a NumPy array or a torch tensor, of
any size and mode, and returns ``(channels, size, size)`` float32 pixels in [0, 1].

With ``preprocess`` (the default) a one-channel result is the digit on the page, cut out
of it and prepared as MNIST's digits were (:mod:`capsnet.utils.digits`, imported with scipy
only for that).

An image with no ink standing out from its paper is refused as blank. Without
``preprocess``, and for three channels, the image is only resized to ``size`` x ``size``.
Every problem is a :class:`~capsnet.errors.CapsNetError` with a one-line message that starts
with the image's name: a file's path, or ``name`` (default ``<PIL image>``, ``<array>``,
``<tensor>``).
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import TypeVar, Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CapsNetError, error_line, reading
from .resample import resize

ImageSource = Union[str, os.PathLike, Image.Image, np.ndarray, torch.Tensor]
PixelsT = TypeVar("PixelsT", np.ndarray, torch.Tensor)

MAX_IMAGE_PIXELS = 4096 * 4096  # a digit photo needs far less; bounds time and memory
NPY_MAGIC = b"\x93NUMPY"
MAX_NPY_BYTES = 256 * 2**20
MAX_SIDE = 1 << 20  # pixels along one axis: more is not an image (and overflows numpy)


def load_image(source: ImageSource, size: int = 28, channels: int = 1, preprocess: bool = True,
               name: str | None = None) -> np.ndarray:
    """``source`` as float32 ``(channels, size, size)`` in [0, 1], prepared as the module says.

    ``source`` is a path (``str`` or path-like) to an image file or ``.npy`` array, a Pillow
    image, a NumPy array (H x W, H x W x C or C x H x W with 1, 3 or 4 channels; uint8 0-255,
    other integers 0-255, bool, or float 0-1) or a torch tensor (C x H x W or H x W, same
    values). Four channels are RGB with alpha, composited onto the paper that contrasts with
    the strokes. ``name`` names the image in error messages (default: the path, or the kind).
    """
    name = name or source_name(source)
    pixels = source_pixels(source, name)  # (height, width, c) float64 in [0, 1]
    pixels = match_channels(pixels, channels, name)
    if preprocess and channels == 1:
        from .digits import mnist_normalise  # scipy: 0.3 s that every command would pay
        plane = mnist_normalise(pixels[:, :, 0], size, name)
        return plane[np.newaxis].astype(np.float32)
    planes = [resize(pixels[:, :, c], size, size) for c in range(channels)]
    return np.clip(np.stack(planes), 0.0, 1.0).astype(np.float32)


def centre_crop(pixels: PixelsT, size: int) -> PixelsT:
    """The centre ``size`` x ``size`` window of ``(..., side, side)`` ``pixels`` (an array or
    a tensor), where a model trained on crops (``--crop``) is evaluated; the whole of them
    when ``side`` is ``size``."""
    margin = (pixels.shape[-1] - size) // 2
    return pixels[..., margin:margin + size, margin:margin + size]


# -- reading ----------------------------------------------------------------------------

def source_name(source: object) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(Path(source))
    if isinstance(source, Image.Image):
        return "<PIL image>"
    if isinstance(source, np.ndarray):
        return "<array>"
    if isinstance(source, torch.Tensor):
        return "<tensor>"
    return f"<{type(source).__name__}>"


def source_pixels(source: object, name: str) -> np.ndarray:
    """Pixels of any kind of ``source`` as ``(height, width, channels)`` float64 in [0, 1]."""
    if isinstance(source, (str, os.PathLike)):
        pixels = read_pixels(Path(source), name)
    elif isinstance(source, Image.Image):
        pixels = pil_pixels(source, name)
    elif isinstance(source, np.ndarray):
        pixels = array_pixels(source, name)
    elif isinstance(source, torch.Tensor):
        pixels = tensor_pixels(source, name)
    else:
        raise CapsNetError(f"{name}: a {type(source).__name__} is not an image; give a path, a "
                           f"PIL image, a NumPy array or a torch tensor")
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise CapsNetError(f"{name}: image has no pixels (shape {pixels.shape[:2]})")
    return pixels


def read_pixels(path: Path, name: str | None = None) -> np.ndarray:
    """Pixels of the file at ``path`` as ``(height, width, channels)`` float64 in [0, 1];
    errors are named ``name`` (default: the path)."""
    name = name or str(path)
    if not path.exists():
        raise CapsNetError(f"{name}: no such file")
    if not path.is_file():
        raise CapsNetError(f"{name}: not a file")
    try:
        with open(path, "rb") as f:
            head = f.read(len(NPY_MAGIC))
    except OSError as exc:
        raise CapsNetError(f"{name}: cannot read ({exc.strerror or exc})") from None
    if not head:
        raise CapsNetError(f"{name}: empty file")
    if head == NPY_MAGIC or path.suffix.lower() == ".npy":
        pixels = array_pixels(read_npy(path, name), name)
    else:
        pixels = image_pixels(path, name)
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise CapsNetError(f"{name}: image has no pixels (shape {pixels.shape[:2]})")
    return pixels


def read_npy(path: Path, name: str) -> np.ndarray:
    """The array in the ``.npy`` file ``path`` (never unpickling objects)."""
    with reading(name, ".npy array"):
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


def array_pixels(array: np.ndarray, name: str | Path) -> np.ndarray:
    """Check a NumPy image (H x W, H x W x C or C x H x W; uint8 0-255 or float 0-1) and
    return it as ``(height, width, channels)`` float64 in [0, 1]."""
    if array.dtype.kind not in "biuf":
        raise CapsNetError(f"{name}: array of {array.dtype} is not an image; expected uint8 "
                           f"or float")
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # C x H x W -> H x W x C
    elif array.ndim == 2:
        array = array[:, :, np.newaxis]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise CapsNetError(f"{name}: array of shape {array.shape} is not an image; expected "
                           f"H x W, H x W x C or C x H x W with 1, 3 or 4 channels")
    if array.size == 0:
        raise CapsNetError(f"{name}: array of shape {array.shape} has no pixels")
    values = array.astype(np.float64)
    if not np.isfinite(values).all():
        raise CapsNetError(f"{name}: array holds NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if array.dtype.kind == "f":
        if low < 0 or high > 1:
            raise CapsNetError(f"{name}: float pixel values must lie in [0, 1], found "
                               f"{low:g} to {high:g} (divide 0-255 data by 255)")
    elif low < 0 or high > 255:
        raise CapsNetError(f"{name}: integer pixel values must lie in 0..255, found "
                           f"{low:g} to {high:g}")
    else:
        values /= 1.0 if array.dtype.kind == "b" else 255.0
    if values.shape[-1] == 4:
        values = flatten_alpha(values)
    return values


def tensor_pixels(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A torch image (C x H x W or H x W, float 0-1 or integers 0-255) as NumPy pixels."""
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point() and tensor.dtype != torch.float64:
        tensor = tensor.float()  # numpy has no bfloat16
    if tensor.ndim == 3 and tensor.shape[0] in (1, 3, 4):
        tensor = tensor.permute(1, 2, 0)  # torch's C x H x W -> H x W x C
    try:
        array = tensor.numpy()
    except (TypeError, RuntimeError) as exc:
        raise CapsNetError(f"{name}: tensor of {tensor.dtype} is not an image ({error_line(exc)})"
                           ) from None
    return array_pixels(array, name)


def pil_pixels(image: Image.Image, name: str) -> np.ndarray:
    """A Pillow image's pixels, turned upright as its EXIF orientation says."""
    if image.width * image.height > MAX_IMAGE_PIXELS:
        raise CapsNetError(f"{name}: image of {image.width}x{image.height} pixels is too large "
                           f"(at most {MAX_IMAGE_PIXELS:,} pixels)")
    with reading(name, "image"):
        image.load()
        return decoded_pixels(ImageOps.exif_transpose(image))


def image_pixels(path: Path, name: str) -> np.ndarray:
    """Decode an image file with Pillow into ``(height, width, 1 or 3)`` float64 in [0, 1]."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise CapsNetError(f"{name}: image of {image.width}x{image.height} pixels is "
                                       f"too large (at most {MAX_IMAGE_PIXELS:,} pixels)")
                image.load()
                return decoded_pixels(ImageOps.exif_transpose(image))
    except CapsNetError:
        raise
    except UnidentifiedImageError:
        raise CapsNetError(f"{name}: not an image file this program can read "
                           f"(PNG, JPEG, BMP, GIF, TIFF, WebP or .npy)") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise CapsNetError(f"{name}: image too large ({exc})") from None
    except Exception as exc:  # noqa: BLE001 - Pillow raises any type on hostile bytes
        raise CapsNetError(f"{name}: corrupt or truncated image ({error_line(exc, 150)})") from None


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


def match_channels(pixels: np.ndarray, channels: int, name: str | Path) -> np.ndarray:
    """``pixels`` with ``channels`` channels: RGB to gray by luminance, gray repeated."""
    have = pixels.shape[-1]
    if have == channels:
        return pixels
    if channels == 1 and have == 3:
        return (pixels @ np.array([0.299, 0.587, 0.114]))[:, :, np.newaxis]
    if have == 1:
        return np.repeat(pixels, channels, axis=-1)
    raise CapsNetError(f"{name}: image has {have} channels; the model takes {channels}")
