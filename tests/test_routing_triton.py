"""The GPU routing kernels (capsnet.nn.routing_triton) agree with torch's routing.

Without a GPU they run in Triton's interpreter on CPU tensors; with one, the same checks run
on it, and the layer is checked end to end through the ``capsnet::route`` operator."""

from __future__ import annotations

import os

import pytest
import torch
from torch import Tensor

pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU, and Triton's interpreter is off (tests/conftest.py turns it on)",
                allow_module_level=True)

from capsnet.nn import routing_kernel, routing_triton  # noqa: E402
from capsnet.nn.layers import RoutingCapsules  # noqa: E402
from test_routing_kernel import SHAPES, layer_and_input, routed  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def fused(layer: RoutingCapsules, u: Tensor, keep: bool = True,
          dtype: torch.dtype = torch.float32) -> tuple[Tensor, ...]:
    """What ``routed`` gives, from the Triton kernels: v, the last coupling and the gradients
    of W (and of the bias) and u for the same weighting of v."""
    weight = layer.weight.detach().to(DEVICE, dtype)
    bias = None if layer.bias is None else layer.bias.detach().to(DEVICE, dtype)
    u = u.detach().to(DEVICE, dtype)
    v, coupling, s, weight_t = routing_triton.route(u, weight, bias, layer.iterations,
                                                    layer.leaky, keep, routing_kernel.EPSILON)
    last = coupling[:, -1].transpose(1, 2)
    if not keep:
        return v, last
    weighting = torch.linspace(-1, 1, v[0].numel(), device=DEVICE).view_as(v[0])
    grad_u, grad_weight, grad_s = routing_triton.route_backward(
        weighting.expand_as(v).to(dtype), u, weight_t, coupling, s, routing_kernel.EPSILON)
    grad_bias = (grad_s.sum(dim=(0, 1)),) if bias is not None else ()
    return v, last, grad_weight, *grad_bias, grad_u


def assert_agree(got: tuple[Tensor, ...], reference: tuple[Tensor, ...], bias: bool,
                 rtol: float = 1e-4, atol: float = 1e-5) -> None:
    names = ("v", "coupling", "grad W") + (("grad bias",) if bias else ()) + ("grad u",)
    for name, a, b in zip(names, got, reference):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), b.double(), rtol=rtol, atol=atol * scale,
                                   msg=name)


# MNIST's layer with one example: the interpreter takes seconds per example of it (the
# examples' count is tested below, on small layers)
MNIST_ONE = (*SHAPES[1][:5], 1, *SHAPES[1][6:])


@pytest.mark.parametrize("shape", [pytest.param(MNIST_ONE, marks=pytest.mark.slow),
                                   *SHAPES[2:]])
def test_triton_agrees_with_torch_in_double_precision(shape: tuple[int, ...]) -> None:
    layer, u = layer_and_input(shape)
    reference = routed(layer.double(), u.double(), kernel=False)
    assert_agree(fused(layer, u), reference, bias=shape[6])


@pytest.mark.parametrize("shape", [(40, 8, 10, 16, 3, 9, True, False),
                                   (33, 5, 2, 3, 4, 2, False, False)])
def test_triton_takes_any_count_of_input_capsules_and_examples(shape: tuple[int, ...]) -> None:
    """Partial blocks of input capsules, more examples than one program takes, odd sizes."""
    layer, u = layer_and_input(shape, seed=2)
    reference = routed(layer.double(), u.double(), kernel=False)
    assert_agree(fused(layer, u), reference, bias=shape[6])


def test_triton_without_backward_keeps_the_last_iteration_alone() -> None:
    layer, u = layer_and_input(SHAPES[3])
    v_kept, coupling_kept = fused(layer, u)[:2]
    v, coupling = fused(layer, u, keep=False)
    assert torch.equal(v, v_kept) and torch.equal(coupling, coupling_kept)


def test_triton_gives_the_same_bits_every_run() -> None:
    layer, u = layer_and_input(SHAPES[3], seed=3)
    first, second = fused(layer, u), fused(layer, u)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_triton_sums_bfloat16_inputs_in_float32() -> None:
    """bfloat16 inputs give what float32 gives on the same (rounded) values."""
    layer, u = layer_and_input(SHAPES[3], seed=4)
    rounded = RoutingCapsules(48, 4, 3, 5, 2, bias=True, leaky=True)
    rounded.load_state_dict({k: p.bfloat16().float() for k, p in layer.state_dict().items()})
    u = u.bfloat16().float()
    got = fused(rounded, u, dtype=torch.bfloat16)
    assert got[0].dtype == got[-1].dtype == torch.bfloat16 and got[1].dtype == torch.float32
    # v and the gradients come back in bfloat16: agreement to its 8-bit mantissa
    assert_agree(got, fused(rounded, u), bias=True, rtol=1e-2, atol=1e-2)


def test_layers_too_wide_for_a_program_route_in_torch() -> None:
    assert routing_triton.block_inputs(10, 16) == 32
    assert routing_triton.block_inputs(512, 32) == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", SHAPES)
def test_layer_on_a_gpu_routes_through_the_operator(shape: tuple[int, ...],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    layer, u = layer_and_input(shape)
    layer, u = layer.cuda(), u.cuda()
    calls = []
    route = routing_kernel.route
    monkeypatch.setattr(routing_kernel, "route", lambda *a: calls.append(1) or route(*a))
    got = routed(layer, u, kernel=True)
    assert calls, "the fused operator did not run"
    reference = routed(layer.double(), u.double(), kernel=False)
    assert_agree(got, reference, bias=shape[6])
