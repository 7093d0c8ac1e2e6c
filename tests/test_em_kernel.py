"""The fused EM routing operators (capsnet.nn.em_kernel) against torch: each operator's
values and gradients in double precision, the convolutional capsule layer and the whole
network with the kernel on and off, the weight gradient summed over threads, the operators'
registration (opcheck, torch.compile), and routing in torch where the kernel cannot be
built."""

from __future__ import annotations

import re
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
from torch import Tensor

from capsnet.nn import cbuild, em_kernel
from capsnet.nn.em_routing import (EPSILON, ClassMatrixCapsules, ConvMatrixCapsules,
                                   EMCapsNet, EMCapsNetConfig, spread_loss)

pytestmark = pytest.mark.usefixtures("one_thread")

# (batch, windows, inputs, outputs): small and odd ones, and the small network's ConvCaps1
SHAPES = [(2, 3, 7, 5), (1, 4, 72, 16), (3, 2, 45, 7), (2, 2, 9, 21)]


def operator_inputs(shape: tuple[int, int, int, int], seed: int = 0) -> list[Tensor]:
    """Poses, weight, assignment logits, their normalisers, activations, an inverse variance
    and a bias (the rest of the E-step's log)."""
    batch, windows, inputs, outputs = shape
    g = torch.Generator().manual_seed(seed)
    poses = torch.randn(batch, windows, inputs, 16, generator=g)
    weight = torch.randn(inputs, outputs, 16, generator=g)
    logits = torch.randn(batch, windows, outputs, inputs, generator=g)
    log_total = torch.rand(batch, windows, inputs, generator=g)
    activations = torch.rand(batch, windows, inputs, generator=g)
    inverse = torch.rand(batch, windows, outputs, 16, generator=g) + 0.5
    bias = torch.randn(batch, windows, outputs, generator=g)
    return [poses, weight, logits, log_total, activations, inverse, bias]


def torch_votes(poses: Tensor, weight: Tensor, offset: Tensor | None = None) -> Tensor:
    """(batch, windows, outputs, inputs, 16), made and stored; ``offset`` (inputs, 16) added
    to each input's votes."""
    votes = torch.einsum("nwipq,ioqr->nwoipr", poses.unflatten(-1, (4, 4)),
                         weight.unflatten(-1, (4, 4))).flatten(-2)
    return votes if offset is None else votes + offset.to(votes)


def an_offset(shape: tuple[int, int, int, int], seed: int = 0) -> Tensor:
    """A constant for each input's votes, (inputs, 16)."""
    return torch.randn(shape[2], 16, generator=torch.Generator().manual_seed(seed + 100))


def torch_moments(poses: Tensor, weight: Tensor, logits: Tensor | None, log_total: Tensor,
                  activations: Tensor, epsilon: float = EPSILON, offset: Tensor | None = None
                  ) -> tuple[Tensor, ...]:
    votes = torch_votes(poses, weight, offset)
    zeros = log_total.new_zeros(votes.shape[:4])
    assignments = ((zeros if logits is None else logits) - log_total[:, :, None]).exp()
    weights = assignments * activations[:, :, None]
    mass = weights.sum(dim=-1)
    share = weights / (mass[..., None] + epsilon)
    mean = torch.einsum("nwoi,nwoih->nwoh", share, votes)
    spread = torch.einsum("nwoi,nwoih->nwoh", share, (votes - mean[..., None, :]).square())
    return mean, spread, mass


def kernel_moments(poses: Tensor, weight: Tensor, logits: Tensor | None, log_total: Tensor,
                   activations: Tensor, epsilon: float = EPSILON, offset: Tensor | None = None
                   ) -> tuple[Tensor, ...]:
    return em_kernel.moments(poses, weight, offset, logits, log_total, activations, epsilon)


