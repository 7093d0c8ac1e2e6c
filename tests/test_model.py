"""Behaviour of the CapsNet model and its configuration."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch
from torch import Tensor
from torch.func import functional_call

from capsnet.errors import CapsNetError
from capsnet.nn.losses import capsule_loss
from capsnet.nn.model import CapsNet, CapsNetConfig, count_parameters

# Small enough for a fast CPU forward pass, same geometry as MNIST (kernels 9, stride 2,
# 32 primary maps) so the primary capsule counts are the real ones.
NARROW = dict(conv1_channels=4, primary_dim=2, digit_dim=4, decoder_hidden=(8,))
# Smaller still, for gradcheck in float64. The large W init gives capsule lengths of
# 0.1-0.6, where the routing logits matter; at the default 0.1 the capsules are ~1e-4 long,
# coupling stays uniform and a gradient bug in the routing would go unseen.
TINY = CapsNetConfig(image_size=12, conv1_channels=4, conv1_kernel=3, primary_maps=2,
                     primary_dim=4, primary_kernel=3, digit_dim=4, num_classes=3,
                     routing_iterations=3, weight_init_std=3.0, decoder_hidden=(8,))


pytestmark = pytest.mark.usefixtures("one_thread")


def test_default_model_has_the_papers_parameter_count() -> None:
    assert count_parameters(CapsNet()) == 8_215_568


@pytest.mark.parametrize("size, channels, primary_caps", [
    (28, 1, 6 * 6 * 32),    # MNIST: 1152
    (36, 1, 10 * 10 * 32),  # MultiMNIST: conv1 28x28 -> primary 10x10 grid
    (32, 3, 8 * 8 * 32),    # CIFAR-style: 2048
])
def test_output_shapes(size: int, channels: int, primary_caps: int) -> None:
    config = CapsNetConfig(image_size=size, in_channels=channels, **NARROW)
    assert config.primary_caps == primary_caps
    torch.manual_seed(0)
    model = CapsNet(config)
    assert model.digits.weight.shape == (primary_caps, 10, 4, 2)
    out = model(torch.rand(2, channels, size, size))
    assert out.digit_caps.shape == (2, 10, 4)
    assert out.lengths.shape == (2, 10)
    assert out.predictions.shape == (2,) and out.predictions.dtype == torch.int64
    assert out.reconstructions.shape == (2, channels, size, size)
    assert torch.all((out.reconstructions >= 0) & (out.reconstructions <= 1))
    _, coupling = model.capsules(torch.rand(2, channels, size, size))
    assert coupling.shape == (2, primary_caps, 10)


@pytest.fixture()
def tiny_model() -> CapsNet:
    torch.manual_seed(0)
    # A large W init gives capsules far from zero, so masking visibly changes the decoder input.
    return CapsNet(CapsNetConfig(image_size=28, weight_init_std=1.0, init="torch", **NARROW))


def decoder_inputs(model: CapsNet, images: Tensor, labels: Tensor | None) -> tuple[Tensor, object]:
    """What the decoder's first layer receives, and the model output."""
    seen: list[Tensor] = []
    handle = model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
    try:
        out = model(images, labels)
    finally:
        handle.remove()
    return seen[0].view(len(images), model.config.num_classes, -1), out


def test_decoder_sees_only_the_labelled_capsule(tiny_model: CapsNet) -> None:
    images = torch.rand(4, 1, 28, 28)
    labels = torch.tensor([3, 0, 9, 3])
    seen, out = decoder_inputs(tiny_model, images, labels)
    for b, label in enumerate(labels.tolist()):
        torch.testing.assert_close(seen[b, label], out.digit_caps[b, label])
        others = [k for k in range(10) if k != label]
        assert torch.all(seen[b, others] == 0)
    torch.testing.assert_close(out.reconstructions, tiny_model.reconstruct(out.digit_caps, labels))


def test_without_labels_decoder_sees_the_longest_capsule(tiny_model: CapsNet) -> None:
    images = torch.rand(4, 1, 28, 28)
    seen, out = decoder_inputs(tiny_model, images, None)
    longest = out.digit_caps.norm(dim=-1).argmax(dim=1)
    assert torch.equal(out.predictions, longest)
    for b, k in enumerate(longest.tolist()):
        torch.testing.assert_close(seen[b, k], out.digit_caps[b, k])
        assert seen[b].abs().sum(dim=1).nonzero().flatten().tolist() == [k]
    torch.testing.assert_close(out.reconstructions, tiny_model.reconstruct(out.digit_caps, longest))
    # A different label changes what is decoded: masking actually selects.
    other = (longest + 1) % 10
    assert not torch.allclose(tiny_model(images, other).reconstructions, out.reconstructions)


def test_predictions_are_argmax_of_lengths(tiny_model: CapsNet) -> None:
    out = tiny_model(torch.rand(6, 1, 28, 28))
    torch.testing.assert_close(out.lengths, out.digit_caps.norm(dim=-1), rtol=1e-5, atol=1e-3)
    assert torch.equal(out.predictions, out.lengths.argmax(dim=1))


