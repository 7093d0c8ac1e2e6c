"""Efficient-CapsNet's MNIST augmentation (--augment efficient): each transform against a
plain reference, the drawn parameters' statistics, and passes fixed by their seed (resumable,
the same from a Split and a Dataset), with the default passes drawing what they drew before."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import TensorDataset

from capsnet.cli import build_parser
from capsnet.data import Split, batches
from capsnet.data.augment import (Efficient, augment_efficient, draw_efficient, erase, rotate,
                                  shift_inside, squeeze)
from capsnet.data.batching import pass_plan
from capsnet.errors import CapsNetError
from capsnet.training.config import TrainConfig, make_config


def digits(n: int, seed: int = 0, size: int = 28) -> torch.Tensor:
    """``n`` uint8 images ``(n, 1, size, size)``: a random blob of ink (values 1..255) at a
    random place on a blank frame, as MNIST digits are."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.zeros(n, 1, size, size, dtype=torch.uint8)
    for image in images:
        height, width = torch.randint(3, 12, (2,), generator=generator).tolist()
        top = int(torch.randint(0, size - height + 1, (1,), generator=generator))
        left = int(torch.randint(0, size - width + 1, (1,), generator=generator))
        blob = torch.randint(1, 256, (height, width), generator=generator, dtype=torch.uint8)
        image[0, top:top + height, left:left + width] = blob
    return images


def todays_pass_plan(n: int, seed: int, max_shift: int, crop_room: int):
    """pass_plan's draws before --augment existed, written out by hand."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=generator)
    offsets = corners = None
    if max_shift > 0:
        offsets = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator)
    if crop_room > 0:
        corners = torch.randint(0, crop_room + 1, (2, n), generator=generator)
    return order, offsets, corners


def same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return (a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))


@pytest.mark.parametrize("n, seed, max_shift, crop_room",
                         [(1, 0, 0, 0), (11, 7, 1, 0), (300, 3, 2, 0), (50, 5, 0, 8),
                          (64, 2**32 - 1, 6, 4)])
def test_default_passes_draw_what_they_drew_before(n, seed, max_shift, crop_room) -> None:
    expected = todays_pass_plan(n, seed, max_shift, crop_room)
    drawn = pass_plan(n, seed, max_shift, crop_room)
    assert drawn.efficient is None and drawn.degrees is None
    assert all(same(a, b) for a, b in zip(drawn, expected))
    # With the augmentation and rotations, their draws come after all of those.
    drawn = pass_plan(n, seed, max_shift, crop_room, efficient=True)
    assert isinstance(drawn.efficient, Efficient) and drawn.degrees is None
    assert all(same(a, b) for a, b in zip(drawn, expected))
    rotated = pass_plan(n, seed, max_shift, crop_room, efficient=True, rotation=15)
    assert all(same(a, b) for a, b in zip(rotated, expected))
    assert torch.equal(rotated.efficient.degrees, drawn.efficient.degrees)
    assert rotated.degrees.shape == (n,) and rotated.degrees.abs().max() <= 15


def test_default_batches_are_todays() -> None:
    split = Split(digits(13), torch.arange(13))
    for kwargs in (dict(seed=4, max_shift=2), dict(seed=4, max_shift=2, augment="shift"),
                   dict(seed=9), dict()):
        got = torch.cat([images for images, _ in batches(split, 5, **kwargs)])
        order, offsets, _ = (todays_pass_plan(13, kwargs["seed"], kwargs.get("max_shift", 0), 0)
                             if "seed" in kwargs else (torch.arange(13), None, None))
        images = split.images[order].float() / 255
        if offsets is not None:
            padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
            images = torch.stack([padded[i, :, r:r + 28, c:c + 28]
                                  for i, (r, c) in enumerate(offsets.T.tolist())])
        assert torch.equal(got, images)


def test_rotation_by_a_right_angle_is_rot90_and_zero_leaves_the_image() -> None:
    images = torch.rand(3, 2, 28, 28, generator=torch.Generator().manual_seed(0))
    out = rotate(images, torch.tensor([90.0, -90.0, 0.0]))
    inner = (slice(None), slice(1, -1), slice(1, -1))  # the border pixels sample the zero fill
    torch.testing.assert_close(out[0][inner], torch.rot90(images[0], 1, (1, 2))[inner])
    torch.testing.assert_close(out[1][inner], torch.rot90(images[1], -1, (1, 2))[inner])
    assert torch.equal(out[2], images[2])


def test_rotation_keeps_the_ink_of_a_centred_digit() -> None:
    images = torch.zeros(1, 1, 28, 28)
    images[0, 0, 8:20, 12:16] = 1.0  # a bar well inside the circle the rotation sweeps
    out = rotate(images, torch.tensor([17.0]))
    assert out.sum().item() == pytest.approx(images.sum().item(), rel=1e-3)
    assert not torch.equal(out, images)


def pil_squeeze(image: torch.Tensor, dropped: int, first: int) -> torch.Tensor:
    """Reference squeeze of one ``(H, W)`` image with PIL's antialiased Lanczos resize."""
    height, width = image.shape
    resized = Image.fromarray(image.numpy(), mode="F").resize((width - dropped, height),
                                                              Image.LANCZOS)
    out = torch.zeros_like(image)
    out[:, first:first + width - dropped] = torch.from_numpy(np.array(resized))
    return out.clamp(0, 1)