def torch_assignment_logits(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor,
                            bias: Tensor, offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    squared = (torch_votes(poses, weight, offset) - mean[..., None, :]).square()
    logits = bias[..., None] - 0.5 * torch.einsum("nwoih,nwoh->nwoi", squared, inverse)
    return logits, logits.logsumexp(dim=2)


def kernel_logits(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor, bias: Tensor,
                  offset: Tensor | None = None) -> tuple[Tensor, Tensor]:
    return em_kernel.assignment_logits(poses, weight, offset, mean, inverse, bias)


def e_step_inputs(shape: tuple[int, int, int, int], seed: int = 0,
                  offset: Tensor | None = None) -> list[Tensor]:
    """Poses, weight, a mean (of the moments), an inverse variance and a bias."""
    poses, weight, logits, log_total, activations, inverse, bias = operator_inputs(shape, seed)
    mean = torch_moments(poses, weight, logits, log_total, activations, offset=offset)[0]
    return [poses, weight, mean, inverse, bias]


def values_and_gradients(function, inputs: list[Tensor]) -> list[Tensor]:  # noqa: ANN001
    """The outputs of ``function`` and the gradients of every input for a fixed weighting of
    the outputs."""
    inputs = [t.clone().requires_grad_() for t in inputs]
    outputs = function(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    scalar = sum((out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum()
                 for out in outputs)
    return [*outputs, *torch.autograd.grad(scalar, inputs)]


def assert_agree(got: list[Tensor], expected: list[Tensor], names: tuple[str, ...]) -> None:
    """float32 sums in another order against float64: agreement to float32's rounding."""
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.shape == b.shape, name
        scale = b.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-4, atol=1e-5 * scale,
                                   msg=name)


MOMENTS_OUT = ("mean", "spread", "mass", "grad poses", "grad weight")


# epsilon 1: shares that sum to well under one, so the spread's path through the mean counts;
# an offset: the class capsules' coordinate addition
@pytest.mark.parametrize("epsilon", [EPSILON, 1.0])
@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_moments_agree_with_torch_in_double_precision(shape: tuple[int, ...], epsilon: float,
                                                      offset: bool) -> None:
    inputs = operator_inputs(shape)[:5]
    shift = an_offset(shape) if offset else None
    got = values_and_gradients(partial(kernel_moments, epsilon=epsilon, offset=shift), inputs)
    expected = values_and_gradients(partial(torch_moments, epsilon=epsilon, offset=shift),
                                    [t.double() for t in inputs])
    assert_agree(got, expected, (*MOMENTS_OUT, "grad logits", "grad log_total",
                                 "grad activations"))


def test_moments_of_equal_logits_agree_with_torch() -> None:
    """The first M-step's: no logits, every assignment of an input capsule the same."""
    poses, weight, _, log_total, activations = operator_inputs((2, 3, 7, 5), seed=3)[:5]
    inputs = [poses, weight, log_total, activations]

    def without_logits(function):  # noqa: ANN001, ANN202
        return lambda poses, weight, *rest: function(poses, weight, None, *rest)

    got = values_and_gradients(without_logits(kernel_moments), inputs)
    expected = values_and_gradients(without_logits(torch_moments), [t.double() for t in inputs])
    assert_agree(got, expected, (*MOMENTS_OUT, "grad log_total", "grad activations"))


@pytest.mark.parametrize("offset", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_assignment_logits_agree_with_torch_in_double_precision(shape: tuple[int, ...],
                                                                offset: bool) -> None:
    shift = an_offset(shape) if offset else None
    inputs = e_step_inputs(shape, offset=shift)
    got = values_and_gradients(partial(kernel_logits, offset=shift), inputs)
    expected = values_and_gradients(partial(torch_assignment_logits, offset=shift),
                                    [t.double() for t in inputs])
    assert_agree(got, expected, ("logits", "lse", "grad poses", "grad weight", "grad mean",
                                 "grad inverse", "grad bias"))


@pytest.mark.parametrize("isa", ["AVX512", "AVX2", "DEFAULT"])
@pytest.mark.parametrize("vector_exp", [True, False])
def test_every_instruction_sets_build_agrees_with_torch(isa: str, vector_exp: bool,
                                                       tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel's vector code has a path for AVX-512 and a generic one, and its exp()
    glibc's vector one or the plain one, which the build for this CPU alone would leave
    untested."""
    if isa == "AVX512" and torch.backends.cpu.get_cpu_capability() != "AVX512":
        pytest.skip("this CPU has no AVX-512")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    builds = cbuild.builds(em_kernel.SOURCE, "em", [], isa)[0 if vector_exp else 1:]
    built = cbuild.load(em_kernel.SOURCE, lambda: builds, em_kernel._declare, "EM routing")
    assert built is not None
    monkeypatch.setattr(em_kernel, "library", lambda: built)
    inputs = operator_inputs((2, 3, 11, 6), seed=2)
    for operator, reference, given in ((kernel_moments, torch_moments, inputs[:5]),
                                       (kernel_logits, torch_assignment_logits,
                                        e_step_inputs((2, 3, 11, 6), seed=2))):
        got = values_and_gradients(operator, given)
        expected = values_and_gradients(reference, [t.double() for t in given])
        assert_agree(got, expected, tuple(map(str, range(len(got)))))


def strided(t: Tensor) -> Tensor:
    """The same values, laid out transposed: not contiguous."""
    return t.transpose(0, -1).contiguous().transpose(0, -1)


def test_the_operators_take_tensors_that_are_not_contiguous() -> None:
    inputs = operator_inputs((2, 3, 7, 5), seed=4)
    for operator, given in ((kernel_moments, inputs[:5]),
                            (kernel_logits, e_step_inputs((2, 3, 7, 5), seed=4))):
        assert not any(strided(t).is_contiguous() for t in given)
        expected = values_and_gradients(operator, given)
        got = values_and_gradients(lambda *ts: operator(*map(strided, ts)), given)  # noqa: B023
        for a, b in zip(got, expected, strict=True):
            torch.testing.assert_close(a, b)


def test_the_weight_gradient_is_the_sum_over_every_thread() -> None:
    inputs = operator_inputs((4, 5, 18, 6), seed=1)[:5]
    alone = values_and_gradients(kernel_moments, inputs)
    torch.set_num_threads(2)  # the one_thread fixture puts it back
    shared = values_and_gradients(kernel_moments, inputs)
    for a, b in zip(alone, shared, strict=True):
        torch.testing.assert_close(a, b)


def test_the_operators_pass_torchs_checks() -> None:
    inputs = [t.requires_grad_() for t in operator_inputs((2, 3, 7, 5))]
    poses, weight, logits, rest = inputs[0], inputs[1], inputs[2], inputs[3:5]
    offset = an_offset((2, 3, 7, 5))
    for shift in (None, offset):
        torch.library.opcheck(em_kernel.moments, (poses, weight, shift, logits, *rest, EPSILON))
        torch.library.opcheck(em_kernel.moments, (poses, weight, shift, None, *rest, EPSILON))
        e_poses, e_weight, *e_step = [t.detach().requires_grad_()
                                      for t in e_step_inputs((2, 3, 7, 5), offset=shift)]
        torch.library.opcheck(em_kernel.assignment_logits, (e_poses, e_weight, shift, *e_step))


# --- the layers, with the kernel and without ---------------------------------------------------


LAYERS = {
    "convolutional": lambda: ConvMatrixCapsules(5, 7, 3, 2, iterations=3,
                                                inverse_temperature=0.01, init_std=1.0),
    # coordinate addition: the offset
    "class": lambda: ClassMatrixCapsules(5, 7, image_size=28, iterations=3,
                                         inverse_temperature=0.01, init_std=1.0),
}


def layer_run(name: str, kernel: bool, monkeypatch: pytest.MonkeyPatch) -> list[Tensor]:
    """A layer's outputs and every gradient, the kernel on or off."""
    monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", "on" if kernel else "off")
    torch.manual_seed(0)
    layer = LAYERS[name]()
    poses = torch.randn(3, 9, 9, 5, 4, 4, requires_grad=True)
    activations = torch.rand(3, 9, 9, 5, requires_grad=True)
    mean, out_activations = layer(poses, activations)
    weighting = torch.linspace(-1, 1, mean.numel()).view_as(mean)
    scalar = (mean * weighting).sum() + 3 * out_activations.sum()
    leaves = [poses, activations, layer.weight, layer.beta_u, layer.beta_a]
    return [mean, out_activations, *torch.autograd.grad(scalar, leaves)]


@pytest.mark.parametrize("name", LAYERS)
def test_capsule_layers_route_the_same_with_the_kernel(name: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    moments = em_kernel.moments
    monkeypatch.setattr(em_kernel, "moments", lambda *a: calls.append(1) or moments(*a))
    fused = layer_run(name, True, monkeypatch)
    assert len(calls) == 3, "the kernel did not route each iteration"
    plain = layer_run(name, False, monkeypatch)
    assert len(calls) == 3
    assert_agree(fused, plain, ("mean", "activations", "grad poses", "grad activations",
                                "grad weight", "grad beta_u", "grad beta_a"))


def network_gradients(model: EMCapsNet, images: Tensor, labels: Tensor) -> list[Tensor]:
    model.zero_grad()
    out = model(images, labels)
    spread_loss(out.lengths, labels, 0.5).backward()
    return [out.lengths.detach()] + [p.grad.clone() for p in model.parameters()]


def test_the_network_learns_as_in_double_precision_with_the_kernel() -> None:
    """Three EM layers amplify float32's rounding (float32 in torch is about 5e-5 of each
    gradient's largest element from float64 here, the kernel 2e-4): both are held to 1e-3 of
    it, far below what a wrong term in a gradient gives."""
    torch.manual_seed(0)
    model = EMCapsNet(EMCapsNetConfig(conv1_channels=8, primary_types=4, caps1_types=4,
                                      caps2_types=3))
    images, labels = torch.rand(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])
    calls = []
    moments = em_kernel.moments
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(em_kernel, "moments", lambda *a: calls.append(1) or moments(*a))
        fused = network_gradients(model, images, labels)
    assert len(calls) == 9  # ConvCaps1, ConvCaps2 and the class capsules, 3 iterations each
    reference = network_gradients(model.double(), images.double(), labels)
    names = ("lengths", *(name for name, _ in model.named_parameters()))
    for name, a, b in zip(names, fused, reference, strict=True):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * scale, msg=name)


@pytest.mark.slow  # a compile, about half a minute
def test_a_compiled_layer_calls_the_operators_and_agrees(monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    torch.manual_seed(0)
    layer = ConvMatrixCapsules(4, 3, 3, 2, iterations=2, inverse_temperature=0.01,
                               init_std=1.0)
    poses, activations = torch.randn(2, 7, 7, 4, 4, 4), torch.rand(2, 7, 7, 4)
    eager = layer(poses, activations)
    compiled = torch.compile(layer, fullgraph=True)(poses, activations)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_without_a_kernel_em_routing_runs_in_torch(tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cache").write_text("not a folder")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    em_kernel.library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="EM routing runs in torch, its CPU kernel did not"):
            assert em_kernel.library() is None
        monkeypatch.setattr(em_kernel, "moments", lambda *a: pytest.fail("the kernel ran"))
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once, not at every forward
            layer = ConvMatrixCapsules(2, 3, 3, 1, iterations=2, inverse_temperature=0.01,
                                       init_std=1.0)
            mean, _ = layer(torch.randn(1, 4, 4, 2, 4, 4), torch.rand(1, 4, 4, 2))
        assert mean.shape == (1, 2, 2, 3, 4, 4)
    finally:
        em_kernel.library.cache_clear()


def test_each_network_names_the_kernel_it_routes_in(monkeypatch: pytest.MonkeyPatch) -> None:
    from capsnet.nn.efficient import EfficientCapsNet
    from capsnet.tools.bench import routing

    cpu = torch.device("cpu")
    em = EMCapsNet(EMCapsNetConfig.small())
    version = em.routing_kernel(cpu)
    assert version == cbuild.source_version("em_kernel", em_kernel.SOURCE.read_bytes())
    assert re.fullmatch(r"em_kernel-[0-9a-f]{12}", version) and routing(version) == "kernel"
    assert EfficientCapsNet().routing_kernel(cpu) is None and routing(None) == "torch"
    assert em.double().routing_kernel(cpu) is None  # the kernel takes float32
    monkeypatch.setenv("CAPSNET_ROUTING_KERNEL", "off")
    assert EMCapsNet(EMCapsNetConfig.small()).routing_kernel(cpu) is None


def test_a_kernel_names_the_source_it_was_built_from(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A record names the code that ran: the source as read when the library was built, not
    the file as it is when the record is written (edited during a run, say)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    source = tmp_path / "em_kernel.c"
    text = em_kernel.SOURCE.read_bytes() + b"\n/* another version */\n"
    source.write_bytes(text)
    found = cbuild.builds(source, "em", [])
    source.write_text("edited after it was read: not C\n")
    built = cbuild.load(source, lambda: found, em_kernel._declare, "EM routing")
    assert built is not None  # compiled from the text read, not the file as it is now
    assert built.version == cbuild.source_version("em_kernel", text)
    assert built.version != cbuild.source_version("em_kernel", em_kernel.SOURCE.read_bytes())
    monkeypatch.setattr(em_kernel, "library", lambda: built)
    assert EMCapsNet(EMCapsNetConfig.small()).routing_kernel(torch.device("cpu")) == built.version
