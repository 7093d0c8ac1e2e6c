"""The fast paths (bf16 autocast, torch.compile, fused Adam) agree with the fp32 eager reference."""

from __future__ import annotations

import copy

import pytest
import torch

from capsnet.training.evaluate import autocast
from capsnet.nn.losses import capsule_loss
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.training.trainer import make_optimizer
import capsnet.utils.device as device_module
from capsnet.utils.device import compile_options

SMALL = CapsNetConfig(image_size=16, conv1_channels=16, conv1_kernel=5, primary_maps=4,
                      primary_dim=8, primary_kernel=5, digit_dim=16, decoder_hidden=(32, 64),
                      routing_iterations=3, weight_init_std=0.5)


def loss_and_grads(model: CapsNet, images: torch.Tensor, labels: torch.Tensor, precision: str
                   ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad()
    with autocast(torch.device("cpu"), precision):
        out = model(images, labels)
    loss, _, _ = capsule_loss(out.lengths.float(), out.reconstructions.float(), images, labels)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return loss.detach(), out.lengths.detach().float(), grads


@pytest.fixture()
def setup() -> tuple[CapsNet, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = CapsNet(SMALL)
    images = torch.rand(6, 1, 16, 16)
    labels = torch.arange(6) % 10
    return model, images, labels


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp(min=1e-12))


def test_bf16_autocast_agrees_with_fp32(setup) -> None:
    model, images, labels = setup
    loss32, lengths32, grads32 = loss_and_grads(model, images, labels, "fp32")
    loss16, lengths16, grads16 = loss_and_grads(model, images, labels, "bf16")
    # bfloat16 keeps 8 bits of mantissa (relative step 2^-8 = 0.4%); the routing runs in
    # float32 (measured on 8 seeds: lengths within 0.6%, the whole gradient within 1.5%; the
    # decoder's small bias gradients alone vary up to 20%), so 1.5% and 5% are the bounds.
    assert relative_error(lengths16, lengths32) < 0.015
    assert abs(loss16 - loss32) / loss32 < 0.01
    flat16, flat32 = (torch.cat([g[name].flatten() for name in grads32]) for g in (grads16, grads32))
    assert relative_error(flat16, flat32) < 0.05


def test_routing_runs_in_float32_under_bf16_autocast(setup) -> None:
    model, images, _ = setup
    with autocast(torch.device("cpu"), "bf16"):
        features = model.primary(torch.relu(model.conv1(images)))
        v, coupling = model.digits(features)
    assert features.dtype == torch.bfloat16
    assert v.dtype == coupling.dtype == torch.float32


def test_bf16_autocast_uses_bfloat16(setup) -> None:
    model, images, labels = setup
    with autocast(torch.device("cpu"), "bf16"):
        features = model.conv1(images)
    assert features.dtype == torch.bfloat16


@pytest.mark.slow
def test_compiled_model_agrees_with_eager(setup) -> None:
    pytest.importorskip("torch._inductor")
    model, images, labels = setup
    loss_eager, lengths_eager, grads_eager = loss_and_grads(model, images, labels, "fp32")
    compiled = copy.deepcopy(model)
    compiled.compile(options=compile_options(torch.device("cpu")))
    loss_c, lengths_c, grads_c = loss_and_grads(compiled, images, labels, "fp32")
    # Same fp32 math, fused and reordered: differences at rounding level.
    torch.testing.assert_close(lengths_c, lengths_eager, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_eager, rtol=1e-5, atol=1e-7)
    for name in grads_eager:
        torch.testing.assert_close(grads_c[name], grads_eager[name], rtol=1e-4, atol=1e-6,
                                   msg=name)


def adam_steps(model: CapsNet, optimizer: torch.optim.Optimizer, images: torch.Tensor,
               labels: torch.Tensor, steps: int) -> None:
    for _ in range(steps):
        out = model(images, labels)
        loss, _, _ = capsule_loss(out.lengths, out.reconstructions, images, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def test_fused_adam_on_cpu_agrees_with_plain_adam(setup) -> None:
    model, images, labels = setup
    plain = copy.deepcopy(model)
    fused = make_optimizer(model.parameters(), 1e-3, torch.device("cpu"))
    assert fused.param_groups[0]["fused"]
    adam_steps(model, fused, images, labels, 3)
    adam_steps(plain, torch.optim.Adam(plain.parameters(), lr=1e-3, foreach=False), images,
               labels, 3)
    for (name, p), q in zip(model.named_parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def test_saved_plain_adam_state_continues_fused(setup) -> None:
    model, images, labels = setup
    plain = torch.optim.Adam(model.parameters(), lr=1e-3)  # as checkpoints before fused
    adam_steps(model, plain, images, labels, 2)
    state = copy.deepcopy(plain.state_dict())
    resumed = make_optimizer(model.parameters(), 1e-3, torch.device("cpu"), state)
    assert resumed.param_groups[0]["fused"] and resumed.param_groups[0]["foreach"] is None
    first = next(model.parameters())
    torch.testing.assert_close(resumed.state[first]["exp_avg"], plain.state[first]["exp_avg"])
    adam_steps(model, resumed, images, labels, 1)
    assert resumed.state[first]["step"].item() == 3


@pytest.mark.parametrize("flags, expected", [({"fpu", "avx512f", "amx_bf16"}, "bf16"),
                                             ({"fpu", "avx512f", "avx512_bf16"}, "fp32")])
def test_auto_precision_is_bf16_only_on_a_cpu_with_amx(flags: set[str], expected: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(device_module, "cpu_flags", lambda: flags)
    assert device_module.resolved_precision(torch.device("cpu"), "auto") == expected
    assert device_module.resolved_precision(torch.device("cpu"), "fp32") == "fp32"
    assert device_module.resolved_precision(torch.device("cuda"), "auto") == "fp32"
