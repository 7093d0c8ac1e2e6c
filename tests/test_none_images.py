"""Training with images of no class (--none-fraction): the images, the loss that asks every
capsule to be short for them, batches that resume exactly, and a model that learns to answer
"none" for such images it never saw."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet.cli import main
from capsnet.data import none_images as none_images_module
from capsnet.data.none_images import KINDS, POOL_SIZE, none_images, pool_size, run_pool
from capsnet.data.splits import load_splits
from capsnet.nn.losses import (NO_CLASS, capsule_loss, margin_loss, reconstruction_loss,
                               with_no_class)
from capsnet.training.config import make_config
from capsnet.training.task import Classification
from capsnet.training.trainer import train
from capsnet.utils.distributed import World


# -- the images -----------------------------------------------------------------------------

def test_none_images_are_the_same_for_the_same_seed_only() -> None:
    a = none_images(16, 28, 1, seed=(0, 0), prepared=True)
    assert a.shape == (16, 1, 28, 28) and a.dtype == torch.uint8
    assert torch.equal(a, none_images(16, 28, 1, seed=(0, 0), prepared=True))
    assert not torch.equal(a, none_images(16, 28, 1, seed=(0, 1), prepared=True))


def test_prepared_none_images_are_what_predict_makes_of_such_photos() -> None:
    """Every other image of each kind but flat is prepared: the noise is cut to its ink and
    centred, so black borders appear that raw noise never has."""
    raw = none_images(4 * len(KINDS), 28, 1, seed=3, prepared=False)
    prepared = none_images(4 * len(KINDS), 28, 1, seed=3, prepared=True)
    for index in range(len(prepared)):
        kind = KINDS[index % len(KINDS)]
        if kind == "flat" or index // len(KINDS) % 2 == 0:
            assert torch.equal(prepared[index], raw[index]), (index, kind)
        else:
            border = torch.cat([prepared[index, 0, :2].flatten(), prepared[index, 0, -2:].flatten()])
            assert border.max() == 0 and prepared[index].float().mean() > 10, (index, kind)


def test_colour_none_images_are_never_prepared() -> None:
    images = none_images(8, 24, 3, seed=0, prepared=True)
    assert images.shape == (8, 3, 24, 24)
    assert torch.equal(images, none_images(8, 24, 3, seed=0, prepared=False))


def test_a_run_on_crops_cuts_its_none_images_as_its_model_cuts_photos(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Made at the side the crops come from (prepared there, as a photo for that model is),
    then cut to the centre window: black borders of the preparation stay as they would."""
    monkeypatch.setattr(none_images_module, "POOL_SIZE", 16)
    whole = run_pool(28, 1, seed=0, prepared=True, part="test")
    crops = run_pool(24, 1, seed=0, prepared=True, part="test", crop_from=28)
    assert crops.shape == (len(whole), 1, 24, 24) and crops.is_contiguous()
    assert torch.equal(crops, whole[..., 2:26, 2:26])
    assert torch.equal(run_pool(28, 1, seed=0, prepared=True, part="test", crop_from=0), whole)


def test_the_pool_of_large_images_is_smaller() -> None:
    assert pool_size(28, 1) == POOL_SIZE
    assert pool_size(224, 3) * 224 * 224 * 3 <= 64 * 2**20 and pool_size(4096, 3) == 64


# -- the loss -------------------------------------------------------------------------------

def test_a_no_class_row_asks_every_capsule_to_be_absent() -> None:
    lengths = torch.tensor([[0.05, 0.6, 0.3], [0.95, 0.2, 0.05]])
    targets, rows = with_no_class(torch.tensor([NO_CLASS, 0]), 3)
    assert targets.tolist() == [[0, 0, 0], [1, 0, 0]] and rows.tolist() == [False, True]
    absent = 0.5 * ((0.6 - 0.1) ** 2 + (0.3 - 0.1) ** 2)
    present = 0.5 * (0.2 - 0.1) ** 2
    assert margin_loss(lengths, targets).item() == pytest.approx((absent + present) / 2)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_no_class_rows_are_not_reconstructed(reduction: str) -> None:
    generator = torch.Generator().manual_seed(0)
    recon, images = torch.rand(5, 1, 6, 6, generator=generator), torch.rand(5, 1, 6, 6,
                                                                            generator=generator)
    rows = torch.tensor([True, False, True, True, False])
    kept = reconstruction_loss(recon[rows], images[rows], reduction)
    assert reconstruction_loss(recon, images, reduction, rows).item() == pytest.approx(kept.item())
    every = torch.ones(5, dtype=torch.bool)
    assert reconstruction_loss(recon, images, reduction, every).item() == pytest.approx(
        reconstruction_loss(recon, images, reduction).item())
    total, _, recon_part = capsule_loss(torch.rand(5, 3), recon, images,
                                        with_no_class(torch.tensor([0, -1, 1, 2, -1]), 3)[0],
                                        reduction=reduction, rows=rows)
    assert recon_part.item() == pytest.approx(kept.item())


