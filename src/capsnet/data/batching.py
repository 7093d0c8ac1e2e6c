"""Batches: float images in [0, 1] on any device, in a seeded order with optional random
shifts, crops and rotations or Efficient-CapsNet's augmentation, sharded over ranks, from an
in-memory :class:`Split` (the fast path) or from any ``torch.utils.data.Dataset`` /
``DataLoader``.

A pass is fixed by its seed: the order and every image's transformations are drawn
once for the whole pass, so batch ``start`` onwards (to resume inside an epoch) are exactly
those of an uninterrupted pass, and a Dataset holding the same images as a Split gives the
same batches.
"""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from ..errors import CapsNetError
from ..utils.images import centre_crop
from .augment import (AUGMENTS, Efficient, augment_efficient, check_side, draw_efficient,
                      rotate)
from .splits import Split

Source = Split | Dataset | DataLoader


def batch_positions(n: int, batch_size: int, *, start: int = 0, rank: int = 0,
                    world_size: int = 1, whole: bool = False) -> Iterator[Tensor]:
    """Positions in a pass of ``n`` examples that rank ``rank`` takes, batch by batch.

    Training (``whole=False``): ``batch_size`` is the global batch; each rank takes its own
    ``batch_size // world_size`` slice of every global batch, and with several ranks the last
    incomplete global batch is dropped so every rank takes the same number of steps. With one
    process the last batch may be smaller. Evaluation (``whole=True``): every position once,
    rank ``r`` taking ``r, r + world_size, ...`` in batches of ``batch_size``.
    """
    if whole:
        mine = torch.arange(rank, n, world_size)
        for lo in range(start * batch_size, len(mine), batch_size):
            yield mine[lo:lo + batch_size]
        return
    per_rank = batch_size // world_size
    end = n if world_size == 1 else n - n % batch_size
    for first in range(start * batch_size, end, batch_size):
        lo = first + rank * per_rank
        hi = min(first + batch_size, n) if world_size == 1 else lo + per_rank
        yield torch.arange(lo, hi)


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Number of training batches :func:`batches` yields for ``n`` images."""
    return -(-n // batch_size) if world_size == 1 else n // batch_size


def shift_images(images: Tensor, offsets: Tensor, max_shift: int) -> Tensor:
    """Translate each image's content by ``max_shift - offsets`` pixels (down/right when
    positive), filling with zeros.

    ``images``: ``(batch, channels, height, width)``; ``offsets``: ``(2, batch)`` integers in
    ``[0, 2 * max_shift]`` (rows, then columns), on the same device.
    """
    batch, channels, height, width = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)
    rows = offsets[0, :, None] + torch.arange(height, device=device)  # (batch, height)
    cols = offsets[1, :, None] + torch.arange(width, device=device)  # (batch, width)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return padded[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


def crop_images(images: Tensor, offsets: Tensor, size: int) -> Tensor:
    """The ``size`` x ``size`` window of each image whose top-left corner is at ``offsets``
    ``(2, batch)`` (rows, then columns)."""
    batch, channels = images.shape[:2]
    device = images.device
    rows = offsets[0, :, None] + torch.arange(size, device=device)  # (batch, size)
    cols = offsets[1, :, None] + torch.arange(size, device=device)
    batch_index = torch.arange(batch, device=device)[:, None, None, None]
    channel_index = torch.arange(channels, device=device)[None, :, None, None]
    return images[batch_index, channel_index, rows[:, None, :, None], cols[:, None, None, :]]


class PassPlan(NamedTuple):
    """What a pass draws for its ``n`` positions; None where it draws nothing of that kind."""

    order: Tensor  # (n,) the source's index at each position
    offsets: Tensor | None  # (2, n) shift offsets in [0, 2 * max_shift], rows then columns
    corners: Tensor | None  # (2, n) crop corners in [0, crop_room]
    efficient: Efficient | None  # Efficient-CapsNet's augmentation
    degrees: Tensor | None  # (n,) counter-clockwise rotations in [-rotation, rotation]


def pass_plan(n: int, seed: int | None, max_shift: int, crop_room: int = 0,
              efficient: bool = False, rotation: float = 0.0) -> PassPlan:
    """A pass's order and transformations, shuffled and drawn from ``seed``; in file order,
    unshifted, centre-cropped (by the caller), unrotated and unaugmented without one."""
    if seed is None:
        return PassPlan(torch.arange(n), None, None, None, None)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    offsets = (torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
               if max_shift > 0 else None)
    corners = (torch.randint(0, crop_room + 1, (2, n), generator=generator)
               if crop_room > 0 else None)
    # each drawn after all that existed before it, so that passes without it draw what
    # they drew then
    augment = draw_efficient(n, generator) if efficient else None
    degrees = ((torch.rand(n, generator=generator) * 2 - 1) * rotation
               if rotation > 0 else None)
    return PassPlan(order, offsets, corners, augment, degrees)


def batches(source: Source, batch_size: int, *, seed: int | None = None, max_shift: int = 0,
            augment: str = "shift", crop: int = 0, rotation: float = 0.0, start: int = 0,
            device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
            whole: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(images, labels)`` batches of ``source``: float images in [0, 1]
    ``(batch, C, H, W)`` on ``device``, int64 labels ``(batch,)``.

    With a ``seed`` the order is shuffled and each image shifted by up to ``max_shift``
    pixels or, with ``augment="efficient"``, rotated, shifted, squeezed and erased as
    Efficient-CapsNet's MNIST training does (:mod:`capsnet.data.augment`; ``max_shift``
    unused), all drawn for the pass by :func:`pass_plan`; without one the order is the
    source's and nothing is changed. ``crop`` > 0 cuts a ``crop`` x ``crop`` window out of
    each image: at a random place with a seed, in the centre without one. ``rotation``
    turns each (cropped) image about its centre by a uniform angle within that many degrees
    either way, with a seed and the shift augmentation.

    Ranks and ``whole`` as in :func:`batch_positions`. A :class:`Split` is cut on the device
    it lives on, then moved; a Dataset's items (an image tensor, uint8 or float in [0, 1],
    and a label) are collated by a DataLoader, with a DataLoader's workers and collate
    function when one is given.
    """
    n = source_length(source)
    height, side = example_shape(source)[-2:]
    if crop > side:
        raise CapsNetError(f"cannot crop {crop}x{crop} out of {side}x{side} images")
    if augment not in AUGMENTS:
        raise CapsNetError(f"augment must be one of {', '.join(AUGMENTS)}, got {augment!r}")
    if not 0 <= rotation <= 180:
        raise CapsNetError(f"rotation must be 0 to 180 degrees, got {rotation}")
    efficient = augment == "efficient"
    if efficient and seed is not None:
        check_side(height, side)
    order, offsets, corners, plan, degrees = pass_plan(
        n, seed, 0 if efficient else max_shift, side - crop if crop else 0, efficient,
        0.0 if efficient else rotation)
    positions = list(batch_positions(n, batch_size, start=start, rank=rank,
                                     world_size=world_size, whole=whole))
    if isinstance(source, Split):
        target = torch.device(device) if device is not None else source.images.device
        order = order.to(source.images.device)

        def cut(p: Tensor) -> tuple[Tensor, Tensor]:
            index = order[p.to(order.device)]
            return (source.images[index].to(target, non_blocking=True),
                    source.labels[index].to(target, non_blocking=True))

        loaded: Iterator[tuple[Tensor, Tensor]] = map(cut, positions)
    else:
        target = torch.device(device) if device is not None else torch.device("cpu")
        loaded = loader_batches(source, [order[p].tolist() for p in positions], target)
    offsets = offsets.to(target) if offsets is not None else None
    corners = corners.to(target) if corners is not None else None
    plan = plan.to(target) if plan is not None else None
    degrees = degrees.to(target) if degrees is not None else None
    for p, (images, labels) in zip(positions, loaded):
        images = to_unit_float(images)
        if offsets is not None:
            images = shift_images(images, offsets[:, p.to(target)], max_shift)
        if plan is not None:
            images = augment_efficient(images, plan.at(p.to(target)))
        if corners is not None:
            images = crop_images(images, corners[:, p.to(target)], crop)
        elif crop:
            images = centre_crop(images, crop)
        if degrees is not None:
            images = rotate(images, degrees[p.to(target)])
        yield images, labels


