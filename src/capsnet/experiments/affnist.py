"""Robustness to affine transformations (Sabour et al. 2017, section 5.2): a CapsNet and a
baseline CNN trained on digits placed at random on a 40x40 canvas, tested on translated
digits, on affine-transformed digits and, given the files, on the real affNIST test set.

Each model is its own run of the one Trainer, in ``RUN_DIR/capsnet`` and ``RUN_DIR/cnn``
(config.json, metrics.jsonl, last.pt, best.pt, summary.json each; ``best.pt`` is the epoch
with the highest accuracy on translated validation digits). ``RUN_DIR`` holds the
experiment's config.json, summary.json and figures/affine-test.png.

Both models train with the same settings, so ``--stop-at 0.992`` stops each after its first
epoch reaching 99.2% on the translated validation digits: the paper's rule (both trained to
about 99.2% on translated MNIST before the affine test), where a time limit alone compares
however many epochs each model fits in its half.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..data.affine import AffineRanges, AffineTestSet, load_affnist, pad_split, translation_range
from ..data.batching import batches
from ..data.splits import Split
from ..errors import CapsNetError
from ..nn.base import CapsuleModel
from ..nn.baseline import ARCHITECTURE as CNN, VARIANTS, BaselineConfig
from ..nn.model import count_parameters
from ..training.config import TrainConfig, splits_for
from ..training.evaluate import accumulate
from ..training.run import Run
from ..training.task import Classification, Step
from ..training.trainer import Trainer
from ..utils.device import autocast, device_name
from ..utils.distributed import World
from ..utils.files import save_png
from ..utils.settings import check_settings, setting
from .base import OWN_INPUT, TEST_SEED, VAL_SEED, Experiment

CANVAS = 40
MODELS = ("capsnet", "cnn")


@dataclass(frozen=True)
class AffnistSettings:
    model: str = setting("both", "which models to train", choices=("both", *MODELS))
    cnn_variant: str = setting("pooled", "pooled: max pooling after conv 1 and 2, 6.7M "
                               "parameters; paper: the paper's MNIST baseline, no pooling, "
                               "69.7M on 40x40", choices=VARIANTS)
    affnist_dir: str = setting("", "affNIST test .mat file, or a folder with test.mat or the "
                               "test batches 1.mat..32.mat")
    max_rotation: float = setting(20.0, "degrees", min=0, max=180)
    max_shear: float = setting(0.2, "horizontal shear factor", min=0, lt=10)
    min_scale: float = setting(0.8, "smallest scale", gt=0)
    max_scale: float = setting(1.2, "largest scale", gt=0)
    test_limit: int = setting(0, "at most N examples in each validation and test set (0: all)",
                              min=0)
    figures: int = setting(16, "affine test examples to draw (0: none)", min=0, max=1000)

    def __post_init__(self) -> None:
        check_settings(self)
        self.ranges()  # min_scale <= max_scale

    def ranges(self) -> AffineRanges:
        return AffineRanges(self.max_rotation, self.max_shear, self.min_scale, self.max_scale)

    @property
    def models(self) -> tuple[str, ...]:
        return MODELS if self.model == "both" else (self.model,)


@torch.no_grad()
def classify(model: nn.Module, images: Tensor) -> Tensor:
    """Predicted classes of a capsule network (its own predictions: the longest capsule, or
    the most active class) or of the baseline CNN (largest logit)."""
    if isinstance(model, CapsuleModel):
        return model(images).predictions
    return model(images).argmax(dim=1)


def accuracy(model: nn.Module, batch_iter: Iterable[tuple[Tensor, Tensor]], device: torch.device,
             precision: str, world: World = World()) -> float:
    """Fraction of correct predictions of ``model`` (in eval mode) over ``batch_iter``."""

    def measure(model: nn.Module, batch: tuple[Tensor, Tensor]) -> dict[str, Tensor]:
        images, labels = batch
        return {"correct": (classify(model, images) == labels).sum(),
                "count": torch.tensor(len(labels))}

    sums = accumulate(model, batch_iter, measure, device=device, precision=precision, world=world)
    return int(sums["correct"]) / max(int(sums["count"]), 1)


class AffineCapsNet(Classification):
    """A capsule network (``--network``) on translated 40x40 digits; best.pt by validation
    accuracy; tested on translated, affine-transformed and (optionally) real affNIST digits."""

    name = "affnist"
    command = "capsnet experiment affnist"
    best_metric = "accuracy"
    higher_is_better = True


    def resume_command(self, run_folder: Path) -> str:
        """Each model trains in a subfolder of the experiment's, which --resume names."""
        return f"{self.command} --resume {run_folder.parent}"
    def __init__(self, config: TrainConfig, settings: AffnistSettings, train: Split, val: Split,
                 test: Split, affine: AffineTestSet, affnist: Split | None,
                 num_classes: int) -> None:
        super().__init__(config, train, val, test, num_classes=num_classes)
        self.settings, self.affine, self.affnist = settings, affine, affnist

    def to(self, device: torch.device) -> None:
        super().to(device)
        if device.type == "cuda" and self.affnist is not None:
            self.affnist = self.affnist.to(device)

    def translated(self, split: Split, seed: int, device: torch.device, world: World):
        return batches(split, self.config.eval_batch_size, seed=seed,
                       max_shift=self.config.max_shift, device=device, rank=world.rank,
                       world_size=world.world_size, whole=True)

    def validate(self, model: nn.Module, device: torch.device, world: World) -> dict[str, float]:
        return {"accuracy": accuracy(model, self.translated(self.val, VAL_SEED, device, world),
                                     device, self.config.precision, world)}

    def test(self, model: nn.Module, device: torch.device, world: World) -> dict[str, Any]:
        precision = self.config.precision
        result = {"parameters": count_parameters(model),
                  "translated_test_accuracy": accuracy(
                      model, self.translated(self.test_set, TEST_SEED, device, world), device,
                      precision, world),
                  "affine_test_accuracy": accuracy(
                      model, self.affine.batches(self.config.eval_batch_size, device), device,
                      precision)}
        if self.affnist is not None:
            result["affnist_test_accuracy"] = accuracy(
                model, batches(self.affnist, self.config.eval_batch_size, device=device), device,
                precision)
        return result

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "architecture": self.architecture, **asdict(self.settings)}


