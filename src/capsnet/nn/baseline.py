"""The baseline CNN of Sabour et al. (2017), to compare a CapsNet against.

Paper, section 5: "The baseline is a standard CNN with three convolutional layers of 256,
256, 128 channels. Each has 5x5 kernels and stride of 1. The last convolutional layers are
followed by two fully connected layers of size 328, 192. The last fully connected layer is
connected with dropout to a 10 class softmax layer with cross entropy loss." It has 35.4M
parameters on 28x28 MNIST, which is what "same" padding and no pooling give (35,445,522 here:
the 28x28x128 feature map feeds the 328 units).

Two variants, same layer sizes:

``paper``    no pooling, as counted above. On 40x40 inputs it grows to 69.7M parameters.
``pooled``   2x2 max pooling after the first two convolutions. The paper's affNIST
             comparison used "a traditional convolutional network (with MaxPooling and
             DropOut)" of the same MNIST accuracy as the CapsNet, without giving its
             layers; this is our stand-in for it: 6.7M parameters on 40x40 inputs
             (4.6M on 28x28), cheaper than the CapsNet to train. It is the default of
             ``capsnet experiment affnist``.

ReLU after every convolution and hidden layer; dropout (p=0.5) before the class layer;
the model returns logits (the softmax is in the cross-entropy loss).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CapsNetError
from ..utils.device import check_fits_in_memory
from ..utils.settings import MAX_IMAGE_SIDE, check_settings, setting, settings_from_dict

VARIANTS = ("paper", "pooled")
ARCHITECTURE = "baseline-cnn"  # the checkpoint tag that tells these apart from CapsNets


@dataclass(frozen=True)
class BaselineConfig:
    """Architecture of the baseline CNN; bounded as :class:`~capsnet.nn.model.CapsNetConfig`."""

    image_size: int = setting(28, "side of the square input images", min=1,
                              max=MAX_IMAGE_SIDE)
    in_channels: int = setting(1, "channels of the input images", min=1, max=64)
    num_classes: int = setting(10, "classes", min=2, max=10_000)
    variant: str = setting("paper", "paper: no pooling; pooled: 2x2 max pooling after the "
                           "first two convolutions", choices=VARIANTS)
    conv_channels: tuple[int, ...] = setting((256, 256, 128), "channels of each convolution",
                                             min=1, max=8192, max_len=16)
    kernel_size: int = setting(5, "kernel of every convolution", min=1, max=64)
    hidden: tuple[int, ...] = setting((328, 192), "hidden fully connected layers", min=1,
                                      max=65_536, max_len=16)
    dropout: float = setting(0.5, "dropout before the class layer", min=0, lt=1)

    def __post_init__(self) -> None:
        for name in ("conv_channels", "hidden"):
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_settings(self)
        if self.feature_size < 1:
            raise CapsNetError(f"image_size {self.image_size} is too small for the "
                               f"{self.variant} baseline")
        check_fits_in_memory(4 * self.parameter_count, "its weights")

    @property
    def parameter_count(self) -> int:
        """Number of parameters, from the config alone."""
        sizes = [self.in_channels, *self.conv_channels]
        convs = sum((n_in * self.kernel_size ** 2 + 1) * n_out
                    for n_in, n_out in zip(sizes, sizes[1:]))
        dense = [self.conv_channels[-1] * self.feature_size ** 2, *self.hidden, self.num_classes]
        return convs + sum((n_in + 1) * n_out for n_in, n_out in zip(dense, dense[1:]))

    @property
    def pooled_layers(self) -> int:
        """How many of the first convolutions are followed by 2x2 max pooling."""
        return 2 if self.variant == "pooled" else 0

    @property
    def feature_size(self) -> int:
        """Side of the last convolution's feature map ("same" padding keeps sizes)."""
        size = self.image_size
        for _ in range(self.pooled_layers):
            size //= 2
        return size

    def activation_floats(self, training: bool, device: torch.device | None = None) -> int:
        """Floats of activations one image needs (an upper bound, for memory estimates):
        every feature map at full image size (ReLU's copy too while training) and the dense
        layers; the same on any ``device``."""
        features = sum(self.conv_channels) * self.image_size ** 2
        return (2 if training else 1) * features + sum(self.hidden) + self.image_size ** 2 \
            * self.in_channels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_channels"], d["hidden"] = list(self.conv_channels), list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "BaselineConfig":
        return settings_from_dict(cls, data, "baseline config")


class BaselineCNN(nn.Module):
    """``forward(images)`` -> logits ``(batch, num_classes)``; see the module docstring."""

    def __init__(self, config: BaselineConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or BaselineConfig()
        layers: list[nn.Module] = []
        channels = config.in_channels
        for index, out in enumerate(config.conv_channels):
            layers += [nn.Conv2d(channels, out, config.kernel_size,
                                 padding=config.kernel_size // 2), nn.ReLU(inplace=True)]
            if index < config.pooled_layers:
                layers.append(nn.MaxPool2d(2))
            channels = out
        self.features = nn.Sequential(*layers)
        sizes = [channels * config.feature_size ** 2, *config.hidden]
        head: list[nn.Module] = [nn.Flatten()]
        for n_in, n_out in zip(sizes, sizes[1:]):
            head += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        head += [nn.Dropout(config.dropout), nn.Linear(sizes[-1], config.num_classes)]
        self.classifier = nn.Sequential(*head)

    def forward(self, images: Tensor) -> Tensor:
        return self.classifier(self.features(images))
