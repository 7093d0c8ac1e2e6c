"""Loss, accuracy and confusion matrix of a model on a data split."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..data import Split, batches
from ..utils.distributed import World, all_reduce_sum
from ..errors import CapsNetError
from ..nn.losses import capsule_loss
from ..nn.model import CapsNet


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CapsNetError("--device cuda: no CUDA device is available (use cpu or auto)")
    return torch.device(device)


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision="bf16"``, else nothing."""
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass
class Evaluation:
    loss: float
    margin_loss: float
    reconstruction_loss: float
    accuracy: float
    total: int
    confusion: Tensor  # (classes, classes): row = true class, column = predicted

    @property
    def per_class_accuracy(self) -> list[float]:
        counts = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / counts).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, "margin_loss": self.margin_loss,
                "reconstruction_loss": self.reconstruction_loss, "accuracy": self.accuracy,
                "total": self.total, "per_class_accuracy": self.per_class_accuracy,
                "confusion": self.confusion.tolist()}


@torch.no_grad()
def evaluate(model: CapsNet, split: Split, *, batch_size: int = 500,
             device: torch.device | str = "cpu", reconstruction_weight: float = 0.0005,
             reduction: str = "sum", margin_form: str = "paper", precision: str = "fp32",
             world: World = World()) -> Evaluation:
    """Evaluate ``model`` on ``split`` as the notebook does at test time: the decoder
    reconstructs from the predicted (longest) capsule. Losses are means over images.

    With several processes each rank evaluates every ``world_size``-th image and the sums
    are reduced, so every rank returns the figures of the whole split.
    """
    device = torch.device(device)
    n = len(split)
    if world.distributed:
        split = Split(split.images[world.rank::world.world_size],
                      split.labels[world.rank::world.world_size])
    was_training = model.training
    model.eval()
    classes = model.config.num_classes
    sums = torch.zeros(3, device=device, dtype=torch.float64)  # loss, margin, reconstruction
    confusion = torch.zeros(classes * classes, device=device, dtype=torch.int64)
    for images, labels in batches(split, batch_size, device=device):
        with autocast(device, precision):
            out = model(images)
        total, margin, recon = capsule_loss(out.lengths.float(), out.reconstructions.float(),
                                            images, labels, reconstruction_weight, reduction,
                                            margin_form)
        sums += torch.stack([total, margin, recon]).double() * len(labels)
        confusion += torch.bincount(labels * classes + out.predictions, minlength=classes ** 2)
    model.train(was_training)
    all_reduce_sum(sums, world)
    all_reduce_sum(confusion, world)
    loss, margin, recon = (sums / n).tolist()
    confusion = confusion.view(classes, classes).cpu()
    accuracy = confusion.diagonal().sum().item() / n
    return Evaluation(loss, margin, recon, accuracy, n, confusion)
