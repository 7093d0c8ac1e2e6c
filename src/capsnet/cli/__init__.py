"""The ``capsnet`` command: train, evaluate, predict, figures, data.

Every problem the user can fix ends in one line on stderr and exit code 2; Ctrl-C during
training saves a resumable checkpoint and exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sequence

from ..training.config import (DEVICES, MARGIN_FORMS, PRECISIONS, PRESETS, REDUCTIONS, RESUME_MAY_CHANGE,
                     VAL_SPLITS, TrainConfig, make_config)
from ..nn.layers import PRIMARY_STYLES
from ..nn.model import INITS
from ..tools.bench import add_bench
from ..errors import CapsNetError
from ..experiments.legacy import add_experiment
from ..tools.explore import add_explore
from ..tools.export import add_export

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports errors in one line, with our exit code."""

    def error(self, message: str) -> None:  # type: ignore[override]
        command = self.prog.partition(" ")[2]
        raise CapsNetError(f"{command}: {message}" if command else message)


def int_at_least(low: int, name: str) -> Callable[[str], int]:
    """An argparse type for integers >= ``low``, described as ``name`` in errors."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = low - 1
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
non_negative_int = int_at_least(0, "an integer >= 0")


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder holding the data set's IDX files "
                        "(default: $CAPSNET_DATA_DIR, then the cache, then download)")
    parser.add_argument("--device", choices=DEVICES, default="auto")


# -- train ------------------------------------------------------------------------------

def add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a CapsNet, validate each epoch, test the best",
                       description="Train a CapsNet. A preset sets every default; flags override it.")
    p.add_argument("--preset", choices=tuple(PRESETS), default="paper",
                   help="paper: 3 iterations, shifts, summed reconstruction, lr decay (default); "
                        "seed: the notebook exactly; quick: the paper's model briefly, for a CPU")
    p.add_argument("--dataset", help="mnist, fashion-mnist, or a folder of IDX files")
    p.add_argument("--epochs", type=positive_int)
    p.add_argument("--batch-size", type=positive_int)
    p.add_argument("--routing-iterations", type=positive_int)
    p.add_argument("--lr", type=positive_float, help="Adam learning rate")
    p.add_argument("--lr-decay", type=positive_float, help="factor per --lr-decay-steps steps")
    p.add_argument("--lr-decay-steps", type=positive_int)
    p.add_argument("--max-shift", type=non_negative_int, help="random shift in pixels (0: none)")
    p.add_argument("--reconstruction-reduction", choices=REDUCTIONS)
    p.add_argument("--reconstruction-weight", type=float)
    p.add_argument("--margin-loss", choices=MARGIN_FORMS,
                   help="paper: eq. 4; official: the official code's (half, mean over classes)")
    p.add_argument("--init", choices=INITS, help="weight initialisation")
    p.add_argument("--primary-style", choices=PRIMARY_STYLES,
                   help="notebook: ReLU before squash; official: no ReLU, convolution / maps")
    p.add_argument("--routing-bias", action=argparse.BooleanOptionalAction, default=None,
                   help="learned bias on s_j in every routing iteration (official code)")
    p.add_argument("--val-size", type=positive_int)
    p.add_argument("--val-split", choices=VAL_SPLITS,
                   help="hold out the first (TensorFlow's, default) or last training images")
    p.add_argument("--train-limit", type=non_negative_int,
                   help="train on the first N training images only (0: all)")
    p.add_argument("--seed", type=non_negative_int)
    p.add_argument("--precision", choices=PRECISIONS)
    p.add_argument("--compile", action="store_true", default=None, help="compile the routing layer with torch.compile")
    p.add_argument("--deterministic", action="store_true", default=None)
    p.add_argument("--run-dir", type=Path, help="where checkpoints and logs go "
                   "(default: runs/<dataset>-<preset>)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR",
                   help="continue the run in RUN_DIR where it stopped")
    p.add_argument("--init-from", type=Path, metavar="CHECKPOINT",
                   help="start a new run from a checkpoint's weights and optimizer state "
                        "(the notebook's restore_checkpoint=True)")
    p.add_argument("--figures", action="store_true", help="draw the figures at the end")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_data_args(p)
    p.set_defaults(run=run_train)


def run_train(args: argparse.Namespace) -> int:
    from ..training.trainer import train

    overrides = {name: getattr(args, name) for name in (
        "dataset", "epochs", "batch_size", "routing_iterations", "lr", "lr_decay",
        "lr_decay_steps", "max_shift", "reconstruction_reduction", "reconstruction_weight",
        "margin_loss", "init", "primary_style", "routing_bias", "val_size", "val_split",
        "train_limit", "seed", "precision", "compile", "deterministic")}
    overrides["device"] = args.device
    config = make_config(args.preset, **overrides)
    if args.resume is not None:
        if not (args.resume / "last.pt").is_file():
            raise CapsNetError(f"--resume {args.resume}: no last.pt there to resume from")
        from ..training.checkpoint import load_checkpoint

        saved = load_checkpoint(args.resume / "last.pt").get("train_config") or {}
        for name, value in overrides.items():
            # A resumed run keeps its settings; only how long and where it runs may change.
            if name not in RESUME_MAY_CHANGE and value is not None and name in saved \
                    and value != saved[name]:
                raise CapsNetError(f"--resume keeps the run's settings: {name} is "
                                   f"{saved[name]!r} there, not {value!r} (only --epochs, "
                                   f"--device and --compile may change)")
        if args.epochs is None:  # continue to the run's own epochs, not the preset's default
            config = replace(config, epochs=saved.get("epochs", config.epochs))
        run_dir = args.resume
    else:
        run_dir = args.run_dir or Path("runs") / f"{Path(config.dataset).name}-{config.preset}"
        if (run_dir / "last.pt").exists():
            raise CapsNetError(f"{run_dir} already holds a run; use --resume {run_dir} to continue "
                               f"it or --run-dir to start a new one")
    if args.init_from is not None and args.resume is not None:
        raise CapsNetError("--init-from starts a new run; it cannot be combined with --resume")
    summary = train(config, run_dir, data_dir=args.data_dir, resume=args.resume is not None,
                    init_from=args.init_from, progress=not args.no_progress)
    speed = summary["train_images_per_s"]  # None when a resumed run had nothing left to train
    print(f"test accuracy {summary['test_accuracy']:.2%}, test loss {summary['test_loss']:.5f}, "
          f"{summary['wall_seconds']:.0f} s, "
          f"{'no training' if speed is None else f'{speed:.0f} images/s'} on {summary['device']}")
    print(f"best checkpoint: {summary['checkpoint']}; summary: {run_dir / 'summary.json'}")
    if args.figures:
        from ..tools.figures import draw_figures

        paths = draw_figures(summary["checkpoint"], run_dir / "figures",
                             data_dir=args.data_dir, run_dir=run_dir)
        print(f"figures: {run_dir / 'figures'} ({len(paths)} files)")
    return 0


# -- evaluate ---------------------------------------------------------------------------

def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, loss, per-class accuracy, confusion matrix")
    p.add_argument("checkpoint", type=Path, help="a .pt file or a run directory")
    p.add_argument("--dataset", help="override the data set the checkpoint was trained on")
    p.add_argument("--split", choices=("test", "val"), default="test")
    p.add_argument("--batch-size", type=positive_int, default=500)
    p.add_argument("--json", action="store_true", help="print JSON")
    add_data_args(p)
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from ..training.checkpoint import load_model
    from ..data import load_splits
    from ..training.evaluate import evaluate, resolve_device

    model, payload = load_model(args.checkpoint)
    train_config = TrainConfig.from_dict(payload.get("train_config") or {})
    dataset = args.dataset or train_config.dataset
    splits = load_splits(dataset, args.data_dir, train_config.val_size, train_config.val_split)
    check_fits(model, splits.image_size, splits.in_channels, splits.num_classes, dataset)
    device = resolve_device(args.device)
    result = evaluate(model.to(device), getattr(splits, args.split), batch_size=args.batch_size,
                      device=device, reconstruction_weight=train_config.reconstruction_weight,
                      reduction=train_config.reconstruction_reduction,
                      margin_form=train_config.margin_loss)
    if args.json:
        print(json.dumps({"checkpoint": str(args.checkpoint), "dataset": dataset,
                          "split": args.split, **result.to_dict()}))
        return 0
    print(f"{dataset} {args.split}: accuracy {result.accuracy:.2%} "
          f"({round(result.accuracy * result.total)}/{result.total}), loss {result.loss:.5f}")
    print("per class: " + "  ".join(f"{name} {acc:.2%}" for name, acc in
                                    zip(splits.class_names, result.per_class_accuracy)))
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(splits.class_names, result.confusion.tolist()):
        print(f"{name[:5]:>5} " + " ".join(f"{v:5d}" for v in row))
    return 0


def check_fits(model: Any, image_size: int, in_channels: int, num_classes: int,
               dataset: str) -> None:
    config = model.config
    if (config.image_size, config.in_channels, config.num_classes) != (
            image_size, in_channels, num_classes):
        raise CapsNetError(
            f"the checkpoint's model takes {config.in_channels}x{config.image_size}x"
            f"{config.image_size} images and {config.num_classes} classes; {dataset} has "
            f"{in_channels}x{image_size}x{image_size} and {num_classes}")


# -- predict ----------------------------------------------------------------------------

def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify your own images (PNG, JPEG or .npy)")
    p.add_argument("checkpoint", type=Path)
    p.add_argument("images", type=Path, nargs="+")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--no-preprocess", action="store_true",
                   help="use the image as it is (resized only), without MNIST-style centring")
    p.set_defaults(run=run_predict)


def run_predict(args: argparse.Namespace) -> int:
    import torch

    from ..training.checkpoint import load_model
    from ..data.images import load_image

    model, _ = load_model(args.checkpoint)
    config = model.config
    images = torch.stack([
        torch.from_numpy(load_image(path, config.image_size, config.in_channels,
                                    preprocess=not args.no_preprocess))
        for path in args.images])  # (n, channels, size, size)
    with torch.no_grad():
        out = model(images)
    for path, prediction, lengths in zip(args.images, out.predictions.tolist(),
                                         out.lengths.tolist()):
        if args.json:
            print(json.dumps({"image": str(path), "prediction": prediction,
                              "lengths": [round(v, 6) for v in lengths]}))
        else:
            print(f"{path}: {prediction}  lengths " + " ".join(f"{v:.3f}" for v in lengths))
    return 0


# -- figures ----------------------------------------------------------------------------

def add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="the notebook's figures as PNG files")
    p.add_argument("checkpoint", type=Path, help="a .pt file or a run directory")
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("--samples", type=positive_int, default=5, help="test digits per figure")
    p.add_argument("--data-dir")
    p.set_defaults(run=run_figures)


def run_figures(args: argparse.Namespace) -> int:
    from ..tools.figures import draw_figures

    run_dir = args.checkpoint if args.checkpoint.is_dir() else args.checkpoint.parent
    paths = draw_figures(args.checkpoint, args.out, data_dir=args.data_dir, run_dir=run_dir,
                         n_samples=args.samples)
    for path in paths:
        print(path)
    return 0


# -- data -------------------------------------------------------------------------------

def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch and verify a data set into the cache")
    p.add_argument("dataset", nargs="?", default="mnist")
    p.add_argument("--data-dir")
    p.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    from ..data import load_splits

    splits = load_splits(args.dataset, args.data_dir)
    print(f"{args.dataset}: {len(splits.train)} train, {len(splits.val)} validation, "
          f"{len(splits.test)} test images of {splits.in_channels}x{splits.image_size}x"
          f"{splits.image_size}, {splits.num_classes} classes, verified")
    return 0


COMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_train, add_evaluate, add_predict, add_figures, add_data, add_bench,
    add_export,
    add_explore,
    add_experiment,
]


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="capsnet", description="Capsule Networks with dynamic routing.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        return args.run(args)
    except CapsNetError as exc:
        from ..training.trainer import TrainingInterrupted

        print(f"capsnet: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if isinstance(exc, TrainingInterrupted) else EXIT_USAGE
    except KeyboardInterrupt:
        print("capsnet: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
