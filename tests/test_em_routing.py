"""Matrix capsules with EM routing (capsnet.nn.em_routing): the vectorised routing and layers
against plain loops in float64, the network's shapes and parameter count, its stability, the
spread loss and the config's bounds."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from capsnet.errors import CapsNetError
from capsnet.nn.em_routing import (EPSILON, VARIANCE_EPSILON, ClassMatrixCapsules,
                                   ConvMatrixCapsules, EMCapsNet, EMCapsNetConfig,
                                   PrimaryMatrixCapsules, em_routing, log_totals,
                                   receptive_field, receptive_field_centres, spread_loss,
                                   spread_margin)
from capsnet.nn.model import count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

# A network small enough for many quick forward passes: the paper's layers, fewer types.
TINY = {"conv1_channels": 8, "primary_types": 4, "caps1_types": 4, "caps2_types": 3}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def reference_routing(votes: Tensor, activations: Tensor, beta_u: Tensor, beta_a: Tensor,
                      iterations: int, inverse_temperature: float,
                      children: list[list[object]] | None = None,
                      cost_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """The paper's Procedure 1 with a loop over every input and output capsule, in probability
    space. Shapes as em_routing's; ``children[w][i]`` names the input capsule of entry (w, i)
    (entries with the same name are one capsule, in several windows); ``cost_scale``
    multiplies the cost in the activation."""
    batch, windows, inputs, outputs, _ = votes.shape
    entries = [(w, i) for w in range(windows) for i in range(inputs)]
    child = {(w, i): (w, i) if children is None else children[w][i] for w, i in entries}
    reach: dict[object, int] = {}  # how many output capsules each input capsule votes for
    for entry in entries:
        reach[child[entry]] = reach.get(child[entry], 0) + outputs
    all_means, all_activations = [], []
    for n in range(batch):
        r = {(w, i, j): 1.0 / reach[child[w, i]] for w, i in entries for j in range(outputs)}
        for t in range(iterations):
            lam = inverse_temperature * (1 - 0.95 ** (t + 1))
            mean, variance, a = {}, {}, {}
            for w in range(windows):  # M-step, one output capsule at a time
                for j in range(outputs):
                    weights = [r[w, i, j] * activations[n, w, i] for i in range(inputs)]
                    mass = sum(weights)
                    mu = sum(weights[i] * votes[n, w, i, j]
                             for i in range(inputs)) / (mass + EPSILON)
                    var = sum(weights[i] * (votes[n, w, i, j] - mu) ** 2
                              for i in range(inputs)) / (mass + EPSILON) + VARIANCE_EPSILON
                    cost = (beta_u[j] + torch.log(torch.sqrt(var))) * mass
                    mean[w, j], variance[w, j] = mu, var
                    a[w, j] = torch.sigmoid(lam * (beta_a[j] - cost_scale * cost.sum()))
            if t == iterations - 1:
                break
            ap = {}  # E-step: a_j p_j(V_ij), then normalised over all that input's outputs
            for w, i in entries:
                for j in range(outputs):
                    density = torch.exp(-((votes[n, w, i, j] - mean[w, j]) ** 2
                                          / (2 * variance[w, j])).sum())
                    normaliser = torch.sqrt(torch.prod(2 * math.pi * variance[w, j]))
                    ap[w, i, j] = a[w, j] * density / normaliser
            totals: dict[object, Tensor] = {}
            for (w, i, j), value in ap.items():
                totals[child[w, i]] = totals.get(child[w, i], 0) + value
            r = {(w, i, j): value / totals[child[w, i]] for (w, i, j), value in ap.items()}
        all_means.append(torch.stack([torch.stack([mean[w, j] for j in range(outputs)])
                                      for w in range(windows)]))
        all_activations.append(torch.stack([torch.stack([a[w, j] for j in range(outputs)])
                                            for w in range(windows)]))
    return torch.stack(all_means), torch.stack(all_activations)


def gradients(outputs: tuple[Tensor, Tensor], leaves: list[Tensor]) -> tuple[Tensor, ...]:
    """Gradients of a fixed weighting of (means, activations) with respect to ``leaves``."""
    mean, activation = outputs
    weighting = torch.linspace(-1, 1, mean.numel(), dtype=mean.dtype).view_as(mean)
    scalar = (mean * weighting).sum() + (activation * activation.new_tensor(3.0)).sum()
    return torch.autograd.grad(scalar, leaves)


def assert_matches(got: tuple[Tensor, Tensor], expected: tuple[Tensor, Tensor],
                   leaves: list[Tensor]) -> None:
    assert torch.isfinite(expected[0]).all() and torch.isfinite(expected[1]).all()
    # Activations that all sit at 0.5 or at 0 / 1 would test little.
    assert expected[1].std() > 0.05
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)
    for a, b in zip(gradients(got, leaves), gradients(expected, leaves)):
        assert b.abs().max() > 0
        torch.testing.assert_close(a, b)


def random_routing_inputs(windows: int, inputs: int, outputs: int, seed: int = 0
                          ) -> list[Tensor]:
    g = generator(seed)
    votes = torch.randn(2, windows, inputs, outputs, 16, dtype=torch.float64, generator=g)
    activations = torch.rand(2, windows, inputs, dtype=torch.float64, generator=g)
    beta_u = torch.randn(outputs, dtype=torch.float64, generator=g)
    beta_a = torch.randn(outputs, dtype=torch.float64, generator=g)
    return [t.requires_grad_() for t in (votes, activations, beta_u, beta_a)]


# --- routing against the loops -------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_matches_the_loops_in_values_and_gradients(iterations: int) -> None:
    leaves = random_routing_inputs(windows=2, inputs=6, outputs=3)
    got = em_routing(*leaves, iterations, inverse_temperature=0.5)
    assert got[0].shape == (2, 2, 3, 16) and got[1].shape == (2, 2, 3)
    assert_matches(got, reference_routing(*leaves, iterations, 0.5), leaves)


def test_overlapping_windows_share_each_input_capsules_assignments() -> None:
    # 7 input capsules in 3 windows of 4; capsules 0, 2, 3, 4 and 5 are in two windows each.
    children = torch.tensor([[0, 1, 2, 3], [2, 3, 4, 5], [4, 5, 6, 0]])
    leaves = random_routing_inputs(windows=3, inputs=4, outputs=3, seed=1)
    got = em_routing(*leaves, 3, 0.5, children, num_children=7)
    expected = reference_routing(*leaves, 3, 0.5, children.tolist())
    assert_matches(got, expected, leaves)
    # Normalising window by window instead gives other outputs.
    alone = em_routing(*leaves, 3, 0.5)
    assert not torch.allclose(alone[1], got[1])


def test_assignments_of_a_capsule_sum_to_one_however_large_the_logits() -> None:
    children = torch.tensor([[0, 1, 2], [1, 2, 3]])  # (windows, inputs)
    logits = torch.randn(2, 2, 5, 3, dtype=torch.float64, generator=generator(2)) * 1000
    logits[0, 1] -= 5000  # one window far below the other: exp() of it alone underflows
    log_total = log_totals(logits.logsumexp(dim=2), children, 4)  # (batch, windows, inputs)
    assignments = (logits - log_total[:, :, None]).exp()  # (batch, windows, outputs, inputs)
    assert torch.isfinite(assignments).all()
    per_capsule = torch.zeros(2, 4, dtype=torch.float64)
    per_capsule.index_add_(1, children.flatten(), assignments.sum(dim=2).flatten(1))
    torch.testing.assert_close(per_capsule, torch.ones(2, 4, dtype=torch.float64))


# --- layers against the loops --------------------------------------------------------------


def test_window_positions_are_the_inputs_each_window_covers() -> None:
    layer = ConvMatrixCapsules(2, 3, kernel=3, stride=2, iterations=1,
                               inverse_temperature=1.0, init_std=1.0)
    height, width = 5, 7
    positions = layer.window_positions(height, width, torch.device("cpu"))
    assert layer.output_grid(height, width) == (2, 3)
    expected = [[(2 * row + dy) * width + 2 * col + dx for dy in range(3) for dx in range(3)]
                for row in range(2) for col in range(3)]
    assert positions.tolist() == expected


@pytest.mark.parametrize("layers, field", [
    ([], (1, 0.5)),  # the pixels themselves
    ([(3, 1, 0)], (1, 1.5)),  # a 3x3 window's centre pixel
    ([(3, 1, 1)], (1, 0.5)),  # padded by 1: centred where it stands
    ([(2, 2, 0)], (2, 1.0)),  # 2x2 stride 2: between its two pixels
    ([(5, 2, 2), (1, 1, 0), (3, 2, 0), (3, 1, 0)], (4, 6.5)),  # EMCapsNet
])
def test_the_receptive_field_is_centred_where_its_window_is(layers: list, field: tuple) -> None:
    assert receptive_field(layers) == field


def test_class_capsules_add_the_centres_of_another_geometry() -> None:
    field = receptive_field([(5, 1, 0), (3, 2, 0)])  # (2, 3.5): row r sees pixels 2r ... 2r + 6
    layer = ClassMatrixCapsules(1, 2, image_size=14, field=field, iterations=1,
                                inverse_temperature=1.0, init_std=1.0).double()
    with torch.no_grad():
        layer.weight.zero_()
    votes = layer.votes(torch.zeros(1, 3, 2, 1, 4, 4, dtype=torch.float64)).view(3, 2, 2, 4, 4)
    torch.testing.assert_close(votes[:, 0, 0, 0, 3], torch.tensor([3.5, 5.5, 7.5],
                                                                  dtype=torch.float64) / 14)
    torch.testing.assert_close(votes[0, :, 1, 1, 3], torch.tensor([3.5, 5.5],
                                                                  dtype=torch.float64) / 14)


# A cost scale of 100 outputs / inputs, with lambda as much smaller: activations away from 0
# and 1, where the test sees them.
@pytest.mark.parametrize("cost_scale, factor, lambda_", [
    ("paper", 1.0, 0.5), ("outputs-per-input", 100 * 3 / 18, 0.03)])
def test_convolutional_capsules_match_the_loops(cost_scale: str, factor: float,
                                                lambda_: float) -> None:
    torch.manual_seed(0)
    layer = ConvMatrixCapsules(2, 3, kernel=3, stride=2, iterations=3,
                               inverse_temperature=lambda_, init_std=0.5,
                               cost_scale=cost_scale).double()
    torch.nn.init.normal_(layer.beta_u)
    torch.nn.init.normal_(layer.beta_a)
    g = generator(3)
    # 6 rows: windows of stride 2 reach rows 0-4 only, so row 5 takes no part.
    poses = torch.randn(2, 6, 5, 2, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    activations = torch.rand(2, 6, 5, 2, dtype=torch.float64, generator=g).requires_grad_()
    out_poses, out_activations = layer(poses, activations)
    assert out_poses.shape == (2, 2, 2, 3, 4, 4) and out_activations.shape == (2, 2, 2, 3)

    votes, window_activations, children = [], [], []
    for row in range(2):
        for col in range(2):
            window = [(2 * row + dy, 2 * col + dx, dy * 3 + dx, t)
                      for dy in range(3) for dx in range(3) for t in range(2)]
            votes.append(torch.stack([torch.stack([poses[:, y, x, t] @ layer.weight[k, t, c]
                                                   for c in range(3)], dim=1)
                                      for y, x, k, t in window], dim=1))
            window_activations.append(torch.stack([activations[:, y, x, t]
                                                   for y, x, _, t in window], dim=1))
            children.append([(y, x, t) for y, x, _, t in window])
    votes = torch.stack(votes, dim=1).flatten(-2)  # (batch, windows, 18, 3, 16)
    expected = reference_routing(votes, torch.stack(window_activations, dim=1), layer.beta_u,
                                 layer.beta_a * layer.beta_a_scale, 3, lambda_, children,
                                 factor)
    got = (out_poses.flatten(1, 2).flatten(-2), out_activations.flatten(1, 2))
    assert_matches(got, expected, [poses, activations, layer.weight, layer.beta_u, layer.beta_a])


def test_coordinate_addition_adds_the_scaled_receptive_field_centres() -> None:
    layer = ClassMatrixCapsules(2, 3, image_size=28, iterations=1, inverse_temperature=1.0,
                                init_std=1.0).double()
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4, dtype=torch.float64).expand(2, 3, 4, 4))
    poses = torch.zeros(1, 4, 4, 2, 4, 4, dtype=torch.float64)
    votes = layer.votes(poses).view(1, 4, 4, 2, 3, 4, 4)  # the coordinates alone
    # ConvCaps2 row r sees pixels 4r - 2 ... 4r + 14 of a 28x28 image: centre pixel 4r + 6.
    centres = torch.tensor([6.5, 10.5, 14.5, 18.5], dtype=torch.float64) / 28
    torch.testing.assert_close(receptive_field_centres(4, 28), centres)
    expected = torch.zeros_like(votes)
    expected[..., 0, 3] = centres[:, None, None, None]  # the row, down the grid
    expected[..., 1, 3] = centres[None, :, None, None]  # the column, across it
    torch.testing.assert_close(votes, expected)


@pytest.mark.parametrize("cost_scale, factor, lambda_", [
    ("paper", 1.0, 0.5), ("outputs-per-input", 100 * 3 / 12, 0.02)])
def test_class_capsules_match_the_loops(cost_scale: str, factor: float, lambda_: float) -> None:
    torch.manual_seed(1)
    layer = ClassMatrixCapsules(2, 3, image_size=20, iterations=3, inverse_temperature=lambda_,
                                init_std=0.5, cost_scale=cost_scale).double()
    torch.nn.init.normal_(layer.beta_u)
    torch.nn.init.normal_(layer.beta_a)
    g = generator(4)
    poses = torch.randn(2, 2, 3, 2, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    activations = torch.rand(2, 2, 3, 2, dtype=torch.float64, generator=g).requires_grad_()
    class_poses, class_activations = layer(poses, activations)
    assert class_poses.shape == (2, 3, 16) and class_activations.shape == (2, 3)

    rows, cols = receptive_field_centres(2, 20), receptive_field_centres(3, 20)
    votes = []
    for y in range(2):
        for x in range(3):
            for t in range(2):
                coordinates = torch.zeros(4, 4, dtype=torch.float64)
                coordinates[0, 3], coordinates[1, 3] = rows[y], cols[x]
                votes.append(torch.stack([poses[:, y, x, t] @ layer.weight[t, c] + coordinates
                                          for c in range(3)], dim=1))
    votes = torch.stack(votes, dim=1).flatten(-2)[:, None]  # (batch, 1, 12, 3, 16)
    expected = reference_routing(votes, activations.flatten(1)[:, None], layer.beta_u,
                                 layer.beta_a * layer.beta_a_scale, 3, lambda_, None, factor)
    assert_matches((class_poses[:, None], class_activations[:, None]), expected,
                   [poses, activations, layer.weight, layer.beta_u, layer.beta_a])


@pytest.mark.parametrize("units, moved", [("logit", 1.0), ("paper", 0.01 * (1 - 0.95))])
def test_a_unit_of_beta_a_moves_the_activation_logit_by_its_units(units: str,
                                                                   moved: float) -> None:
    """With one iteration the activation logit is lambda (beta_a - cost), lambda = 0.01 x
    0.05: in logit units one more beta_a is one more logit, in the paper's, 5e-4."""
    torch.manual_seed(2)
    layer = ClassMatrixCapsules(2, 3, image_size=20, iterations=1, inverse_temperature=0.01,
                                init_std=0.5, beta_a_units=units).double()
    poses = torch.randn(2, 2, 3, 2, 4, 4, dtype=torch.float64)
    activations = torch.rand(2, 2, 3, 2, dtype=torch.float64)
    before = torch.logit(layer(poses, activations)[1])
    with torch.no_grad():
        layer.beta_a += 1
    after = torch.logit(layer(poses, activations)[1])
    torch.testing.assert_close(after - before, torch.full_like(before, moved))


