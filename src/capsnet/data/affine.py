"""Robustness to affine transformations: translated 40x40 MNIST to train on, affine-transformed
MNIST test digits (affNIST-style, generated) and the real affNIST test files to test on.

Sabour et al. (2017, section 5.2) train on "a padded and translated MNIST training set, in
which each example is an MNIST digit placed randomly on a black background of 40x40 pixels"
and test on affNIST, whose test set is every MNIST test digit under random affine
transformations (32 versions each).

* :func:`pad_split` centres 28x28 digits on a 40x40 canvas (6 pixels each side); with
  :func:`capsnet.data.batches` and ``max_shift=6`` each digit then lands anywhere on the
  canvas without being cut (translation only).
* :class:`AffineTestSet` applies random affine maps to the padded test digits, deterministic
  for a seed, with ``torch.nn.functional.affine_grid`` / ``grid_sample`` (bilinear, zero
  outside) on any device. Ranges (:class:`AffineRanges`), after the affNIST web page
  (T. Tieleman, https://www.cs.toronto.edu/~tijmen/affNIST/), as we recall it:

    rotation     uniform in [-20, 20] degrees
    shear        uniform in [-0.2, 0.2] (horizontal shear factor: x' = x + s * y)
    scale        uniform in [0.8, 1.2], horizontal and vertical drawn independently
    translation  uniform over the positions that keep the whole digit inside 40x40

  The rotation, scale and "stays in the box" ranges are stated on that page; the shear bound
  could not be re-checked when this was written (the page words it as a shear, not as an
  angle), so it is a parameter. This generated set is *affNIST-style*, not affNIST: numbers
  on it are not the paper's 79% / 66%. For those, point :func:`load_affnist` at the real test
  files.
* :func:`load_affnist` reads affNIST ``.mat`` files (MATLAB v5: a struct ``affNISTdata`` with
  ``image`` 1600 x N uint8, one 40x40 image per column in row-major order, and ``label_int``
  1 x N) with ``scipy.io.loadmat``.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor
import torch.nn.functional as F

from .splits import Split
from ..errors import CapsNetError

CANVAS = 40  # affNIST image side
AFFNIST_PIXELS = CANVAS * CANVAS


@dataclass(frozen=True)
class AffineRanges:
    """Bounds of the random affine maps; see the module docstring for where they come from."""

    max_rotation_deg: float = 20.0
    max_shear: float = 0.2
    min_scale: float = 0.8
    max_scale: float = 1.2

    def __post_init__(self) -> None:
        if not 0 <= self.max_rotation_deg <= 180:
            raise CapsNetError(f"max_rotation_deg must be in [0, 180], got {self.max_rotation_deg}")
        if not 0 <= self.max_shear < 10:
            raise CapsNetError(f"max_shear must be in [0, 10), got {self.max_shear}")
        if not 0 < self.min_scale <= self.max_scale:
            raise CapsNetError(f"scales must satisfy 0 < min_scale <= max_scale, got "
                               f"{self.min_scale}, {self.max_scale}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class AffineParams:
    """One affine map per image, in pixels, about the canvas centre (x right, y down).

    The forward map is ``p' = R(rotation) @ H(shear) @ diag(scale_x, scale_y) @ p + t``:
    scale first, then a horizontal shear ``x' = x + shear * y``, then a rotation (positive:
    clockwise on screen, since y points down), then the translation ``t = (tx, ty)``.
    """

    rotation: Tensor  # (n,) radians
    shear: Tensor  # (n,)
    scale_x: Tensor  # (n,)
    scale_y: Tensor  # (n,)
    tx: Tensor  # (n,) pixels, right
    ty: Tensor  # (n,) pixels, down

    @classmethod
    def identity(cls, n: int, device: torch.device | str | None = None) -> "AffineParams":
        zeros, ones = torch.zeros(n, device=device), torch.ones(n, device=device)
        return cls(zeros, zeros.clone(), ones, ones.clone(), zeros.clone(), zeros.clone())

    def linear(self) -> Tensor:
        """The 2x2 linear parts ``(n, 2, 2)``."""
        cos, sin = torch.cos(self.rotation), torch.sin(self.rotation)
        zeros, ones = torch.zeros_like(cos), torch.ones_like(cos)
        rotate = torch.stack([cos, -sin, sin, cos], dim=1).view(-1, 2, 2)
        shear = torch.stack([ones, self.shear, zeros, ones], dim=1).view(-1, 2, 2)
        scale = torch.stack([self.scale_x, zeros, zeros, self.scale_y], dim=1).view(-1, 2, 2)
        return rotate @ shear @ scale

    def __getitem__(self, index: slice | Tensor) -> "AffineParams":
        return AffineParams(*(getattr(self, f)[index] for f in self.__dataclass_fields__))


def pad_images(images: Tensor, canvas: int = CANVAS) -> Tensor:
    """Centre images ``(n, c, s, s)`` on a ``canvas x canvas`` zero background (28 -> 40: 6
    pixels each side)."""
    size = images.shape[-1]
    total = canvas - size
    if total < 0 or images.shape[-2] != size:
        raise CapsNetError(f"cannot centre {tuple(images.shape[-2:])} images on a {canvas}x"
                           f"{canvas} canvas")
    before = total // 2
    return F.pad(images, (before, total - before, before, total - before))


def pad_split(split: Split, canvas: int = CANVAS) -> Split:
    """``split`` with its (uint8) images centred on a ``canvas x canvas`` background."""
    return Split(pad_images(split.images, canvas), split.labels)


def translation_range(split_image_size: int, canvas: int = CANVAS) -> int:
    """Largest shift (pixels, each direction) that keeps a centred digit box on the canvas."""
    return (canvas - split_image_size) // 2


def affine_transform(images: Tensor, params: AffineParams) -> Tensor:
    """Apply ``params`` to float images ``(n, c, h, w)`` (square): bilinear, zeros outside.

    Output pixel centres are mapped back through the inverse map and sampled, so the identity
    map returns the images unchanged.
    """
    n, _, height, width = images.shape
    if height != width:
        raise CapsNetError(f"affine_transform needs square images, got {height}x{width}")
    linear = params.linear().to(images.device, torch.float32)  # forward, pixels
    inverse = torch.linalg.inv(linear)
    # With align_corners=False normalised coordinates are pixels * 2 / size (same both axes).
    t = torch.stack([params.tx, params.ty], dim=1).to(images.device, torch.float32) * (2.0 / width)
    theta = torch.cat([inverse, -(inverse @ t.unsqueeze(-1))], dim=2)  # (n, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def digit_boxes(images: Tensor) -> Tensor:
    """Support of each image's nonzero pixels ``(n, 4)``: x0, x1, y0, y1 in pixel units about
    the canvas centre, widened by half a pixel each side (the reach of bilinear sampling).
    Empty images get a zero box at the centre."""
    n, _, height, width = images.shape
    ink = images.amax(dim=1) > 0  # (n, h, w): any channel
    rows, cols = ink.any(dim=2), ink.any(dim=1)  # (n, h), (n, w)

    def extent(mask: Tensor, size: int) -> tuple[Tensor, Tensor]:
        index = torch.arange(size, device=mask.device)
        first = torch.where(mask, index, size).amin(dim=1)
        last = torch.where(mask, index, -1).amax(dim=1)
        empty = last < 0
        lo = (first - 0.5 - size / 2).float()
        hi = (last + 1.5 - size / 2).float()
        return lo.masked_fill(empty, 0.0), hi.masked_fill(empty, 0.0)

    x0, x1 = extent(cols, width)
    y0, y1 = extent(rows, height)
    return torch.stack([x0, x1, y0, y1], dim=1)


def random_affine_params(images: Tensor, uniforms: Tensor, ranges: AffineRanges) -> AffineParams:
    """Affine maps for ``images`` ``(n, c, s, s)`` from ``uniforms`` ``(n, 6)`` in [0, 1):
    rotation, shear, scales as in ``ranges``; the translation uniform over those that keep
    each digit's (transformed) box on the canvas, or centred when it cannot fit."""
    u = uniforms.to(images.device, torch.float32)
    rotation = (2 * u[:, 0] - 1) * math.radians(ranges.max_rotation_deg)
    shear = (2 * u[:, 1] - 1) * ranges.max_shear
    span = ranges.max_scale - ranges.min_scale
    scale_x = ranges.min_scale + span * u[:, 2]
    scale_y = ranges.min_scale + span * u[:, 3]
    zeros = torch.zeros_like(rotation)
    params = AffineParams(rotation, shear, scale_x, scale_y, zeros, zeros.clone())
    boxes = digit_boxes(images)  # (n, 4)
    x0, x1, y0, y1 = boxes.unbind(dim=1)
    corners = torch.stack([torch.stack([x0, y0], 1), torch.stack([x1, y0], 1),
                           torch.stack([x0, y1], 1), torch.stack([x1, y1], 1)], dim=2)  # (n, 2, 4)
    moved = params.linear() @ corners  # (n, 2, 4)
    half = images.shape[-1] / 2
    lo = -half - moved.amin(dim=2)  # (n, 2): smallest translation keeping the left/top edge in
    hi = half - moved.amax(dim=2)  # largest keeping the right/bottom edge in
    fits = lo <= hi
    t = torch.where(fits, lo + (hi - lo) * u[:, 4:6], (lo + hi) / 2)
    params.tx, params.ty = t[:, 0], t[:, 1]
    return params


