"""Efficient-CapsNet's MNIST augmentation (Mazzia et al. 2021, as its official code applies it
to each training image): a rotation, a shift that keeps the digit in the frame, a squeeze and
an erased 4x4 patch, in that order.

Its random parameters are drawn for a whole pass at once from the pass's generator
(:func:`draw_efficient`), so they are fixed by the pass's seed; :func:`augment_efficient`
applies a batch's parameters to that batch with vectorised ops on the batch's device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import CapsNetError

AUGMENTS = ("shift", "efficient")
MAX_DEGREES = 30.0
SPREAD = 0.33  # the standard deviation of the normal draws, as fractions of their range
NEARLY_ONE = 0.9999  # a draw's cap: never the whole range
PATCH = 4  # the erased square's side
PATCH_FIRST = 4  # the first row (and column) its corner may take
MIN_SIDE = 10  # the smallest image with room for the patch's corner: 4 .. side - 6


@dataclass(frozen=True)
class Efficient:
    """The parameters of a pass's images (:func:`draw_efficient`), in [0, 1) unless said
    otherwise."""

    degrees: Tensor  # (n,) whole degrees in [-29, 29], counter-clockwise; 0: not rotated
    shift: Tensor  # (2, n) rows, columns: the share of the room moved, in (-1, 1); < 0: up/left
    squeeze: Tensor  # (n,) the share of a quarter of the width taken off
    nudge: Tensor  # (n,) >= 0.5: the squeezed image one column further right
    erase: Tensor  # (2, n) rows, columns: where the patch's corner lies in its range

    def to(self, device: torch.device) -> "Efficient":
        return Efficient(*(getattr(self, f.name).to(device) for f in fields(self)))

    def at(self, positions: Tensor) -> "Efficient":
        """The parameters of the images at ``positions``."""
        return Efficient(*(getattr(self, f.name)[..., positions] for f in fields(self)))


def draw_efficient(n: int, generator: torch.Generator) -> Efficient:
    """The parameters of ``n`` images, drawn from ``generator`` in a fixed order."""
    rotated = torch.rand(n, generator=generator) < 0.5
    # whole degrees, as the official code passes int(angle) to OpenCV
    degrees = (MAX_DEGREES * clipped_normal(n, generator=generator)).trunc() * rotated
    amount = clipped_normal(2, n, generator=generator).abs()
    forward = torch.rand(2, n, generator=generator) < 0.5
    shift = torch.where(forward, amount, -amount)
    squeeze = clipped_normal(n, generator=generator).abs()
    nudge = torch.rand(n, generator=generator)
    erase = torch.rand(2, n, generator=generator)
    return Efficient(degrees, shift, squeeze, nudge, erase)


def clipped_normal(*shape: int, generator: torch.Generator) -> Tensor:
    """N(0, 0.33) draws of ``shape`` clipped to (-1, 1)."""
    return (torch.randn(*shape, generator=generator) * SPREAD).clamp(-NEARLY_ONE, NEARLY_ONE)


def check_side(height: int, width: int) -> None:
    """Refuse images too small for the erased patch's range."""
    if min(height, width) < MIN_SIDE:
        raise CapsNetError(f"--augment efficient needs images of at least {MIN_SIDE}x"
                           f"{MIN_SIDE} pixels, got {height}x{width}")


def augment_efficient(images: Tensor, plan: Efficient) -> Tensor:
    """``images`` ``(batch, C, H, W)`` rotated, shifted, squeezed and erased as ``plan``
    (the batch's parameters, on the images' device) says."""
    images = rotate(images, plan.degrees)
    images = shift_inside(images, plan.shift)
    images = squeeze(images, plan.squeeze, plan.nudge)
    return erase(images, plan.erase)


def rotate(images: Tensor, degrees: Tensor) -> Tensor:
    """Each image rotated counter-clockwise about its centre by ``degrees`` ``(batch,)``,
    bilinear, zero filled; images with 0 are left exactly as they are."""
    radians = degrees * (math.pi / 180)
    cos, sin, zero = radians.cos(), radians.sin(), torch.zeros_like(radians)
    # affine_grid maps each output pixel to where it samples the input: rotating the
    # sampling points clockwise (y points down) turns the content counter-clockwise.
    theta = torch.stack([torch.stack([cos, -sin, zero], -1),
                         torch.stack([sin, cos, zero], -1)], -2)  # (batch, 2, 3)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    turned = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                           align_corners=False)
    return torch.where((degrees != 0)[:, None, None, None], turned, images)


