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

from .splits import Split, shift_images
from ..errors import CapsNetError
from ..nn.layers import safe_norm
from ..nn.losses import Reduction, margin_loss, reconstruction_loss

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
                device: torch.device | str | None = None) -> Iterator[MultiMNISTBatch]:
        """Yield the batches of the pass with ``seed`` from batch ``start`` on."""
        plan = self.plan(seed, size)
        for lo in range(start * batch_size, len(plan), batch_size):
            hi = lo + batch_size
            yield self.compose(plan.first[lo:hi], plan.second[lo:hi],
                               plan.offsets[:, :, lo:hi], device)


def overlay_digits(digits: Tensor, overlay: Overlay = "max") -> Tensor:
    """Overlay the digit images ``(batch, k, c, h, w)`` in [0, 1] into ``(batch, c, h, w)``:
    pixel-wise maximum (``"max"``) or sum clipped at 1 (``"sum"``, the official script)."""
    if overlay == "max":
        return digits.amax(dim=1)
    if overlay == "sum":
        return digits.sum(dim=1).clamp_(max=1.0)
    raise CapsNetError(f"overlay must be one of {', '.join(OVERLAYS)}, got {overlay!r}")


def presence(labels: Tensor, num_classes: int) -> Tensor:
    """0/1 matrix ``(batch, classes)`` of the classes in ``labels`` ``(batch, k)``."""
    return F.one_hot(labels, num_classes).amax(dim=1)


def multimnist_loss(lengths: Tensor, reconstructions: Tensor, digits: Tensor, labels: Tensor,
                    reconstruction_weight: float = 0.0005, reduction: Reduction = "sum"
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Loss with two targets (paper, section 6): margin loss with both classes present, plus
    ``weight`` times the sum of the reconstruction losses of the two digits, each decoded
    from its own class's capsule and compared with that digit's own shifted image.

    ``lengths`` ``(batch, classes)``; ``reconstructions`` and ``digits``
    ``(batch, 2, c, h, w)``; ``labels`` ``(batch, 2)``. Returns (total, margin,
    reconstruction) where reconstruction is ``recon1 + recon2`` (each a mean over the batch).
    """
    margin = margin_loss(lengths, presence(labels, lengths.shape[1]))
    recon = (reconstruction_loss(reconstructions[:, 0], digits[:, 0], reduction)
             + reconstruction_loss(reconstructions[:, 1], digits[:, 1], reduction))
    return margin + reconstruction_weight * recon, margin, recon


def two_digit_forward(model, images: Tensor, classes: Tensor) -> tuple[Tensor, Tensor]:
    """Capsule lengths ``(batch, classes)`` and the reconstructions ``(batch, 2, c, h, w)``
    of ``model`` (a CapsNet) masked by each column of ``classes`` ``(batch, 2)`` in turn."""
    digit_caps, _ = model.capsules(images)
    lengths = safe_norm(digit_caps)
    batch = len(images)
    # One decoder pass for both digits: (2b, ...) then back to (b, 2, ...).
    recon = model.reconstruct(torch.cat([digit_caps, digit_caps]),
                              torch.cat([classes[:, 0], classes[:, 1]]))
    recon = recon.view(2, batch, *recon.shape[1:]).transpose(0, 1)
    return lengths, recon


def top2(lengths: Tensor) -> Tensor:
    """The classes of the two longest capsules ``(batch, 2)``, longest first."""
    return lengths.topk(2, dim=1).indices


def top2_correct(lengths: Tensor, labels: Tensor) -> Tensor:
    """Paper's MultiMNIST criterion: an example is correct when its two longest capsules are
    exactly its two classes, in either order. ``lengths`` ``(batch, classes)``; ``labels``
    ``(batch, 2)``. Returns a bool tensor ``(batch,)``.

    Ties are decided against the model: both true classes must be strictly longer than every
    other capsule (a false class tied with a true one for second place is an error).
    """
    true_lengths = lengths.gather(1, labels)  # (batch, 2)
    others = lengths.scatter(1, labels, float("-inf"))
    return true_lengths.amin(dim=1) > others.amax(dim=1)
