"""Validation and test sets cut from class folders take every class in proportion to its size;
the named data sets keep the notebook's first (or last) 5,000 training images."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

import capsnet.data.splits as splits_module
from capsnet.cli import main
from capsnet.data.folders import apportion, read_class_folders
from capsnet.data.splits import DEFAULT_VAL_SIZE, load_splits
from capsnet.errors import CapsNetError
from capsnet.training.config import PRESETS, TrainConfig, make_config, splits_for

UNBALANCED = {"a": 30, "b": 6, "c": 12}


def write_classes(root: Path, per_class: dict[str, int], part: str = "train") -> Path:
    """``root/part/<class>/<i>.png``: 8x8 grayscale images, each numbered in its first two
    pixels (so a test can tell which image went where)."""
    number = sum(1 for _ in root.rglob("*.png")) if root.exists() else 0
    for name, count in per_class.items():
        folder = root / part / name
        folder.mkdir(parents=True)
        for i in range(count):
            pixels = np.full((8, 8), 128, dtype=np.uint8)
            pixels[0, :2] = number % 256, number // 256
            Image.fromarray(pixels).save(folder / f"{i}.png")
            number += 1
    return root


def numbers(images: np.ndarray) -> set[int]:
    return {int(image[0, 0, 0]) + 256 * int(image[0, 0, 1]) for image in images}


def per_class(part: tuple[np.ndarray, np.ndarray], classes: int = 3) -> list[int]:
    return np.bincount(part[1], minlength=classes).tolist()


@pytest.fixture(scope="module")
def unbalanced(module_tmp: Callable[[str], Path]) -> Path:
    return write_classes(module_tmp("unbalanced"), UNBALANCED)


def test_by_default_val_and_test_take_a_tenth_of_each_class(unbalanced: Path) -> None:
    parts, classes = read_class_folders(unbalanced, image_size=8)
    assert classes == ("a", "b", "c")
    # 10% of 30, 6 and 12, rounded, at least one
    assert per_class(parts["val"]) == per_class(parts["test"]) == [3, 1, 1]
    assert per_class(parts["train"]) == [24, 4, 10]
    cut = [numbers(parts[name][0]) for name in ("train", "val", "test")]
    assert sum(map(len, cut)) == 48 and set.union(*cut) == set(range(48))  # disjoint, all kept


@pytest.mark.parametrize("val_size, expected", [
    (15, [9, 2, 4]),  # quotas 9.375, 1.875, 3.75: the largest remainders get the rest
    (12, [8, 1, 3]),  # 7.5, 1.5, 3: a tie goes to the earlier class
    (5, [3, 1, 1]),  # b's 0.625 becomes 1, and a and c share the other 4
    (3, [1, 1, 1]),  # one image of each class, the least a stratified cut takes
])
def test_an_explicit_size_is_split_across_the_classes_in_proportion(
        unbalanced: Path, val_size: int, expected: list[int]) -> None:
    parts, _ = read_class_folders(unbalanced, val_size, image_size=8)
    assert per_class(parts["val"]) == per_class(parts["test"]) == expected
    assert per_class(parts["train"]) == [n - 2 * k for n, k in zip(UNBALANCED.values(), expected)]


def test_only_the_missing_part_is_cut(tmp_path: Path) -> None:
    root = write_classes(write_classes(tmp_path / "data", UNBALANCED), {"a": 2, "b": 1, "c": 1},
                         part="test")
    parts, _ = read_class_folders(root, image_size=8)
    assert per_class(parts["test"]) == [2, 1, 1]  # test/ as it is
    assert per_class(parts["val"]) == [3, 1, 1]
    assert per_class(parts["train"]) == [27, 5, 11]


def test_the_cut_is_the_same_every_time_and_for_every_seed(unbalanced: Path) -> None:
    first, _ = read_class_folders(unbalanced, image_size=8)
    again, _ = read_class_folders(unbalanced, image_size=8)
    for name in ("train", "val", "test"):
        assert np.array_equal(first[name][0], again[name][0])
        assert np.array_equal(first[name][1], again[name][1])
    runs = [splits_for(make_config("seed", dataset=str(unbalanced), seed=seed))
            for seed in (0, 1)]
    assert np.array_equal(runs[0].val.images.numpy(), runs[1].val.images.numpy())
    assert np.array_equal(runs[0].val.labels.numpy(), first["val"][1])


def test_the_cut_is_a_shuffle_not_the_first_files(unbalanced: Path) -> None:
    parts, _ = read_class_folders(unbalanced, image_size=8)
    assert numbers(parts["val"][0][parts["val"][1] == 0]) != {0, 1, 2}  # a's first files
    assert len(set(parts["train"][1][:8].tolist())) > 1  # training is mixed, not by class


@pytest.mark.parametrize("sizes, total, expected", [
    ([30, 6, 12], 15, [9, 2, 4]),
    ([1, 1, 1], 4, [2, 1, 1]),
    ([100] + [1] * 50, 60, [10] + [1] * 50),
    ([5, 5], 2, [1, 1]),
])
def test_apportion_is_exact_in_integers(sizes: list[int], total: int,
                                        expected: list[int]) -> None:
    assert apportion(np.array(sizes), total).tolist() == expected


def test_apportion_adds_up_keeps_one_of_each_and_favours_larger_classes() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        sizes = rng.integers(1, 60, int(rng.integers(2, 12)))
        total = int(rng.integers(len(sizes), sizes.sum() + 1))
        counts = apportion(sizes, total)
        assert counts.sum() == total and counts.min() >= 1
        larger = sizes[:, None] > sizes[None, :]
        assert (counts[:, None] >= counts[None, :])[larger].all()


def assert_one_line(build, message: str) -> str:
    with pytest.raises(CapsNetError, match=re.escape(message)) as info:
        build()
    assert "\n" not in str(info.value)
    return str(info.value)


@pytest.mark.parametrize("sizes, test_part, message", [
    ({"a": 5, "b": 1}, False, "1 image, too few to hold out one for val and test and train "
                              "on another; add images, or add val/ and test/"),
    ({"a": 5, "b": 2}, False, "2 images, too few to hold out one for val and test"),
    ({"a": 5, "b": 1}, True, "1 image, too few to hold out one for val and train on another"),
])
def test_a_class_too_small_to_hold_out_is_named_in_one_line(
        tmp_path: Path, sizes: dict[str, int], test_part: bool, message: str) -> None:
    root = write_classes(tmp_path / "data", sizes)
    if test_part:
        write_classes(root, {"a": 1, "b": 1}, part="test")
    text = assert_one_line(lambda: read_class_folders(root, image_size=8), message)
    assert text.startswith(f"{root / 'train' / 'b'}: ")


def test_a_class_with_two_images_gives_one_when_test_is_given(tmp_path: Path) -> None:
    root = write_classes(write_classes(tmp_path / "data", {"a": 5, "b": 2}),
                         {"a": 1, "b": 1}, part="test")
    parts, _ = read_class_folders(root, image_size=8)
    assert per_class(parts["val"], 2) == [1, 1] and per_class(parts["train"], 2) == [4, 1]


def test_an_explicit_size_too_small_or_too_large_is_one_line(unbalanced: Path) -> None:
    assert_one_line(lambda: read_class_folders(unbalanced, 2, image_size=8),
                    "--val-size 2 is fewer than the 3 classes, and val and test take at least "
                    "one image of each; give at least 3, or leave it out for 10% of each class")
    # quotas 13.75, 2.75, 5.5 -> 14, 3, 5: b's 6 images would all be held out
    text = assert_one_line(lambda: read_class_folders(unbalanced, 22, image_size=8),
                           "6 images, too few to hold out 3 for each of val and test and train "
                           "on the rest; lower --val-size")
    assert text.startswith(f"{unbalanced / 'train' / 'b'}: ")


# --- the settings: val_size 0 is the data set's default ------------------------------------------


def test_every_preset_asks_for_the_data_sets_default() -> None:
    assert all(make_config(preset).val_size == 0 for preset in PRESETS)


def test_stored_sizes_are_kept_and_older_settings_without_one_meant_5000() -> None:
    stored = {**make_config("paper").to_dict(), "val_size": 5000}
    assert TrainConfig.from_dict(stored).val_size == 5000
    del stored["val_size"]
    assert TrainConfig.from_dict(stored).val_size == 5000


def fake_mnist(monkeypatch: pytest.MonkeyPatch, n: int = DEFAULT_VAL_SIZE + 100
               ) -> np.ndarray:
    """Make "mnist" ``n`` training images numbered in their first pixels, with no download."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
    arrays = {"train_images": images, "train_labels": (np.arange(n) % 10).astype(np.uint8),
              "test_images": images[:10], "test_labels": np.arange(10, dtype=np.uint8)}
    monkeypatch.setattr(splits_module, "acquire", lambda name, data_dir=None: arrays)
    return images


