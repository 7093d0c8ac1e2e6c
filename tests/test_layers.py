"""Behaviour of the capsule layers: squash, primary capsules and routing by agreement."""

from __future__ import annotations


import pytest
import torch
from torch import Tensor

import capsnet.nn.layers

from capsnet.nn.layers import EPSILON, PrimaryCapsules, RoutingCapsules, safe_norm, squash


pytestmark = pytest.mark.usefixtures("one_thread")


def small_layer(iterations: int, seed: int = 0) -> RoutingCapsules:
    torch.manual_seed(seed)
    return RoutingCapsules(in_caps=6, in_dim=3, out_caps=4, out_dim=5,
                           iterations=iterations, init_std=0.5).double()


def random_capsules(batch: int, in_caps: int = 6, in_dim: int = 3, seed: int = 1) -> Tensor:
    return torch.randn(batch, in_caps, in_dim, dtype=torch.float64,
                       generator=torch.Generator().manual_seed(seed))


# --- squash and safe_norm ------------------------------------------------------------


def test_squash_keeps_direction_and_maps_length_into_unit_interval() -> None:
    torch.manual_seed(0)
    # Lengths from tiny to large, so both ends of |s|^2 / (1 + |s|^2) are exercised.
    s = torch.randn(50, 7, dtype=torch.float64) * torch.logspace(-3, 3, 50, dtype=torch.float64)[:, None]
    v = squash(s)
    s_len, v_len = s.norm(dim=-1), v.norm(dim=-1)
    assert torch.all(v_len >= 0) and torch.all(v_len < 1)
    # Paper eq. 1, with eps inside the norm's square root (visible only for tiny |s|).
    expected = s_len**2 / (1 + s_len**2) * s_len / torch.sqrt(s_len**2 + EPSILON)
    torch.testing.assert_close(v_len, expected)
    cosine = (s * v).sum(-1) / (s_len * v_len)
    torch.testing.assert_close(cosine, torch.ones(50, dtype=torch.float64))


def test_squash_acts_along_the_given_dim() -> None:
    s = torch.randn(3, 5, 4)
    torch.testing.assert_close(squash(s, dim=1), squash(s.transpose(1, 2)).transpose(1, 2))


@pytest.mark.parametrize("fn", [squash, safe_norm])
def test_finite_value_and_gradient_at_zero_vector(fn) -> None:
    s = torch.zeros(2, 8, requires_grad=True)
    out = fn(s)
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert s.grad is not None and torch.isfinite(s.grad).all()


def test_safe_norm_value() -> None:
    s = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    expected = torch.tensor([(25 + EPSILON) ** 0.5, EPSILON ** 0.5], dtype=torch.float64)
    torch.testing.assert_close(safe_norm(s), expected)
    assert safe_norm(s, keepdim=True).shape == (2, 1)


# --- routing -----------------------------------------------------------------------------


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_coupling_sums_to_one_over_output_capsules(iterations: int) -> None:
    layer = small_layer(iterations)
    v, coupling = layer(random_capsules(5))
    assert v.shape == (5, 4, 5) and coupling.shape == (5, 6, 4)
    torch.testing.assert_close(coupling.sum(dim=2), torch.ones(5, 6, dtype=torch.float64))
    if iterations > 1:
        # Routing moved away from uniform; a softmax over the input capsules would make
        # the sums over i equal 1 instead.
        assert not torch.allclose(coupling.sum(dim=1), torch.ones(5, 4, dtype=torch.float64))


def test_one_iteration_couples_uniformly() -> None:
    _, coupling = small_layer(1)(random_capsules(3))
    torch.testing.assert_close(coupling, torch.full_like(coupling, 1 / 4))


def test_outputs_do_not_depend_on_the_rest_of_the_batch() -> None:
    layer = small_layer(3)
    batch = random_capsules(7)
    v_batch, c_batch = layer(batch)
    for k in (0, 4):
        v_alone, c_alone = layer(batch[k:k + 1])
        torch.testing.assert_close(v_alone[0], v_batch[k])
        torch.testing.assert_close(c_alone[0], c_batch[k])