# -- the batches ----------------------------------------------------------------------------

def none_task(tiny_dataset: Path, **overrides) -> Classification:
    config = make_config("seed", **{"dataset": str(tiny_dataset), "batch_size": 32,
                                    "val_size": 40, "device": "cpu", "none_fraction": 0.25,
                                    "max_shift": 1, **overrides})
    return Classification.from_splits(config, load_splits(str(tiny_dataset), val_size=40))


def test_each_batch_ends_with_its_images_of_no_class(tiny_dataset: Path) -> None:
    task = none_task(tiny_dataset)
    for images, labels in task.batches(seed=5, start=0, device=torch.device("cpu"), world=World()):
        assert len(images) == len(labels) and labels[-8:].eq(NO_CLASS).all()
        assert labels[:-8].ge(0).all() and 0 <= images.min() and images.max() <= 1
    assert len(images) == 200 % 32 + 8  # the last, smaller batch gets as many


def test_a_resumed_pass_adds_the_same_images_of_no_class(tiny_dataset: Path) -> None:
    task = none_task(tiny_dataset)
    cpu = torch.device("cpu")
    whole = list(task.batches(seed=7, start=0, device=cpu, world=World()))
    resumed = list(task.batches(seed=7, start=3, device=cpu, world=World()))
    assert len(resumed) == len(whole) - 3
    for (a, la), (b, lb) in zip(whole[3:], resumed):
        assert torch.equal(a, b) and torch.equal(la, lb)
    other = list(task.batches(seed=8, start=0, device=cpu, world=World()))
    assert not torch.equal(whole[0][0][-8:], other[0][0][-8:])


def test_ranks_add_different_images_of_no_class(tiny_dataset: Path) -> None:
    task = none_task(tiny_dataset)
    cpu = torch.device("cpu")
    first = [next(iter(task.batches(seed=1, start=0, device=cpu, world=World(rank, 2))))
             for rank in (0, 1)]
    for images, labels in first:
        assert len(images) == 16 + 4 and labels[-4:].eq(NO_CLASS).all()
    assert not torch.equal(first[0][0][-4:], first[1][0][-4:])


def test_without_none_fraction_the_batches_are_as_before(tiny_dataset: Path) -> None:
    task = none_task(tiny_dataset, none_fraction=0.0)
    assert task.none_pool is None
    images, labels = next(iter(task.batches(seed=1, start=0, device=torch.device("cpu"),
                                            world=World())))
    assert len(images) == 32 and labels.ge(0).all()


# -- training -------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_model_trained_with_none_images_answers_none_for_unseen_ones(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tiny data set's model, two epochs: its test summary measures images of no class
    drawn apart from the training ones, and it answers "none" for most; without them in
    training the summary has no such figure. Pools of 256, not 4096, keep it short."""
    monkeypatch.setattr(none_images_module, "POOL_SIZE", 256)
    config = make_config("seed", dataset=str(tiny_dataset), epochs=2, batch_size=16,
                         val_size=40, device="cpu", none_fraction=0.25)
    summary = train(config, tmp_path / "with", show_progress=False)
    assert summary["test_accuracy"] >= 0.9 and summary["test_none_rate"] >= 0.8
    plain = train(make_config("seed", dataset=str(tiny_dataset), epochs=1, batch_size=16,
                              val_size=40, device="cpu", train_limit=32),
                  tmp_path / "without", show_progress=False)
    assert "test_none_rate" not in plain
    stored = json.loads((tmp_path / "with" / "config.json").read_text())
    assert stored["train"]["none_fraction"] == 0.25


def test_none_fraction_needs_the_margin_loss(capsys) -> None:
    assert main(["train", "--network", "em-capsnet-small", "--none-fraction", "0.1"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--none-fraction needs the margin loss" in err


def test_an_experiment_refuses_none_fraction(capsys, tmp_path: Path) -> None:
    assert main(["experiment", "multimnist", "--none-fraction", "0.1",
                 "--run-dir", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--none-fraction is for capsnet train" in err


def test_none_fraction_is_checked_as_a_share(capsys) -> None:
    assert main(["train", "--none-fraction", "1.5"]) == 2
    assert "--none-fraction" in capsys.readouterr().err


def test_the_raw_kinds_look_like_their_names() -> None:
    images = none_images(4 * len(KINDS), 28, 1, seed=0, prepared=False).float() / 255
    for index, image in enumerate(images):
        kind = KINDS[index % len(KINDS)]
        distinct = len(np.unique(image.numpy()))
        if kind == "flat":
            assert distinct == 1
        elif kind == "sparse":
            assert distinct <= 2 and (image == 0).float().mean() > 0.5
        else:
            assert distinct > 100
