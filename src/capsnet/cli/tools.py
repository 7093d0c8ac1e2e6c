"""The commands that use a trained model or the data: evaluate, predict, figures, data,
bench, export, explore."""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..data.splits import load_splits
from ..tools.bench import benchmark, format_table
from ..tools.export import DEFAULT_OPSET, FORMATS, VERIFY_BATCH, export_model
from ..training.checkpoint import load_trained
from ..training.config import DEVICES, PRECISIONS, splits_for
from ..training.evaluate import evaluate
from ..training.task import check_fits
from ..errors import CapsNetError
from ..nn.prediction import PRESENT, Prediction
from ..nn.registry import MODELS, load_model
from ..nn.pretrained import ACCEPTED, MODEL_KINDS
from ..utils.device import resolve_device
from ..utils.files import check_writable_folder
from .args import EXIT_USAGE, non_negative_int, port_number, positive_int, printable

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".npy"}
PREDICT_BATCH = 256  # images prepared and classified together
DATA_DIR_HELP = ("folder holding the data set's IDX files (default: $CAPSNET_DATA_DIR, then "
                 "the cache, then download)")
VAL_SIZE_HELP = ("validation images cut from the training set (default: the run's; 5000 for a "
                 "model that records no training settings)")


def add_model(p: argparse.ArgumentParser, positional: bool = True) -> None:
    """The model every command that uses one takes the same way: MODEL (unless the command's
    own positional arguments hold it), or --model MODEL."""
    if positional:
        p.add_argument("model", nargs="?", metavar="MODEL", help=MODEL_KINDS)
    p.add_argument("--model", dest="model_option", metavar="MODEL", help="the same as MODEL")


def model_of(args: argparse.Namespace) -> str:
    """The one model given, as MODEL or as --model."""
    given = [m for m in (args.model, args.model_option) if m is not None]
    if len(given) != 1:
        raise CapsNetError(f"{args.command}: give one model, as MODEL or --model MODEL; "
                           f"{ACCEPTED}")
    return given[0]


# -- evaluate ---------------------------------------------------------------------------

def add_evaluate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evaluate", help="test accuracy, loss, per-class accuracy, confusion matrix")
    add_model(p)
    p.add_argument("--dataset", help="the data set to use (default: the one the model was "
                   "trained on, when it records it)")
    p.add_argument("--split", choices=("test", "val"), default="test",
                   help="the split to evaluate (default: test)")
    p.add_argument("--val-size", type=positive_int, help=VAL_SIZE_HELP)
    p.add_argument("--batch-size", type=positive_int, default=500,
                   help="images per evaluation batch (default 500)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to run (default: auto, CUDA when available)")
    p.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    source = model_of(args)
    trained = load_trained(source, args.dataset, val_size=args.val_size)
    model, train_config = trained.model, trained.config
    dataset = train_config.dataset
    splits = splits_for(train_config, args.data_dir)
    check_fits(model.config, dataset, train_config.crop or splits.image_size, splits.in_channels,
               splits.num_classes)
    device = resolve_device(args.device)
    result = evaluate(model.to(device), getattr(splits, args.split), batch_size=args.batch_size,
                      device=device, reconstruction_weight=train_config.reconstruction_weight,
                      reduction=train_config.reconstruction_reduction,
                      margin_form=train_config.margin_loss,
                      loss_kind=MODELS[train_config.network].loss, crop=train_config.crop,
                      progress=True)
    if args.json:
        print(json.dumps({"checkpoint": source, "dataset": dataset,
                          "split": args.split, **result.to_dict()}))
        return 0
    print(f"{dataset} {args.split}: accuracy {result.accuracy:.2%} "
          f"({round(result.accuracy * result.total)}/{result.total}), loss {result.loss:.5f}")
    print("per class: " + "  ".join(f"{name} {acc:.2%}" for name, acc in
                                    zip(splits.class_names, result.per_class_accuracy)))
    # full names up to 20 characters, every column as wide as the longest (ASCII "...": the
    # terminal's encoding may have no ellipsis)
    names = [name if len(name) <= 20 else name[:17] + "..." for name in splits.class_names]
    width = max(5, len(str(result.total)), *map(len, names))
    corner = "confusion matrix"
    label = max(len(corner), *map(len, names))
    print(f"{corner:<{label}} " + " ".join(f"{name:>{width}}" for name in names)
          + "   (rows: true class, columns: predicted)")
    for name, row in zip(names, result.confusion.tolist()):
        print(f"{name:>{label}} " + " ".join(f"{v:{width}d}" for v in row))
    return 0


