"""MultiMNIST: generator, two-target loss, top-2 metric, and a tiny end-to-end run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capsnet.cli import main
from capsnet.data import Split
from capsnet.errors import CapsNetError
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.data.multimnist import MultiMNIST, overlay_digits
from capsnet.experiments.multimnist import multimnist_loss, presence, top2, top2_correct


def block_digits(n: int = 30, value: int = 255, num_classes: int = 10) -> Split:
    """Hand-made 28x28 digits: digit i is a 3x5 block at a class-dependent place, class i % 10."""
    images = torch.zeros(n, 1, 28, 28, dtype=torch.uint8)
    labels = torch.arange(n) % num_classes
    for i, label in enumerate(labels.tolist()):
        row, col = 2 + 2 * label, 3 + label
        images[i, 0, row:row + 3, col:col + 5] = value
    return Split(images, labels)


def bbox(image: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) of the nonzero pixels of a (1, h, w) image."""
    rows = image[0].gt(0).any(dim=1).nonzero().flatten()
    cols = image[0].gt(0).any(dim=0).nonzero().flatten()
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def test_shapes_and_classes_always_differ() -> None:
    # Unbalanced classes: 3 digits of class 0, many of class 1, one of class 2.
    labels = torch.tensor([0, 0, 0] + [1] * 40 + [2])
    split = Split(torch.full((len(labels), 1, 28, 28), 7, dtype=torch.uint8), labels)
    data = MultiMNIST(split)
    assert data.canvas == 36
    batch = next(data.batches(500, seed=3, size=500))
    assert batch.images.shape == (500, 1, 36, 36) and batch.images.dtype == torch.float32
    assert batch.labels.shape == (500, 2) and batch.digits.shape == (500, 2, 1, 36, 36)
    assert bool((batch.labels[:, 0] != batch.labels[:, 1]).all())
    # Every class pairs with both others; class-1 digits never pair with class 1.
    pairs = {tuple(p) for p in batch.labels.tolist()}
    assert {(1, 0), (1, 2), (0, 1), (2, 1)} <= pairs


def test_second_digit_uniform_over_other_class_digits() -> None:
    labels = torch.tensor([0] * 10 + [1] * 30)
    split = Split(torch.ones(40, 1, 28, 28, dtype=torch.uint8), labels)
    plan = MultiMNIST(split).plan(seed=0, size=40 * 200)
    assert bool((labels[plan.first] != labels[plan.second]).all())
    # Class-1 first digits pick each of the 10 class-0 digits about equally often.
    counts = torch.bincount(plan.second[labels[plan.first] == 1], minlength=40)[:10]
    assert counts.min() > 0.6 * counts.float().mean()


def test_one_class_only_is_an_error() -> None:
    split = Split(torch.ones(4, 1, 28, 28, dtype=torch.uint8), torch.zeros(4, dtype=torch.long))
    with pytest.raises(CapsNetError, match="two classes"):
        MultiMNIST(split)


def test_each_digit_moves_rigidly_by_at_most_4_pixels() -> None:
    split = block_digits()
    data = MultiMNIST(split)
    plan = data.plan(seed=11, size=300)
    batch = data.compose(plan.first, plan.second, plan.offsets)
    seen_shifts = set()
    for i in range(300):
        for j, index in enumerate((plan.first[i], plan.second[i])):
            top, bottom, left, right = bbox(split.images[index])
            new = bbox(batch.digits[i, j])
            dy, dx = new[0] - (top + 4), new[2] - (left + 4)  # relative to the centred place
            assert -4 <= dy <= 4 and -4 <= dx <= 4
            assert new == (top + 4 + dy, bottom + 4 + dy, left + 4 + dx, right + 4 + dx)
            # data.shift_images moves content by max_shift - offset.
            assert (dy, dx) == (4 - int(plan.offsets[j, 0, i]), 4 - int(plan.offsets[j, 1, i]))
            seen_shifts.update((dy, dx))
    assert seen_shifts == set(range(-4, 5))  # both extremes are drawn


