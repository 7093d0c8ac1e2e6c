"""Behaviour of Efficient-CapsNet: its squash, self-attention routing against a plain-loop
reference, primary capsules, shapes, parameter counts, config bounds and a few training steps."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import Tensor

from capsnet.errors import CapsNetError
from capsnet.nn.efficient import (TRUNCATED_STD, DepthwisePrimaryCapsules, EfficientCapsNet,
                                  EfficientCapsNetConfig, SelfAttentionRouting,
                                  efficient_squash)
from capsnet.nn.layers import EPSILON
from capsnet.nn.losses import capsule_loss
from capsnet.nn.model import CapsNetOutput, count_parameters

pytestmark = pytest.mark.usefixtures("one_thread")

# A 3-channel 32x32 input leaves an 11x11 feature map, so a 3x3 grid of 16 primary capsules.
COLOUR = dict(image_size=32, in_channels=3)
# The official MultiMNIST network (models/efficient_capsnet_graph_multimnist.py): 36x36.
MULTIMNIST = dict(image_size=36, conv_strides=(1, 1, 2, 2), primary_kernel=5, primary_stride=2)


def seeded(config: EfficientCapsNetConfig | None = None, seed: int = 0) -> EfficientCapsNet:
    torch.manual_seed(seed)
    return EfficientCapsNet(config)


def random_images(batch: int, channels: int = 1, size: int = 28, seed: int = 1) -> Tensor:
    return torch.rand(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


# --- the squash ----------------------------------------------------------------------------


def test_squash_is_the_papers_formula_with_the_safe_norm() -> None:
    torch.manual_seed(0)
    lengths = torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    s = torch.randn(50, 7, dtype=torch.float64) * lengths
    norm = torch.sqrt(s.square().sum(-1, keepdim=True) + EPSILON)
    torch.testing.assert_close(efficient_squash(s), (1 - 1 / torch.exp(norm)) * s / norm)
    # Away from zero the safe norm's eps is invisible: the formula with the plain norm.
    plain = s.norm(dim=-1, keepdim=True)
    far = plain[:, 0] > 0.1
    expected = (1 - 1 / torch.exp(plain)) * s / plain
    torch.testing.assert_close(efficient_squash(s)[far], expected[far], rtol=1e-5, atol=0)


def test_squash_keeps_direction_and_maps_length_monotonically_into_unit_interval() -> None:
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(5, dtype=torch.float64), dim=0)
    s = torch.logspace(-4, 1.5, 40, dtype=torch.float64)[:, None] * direction
    v = efficient_squash(s)
    v_len = v.norm(dim=-1)
    assert torch.all(v_len > 0) and torch.all(v_len < 1)
    assert torch.all(v_len[1:] > v_len[:-1])
    torch.testing.assert_close(v / v_len[:, None], direction.expand_as(v))
    # Short vectors keep their length (slope 1 at zero), long ones end near 1.
    assert abs(v_len[0].item() / 1e-4 - 1) < 1e-3 and v_len[-1].item() == pytest.approx(1.0)
    huge = efficient_squash(torch.full((3,), 1e30, dtype=torch.float64))
    assert torch.isfinite(huge).all() and huge.norm().item() == pytest.approx(1.0)


def test_squash_acts_along_the_given_dim() -> None:
    s = torch.randn(3, 5, 4)
    torch.testing.assert_close(efficient_squash(s, dim=1),
                               efficient_squash(s.transpose(1, 2)).transpose(1, 2))


def test_squash_at_zero_is_zero_with_a_finite_identity_like_gradient() -> None:
    zero = torch.zeros(6, dtype=torch.float64)
    assert torch.equal(efficient_squash(zero), zero)
    jacobian = torch.autograd.functional.jacobian(efficient_squash, zero)
    assert torch.isfinite(jacobian).all()
    root = math.sqrt(EPSILON)  # the safe norm of the zero vector
    slope = -math.expm1(-root) / root  # 1 - root / 2 + ...: the true slope at zero is 1
    torch.testing.assert_close(jacobian, slope * torch.eye(6, dtype=torch.float64))
    s = torch.zeros(2, 8, requires_grad=True)
    efficient_squash(s).sum().backward()
    assert torch.isfinite(s.grad).all()


# --- self-attention routing ----------------------------------------------------------------


def small_routing(seed: int = 0) -> SelfAttentionRouting:
    torch.manual_seed(seed)
    layer = SelfAttentionRouting(in_caps=5, in_dim=3, out_caps=4, out_dim=6).double()
    with torch.no_grad():  # larger than the init, so the couplings are far from uniform
        layer.weight.normal_(std=0.5)
        layer.log_prior.normal_(std=0.3)
    return layer


def random_capsules(batch: int, in_caps: int = 5, in_dim: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(batch, in_caps, in_dim, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


def reference_routing(weight: Tensor, log_prior: Tensor, u: Tensor) -> tuple[Tensor, Tensor]:
    """The paper's equations, one example, class capsule n and pair (i, k) at a time: the
    agreement matrix A_n in full, the softmax over n, B added to the coupling."""
    in_caps, out_caps, out_dim, _ = weight.shape
    vs, cs = [], []
    for example in u:
        u_hat = [[weight[i, n] @ example[i] for n in range(out_caps)] for i in range(in_caps)]
        logits = []
        for i in range(in_caps):
            row = []
            for n in range(out_caps):
                a_n = [[u_hat[p][n] @ u_hat[k][n] / math.sqrt(out_dim) for k in range(in_caps)]
                       for p in range(in_caps)]
                row.append(sum(a_n[i]))
            logits.append(torch.stack(row))
        exp = torch.exp(torch.stack(logits))  # (in_caps, out_caps)
        c = exp / exp.sum(dim=1, keepdim=True)
        v = []
        for n in range(out_caps):
            s_n = sum((c[i, n] + log_prior[i, n]) * u_hat[i][n] for i in range(in_caps))
            norm = torch.sqrt((s_n ** 2).sum() + EPSILON)
            v.append((1 - 1 / torch.exp(norm)) * s_n / norm)
        vs.append(torch.stack(v))
        cs.append(c)
    return torch.stack(vs), torch.stack(cs)


def test_routing_matches_plain_reference_in_values() -> None:
    layer = small_routing()
    u = random_capsules(3)
    with torch.no_grad():
        v, coupling = layer(u)
        v_ref, c_ref = reference_routing(layer.weight, layer.log_prior, u)
    assert v.shape == (3, 4, 6) and coupling.shape == (3, 5, 4)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coupling, c_ref, rtol=1e-10, atol=1e-12)
    # Guards the comparison: the couplings are not the uniform 1/4 a broken routing could give.
    assert (coupling - 0.25).abs().max() > 0.1


def test_routing_matches_plain_reference_in_gradients() -> None:
    layer = small_routing()
    u = random_capsules(3).requires_grad_()
    generator = torch.Generator().manual_seed(2)
    v_weights = torch.randn(3, 4, 6, dtype=torch.float64, generator=generator)
    c_weights = torch.randn(3, 5, 4, dtype=torch.float64, generator=generator)
    leaves = (u, layer.weight, layer.log_prior)
    grads = []
    for route in (layer, lambda x: reference_routing(layer.weight, layer.log_prior, x)):
        v, coupling = route(u)
        loss = (v * v_weights).sum() + (coupling * c_weights).sum()
        grads.append(torch.autograd.grad(loss, leaves))
    for got, expected in zip(*grads):
        assert expected.abs().max() > 1e-3  # every leaf gets a real gradient
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_coupling_sums_to_one_over_output_capsules() -> None:
    _, coupling = small_routing()(random_capsules(4))
    torch.testing.assert_close(coupling.sum(dim=2), torch.ones(4, 5, dtype=torch.float64))
    assert not torch.allclose(coupling.sum(dim=1), torch.ones(4, 4, dtype=torch.float64))


def test_log_prior_adds_to_the_coupling_after_the_softmax() -> None:
    layer = small_routing()
    u = random_capsules(2)
    with torch.no_grad():
        v, coupling = layer(u)
        layer.log_prior.add_(0.7)  # a constant on the logits would leave the softmax unchanged
        v_shifted, coupling_shifted = layer(u)
    torch.testing.assert_close(coupling_shifted, coupling)
    assert not torch.allclose(v_shifted, v)


def test_outputs_do_not_depend_on_the_rest_of_the_batch() -> None:
    layer = small_routing()
    batch = random_capsules(6)
    v_batch, c_batch = layer(batch)
    for k in (0, 4):
        v_alone, c_alone = layer(batch[k:k + 1])
        torch.testing.assert_close(v_alone[0], v_batch[k])
        torch.testing.assert_close(c_alone[0], c_batch[k])


def test_routing_runs_in_float32_under_bf16_autocast() -> None:
    layer = SelfAttentionRouting(in_caps=16, in_dim=8, out_caps=10, out_dim=16)
    u = torch.randn(2, 16, 8).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        v, coupling = layer(u)
    assert v.dtype == coupling.dtype == torch.float32


def test_routing_init_is_the_official_he_normal() -> None:
    torch.manual_seed(0)
    layer = SelfAttentionRouting(in_caps=16, in_dim=8, out_caps=10, out_dim=16)  # MNIST's
    std = math.sqrt(2 / (8 * 16 * 10))  # Keras's fan-in of the official W
    weight = layer.weight.detach()
    assert abs(weight.std().item() / std - 1) < 0.03  # 20,480 draws
    assert weight.abs().max().item() <= 2 * std / TRUNCATED_STD  # cut at two of its stds
    assert not layer.log_prior.detach().any()


# --- primary capsules ----------------------------------------------------------------------


def test_primary_capsules_are_squashed_channels_in_row_col_map_order() -> None:
    maps, dim, height, width = 3, 2, 2, 3
    layer = DepthwisePrimaryCapsules(maps * dim, dim, kernel_size=1)
    with torch.no_grad():  # a 1x1 depthwise convolution that passes each channel through
        layer.conv.weight.fill_(1.0)
        layer.conv.bias.zero_()
    x = torch.randn(1, maps * dim, height, width)
    out = layer(x)
    expected = [efficient_squash(x[0, m * dim:(m + 1) * dim, row, col])
                for row in range(height) for col in range(width) for m in range(maps)]
    torch.testing.assert_close(out[0], torch.stack(expected))


def test_primary_convolution_is_depthwise() -> None:
    layer = DepthwisePrimaryCapsules(128, 8, kernel_size=9)
    assert layer.conv.weight.shape == (128, 1, 9, 9)
    x = torch.zeros(1, 128, 9, 9)
    x[0, 5] = torch.rand(9, 9) + 0.1  # one channel lit: only its own capsule (0) moves
    out = layer(x) - layer(torch.zeros_like(x))
    assert out.shape == (1, 16, 8)
    changed = out.abs().sum(-1)[0] > 0
    assert changed.tolist() == [True] + [False] * 15


def test_primary_capsules_refuse_channels_that_do_not_split() -> None:
    with pytest.raises(ValueError, match="capsules of 8"):
        DepthwisePrimaryCapsules(12, 8)


# --- the model -----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, primary_caps", [({}, 16), (COLOUR, 144), (MULTIMNIST, 16)])
def test_output_shapes(overrides: dict, primary_caps: int) -> None:
    config = EfficientCapsNetConfig(**overrides)
    assert config.primary_caps == primary_caps
    model = seeded(config)
    channels, size = config.in_channels, config.image_size
    images = random_images(3, channels, size)
    out = model(images)
    assert isinstance(out, CapsNetOutput)
    assert out.digit_caps.shape == (3, 10, 16)
    assert out.lengths.shape == (3, 10) and torch.all((out.lengths > 0) & (out.lengths < 1))
    assert out.predictions.shape == (3,) and out.predictions.dtype == torch.int64
    assert out.reconstructions.shape == (3, channels, size, size)
    assert torch.all((out.reconstructions >= 0) & (out.reconstructions <= 1))
    _, coupling = model.capsules(images)
    assert coupling.shape == (3, primary_caps, 10)


def test_default_parameter_count_is_the_papers() -> None:
    config = EfficientCapsNetConfig()
    model = seeded(config)
    without_decoder = sum(p.numel() for name, p in model.named_parameters()
                          if not name.startswith("decoder."))
    assert config.classifier_parameter_count == without_decoder == 161_824
    assert config.parameter_count == count_parameters(model) == 1_573_168


@pytest.mark.parametrize("overrides", [
    COLOUR, MULTIMNIST,
    dict(image_size=20, num_classes=5, conv_channels=(4, 12), conv_kernels=(3, 3),
         conv_strides=(2, 1), primary_maps=3, primary_dim=4, primary_kernel=3, digit_dim=5,
         decoder_hidden=(7,)),
])
def test_parameter_count_from_config_matches_the_model(overrides: dict) -> None:
    config = EfficientCapsNetConfig(**overrides)
    model = seeded(config)
    without_decoder = sum(p.numel() for name, p in model.named_parameters()
                          if not name.startswith("decoder."))
    assert config.classifier_parameter_count == without_decoder
    assert config.parameter_count == count_parameters(model)


def test_batch_norm_follows_each_relu_with_kerass_settings() -> None:
    layers = list(seeded().features)
    kinds = [type(layer).__name__ for layer in layers]
    assert kinds == ["Conv2d", "ReLU", "BatchNorm2d"] * 4
    norms = [layer for layer in layers if isinstance(layer, torch.nn.BatchNorm2d)]
    assert all(n.eps == 1e-3 and n.momentum == 0.01 for n in norms)
    assert [n.num_features for n in norms] == [32, 64, 64, 128]


def test_biases_start_at_zero() -> None:
    # Convolutions, the depthwise one, the decoder's layers, and batch norm's shifts.
    biases = [p for name, p in seeded().named_parameters() if name.endswith(".bias")]
    assert len(biases) == 4 + 4 + 1 + 3
    assert all(not b.detach().any() for b in biases)


def test_eval_mode_is_deterministic_and_independent_of_the_batch() -> None:
    model = seeded().eval()
    images = random_images(5)
    with torch.no_grad():
        first, second = model(images), model(images)
        alone = model(images[2:3])
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    torch.testing.assert_close(alone.digit_caps[0], first.digit_caps[2])


def test_eval_mode_leaves_batch_norm_statistics_alone() -> None:
    model = seeded()
    before = {k: v.clone() for k, v in model.state_dict().items() if "running" in k}
    with torch.no_grad():
        model.eval()(random_images(4))
        unchanged = all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
        model.train()(random_images(4))
        changed = all(not torch.equal(model.state_dict()[k], v) for k, v in before.items())
    assert unchanged and changed


def test_decoder_sees_the_labels_capsule_or_the_longest() -> None:
    model = seeded().eval()
    images = random_images(4)
    with torch.no_grad():
        out = model(images)
        by_prediction = model(images, out.predictions)
        other = model(images, (out.predictions + 1) % 10)
        pairs = model.reconstruct(out.digit_caps, torch.stack([out.predictions,
                                                               (out.predictions + 1) % 10], 1))
    assert torch.equal(out.reconstructions, by_prediction.reconstructions)
    assert not torch.allclose(out.reconstructions, other.reconstructions)
    assert pairs.shape == (4, 2, 1, 28, 28)
    torch.testing.assert_close(pairs[:, 0], out.reconstructions)
    torch.testing.assert_close(pairs[:, 1], other.reconstructions)


def test_a_few_training_steps_lower_the_loss() -> None:
    model = seeded()
    images, labels = random_images(8), torch.arange(8) % 10
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-4)
    losses = []
    for step in range(6):
        out = model(images, labels)
        loss, _, _ = capsule_loss(out.lengths, out.reconstructions, images, labels,
                                  reconstruction_weight=0.392, reduction="mean")
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all()
                       for p in model.parameters())
            assert model.digits.log_prior.grad.abs().max() > 0
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(x) for x in losses)
    assert all(later < earlier for earlier, later in zip(losses, losses[1:]))


# --- the config ----------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, message", [
    (dict(primary_dim=0), "primary_dim must be"),
    (dict(num_classes=1), "num_classes must be"),
    (dict(image_size=28.0), "image_size must be an integer"),
    (dict(conv_channels=()), "conv_channels must be"),
    (dict(conv_strides=(1, 1, 1, 0)), "conv_strides must be"),
    (dict(decoder_hidden=(512, 0)), "decoder_hidden must be"),
    (dict(primary_kernel=65), "primary_kernel must be"),
    (dict(conv_kernels=(5, 3, 3)), "as long as each other"),
    (dict(primary_maps=8), r"primary_maps \* primary_dim"),
    (dict(image_size=16), "too small"),
])
def test_config_rejects_bad_values(overrides: dict, message: str) -> None:
    with pytest.raises(CapsNetError, match=message):
        EfficientCapsNetConfig(**overrides)


def test_config_round_trips_through_json() -> None:
    config = EfficientCapsNetConfig(**MULTIMNIST)
    stored = json.loads(json.dumps(config.to_dict()))
    assert stored["conv_channels"] == [32, 64, 64, 128]
    assert EfficientCapsNetConfig.from_dict(stored) == config


@pytest.mark.parametrize("data, message", [
    ({"image_size": 28, "routing_iterations": 3}, "unknown settings .routing_iterations"),
    ([28, 1], "must be a dict"),
    ({"primary_stride": -1}, "primary_stride must be"),
])
def test_config_from_dict_refuses_foreign_data(data: object, message: str) -> None:
    with pytest.raises(CapsNetError, match=message):
        EfficientCapsNetConfig.from_dict(data)
