"""MultiMNIST: two overlapping digits of different classes, generated on the fly.

Sabour et al. (2017, section 6) build each MultiMNIST example from two MNIST digits of
different classes taken from the same set (training digits for training, test digits for
testing). Each 28x28 digit is padded to 36x36 and shifted by up to 4 pixels in each
direction, independently, and the two shifted digits are overlaid.

Overlay: ``"max"`` (the default here) takes the pixel-wise maximum of the two digit images;
``"sum"`` adds them and clips at 1 (255), which is what the paper's official generation script
(``mnist_shift.py``: ``np.minimum(base + top, 255)``) does. The two differ only where strokes
overlap.

Nothing is stored: :class:`MultiMNIST` draws, from a seed, one plan per pass (which digit is
the first of each example, which digit of another class is the second, and the four shifts)
and cuts batches from it on any device, as :func:`capsnet.data.batches` does for single
digits. Example ``i`` of a pass depends only on the seed and ``i``, so a pass can be resumed
from any batch and the test set is the same on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal, NamedTuple

import torch
from torch import Tensor
import torch.nn.functional as F

from ..errors import CapsNetError
from .batching import batch_positions, shift_images
from .splits import Split

Overlay = Literal["max", "sum"]
OVERLAYS = ("max", "sum")
MAX_SHIFT = 4  # pixels, each direction, each digit (paper)


class MultiMNISTBatch(NamedTuple):
    images: Tensor  # (batch, channels, canvas, canvas) float in [0, 1]: the overlaid pair
    labels: Tensor  # (batch, 2) int64: the classes of the two digits, always different
    digits: Tensor  # (batch, 2, channels, canvas, canvas): each shifted digit alone


@dataclass
class Plan:
    """Which digits and shifts make up the examples of one pass (all on the CPU)."""

    first: Tensor  # (n,) index of the first digit of each example
    second: Tensor  # (n,) index of the second digit, always of another class
    offsets: Tensor  # (2 digits, 2 axes, n) in [0, 2 * max_shift], see data.shift_images

    def __len__(self) -> int:
        return len(self.first)


class MultiMNIST:
    """MultiMNIST examples made from the single digits of ``split`` (uint8, square).

    The canvas is ``image_size + 2 * max_shift`` (36 for MNIST). Each pass with a seed uses
    every digit of ``split`` once as the first digit, in a shuffled order, and pairs it with
    a digit drawn uniformly among the digits of the other classes (as the official script
    does); each digit is shifted by ``-max_shift .. max_shift`` pixels on each axis.
    """

    def __init__(self, split: Split, max_shift: int = MAX_SHIFT, overlay: Overlay = "max",
                 num_classes: int | None = None) -> None:
        if overlay not in OVERLAYS:
            raise CapsNetError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
        if max_shift < 0:
            raise CapsNetError(f"max_shift must be >= 0, got {max_shift}")
        if len(split) == 0:
            raise CapsNetError("MultiMNIST needs at least two digits of different classes")
        self.split = split
        self.max_shift = max_shift
        self.overlay = overlay
        labels = split.labels.cpu()
        classes = int(labels.max()) + 1
        self.num_classes = num_classes or classes
        self.by_class = torch.argsort(labels, stable=True)  # digit indices grouped by class
        self.counts = torch.bincount(labels, minlength=self.num_classes)
        self.starts = torch.cumsum(self.counts, 0) - self.counts
        if int((self.counts > 0).sum()) < 2:
            raise CapsNetError(f"MultiMNIST needs digits of at least two classes; these "
                               f"{len(split)} digits are all of class {int(labels[0])}")
        self.labels = labels

    @property
    def canvas(self) -> int:
        return self.split.images.shape[-1] + 2 * self.max_shift

    def __len__(self) -> int:
        return len(self.split)

    def plan(self, seed: int, size: int | None = None) -> Plan:
        """The examples of a pass with ``seed``: ``size`` (default ``len(self)``) examples.

        The pass runs in rounds of ``len(self)`` examples; each round uses every digit once
        as the first digit, in a shuffled order. Every round draws the same amount from the
        generator, so example ``i`` depends only on ``seed`` and ``i``, never on ``size``.
        """
        n = len(self)
        size = n if size is None else size
        generator = torch.Generator().manual_seed(seed)
        rounds = [self._round(generator) for _ in range(-(-size // n))]
        first, second, offsets = (torch.cat(parts, dim=-1)[..., :size] for parts in zip(*rounds))
        return Plan(first, second, offsets)

    def _round(self, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        n = len(self)
        first = torch.randperm(n, generator=generator)
        # Second digit: uniform over the digits whose class differs from the first's. Number
        # the other-class digits 0 .. n - count - 1 in class order, skipping the first's block.
        first_class = self.labels[first]
        others = n - self.counts[first_class]  # (n,)
        k = (torch.rand(n, generator=generator, dtype=torch.float64) * others).long()
        k = torch.minimum(k, others - 1)
        k = k + self.counts[first_class] * (k >= self.starts[first_class])
        second = self.by_class[k]
        offsets = torch.randint(0, 2 * self.max_shift + 1, (2, 2, n), generator=generator)
        return first, second, offsets

    def compose(self, first: Tensor, second: Tensor, offsets: Tensor,
                device: torch.device | str | None = None) -> MultiMNISTBatch:
        """Build the examples of digit indices ``first``, ``second`` ``(batch,)`` with
        ``offsets`` ``(2, 2, batch)`` on ``device`` (default: where the split lives)."""
        images = self.split.images
        target = torch.device(device) if device is not None else images.device
        batch = len(first)
        index = torch.cat([first, second]).to(images.device)
        digits = images[index].to(target, non_blocking=True).float().div_(255.0)  # (2b, c, s, s)
        m = self.max_shift
        digits = F.pad(digits, (m, m, m, m))  # centred on the canvas
        if m > 0:
            both = offsets.to(target).permute(1, 0, 2).reshape(2, 2 * batch)  # (axes, 2b)
            digits = shift_images(digits, both, m)
        digits = digits.view(2, batch, *digits.shape[1:]).transpose(0, 1)  # (b, 2, c, S, S)
        labels = torch.stack([self.labels[first], self.labels[second]], dim=1).to(target)
        return MultiMNISTBatch(overlay_digits(digits, self.overlay), labels, digits)

    def batches(self, batch_size: int, seed: int, *, size: int | None = None, start: int = 0,
                device: torch.device | str | None = None, rank: int = 0, world_size: int = 1,
                whole: bool = False) -> Iterator[MultiMNISTBatch]:
        """Yield the batches of the pass with ``seed`` from batch ``start`` on; ranks and
        ``whole`` as in :func:`capsnet.data.batch_positions`."""
        plan = self.plan(seed, size)
        for p in batch_positions(len(plan), batch_size, start=start, rank=rank,
                                 world_size=world_size, whole=whole):
            yield self.compose(plan.first[p], plan.second[p], plan.offsets[:, :, p], device)


def overlay_digits(digits: Tensor, overlay: Overlay = "max") -> Tensor:
    """Overlay the digit images ``(batch, k, c, h, w)`` in [0, 1] into ``(batch, c, h, w)``:
    pixel-wise maximum (``"max"``) or sum clipped at 1 (``"sum"``, the official script)."""
    if overlay == "max":
        return digits.amax(dim=1)
    if overlay == "sum":
        return digits.sum(dim=1).clamp_(max=1.0)
    raise CapsNetError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")