@pytest.mark.parametrize("dropped", range(1, 8))
@pytest.mark.parametrize("nudge", [0.2, 0.7])
def test_squeeze_is_an_antialiased_lanczos_resize_placed_as_drawn(dropped, nudge) -> None:
    images = digits(2, seed=dropped).float() / 255
    amount = torch.full((2,), (dropped - 1 + 0.5) / 7)  # floor(amount * 28 / 4) + 1 = dropped
    out = squeeze(images, amount, torch.full((2,), nudge))
    first = dropped // 2 + (1 if nudge >= 0.5 else 0)
    for image, got in zip(images, out):
        torch.testing.assert_close(got[0], pil_squeeze(image[0], dropped, first),
                                   atol=1e-5, rtol=0)


def test_squeeze_keeps_the_ink_per_column_and_moves_columns() -> None:
    bump = torch.exp(-((torch.arange(28) - 13.5) / 5) ** 2)  # smooth: Lanczos cannot overshoot
    images = torch.zeros(7, 1, 28, 28)
    images[:, 0, 6:22] = bump
    amount = torch.arange(7) / 7 + 0.01  # dropped 1 .. 7 columns
    out = squeeze(images, amount, torch.zeros(7))
    for w, (image, got) in enumerate(zip(images, out), start=1):
        assert got.sum().item() == pytest.approx(image.sum().item() * (28 - w) / 28, rel=0.02)
        columns = got[0].sum(0).nonzero().flatten()
        assert columns[0] >= w // 2 and columns[-1] <= w // 2 + 27 - w
    assert not torch.equal(out[3], images[3])


def test_erase_zeros_exactly_one_4x4_patch_inside_4_to_26() -> None:
    images = torch.ones(6, 2, 28, 28)
    where = torch.tensor([[0.0, 0.9999, 0.5, 0.25, 0.0, 0.9999],
                          [0.0, 0.9999, 0.1, 0.75, 0.9999, 0.0]])
    out = erase(images, where)
    for image, (row, col) in zip(out, (4 + (where * 19).floor().long()).T.tolist()):
        zeros = (image == 0).nonzero()
        assert len(zeros) == 2 * 16
        expected = torch.ones_like(image)
        expected[:, row:row + 4, col:col + 4] = 0
        assert torch.equal(image, expected) and 4 <= row <= 22 and 4 <= col <= 22
    assert (out[0, 0, 4, 4], out[1, 0, 25, 25]) == (0, 0)  # both ends of the range


def test_shift_moves_by_its_share_of_the_blank_room() -> None:
    images = torch.zeros(4, 1, 28, 28)
    images[:, 0, 5:8, 10:13] = 1.0  # 5 blank rows above, 20 below; 10 columns left, 15 right
    shift = torch.tensor([[-0.5, 0.5, -0.9999, 0.9999],   # rows
                          [-0.9999, 0.9999, 0.0, 0.5]])  # columns
    out = shift_inside(images, shift)
    # up: floor(-0.5 * 5) = -3 (rounded down, as the official code); down: floor(0.5 * 21)
    for image, (top, left) in zip(out, [(2, 0), (15, 25), (0, 10), (25, 18)]):
        expected = torch.zeros(1, 28, 28)
        expected[0, top:top + 3, left:left + 3] = 1.0
        assert torch.equal(image, expected)


