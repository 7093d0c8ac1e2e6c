"""The notebook's figures as PNG files: test samples, reconstructions, tweaked pose
parameters, and the training curves of a run.

:func:`draw_figures` writes, into one folder (``n`` = number of samples; pixel sizes at
:data:`DPI` = 100):

    samples.png            the first test image of each class, titled with its class, the
                           predicted one and that capsule's length, red when
                           wrong                                            (150 classes x 200)
    reconstructions.png    the first n test images titled with their class, and below them
                           the decoder's reconstructions titled with the
                           predictions                                      (150 n x 400)
    tweak_dim_00.png ...   one per pose dimension d of the predicted capsule: row = sample
    tweak_dim_15.png       (named by that capsule's class), column = d shifted by -0.5,
                           -0.4, ..., +0.5                                  (825 x 75 n + 50)
    curves.png             the training curve (loss and accuracy every few steps) and the
                           validation after each epoch, on an axis of epochs, when
                           the run's metrics.jsonl exists                   (1000 x 400)

The reconstructions and the tweaks need a decoder: a model without one (an EM network as
the ``em`` preset trains it) gets the samples and the curves. Classes are named as the model
names them (a data set's names for a model that records only numbers). A prediction is
"none" where no capsule is as long as :data:`~capsnet.nn.prediction.PRESENT`; its
reconstruction is still the longest capsule's.
Colour images are shown in colour; one channel as dark ink on white, as the notebook shows
MNIST; two (smallNORB's stereo pairs) side by side in the same grey.

Figures are drawn on the Agg canvas without pyplot (no window, no global state) and each
file is written atomically. At most :data:`MAX_SAMPLES` samples, and only as many as the
model can take at once in the memory available.
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
from ..nn.base import CapsuleModel
from ..nn.prediction import Prediction, predictions
from ..training.checkpoint import load_trained
from ..training.config import splits_for
from ..training.run import Run
from ..training.task import check_fits
from ..utils.files import save_png
from ..utils.memory import available_memory, capsnet_image_bytes, check_memory
from ..utils.settings import check_value

DPI = 100
CELL = 1.5  # inches per image in the sample and reconstruction figures
TWEAK_CELL = 0.75  # inches per image in the tweak figures
TWEAK_STEPS = np.linspace(-0.5, 0.5, 11)
GAP = 2  # pixels between tiles of the tweak figures, and between the views of a stereo pair
MAX_SAMPLES = 100  # the reconstructions figure is 150 pixels wide a sample
TITLE_CHARS = 20  # characters of a 9-point title line that fit over one 150-pixel image
TICK_CHARS = 16  # characters of a class name beside a row of the tweak figures
SEARCH_BATCH = 500  # test images at a time when looking for one of each class


def draw_figures(source: str | os.PathLike, out_dir: str | os.PathLike, *,
                 data_dir: str | os.PathLike | None = None, dataset: str | None = None,
                 val_size: int | None = None, run_dir: str | os.PathLike | None = None,
                 n_samples: int = 5) -> list[Path]:
    """Draw every figure for the model ``source`` (anything capsnet.load_model takes) on
    the first ``n_samples`` test images of ``dataset`` (default: the one it was trained on;
    ``val_size`` as in :func:`~capsnet.training.checkpoint.load_trained`) into ``out_dir``;
    returns the paths written. ``run_dir`` (default: the folder of the model's file) holds
    metrics.jsonl for the curves."""
    check_value("--samples", n_samples, int, {"min": 1, "max": MAX_SAMPLES})
    trained = load_trained(source, dataset, val_size=val_size)
    model, train_config = trained.model, trained.config
    per_image = capsnet_image_bytes(model.config, training=False)
    check_memory(n_samples * per_image, f"{n_samples} samples", "lower --samples")
    splits = splits_for(train_config, data_dir)
    check_fits(model.config, train_config.dataset, train_config.crop or splits.image_size,
               splits.in_channels, splits.num_classes)
    names = class_names(model, splits.class_names)
    out_dir = Path(out_dir)
    each_class = one_of_each_class(splits.test, train_config.crop, splits.num_classes,
                                   search_batch(per_image))
    paths = [save_png(samples_figure(model, *each_class, names), out_dir / "samples.png")]
    if model.reconstructs:
        images, labels = next(batches(splits.test, n_samples, crop=train_config.crop))
        paths += reconstruction_figures(model, images, [names[i] for i in labels.tolist()],
                                        names, out_dir)
    run = Run(run_dir or trained.path.parent)
    records, points, _ = run.split_metrics()  # torn lines skipped
    if records:
        paths.append(save_png(curves_figure(records, points), out_dir / "curves.png"))
    return paths


def reconstruction_figures(model: CapsuleModel, images: Tensor, labels: list[str],
                           names: tuple[str, ...], out_dir: Path) -> list[Path]:
    """reconstructions.png and the tweak figures of ``images`` (titled with ``labels``)."""
    with torch.no_grad():
        out = model(images)
        tweaks = tweak_reconstructions(model, out.digit_caps, out.predictions)
    found = predictions(out.lengths, names)
    paths = [save_png(reconstructions_figure(images, labels, out.reconstructions, found),
                      out_dir / "reconstructions.png")]
    decoded = [names[i] for i in out.predictions.tolist()]
    for dim, grid in enumerate(tweaks):
        paths.append(save_png(tweak_figure(grid, dim, decoded),
                              out_dir / f"tweak_dim_{dim:02d}.png"))
    return paths


def class_names(model: CapsuleModel, dataset_names: tuple[str, ...]) -> tuple[str, ...]:
    """The model's class names; the data set's where the model records only the numbers
    0, 1, ... (the names of a model saved without them)."""
    numbers = tuple(str(i) for i in range(len(model.class_names)))
    if model.class_names == numbers and len(dataset_names) == len(numbers):
        return tuple(dataset_names)
    return tuple(model.class_names)


def search_batch(per_image: int) -> int:
    """:data:`SEARCH_BATCH`, or fewer where that many images of ``per_image`` bytes would not
    fit in the memory available."""
    available = available_memory()
    return max(1, min(SEARCH_BATCH, available // per_image)) if available else SEARCH_BATCH


def one_of_each_class(source: Any, crop: int, num_classes: int,
                      batch_size: int = SEARCH_BATCH) -> tuple[Tensor, Tensor]:
    """The first image of each class in ``source`` (of those it holds), in class order."""
    found: dict[int, Tensor] = {}
    for images, labels in batches(source, batch_size, crop=crop):
        for image, label in zip(images, labels.tolist()):
            found.setdefault(label, image)
        if len(found) == num_classes:
            break
    classes = sorted(found)
    return torch.stack([found[c] for c in classes]), torch.tensor(classes)


def tweak_reconstructions(model: CapsuleModel, digit_caps: Tensor, classes: Tensor) -> Tensor:
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

def shortened(text: str, chars: int) -> str:
    """``text``, cut to ``chars`` characters with an ellipsis where longer."""
    return text if len(text) <= chars else text[:chars - 1] + "…"


def titled(label: str, name: str) -> str:
    """``label: name`` in one title line over an image, the name cut to fit."""
    return f"{label}: {shortened(name, TITLE_CHARS - len(label) - 2)}"


def predicted_lines(found: Prediction) -> list[str]:
    """A prediction in title lines: its class and length, or "none" and the longest."""
    if found.label is not None:
        return [titled("Predicted", found.label), f"length {found.confidence:.2f}"]
    longest = max(found.lengths, key=found.lengths.__getitem__)
    return [titled("Predicted", "none"), titled(f"longest {found.confidence:.2f}", longest)]


def picture(image: Tensor) -> np.ndarray:
    """RGB pixels ``(h, w', 3)`` in [0, 1] of an image ``(channels, h, w)``: three channels
    as they are; otherwise each channel as dark ink on white (the notebook's MNIST), side by
    side with a grey line between them (smallNORB's stereo pairs)."""
    pixels = image.detach().float().clamp(0, 1).cpu().numpy()
    if pixels.shape[0] == 3:
        return np.moveaxis(pixels, 0, -1)
    divider = np.full((pixels.shape[1], GAP), 0.75)
    planes = [part for plane in pixels for part in (divider, 1.0 - plane)][1:]
    return np.repeat(np.concatenate(planes, axis=1)[:, :, None], 3, axis=2)


def show(ax: Any, image: Tensor) -> None:
    """Draw one ``(channels, h, w)`` image without axes (see :func:`picture`)."""
    ax.imshow(picture(image), interpolation="nearest")
    ax.axis("off")


def samples_figure(model: CapsuleModel, images: Tensor, labels: Tensor,
                   names: tuple[str, ...]) -> Figure:
    """``images`` in a row, each titled with its class ``names[label]``, the predicted class
    (or "none") and the length of that capsule; in red where the prediction is wrong."""
    with torch.no_grad():
        found = predictions(model(images).lengths, names)
    fig = Figure(figsize=(CELL * len(images), 2.0), dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.03, top=0.7)  # room for 3 lines
    for index, (image, label) in enumerate(zip(images, labels.tolist())):
        ax = fig.add_subplot(1, len(images), index + 1)
        show(ax, image)
        lines = [titled("Label", names[label]), *predicted_lines(found[index])]
        ax.set_title("\n".join(lines), fontsize=9,
                     color="black" if found[index].index == label else "red")
    return fig


def reconstructions_figure(images: Tensor, labels: list[str], reconstructions: Tensor,
                           found: list[Prediction]) -> Figure:
    """Inputs titled with their classes ``labels`` in the top row; below, their
    reconstructions titled with the predictions ``found``."""
    n = len(images)
    fig = Figure(figsize=(CELL * n, 4.0), dpi=DPI)
    fig.subplots_adjust(left=0.02, right=0.98, bottom=0.02, top=0.9, hspace=0.4)
    for index in range(n):
        top = fig.add_subplot(2, n, index + 1)
        show(top, images[index])
        top.set_title(titled("Label", labels[index]), fontsize=9)
        bottom = fig.add_subplot(2, n, n + index + 1)
        show(bottom, reconstructions[index])
        bottom.set_title("\n".join(predicted_lines(found[index])), fontsize=9)
    return fig


def tweak_figure(grid: Tensor, dim: int, names: list[str]) -> Figure:
    """Reconstructions ``(steps, n, channels, h, w)``: a row per sample, named by the class
    of its capsule in ``names``, a column per step, tiled into one image (one Axes is much
    faster to draw than a grid of them)."""
    steps, n = grid.shape[:2]
    canvas = mosaic(grid)
    height = grid.shape[-2]
    width = (canvas.shape[1] + GAP) // steps - GAP
    fig = Figure(figsize=(TWEAK_CELL * steps, TWEAK_CELL * n + 0.5), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(canvas, interpolation="nearest")
    ax.set_xticks([(width + GAP) * col + (width - 1) / 2 for col in range(steps)],
                  [f"{step:+.1f}" for step in TWEAK_STEPS[:steps]], fontsize=7)
    rows = [shortened(name, TICK_CHARS) for name in names]
    ax.set_yticks([(height + GAP) * row + (height - 1) / 2 for row in range(n)], rows,
                  fontsize=7)
    ax.tick_params(length=0)
    ax.set_title(f"pose dimension {dim} of the predicted capsule, shifted", fontsize=9)
    # 7-point characters are at most about 5.5 pixels wide: the names decide the left margin
    left = max(0.04, (5.5 * max(map(len, rows)) + 10) / (TWEAK_CELL * steps * DPI))
    fig.subplots_adjust(left=left, right=0.99, bottom=0.08, top=0.9)
    return fig


def mosaic(grid: Tensor) -> np.ndarray:
    """RGB tiles (each a :func:`picture`) of ``grid`` ``(cols, rows, channels, h, w)``,
    separated by grey lines."""
    cols, rows = grid.shape[:2]
    tiles = [[picture(grid[col, row]) for row in range(rows)] for col in range(cols)]
    height, width = tiles[0][0].shape[:2]
    canvas = np.full(((height + GAP) * rows - GAP, (width + GAP) * cols - GAP, 3), 0.75)
    for col in range(cols):
        for row in range(rows):
            top, left = row * (height + GAP), col * (width + GAP)
            canvas[top:top + height, left:left + width] = tiles[col][row]
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
