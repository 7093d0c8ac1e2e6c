"""Margin loss and reconstruction loss of the CapsNet paper."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

Reduction = Literal["sum", "mean"]
MarginForm = Literal["paper", "official"]
REDUCTIONS = ("sum", "mean")
MARGIN_FORMS = ("paper", "official")
NO_CLASS = -1  # the label of an image of none of the classes


def margin_loss(lengths: Tensor, targets: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5, form: MarginForm = "paper") -> Tensor:
    """Paper eq. 4, summed over classes and averaged over the batch.

    ``lengths``: capsule lengths ``(batch, classes)``. ``targets``: class indices
    ``(batch,)``, or a presence matrix ``(batch, classes)`` of 0/1 when several classes
    can be present (MultiMNIST). ``form="official"`` is the official code's
    ``_margin_loss``: half of eq. 4, averaged over classes as well as the batch, so
    ``1 / (2 * classes)`` of the paper's value; a reconstruction term of the same weight
    counts ``2 * classes`` times as much beside it.
    """
    if targets.dim() == 1:
        present = F.one_hot(targets, lengths.shape[1]).to(lengths.dtype)
    else:
        present = targets.to(lengths.dtype)
    present_loss = present * torch.relu(m_plus - lengths).square()
    absent_loss = lambda_ * (1.0 - present) * torch.relu(lengths - m_minus).square()
    per_class = present_loss + absent_loss  # (batch, classes)
    if form == "paper":
        return per_class.sum(dim=1).mean()
    if form == "official":
        return 0.5 * per_class.mean()
    raise ValueError(f"form must be 'paper' or 'official', got {form!r}")


def reconstruction_loss(reconstructions: Tensor, images: Tensor,
                        reduction: Reduction = "sum", rows: Tensor | None = None) -> Tensor:
    """Squared error between decoder output and input, averaged over the batch.

    ``reduction="sum"`` sums over the pixels of an image, as the paper and its official
    code do; ``reduction="mean"`` averages over them, as the notebook does, which is
    ``pixels`` (784 for MNIST) times weaker at the same weight. ``rows`` ``(batch,)`` bool:
    only those images count (an image of no class has nothing to reconstruct).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if reconstructions.numel() == 0:  # a model without a decoder
        return reconstructions.new_zeros(())
    per_pixel = (reconstructions.flatten(1) - images.flatten(1)).square()  # (batch, pixels)
    if rows is None:
        return per_pixel.sum(dim=1).mean() if reduction == "sum" else per_pixel.mean()
    per_image = per_pixel.sum(dim=1) if reduction == "sum" else per_pixel.mean(dim=1)
    return (per_image * rows).sum() / rows.sum().clamp(min=1)


def capsule_loss(lengths: Tensor, reconstructions: Tensor, images: Tensor, targets: Tensor,
                 reconstruction_weight: float = 0.0005, reduction: Reduction = "sum",
                 margin_form: MarginForm = "paper", rows: Tensor | None = None
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """Total loss ``margin + weight * reconstruction``; returns (total, margin, reconstruction).
    ``targets`` as :func:`margin_loss` takes them; ``rows`` as :func:`reconstruction_loss`."""
    margin = margin_loss(lengths, targets, form=margin_form)
    recon = reconstruction_loss(reconstructions, images, reduction, rows)
    return margin + reconstruction_weight * recon, margin, recon


def with_no_class(labels: Tensor, classes: int) -> tuple[Tensor, Tensor]:
    """Class indices where :data:`NO_CLASS` marks an image of none of the classes, as the
    margin loss's presence matrix ``(batch, classes)`` (a row of zeros: every capsule
    absent) and the rows that have something to reconstruct ``(batch,)``."""
    rows = labels != NO_CLASS
    return F.one_hot(labels.clamp(min=0), classes) * rows[:, None], rows
