"""Affine robustness: translated 40x40 training data, the affine test generator, affNIST files,
the baseline CNN, and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet.data.affine import (AffineParams, AffineRanges, AffineTestSet, affine_transform,
                            load_affnist, pad_images, pad_split, random_affine_params,
                            read_affnist_file)
from capsnet.nn.baseline import ARCHITECTURE as CNN, BaselineCNN, BaselineConfig
from capsnet.cli import main
from capsnet.data import Split, batches
from capsnet.errors import CapsNetError
from capsnet.nn.model import count_parameters


def digit_split(n: int = 24, seed: int = 0) -> Split:
    """Random-stroke 28x28 uint8 "digits" confined to the central 20x20 box, as MNIST's."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    ink = torch.randint(0, 256, (n, 1, 20, 20), generator=generator, dtype=torch.int64)
    images[:, :, 4:24, 4:24] = (ink * (ink > 150)).to(torch.uint8)
    return Split(images, torch.arange(n) % 10)


def test_pad_centres_28_on_40() -> None:
    images = torch.arange(28 * 28, dtype=torch.float32).view(1, 1, 28, 28) + 1
    padded = pad_images(images)
    assert padded.shape == (1, 1, 40, 40)
    assert torch.equal(padded[..., 6:34, 6:34], images)
    assert padded.sum() == images.sum()
    split = pad_split(Split(images.to(torch.uint8), torch.zeros(1, dtype=torch.long)))
    assert split.images.dtype == torch.uint8 and split.images.shape == (1, 1, 40, 40)


def test_identity_gives_the_padded_centred_image() -> None:
    split = digit_split()
    padded = pad_images(split.images.float() / 255)
    out = affine_transform(padded, AffineParams.identity(len(split)))
    assert torch.allclose(out, padded, atol=1e-5)


def test_translation_and_rotation_conventions() -> None:
    image = torch.zeros(1, 1, 40, 40)
    image[0, 0, 20, 25] = 1.0  # 5 px right of the centre (pixel 20 spans 20..21)
    params = AffineParams.identity(1)
    params.tx, params.ty = torch.tensor([3.0]), torch.tensor([-2.0])
    moved = affine_transform(image, params)
    assert torch.allclose(moved[0, 0, 18, 28], torch.tensor(1.0), atol=1e-5)
    assert moved.sum().item() == pytest.approx(1.0, abs=1e-5)
    # +90 degrees is clockwise on screen (y points down): right of centre -> below centre.
    rotate = AffineParams.identity(1)
    rotate.rotation = torch.tensor([math.pi / 2])
    turned = affine_transform(image, rotate)
    row, col = divmod(int(turned.flatten().argmax()), 40)
    assert (row, col) == (25, 19)


def test_affine_set_is_deterministic_and_independent_of_batching() -> None:
    split = digit_split()
    a = AffineTestSet(split, seed=7)
    b = AffineTestSet(split, seed=7)
    c = AffineTestSet(split, seed=8)
    full = torch.cat([x for x, _ in a.batches(24)])
    assert torch.equal(full, torch.cat([x for x, _ in b.batches(5)]))
    assert not torch.allclose(full, torch.cat([x for x, _ in c.batches(24)]))
    labels = torch.cat([y for _, y in a.batches(10)])
    assert torch.equal(labels, split.labels)
    assert full.shape == (24, 1, 40, 40) and 0 <= full.min() and full.max() <= 1
    assert len(AffineTestSet(split, seed=7, limit=10)) == 10


def test_ranges_respected_and_digits_stay_inside() -> None:
    split = digit_split(200, seed=3)
    ranges = AffineRanges()
    data = AffineTestSet(split, seed=1, ranges=ranges)
    images, _, params = data.batch(0, 200)
    assert params.rotation.abs().max() <= math.radians(20) + 1e-6
    assert params.shear.abs().max() <= 0.2 + 1e-6
    for scale in (params.scale_x, params.scale_y):
        assert scale.min() >= 0.8 - 1e-6 and scale.max() <= 1.2 + 1e-6
    # The ranges are used, not just bounded: draws reach near both ends.
    assert params.rotation.max() > math.radians(15) and params.rotation.min() < -math.radians(15)
    assert params.tx.abs().max() > 3 and params.ty.abs().max() > 3  # digits move around
    # Rendered on a larger canvas with the same centre, nothing falls outside the 40x40 one:
    # the whole digit is kept.
    big = affine_transform(pad_images(split.images.float() / 255, 80), params)
    outside = big.clone()
    outside[..., 20:60, 20:60] = 0
    assert outside.abs().max() < 1e-6
    assert torch.allclose(big[..., 20:60, 20:60], images, atol=1e-5)


def test_digit_too_big_for_the_canvas_is_centred() -> None:
    full = torch.ones(2, 1, 40, 40)
    uniforms = torch.tensor([[1.0, 0.5, 0.99, 0.99, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5, 0.9, 0.1]])
    params = random_affine_params(full, uniforms, AffineRanges())
    assert torch.allclose(params.tx, torch.zeros(2), atol=1e-5)
    assert torch.allclose(params.ty, torch.zeros(2), atol=1e-5)


def test_bad_ranges_are_refused() -> None:
    with pytest.raises(CapsNetError):
        AffineRanges(min_scale=1.3, max_scale=1.2)
    with pytest.raises(CapsNetError):
        AffineRanges(max_rotation_deg=-1)


