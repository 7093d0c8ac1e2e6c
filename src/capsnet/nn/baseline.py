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

from dataclasses import asdict, dataclass, fields
from typing import Any

from torch import Tensor, nn

from ..errors import CapsNetError

VARIANTS = ("paper", "pooled")
ARCHITECTURE = "baseline-cnn"  # the checkpoint tag that tells these apart from CapsNets


@dataclass(frozen=True)
class BaselineConfig:
    image_size: int = 28
    in_channels: int = 1
    num_classes: int = 10
    variant: str = "paper"
    conv_channels: tuple[int, ...] = (256, 256, 128)
    kernel_size: int = 5
    hidden: tuple[int, ...] = (328, 192)
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise CapsNetError(f"baseline variant must be one of {', '.join(VARIANTS)}, "
                               f"got {self.variant!r}")
        object.__setattr__(self, "conv_channels", tuple(int(c) for c in self.conv_channels))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        if not 0 <= self.dropout < 1:
            raise CapsNetError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.feature_size < 1:
            raise CapsNetError(f"image_size {self.image_size} is too small for the "
                               f"{self.variant} baseline")

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["conv_channels"], d["hidden"] = list(self.conv_channels), list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BaselineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CapsNetError(f"unknown baseline config keys: {', '.join(unknown)}")
        return cls(**d)


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
