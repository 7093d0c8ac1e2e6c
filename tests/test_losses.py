"""Margin and reconstruction losses against numbers worked out by hand."""

from __future__ import annotations

import pytest
import torch

from capsnet.nn.losses import capsule_loss, margin_loss, reconstruction_loss

# Two examples, three classes.
LENGTHS = torch.tensor([[0.95, 0.30, 0.05],
                        [0.50, 0.20, 0.80]], dtype=torch.float64)


def test_margin_loss_with_label_indices() -> None:
    # Example 0, label 0: present 0.95 > 0.9 -> 0; absent 0.5 * (0.3 - 0.1)^2 = 0.02; 0.05 < 0.1 -> 0.
    # Example 1, label 2: present (0.9 - 0.8)^2 = 0.01; absent 0.5 * 0.4^2 = 0.08 and 0.5 * 0.1^2 = 0.005.
    # Mean over the batch: (0.02 + 0.095) / 2.
    loss = margin_loss(LENGTHS, torch.tensor([0, 2]))
    assert loss.item() == pytest.approx(0.0575, abs=1e-12)


def test_margin_loss_with_presence_matrix() -> None:
    # Two classes present per example (MultiMNIST style).
    # Example 0, {0, 1}: 0 + (0.9 - 0.3)^2 = 0.36, class 2 absent below 0.1 -> 0.
    # Example 1, {0, 2}: (0.9 - 0.5)^2 = 0.16 + (0.9 - 0.8)^2 = 0.01, class 1 absent 0.005.
    present = torch.tensor([[1, 1, 0], [1, 0, 1]])
    loss = margin_loss(LENGTHS, present)
    assert loss.item() == pytest.approx((0.36 + 0.175) / 2, abs=1e-12)


def test_one_hot_matrix_equals_label_indices() -> None:
    labels = torch.tensor([0, 2])
    one_hot = torch.nn.functional.one_hot(labels, 3)
    torch.testing.assert_close(margin_loss(LENGTHS, one_hot), margin_loss(LENGTHS, labels))


def test_margin_loss_parameters_are_used() -> None:
    # m+ = 1, m- = 0, lambda = 1: example 0 gives 0.05^2 + 0.3^2 + 0.05^2, example 1 0.2^2 + 0.5^2 + 0.2^2.
    loss = margin_loss(LENGTHS, torch.tensor([0, 2]), m_plus=1.0, m_minus=0.0, lambda_=1.0)
    assert loss.item() == pytest.approx((0.095 + 0.33) / 2, abs=1e-12)


def test_reconstruction_loss_sum_and_mean() -> None:
    images = torch.full((2, 1, 3, 3), 0.5, dtype=torch.float64)
    images[1, 0, 0, 0] = 1.0
    recon = torch.zeros_like(images)
    # Per pixel 0.25, except one pixel of example 1 at 1.0: sums 2.25 and 3.0.
    total = reconstruction_loss(recon, images, "sum")
    mean = reconstruction_loss(recon, images, "mean")
    assert total.item() == pytest.approx((2.25 + 3.0) / 2)
    assert mean.item() == pytest.approx((2.25 + 3.0) / 18)
    assert total.item() == pytest.approx(9 * mean.item())  # sum = pixels * mean
    assert reconstruction_loss(recon, images).item() == total.item()  # paper's sum is the default


def test_reconstruction_loss_accepts_flat_decoder_output() -> None:
    images = torch.rand(4, 1, 5, 5)
    recon = torch.rand(4, 25)
    torch.testing.assert_close(reconstruction_loss(recon, images),
                               reconstruction_loss(recon.view(4, 1, 5, 5), images))


@pytest.mark.parametrize("reduction", ["none", "Sum", ""])
def test_bad_reduction_raises(reduction: str) -> None:
    x = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="reduction must be 'sum' or 'mean'"):
        reconstruction_loss(x, x, reduction)  # type: ignore[arg-type]


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_capsule_loss_total_is_margin_plus_weighted_reconstruction(reduction: str) -> None:
    torch.manual_seed(0)
    images, recon = torch.rand(2, 1, 3, 3), torch.rand(2, 1, 3, 3)
    labels = torch.tensor([0, 2])
    total, margin, recon_loss = capsule_loss(LENGTHS.float(), recon, images, labels,
                                             reconstruction_weight=0.25, reduction=reduction)
    torch.testing.assert_close(margin, margin_loss(LENGTHS.float(), labels))
    torch.testing.assert_close(recon_loss, reconstruction_loss(recon, images, reduction))
    torch.testing.assert_close(total, margin + 0.25 * recon_loss)
    assert recon_loss.item() > 0 and margin.item() > 0
