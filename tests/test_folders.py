"""Your own images in class folders: train, evaluate, predict with class names, figures."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from capsnet.cli import main
from capsnet import load_model
from capsnet.data import Split, batches
from capsnet.data.folders import read_class_folders, read_images
from capsnet.data.splits import load_splits
from capsnet.errors import CapsNetError
from capsnet.training.config import make_config

SHAPES = ("circle", "square", "triangle")


def draw(shape: str, rng: np.random.Generator) -> Image.Image:
    """A coloured shape on a dark background, of a random size, place, colour and canvas."""
    side = int(rng.integers(24, 48))
    image = Image.new("RGB", (side, side), tuple(int(v) for v in rng.integers(0, 40, 3)))
    pen = ImageDraw.Draw(image)
    r = side * float(rng.uniform(0.25, 0.4))
    cx, cy = (side / 2 + float(rng.uniform(-side, side)) / 10 for _ in range(2))
    colour = tuple(int(v) for v in rng.integers(120, 256, 3))
    if shape == "circle":
        pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        pen.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    else:
        pen.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    return image


def write_shapes(root: Path, per_class: dict[str, int], seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for part, count in per_class.items():
        for shape in SHAPES:
            folder = root / part / shape
            folder.mkdir(parents=True)
            for i in range(count):
                suffix = (".png", ".jpg")[i % 2]
                draw(shape, rng).save(folder / f"{i}{suffix}")
    return root


@pytest.fixture(scope="module")
def shapes(module_tmp: Callable[[str], Path]) -> Path:
    return write_shapes(module_tmp("shapes"), {"train": 40, "test": 8})


def test_class_folders_are_read_resized_and_named(shapes: Path) -> None:
    splits = load_splits(str(shapes), val_size=12, image_size=24)
    assert splits.class_names == SHAPES and splits.num_classes == 3
    assert splits.train.images.shape == (120 - 12, 3, 24, 24)  # colour kept
    assert (len(splits.val), len(splits.test)) == (12, 24)
    assert splits.prepare == "resize"
    again = load_splits(str(shapes), val_size=12, image_size=24)  # the cut is fixed
    assert np.array_equal(again.val.labels.numpy(), splits.val.labels.numpy())
    gray = load_splits(str(shapes), val_size=12, image_size=20, channels=1)
    assert gray.train.images.shape[1:] == (1, 20, 20)


def test_class_folders_refuse_the_validation_split_they_never_read(shapes: Path) -> None:
    assert make_config("paper", dataset=str(shapes), val_split="first").val_split == "first"
    with pytest.raises(CapsNetError, match="--val-split last would change nothing: class "
                                           "folders hold out a share of every class"):
        make_config("paper", dataset=str(shapes), val_split="last")


@pytest.mark.slow
def test_train_evaluate_predict_figures_with_class_names(shapes: Path, tmp_path: Path,
                                                         capsys, one_thread) -> None:
    run = tmp_path / "run"
    assert main(["train", "--preset", "seed", "--dataset", str(shapes), "--image-size", "24",
                 "--val-size", "12", "--epochs", "2", "--batch-size", "12", "--device", "cpu",
                 "--no-progress", "--run-dir", str(run), "--figures"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["total"] == 24 and 0 <= result["accuracy"] <= 1
    images = sorted((shapes / "test" / "circle").iterdir())[:2]
    assert main(["predict", str(run), *map(str, images), "--json"]) == 0
    answers = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [a["class"] for a in answers] == [SHAPES[a["prediction"]] for a in answers]
    assert all(a["class"] in SHAPES for a in answers)
    assert (run / "figures" / "reconstructions.png").is_file()


def no_classes(root: Path) -> None:
    (root / "train").mkdir()


def one_class(root: Path) -> None:
    write_shapes(root, {"train": 2})
    for shape in SHAPES[1:]:
        shutil.rmtree(root / "train" / shape)


def with_file(name: str, data: bytes) -> Callable[[Path], None]:
    def build(root: Path) -> None:
        write_shapes(root, {"train": 3})
        (root / "train" / "circle" / name).write_bytes(data)
    return build


def empty_class(root: Path) -> None:
    write_shapes(root, {"train": 3})
    (root / "train" / "empty").mkdir()


def unknown_test_class(root: Path) -> None:
    write_shapes(root, {"train": 3, "test": 1})
    (root / "test" / "hexagon").mkdir()


@pytest.mark.parametrize("build, message", [
    (no_classes, "train/ holds 0 class folders; a classifier needs at least 2"),
    (one_class, "train/ holds 1 class folder; a classifier needs at least 2"),
    (with_file("notes.txt", b"x"), "notes.txt: not an image file"),
    (with_file("bad.png", b"no"), "bad.png: not an image file this program can read"),
    (empty_class, "empty: no images in this class folder"),
    (unknown_test_class, "class 'hexagon' is not one of train/'s classes"),
    (lambda root: write_shapes(root, {"train": 3}),
     "circle: 3 images, too few to hold out 2 for each of val and test"),
])
def test_bad_class_folders_are_one_line(tmp_path: Path, build, message: str) -> None:
    root = tmp_path / "data"
    root.mkdir()
    build(root)
    with pytest.raises(CapsNetError, match=re.escape(message)):
        read_class_folders(root, val_size=5)


@pytest.mark.slow
def test_the_cifar10_preset_learns_coloured_shapes(shapes: Path, tmp_path: Path, capsys,
                                                   one_thread) -> None:
    """The paper's CIFAR-10 network (24x24 crops, 64 primary maps, none-of-the-above) on a
    data set that needs no download: well above chance (1/3) after a few epochs."""
    run = tmp_path / "run"
    assert main(["train", "--preset", "cifar10", "--dataset", str(shapes), "--image-size", "32",
                 "--val-size", "12", "--epochs", "4", "--batch-size", "12", "--lr-decay", "1",
                 "--device", "cpu", "--no-progress", "--run-dir", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    config = json.loads((run / "config.json").read_text())["model"]
    assert (config["image_size"], config["primary_maps"], config["leaky_routing"]) == (24, 64, True)
    assert summary["test_accuracy"] > 0.6, summary
    # predict makes a photo 32x32 and takes its centre 24x24, as the test batches were made
    files = sorted((shapes / "test" / "circle").iterdir())[:4]
    capsys.readouterr()
    assert main(["predict", str(run), *map(str, files), "--json"]) == 0
    answers = capsys.readouterr().out.splitlines()
    predicted = torch.tensor([json.loads(line)["lengths"] for line in answers])
    pixels, labels = read_images([(f, 0) for f in files], 32, 3)
    split = Split(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2), torch.from_numpy(labels))
    model = load_model(run)
    assert model.crop_from == 32
    evaluated = model(next(batches(split, 4, crop=24))[0]).lengths
    torch.testing.assert_close(predicted, evaluated, atol=2e-3, rtol=0)  # uint8 rounding