@pytest.mark.parametrize("val_split", ["first", "last"])
def test_named_data_sets_still_hold_out_the_first_or_last_5000(
        monkeypatch: pytest.MonkeyPatch, val_split: str) -> None:
    images = fake_mnist(monkeypatch)
    held = slice(None, 5000) if val_split == "first" else slice(-5000, None)
    kept = slice(5000, None) if val_split == "first" else slice(None, -5000)
    for splits in (load_splits("mnist", val_split=val_split),
                   splits_for(make_config("paper", val_split=val_split)),
                   splits_for(make_config("seed", val_split=val_split))):
        assert np.array_equal(splits.val.images[:, 0].numpy(), images[held])
        assert np.array_equal(splits.train.images[:, 0].numpy(), images[kept])


def test_an_explicit_size_on_a_named_data_set_is_as_before(monkeypatch: pytest.MonkeyPatch) -> None:
    images = fake_mnist(monkeypatch)
    splits = splits_for(make_config("paper", val_size=40))
    assert np.array_equal(splits.val.images[:, 0].numpy(), images[:40])


@pytest.mark.slow
def test_train_on_a_small_folder_without_a_val_size(unbalanced: Path, tmp_path: Path,
                                                    capsys, one_thread) -> None:
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(unbalanced), "--epochs", "1", "--preset", "seed",
                 "--batch-size", "8", "--device", "cpu", "--no-progress",
                 "--run-dir", str(run)]) == 0
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["train"]["val_size"] == 0
    assert main(["evaluate", str(run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["total"] == 5  # the test cut: 3 + 1 + 1
