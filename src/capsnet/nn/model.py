"""The Capsule Network of Sabour, Frosst and Hinton (2017), as built by the tutorial notebook.

    images -> conv1 (ReLU) -> primary capsules -> digit capsules (routing) -> lengths
                                                      |
                                       mask by label or longest capsule -> decoder -> image
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from .layers import PRIMARY_STYLES, PrimaryCapsules, RoutingCapsules, safe_norm

INITS = ("glorot", "official", "torch")


@dataclass(frozen=True)
class CapsNetConfig:
    """Architecture of a CapsNet. The defaults are the notebook's MNIST network."""

    image_size: int = 28  # square inputs: 28 MNIST, 36 MultiMNIST, 40 affNIST-style
    in_channels: int = 1
    num_classes: int = 10
    conv1_channels: int = 256
    conv1_kernel: int = 9
    primary_maps: int = 32
    primary_dim: int = 8
    primary_kernel: int = 9
    primary_stride: int = 2
    digit_dim: int = 16
    routing_iterations: int = 2  # notebook 2, paper 3
    weight_init_std: float = 0.1  # of the routing matrices W
    decoder_hidden: tuple[int, ...] = (512, 1024)
    primary_style: str = "notebook"  # or "official": no ReLU, convolution / maps (see layers)
    routing_bias: bool = False  # the official code's learned bias on s_j
    init: str = "glorot"  # see CapsNet.reset_parameters

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "decoder_hidden":
                object.__setattr__(self, f.name, tuple(int(v) for v in value))
                if any(v < 1 for v in self.decoder_hidden):
                    raise ValueError(f"decoder_hidden sizes must be positive, got {value}")
            elif f.name == "weight_init_std":
                if not value > 0:
                    raise ValueError(f"weight_init_std must be positive, got {value}")
            elif f.name in CHOICES:
                if value not in CHOICES[f.name]:
                    raise ValueError(f"{f.name} must be one of {', '.join(CHOICES[f.name])}, "
                                     f"got {value!r}")
            elif f.name == "routing_bias":
                if not isinstance(value, bool):
                    raise ValueError(f"routing_bias must be true or false, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{f.name} must be a positive integer, got {value!r}")
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")
        if self.primary_grid < 1:
            raise ValueError(
                f"image_size {self.image_size} is too small for two {self.conv1_kernel}x"
                f"{self.conv1_kernel} / {self.primary_kernel}x{self.primary_kernel} convolutions")

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

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "CapsNetConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys: {', '.join(unknown)}")
        return cls(**d)


CHOICES = {"primary_style": PRIMARY_STYLES, "init": INITS}


class CapsNetOutput(NamedTuple):
    digit_caps: Tensor        # (batch, classes, digit_dim) output capsules v_j
    lengths: Tensor           # (batch, classes) safe norms |v_j|, the class scores
    predictions: Tensor       # (batch,) index of the longest capsule
    reconstructions: Tensor   # (batch, [k,] channels, size, size) decoder output in [0, 1]


class CapsNet(nn.Module):
    """Capsule network with routing by agreement and a reconstruction decoder.

    ``forward(images, labels=None)`` takes images ``(batch, channels, size, size)`` with
    pixels in [0, 1] and returns a :class:`CapsNetOutput`. The decoder sees only one
    capsule: the one of ``labels`` when given (training), else the longest one; labels
    ``(batch, k)`` give k reconstructions per image (see :meth:`reconstruct`).
    """

    def __init__(self, config: CapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or CapsNetConfig()
        self.conv1 = nn.Conv2d(config.in_channels, config.conv1_channels, config.conv1_kernel)
        self.primary = PrimaryCapsules(config.conv1_channels, config.primary_maps,
                                       config.primary_dim, config.primary_kernel,
                                       config.primary_stride, config.primary_style)
        self.digits = RoutingCapsules(config.primary_caps, config.primary_dim,
                                      config.num_classes, config.digit_dim,
                                      config.routing_iterations, config.weight_init_std,
                                      config.routing_bias)
        sizes = [config.num_classes * config.digit_dim, *config.decoder_hidden]
        layers: list[nn.Module] = []
        for n_in, n_out in zip(sizes, sizes[1:]):
            layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
        layers += [nn.Linear(sizes[-1], config.image_pixels), nn.Sigmoid()]
        self.decoder = nn.Sequential(*layers)
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

    def reconstruct(self, digit_caps: Tensor, classes: Tensor) -> Tensor:
        """Decode the capsule of ``classes`` from ``digit_caps``; others are zeroed.

        ``classes`` ``(batch,)`` gives ``(batch, channels, size, size)``; ``(batch, k)``
        (several objects, as MultiMNIST) gives one image per column,
        ``(batch, k, channels, size, size)``, in one decoder pass.
        """
        if classes.dim() == 2:
            batch, k = classes.shape
            images = self.reconstruct(digit_caps.repeat(k, 1, 1), classes.T.reshape(-1))
            return images.view(k, batch, *images.shape[1:]).transpose(0, 1)
        mask = F.one_hot(classes, self.config.num_classes).to(digit_caps.dtype)  # (batch, classes)
        decoder_input = (digit_caps * mask.unsqueeze(-1)).flatten(1)  # (batch, classes * digit_dim)
        c, s = self.config.in_channels, self.config.image_size
        return self.decoder(decoder_input).view(-1, c, s, s)

    def compile_routing(self) -> "CapsNet":
        """Compile the routing layer with ``torch.compile`` (in place; weights and state-dict
        keys unchanged). Fusing its many small element-wise steps is where compilation pays;
        the convolutions already run in vendor kernels and gain nothing."""
        self.digits.compile()
        return self

    def forward(self, images: Tensor, labels: Tensor | None = None) -> CapsNetOutput:
        digit_caps, _ = self.capsules(images)
        lengths = safe_norm(digit_caps)  # (batch, classes)
        predictions = lengths.argmax(dim=1)
        mask_classes = predictions if labels is None else labels
        return CapsNetOutput(digit_caps, lengths, predictions,
                             self.reconstruct(digit_caps, mask_classes))


def capsnet_mnist(routing_iterations: int = 2, **overrides: Any) -> CapsNet:
    """The notebook's MNIST CapsNet (8,215,568 parameters), with optional config overrides."""
    return CapsNet(CapsNetConfig(routing_iterations=routing_iterations, **overrides))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
