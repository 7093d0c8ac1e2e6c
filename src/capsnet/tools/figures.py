"""The notebook's figures as PNG files: test samples, reconstructions, tweaked pose
parameters, and the training curves of a run.

:func:`draw_figures` writes, into one folder (``n`` = number of samples; pixel sizes at
:data:`DPI` = 100):

    samples.png            the first test image of each class, titled with its class, the
                           predicted one and that capsule's length, red when
                           wrong                                            (150 classes x 200)
    reconstructions.png    those images, and below them the decoder's
                           reconstructions titled with the predictions      (150 n x 400)
    tweak_dim_00.png ...   one per pose dimension d of the predicted capsule: row = sample,
    tweak_dim_15.png       column = d shifted by -0.5, -0.4, ..., +0.5      (825 x 75 n + 50)
    curves.png             the training curve (loss and accuracy every few steps) and the
                           validation after each epoch, on an axis of epochs, when
                           the run's metrics.jsonl exists                   (1000 x 400)

Figures are drawn on the Agg canvas without pyplot (no window, no global state) and each
file is written atomically.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from torch import Tensor

from ..data.batching import batches
from ..errors import CapsNetError
from ..nn.model import CapsNet
from ..training.checkpoint import load_trained
from ..training.config import splits_for
from ..training.run import Run
from ..training.task import check_fits
from ..utils.files import save_png

DPI = 100
CELL = 1.5  # inches per image in the sample and reconstruction figures
TWEAK_CELL = 0.75  # inches per image in the tweak figures
TWEAK_STEPS = np.linspace(-0.5, 0.5, 11)
GAP = 2  # pixels between tiles of the tweak figures


def draw_figures(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                 data_dir: str | os.PathLike | None = None, dataset: str | None = None,
                 val_size: int | None = None, run_dir: str | os.PathLike | None = None,
                 n_samples: int = 5) -> list[Path]:
    """Draw every figure for the model ``source`` (anything CapsNet.from_pretrained takes) on
    the first ``n_samples`` test images of ``dataset`` (default: the one it was trained on;
    ``val_size`` as in :func:`~capsnet.training.checkpoint.load_trained`) into ``out_dir``;
    returns the paths written. ``run_dir`` (default: the folder of the model's file) holds
    metrics.jsonl for the curves."""
    if n_samples < 1:
        raise CapsNetError(f"the number of samples must be at least 1, got {n_samples}")
    trained = load_trained(source, dataset, val_size=val_size)
    model, train_config = trained.model, trained.config
    splits = splits_for(train_config, data_dir)
    check_fits(model.config, train_config.dataset, train_config.crop or splits.image_size,
               splits.in_channels, splits.num_classes)
    images, labels = next(batches(splits.test, n_samples, crop=train_config.crop))
    with torch.no_grad():
        out = model(images)
        tweaks = tweak_reconstructions(model, out.digit_caps, out.predictions)
    predictions = out.predictions.tolist()
    out_dir = Path(out_dir)
    each_class = one_of_each_class(splits.test, train_config.crop, splits.num_classes)
    paths = [save_png(samples_figure(model, *each_class), out_dir / "samples.png"),
             save_png(reconstructions_figure(images, out.reconstructions, predictions),
                      out_dir / "reconstructions.png")]
    for dim, grid in enumerate(tweaks):
        paths.append(save_png(tweak_figure(grid, dim), out_dir / f"tweak_dim_{dim:02d}.png"))
    run = Run(run_dir or trained.path.parent)
    records, _ = run.read_metrics()  # torn lines skipped
    if records:
        points, _ = run.read_metrics(curve=True)
        paths.append(save_png(curves_figure(records, points), out_dir / "curves.png"))
    return paths


def one_of_each_class(source: Any, crop: int, num_classes: int,
                      batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """The first image of each class in ``source`` (of those it holds), in class order."""
    found: dict[int, Tensor] = {}
    for images, labels in batches(source, batch_size, crop=crop):
        for image, label in zip(images, labels.tolist()):
            found.setdefault(label, image)
        if len(found) == num_classes:
            break
    classes = sorted(found)
    return torch.stack([found[c] for c in classes]), torch.tensor(classes)


def tweak_reconstructions(model: CapsNet, digit_caps: Tensor, classes: Tensor) -> Tensor:
    """Decoded images ``(dims, steps, n, channels, size, size)`` with each pose dimension of
    the ``classes`` capsule shifted by each of :data:`TWEAK_STEPS`, as in the notebook."""
    n, num_classes, dims = digit_caps.shape
    steps = torch.as_tensor(TWEAK_STEPS, dtype=digit_caps.dtype)
    shift = torch.zeros(dims, len(steps), n, num_classes, dims, dtype=digit_caps.dtype)
    picked = torch.nn.functional.one_hot(classes, num_classes).to(digit_caps.dtype)  # (n, classes)
    for dim in range(dims):
        shift[dim, :, :, :, dim] = steps[:, None, None] * picked
    tweaked = (digit_caps + shift).reshape(-1, num_classes, dims)
    decoded = model.reconstruct(tweaked, classes.repeat(dims * len(steps)))
    return decoded.reshape(dims, len(steps), n, *decoded.shape[1:])


# -- figures ----------------------------------------------------------------------------

def show(ax: Any, image: Tensor) -> None:
    """Draw one ``(channels, h, w)`` image as the notebook does (dark ink on white)."""
    pixels = image.detach().float().clamp(0, 1).cpu().numpy()
    if pixels.shape[0] == 1:
        ax.imshow(pixels[0], cmap="binary", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(np.moveaxis(pixels, 0, -1))
    ax.axis("off")


def samples_figure(model: CapsNet, images: Tensor, labels: Tensor) -> Figure:
    """``images`` in a row, each titled with its class, the predicted class and the length of
    that capsule; in red where the prediction is wrong."""
    with torch.no_grad():
        lengths = model(images).lengths
    fig = Figure(figsize=(CELL * len(images), 2.0), dpi=DPI)
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        predicted = int(lengths[index].argmax())
        ax = fig.add_subplot(1, len(images), index + 1)
        show(ax, image)
        ax.set_title(f"{model.class_names[label]} -> {model.class_names[predicted]}\n"
                     f"length {lengths[index, predicted]:.2f}", fontsize=9,
                     color="black" if predicted == label else "red")
    return fig


def reconstructions_figure(images: Tensor, reconstructions: Tensor,
                           predictions: list[int]) -> Figure:
    """Inputs in the top row; below, their reconstructions titled with the predictions."""
    n = len(images)
    fig = Figure(figsize=(CELL * n, 4.0), dpi=DPI)
    for index in range(n):
        top = fig.add_subplot(2, n, index + 1)
        show(top, images[index])
        top.set_title("Input")
        bottom = fig.add_subplot(2, n, n + index + 1)
        show(bottom, reconstructions[index])
        bottom.set_title(f"Predicted: {predictions[index]}")
    return fig


def tweak_figure(grid: Tensor, dim: int) -> Figure:
    """Reconstructions ``(steps, n, channels, h, w)``: a row per sample, a column per step,
    tiled into one image (one Axes is much faster to draw than a grid of them)."""
    steps, n = grid.shape[:2]
    height, width = grid.shape[-2:]
    fig = Figure(figsize=(TWEAK_CELL * steps, TWEAK_CELL * n + 0.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(mosaic(grid), interpolation="nearest")
    ax.set_xticks([(width + GAP) * col + (width - 1) / 2 for col in range(steps)],
                  [f"{step:+.1f}" for step in TWEAK_STEPS[:steps]], fontsize=7)
    ax.set_yticks([(height + GAP) * row + (height - 1) / 2 for row in range(n)],
                  [str(row) for row in range(n)], fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(f"pose dimension {dim} of the predicted capsule, shifted", fontsize=9)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.08, top=0.9)
    return fig


def mosaic(grid: Tensor) -> np.ndarray:
    """RGB tiles of ``grid`` ``(cols, rows, channels, h, w)`` separated by grey lines;
    grayscale shown as the notebook does (dark ink on white)."""
    cols, rows, channels, height, width = grid.shape
    pixels = grid.detach().float().clamp(0, 1).cpu().numpy()
    tiles = 1.0 - np.repeat(pixels, 3, axis=2) if channels == 1 else pixels
    canvas = np.full(((height + GAP) * rows - GAP, (width + GAP) * cols - GAP, 3), 0.75)
    for col in range(cols):
        for row in range(rows):
            top, left = row * (height + GAP), col * (width + GAP)
            canvas[top:top + height, left:left + width] = np.moveaxis(tiles[col, row], 0, -1)
    return canvas


def curves_figure(epochs: list[dict[str, Any]], points: list[dict[str, Any]]) -> Figure:
    """Loss (left, log scale) and accuracy (right) on an axis of epochs: the training curve
    from ``points`` (every few steps; the per-epoch means where a run logged none) and the
    validation after each epoch, from ``epochs``."""
    fig = Figure(figsize=(10.0, 4.0), dpi=DPI)
    train = points or epochs
    for index, metric in enumerate(("loss", "accuracy")):
        ax = fig.add_subplot(1, 2, index + 1)
        ax.plot([r["epoch"] for r in train], [r.get(f"train_{metric}", np.nan) for r in train],
                marker="" if points else "o", label="training")
        ax.plot([r["epoch"] for r in epochs], [r.get(f"val_{metric}", np.nan) for r in epochs],
                marker="o", linestyle="--" if len(epochs) > 1 else "", label="validation")
        ax.set_xlabel("epoch")
        ax.set_xlim(0 if points else 0.5, max(r["epoch"] for r in epochs) + (0 if points else 0.5))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if metric == "loss":
            ax.set_yscale("log")
        ax.set_title(metric.capitalize())
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    return fig
