"""Evaluation: one loop that sums a task's per-batch measures over a data set and over ranks,
and the classification figures built on it (loss, accuracy, confusion matrix)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from ..data.batching import Source, batches, source_length
from ..data.splits import Split
from ..nn.em_routing import spread_loss, spread_margin
from ..nn.losses import capsule_loss, reconstruction_loss, with_no_class
from ..nn.prediction import PRESENT
from ..utils.device import autocast
from ..utils.distributed import World, all_reduce_sum
from ..utils.memory import capsnet_image_bytes, check_memory

Measure = Callable[[nn.Module, Any], dict[str, Tensor]]


@torch.no_grad()
def accumulate(model: nn.Module, batch_iter: Iterable[Any], measure: Measure, *,
               device: torch.device, precision: str = "fp32", world: World = World()
               ) -> dict[str, Tensor]:
    """Sum ``measure(model, batch)`` (a dict of per-batch sums) over ``batch_iter`` with the
    model in eval mode, then over ranks. Floating-point sums are kept in float64."""
    was_training = model.training
    model.eval()
    totals: dict[str, Tensor] = {}
    for batch in batch_iter:
        with autocast(device, precision):
            sums = measure(model, batch)
        for name, value in sums.items():
            value = value.double() if value.is_floating_point() else value
            totals[name] = totals[name] + value if name in totals else value
    model.train(was_training)
    for value in totals.values():
        all_reduce_sum(value, world)
    return totals


SPREAD_MARGIN_END = spread_margin(1, 1)  # the spread loss's margin once it has risen


def network_loss(out: Any, images: Tensor, labels: Tensor, kind: str, spread_margin: float,
                 reconstruction_weight: float, reduction: str = "sum",
                 margin_form: str = "paper", no_class: bool = False
                 ) -> tuple[Tensor, Tensor, Tensor]:
    """The loss that trains a network of loss ``kind`` (capsnet.nn.registry), with its parts:
    ``(total, class loss, reconstruction)``, the class loss the margin loss, or the spread
    loss at ``spread_margin``, and the reconstruction zero without a decoder. ``no_class``:
    ``labels`` may hold ``NO_CLASS``."""
    if kind == "spread":
        recon = reconstruction_loss(out.reconstructions.float(), images, reduction)
        spread = spread_loss(out.lengths.float(), labels, spread_margin)
        return spread + reconstruction_weight * recon, spread, recon
    targets, rows = (with_no_class(labels, out.lengths.shape[1]) if no_class
                     else (labels, None))
    return capsule_loss(out.lengths.float(), out.reconstructions.float(), images, targets,
                        reconstruction_weight, reduction, margin_form, rows)


@dataclass
class Evaluation:
    loss: float
    class_loss: float  # the margin or the spread loss, as ``loss_kind`` says
    reconstruction_loss: float
    accuracy: float
    total: int
    confusion: Tensor  # (classes, classes): row = true class, column = predicted
    loss_kind: str = "margin"

    @property
    def per_class_accuracy(self) -> list[float]:
        counts = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / counts).tolist()

    def to_dict(self) -> dict[str, Any]:
        return {"loss": self.loss, f"{self.loss_kind}_loss": self.class_loss,
                "reconstruction_loss": self.reconstruction_loss, "accuracy": self.accuracy,
                "total": self.total, "per_class_accuracy": self.per_class_accuracy,
                "confusion": self.confusion.tolist()}


def evaluate(model: nn.Module, source: Source, *, batch_size: int = 500,
             device: torch.device | str = "cpu", reconstruction_weight: float = 0.0005,
             reduction: str = "sum", margin_form: str = "paper", loss_kind: str = "margin",
             precision: str = "fp32", world: World = World(), crop: int = 0,
             progress: bool = False, batch_flag: str = "--batch-size") -> Evaluation:
    """Evaluate ``model`` on ``source`` as the notebook does at test time: the decoder
    reconstructs from the predicted (longest) capsule. Losses are means over images, with the
    network's own class loss (``loss_kind``: the spread loss at its final margin).

    With several processes each rank evaluates every ``world_size``-th image and the sums
    are reduced, so every rank returns the figures of the whole set. ``crop`` evaluates the
    centre ``crop`` x ``crop`` window of each image. ``progress`` shows a bar on a terminal.
    A batch larger than a rank's share of the data set is that share; one that would not
    fit in the device's memory is refused before the first, naming ``batch_flag``.
    """
    device = torch.device(device)
    classes = model.config.num_classes
    share = -(-source_length(source) // world.world_size)  # the images of rank 0, the most
    batch_size = max(1, min(batch_size, share))
    check_memory(batch_size * capsnet_image_bytes(model.config, training=False, device=device),
                 f"an evaluation batch of {batch_size:,} images", f"lower {batch_flag}", device)

    def measure(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        out = model(images)
        losses = network_loss(out, images, labels, loss_kind, SPREAD_MARGIN_END,
                              reconstruction_weight, reduction, margin_form)
        return {"losses": torch.stack(losses).double() * len(labels),
                "confusion": torch.bincount(labels * classes + out.predictions,
                                            minlength=classes ** 2)}

    batch_iter = batches(source, batch_size, crop=crop, device=device, rank=world.rank,
                         world_size=world.world_size, whole=True)
    if progress and world.is_main:  # tqdm's None: a bar on a terminal, nothing in a pipe
        batch_iter = tqdm(batch_iter, total=-(-share // batch_size),
                          desc="evaluating", leave=False, disable=None)
    sums = accumulate(model, batch_iter, measure, device=device, precision=precision,
                      world=world)
    confusion = sums["confusion"].view(classes, classes).cpu()
    n = int(confusion.sum())
    loss, class_loss, recon = (sums["losses"] / max(n, 1)).tolist()
    accuracy = confusion.diagonal().sum().item() / max(n, 1)
    return Evaluation(loss, class_loss, recon, accuracy, n, confusion, loss_kind)


def none_rate(model: nn.Module, images: Tensor, *, batch_size: int = 500,
              device: torch.device | str = "cpu", precision: str = "fp32",
              world: World = World()) -> float:
    """The share of ``images`` (uint8 ``(n, C, H, W)``, of none of the model's classes) that
    the model answers "none": no capsule reaches :data:`~capsnet.nn.prediction.PRESENT`."""
    unlabelled = Split(images, torch.zeros(len(images), dtype=torch.long))

    def measure(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        lengths = model(batch[0]).lengths
        return {"none": (lengths.max(dim=1).values < PRESENT).sum(),
                "images": torch.tensor(len(lengths), device=lengths.device)}

    sums = accumulate(model, batches(unlabelled, batch_size, device=torch.device(device),
                                     rank=world.rank, world_size=world.world_size, whole=True),
                      measure, device=torch.device(device), precision=precision, world=world)
    return int(sums["none"]) / max(int(sums["images"]), 1)