class AffineTestSet:
    """Digits of ``split`` centred on a ``canvas`` and transformed by random affine maps.

    Example ``i`` depends only on ``seed`` and ``i`` (its six uniforms are drawn up front on
    the CPU), so the set is the same whatever the batch size or device.
    """

    def __init__(self, split: Split, seed: int, ranges: AffineRanges | None = None,
                 canvas: int = CANVAS, limit: int = 0) -> None:
        self.split = split if not limit else Split(split.images[:limit], split.labels[:limit])
        self.ranges = ranges or AffineRanges()
        self.canvas = canvas
        generator = torch.Generator().manual_seed(seed)
        self.uniforms = torch.rand(len(self.split), 6, generator=generator)

    def __len__(self) -> int:
        return len(self.split)

    def batch(self, lo: int, hi: int, device: torch.device | str | None = None
              ) -> tuple[Tensor, Tensor, AffineParams]:
        """Images ``(b, c, canvas, canvas)`` in [0, 1], labels and the maps of examples lo..hi."""
        images = self.split.images[lo:hi]
        target = torch.device(device) if device is not None else images.device
        images = pad_images(images.to(target).float().div_(255.0), self.canvas)
        params = random_affine_params(images, self.uniforms[lo:hi], self.ranges)
        out = affine_transform(images, params).clamp_(0.0, 1.0)
        return out, self.split.labels[lo:hi].to(target), params

    def batches(self, batch_size: int, device: torch.device | str | None = None
                ) -> Iterator[tuple[Tensor, Tensor]]:
        for lo in range(0, len(self), batch_size):
            images, labels, _ = self.batch(lo, lo + batch_size, device)
            yield images, labels