def test_overlay_is_max_or_clipped_sum() -> None:
    split = block_digits(value=200)
    for overlay in ("max", "sum"):
        batch = next(MultiMNIST(split, overlay=overlay).batches(64, seed=1))
        expected = overlay_digits(batch.digits, overlay)
        if overlay == "max":
            assert torch.equal(batch.images, batch.digits.amax(dim=1))
        else:
            assert torch.equal(batch.images, batch.digits.sum(dim=1).clamp(max=1.0))
            overlap = (batch.digits > 0).all(dim=1)
            assert overlap.any(), "the hand-made digits should overlap somewhere"
            assert torch.allclose(batch.images[overlap], torch.tensor(1.0))  # 200+200 clipped
        assert torch.equal(batch.images, expected)
    with pytest.raises(CapsNetError):
        MultiMNIST(split, overlay="mean")  # type: ignore[arg-type]


def test_deterministic_for_a_seed_and_different_across_seeds() -> None:
    split = block_digits(50)
    data = MultiMNIST(split)
    a = list(data.batches(16, seed=5))
    b = list(data.batches(16, seed=5))
    c = list(data.batches(16, seed=6))
    assert all(torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
               for x, y in zip(a, b))
    assert not all(torch.equal(x.images, y.images) for x, y in zip(a, c))
    # Example i depends on (seed, i) only: not on batch size, pass size, or the start batch.
    whole = torch.cat([x.images for x in a])
    other = torch.cat([x.images for x in data.batches(7, seed=5, size=120)])
    assert torch.equal(other[:50], whole) and len(other) == 120
    resumed = torch.cat([x.images for x in data.batches(16, seed=5, start=2)])
    assert torch.equal(resumed, whole[32:])


def test_test_set_uses_only_test_digits() -> None:
    train, test = block_digits(40, value=100), block_digits(20, value=200)
    batch = next(MultiMNIST(test).batches(200, seed=0, size=200))
    values = batch.digits[batch.digits > 0]
    assert torch.allclose(values, torch.tensor(200 / 255))  # never a training digit (100)
    assert int(MultiMNIST(test).plan(0, 500).second.max()) < len(test)
    assert len(MultiMNIST(train)) == 40


def test_two_target_loss_matches_the_formula() -> None:
    lengths = torch.tensor([[0.95, 0.50, 0.05, 0.30], [0.20, 0.85, 0.92, 0.00]])
    labels = torch.tensor([[0, 1], [2, 1]])
    recon = torch.tensor([[[[[0.1, 0.2], [0.3, 0.4]]], [[[0.5, 0.5], [0.0, 1.0]]]],
                          [[[[1.0, 0.0], [0.0, 0.0]]], [[[0.2, 0.2], [0.2, 0.2]]]]])
    digits = torch.tensor([[[[[0.0, 0.2], [0.3, 1.0]]], [[[0.5, 0.0], [0.0, 1.0]]]],
                           [[[[1.0, 0.0], [0.5, 0.0]]], [[[0.0, 0.0], [0.0, 0.0]]]]])
    # Margin loss with both classes present (m+ 0.9, m- 0.1, lambda 0.5).
    m0 = 0 + (0.9 - 0.5) ** 2 + 0.5 * (0 + 0.2 ** 2)  # classes 0, 1 present; 3 absent: 0.3
    m1 = 0.5 * 0.1 ** 2 + (0.9 - 0.85) ** 2 + 0 + 0  # classes 2, 1 present; 0 absent: 0.2
    margin = (m0 + m1) / 2
    r1 = ((0.1 ** 2 + 0 + 0 + 0.6 ** 2) + (0 + 0.5 ** 2 + 0 + 0)) / 2  # first digits
    r2 = ((0 + 0.5 ** 2 + 0 + 0) + 4 * 0.2 ** 2) / 2  # second digits
    total, got_margin, got_recon = multimnist_loss(lengths, recon, digits, labels, 0.0005, "sum")
    assert got_margin.item() == pytest.approx(margin, rel=1e-5)
    assert got_recon.item() == pytest.approx(r1 + r2, rel=1e-5)
    assert total.item() == pytest.approx(margin + 0.0005 * (r1 + r2), rel=1e-5)
    assert presence(labels, 4).tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]


