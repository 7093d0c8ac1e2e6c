"""The CPU routing kernel (capsnet.nn.routing_kernel) agrees with torch's routing."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch import Tensor

from capsnet.nn import cbuild, em_kernel, routing_kernel
from capsnet.nn.layers import RoutingCapsules, squash

# (in_caps, in_dim, out_caps, out_dim, iterations, batch, bias, leaky): MNIST's layer as the
# notebook and as the official code (bias) have it, and small ones with other shapes (each is
# its own build of the kernel), one iteration to five, odd batches, leaky routing.
SHAPES = [(1152, 8, 10, 16, 3, 5, False, False), (1152, 8, 10, 16, 3, 4, True, False),
          (32, 8, 10, 16, 1, 3, False, True), (48, 4, 3, 5, 2, 7, True, True),
          (16, 3, 7, 9, 5, 1, False, True)]


def routed(layer: RoutingCapsules, u: Tensor, kernel: bool) -> tuple[Tensor, ...]:
    """v, coupling and the gradients of W (and of the bias) and u for a fixed weighting of v."""
    layer.fused = kernel
    u = u.clone().requires_grad_()
    v, coupling = layer(u)
    weighting = torch.linspace(-1, 1, v[0].numel(), dtype=v.dtype).view_as(v[0])
    weights = [layer.weight] + ([layer.bias] if layer.bias is not None else [])
    return v, coupling, *torch.autograd.grad((v * weighting).sum(), weights + [u])


def layer_and_input(shape: tuple[int, ...], seed: int = 0) -> tuple[RoutingCapsules, Tensor]:
    in_caps, in_dim, out_caps, out_dim, iterations, batch, bias, leaky = shape
    torch.manual_seed(seed)
    layer = RoutingCapsules(in_caps, in_dim, out_caps, out_dim, iterations, init_std=0.5,
                            bias=bias, leaky=leaky)
    if bias:
        torch.nn.init.uniform_(layer.bias, -0.5, 0.5)
    return layer, squash(torch.randn(batch, in_caps, in_dim) * 2)


@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_agrees_with_torch_in_double_precision(shape: tuple[int, ...],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    layer, u = layer_and_input(shape)
    calls = []
    route = routing_kernel.route
    monkeypatch.setattr(routing_kernel, "route", lambda *a: calls.append(1) or route(*a))
    got = routed(layer, u, kernel=True)
    assert calls, "the kernel did not run"
    reference = routed(layer.double(), u.double(), kernel=True)  # float64 runs in torch
    assert len(calls) == 1
    # float32 against float64: the kernel sums in another order than torch, in single
    # precision, so agreement is to float32's rounding of sums over up to 1152 terms.
    names = ("v", "coupling", "grad W") + (("grad bias",) if shape[6] else ()) + ("grad u",)
    for name, a, b in zip(names, got, reference, strict=True):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("shape", SHAPES[:3])
def test_kernel_agrees_with_torch_in_single_precision(shape: tuple[int, ...]) -> None:
    layer, u = layer_and_input(shape, seed=1)
    for a, b in zip(routed(layer, u, kernel=True), routed(layer, u, kernel=False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def test_kernel_gives_the_same_bits_on_any_number_of_threads() -> None:
    layer, u = layer_and_input(SHAPES[0])
    threads = torch.get_num_threads()
    try:
        results = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(routed(layer, u, kernel=True))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_kernel_couplings_are_a_softmax_and_carry_no_gradient() -> None:
    layer, u = layer_and_input(SHAPES[0])
    v, coupling = layer(u.requires_grad_())
    assert v.requires_grad and not coupling.requires_grad
    assert coupling.shape == (5, 1152, 10)
    torch.testing.assert_close(coupling.sum(dim=2), torch.ones(5, 1152))


@pytest.mark.parametrize("change", ["in_caps", "float64", "switched off"])
def test_what_the_kernel_does_not_take_routes_in_torch(change: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    if change == "switched off":
        monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", "off")
    in_caps = 40 if change == "in_caps" else 32  # the kernel takes blocks of 16
    layer = RoutingCapsules(in_caps, 8, 10, 16)
    u = squash(torch.randn(3, in_caps, 8))
    if change == "float64":
        layer, u = layer.double(), u.double()
    monkeypatch.setattr(routing_kernel, "route", lambda *a: pytest.fail("the kernel ran"))
    v, _ = layer(u)
    assert v.shape == (3, 10, 16)


def test_the_kernel_is_named_by_the_source_its_library_was_built_from() -> None:
    from capsnet.nn.model import CapsNet

    layer, u = RoutingCapsules(32, 8, 10, 16), squash(torch.randn(2, 32, 8))
    version = routing_kernel.library(10, 16, 8).version
    assert version == cbuild.source_version("routing_kernel", routing_kernel.SOURCE.read_bytes())
    assert routing_kernel.version(u, layer.weight) == version
    assert CapsNet().routing_kernel(torch.device("cpu")) == version  # MNIST's 10 x 16 from 8
    assert routing_kernel.version(u.double(), layer.double().weight) is None  # torch routes


@pytest.mark.parametrize("trouble", ["no compiler", "cache is a file"])
def test_a_kernel_that_does_not_build_leaves_routing_to_torch(
        trouble: str, tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    if trouble == "no compiler":
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    else:
        (tmp_path / "cache").write_text("not a folder")
        monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    routing_kernel.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="routing runs in torch, its CPU kernel did not build"):
            assert routing_kernel.library(10, 16, 8) is None
        layer = RoutingCapsules(32, 8, 10, 16)
        monkeypatch.setattr(routing_kernel, "route", lambda *a: pytest.fail("the kernel ran"))
        assert layer(squash(torch.randn(2, 32, 8)))[0].shape == (2, 10, 16)
    finally:
        routing_kernel.library.cache_clear()
    assert not list(tmp_path.rglob("*.so"))


def test_without_gradients_the_kernel_keeps_the_last_iteration_alone(
        monkeypatch: pytest.MonkeyPatch) -> None:
    layer, u = layer_and_input(SHAPES[0])
    v, coupling = layer(u.requires_grad_())
    kept = []
    route = routing_kernel.route
    monkeypatch.setattr(routing_kernel, "route",
                        lambda *a: kept.append(a[5]) or route(*a))
    with torch.no_grad():
        v_no_grad, coupling_no_grad = layer(u)
    assert kept == [False]
    assert torch.equal(v_no_grad, v) and torch.equal(coupling_no_grad, coupling)
    v, coupling, _, _ = routing_kernel.route(u, layer.weight, None, 3, False, False)
    assert coupling.shape == (5, 1, 10, 1152)
    with pytest.raises(RuntimeError, match="has no backward"):
        v.sum().backward()


def test_the_constant_mark_is_torch_compilers_own() -> None:
    """constant_when_compiled marks a function as torch.compiler.assume_constant_result does
    (without importing torch._dynamo at start-up): the same attributes, the same values."""
    from capsnet.nn.routing_kernel import constant_when_compiled

    def ours() -> int:
        return 1

    def torchs() -> int:
        return 1

    assert constant_when_compiled(ours) is ours
    assert vars(ours) == vars(torch.compiler.assume_constant_result(torchs)) != {}


# Trains a step of a small CapsNet and a small EM network on a CPU, both routing in their
# kernels, and says whether torch.compile's front end was imported.
ROUTE_WITHOUT_COMPILE = """
import sys, torch
from capsnet.nn import em_kernel, routing_kernel
from capsnet.nn.registry import MODELS, model_config
assert routing_kernel.available(10, 16, 8) and em_kernel.available()
for name, sizes in (("capsnet", {"primary_maps": 2}), ("em-capsnet-small", {"image_size": 16})):
    model = MODELS[name].model(model_config(name, **sizes))
    out = model(torch.rand(2, 1, sizes.get("image_size", 28), sizes.get("image_size", 28)),
                torch.tensor([3, 5]))
    out.lengths.sum().backward()
print("torch._dynamo" in sys.modules)
"""


def test_the_kernels_run_without_importing_torch_compile() -> None:
    """The fused operators' first calls leave torch._dynamo unloaded: its import (about 1.5 s)
    is not part of every ``capsnet predict`` (torch.library.custom_op's kernels load it)."""
    if not (routing_kernel.available(10, 16, 8) and em_kernel.available()):
        pytest.skip("a routing kernel does not build here")
    done = subprocess.run([sys.executable, "-c", ROUTE_WITHOUT_COMPILE], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