def shift_inside(images: Tensor, shift: Tensor) -> Tensor:
    """Each image's content moved by a share ``shift`` ``(2, batch)`` of the blank rows and
    columns on the side it moves to (down/right: of one more; rounded down, as the official
    code does, so up/left moves round away from zero), so the ink stays inside the frame."""
    batch, channels, height, width = images.shape
    device = images.device
    ink = images.ne(0).any(1)  # (batch, H, W)
    moves = []
    for axis, lines in enumerate((ink.any(2), ink.any(1))):  # (batch, H), (batch, W)
        # argmax finds the first True; a blank image has no room and stays where it is
        before, after = lines.int().argmax(1), lines.flip(1).int().argmax(1)
        room = torch.where(shift[axis] < 0, before, after + 1)
        moves.append((shift[axis] * room).floor().long())  # (batch,) never past the room
    # A cyclic shift: what wraps round is blank, as no move is larger than its room.
    rows = (torch.arange(height, device=device) - moves[0][:, None]) % height  # (batch, H)
    cols = (torch.arange(width, device=device) - moves[1][:, None]) % width  # (batch, W)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return images[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def squeeze(images: Tensor, amount: Tensor, nudge: Tensor) -> Tensor:
    """Each image resampled (antialiased Lanczos-3, as the official code's
    ``tf.image.resize``) to ``W - w`` columns, where ``w = floor(amount * W / 4) + 1``, and
    placed at column ``w // 2 + floor(2 * nudge)`` of a blank ``W``-column image; clipped
    to [0, 1], which Lanczos overshoots at sharp edges."""
    width = images.shape[-1]
    dropped = (amount * (width / 4)).floor().long() + 1  # (batch,)
    first = dropped // 2 + (2 * nudge).floor().long()
    matrix = squeeze_matrix(width, dropped, first)
    return torch.einsum("bchj,bkj->bchk", images, matrix).clamp(0, 1)


def squeeze_matrix(width: int, dropped: Tensor, first: Tensor) -> Tensor:
    """``(batch, W, W)``: row k holds the weights of the input columns that output column k
    takes: Lanczos-3 widened by the scale (antialiased, as PIL and TensorFlow resample),
    normalised, and zero outside the squeezed image."""
    kept = (width - dropped).float()[:, None, None]  # (batch, 1, 1)
    scale = width / kept
    column = torch.arange(width, device=dropped.device, dtype=torch.float32)
    resampled = column[None, :, None] - first[:, None, None]  # (batch, W, 1) squeezed column
    centre = (resampled + 0.5) * scale  # in input pixels
    weights = lanczos3((column[None, None, :] + 0.5 - centre) / scale)  # (batch, W, W)
    inside = (resampled >= 0) & (resampled < kept)  # elsewhere the weights sum to 0
    return torch.where(inside, weights / weights.sum(-1, keepdim=True), 0.0)


def lanczos3(x: Tensor) -> Tensor:
    """The Lanczos kernel of radius 3: sinc(x) sinc(x / 3) inside (-3, 3), else 0."""
    return torch.sinc(x) * torch.sinc(x / 3) * (x.abs() < 3)


def erase(images: Tensor, where: Tensor) -> Tensor:
    """Each image with one 4x4 patch zeroed, its corner's row and column at
    ``4 + floor(where * (side - 9))`` (4 .. 22 on 28x28), ``where`` ``(2, batch)``."""
    height, width = images.shape[-2:]
    device = images.device
    corner = [PATCH_FIRST + (where[axis] * (side - PATCH_FIRST - PATCH - 1)).floor().long()
              for axis, side in enumerate((height, width))]  # each (batch,)
    rows = torch.arange(height, device=device) - corner[0][:, None]  # (batch, H)
    cols = torch.arange(width, device=device) - corner[1][:, None]  # (batch, W)
    patch = (((rows >= 0) & (rows < PATCH))[:, :, None]
             & ((cols >= 0) & (cols < PATCH))[:, None, :])  # (batch, H, W)
    return images.masked_fill(patch[:, None], 0)