def test_a_stored_config_from_before_beta_a_units_keeps_the_papers_units() -> None:
    stored = EMCapsNetConfig.small().to_dict()
    del stored["beta_a_units"]
    assert EMCapsNetConfig.from_dict(stored).beta_a_units == "paper"
    assert EMCapsNetConfig.small().beta_a_units == "logit"

def test_primary_capsules_cut_channels_into_poses_and_activations() -> None:
    layer = PrimaryMatrixCapsules(in_channels=3, types=2).double()
    features = torch.rand(1, 3, 2, 5, dtype=torch.float64)
    poses, activations = layer(features)
    assert poses.shape == (1, 2, 5, 2, 4, 4) and activations.shape == (1, 2, 5, 2)
    pose_conv, activation_conv = layer.pose(features), layer.activation(features)
    for row, col, t, i, j in [(0, 0, 0, 0, 0), (1, 4, 1, 2, 3), (0, 3, 1, 3, 1)]:
        assert poses[0, row, col, t, i, j] == pose_conv[0, 16 * t + 4 * i + j, row, col]
        assert activations[0, row, col, t] == torch.sigmoid(activation_conv[0, t, row, col])


# --- the network ---------------------------------------------------------------------------


@pytest.mark.parametrize("size, channels, classes, grids", [
    (28, 1, 10, (14, 6, 4)),  # MNIST
    (32, 2, 5, (16, 7, 5)),   # smallNORB: 32x32 crops of stereo pairs
    (32, 3, 10, (16, 7, 5)),  # colour images
])
def test_output_shapes(size: int, channels: int, classes: int, grids: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    config = EMCapsNetConfig(image_size=size, in_channels=channels, num_classes=classes, **TINY)
    assert config.grids == grids
    out = EMCapsNet(config)(torch.rand(3, channels, size, size))
    assert out.digit_caps.shape == (3, classes, 16)
    assert out.lengths.shape == (3, classes)
    assert torch.all((out.lengths >= 0) & (out.lengths <= 1))
    assert torch.equal(out.predictions, out.lengths.argmax(dim=1))
    assert out.reconstructions.shape == (3, 0)  # no decoder by default


def test_the_decoder_sees_the_pose_of_the_label_or_the_prediction() -> None:
    torch.manual_seed(0)
    model = EMCapsNet(EMCapsNetConfig(decoder_hidden=(32,), in_channels=3, **TINY))
    images, labels = torch.rand(2, 3, 28, 28), torch.tensor([3, 7])
    out = model(images, labels)
    assert out.reconstructions.shape == (2, 3, 28, 28)
    assert torch.all((out.reconstructions >= 0) & (out.reconstructions <= 1))
    others = out.digit_caps.clone()
    others[torch.arange(2), labels] = 0
    moved = out.digit_caps + 5 * others  # only the poses of other classes change
    torch.testing.assert_close(model.reconstruct(moved, labels), out.reconstructions)
    unlabelled = model(images)
    torch.testing.assert_close(unlabelled.reconstructions,
                               model.reconstruct(unlabelled.digit_caps, unlabelled.predictions))


@pytest.mark.parametrize("config, expected", [
    (EMCapsNetConfig(), 318_964),        # A=B=C=D=32 on MNIST
    (EMCapsNetConfig.small(), 68_444),   # A=64, B=8, C=D=16 on MNIST
    (EMCapsNetConfig(image_size=32, in_channels=2, num_classes=5), 317_194),  # smallNORB
    (EMCapsNetConfig.small(image_size=32, in_channels=2, num_classes=5), 68_754),
    (EMCapsNetConfig.small(decoder_hidden=(512, 1024)), None),
])
def test_parameter_count_is_the_real_count(config: EMCapsNetConfig, expected: int | None) -> None:
    assert config.parameter_count == count_parameters(EMCapsNet(config))
    if expected is not None:
        assert config.parameter_count == expected


def test_small_network_is_the_papers_small_one() -> None:
    config = EMCapsNetConfig.small(num_classes=5)
    assert (config.conv1_channels, config.primary_types, config.caps1_types,
            config.caps2_types, config.num_classes) == (64, 8, 16, 16, 5)
    assert EMCapsNetConfig.small(caps2_types=4).caps2_types == 4


@pytest.mark.parametrize("pixels", ["zero", "one", "255", "noise"])
@pytest.mark.parametrize("types", [EMCapsNetConfig.small().to_dict(), {**TINY, "caps2_types": 1}],
                         ids=["small", "one-type"])
def test_outputs_and_gradients_stay_finite(pixels: str, types: dict) -> None:
    # Blank and saturated images make every position alike: votes coincide, variances vanish.
    torch.manual_seed(0)
    model = EMCapsNet(EMCapsNetConfig.from_dict(types))
    fill = {"zero": 0.0, "one": 1.0, "255": 255.0}
    if pixels == "noise":
        images = torch.rand(2, 1, 28, 28)
    else:
        images = torch.full((2, 1, 28, 28), fill[pixels])
    labels = torch.tensor([1, 2])
    out = model(images, labels)
    for tensor in out[:2]:
        assert torch.isfinite(tensor).all()
    spread_loss(out.lengths, labels, 0.9).backward()
    for name, parameter in model.named_parameters():
        assert torch.isfinite(parameter.grad).all(), name


def test_routing_runs_in_float32_under_bfloat16_autocast() -> None:
    torch.manual_seed(0)
    model = EMCapsNet(EMCapsNetConfig(**TINY))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.rand(2, 1, 28, 28))
    assert out.lengths.dtype == torch.float32 and out.digit_caps.dtype == torch.float32
    assert torch.isfinite(out.lengths).all()


