"""Images of none of the classes, for teaching a model to answer "none".

A classifier trained only on digits has never seen an image without one, and nothing in its
loss says what to do with it: the paper preset's MNIST model calls random noise an "8" with
a capsule length of 0.85. The margin loss can say it: an image with no class present has
every capsule's target below 0.1. Training batches then carry a share of such images
(``--none-fraction``), as outlier exposure does (Hendrycks, Mazeika and Dietterich, ICLR
2019), here with generated ones: noise of three kinds and flat grey, as they come and, for a
model that prepares its inputs as MNIST digits, as that preparation turns such a photo into
the network's input (a box or blob filling the digit's frame).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from ..errors import CapsNetError
from ..utils.images import centre_crop, load_image

KINDS = ("uniform", "gaussian", "sparse", "flat")
POOL_BYTES = 64 * 2**20  # a run's pool of none images takes at most this much memory
POOL_SIZE = 4096


def pool_size(size: int, channels: int) -> int:
    """How many none images a run draws from: :data:`POOL_SIZE`, fewer for large images."""
    return max(64, min(POOL_SIZE, POOL_BYTES // (size * size * channels)))


def raw_none_image(kind: str, size: int, channels: int, rng: np.random.Generator) -> np.ndarray:
    """One image of ``kind`` ``(size, size, channels)`` in [0, 1], its strength random."""
    shape = (size, size, channels)
    if kind == "uniform":
        return rng.random(shape) * rng.uniform(0.3, 1.0)
    if kind == "gaussian":
        return np.clip(rng.normal(rng.uniform(0.2, 0.7), rng.uniform(0.05, 0.3), shape), 0, 1)
    if kind == "sparse":
        return (rng.random(shape) < rng.uniform(0.02, 0.4)) * rng.uniform(0.5, 1.0)
    if kind == "flat":
        return np.full(shape, rng.uniform(0.0, 1.0))
    raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {kind!r}")


def none_images(count: int, size: int, channels: int, seed: int | tuple[int, ...],
                prepared: bool) -> Tensor:
    """``count`` uint8 images ``(count, channels, size, size)`` of no class, the same for the
    same arguments: the kinds in turn; with ``prepared``, every other one as
    :func:`~capsnet.utils.images.load_image` prepares a photo for an MNIST model (a flat
    image has no ink to find, so it is never prepared)."""
    rng = np.random.default_rng(seed)
    images = np.empty((count, channels, size, size), dtype=np.uint8)
    for index in range(count):
        kind = KINDS[index % len(KINDS)]
        pixels = raw_none_image(kind, size, channels, rng)
        plane = pixels.transpose(2, 0, 1)  # (channels, size, size)
        if prepared and channels == 1 and kind != "flat" and index // len(KINDS) % 2:
            try:
                plane = load_image((pixels[:, :, 0] * 255).astype(np.uint8), size, channels)
            except CapsNetError:  # no ink stands out: the image stays as it came
                pass
        images[index] = np.rint(plane * 255)
    return torch.from_numpy(images)


def run_pool(size: int, channels: int, seed: int, prepared: bool, part: str,
             crop_from: int = 0) -> Tensor:
    """A run's pool of images of no class: those its batches draw from (``part="train"``), or
    those its test measures (``"test"``), drawn apart from them; both fixed by the run's
    ``seed``. A run on crops (``crop_from``: the side of the images they are cut from) makes
    them at that side and keeps their centre ``size`` window, as its model prepares a photo."""
    side = crop_from or size
    images = none_images(pool_size(side, channels), side, channels,
                         seed=(seed, ("train", "test").index(part)), prepared=prepared)
    return centre_crop(images, size).contiguous()