# -- predict ----------------------------------------------------------------------------

def add_predict(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="classify your own images (PNG, JPEG, .npy, ...)",
                       description="Classify images with a trained model: MODEL (the first "
                                   "path, or --model MODEL) is " + MODEL_KINDS + ". An image "
                                   "may be a file, a folder (its image files) or a quoted glob "
                                   "pattern. An image whose longest capsule is under "
                                   f"{PRESENT} holds none of the model's classes: 'none'.")
    p.add_argument("paths", nargs="+", metavar="MODEL_OR_IMAGE",
                   help="the model (unless --model gives it), then the images")
    add_model(p, positional=False)
    p.add_argument("--top-k", type=positive_int, metavar="K",
                   help="show the K longest capsules instead of every length")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument("--no-preprocess", action="store_true",
                   help="use the image as it is (resized only), without MNIST-style centring")
    p.add_argument("--device", choices=DEVICES, default="cpu",
                   help="where to run (default: cpu; auto: CUDA when available)")
    p.set_defaults(run=run_predict, inputs="paths")


def model_and_inputs(args: argparse.Namespace) -> tuple[Any, list[str]]:
    if args.model_option is not None:
        return load_model(args.model_option), args.paths
    if len(args.paths) < 2:
        raise CapsNetError("predict: give a model and at least one image (or --model MODEL "
                           "and the images)")
    return load_model(args.paths[0]), args.paths[1:]


def image_files(given: str) -> list[Path]:
    """The image files ``given`` names: a file, a folder's image files (sorted), or the
    files a glob pattern matches; one line when it names none."""
    path = Path(given)
    if path.is_dir():
        found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                       and p.is_file())
        if not found:
            raise CapsNetError(f"{given}: a folder without image files "
                               f"({', '.join(sorted(IMAGE_SUFFIXES))})")
        return found
    if not os.path.lexists(path) and glob.has_magic(given):
        found = sorted(Path(p) for p in glob.glob(given) if Path(p).is_file())
        if not found:
            raise CapsNetError(f"{given}: no file matches")
        return found
    return [path]


def run_predict(args: argparse.Namespace) -> int:
    model, inputs = model_and_inputs(args)
    device = resolve_device(args.device)
    model.to(device)
    preprocess = model.prepare == "mnist" and not args.no_preprocess
    failed = 0
    for given in inputs:
        try:
            paths = image_files(given)
        except CapsNetError as exc:
            report_failure(exc)
            failed += 1
            continue
        for start in range(0, len(paths), PREDICT_BATCH):
            failed += predict_files(model, paths[start:start + PREDICT_BATCH], preprocess, args)
    return EXIT_USAGE if failed else 0


def predict_files(model: Any, paths: list[Path], preprocess: bool,
                  args: argparse.Namespace) -> int:
    """Print the prediction of each readable file of ``paths`` in order, a line on stderr
    for each other; returns how many failed."""
    images, readable = [], []
    for path in paths:
        try:
            images.append(model.prepare_image(path, preprocess))
            readable.append(path)
        except CapsNetError as exc:
            report_failure(exc)
    if readable:
        for path, p in zip(readable, model.predict(torch.from_numpy(np.stack(images)))):
            print(prediction_line(path, p, args.top_k, args.json))
    return len(paths) - len(readable)