def test_translated_training_data_stays_inside_the_canvas() -> None:
    images = torch.full((50, 1, 28, 28), 255, dtype=torch.uint8)  # ink up to the border
    padded = pad_split(Split(images, torch.arange(50) % 10))
    seen = set()
    for batch, _ in batches(padded, 10, seed=4, max_shift=6):
        assert batch.shape[1:] == (1, 40, 40)
        for image in batch:
            assert image.sum().item() == 28 * 28  # nothing cut off
            rows = image[0].gt(0).any(dim=1).nonzero().flatten()
            cols = image[0].gt(0).any(dim=0).nonzero().flatten()
            top, left = int(rows[0]), int(cols[0])
            assert 0 <= top <= 12 and 0 <= left <= 12  # centred at 6, moved by -6..6
            seen.update((top - 6, left - 6))
    assert min(seen) <= -5 and max(seen) >= 5


def test_baseline_cnn_shapes_and_parameter_counts() -> None:
    paper = BaselineCNN(BaselineConfig(image_size=28, variant="paper"))
    assert count_parameters(paper) == 35_445_522  # the paper's 35.4M
    assert paper(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    pooled = BaselineCNN(BaselineConfig(image_size=40, variant="pooled"))
    assert count_parameters(pooled) == 6_728_466
    assert pooled(torch.rand(3, 1, 40, 40)).shape == (3, 10)
    assert BaselineConfig.from_dict(pooled.config.to_dict()) == pooled.config
    with pytest.raises(CapsNetError):
        BaselineConfig(variant="resnet")


def fake_affnist(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, 40, 40), dtype=np.uint8)
    return images, rng.integers(0, 10, n).astype(np.uint8)


def write_affnist(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    from scipy.io import savemat

    # As in the real files: one image per column, row-major within the column.
    savemat(str(path), {"affNISTdata": {"image": images.reshape(len(images), -1).T,
                                        "label_int": labels[None, :],
                                        "label_one_of_n": np.eye(10, dtype=np.uint8)[labels].T}})


def test_read_affnist_files(tmp_path: Path) -> None:
    pytest.importorskip("scipy")
    images, labels = fake_affnist(7)
    images[0] = 0
    images[0, 3, 30] = 255  # asymmetric: row 3, column 30
    write_affnist(tmp_path / "test.mat", images, labels)
    x, y = read_affnist_file(tmp_path / "test.mat")
    assert np.array_equal(x, images) and np.array_equal(y, labels)
    assert x[0, 3, 30] == 255 and x[0, 30, 3] == 0
    split = load_affnist(tmp_path)
    assert split.images.shape == (7, 1, 40, 40) and split.labels.dtype == torch.int64
    batches_dir = tmp_path / "test_batches"
    batches_dir.mkdir()
    for index in (1, 2, 10):
        write_affnist(batches_dir / f"{index}.mat", *fake_affnist(4, seed=index))
    split = load_affnist(batches_dir.parent / "test_batches", limit=6)
    assert len(split) == 6
    expected = np.concatenate([fake_affnist(4, 1)[0], fake_affnist(4, 2)[0]])[:6]
    assert np.array_equal(split.images[:, 0].numpy(), expected)
    (tmp_path / "bad.mat").write_bytes(b"not a mat file")
    with pytest.raises(CapsNetError):
        read_affnist_file(tmp_path / "bad.mat")


def test_a_missing_affnist_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(CapsNetError, match="no such file"):
        load_affnist(tmp_path / "missing")


@pytest.mark.slow
def test_end_to_end_cli_run(tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "aff"
    code = main(["experiment", "affnist", "--dataset", str(tiny_dataset), "--epochs", "1",
                 "--train-limit", "32", "--test-limit", "32", "--val-size", "40",
                 "--batch-size", "32", "--figures", "4", "--device", "cpu", "--no-progress",
                 "--run-dir", str(run_dir)])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["models"]) == {"capsnet", "cnn"}
    for name, result in summary["models"].items():
        assert 0 <= result["translated_test_accuracy"] <= 1
        assert 0 <= result["affine_test_accuracy"] <= 1
        assert (run_dir / name / "best.pt").is_file() and (run_dir / name / "metrics.jsonl").is_file()
    assert summary["models"]["cnn"]["parameters"] == 6_728_466
    assert summary["test_examples"] == {"translated": 32, "affine": 32, "affnist": None}
    assert summary["max_shift"] == 6 and summary["affine_ranges"]["max_rotation_deg"] == 20
    assert (run_dir / "figures" / "affine-test.png").read_bytes()[:4] == b"\x89PNG"
    from capsnet.training.checkpoint import load_checkpoint, model_from_checkpoint

    cnn = model_from_checkpoint(load_checkpoint(run_dir / "cnn" / "best.pt"), architecture=CNN)
    assert cnn.config.image_size == 40 and cnn.config.variant == "pooled"


@pytest.mark.slow
@pytest.mark.parametrize("preset, network", [("efficient", "efficient-capsnet"),
                                             ("em", "em-capsnet-small")])
def test_the_other_routings_run_the_experiment(preset: str, network: str, tiny_dataset: Path,
                                               tmp_path: Path) -> None:
    from capsnet.nn.registry import MODELS, load_model

    run_dir = tmp_path / "aff"
    code = main(["experiment", "affnist", "--preset", preset,
                 "--network", network, "--model", "capsnet", "--dataset", str(tiny_dataset),
                 "--epochs", "1", "--train-limit", "16", "--test-limit", "16", "--val-size",
                 "40", "--batch-size", "16", "--device", "cpu", "--compile", "off",
                 "--no-progress", "--run-dir", str(run_dir)])
    assert code == 0
    result = json.loads((run_dir / "summary.json").read_text())["models"]["capsnet"]
    assert 0 <= result["translated_test_accuracy"] <= 1 and 0 <= result["affine_test_accuracy"] <= 1
    model = load_model(run_dir / "capsnet")
    assert type(model) is MODELS[network].model and model.config.image_size == 40