def test_outputs_do_not_depend_on_the_rest_of_the_batch() -> None:
    torch.manual_seed(0)
    model = EMCapsNet(EMCapsNetConfig(**TINY)).double()
    images = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    together = model(images)
    alone = model(images[2:3])
    torch.testing.assert_close(alone.lengths[0], together.lengths[2])
    torch.testing.assert_close(alone.digit_caps[0], together.digit_caps[2])


# --- spread loss ---------------------------------------------------------------------------


def test_spread_loss_by_hand() -> None:
    activations = torch.tensor([[0.9, 0.5, 0.1], [0.2, 0.6, 0.3]], dtype=torch.float64)
    # Example 1 (target 0): gaps 0.4 and 0.8 to a margin of 0.5: (0.5 - 0.4)^2 = 0.01.
    # Example 2 (target 2): gaps 0.1 and -0.3: 0.4^2 + 0.8^2 = 0.8. Mean: 0.405.
    loss = spread_loss(activations, torch.tensor([0, 2]), 0.5)
    torch.testing.assert_close(loss, torch.tensor(0.405, dtype=torch.float64))


def test_spread_loss_is_zero_past_the_margin_and_ignores_the_target_itself() -> None:
    activations = torch.tensor([[1.0, 0.0, 0.05], [0.0, 0.95, 0.0]], requires_grad=True)
    loss = spread_loss(activations, torch.tensor([0, 1]), torch.tensor(0.9))
    assert loss.item() == 0.0  # counting the target's own term would give 0.9^2 each
    loss.backward()
    assert torch.equal(activations.grad, torch.zeros_like(activations))