def prediction_line(path: Path, p: Prediction, top_k: int | None, as_json: bool) -> str:
    """One image's answer: its class (or none) and the capsule lengths (or the top k)."""
    if as_json:
        return json.dumps({"image": str(path), "prediction": p.index, **p.to_dict(top_k),
                           "lengths": [round(v, 6) for v in p.lengths.values()]})
    shown = (" ".join(f"{name} {v:.3f}" for name, v in p.top(top_k)) if top_k
             else "lengths " + " ".join(f"{v:.3f}" for v in p.lengths.values()))
    label = p.label if p.label is not None else "none"
    return f"{path}: {label}  {'top ' if top_k else ''}{shown}"


def report_failure(exc: CapsNetError) -> None:
    """One input's problem on its own line; the command goes on with the others."""
    print(f"capsnet: {printable(str(exc))}", file=sys.stderr, flush=True)


# -- figures ----------------------------------------------------------------------------

def add_figures(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("figures", help="the notebook's figures as PNG files")
    add_model(p)
    p.add_argument("--out", type=Path, required=True, help="folder for the PNG files")
    p.add_argument("--dataset", help="the data set of the test images (default: the one the "
                   "model was trained on, when it records it)")
    p.add_argument("--val-size", type=positive_int, help=VAL_SIZE_HELP)
    p.add_argument("--samples", type=positive_int, default=5, help="test digits per figure")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.set_defaults(run=run_figures)


def run_figures(args: argparse.Namespace) -> int:
    from ..tools.figures import draw_figures  # matplotlib: 0.3 s that other commands skip

    source = model_of(args)
    check_writable_folder(args.out, "--out")
    paths = draw_figures(source, args.out, data_dir=args.data_dir, dataset=args.dataset,
                         val_size=args.val_size, n_samples=args.samples)
    for path in paths:
        print(path)
    return 0


# -- data -------------------------------------------------------------------------------

def add_data(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="fetch and verify a data set into the cache")
    p.add_argument("dataset", nargs="?", default="mnist",
                   help="mnist (default), fashion-mnist, cifar10 or svhn")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.set_defaults(run=run_data)


def run_data(args: argparse.Namespace) -> int:
    splits = load_splits(args.dataset, args.data_dir)
    print(f"{args.dataset}: {len(splits.train)} train, {len(splits.val)} validation, "
          f"{len(splits.test)} test images of {splits.in_channels}x{splits.image_size}x"
          f"{splits.image_size}, {splits.num_classes} classes, verified")
    return 0


# -- bench ------------------------------------------------------------------------------

def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure training and inference speed and memory")
    p.add_argument("--network", choices=tuple(MODELS), default="capsnet",
                   help="the network to measure (default: capsnet); each is timed beside its "
                   "own convolutions")
    p.add_argument("--device", choices=DEVICES, default="auto",
                   help="where to run (default: auto, CUDA when available)")
    p.add_argument("--precision", choices=PRECISIONS, default="fp32",
                   help="fp32 (default) or bf16 (autocast)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="torch.compile in reduce-overhead mode: CUDA graphs on a GPU")
    p.add_argument("--routing-iterations", type=positive_int,
                   help="routing iterations of a network that iterates (default 3); "
                   "refused for efficient-capsnet, which routes in one pass")
    p.add_argument("--image-size", type=positive_int,
                   help="side of the square images (default: the network's, 28); a training "
                   "run on crops is compared with benches of its crop's size")
    p.add_argument("--train-batch", type=positive_int, help="default: 64 on CPU, 128 on CUDA")
    p.add_argument("--infer-batch", type=positive_int, default=256,
                   help="inference batch size (default 256)")
    p.add_argument("--warmup", type=non_negative_int, default=3,
                   help="untimed steps before measuring (default 3)")
    p.add_argument("--repeats", type=positive_int, default=10,
                   help="timed steps; the median is reported (default 10)")
    p.add_argument("--epoch", action="store_true",
                   help="also time a whole paper-preset epoch on MNIST with its validation, "
                   "after one untimed epoch (data needed; --network capsnet only)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--json", action="store_true", help="print only JSON")
    p.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    result = benchmark(resolve_device(args.device), args.precision, args.compile,
                       args.routing_iterations, args.train_batch, args.infer_batch, args.warmup,
                       args.repeats, epoch=args.epoch, data_dir=args.data_dir,
                       cuda_graphs=args.cuda_graphs, network=args.network,
                       image_size=args.image_size)
    if not args.json:
        print(format_table(result))
    print(json.dumps(result))
    return 0


# -- export -----------------------------------------------------------------------------

def add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the model as ONNX, safetensors or TorchScript",
                       description="Export a trained model for inference. ONNX and "
                       "TorchScript take images (batch, channels, size, size) in [0, 1] and give "
                       "the class scores (lengths), predictions and, with a decoder, "
                       "reconstructions; safetensors holds the weights and the model config.")
    add_model(p)
    p.add_argument("--format", choices=FORMATS, required=True, help="the file format to write")
    p.add_argument("--out", type=Path, required=True, help="file to write")
    p.add_argument("--opset", type=positive_int, help=f"ONNX opset (default {DEFAULT_OPSET})")
    p.add_argument("--no-verify", action="store_true",
                   help="skip comparing the written model with PyTorch")
    p.set_defaults(run=run_export)


def run_export(args: argparse.Namespace) -> int:
    source = model_of(args)
    if args.out.is_dir():
        raise CapsNetError(f"--out {args.out} is a folder; name the file to write")
    check_writable_folder(args.out.parent, "--out's folder")
    result = export_model(source, args.out, args.format, opset=args.opset,
                          verify=not args.no_verify)
    kind = f"ONNX opset {result.opset}" if result.format == "onnx" else result.format
    print(f"wrote {result.path} ({kind}, {result.size_bytes / 1e6:.1f} MB)")
    if result.max_abs_diff is not None and result.format != "safetensors":
        d = result.max_abs_diff
        values = ", ".join(f"{name} {value:.2g}" for name, value in d.items()
                           if name != "predictions")
        print(f"checked with {result.verified_with} on {VERIFY_BATCH} random images against "
              f"PyTorch: max abs difference {values}; {int(d['predictions'])} predictions differ")
    elif result.max_abs_diff is not None:
        print("checked: the weights read back identical")
    for note in result.notes:
        print(note)
    return 0


# -- explore ----------------------------------------------------------------------------

def add_explore(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("explore", help="a web page to draw a digit and watch its capsules",
                       description="Serve a local page: draw a digit or load a test image, see "
                                   "the capsule lengths, reconstructions, pose sliders and "
                                   "coupling coefficients.")
    add_model(p)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0: every interface)")
    p.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                   help="also answer requests addressed to NAME (a name of this machine that "
                        "browsers use; repeatable): others are refused, against DNS rebinding")
    p.add_argument("--port", type=port_number, default=8000, help="port (default 8000; 0: any free)")
    p.add_argument("--dataset", help="data set for the random test images "
                   "(default: the one the model was trained on, when it records it)")
    p.add_argument("--data-dir", help=DATA_DIR_HELP)
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(run=run_explore)


def run_explore(args: argparse.Namespace) -> int:
    from ..tools.explore import make_server  # with scipy, 0.3 s that every command would pay
    source = model_of(args)
    server = make_server(source, args.host, args.port, dataset=args.dataset,
                         data_dir=args.data_dir, verbose=args.verbose,
                         allow_hosts=args.allow_host)
    print(f"capsnet explore: serving {source} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("capsnet explore: stopped", file=sys.stderr)
    finally:
        server.server_close()
    return 0
