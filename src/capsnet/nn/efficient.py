"""Efficient-CapsNet: capsules with self-attention routing (Mazzia, Salvetti and Chiaberge,
"Efficient-CapsNet: capsule network with self-attention routing", Scientific Reports 11,
14634, 2021).

    images -> 4 convolutions (each ReLU, then batch norm) -> depthwise convolution
           -> primary capsules -> self-attention routing (one pass) -> class capsules
           -> lengths
                   |
       mask by label or longest capsule -> decoder -> image

Self-attention routing, for each class capsule n, with d the class capsules' dimension:

    u_hat[i, n] = W[i, n] u[i]                        what primary capsule i predicts for n
    A[n][i, k]  = u_hat[i, n] . u_hat[k, n] / sqrt(d)  agreement of every pair of predictions
    C[i, n]     = softmax over n of sum_k A[n][i, k]   coupling coefficients
    s[n]        = sum_i (C[i, n] + B[i, n]) u_hat[i, n]   B: learned log priors, zeros at start
    v[n]        = squash(s[n]),  squash(s) = (1 - 1 / exp(|s|)) s / |s|

There are no iterations: a prediction that agrees with the others weighs more, at once.

Where the defaults come from. "code" is github.com/EscVM/Efficient-CapsNet at commit 4b337f5
(the authors' TensorFlow code): models/efficient_capsnet_graph_mnist.py (the network and the
decoder) and utils/layers.py (Squash, PrimaryCaps, FCCaps).

* convolutions 32 5x5, 64 3x3, 64 3x3 and 128 3x3 with stride 2, no padding, each followed
  by ReLU and then batch norm (code); batch norm as Keras's default: momentum 0.99 (0.01 in
  PyTorch's convention) and eps 1e-3;
* primary capsules: a 9x9 depthwise convolution of the 128 channels, linear, with no
  pointwise part (code; the authors confirm it in issue #10 of their repository), whose
  output is cut into 16 capsules of 8 dimensions and squashed; 28x28 images leave a 9x9
  map, so one position and 16 primary capsules;
* routing: the softmax runs over the class capsules, the agreement is divided by the square
  root of the class capsules' dimension (16), and B is added to the coupling coefficients
  after the softmax, one per (primary, class) pair (code, FCCaps);
* the squash: the code adds 1e-20 to |s| and exp(|s|); here |s| is the library's safe norm
  ``sqrt(|s|^2 + 1e-7)``, whose gradient is finite at the zero vector (see layers.safe_norm);
* initialisation (code, Keras): He-normal for the convolutions, W and the decoder's hidden
  layers; Glorot-uniform for the depthwise convolution; Glorot-normal for the decoder's last
  layer; zeros for every bias and B. Keras draws its normals truncated at two standard
  deviations and rescaled to keep the standard deviation it asks for; so does
  :func:`keras_normal_`;
* decoder: 512 and 1024 ReLU units, then sigmoid pixels, fed the class capsules with all but
  one masked: the label's in training, the longest otherwise (code, generator_graph);
* 161,824 parameters without the decoder for MNIST: the "161 K" of the paper's Table 2, and
  the "Trainable Parameters 161,824" that paperswithcode lists for it.

The official code trains it on MNIST with the margin loss of Sabour et al. plus 0.392 times
the mean squared pixel error (0.0005 times the sum), Adam at 5e-4 decayed by 0.97 every
epoch down to 5e-5, batches of 16, 150 epochs, and random rotations, shifts, squeezes and
erasures of the digits (config.json, utils/tools.py, utils/pre_process_mnist.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import CapsNetError
from ..utils.device import check_fits_in_memory
from ..utils.settings import MAX_IMAGE_SIDE, check_settings, setting, settings_from_dict
from .layers import EPSILON, decoder_parameter_count, reconstruction_decoder, safe_norm
from .base import CapsuleModel

# Keras's batch norm defaults, which the official code keeps.
BATCH_NORM_MOMENTUM = 0.01  # PyTorch's convention: Keras's momentum 0.99
BATCH_NORM_EPS = 1e-3
# Standard deviation of a unit normal cut at two standard deviations: Keras divides the
# standard deviation it asks for by this, so that the cut draws keep the one it meant.
TRUNCATED_STD = 0.87962566103423978
SIZE_LISTS = ("conv_channels", "conv_kernels", "conv_strides", "decoder_hidden")


@dataclass(frozen=True)
class EfficientCapsNetConfig:
    """Architecture of an Efficient-CapsNet. The defaults are the paper's MNIST network (the
    module docstring says where each comes from); every field is bounded as in
    :class:`~capsnet.nn.model.CapsNetConfig`."""

    image_size: int = setting(28, "side of the square input images", min=1,
                              max=MAX_IMAGE_SIDE)
    in_channels: int = setting(1, "channels of the input images", min=1, max=64)
    num_classes: int = setting(10, "classes, one class capsule each", min=2, max=10_000)
    conv_channels: tuple[int, ...] = setting((32, 64, 64, 128), "channels of each convolution; "
                                             "the last must be primary_maps * primary_dim",
                                             min=1, max=8192, max_len=16)
    conv_kernels: tuple[int, ...] = setting((5, 3, 3, 3), "kernel of each convolution", min=1,
                                            max=64, max_len=16)
    conv_strides: tuple[int, ...] = setting((1, 1, 1, 2), "stride of each convolution", min=1,
                                            max=64, max_len=16)
    primary_maps: int = setting(16, "primary capsules at each position of the depthwise "
                                "convolution's output", min=1, max=4096)
    primary_dim: int = setting(8, "dimensions of a primary capsule", min=1, max=1024)
    primary_kernel: int = setting(9, "kernel of the depthwise convolution", min=1, max=64)
    primary_stride: int = setting(1, "stride of the depthwise convolution", min=1, max=64)
    digit_dim: int = setting(16, "dimensions of a class capsule", min=1, max=1024)
    decoder_hidden: tuple[int, ...] = setting((512, 1024), "hidden layers of the decoder",
                                              min=1, max=65_536, max_len=16)

    def __post_init__(self) -> None:
        for name in SIZE_LISTS:
            if isinstance(getattr(self, name), list):
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_settings(self)
        if not len(self.conv_channels) == len(self.conv_kernels) == len(self.conv_strides):
            raise CapsNetError("conv_channels, conv_kernels and conv_strides must be as long "
                               "as each other, one entry per convolution")
        if self.conv_channels[-1] != self.primary_maps * self.primary_dim:
            raise CapsNetError(
                f"the depthwise convolution keeps its {self.conv_channels[-1]} input channels, "
                f"so the last of conv_channels must equal primary_maps * primary_dim "
                f"({self.primary_maps} * {self.primary_dim})")
        if self.primary_grid < 1:
            raise CapsNetError(f"image_size {self.image_size} is too small for the "
                               f"convolutions and the {self.primary_kernel}x"
                               f"{self.primary_kernel} depthwise convolution")
        check_fits_in_memory(4 * self.parameter_count, "its weights")

    @property
    def feature_size(self) -> int:
        """Side of the last convolution's feature map (9 for 28x28 inputs; 0: too small)."""
        size = self.image_size
        for kernel, stride in zip(self.conv_kernels, self.conv_strides):
            size = (size - kernel) // stride + 1 if size >= kernel else 0
        return size

    @property
    def primary_grid(self) -> int:
        """Side of the depthwise convolution's output (1 for 28x28 inputs; 0: too small)."""
        size, kernel = self.feature_size, self.primary_kernel
        return (size - kernel) // self.primary_stride + 1 if size >= kernel else 0

    @property
    def primary_caps(self) -> int:
        """Number of primary capsules (16 for 28x28 inputs)."""
        return self.primary_grid ** 2 * self.primary_maps

    @property
    def image_pixels(self) -> int:
        return self.in_channels * self.image_size ** 2

    @property
    def classifier_parameter_count(self) -> int:
        """Parameters of the network without its decoder, from the config alone (161,824 by
        default, the paper's count)."""
        sizes = [self.in_channels, *self.conv_channels]
        convs = sum((n_in * kernel ** 2 + 1) * n_out + 2 * n_out  # + batch norm's scale, shift
                    for n_in, n_out, kernel in zip(sizes, sizes[1:], self.conv_kernels))
        depthwise = self.conv_channels[-1] * (self.primary_kernel ** 2 + 1)
        pairs = self.primary_caps * self.num_classes
        routing = pairs * self.primary_dim * self.digit_dim + pairs  # W and the log priors B
        return convs + depthwise + routing

    @property
    def parameter_count(self) -> int:
        """Parameters of the whole network, decoder included (1,573,168 by default)."""
        decoder = decoder_parameter_count(self.num_classes * self.digit_dim,
                                          self.decoder_hidden, self.image_pixels)
        return self.classifier_parameter_count + decoder

    def activation_floats(self, training: bool, device: torch.device | None = None) -> int:
        """Floats of activations one image needs (an upper bound, for memory estimates):
        every feature map at full image size, û, and the decoder's layers; the same on any
        ``device``."""
        features = sum(self.conv_channels) * self.image_size ** 2
        u_hat = self.primary_caps * self.num_classes * self.digit_dim
        decoder = sum(self.decoder_hidden) + self.image_pixels
        return (4 if training else 2) * (features + u_hat + decoder) + self.image_pixels

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in SIZE_LISTS:
            d[name] = list(d[name])
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "EfficientCapsNetConfig":
        """A config from stored ``data`` (a checkpoint, a safetensors header): checked."""
        return settings_from_dict(cls, data, "Efficient-CapsNet config")