@pytest.mark.parametrize("batch", [16, 37, 300])
def test_routing_in_groups_on_a_cpu_equals_the_whole_batch(batch: int,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # 16: two groups of 8; 37: four of 8 and one of 5; 300: fifteen of 19 and one of 15.
    layer = small_layer(3)
    u = random_capsules(batch).requires_grad_()
    routed: list[int] = []
    route = layer.route
    layer.route = lambda u_hat: routed.append(len(u_hat)) or route(u_hat)
    results = []
    for grouped in (True, False):
        if not grouped:
            monkeypatch.setattr(capsnet.nn.layers, "CPU_ROUTING_MIN", batch)
        routed.clear()
        v, coupling = layer(u)
        assert routed == ({16: [8, 8], 37: [8, 8, 8, 8, 5], 300: [19] * 15 + [15]}[batch]
                          if grouped else [batch])
        weight_grad, u_grad = torch.autograd.grad(v.square().sum(), (layer.weight, u))
        results.append((v, coupling, weight_grad, u_grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def reference_routing(weight: Tensor, u: Tensor, iterations: int,
                      bias: Tensor | None = None, leaky: bool = False) -> tuple[Tensor, Tensor]:
    """The notebook's procedure, one example and one (i, j) pair at a time; ``bias`` is
    added to every s_j as the official code does; ``leaky`` adds an output j = -1 whose
    logit stays 0 to the softmax."""
    in_caps, out_caps = weight.shape[:2]
    vs, cs = [], []
    for example in u:
        u_hat = [[weight[i, j] @ example[i] for j in range(out_caps)] for i in range(in_caps)]
        b = torch.zeros(in_caps, out_caps, dtype=u.dtype)
        for _ in range(iterations):
            c = torch.exp(b) / (torch.exp(b).sum(dim=1, keepdim=True) + leaky)  # softmax over j
            v = []
            for j in range(out_caps):
                s_j = sum(c[i, j] * u_hat[i][j] for i in range(in_caps))
                if bias is not None:
                    s_j = s_j + bias[j]
                sq = (s_j**2).sum()
                v.append(sq / (1 + sq) * s_j / torch.sqrt(sq + EPSILON))
            for i in range(in_caps):
                for j in range(out_caps):
                    b[i, j] += u_hat[i][j] @ v[j]
        vs.append(torch.stack(v))
        cs.append(c)
    return torch.stack(vs), torch.stack(cs)


@pytest.mark.parametrize("iterations", [1, 2, 3])
def test_routing_matches_plain_reference(iterations: int) -> None:
    layer = small_layer(iterations)
    u = random_capsules(3)
    with torch.no_grad():
        v, coupling = layer(u)
        v_ref, c_ref = reference_routing(layer.weight, u, iterations)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coupling, c_ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("iterations", [1, 3])
def test_routing_bias_matches_plain_reference(iterations: int) -> None:
    torch.manual_seed(0)
    layer = RoutingCapsules(in_caps=6, in_dim=3, out_caps=4, out_dim=5, iterations=iterations,
                            init_std=0.5, bias=True).double()
    assert layer.bias.shape == (4, 5) and not layer.bias.any()  # zero until a model sets it
    with torch.no_grad():
        layer.bias.normal_()
        u = random_capsules(3)
        v, coupling = layer(u)
        v_ref, c_ref = reference_routing(layer.weight, u, iterations, layer.bias)
        v_plain, _ = reference_routing(layer.weight, u, iterations)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coupling, c_ref, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(v, v_plain)


@pytest.mark.parametrize("iterations", [1, 3])
def test_leaky_routing_matches_plain_reference(iterations: int) -> None:
    torch.manual_seed(0)
    layer = RoutingCapsules(in_caps=6, in_dim=3, out_caps=4, out_dim=5, iterations=iterations,
                            init_std=0.5, leaky=True).double()
    u = random_capsules(3)
    with torch.no_grad():
        v, coupling = layer(u)
        v_ref, c_ref = reference_routing(layer.weight, u, iterations, leaky=True)
    torch.testing.assert_close(v, v_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(coupling, c_ref, rtol=1e-10, atol=1e-12)
    assert torch.all(coupling.sum(dim=2) < 1)  # some of each vote goes to none of the above


def test_more_iterations_change_the_result() -> None:
    # Guards the reference test against iterations being silently ignored.
    u = random_capsules(2)
    v1, _ = small_layer(1)(u)
    v3, _ = small_layer(3)(u)
    assert not torch.allclose(v1, v3)


@pytest.mark.parametrize("iterations", [0, -1])
def test_routing_rejects_fewer_than_one_iteration(iterations: int) -> None:
    with pytest.raises(ValueError, match="iteration"):
        RoutingCapsules(4, 2, 3, 2, iterations=iterations)


def test_weight_init_std_is_close_to_sigma() -> None:
    torch.manual_seed(0)
    for sigma in (0.01, 0.1):
        weight = RoutingCapsules(64, 8, 10, 16, init_std=sigma).weight  # 81,920 draws
        assert weight.shape == (64, 10, 16, 8)
        assert abs(weight.std().item() / sigma - 1) < 0.02
        assert abs(weight.mean().item()) < 0.02 * sigma


def test_predictions_equal_explicit_products() -> None:
    layer = small_layer(2)
    u = random_capsules(4)
    u_hat = layer.predictions(u)
    assert u_hat.shape == (4, 6, 4, 5)
    for b in range(4):
        for i in range(6):
            for j in range(4):
                torch.testing.assert_close(u_hat[b, i, j], layer.weight[i, j] @ u[b, i])


def test_predictions_keep_no_batch_tiled_copy_of_weight() -> None:
    # The notebook tiles W by the batch size; every tensor autograd keeps for the backward
    # pass must stay far below batch * |W| elements.
    layer = RoutingCapsules(in_caps=20, in_dim=4, out_caps=5, out_dim=6)
    u = torch.randn(32, 20, 4)
    saved: list[int] = []

    def pack(t: Tensor) -> Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer.predictions(u).sum().backward()
    assert saved, "predictions() saved nothing for backward: the hook did not run"
    assert max(saved) < 2 * max(layer.weight.numel(), u.numel())
    assert layer.weight.grad is not None


# --- primary capsules --------------------------------------------------------------------


def test_primary_capsules_shape_for_mnist_geometry() -> None:
    layer = PrimaryCapsules(in_channels=2, n_maps=32, caps_dim=8, kernel_size=9, stride=2)
    assert layer.output_grid(20, 20) == (6, 6)
    out = layer(torch.rand(3, 2, 20, 20))
    assert out.shape == (3, 1152, 8)
    assert torch.all(out.norm(dim=-1) < 1)


def test_primary_capsule_order_is_row_col_map() -> None:
    n_maps, dim, height, width = 3, 2, 2, 4
    layer = PrimaryCapsules(in_channels=n_maps * dim, n_maps=n_maps, caps_dim=dim,
                            kernel_size=1, stride=1)
    with torch.no_grad():  # identity 1x1 convolution: the capsules are the input channels
        layer.conv.weight.copy_(torch.eye(n_maps * dim).view(n_maps * dim, n_maps * dim, 1, 1))
        layer.conv.bias.zero_()
    x = torch.rand(1, n_maps * dim, height, width, dtype=torch.float32) + 0.1  # > 0: ReLU is identity
    out = layer(x)
    assert out.shape == (1, height * width * n_maps, dim)
    expected = []
    for row in range(height):
        for col in range(width):
            for m in range(n_maps):
                expected.append(squash(x[0, m * dim:(m + 1) * dim, row, col]))
    torch.testing.assert_close(out[0], torch.stack(expected))


def negative_primary(style: str) -> tuple[PrimaryCapsules, Tensor, Tensor]:
    """A 1x1 primary layer whose convolution output is negative everywhere, its input, and
    the convolution output ``(channels, h, w)`` with the bias and without it."""
    torch.manual_seed(0)
    layer = PrimaryCapsules(in_channels=4, n_maps=2, caps_dim=3, kernel_size=1, stride=1,
                            style=style)
    with torch.no_grad():
        layer.conv.weight.copy_(-torch.rand_like(layer.conv.weight) - 0.1)
        layer.conv.bias.copy_(-torch.rand_like(layer.conv.bias))
    x = torch.rand(1, 4, 2, 2) + 0.1
    weighted = torch.einsum("oi,bihw->bohw", layer.conv.weight[:, :, 0, 0], x)[0]
    return layer, x, weighted


def test_notebook_primary_capsules_relu_negative_convolutions_to_zero() -> None:
    layer, x, weighted = negative_primary("notebook")
    assert torch.all(weighted + layer.conv.bias[:, None, None] < 0)
    out = layer(x)
    assert out.shape == (1, 2 * 2 * 2, 3)
    assert torch.all(out == 0)


def test_official_primary_capsules_squash_conv_over_maps_plus_bias_without_relu() -> None:
    layer, x, weighted = negative_primary("official")
    out = layer(x)
    pre = weighted / 2 + layer.conv.bias[:, None, None]  # (maps * dim, h, w); 2 maps
    assert torch.all(pre < 0)
    expected = torch.stack([squash(pre[m * 3:(m + 1) * 3, row, col])
                            for row in range(2) for col in range(2) for m in range(2)])
    torch.testing.assert_close(out[0], expected)
    assert torch.all(out < 0)


def test_primary_style_is_checked() -> None:
    with pytest.raises(ValueError, match="style must be one of"):
        PrimaryCapsules(in_channels=4, style="relu")
