"""The Capsule Network of Sabour, Frosst and Hinton (2017), as built by the tutorial notebook.

    images -> conv1 (ReLU) -> primary capsules -> digit capsules (routing) -> lengths
                                                      |
                                       mask by label or longest capsule -> decoder -> image
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CapsNetError
from ..utils.device import check_fits_in_memory
from ..utils.settings import MAX_IMAGE_SIDE, check_settings, setting, settings_from_dict
from .base import CapsNetOutput, CapsuleModel  # noqa: F401 - CapsNetOutput is public here
from .layers import (PRIMARY_STYLES, PrimaryCapsules, RoutingCapsules, decoder_parameter_count,
                     reconstruction_decoder)
from .routing_kernel import version as kernel_version

INITS = ("glorot", "official", "torch")


@dataclass(frozen=True)
class CapsNetConfig:
    """Architecture of a CapsNet. The defaults are the notebook's MNIST network. Every field
    is bounded (a value past a bound is a typo, not a plan), and a network whose weights
    would not fit in this machine's memory is refused before anything is allocated.

    The fields with ``train=`` are the ones a training run chooses: they are declared here
    only, and TrainConfig has them too (flags, stored settings) with the ``train`` value as
    default, the paper's where the notebook differs. ``before`` (what settings stored before
    a field existed meant) holds for both."""

    image_size: int = setting(28, "side of the square input images (28 MNIST, 36 MultiMNIST, "
                              "40 affNIST-style)", min=1, max=MAX_IMAGE_SIDE)
    in_channels: int = setting(1, "channels of the input images", min=1, max=64)
    num_classes: int = setting(10, "classes, one digit capsule each", min=2, max=10_000)
    conv1_channels: int = setting(256, "channels of the first convolution", min=1, max=8192)
    conv1_kernel: int = setting(9, "kernel of the first convolution", min=1, max=64)
    primary_maps: int = setting(32, "primary capsule maps (the paper: 32 for MNIST, 64 for "
                                "CIFAR-10)", min=1, max=4096, train=32)
    primary_dim: int = setting(8, "dimensions of a primary capsule", min=1, max=1024)
    primary_kernel: int = setting(9, "kernel of the primary capsule convolution", min=1, max=64)
    primary_stride: int = setting(2, "stride of the primary capsule convolution", min=1, max=64)
    digit_dim: int = setting(16, "dimensions of a digit capsule", min=1, max=1024)
    routing_iterations: int = setting(2, "routing-by-agreement iterations (the notebook: 2, "
                                      "the paper: 3)", min=1, max=100, train=3)
    weight_init_std: float = setting(0.1, "standard deviation of the routing matrices W",
                                     gt=0, max=10)
    decoder_hidden: tuple[int, ...] = setting((512, 1024), "hidden layers of the decoder",
                                              min=1, max=65_536, max_len=16)
    primary_style: str = setting("notebook", "official: squash(conv / maps + bias), no ReLU; "
                                 "notebook: squash(ReLU(conv))", choices=PRIMARY_STYLES,
                                 train="official")
    routing_bias: bool = setting(False, "a learned bias on s_j in every routing iteration "
                                 "(official code)", train=True)
    leaky_routing: bool = setting(False, "a none-of-the-above output in the routing softmax "
                                  "(the paper's CIFAR-10 network)", train=False)
    init: str = setting("glorot", "weight initialisation: the official code's truncated "
                        "normals, the notebook's Glorot-uniform, or PyTorch's defaults (see "
                        "CapsNet.reset_parameters)", choices=INITS, train="official",
                        before="torch")  # the code before the choice: PyTorch's defaults

    def __post_init__(self) -> None:
        if isinstance(self.decoder_hidden, list):
            object.__setattr__(self, "decoder_hidden", tuple(self.decoder_hidden))
        check_settings(self)
        if self.primary_grid < 1:
            raise CapsNetError(
                f"image_size {self.image_size} is too small for two {self.conv1_kernel}x"
                f"{self.conv1_kernel} / {self.primary_kernel}x{self.primary_kernel} convolutions")
        check_fits_in_memory(4 * self.parameter_count, "its weights")

    @property
    def primary_grid(self) -> int:
        """Side of the primary capsule maps (6 for 28x28 inputs)."""
        conv1_size = self.image_size - self.conv1_kernel + 1
        return (conv1_size - self.primary_kernel) // self.primary_stride + 1

    @property
    def primary_caps(self) -> int:
        """Number of primary capsules (1152 for 28x28 inputs)."""
        return self.primary_grid ** 2 * self.primary_maps

    @property
    def image_pixels(self) -> int:
        return self.in_channels * self.image_size ** 2

    @property
    def parameter_count(self) -> int:
        """Number of parameters of the network, from the config alone (8,215,568 by default)."""
        c1, maps_dims = self.conv1_channels, self.primary_maps * self.primary_dim
        convs = (self.in_channels * self.conv1_kernel ** 2 + 1) * c1 \
            + (c1 * self.primary_kernel ** 2 + 1) * maps_dims
        routing = self.primary_caps * self.num_classes * self.digit_dim * self.primary_dim \
            + self.routing_bias * self.num_classes * self.digit_dim
        decoder = decoder_parameter_count(self.num_classes * self.digit_dim,
                                          self.decoder_hidden, self.image_pixels)
        return convs + routing + decoder

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "CapsNetConfig":
        """A config from stored ``data`` (a checkpoint, a safetensors header): checked."""
        return settings_from_dict(cls, data, "model config")


class CapsNet(CapsuleModel, nn.Module):
    """Capsule network with routing by agreement and a reconstruction decoder.

    ``forward(images, labels=None)`` takes images ``(batch, channels, size, size)`` with
    pixels in [0, 1] and returns a :class:`CapsNetOutput`. The decoder sees only one
    capsule: the one of ``labels`` when given (training), else the longest one; labels
    ``(batch, k)`` give k reconstructions per image (see :meth:`reconstruct`).
    """

    architecture = "capsnet"  # the tag stored with trained models
    config_class = CapsNetConfig

    def __init__(self, config: CapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CapsNetConfig()
        # What the outputs mean, kept with trained models (see capsnet.nn.pretrained).
        self.class_names = tuple(str(i) for i in range(config.num_classes))
        self.prepare = "mnist"
        self.conv1 = nn.Conv2d(config.in_channels, config.conv1_channels, config.conv1_kernel)
        self.primary = PrimaryCapsules(config.conv1_channels, config.primary_maps,
                                       config.primary_dim, config.primary_kernel,
                                       config.primary_stride, config.primary_style)
        self.digits = RoutingCapsules(config.primary_caps, config.primary_dim,
                                      config.num_classes, config.digit_dim,
                                      config.routing_iterations, config.weight_init_std,
                                      config.routing_bias, config.leaky_routing)
        self.decoder = reconstruction_decoder(config.num_classes * config.digit_dim,
                                              config.decoder_hidden, config.image_pixels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Initialise the weights as ``config.init`` says; W is always N(0, weight_init_std).

        * ``"glorot"``: Glorot-uniform weights and zero biases, as the notebook's ``tf.layers``;
        * ``"official"``: the official code's truncated normals (std 0.05 for conv1, 0.1
          for everything else, cut at two standard deviations) and biases of 0.1;
        * ``"torch"``: PyTorch's defaults (Kaiming-uniform weights, uniform biases).
        """
        init = self.config.init
        if init == "torch":
            return
        for module in (self.conv1, self.primary.conv, *self.decoder):
            if not isinstance(module, (nn.Conv2d, nn.Linear)):
                continue
            if init == "glorot":
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            else:
                std = 0.05 if module is self.conv1 else 0.1
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                nn.init.constant_(module.bias, 0.1)
        if self.digits.bias is not None:
            nn.init.constant_(self.digits.bias, 0.1 if init == "official" else 0.0)

    def capsules(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Digit capsules ``(batch, classes, digit_dim)`` and the last coupling coefficients
        ``(batch, primary_caps, classes)`` for ``images``."""
        features = torch.relu(self.conv1(images))  # (batch, conv1_channels, 20, 20)
        u = self.primary(features)  # (batch, primary_caps, primary_dim)
        return self.digits(u)

    def convolutions(self) -> nn.Module:
        """This model's floor in ``capsnet bench``, sharing its weights: conv1 and the primary
        capsules' convolution, each with a ReLU."""
        return nn.Sequential(self.conv1, nn.ReLU(), self.primary.conv, nn.ReLU())

    def routing_kernel(self, device: torch.device) -> str | None:
        u = torch.empty(1, self.config.primary_caps, self.config.primary_dim, device=device)
        return kernel_version(u, self.digits.weight) if self.digits.fused else None


def capsnet_mnist(pretrained: bool = True, **config: Any) -> CapsNet:
    """The MNIST CapsNet: the trained model shipped with capsnet, or (``pretrained=False``) a
    fresh network of the notebook's architecture (8,215,568 parameters) with ``config``
    overrides. Also torch.hub's entry point (hubconf.py)."""
    if pretrained:
        if config:
            raise ValueError("the pretrained model has its own config; pass none")
        return CapsNet.from_pretrained("mnist")
    return CapsNet(CapsNetConfig(**config))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