def test_shift_keeps_every_pixel_of_ink_inside_the_frame() -> None:
    images = digits(200, seed=1).float() / 255
    plan = draw_efficient(200, torch.Generator().manual_seed(2))
    out = shift_inside(images, plan.shift)
    pixels = images.flatten(1).sort(1).values
    assert torch.equal(out.flatten(1).sort(1).values, pixels)  # no ink lost: the same pixels
    for image, moved in zip(images, out):  # and a translation of the whole digit
        rows, cols = image[0].nonzero().T
        new_rows, new_cols = moved[0].nonzero().T
        assert torch.equal(moved[0, new_rows, new_cols], image[0, rows, cols])
        assert len(set((new_rows - rows).tolist())) == len(set((new_cols - cols).tolist())) == 1
    assert (out != images).any((1, 2, 3)).float().mean() > 0.5  # most images move


def test_blank_images_go_through_unharmed() -> None:
    blank = torch.zeros(3, 1, 28, 28)
    plan = draw_efficient(3, torch.Generator().manual_seed(0))
    assert torch.equal(augment_efficient(blank, plan), blank)


def test_drawn_parameters_follow_the_official_distributions() -> None:
    n = 20_000
    plan = draw_efficient(n, torch.Generator().manual_seed(0))
    rotated = plan.degrees != 0
    # half are rotated, less the 8% whose angle is under a degree and cut to 0
    assert 0.44 < rotated.float().mean() < 0.48
    assert torch.equal(plan.degrees, plan.degrees.round()) and plan.degrees.abs().max() <= 29
    assert plan.degrees[rotated].float().std() == pytest.approx(30 * 0.33, rel=0.1)
    assert abs(plan.degrees.mean()) < 0.3
    assert plan.shift.abs().max() <= 0.9999 and 0.48 < (plan.shift > 0).float().mean() < 0.52
    assert plan.shift.abs().mean() == pytest.approx(0.33 * (2 / np.pi) ** 0.5, rel=0.03)
    dropped = (plan.squeeze * 7).floor() + 1
    assert set(dropped.long().tolist()) == set(range(1, 8))
    assert 0.48 < (plan.nudge >= 0.5).float().mean() < 0.52
    corners = 4 + (plan.erase * 19).floor().long()
    assert set(corners.flatten().tolist()) == set(range(4, 23))


def test_a_pass_is_fixed_by_its_seed_and_resumes_inside_an_epoch() -> None:
    split = Split(digits(23), torch.arange(23))
    full = list(batches(split, 4, seed=5, augment="efficient"))
    again = list(batches(split, 4, seed=5, augment="efficient"))
    other = torch.cat([x for x, _ in batches(split, 4, seed=6, augment="efficient")])
    assert all(torch.equal(a, b) and torch.equal(la, lb)
               for (a, la), (b, lb) in zip(full, again, strict=True))
    for k in (1, 4, 5):
        tail = list(batches(split, 4, seed=5, augment="efficient", start=k))
        assert len(tail) == len(full) - k
        assert all(torch.equal(a, b) and torch.equal(la, lb)
                   for (a, la), (b, lb) in zip(tail, full[k:], strict=True))
    images = torch.cat([x for x, _ in full])
    labels = torch.cat([y for _, y in full])
    originals = split.images[labels].float() / 255
    assert images.shape == originals.shape and images.min() >= 0 and images.max() <= 1
    assert (images != originals).any((1, 2, 3)).all()  # every image erased at least
    assert not torch.equal(images, other[:len(images)])


def test_max_shift_is_unused_with_the_efficient_augmentation() -> None:
    split = Split(digits(9), torch.arange(9))
    with_shift = list(batches(split, 4, seed=1, max_shift=3, augment="efficient"))
    without = list(batches(split, 4, seed=1, augment="efficient"))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(with_shift, without, strict=True))


