"""The paper's experiments beyond MNIST: MultiMNIST, and robustness to affine transformations
against a baseline CNN. ``capsnet experiment multimnist|affnist`` runs them.

Both take their settings from a :class:`capsnet.config.TrainConfig` (``paper`` preset: Adam
1e-3 with the official exponential decay, summed reconstruction loss x 0.0005, 3 routing
iterations); ``max_shift`` is the experiment's shift (4 for MultiMNIST, 6 on the 40x40
canvas). One addition to the paper: the learning rate warms up linearly over the first 200
steps (``--warmup-steps``; see :func:`warmup_lr` for why). Generated evaluation sets use
fixed seeds (:data:`VAL_SEED`, :data:`TEST_SEED`), so they are the same in every run
whatever ``--seed``.

multimnist run directory::

    config.json  metrics.jsonl  last.pt  best.pt  summary.json  figures/multimnist-NN.png

affnist run directory::

    config.json  summary.json  figures/affine-test.png
    capsnet/  metrics.jsonl  last.pt  best.pt       (per model trained)
    cnn/      metrics.jsonl  last.pt  best.pt

"best" is the epoch with the highest validation accuracy (MultiMNIST: top-2 exact match on
pairs made from the validation digits; affnist: translated 40x40 validation digits). Runs
cannot be resumed; checkpoints are written atomically after each epoch.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
import torch.nn.functional as F
from tqdm import tqdm

from ..data.affine import AffineRanges, AffineTestSet, load_affnist, pad_split, translation_range
from ..nn.baseline import ARCHITECTURE as CNN_ARCHITECTURE
from ..nn.baseline import VARIANTS as CNN_VARIANTS
from ..nn.baseline import BaselineCNN, BaselineConfig
from ..training.checkpoint import save_checkpoint
from ..training.config import DEVICES, PRECISIONS, TrainConfig, learning_rate, make_config
from ..data import Split, Splits, batches, load_splits
from ..errors import CapsNetError
from ..training.evaluate import autocast, resolve_device
from ..utils.files import save_png
from ..nn.layers import safe_norm
from ..nn.losses import capsule_loss
from ..nn.model import CapsNet, CapsNetConfig, count_parameters
from ..data.multimnist import (OVERLAYS, MultiMNIST, multimnist_loss, top2, top2_correct,
                         two_digit_forward)
from ..training.trainer import LOG_EVERY, MetricsLog, device_name, epoch_seed, write_json

VAL_SEED = 1_000_001
TEST_SEED = 2_017_000
MULTIMNIST_SHIFT = 4
AFFNIST_CANVAS = 40
MODELS = ("capsnet", "cnn")

# A training step returns (loss, number correct, number of examples), all on the device.
StepFn = Callable[[Any], tuple[Tensor, Tensor, int]]


# ---------------------------------------------------------------------------------------
# Shared pieces


def new_run_dir(run_dir: Path) -> Path:
    """``run_dir``, refusing one that already holds a finished or started run. The folder
    is created by the first file written into it, so a run that fails early leaves none."""
    for name in ("summary.json", "last.pt", "capsnet/last.pt", "cnn/last.pt"):
        if (run_dir / name).exists():
            raise CapsNetError(f"{run_dir} already holds a run ({name}); choose another --run-dir")
    return run_dir


def limited(split: Split, limit: int) -> Split:
    return split if not limit else Split(split.images[:limit], split.labels[:limit])


def load_data(config: TrainConfig, data_dir: str | None, device: torch.device) -> Splits:
    """The data set's splits, the training split cut to ``train_limit``, on the GPU if used."""
    splits = load_splits(config.dataset, data_dir, config.val_size)
    splits.train = limited(splits.train, config.train_limit)
    if device.type == "cuda":
        splits.train, splits.val, splits.test = (s.to(device) for s in
                                                 (splits.train, splits.val, splits.test))
    return splits


def capsnet_for(config: TrainConfig, splits: Splits, image_size: int) -> CapsNet:
    torch.manual_seed(config.seed)
    return CapsNet(CapsNetConfig(image_size=image_size, in_channels=splits.in_channels,
                                 num_classes=splits.num_classes,
                                 routing_iterations=config.routing_iterations))


