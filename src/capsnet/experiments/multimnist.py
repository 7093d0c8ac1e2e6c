"""MultiMNIST (Sabour et al. 2017, section 6): a CapsNet learns to see two overlapping digits.

Training pairs are made on the fly from the training digits, validation pairs from the
validation digits and test pairs from the test digits (fixed seeds, so the evaluation sets
are the same in every run). Both classes are targets of the margin loss, and each digit is
reconstructed from its own class's capsule and compared with its own shifted image. An
example is right when its two longest capsules are exactly its two classes; ``best.pt`` is
the epoch with the highest validation accuracy.

Run directory: config.json, metrics.jsonl, last.pt, best.pt, summary.json,
figures/multimnist-NN.png.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..data.batching import num_batches
from ..data.multimnist import MAX_SHIFT, OVERLAYS, MultiMNIST, MultiMNISTBatch
from ..data.splits import Split
from ..nn.layers import safe_norm
from ..nn.losses import Reduction, margin_loss, reconstruction_loss
from ..nn.model import CapsNet, CapsNetConfig, count_parameters
from ..nn.registry import MODELS
from ..training.config import TrainConfig, model_config_for, splits_for
from ..training.evaluate import accumulate
from ..training.task import Step, Task
from ..training.trainer import Trainer
from ..utils.distributed import World
from ..utils.files import save_png
from ..utils.settings import check_settings, setting
from .base import OWN_INPUT, TEST_SEED, VAL_SEED, Experiment

CRITERION = "the two longest capsules are exactly the two classes"


@dataclass(frozen=True)
class MultiMNISTSettings:
    overlay: str = setting("max", "max: pixel-wise maximum; sum: sum clipped at 1, as the "
                           "official generation script", choices=OVERLAYS)
    test_limit: int = setting(0, "at most N pairs in the validation and test sets (0: as many "
                              "as digits)", min=0)
    figures: int = setting(8, "test pairs to draw (0: none)", min=0, max=1000)

    def __post_init__(self) -> None:
        check_settings(self)


def presence(labels: Tensor, num_classes: int) -> Tensor:
    """0/1 matrix ``(batch, classes)`` of the classes in ``labels`` ``(batch, k)``."""
    return F.one_hot(labels, num_classes).amax(dim=1)


def multimnist_loss(lengths: Tensor, reconstructions: Tensor, digits: Tensor, labels: Tensor,
                    reconstruction_weight: float = 0.0005, reduction: Reduction = "sum",
                    margin_form: str = "paper") -> tuple[Tensor, Tensor, Tensor]:
    """Loss with two targets (paper, section 6): margin loss with both classes present, plus
    ``weight`` times the sum of the reconstruction losses of the two digits, each decoded
    from its own class's capsule and compared with that digit's own shifted image.

    ``lengths`` ``(batch, classes)``; ``reconstructions`` and ``digits``
    ``(batch, 2, c, h, w)``; ``labels`` ``(batch, 2)``. Returns (total, margin,
    reconstruction) where reconstruction is ``recon1 + recon2`` (each a mean over the batch).
    """
    margin = margin_loss(lengths, presence(labels, lengths.shape[1]), form=margin_form)
    recon = (reconstruction_loss(reconstructions[:, 0], digits[:, 0], reduction)
             + reconstruction_loss(reconstructions[:, 1], digits[:, 1], reduction))
    return margin + reconstruction_weight * recon, margin, recon


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


class MultiMNISTTask(Task):
    name = "multimnist"
    command = "capsnet experiment multimnist"
    best_metric = "accuracy"
    higher_is_better = True

    def __init__(self, config: TrainConfig, settings: MultiMNISTSettings, train: Split,
                 val: Split, test: Split, num_classes: int) -> None:
        super().__init__(config)
        self.settings = settings
        self.train, self.val, self.test_set = (
            MultiMNIST(split, config.max_shift, settings.overlay, num_classes)
            for split in (train, val, test))
        limit = settings.test_limit
        self.val_size = min(len(self.val), limit) if limit else len(self.val)
        self.test_size = min(len(self.test_set), limit) if limit else len(self.test_set)

    @property
    def architecture(self) -> str:  # type: ignore[override]
        return MODELS[self.config.network].architecture

    def model_config(self) -> CapsNetConfig:
        split = self.train.split
        return model_config_for(self.config, self.train.canvas, split.images.shape[1],
                                self.train.num_classes)

    def to(self, device: torch.device) -> None:
        if device.type == "cuda":
            for data in (self.train, self.val, self.test_set):
                data.split = data.split.to(device)

    def num_batches(self, world: World) -> int:
        return num_batches(len(self.train), self.config.batch_size, world.world_size)

    def batches(self, seed: int, start: int, device: torch.device, world: World):
        return self.train.batches(self.config.batch_size, seed, start=start, device=device,
                                  rank=world.rank, world_size=world.world_size)

    def losses(self, out: Any, batch: MultiMNISTBatch) -> tuple[Tensor, Tensor, Tensor]:
        config = self.config
        return multimnist_loss(out.lengths.float(), out.reconstructions.float(), batch.digits,
                               batch.labels, config.reconstruction_weight,
                               config.reconstruction_reduction, config.margin_loss)

    def step(self, model: nn.Module, batch: MultiMNISTBatch) -> Step:
        out = model(batch.images, batch.labels)  # one reconstruction per digit
        loss, _, _ = self.losses(out, batch)
        correct = top2_correct(out.lengths.detach().float(), batch.labels).sum()
        return Step(loss, correct, len(batch.labels))

    def evaluate(self, model: nn.Module, data: MultiMNIST, seed: int, size: int,
                 device: torch.device, world: World) -> dict[str, float]:
        """Top-2 exact-match accuracy (the paper's figure is ``error``) and the two-target
        loss (reconstructions masked by the true classes) on ``size`` pairs of the pass with
        ``seed``. ``classes_found``: the fraction of true classes among the two longest
        capsules (chance 0.2 for 10 classes), a softer measure for short runs."""

        def measure(model: nn.Module, batch: MultiMNISTBatch) -> dict[str, Tensor]:
            out = model(batch.images, batch.labels)
            lengths = out.lengths.float()
            found = (top2(lengths).unsqueeze(2) == batch.labels.unsqueeze(1)).any(dim=2)
            return {"losses": torch.stack(self.losses(out, batch)).double() * len(batch.labels),
                    "correct": top2_correct(lengths, batch.labels).sum(),
                    "found": found.sum(), "count": torch.tensor(len(batch.labels))}

        sums = accumulate(model, data.batches(self.config.eval_batch_size, seed, size=size,
                                              device=device, rank=world.rank,
                                              world_size=world.world_size, whole=True),
                          measure, device=device, precision=self.config.precision, world=world)
        n = max(int(sums["count"]), 1)
        loss, margin, recon = (sums["losses"] / n).tolist()
        accuracy = int(sums["correct"]) / n
        return {"loss": loss, "margin_loss": margin, "reconstruction_loss": recon,
                "accuracy": accuracy, "error": 1.0 - accuracy,
                "classes_found": int(sums["found"]) / (2 * n)}

    def validate(self, model: nn.Module, device: torch.device, world: World) -> dict[str, float]:
        return self.evaluate(model, self.val, VAL_SEED, self.val_size, device, world)

    def test(self, model: nn.Module, device: torch.device, world: World) -> dict[str, Any]:
        result = self.evaluate(model, self.test_set, TEST_SEED, self.test_size, device, world)
        return {"experiment": "multimnist", "dataset": self.config.dataset,
                "test_accuracy": result["accuracy"], "test_error": result["error"],
                "test_loss": result["loss"], "test_classes_found": result["classes_found"],
                "test_examples": self.test_size, "criterion": CRITERION,
                "parameters": count_parameters(model), "overlay": self.settings.overlay,
                "max_shift": self.config.max_shift, "canvas": self.train.canvas,
                "train_pairs_per_epoch": len(self.train),
                "warmup_steps": self.config.warmup_steps}

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self.settings)}


@torch.no_grad()
def multimnist_figures(model: CapsNet, data: MultiMNIST, out_dir: Path, *, count: int,
                       seed: int = TEST_SEED, device: torch.device | str = "cpu") -> list[Path]:
    """One PNG per test example: the input in gray, and over it the reconstructions from the
    longest capsule (red) and the second longest (green), as in the paper's figure 5."""
    from matplotlib.figure import Figure

    if count <= 0:
        return []
    model.eval()
    batch = next(data.batches(count, seed, size=count, device=device))
    digit_caps, _ = model.capsules(batch.images)
    lengths = safe_norm(digit_caps)
    predicted = top2(lengths)
    recon = model.reconstruct(digit_caps, predicted)  # (count, 2, c, h, w)
    correct = top2_correct(lengths, batch.labels)
    paths = []
    for i in range(count):
        gray = batch.images[i].mean(dim=0).cpu()  # (h, w)
        red, green = recon[i, 0].mean(dim=0).cpu(), recon[i, 1].mean(dim=0).cpu()
        base = 0.45 * gray
        rgb = torch.stack([base + red, base + green, base], dim=-1).clamp(0, 1).numpy()
        figure = Figure(figsize=(4.4, 2.4))
        left, right = figure.subplots(1, 2)
        left.imshow(gray.numpy(), cmap="gray", vmin=0, vmax=1)
        left.set_title(f"input: {int(batch.labels[i, 0])} and {int(batch.labels[i, 1])}",
                       fontsize=9)
        right.imshow(rgb)
        p0, p1 = int(predicted[i, 0]), int(predicted[i, 1])
        right.set_title(f"red {p0}, green {p1} ({'right' if correct[i] else 'wrong'})",
                        fontsize=9)
        for axis in (left, right):
            axis.set_xticks([])
            axis.set_yticks([])
        figure.tight_layout()
        paths.append(save_png(figure, out_dir / f"multimnist-{i:02d}.png"))
    return paths


def run(config: TrainConfig, settings: MultiMNISTSettings, run_dir: str | Path, *,
        data_dir: str | None = None, resume: bool = False, from_best: bool = False,
        show_progress: bool = True) -> dict[str, Any]:
    """Train (or resume) a CapsNet, or another network of the margin loss
    (``config.network``), on MultiMNIST in ``run_dir``; returns the summary."""
    splits = splits_for(config, data_dir)
    task = MultiMNISTTask(config, settings, splits.train.first(config.train_limit), splits.val,
                          splits.test, splits.num_classes)
    trainer = Trainer(task, run_dir, resume=resume, from_best=from_best,
                      show_progress=show_progress)
    summary = trainer.fit()
    run = trainer.run
    if run.main:
        paths = multimnist_figures(trainer.best_model(), task.test_set, run.figures,
                                   count=min(settings.figures, task.test_size),
                                   device=trainer.device)
        summary["figures"] = [str(p) for p in paths]
        run.write_summary(summary)
    return summary


def report(summary: dict[str, Any]) -> str:
    return (f"MultiMNIST test error {summary['test_error']:.2%} (accuracy "
            f"{summary['test_accuracy']:.2%} on {summary['test_examples']} pairs; "
            f"{summary['test_classes_found']:.2%} of the digits among the two longest "
            f"capsules), {summary['wall_seconds']:.0f} s on {summary['device']}")


MULTIMNIST = Experiment(
    name="multimnist", settings=MultiMNISTSettings, run=run, report=report,
    description="Train and test a CapsNet on MultiMNIST: two overlapping digits of different "
                "classes, each shifted up to 4 px, on 36x36, generated on the fly. Test error: "
                "the two longest capsules must be the two classes.",
    train_defaults={**OWN_INPUT, "max_shift": MAX_SHIFT, "warmup_steps": 200},
    # two classes an image: the margin loss, and a decoder for each digit
    networks=tuple(name for name, entry in MODELS.items() if entry.loss == "margin"))