class AffineCNN(AffineCapsNet):
    """The baseline CNN on the same data, with cross-entropy; see :mod:`capsnet.nn.baseline`."""

    architecture = CNN

    def model_config(self) -> BaselineConfig:
        return BaselineConfig(image_size=self.image_size, in_channels=self.in_channels,
                              num_classes=self.num_classes, variant=self.settings.cnn_variant)

    def step(self, model: nn.Module, batch: tuple[Tensor, Tensor]) -> Step:
        images, labels = batch
        logits = model(images).float()
        return Step(F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).sum(),
                    len(labels))

    def test(self, model: nn.Module, device: torch.device, world: World) -> dict[str, Any]:
        return {**super().test(model, device, world), "variant": self.settings.cnn_variant}


def affine_figure(path: Path, images: Tensor, labels: Tensor,
                  predictions: dict[str, Tensor]) -> Path:
    """A grid of affine test images, each titled with its label and every model's prediction."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, 8)
    rows = -(-n // cols)
    figure = Figure(figsize=(1.3 * cols, 1.5 * rows))
    axes = figure.subplots(rows, cols, squeeze=False)
    for index, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if index >= n:
            axis.axis("off")
            continue
        axis.imshow(images[index].mean(dim=0).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        label = int(labels[index])
        text = [f"{label}"] + [f"{name[:3]} {int(p[index])}" for name, p in predictions.items()]
        wrong = any(int(p[index]) != label for p in predictions.values())
        axis.set_title(" | ".join(text), fontsize=7, color="red" if wrong else "black")
    figure.tight_layout()
    return save_png(figure, path)


def run(config: TrainConfig, settings: AffnistSettings, run_dir: str | Path, *,
        data_dir: str | None = None, resume: bool = False, from_best: bool = False,
        show_progress: bool = True) -> dict[str, Any]:
    """Train (or resume) each model of ``settings`` and test it; returns the summary."""
    # Read the affNIST files first: a bad path should fail before hours of training.
    affnist = load_affnist(settings.affnist_dir, settings.test_limit) if settings.affnist_dir else None
    splits = splits_for(config, data_dir)
    if splits.image_size > CANVAS:
        raise CapsNetError(f"{config.dataset}: {splits.image_size}x{splits.image_size} images "
                           f"do not fit the {CANVAS}x{CANVAS} canvas")
    # Digits go anywhere on the canvas: shifts up to the padding, (40 - 28) / 2 = 6 for MNIST.
    config = replace(config, max_shift=translation_range(splits.image_size, CANVAS))
    limit = settings.test_limit
    train = pad_split(splits.train, CANVAS).first(config.train_limit)
    val, test = (pad_split(s, CANVAS).first(limit) for s in (splits.val, splits.test))
    affine = AffineTestSet(splits.test, TEST_SEED, settings.ranges(), CANVAS, limit)
    run = Run(run_dir)
    # Every model's trainer checks its folder and checkpoints before anything is written.
    trainers = {}
    for name in settings.models:
        task_class = AffineCapsNet if name == "capsnet" else AffineCNN
        task = task_class(config, settings, train, val, test, affine, affnist, splits.num_classes)
        part = run.part(name)
        trainers[name] = Trainer(task, part.folder, resume=resume and part.last.is_file(),
                                 from_best=from_best, show_progress=show_progress)
    run.write_config({"experiment": "affnist", "train": config.to_dict(),
                      "settings": asdict(settings), "canvas": CANVAS})
    results: dict[str, Any] = {}
    trained: dict[str, nn.Module] = {}
    device = torch.device("cpu")
    for name, trainer in trainers.items():
        results[name] = trainer.fit()
        device = trainer.device
        trained[name] = trainer.best_model()
    paths = []
    count = min(settings.figures, len(affine))
    if count > 0:
        images, labels, _ = affine.batch(0, count, device)
        with autocast(device, config.precision):
            predictions = {name: classify(model.to(device).eval(), images)
                           for name, model in trained.items()}
        paths.append(affine_figure(run.figures / "affine-test.png", images, labels,
                                   predictions))
    summary = {"experiment": "affnist", "dataset": config.dataset, "models": results,
               "test_examples": {"translated": len(test), "affine": len(affine),
                                 "affnist": len(affnist) if affnist is not None else None},
               "affine_ranges": settings.ranges().to_dict(), "canvas": CANVAS,
               "max_shift": config.max_shift, "affnist_dir": settings.affnist_dir or None,
               "warmup_steps": config.warmup_steps, "device": device_name(device),
               "torch": torch.__version__, "figures": [str(p) for p in paths]}
    summary["wall_seconds"] = sum(r["wall_seconds"] for r in results.values())
    run.write_summary(summary)
    return summary


def report(summary: dict[str, Any]) -> str:
    columns = ["translated_test_accuracy", "affine_test_accuracy"]
    if summary["affnist_dir"]:
        columns.append("affnist_test_accuracy")
    lines = [f"{'model':8} {'params':>10} " + " ".join(f"{c.split('_test')[0]:>11}"
                                                       for c in columns)]
    for name, r in summary["models"].items():
        lines.append(f"{name:8} {r['parameters']:>10,} " + " ".join(f"{r[c]:>11.2%}"
                                                                     for c in columns))
    lines.append(f"{summary['wall_seconds']:.0f} s on {summary['device']}")
    return "\n".join(lines)


AFFNIST = Experiment(
    name="affnist", settings=AffnistSettings, run=run, report=report,
    description="Train a CapsNet and/or a baseline CNN on digits placed at random on a 40x40 "
                "canvas, then test on translated and on affine-transformed test digits (and "
                "on real affNIST test files with --affnist-dir).",
    train_defaults={**OWN_INPUT, "warmup_steps": 200})