def fit(model: nn.Module, *, name: str, config: TrainConfig, device: torch.device,
        out_dir: Path, epoch_batches: Callable[[int], Iterable[Any]], n_batches: int,
        step: StepFn, validate: Callable[[], dict[str, float]], extra: dict[str, Any],
        progress: bool, warmup_steps: int = 0) -> dict[str, Any]:
    """Train ``model`` for ``config.epochs``: Adam with the config's decaying learning rate
    (times a linear warmup over the first ``warmup_steps`` steps, see :func:`warmup_lr`),
    one validation per epoch, ``last.pt`` and ``best.pt`` (highest validation accuracy) in
    ``out_dir``, one line per epoch in ``out_dir/metrics.jsonl``. Returns training stats."""
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = MetricsLog(out_dir, 0)
    # The keys capsnet.checkpoint checks, plus the accuracy that picks the best epoch here;
    # best_val_loss is the validation loss of that epoch where there is one (else inf).
    progress_state = {"epoch": 0, "batch": 0, "step": 0, "best_val_loss": math.inf,
                      "best_val_accuracy": -math.inf}
    best_path = out_dir / "best.pt"
    train_seconds, train_images = 0.0, 0

    def payload() -> dict[str, Any]:
        return {"model_config": model.config.to_dict(), "train_config": config.to_dict(),
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "progress": dict(progress_state), **extra}

    try:
        for epoch in range(config.epochs):
            model.train()
            losses: list[Tensor] = []
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen, began = 0, time.perf_counter()
            bar = tqdm(total=n_batches, desc=f"{name} epoch {epoch + 1}/{config.epochs}",
                       disable=not progress, leave=False, dynamic_ncols=True)
            for index, batch in enumerate(epoch_batches(epoch_seed(config, epoch))):
                for group in optimizer.param_groups:
                    group["lr"] = warmup_lr(config, progress_state["step"], warmup_steps)
                with autocast(device, config.precision):
                    loss, n_correct, n = step(batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                progress_state["step"] += 1
                losses.append(loss.detach())
                correct += n_correct
                seen += n
                if len(losses) % LOG_EVERY == 0 or index + 1 == n_batches:
                    check_finite(losses, name)
                    bar.set_postfix(loss=f"{losses[-1].item():.4f}",
                                    acc=f"{correct.item() / seen:.4f}",
                                    img_s=f"{seen / (time.perf_counter() - began):.0f}")
                    bar.update(index + 1 - bar.n)
            bar.close()
            check_finite(losses, name)
            seconds = time.perf_counter() - began
            train_seconds += seconds
            train_images += seen
            val = validate()
            improved = val["accuracy"] > progress_state["best_val_accuracy"]
            progress_state.update(epoch=epoch + 1)
            if improved:
                progress_state["best_val_accuracy"] = val["accuracy"]
                progress_state["best_val_loss"] = float(val.get("loss", math.inf))
            record = {"epoch": epoch + 1, "step": progress_state["step"],
                      "lr": warmup_lr(config, progress_state["step"], warmup_steps),
                      "train_loss": torch.stack(losses).mean().item() if losses else math.nan,
                      "train_accuracy": correct.item() / max(seen, 1),
                      **{f"val_{k}": v for k, v in val.items()},
                      "images_per_s": seen / max(seconds, 1e-9), "epoch_seconds": seconds,
                      "improved": improved}
            log.write(record)
            if improved:
                save_checkpoint(best_path, payload())
            save_checkpoint(out_dir / "last.pt", payload())
            if progress:
                tqdm.write(f"{name} epoch {epoch + 1}: train loss {record['train_loss']:.5f} acc "
                           f"{record['train_accuracy']:.4f} | val acc {val['accuracy']:.4f}"
                           f"{' (best)' if improved else ''} | {record['images_per_s']:.0f} img/s")
    finally:
        log.close()
    return {"epochs": progress_state["epoch"], "steps": progress_state["step"],
            "best_val_accuracy": progress_state["best_val_accuracy"],
            "train_seconds": train_seconds, "train_images": train_images,
            "train_images_per_s": train_images / train_seconds if train_seconds else None,
            "checkpoint": str(best_path)}


def warmup_lr(config: TrainConfig, step: int, warmup_steps: int) -> float:
    """The config's learning rate at ``step``, times ``min(1, (step + 1) / warmup_steps)``.

    Not in the paper. Measured on CPU with this CapsNet (W init N(0, 0.1)): at 36x36 and
    40x40 (3,200 and 4,608 primary capsules) one or two Adam steps at the full 1e-3 push
    every digit capsule to length ~0.99, where squash saturates, and training stalls with a
    margin loss near 3; with a warmup the lengths stay discriminative.
    """
    scale = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return learning_rate(config, step) * scale


def check_finite(losses: list[Tensor], name: str) -> None:
    if losses and not bool(torch.isfinite(torch.stack(losses)).all()):
        raise CapsNetError(f"{name}: the loss stopped being finite; training stopped")


def load_best(model: nn.Module, path: Path) -> nn.Module:
    """Load the weights of checkpoint ``path`` (written by :func:`fit`) into ``model``."""
    from ..training.checkpoint import load_checkpoint

    model.load_state_dict(load_checkpoint(path)["model"])
    return model


# ---------------------------------------------------------------------------------------
# MultiMNIST


@torch.no_grad()
def evaluate_multimnist(model: CapsNet, data: MultiMNIST, *, seed: int, size: int,
                        batch_size: int, device: torch.device, reconstruction_weight: float,
                        reduction: str, precision: str = "fp32") -> dict[str, float]:
    """Top-2 exact-match accuracy (paper) and the two-target loss (reconstructions masked by
    the true classes) on ``size`` examples of the pass with ``seed``. ``classes_found`` is the
    fraction of true classes among the two longest capsules (chance 0.2 for 10 classes), a
    softer measure for short runs; the paper's figure is ``error``."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(5, device=device, dtype=torch.float64)  # loss, margin, recon, right, found
    for batch in data.batches(batch_size, seed, size=size, device=device):
        with autocast(device, precision):
            lengths, recon = two_digit_forward(model, batch.images, batch.labels)
        total, margin, rec = multimnist_loss(lengths.float(), recon.float(), batch.digits,
                                             batch.labels, reconstruction_weight, reduction)
        n = len(batch.labels)
        correct = top2_correct(lengths.float(), batch.labels).sum()
        found = (top2(lengths.float()).unsqueeze(2) == batch.labels.unsqueeze(1)).any(dim=2).sum()
        sums += torch.stack([total.double() * n, margin.double() * n, rec.double() * n,
                             correct.double(), found.double() / 2])
    model.train(was_training)
    loss, margin, rec, correct, found = (sums / max(size, 1)).tolist()
    return {"loss": loss, "margin_loss": margin, "reconstruction_loss": rec,
            "accuracy": correct, "error": 1.0 - correct, "classes_found": found, "total": size}


@torch.no_grad()
def multimnist_figures(model: CapsNet, data: MultiMNIST, out_dir: Path, *, count: int,
                       seed: int = TEST_SEED, device: torch.device | str = "cpu") -> list[Path]:
    """One PNG per test example: the input in gray, and over it the reconstructions from the
    longest capsule (red) and the second longest (green), as in the paper's figure 5."""
    from matplotlib.figure import Figure

    if count <= 0:
        return []
    was_training = model.training
    model.eval()
    batch = next(data.batches(count, seed, size=count, device=device))
    digit_caps, _ = model.capsules(batch.images)
    lengths = safe_norm(digit_caps)
    predicted = top2(lengths)
    _, recon = two_digit_forward(model, batch.images, predicted)
    correct = top2_correct(lengths, batch.labels)
    model.train(was_training)
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


def run_multimnist(config: TrainConfig, run_dir: str | Path, *, data_dir: str | None = None,
                   test_limit: int = 0, overlay: str = "max", figures: int = 8,
                   warmup_steps: int = 200, progress: bool = True) -> dict[str, Any]:
    """Train a CapsNet on MultiMNIST made from the training digits (validation pairs from the
    validation digits) and test it on pairs of test digits; returns the summary."""
    began = time.perf_counter()
    device = resolve_device(config.device)
    run_dir = new_run_dir(Path(run_dir))
    splits = load_data(config, data_dir, device)
    train = MultiMNIST(splits.train, config.max_shift, overlay, splits.num_classes)
    val = MultiMNIST(splits.val, config.max_shift, overlay, splits.num_classes)
    test = MultiMNIST(splits.test, config.max_shift, overlay, splits.num_classes)
    val_size = min(len(val), test_limit) if test_limit else len(val)
    test_size = min(len(test), test_limit) if test_limit else len(test)
    model = capsnet_for(config, splits, train.canvas).to(device)
    write_json(run_dir / "config.json", {"experiment": "multimnist", "train": config.to_dict(),
                                         "model": model.config.to_dict(), "overlay": overlay,
                                         "test_limit": test_limit, "warmup_steps": warmup_steps})

    def step(batch: Any) -> tuple[Tensor, Tensor, int]:
        lengths, recon = two_digit_forward(model, batch.images, batch.labels)
        loss, _, _ = multimnist_loss(lengths.float(), recon.float(), batch.digits, batch.labels,
                                     config.reconstruction_weight,
                                     config.reconstruction_reduction)
        return loss, top2_correct(lengths.detach().float(), batch.labels).sum(), len(batch.labels)

    def evaluate_on(data: MultiMNIST, seed: int, size: int) -> dict[str, float]:
        return evaluate_multimnist(model, data, seed=seed, size=size,
                                   batch_size=config.eval_batch_size, device=device,
                                   reconstruction_weight=config.reconstruction_weight,
                                   reduction=config.reconstruction_reduction,
                                   precision=config.precision)

    stats = fit(model, name="multimnist", config=config, device=device, out_dir=run_dir,
                epoch_batches=lambda seed: train.batches(config.batch_size, seed, device=device),
                n_batches=math.ceil(len(train) / config.batch_size), step=step,
                validate=lambda: evaluate_on(val, VAL_SEED, val_size),
                extra={"experiment": "multimnist", "architecture": "capsnet"}, progress=progress,
                warmup_steps=warmup_steps)
    load_best(model, Path(stats["checkpoint"]))
    result = evaluate_on(test, TEST_SEED, test_size)
    paths = multimnist_figures(model, test, run_dir / "figures", count=min(figures, test_size),
                               device=device)
    summary = {"experiment": "multimnist", "dataset": config.dataset,
               "test_accuracy": result["accuracy"], "test_error": result["error"],
               "test_loss": result["loss"], "test_classes_found": result["classes_found"],
               "test_examples": result["total"], "warmup_steps": warmup_steps,
               "criterion": "the two longest capsules are exactly the two classes",
               **stats, "parameters": count_parameters(model), "overlay": overlay,
               "max_shift": config.max_shift, "canvas": train.canvas,
               "train_pairs_per_epoch": len(train), "wall_seconds": time.perf_counter() - began,
               "device": device_name(device), "torch": torch.__version__,
               "figures": [str(p) for p in paths]}
    write_json(run_dir / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------
# Affine robustness


@torch.no_grad()
def classify(model: nn.Module, images: Tensor) -> Tensor:
    """Predicted classes of a CapsNet (longest capsule) or of the baseline CNN (largest logit)."""
    if isinstance(model, CapsNet):
        digit_caps, _ = model.capsules(images)
        return safe_norm(digit_caps).argmax(dim=1)
    return model(images).argmax(dim=1)


@torch.no_grad()
def accuracy(model: nn.Module, batch_iter: Iterable[tuple[Tensor, Tensor]], device: torch.device,
             precision: str = "fp32") -> float:
    """Fraction of correct predictions of ``model`` (in eval mode) over ``batch_iter``."""
    was_training = model.training
    model.eval()
    correct = torch.zeros((), dtype=torch.int64, device=device)
    total = 0
    for images, labels in batch_iter:
        with autocast(device, precision):
            predictions = classify(model, images)
        correct += (predictions == labels).sum()
        total += len(labels)
    model.train(was_training)
    return correct.item() / max(total, 1)


def affine_figure(path: Path, images: Tensor, labels: Tensor,
                  predictions: dict[str, Tensor]) -> Path:
    """A grid of affine test images, each titled with its label and every model's prediction."""
    from matplotlib.figure import Figure

    n = len(images)
    cols = min(n, 8)
    rows = math.ceil(n / cols)
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


def run_affnist(config: TrainConfig, run_dir: str | Path, *, data_dir: str | None = None,
                test_limit: int = 0, models: tuple[str, ...] = MODELS,
                cnn_variant: str = "pooled", affnist_dir: str | None = None,
                ranges: AffineRanges | None = None, figures: int = 16,
                warmup_steps: int = 200, progress: bool = True) -> dict[str, Any]:
    """Train each of ``models`` on digits placed at random on a 40x40 canvas; test each on the
    translated test digits, on affine-transformed test digits and, with ``affnist_dir``, on
    the real affNIST test set. Returns the summary."""
    began = time.perf_counter()
    ranges = ranges or AffineRanges()
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        raise CapsNetError(f"models must be among {', '.join(MODELS)}, got {models}")
    device = resolve_device(config.device)
    run_dir = new_run_dir(Path(run_dir))
    # Read the affNIST files first: a bad path should fail before hours of training.
    affnist = load_affnist(affnist_dir, test_limit) if affnist_dir else None
    if affnist is not None and device.type == "cuda":
        affnist = affnist.to(device)
    splits = load_data(config, data_dir, device)
    if splits.image_size > AFFNIST_CANVAS:
        raise CapsNetError(f"{config.dataset}: {splits.image_size}x{splits.image_size} images "
                           f"do not fit the {AFFNIST_CANVAS}x{AFFNIST_CANVAS} canvas")
    # Digits go anywhere on the canvas: shifts up to the padding, (40 - 28) / 2 = 6 for MNIST.
    config = replace(config, max_shift=translation_range(splits.image_size, AFFNIST_CANVAS))
    train = pad_split(splits.train, AFFNIST_CANVAS)
    val = limited(pad_split(splits.val, AFFNIST_CANVAS), test_limit)
    test = limited(pad_split(splits.test, AFFNIST_CANVAS), test_limit)
    affine_test = AffineTestSet(splits.test, TEST_SEED, ranges, AFFNIST_CANVAS, test_limit)
    write_json(run_dir / "config.json", {
        "experiment": "affnist", "train": config.to_dict(), "models": list(models),
        "cnn_variant": cnn_variant, "affine_ranges": ranges.to_dict(), "canvas": AFFNIST_CANVAS,
        "test_limit": test_limit, "affnist_dir": affnist_dir, "warmup_steps": warmup_steps})
    eval_batch = config.eval_batch_size

    def translated(split: Split, seed: int) -> Iterator[tuple[Tensor, Tensor]]:
        return batches(split, eval_batch, seed=seed, max_shift=config.max_shift, device=device)

    results: dict[str, Any] = {}
    trained: dict[str, nn.Module] = {}
    for name in models:
        if name == "capsnet":
            model: nn.Module = capsnet_for(config, splits, AFFNIST_CANVAS)
        else:
            torch.manual_seed(config.seed)
            model = BaselineCNN(BaselineConfig(image_size=AFFNIST_CANVAS,
                                               in_channels=splits.in_channels,
                                               num_classes=splits.num_classes,
                                               variant=cnn_variant))
        model.to(device)

        def step(batch: tuple[Tensor, Tensor], model: nn.Module = model
                 ) -> tuple[Tensor, Tensor, int]:
            images, labels = batch
            if isinstance(model, CapsNet):
                out = model(images, labels)
                loss, _, _ = capsule_loss(out.lengths.float(), out.reconstructions.float(), images,
                                          labels, config.reconstruction_weight,
                                          config.reconstruction_reduction)
                predictions = out.predictions
            else:
                logits = model(images).float()
                loss = F.cross_entropy(logits, labels)
                predictions = logits.argmax(dim=1)
            return loss, (predictions.detach() == labels).sum(), len(labels)

        def validate(model: nn.Module = model) -> dict[str, float]:
            return {"accuracy": accuracy(model, translated(val, VAL_SEED), device,
                                         config.precision)}

        architecture = "capsnet" if name == "capsnet" else CNN_ARCHITECTURE
        stats = fit(model, name=name, config=config, device=device, out_dir=run_dir / name,
                    epoch_batches=lambda seed: batches(train, config.batch_size, seed=seed,
                                                       max_shift=config.max_shift,
                                                       device=device),
                    n_batches=math.ceil(len(train) / config.batch_size), step=step,
                    validate=validate, progress=progress, warmup_steps=warmup_steps,
                    extra={"experiment": "affnist", "architecture": architecture})
        load_best(model, Path(stats["checkpoint"]))
        result = {"parameters": count_parameters(model),
                  "translated_test_accuracy": accuracy(model, translated(test, TEST_SEED),
                                                       device, config.precision),
                  "affine_test_accuracy": accuracy(model, affine_test.batches(eval_batch, device),
                                                   device, config.precision)}
        if affnist is not None:
            result["affnist_test_accuracy"] = accuracy(
                model, batches(affnist, eval_batch, device=device), device, config.precision)
        if name == "cnn":
            result["variant"] = cnn_variant
        results[name] = {**result, **stats}
        trained[name] = model
        if progress:
            tqdm.write(f"{name}: translated test {result['translated_test_accuracy']:.2%}, "
                       f"affine test {result['affine_test_accuracy']:.2%}"
                       + (f", affNIST {result['affnist_test_accuracy']:.2%}"
                          if affnist is not None else ""))

    paths = []
    count = min(figures, len(affine_test))
    if count > 0:
        images, labels, _ = affine_test.batch(0, count, device)
        predictions = {name: classify(model.eval(), images) for name, model in trained.items()}
        paths.append(affine_figure(run_dir / "figures" / "affine-test.png", images, labels,
                                   predictions))
    summary = {"experiment": "affnist", "dataset": config.dataset, "models": results,
               "test_examples": {"translated": len(test), "affine": len(affine_test),
                                 "affnist": len(affnist) if affnist is not None else None},
               "affine_ranges": ranges.to_dict(), "canvas": AFFNIST_CANVAS,
               "max_shift": config.max_shift, "affnist_dir": affnist_dir,
               "warmup_steps": warmup_steps,
               "wall_seconds": time.perf_counter() - began, "device": device_name(device),
               "torch": torch.__version__, "figures": [str(p) for p in paths]}
    write_json(run_dir / "summary.json", summary)
    return summary


# ---------------------------------------------------------------------------------------
# Command line: capsnet experiment multimnist|affnist


def add_experiment(sub: argparse._SubParsersAction) -> None:
    """Register ``capsnet experiment`` with its two sub-commands."""
    from ..cli import ArgumentParser, non_negative_int, positive_float, positive_int

    p = sub.add_parser("experiment", help="the paper's MultiMNIST and affine-robustness "
                       "experiments", description="Experiments beyond MNIST.")
    experiments = p.add_subparsers(dest="experiment", required=True, parser_class=ArgumentParser)
    descriptions = {
        "multimnist": "Train and test a CapsNet on MultiMNIST: two overlapping digits of "
                      "different classes, each shifted up to 4 px, on 36x36, generated on the "
                      "fly. Test error: the two longest capsules must be the two classes.",
        "affnist": "Train a CapsNet and/or a baseline CNN on digits placed at random on a "
                   "40x40 canvas, then test on translated and on affine-transformed test "
                   "digits (and on real affNIST test files with --affnist-dir).",
    }
    for name, description in descriptions.items():
        e = experiments.add_parser(name, help=description.split(":")[0].split(",")[0],
                                   description=description)
        e.add_argument("--dataset", default="mnist",
                       help="mnist, fashion-mnist, or a folder of IDX files (default mnist)")
        e.add_argument("--epochs", type=positive_int, default=30)
        e.add_argument("--batch-size", type=positive_int, default=128)
        e.add_argument("--train-limit", type=non_negative_int, default=0,
                       help="use the first N training digits only (0: all)")
        e.add_argument("--test-limit", type=non_negative_int, default=0,
                       help="at most N examples in each validation and test set (0: all)")
        e.add_argument("--val-size", type=positive_int, default=5000,
                       help="training digits held out for validation (default 5000)")
        e.add_argument("--routing-iterations", type=positive_int, default=3)
        e.add_argument("--lr", type=positive_float, default=None, help="Adam learning rate")
        e.add_argument("--warmup-steps", type=non_negative_int, default=200,
                       help="raise the learning rate linearly over the first N steps "
                            "(default 200; 0: none, as the paper)")
        e.add_argument("--reconstruction-weight", type=float, default=None)
        e.add_argument("--seed", type=non_negative_int, default=0)
        e.add_argument("--precision", choices=PRECISIONS, default="fp32")
        e.add_argument("--run-dir", type=Path, help=f"default: runs/{name}-<dataset>")
        e.add_argument("--figures", type=non_negative_int, default=8 if name == "multimnist"
                       else 16, help="test examples to draw (0: none)")
        e.add_argument("--no-progress", action="store_true", help="no progress bars")
        e.add_argument("--data-dir", help="folder holding the data set's IDX files "
                       "(default: $CAPSNET_DATA_DIR, then the cache, then download)")
        e.add_argument("--device", choices=DEVICES, default="auto")
        e.set_defaults(run=run_experiment)
    multi, aff = experiments.choices["multimnist"], experiments.choices["affnist"]
    multi.add_argument("--overlay", choices=OVERLAYS, default="max",
                       help="max: pixel-wise maximum (default); sum: sum clipped at 1, as the "
                            "official generation script")
    aff.add_argument("--model", choices=("capsnet", "cnn", "both"), default="both")
    aff.add_argument("--cnn-variant", choices=CNN_VARIANTS, default="pooled",
                     help="pooled: max pooling after conv 1 and 2, 6.7M parameters (default); "
                          "paper: the paper's MNIST baseline, no pooling, 69.7M on 40x40")
    aff.add_argument("--affnist-dir", help="affNIST test .mat file, or a folder with test.mat "
                     "or the test batches 1.mat..32.mat (needs scipy)")
    defaults = AffineRanges()
    aff.add_argument("--max-rotation", type=float, default=defaults.max_rotation_deg,
                     help="degrees (default %(default)s)")
    aff.add_argument("--max-shear", type=float, default=defaults.max_shear,
                     help="horizontal shear factor (default %(default)s)")
    aff.add_argument("--min-scale", type=positive_float, default=defaults.min_scale)
    aff.add_argument("--max-scale", type=positive_float, default=defaults.max_scale)


def run_experiment(args: argparse.Namespace) -> int:
    multimnist = args.experiment == "multimnist"
    shift = MULTIMNIST_SHIFT if multimnist else 0  # affnist: set from the image size
    config = make_config("paper", dataset=args.dataset, epochs=args.epochs,
                         batch_size=args.batch_size, train_limit=args.train_limit,
                         val_size=args.val_size, routing_iterations=args.routing_iterations,
                         lr=args.lr, reconstruction_weight=args.reconstruction_weight,
                         seed=args.seed, precision=args.precision, device=args.device,
                         max_shift=shift)
    run_dir = args.run_dir or Path("runs") / f"{args.experiment}-{Path(args.dataset).name}"
    common = dict(data_dir=args.data_dir, test_limit=args.test_limit, figures=args.figures,
                  warmup_steps=args.warmup_steps, progress=not args.no_progress)
    if multimnist:
        s = run_multimnist(config, run_dir, overlay=args.overlay, **common)
        print(f"MultiMNIST test error {s['test_error']:.2%} (accuracy {s['test_accuracy']:.2%} "
              f"on {s['test_examples']} pairs; {s['test_classes_found']:.2%} of the digits among "
              f"the two longest capsules), {s['wall_seconds']:.0f} s on {s['device']}")
    else:
        ranges = AffineRanges(args.max_rotation, args.max_shear, args.min_scale, args.max_scale)
        models = MODELS if args.model == "both" else (args.model,)
        s = run_affnist(config, run_dir, models=models, cnn_variant=args.cnn_variant,
                        affnist_dir=args.affnist_dir, ranges=ranges, **common)
        columns = ["translated_test_accuracy", "affine_test_accuracy"]
        if args.affnist_dir:
            columns.append("affnist_test_accuracy")
        print(f"{'model':8} {'params':>10} " + " ".join(f"{c.split('_test')[0]:>11}"
                                                         for c in columns))
        for name, r in s["models"].items():
            print(f"{name:8} {r['parameters']:>10,} " + " ".join(f"{r[c]:>11.2%}"
                                                                 for c in columns))
        print(f"{s['wall_seconds']:.0f} s on {s['device']}")
    print(f"summary: {Path(run_dir) / 'summary.json'}")
    return 0