# ---------------------------------------------------------------------------------------
# The real affNIST test files


def _loadmat(path: Path) -> dict[str, Any]:
    from scipy.io import loadmat  # 0.1 s that the generated data sets do not need

    try:
        return loadmat(str(path))
    except Exception as exc:  # scipy raises several kinds for a bad file
        raise CapsNetError(f"{path}: not a readable MATLAB file ({exc})") from None


def _field(record: Any, name: str, path: Path) -> np.ndarray:
    try:
        return np.asarray(record[name])
    except (KeyError, ValueError, IndexError):
        raise CapsNetError(f"{path}: affNISTdata has no field {name!r}") from None


def read_affnist_file(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Images ``(n, 40, 40)`` uint8 and labels ``(n,)`` int64 of one affNIST ``.mat`` file."""
    path = Path(path)
    mat = _loadmat(path)
    if "affNISTdata" not in mat:
        raise CapsNetError(f"{path}: no affNISTdata variable (found: "
                           f"{', '.join(k for k in mat if not k.startswith('__')) or 'none'})")
    data = mat["affNISTdata"]
    record = data[0, 0] if getattr(data, "ndim", 0) == 2 else data
    image = _field(record, "image", path)
    label = _field(record, "label_int", path).reshape(-1)
    if image.ndim == 1:
        image = image[:, None]
    if image.ndim != 2 or image.shape[0] != AFFNIST_PIXELS:
        raise CapsNetError(f"{path}: image has shape {image.shape}, expected "
                           f"({AFFNIST_PIXELS}, N)")
    if image.shape[1] != label.shape[0]:
        raise CapsNetError(f"{path}: {image.shape[1]} images but {label.shape[0]} labels")
    if label.size and (label.min() < 0 or label.max() > 9):
        raise CapsNetError(f"{path}: labels outside 0..9")
    # One image per column; pixel (row, col) is element row * 40 + col of the column.
    images = np.ascontiguousarray(image.T.reshape(-1, CANVAS, CANVAS)).astype(np.uint8)
    return images, label.astype(np.int64)


def affnist_files(location: str | os.PathLike) -> list[Path]:
    """The ``.mat`` files of ``location``: a file, or a folder holding ``test.mat`` or the
    numbered test batches (``1.mat`` .. ``32.mat``, also inside ``test_batches/``)."""
    path = Path(location)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CapsNetError(f"--affnist-dir {location}: no such file or folder")
    if (path / "test.mat").is_file():
        return [path / "test.mat"]
    for folder in (path, path / "test_batches"):
        numbered = sorted((p for p in folder.glob("*.mat") if p.stem.isdigit()),
                          key=lambda p: int(p.stem))
        if numbered:
            return numbered
    raise CapsNetError(f"--affnist-dir {location}: no test.mat nor numbered test batches "
                       f"(1.mat .. 32.mat) there")


def load_affnist(location: str | os.PathLike, limit: int = 0) -> Split:
    """The affNIST test set at ``location`` (see :func:`affnist_files`) as a uint8
    :class:`Split` ``(n, 1, 40, 40)``; ``limit`` > 0 keeps only the first ``limit`` images
    (files after the limit is reached are not read)."""
    images, labels, total = [], [], 0
    for path in affnist_files(location):
        x, y = read_affnist_file(path)
        images.append(x)
        labels.append(y)
        total += len(y)
        if limit and total >= limit:
            break
    x, y = np.concatenate(images), np.concatenate(labels)
    if limit:
        x, y = x[:limit], y[:limit]
    return Split(torch.from_numpy(x).unsqueeze(1), torch.from_numpy(y))