def test_a_dataset_gives_the_batches_of_a_split_with_the_same_images() -> None:
    images, labels = digits(17, seed=3), torch.arange(17)
    split, dataset = Split(images, labels), TensorDataset(images, labels)
    for kwargs in (dict(seed=2, augment="efficient"), dict(seed=2, augment="efficient", start=2),
                   dict(seed=2, augment="efficient", crop=24)):
        from_split = list(batches(split, 5, **kwargs))
        from_dataset = list(batches(dataset, 5, **kwargs))
        assert all(torch.equal(a, b) and torch.equal(la, lb)
                   for (a, la), (b, lb) in zip(from_split, from_dataset, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_pass_on_the_gpu_is_fixed_by_its_seed_and_resumes() -> None:
    split = Split(digits(21, seed=4), torch.arange(21)).to(torch.device("cuda"))
    full = list(batches(split, 8, seed=3, augment="efficient"))
    tail = list(batches(split, 8, seed=3, augment="efficient", start=1))
    for (a, la), (b, lb) in zip(full[1:], tail, strict=True):
        assert a.is_cuda and torch.equal(a, b) and torch.equal(la, lb)
    on_cpu = list(batches(split.to(torch.device("cpu")), 8, seed=3, augment="efficient"))
    for (a, la), (b, lb) in zip(full, on_cpu, strict=True):  # the same images, in [0, 1]
        assert torch.equal(la.cpu(), lb) and a.min() >= 0 and a.max() <= 1


def test_evaluation_never_augments() -> None:
    split = Split(digits(10), torch.arange(10))
    for images, labels in batches(split, 4, augment="efficient"):  # no seed: evaluation
        assert torch.equal(images, split.images[labels].float() / 255)


def test_bad_augment_and_too_small_images_are_refused() -> None:
    split = Split(torch.ones(4, 1, 9, 9, dtype=torch.uint8), torch.arange(4))
    with pytest.raises(CapsNetError, match="augment must be one of shift, efficient"):
        next(batches(split, 2, seed=0, augment="flip"))
    with pytest.raises(CapsNetError, match="needs images of at least 10x10 pixels, got 9x9"):
        next(batches(split, 2, seed=0, augment="efficient"))


def test_the_setting_its_flag_and_its_preset() -> None:
    stored = TrainConfig().to_dict()
    del stored["augment"]
    assert TrainConfig.from_dict(stored).augment == "shift"  # what runs before it meant
    assert make_config("efficient").augment == "efficient"
    assert make_config("efficient").max_shift == 0
    args = build_parser().parse_args(["train", "--augment", "efficient"])
    assert args.augment == "efficient"
    with pytest.raises(CapsNetError, match="augment must be one of shift, efficient"):
        make_config("paper", augment="rotate")


def test_rotations_are_uniform_within_the_range_and_drawn_for_the_pass() -> None:
    degrees = pass_plan(20_000, 3, 0, rotation=15).degrees
    assert degrees.abs().max() <= 15 and degrees.min() < -14.9 and degrees.max() > 14.9
    assert abs(degrees.mean()) < 0.2  # a uniform draw's: 0 give or take 15 / sqrt(3 n)
    counts = torch.histc(degrees, bins=6, min=-15, max=15)  # 3,333 each, give or take 55
    assert counts.min() > 3000 and counts.max() < 3700
    assert pass_plan(5, None, 0, rotation=15).degrees is None  # evaluation: none


def test_rotation_turns_each_cropped_image_by_its_drawn_angle() -> None:
    split = Split(digits(12, seed=1), torch.arange(12))
    got = list(batches(split, 5, seed=6, crop=24, rotation=15))
    plan = pass_plan(12, 6, 0, crop_room=4, rotation=15)
    images = split.images[plan.order].float() / 255
    windows = torch.stack([image[:, r:r + 24, c:c + 24]
                           for image, (r, c) in zip(images, plan.corners.T.tolist())])
    expected = rotate(windows, plan.degrees)
    assert torch.equal(torch.cat([images for images, _ in got]), expected)
    assert not torch.equal(expected, windows)
    # resumed inside the pass: the same images from batch 1 on
    tail = list(batches(split, 5, seed=6, crop=24, rotation=15, start=1))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got[1:], tail, strict=True))
    # evaluation (no seed) is never rotated: the centre window as it is
    centre = torch.cat([images for images, _ in batches(split, 5, crop=24, rotation=15)])
    assert torch.equal(centre, split.images[:, :, 2:26, 2:26].float() / 255)


def test_a_rotation_out_of_range_is_refused() -> None:
    split = Split(digits(3), torch.arange(3))
    with pytest.raises(CapsNetError, match="rotation must be 0 to 180 degrees, got -1"):
        next(batches(split, 2, seed=0, rotation=-1))
    with pytest.raises(CapsNetError, match=r"--rotation: expected a number in \[0, 180\]"):
        build_parser().parse_args(["train", "--rotation", "181"])