def test_gradcheck_through_total_loss() -> None:
    torch.manual_seed(0)
    model = CapsNet(TINY).double()
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in model.parameters())
    images = torch.rand(2, 1, 12, 12, dtype=torch.float64, requires_grad=True)
    targets = torch.rand(2, 1, 12, 12, dtype=torch.float64)  # fixed: gradcheck perturbs images
    labels = torch.tensor([0, 2])

    def total_loss(images: Tensor, *params: Tensor) -> Tensor:
        out = functional_call(model, dict(zip(names, params)), (images, labels))
        return capsule_loss(out.lengths, out.reconstructions, targets, labels,
                            reconstruction_weight=0.5)[0]

    # Fast mode checks a random projection of the full Jacobian: every parameter counts.
    assert torch.autograd.gradcheck(total_loss, (images, *params), fast_mode=True)
    # Full check on the routing weights alone, where the routing gradients live.
    w = names.index("digits.weight")

    def loss_of_w(weight: Tensor) -> Tensor:
        return total_loss(images, *params[:w], weight, *params[w + 1:])

    assert torch.autograd.gradcheck(loss_of_w, (params[w],))


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=-28), "image_size must be an integer in [1, 4,096], got -28"),
    (dict(conv1_channels=0), "conv1_channels must be an integer in [1, 8,192], got 0"),
    (dict(primary_dim=-1), "primary_dim must be an integer in [1, 1,024]"),
    (dict(routing_iterations=0), "routing_iterations must be an integer in [1, 100]"),
    (dict(digit_dim=2.5), "digit_dim must be an integer in [1, 1,024], got 2.5"),
    (dict(primary_maps=True), "primary_maps must be an integer in [1, 4,096], got True"),
    (dict(num_classes=1), "num_classes must be an integer in [2, 10,000], got 1"),
    (dict(weight_init_std=0.0), "weight_init_std must be a number in (0, 10]"),
    (dict(decoder_hidden=(512, -1)), "decoder_hidden must be a list of 1 to 16 sizes"),
    (dict(decoder_hidden=(2**40, 1024)), "decoder_hidden must be a list of 1 to 16 sizes, "
                                         "each an integer in [1, 65,536]"),
    (dict(decoder_hidden=()), "decoder_hidden must be a list of 1 to 16 sizes"),
    (dict(image_size=16), "image_size 16 is too small"),
    (dict(image_size=8), "image_size 8 is too small"),
    (dict(init="xavier"), "init must be one of glorot, official, torch"),
    (dict(routing_bias="yes"), "routing_bias must be true or false"),
])
def test_config_validation(overrides: dict, message: str) -> None:
    with pytest.raises(CapsNetError, match=re.escape(message)):
        CapsNetConfig(**overrides)


def test_a_network_too_big_for_the_machine_is_refused_before_allocation(monkeypatch) -> None:
    import capsnet.utils.device as device

    needed = 4 * CapsNetConfig(image_size=200).parameter_count / 2**30  # 92 x 92 x 32 capsules
    monkeypatch.setattr(device, "physical_memory", lambda: 2**30)  # a 1 GiB machine
    with pytest.raises(CapsNetError, match=rf"its weights would need {needed:.1f} GiB, more "
                                           rf"than this machine's 1.0 GiB"):
        CapsNetConfig(image_size=200)
    assert CapsNetConfig().parameter_count == count_parameters(CapsNet(CapsNetConfig()))


def test_smallest_valid_image_size() -> None:
    # 9x9 conv -> 9x9, 9x9 stride 2 -> 1x1; one pixel less fails (test above).
    assert CapsNetConfig(image_size=17).primary_grid == 1
    assert CapsNetConfig(image_size=17).primary_caps == 32


def test_config_dict_round_trip() -> None:
    config = CapsNetConfig(image_size=36, in_channels=3, routing_iterations=3,
                           decoder_hidden=(64, 32), weight_init_std=0.05)
    d = json.loads(json.dumps(config.to_dict()))  # must survive JSON, as in a checkpoint
    assert d["decoder_hidden"] == [64, 32]
    restored = CapsNetConfig.from_dict(d)
    assert restored == config and restored.decoder_hidden == (64, 32)
    with pytest.raises(CapsNetError, match="model config: unknown settings 'bogus'"):
        CapsNetConfig.from_dict({**d, "bogus": 1})


def init_model(init: str) -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(CapsNetConfig(init=init, primary_style="official", routing_bias=True))


def layers_with_bias(model: CapsNet) -> list[torch.nn.Module]:
    return [model.conv1, model.primary.conv,
            *[m for m in model.decoder if isinstance(m, torch.nn.Linear)]]


def test_glorot_init_is_the_notebooks_tf_layers() -> None:
    model = init_model("glorot")
    for layer in layers_with_bias(model):
        fan_out, fan_in = layer.weight.shape[0], layer.weight[0].numel()
        fan_out *= layer.weight[0, 0].numel()  # receptive field, for convolutions
        limit = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= limit
        assert layer.weight.abs().max() > 0.99 * limit  # uniform up to the limit
        assert not layer.bias.any()
    assert not model.digits.bias.any()
    assert model.digits.weight.std().item() == pytest.approx(0.1, rel=0.01)


def test_official_init_is_truncated_normal_with_biases_of_one_tenth() -> None:
    model = init_model("official")
    for layer, std in zip(layers_with_bias(model), (0.05, 0.1, 0.1, 0.1, 0.1)):
        assert layer.weight.abs().max() <= 2 * std  # cut at two standard deviations
        # The std of a normal cut at 2 sigma is 0.88 sigma.
        assert layer.weight.std().item() == pytest.approx(0.88 * std, rel=0.05)
        assert torch.all(layer.bias == 0.1)
    assert torch.all(model.digits.bias == 0.1)


def test_torch_init_keeps_pytorchs_defaults() -> None:
    model = init_model("torch")
    bound = 1 / math.sqrt(model.conv1.weight[0].numel())  # Kaiming-uniform with a = sqrt(5)
    assert model.conv1.weight.abs().max() <= bound
    assert model.conv1.bias.abs().max() <= bound and model.conv1.bias.any()


def test_routing_bias_adds_one_vector_per_class() -> None:
    plain = CapsNet(CapsNetConfig())
    biased = CapsNet(CapsNetConfig(routing_bias=True))
    assert count_parameters(biased) - count_parameters(plain) == 10 * 16
    assert count_parameters(plain) == 8_215_568
