"""Margin loss and reconstruction loss of the CapsNet paper."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
import torch.nn.functional as F

Reduction = Literal["sum", "mean"]


def margin_loss(lengths: Tensor, targets: Tensor, m_plus: float = 0.9, m_minus: float = 0.1,
                lambda_: float = 0.5) -> Tensor:
    """Paper eq. 4, summed over classes and averaged over the batch.

    ``lengths``: capsule lengths ``(batch, classes)``. ``targets``: class indices
    ``(batch,)``, or a presence matrix ``(batch, classes)`` of 0/1 when several classes
    can be present (MultiMNIST).
    """
    if targets.dim() == 1:
        present = F.one_hot(targets, lengths.shape[1]).to(lengths.dtype)
    else:
        present = targets.to(lengths.dtype)
    present_loss = present * torch.relu(m_plus - lengths).square()
    absent_loss = lambda_ * (1.0 - present) * torch.relu(lengths - m_minus).square()
    return (present_loss + absent_loss).sum(dim=1).mean()


def reconstruction_loss(reconstructions: Tensor, images: Tensor,
                        reduction: Reduction = "sum") -> Tensor:
    """Squared error between decoder output and input, averaged over the batch.

    ``reduction="sum"`` sums over the pixels of an image, as the paper and its official
    code do; ``reduction="mean"`` averages over them, as the notebook does, which is
    ``pixels`` (784 for MNIST) times weaker at the same weight.
    """
    per_pixel = (reconstructions.flatten(1) - images.flatten(1)).square()  # (batch, pixels)
    if reduction == "sum":
        return per_pixel.sum(dim=1).mean()
    if reduction == "mean":
        return per_pixel.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


def capsule_loss(lengths: Tensor, reconstructions: Tensor, images: Tensor, targets: Tensor,
                 reconstruction_weight: float = 0.0005,
                 reduction: Reduction = "sum") -> tuple[Tensor, Tensor, Tensor]:
    """Total loss ``margin + weight * reconstruction``; returns (total, margin, reconstruction)."""
    margin = margin_loss(lengths, targets)
    recon = reconstruction_loss(reconstructions, images, reduction)
    return margin + reconstruction_weight * recon, margin, recon