def efficient_squash(s: Tensor, dim: int = -1, eps: float = EPSILON) -> Tensor:
    """The paper's squash: ``(1 - 1 / exp(|s|)) * s / |s|`` along ``dim``, with the safe
    norm ``sqrt(|s|^2 + eps)`` for ``|s|``.

    Lengths map into [0, 1) as with the squash of Sabour et al., but short vectors keep
    their length (its slope at zero is 1, not 0), so small capsules still pass gradients.
    """
    norm = safe_norm(s, dim=dim, eps=eps, keepdim=True)
    return -torch.expm1(-norm) * s / norm  # expm1: exact where 1 - exp(-|s|) would cancel


def keras_normal_(tensor: Tensor, variance: float) -> Tensor:
    """Fill ``tensor`` as Keras's truncated-normal variance scaling does: cut at two standard
    deviations, rescaled so that the draws have ``variance``."""
    std = math.sqrt(variance) / TRUNCATED_STD
    return nn.init.trunc_normal_(tensor, std=std, a=-2 * std, b=2 * std)


class DepthwisePrimaryCapsules(nn.Module):
    """Primary capsules from a depthwise convolution: one ``kernel_size`` filter per input
    channel, no pointwise mixing, no activation; the channels are cut into capsules of
    ``caps_dim`` and squashed.

    Input ``(batch, channels, H, W)``; output ``(batch, h * w * maps, caps_dim)`` with
    ``maps = channels / caps_dim``, ordered (row, column, map) as
    :class:`~capsnet.nn.layers.PrimaryCapsules`: capsule ``m`` of a position holds the
    channels ``m * caps_dim ... m * caps_dim + caps_dim - 1``.
    """

    def __init__(self, channels: int, caps_dim: int, kernel_size: int = 9,
                 stride: int = 1) -> None:
        super().__init__()
        if channels % caps_dim:
            raise ValueError(f"{channels} channels do not make capsules of {caps_dim}")
        self.caps_dim = caps_dim
        self.conv = nn.Conv2d(channels, channels, kernel_size, stride, groups=channels)

    def forward(self, features: Tensor) -> Tensor:
        conv = self.conv(features)  # (batch, maps * dim, h, w)
        batch, channels, height, width = conv.shape
        capsules = conv.view(batch, channels // self.caps_dim, self.caps_dim, height, width)
        capsules = capsules.permute(0, 3, 4, 1, 2).reshape(batch, -1, self.caps_dim)
        return efficient_squash(capsules)  # (batch, h * w * maps, dim)


class SelfAttentionRouting(nn.Module):
    """Fully connected capsule layer with the paper's self-attention routing (see the module
    docstring): one pass, no routing iterations.

    ``weight`` holds W ``(in_caps, out_caps, out_dim, in_dim)`` as
    :class:`~capsnet.nn.layers.RoutingCapsules` does; ``log_prior`` holds B ``(in_caps,
    out_caps)``, which the paper calls log priors but adds to the coupling coefficients
    after the softmax, as the official code does.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(in_caps, out_caps, out_dim, in_dim))
        self.log_prior = nn.Parameter(torch.empty(in_caps, out_caps))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """W He-normal, B zero, as the official code. Keras takes the fan-in of its W
        ``(out_caps, in_caps, in_dim, out_dim)`` as ``in_dim * in_caps * out_caps`` (1,280 for
        MNIST: a standard deviation of 0.040)."""
        in_caps, out_caps, _, in_dim = self.weight.shape
        keras_normal_(self.weight, 2 / (in_dim * in_caps * out_caps))
        nn.init.zeros_(self.log_prior)

    def predictions(self, u: Tensor) -> Tensor:
        """``u_hat`` for input capsules ``u`` of shape ``(batch, in_caps, in_dim)``."""
        return torch.einsum("iojd,bid->bioj", self.weight, u)  # (batch, in_caps, out_caps, out_dim)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Route predictions ``u_hat`` ``(batch, in_caps, out_caps, out_dim)``.

        Returns the output capsules ``v`` ``(batch, out_caps, out_dim)`` and the coupling
        coefficients C ``(batch, in_caps, out_caps)``, which sum to one over the outputs
        (B comes on top of them)."""
        # sum_k A[n][i, k] is u_hat[i, n] . sum_k u_hat[k, n]: no (in_caps x in_caps) matrix.
        total = u_hat.sum(dim=1)  # (batch, out_caps, out_dim)
        agreement = torch.einsum("bioj,boj->bio", u_hat, total)  # (batch, in_caps, out_caps)
        coupling = (agreement / math.sqrt(u_hat.shape[-1])).softmax(dim=2)  # over out_caps
        weights = coupling + self.log_prior  # (batch, in_caps, out_caps)
        s = torch.einsum("bio,bioj->boj", weights, u_hat)  # (batch, out_caps, out_dim)
        return efficient_squash(s), coupling

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Input capsules ``(batch, in_caps, in_dim)`` -> ``(v, coupling)``, see :meth:`route`.

        Always in float32, under bf16 autocast too, as RoutingCapsules: the agreements are
        sums over every pair of predictions, which bfloat16 rounds coarsely before the
        softmax, and this layer is a small part of the network's arithmetic."""
        with torch.autocast(u.device.type, enabled=False):
            return self.route(self.predictions(u.to(self.weight.dtype)))


class EfficientCapsNet(CapsuleModel, nn.Module):
    """Efficient-CapsNet with its reconstruction decoder.

    ``forward(images, labels=None)`` takes images ``(batch, channels, size, size)`` with
    pixels in [0, 1] and returns a :class:`~capsnet.nn.model.CapsNetOutput`, as
    :class:`~capsnet.nn.model.CapsNet` does, so the same margin and reconstruction losses
    train it. The decoder sees only one class capsule: the one of ``labels`` when given
    (training), else the longest one; labels ``(batch, k)`` give k reconstructions per image.
    Batch norm makes training mode use the batch's statistics: call ``eval()`` to predict.
    """

    architecture = "efficient-capsnet"  # the tag stored with trained models
    config_class = EfficientCapsNetConfig

    def __init__(self, config: EfficientCapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or EfficientCapsNetConfig()
        # What the outputs mean, kept with trained models (see capsnet.nn.pretrained).
        self.class_names = tuple(str(i) for i in range(config.num_classes))
        self.prepare = "mnist"
        layers: list[nn.Module] = []
        channels = config.in_channels
        for out, kernel, stride in zip(config.conv_channels, config.conv_kernels,
                                       config.conv_strides):
            layers += [nn.Conv2d(channels, out, kernel, stride), nn.ReLU(inplace=True),
                       nn.BatchNorm2d(out, eps=BATCH_NORM_EPS, momentum=BATCH_NORM_MOMENTUM)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.primary = DepthwisePrimaryCapsules(channels, config.primary_dim,
                                                config.primary_kernel, config.primary_stride)
        self.digits = SelfAttentionRouting(config.primary_caps, config.primary_dim,
                                           config.num_classes, config.digit_dim)
        self.decoder = reconstruction_decoder(config.num_classes * config.digit_dim,
                                              config.decoder_hidden, config.image_pixels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official code's initialisation (module docstring); batch norm starts as the
        identity, W and B as :meth:`SelfAttentionRouting.reset_parameters` says."""
        for module in self.features:
            if isinstance(module, nn.Conv2d):
                keras_normal_(module.weight, 2 / module.weight[0].numel())  # fan-in: in * k * k
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.BatchNorm2d):
                module.reset_parameters()
        nn.init.xavier_uniform_(self.primary.conv.weight)
        nn.init.zeros_(self.primary.conv.bias)
        self.digits.reset_parameters()
        linears = [m for m in self.decoder if isinstance(m, nn.Linear)]
        for linear in linears[:-1]:
            keras_normal_(linear.weight, 2 / linear.in_features)
        last = linears[-1]
        keras_normal_(last.weight, 2 / (last.in_features + last.out_features))
        for linear in linears:
            nn.init.zeros_(linear.bias)

    def capsules(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Class capsules ``(batch, classes, digit_dim)`` and the coupling coefficients
        ``(batch, primary_caps, classes)`` for ``images``."""
        features = self.features(images)  # (batch, conv_channels[-1], 9, 9) for MNIST
        u = self.primary(features)  # (batch, primary_caps, primary_dim)
        return self.digits(u)

    def convolutions(self) -> nn.Module:
        """This model's floor in ``capsnet bench``, sharing its weights: the convolutions with
        their ReLUs and batch norms, then the depthwise primary convolution."""
        return nn.Sequential(*self.features, self.primary.conv)