def loader_batches(source: Dataset | DataLoader, index_lists: list[list[int]],
                   device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """The batches of ``source`` holding the items of each of ``index_lists``, on ``device``."""
    options: dict[str, Any] = {}
    dataset = source
    if isinstance(source, DataLoader):
        dataset = source.dataset
        options = {"num_workers": source.num_workers, "collate_fn": source.collate_fn,
                   "pin_memory": source.pin_memory}
    loader = DataLoader(dataset, batch_sampler=index_lists, **options)
    for batch in loader:
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise CapsNetError("a data set item must be (image, label)")
        images, labels = batch
        yield (torch.as_tensor(images).to(device, non_blocking=True),
               torch.as_tensor(labels).long().to(device, non_blocking=True))


def to_unit_float(images: Tensor) -> Tensor:
    """uint8 pixels scaled to [0, 1]; floating-point images as they are (as float32)."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def source_length(source: Source) -> int:
    """Number of examples of ``source`` (a DataLoader's length counts its batches)."""
    return len(source.dataset) if isinstance(source, DataLoader) else len(source)


def example_shape(source: Source) -> tuple[int, ...]:
    """``(channels, height, width)`` of the source's images."""
    if isinstance(source, Split):
        return tuple(source.images.shape[1:])
    dataset = source.dataset if isinstance(source, DataLoader) else source
    if len(dataset) == 0:
        raise CapsNetError("the data set is empty")
    image = torch.as_tensor(dataset[0][0])
    if image.dim() != 3:
        raise CapsNetError(f"a data set image must be (channels, height, width), got "
                           f"{tuple(image.shape)}")
    return tuple(image.shape)