def test_spread_margin_rises_linearly_from_0_2_to_0_9() -> None:
    assert spread_margin(0, 1000) == pytest.approx(0.2)
    assert spread_margin(500, 1000) == pytest.approx(0.55)
    assert spread_margin(1000, 1000) == pytest.approx(0.9)
    assert spread_margin(5000, 1000) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="ramp_steps"):
        spread_margin(0, 0)


# --- config --------------------------------------------------------------------------------


@pytest.mark.parametrize("field, value", [
    ("image_size", 12), ("in_channels", 0), ("num_classes", 1), ("conv1_channels", 0),
    ("primary_types", 0), ("caps1_types", 5000), ("caps2_types", 0),
    ("routing_iterations", 0), ("inverse_temperature", 0.0), ("inverse_temperature", math.nan),
    ("weight_init_std", -1.0), ("decoder_hidden", ()), ("decoder_hidden", (0,)),
    ("routing_iterations", 2.5),
])
def test_config_bounds_are_enforced(field: str, value: object) -> None:
    with pytest.raises(CapsNetError, match=field):
        EMCapsNetConfig(**{field: value})


def test_smallest_image_gives_one_conv_capsule_position() -> None:
    assert EMCapsNetConfig(image_size=13).grids == (7, 3, 1)


def test_config_round_trips_through_a_dict() -> None:
    config = EMCapsNetConfig.small(decoder_hidden=(512, 1024), num_classes=5)
    stored = config.to_dict()
    assert stored["decoder_hidden"] == [512, 1024]
    assert EMCapsNetConfig.from_dict(stored) == config
    assert EMCapsNetConfig.from_dict(EMCapsNetConfig().to_dict()) == EMCapsNetConfig()
    with pytest.raises(CapsNetError, match="unknown settings"):
        EMCapsNetConfig.from_dict({**stored, "squash": True})
