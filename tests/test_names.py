"""A model's class names wherever its classes show: the figures and evaluate's confusion
matrix, for a colour model of three shapes trained on class folders; "none" where no capsule
is long enough; images of two channels (smallNORB's stereo pairs).

(The explore page and its API are tested in test_explore.py.)
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from capsnet.cli import main
from capsnet.data.batching import batches
from capsnet.data.splits import load_splits
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.nn.prediction import predictions
from capsnet.tools import figures
from capsnet.tools.figures import (GAP, class_names, draw_figures, picture,
                                   reconstructions_figure, samples_figure, tweak_figure)
from capsnet.training.config import make_config
from capsnet.training.trainer import train
from test_folders import SHAPES, write_shapes

SIZE = 24
LONG_NAME = "a_circle_of_a_very_long_name"  # 28 characters


@pytest.fixture(scope="module")
def shapes(module_tmp: Callable[[str], Path]) -> Path:
    return write_shapes(module_tmp("shapes"), {"train": 20, "test": 4})


@pytest.fixture(scope="module")
def shapes_run(shapes: Path, module_tmp: Callable[[str], Path]) -> Path:
    """A run of a colour model of the three shapes, trained for one epoch (a few seconds)."""
    run_dir = module_tmp("shapes-run")
    config = make_config("seed", dataset=str(shapes), epochs=1, batch_size=12, val_size=6,
                         image_size=SIZE, device="cpu")
    train(config, run_dir, show_progress=False)
    return run_dir


def drawn(monkeypatch: pytest.MonkeyPatch) -> dict[str, Figure]:
    """The figures draw_figures makes, by file name, kept instead of written."""
    kept: dict[str, Figure] = {}

    def keep(figure: Figure, path: Any) -> Path:
        kept[Path(path).name] = figure
        return Path(path)

    monkeypatch.setattr(figures, "save_png", keep)
    return kept


def pixels(ax: Any) -> np.ndarray:
    return np.asarray(ax.get_images()[0].get_array())


def in_colour(image: np.ndarray) -> bool:
    return image.ndim == 3 and image.shape[2] == 3 and not np.allclose(image[..., 0],
                                                                       image[..., 1])


# -- figures --------------------------------------------------------------------------------

@pytest.mark.slow
def test_figures_name_the_classes_and_show_colour(shapes: Path, shapes_run: Path,
                                                  tmp_path: Path, monkeypatch,
                                                  one_thread) -> None:
    kept = drawn(monkeypatch)
    draw_figures(shapes_run, tmp_path, n_samples=4)
    model = CapsNet.from_pretrained(shapes_run)
    splits = load_splits(str(shapes), val_size=6, image_size=SIZE)
    images, labels = next(batches(splits.test, 4, crop=0))
    expected = model.predict(images)

    samples = kept["samples.png"].axes  # one image of each class, in class order
    titles = [ax.get_title().splitlines() for ax in samples]
    assert [lines[0] for lines in titles] == [f"Label: {name}" for name in SHAPES]
    assert all(lines[1].removeprefix("Predicted: ") in (*SHAPES, "none") for lines in titles)
    assert all(in_colour(pixels(ax)) and pixels(ax).shape == (SIZE, SIZE, 3) for ax in samples)

    axes = kept["reconstructions.png"].axes
    inputs, outputs = axes[0::2], axes[1::2]  # each input made before its reconstruction
    assert [ax.get_title() for ax in inputs] == [f"Label: {SHAPES[i]}" for i in labels.tolist()]
    assert [ax.get_title().splitlines()[0] for ax in outputs] == [
        f"Predicted: {p.label or 'none'}" for p in expected]
    assert all(in_colour(pixels(ax)) for ax in axes)  # inputs and reconstructions

    rows = [t.get_text() for t in kept["tweak_dim_00.png"].axes[0].get_yticklabels()]
    assert rows == [SHAPES[int(np.argmax(list(p.lengths.values())))] for p in expected]
    assert in_colour(pixels(kept["tweak_dim_00.png"].axes[0]))


def test_a_prediction_under_one_half_is_none() -> None:
    images = torch.rand(2, 3, 8, 8)
    found = predictions(torch.tensor([[0.1, 0.45, 0.2], [0.1, 0.9, 0.2]]), SHAPES)
    fig = reconstructions_figure(images, ["circle", "square"], torch.rand(2, 3, 8, 8), found)
    assert [ax.get_title() for ax in fig.axes[1::2]] == [
        "Predicted: none\nlongest 0.45: square", "Predicted: square\nlength 0.90"]

    def model(batch: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(lengths=torch.tensor([[0.3, 0.1, 0.2], [0.1, 0.8, 0.2]]))

    fig = samples_figure(model, images, torch.tensor([0, 1]), SHAPES)
    none, square = fig.axes
    assert none.get_title() == "Label: circle\nPredicted: none\nlongest 0.30: circle"
    assert none.title.get_color() == "red" and square.title.get_color() == "black"


def test_long_names_are_cut_to_fit() -> None:
    found = predictions(torch.tensor([[0.9, 0.1]]), (LONG_NAME, "b"))
    fig = reconstructions_figure(torch.rand(1, 1, 8, 8), [LONG_NAME], torch.rand(1, 1, 8, 8),
                                 found)
    assert fig.axes[0].get_title() == "Label: a_circle_of_…"
    assert fig.axes[1].get_title().startswith("Predicted: a_circle…")
    fig = tweak_figure(torch.rand(11, 1, 1, 8, 8), 0, [LONG_NAME])
    assert fig.axes[0].get_yticklabels()[0].get_text() == "a_circle_of_a_v…"


def test_two_channel_images_are_shown_side_by_side(tmp_path: Path) -> None:
    pair = torch.rand(2, 8, 8)
    shown = picture(pair)
    assert shown.shape == (8, 2 * 8 + GAP, 3)
    np.testing.assert_allclose(shown[:, :8, 0], 1 - pair[0].numpy(), atol=1e-6)  # dark ink
    np.testing.assert_allclose(shown[:, 8 + GAP:, 1], 1 - pair[1].numpy(), atol=1e-6)
    names = ["animal", "human"]
    found = predictions(torch.tensor([[0.9, 0.1], [0.2, 0.3]]), names)
    fig = reconstructions_figure(torch.rand(2, 2, 8, 8), names, torch.rand(2, 2, 8, 8), found)
    fig.savefig(tmp_path / "pairs.png")
    fig = tweak_figure(torch.rand(11, 2, 2, 8, 8), 3, names)
    assert pixels(fig.axes[0]).shape == (2 * 8 + GAP, 11 * (2 * 8 + GAP) + 10 * GAP, 3)
    fig.savefig(tmp_path / "tweak.png")


def test_a_model_that_records_only_numbers_takes_the_data_sets_names() -> None:
    model = CapsNet(CapsNetConfig(num_classes=3, conv1_channels=8, primary_maps=2))
    assert class_names(model, SHAPES) == SHAPES
    model.class_names = ("cat", "dog", "cow")
    assert class_names(model, SHAPES) == ("cat", "dog", "cow")


# -- evaluate -------------------------------------------------------------------------------

@pytest.mark.slow
def test_evaluate_prints_whole_names_in_aligned_columns(shapes: Path, shapes_run: Path,
                                                       tmp_path: Path, capsys,
                                                       one_thread) -> None:
    renamed = tmp_path / "renamed"
    shutil.copytree(shapes, renamed)
    for part in ("train", "test"):  # the same class order: the long name sorts first too
        (renamed / part / "circle").rename(renamed / part / LONG_NAME)
    assert main(["evaluate", str(shapes_run), "--dataset", str(renamed), "--val-size", "6",
                 "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    header, rows = lines[2], lines[3:]
    cut = LONG_NAME[:17] + "..."
    assert "per class: " + LONG_NAME in lines[1]
    assert header.startswith("confusion matrix") and header.endswith(
        "(rows: true class, columns: predicted)")
    columns = header[:header.index("   (")]
    assert columns.split()[2:] == [cut, "square", "triangle"]
    assert [row.split()[0] for row in rows] == [cut, "square", "triangle"]
    ends = [m.end() for m in re.finditer(r"\S+", columns)][-3:]
    for row in rows:  # every count right-aligned under its class
        assert [m.end() for m in re.finditer(r"\S+", row)][-3:] == ends
    assert sum(int(v) for row in rows for v in row.split()[1:]) == 12