def test_reconstructions_are_masked_by_each_label() -> None:
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(image_size=20, conv1_channels=8, primary_maps=2,
                                  decoder_hidden=(16,), num_classes=4)).eval()
    images = torch.rand(3, 1, 20, 20)
    labels = torch.tensor([[0, 3], [2, 1], [1, 0]])
    with torch.no_grad():
        out = model(images, labels)
        lengths, recon = out.lengths, out.reconstructions
        caps, _ = model.capsules(images)
        assert recon.shape == (3, 2, 1, 20, 20)
        assert torch.allclose(recon[:, 0], model.reconstruct(caps, labels[:, 0]), atol=1e-6)
        assert torch.allclose(recon[:, 1], model.reconstruct(caps, labels[:, 1]), atol=1e-6)
        assert torch.allclose(lengths, model(images).lengths, atol=1e-6)


def test_top2_metric_on_hand_made_lengths() -> None:
    lengths = torch.tensor([
        [0.9, 0.8, 0.1, 0.0],  # top two 0, 1
        [0.9, 0.8, 0.1, 0.0],  # same lengths, labels given in the other order
        [0.9, 0.1, 0.8, 0.0],  # top two 0, 2: label 1 is wrong
        [0.7, 0.7, 0.2, 0.2],  # the two true classes tie with each other: fine
        [0.9, 0.5, 0.5, 0.1],  # a false class ties with a true one for second place: wrong
        [0.2, 0.3, 0.95, 0.9],  # top two 2, 3
    ])
    labels = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 0], [0, 1], [3, 2]])
    assert top2_correct(lengths, labels).tolist() == [True, True, False, True, False, True]
    assert top2(lengths)[0].tolist() == [0, 1] and top2(lengths)[5].tolist() == [2, 3]


@pytest.mark.slow
def test_end_to_end_cli_run(tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "mm"
    code = main(["experiment", "multimnist", "--dataset", str(tiny_dataset), "--epochs", "1",
                 "--train-limit", "32", "--test-limit", "32", "--val-size", "40",
                 "--batch-size", "32", "--figures", "2", "--device", "cpu", "--no-progress",
                 "--run-dir", str(run_dir)])
    assert code == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_examples"] == 32 and summary["canvas"] == 36
    assert summary["test_error"] == pytest.approx(1 - summary["test_accuracy"])
    assert summary["train_pairs_per_epoch"] == 32 and summary["device"].startswith("cpu")
    assert 0 <= summary["test_classes_found"] <= 1 and summary["warmup_steps"] == 200
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "val_accuracy" in json.loads(lines[0])
    for name in ("best.pt", "last.pt", "config.json", "figures/multimnist-00.png",
                 "figures/multimnist-01.png"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "figures/multimnist-00.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(run_dir.rglob("*.tmp"))
    from capsnet.training.checkpoint import load_model

    model, payload = load_model(run_dir / "best.pt")
    assert model.config.image_size == 36 and model.config.routing_iterations == 3
    assert payload["task"] == {"name": "multimnist", "overlay": "max", "test_limit": 32,
                               "figures": 2}
    # A second run into the same folder is refused, not overwritten.
    assert main(["experiment", "multimnist", "--dataset", str(tiny_dataset),
                 "--run-dir", str(run_dir), "--val-size", "40"]) == 2


@pytest.mark.slow
def test_efficient_capsnet_trains_on_multimnist(tiny_dataset: Path, tmp_path: Path) -> None:
    from capsnet.nn.efficient import EfficientCapsNet
    from capsnet.nn.registry import load_model

    run_dir = tmp_path / "mm"
    code = main(["experiment", "multimnist", "--preset", "efficient", "--augment", "shift",
                 "--dataset", str(tiny_dataset), "--epochs", "1", "--train-limit", "16",
                 "--test-limit", "16", "--val-size", "40", "--batch-size", "16", "--figures",
                 "1", "--device", "cpu", "--compile", "off", "--no-progress",
                 "--run-dir", str(run_dir)])
    assert code == 0
    model = load_model(run_dir)
    assert type(model) is EfficientCapsNet and model.config.image_size == 36
    assert (run_dir / "figures/multimnist-00.png").is_file()


def test_a_network_trained_without_the_margin_loss_is_refused_before_anything_starts(
        tiny_dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["experiment", "multimnist", "--network", "em-capsnet-small", "--dataset",
                 str(tiny_dataset), "--run-dir", str(tmp_path / "mm")])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert "multimnist trains --network capsnet or efficient-capsnet, not em-capsnet-small" in err
    assert not (tmp_path / "mm").exists()
