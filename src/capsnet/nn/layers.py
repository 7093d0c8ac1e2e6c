"""Capsule layers: squash, primary capsules and routing-by-agreement capsules.

Shapes use these names:
    batch      examples in the batch
    in_caps    capsules of the layer below (1152 for 28x28 MNIST)
    out_caps   capsules of this layer (10 digit capsules)
    in_dim     dimensions of an input capsule (8)
    out_dim    dimensions of an output capsule (16)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from . import routing_kernel
from .routing_kernel import EPSILON  # inside squash's square root, here and in the kernel
# On a CPU, where the C kernel does not take a routing (see RoutingCapsules.forward), torch
# routes a few examples at a time, at most this many groups of at least CPU_ROUTING_MIN
# examples: a group's predictions (6 MB for 8 MNIST examples) stay in the cache through the
# routing iterations, where the whole batch's would stream from memory in every one (1.15x to
# 1.3x faster steps, docs/PERFORMANCE.md). On a GPU the whole batch is one launch per
# operation.
CPU_ROUTING_GROUPS = 16
CPU_ROUTING_MIN = 8
PRIMARY_STYLES = ("notebook", "official")


def safe_norm(s: Tensor, dim: int = -1, eps: float = EPSILON, keepdim: bool = False) -> Tensor:
    """Euclidean norm with ``eps`` inside the square root.

    ``sqrt(sum(s**2) + eps)`` is differentiable everywhere; the plain norm has no
    gradient at the zero vector and sends training to NaN.
    """
    return torch.sqrt(s.square().sum(dim=dim, keepdim=keepdim) + eps)


def squash(s: Tensor, dim: int = -1, eps: float = EPSILON) -> Tensor:
    """Squash vectors along ``dim`` (paper eq. 1): keep the direction, map the length into [0, 1).

    ``squash(s) = |s|^2 / (1 + |s|^2) * s / |s|`` with the safe norm for ``|s|``.
    """
    squared_norm = s.square().sum(dim=dim, keepdim=True)
    return squared_norm / (1.0 + squared_norm) * s / torch.sqrt(squared_norm + eps)


class PrimaryCapsules(nn.Module):
    """A convolution whose channels are cut into ``n_maps`` capsule maps of ``caps_dim`` each.

    Input ``(batch, in_channels, H, W)``; output ``(batch, n_maps * H' * W', caps_dim)``,
    squashed. Capsules are ordered (row, column, map), as the notebook's reshape of an
    NHWC tensor, and the channels of one capsule are ``map * caps_dim ... + caps_dim - 1``.

    ``style`` says what comes between the convolution and the squash:

    * ``"notebook"``: ``squash(relu(conv(x) + b))``, the tutorial notebook's layer;
    * ``"official"``: ``squash(conv(x) / n_maps + b)``, the official code's layer, which runs
      its routing for one iteration over the ``n_maps`` capsule types: the softmax of zero
      logits couples each type with ``1 / n_maps``, and there is no ReLU.
    """

    def __init__(self, in_channels: int, n_maps: int = 32, caps_dim: int = 8,
                 kernel_size: int = 9, stride: int = 2, style: str = "notebook") -> None:
        super().__init__()
        if style not in PRIMARY_STYLES:
            raise ValueError(f"style must be one of {', '.join(PRIMARY_STYLES)}, got {style!r}")
        self.n_maps = n_maps
        self.caps_dim = caps_dim
        self.style = style
        self.conv = nn.Conv2d(in_channels, n_maps * caps_dim, kernel_size, stride)

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        """Spatial size of the capsule maps for an input feature map of ``height x width``."""
        k, s = self.conv.kernel_size, self.conv.stride
        return (height - k[0]) // s[0] + 1, (width - k[1]) // s[1] + 1

    def forward(self, features: Tensor) -> Tensor:
        if self.style == "notebook":
            conv = torch.relu(self.conv(features))  # (batch, maps * dim, h, w)
        else:
            conv = (F.conv2d(features, self.conv.weight, stride=self.conv.stride) / self.n_maps
                    + self.conv.bias[:, None, None])
        batch, _, height, width = conv.shape
        capsules = conv.view(batch, self.n_maps, self.caps_dim, height, width)
        capsules = capsules.permute(0, 3, 4, 1, 2).reshape(batch, -1, self.caps_dim)
        return squash(capsules)  # (batch, h * w * maps, dim)


class RoutingCapsules(nn.Module):
    """Fully connected capsule layer with dynamic routing (Sabour et al. 2017, Procedure 1).

    Every pair (input capsule i, output capsule j) has a transformation matrix ``W_ij``
    of shape ``(out_dim, in_dim)``; the predictions ``u_hat_j|i = W_ij u_i`` are combined
    with coupling coefficients ``c_ij = softmax_j(b_ij)``, and the logits ``b_ij`` start at
    zero for each example and grow by the agreement ``u_hat_j|i . v_j``.

    Gradients flow through every routing iteration, as in the official code. With
    ``bias=True`` a learned ``(out_caps, out_dim)`` bias is added to ``s_j`` in every
    iteration, as the official code does; the notebook has none. With ``leaky=True`` the
    softmax also holds a "none-of-the-above" output whose logit stays zero (the paper's
    CIFAR-10 network; the official code's leaky routing): an input capsule that fits no
    output capsule can send its vote there, so its couplings sum to less than one.

    Where it can (:func:`capsnet.nn.routing_kernel.supports`), the routing runs as one fused
    operator: a C kernel on a CPU (float32, input capsules in blocks of 16), Triton kernels on
    a CUDA GPU. ``fused = False`` or ``CAPSNET_ROUTING_KERNEL=off`` keeps it in torch. The
    values and gradients are the same, but the coupling coefficients it returns carry no
    gradient of their own.
    """

    def __init__(self, in_caps: int, in_dim: int, out_caps: int, out_dim: int,
                 iterations: int = 3, init_std: float = 0.1, bias: bool = False,
                 leaky: bool = False) -> None:
        super().__init__()
        if iterations < 1:
            raise ValueError(f"routing needs at least 1 iteration, got {iterations}")
        self.iterations = iterations
        # torch.randn(...) * init_std, drawn only where there is memory: on the meta device,
        # where a stored model is first built, randn and * run Python kernels that import
        # sympy and torch._dynamo (seconds of every prediction).
        weight = torch.empty(in_caps, out_caps, out_dim, in_dim)
        if not weight.is_meta:
            weight.normal_().mul_(init_std)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(out_caps, out_dim)) if bias else None
        self.leaky = leaky
        self.fused = routing_kernel.enabled()  # see capsnet.nn.routing_kernel

    def predictions(self, u: Tensor) -> Tensor:
        """``u_hat`` for input capsules ``u`` of shape ``(batch, in_caps, in_dim)``."""
        # One batched matmul per input capsule; W is broadcast, never tiled by the batch.
        return torch.einsum("iojd,bid->bioj", self.weight, u)  # (batch, in_caps, out_caps, out_dim)

    def route(self, u_hat: Tensor) -> tuple[Tensor, Tensor]:
        """Route predictions ``u_hat`` ``(batch, in_caps, out_caps, out_dim)``.

        Returns the output capsules ``v`` ``(batch, out_caps, out_dim)`` and the coupling
        coefficients of the last iteration ``(batch, in_caps, out_caps)``.
        """
        batch, in_caps, out_caps, _ = u_hat.shape
        # Logits are per example: sharing them across the batch couples unrelated images.
        routing_logits = u_hat.new_zeros(batch, in_caps, out_caps)
        for iteration in range(self.iterations):
            coupling = self.couple(routing_logits)  # (batch, in_caps, out_caps)
            s = torch.einsum("bio,bioj->boj", coupling, u_hat)  # (batch, out_caps, out_dim)
            if self.bias is not None:
                s = s + self.bias
            v = squash(s)
            if iteration < self.iterations - 1:
                routing_logits = routing_logits + torch.einsum("bioj,boj->bio", u_hat, v)
        return v, coupling

    def couple(self, routing_logits: Tensor) -> Tensor:
        """Coupling coefficients: the softmax over output capsules, for each input capsule
        (with leaky routing over one more output whose logit is zero, then dropped)."""
        if self.leaky:
            return F.pad(routing_logits, (1, 0)).softmax(dim=2)[..., 1:]
        return routing_logits.softmax(dim=2)

    def in_kernel(self, u: Tensor) -> bool:
        """Whether routing input capsules like ``u`` runs in the fused operator."""
        return self.fused and routing_kernel.supports(u, self.weight)

    def forward(self, u: Tensor) -> tuple[Tensor, Tensor]:
        """Input capsules ``(batch, in_caps, in_dim)`` -> ``(v, coupling)``, see :meth:`route`.

        Always in float32, under bf16 autocast too: the routing logits grow by sums of
        agreements that bfloat16's 8-bit mantissa rounds away, and this layer is a small part
        of the network's arithmetic (the convolutions are most of it)."""
        with torch.autocast(u.device.type, enabled=False):
            u = u.to(self.weight.dtype)
            if self.in_kernel(u):
                # every iteration's couplings are kept only where a backward pass may follow
                v, coupling, _, _ = routing_kernel.route(u, self.weight, self.bias,
                                                         self.iterations, self.leaky,
                                                         torch.is_grad_enabled())
                return v, coupling[:, -1].transpose(1, 2)  # (batch, in_caps, out_caps)
            batch = u.shape[0]
            if u.device.type != "cpu" or batch < 2 * CPU_ROUTING_MIN:
                return self.route(self.predictions(u))
            size = max(CPU_ROUTING_MIN, -(-batch // CPU_ROUTING_GROUPS))
            routed = [self.route(self.predictions(group)) for group in u.split(size)]
            return torch.cat([v for v, _ in routed]), torch.cat([c for _, c in routed])


def reconstruction_decoder(capsule_floats: int, hidden: tuple[int, ...], pixels: int
                           ) -> nn.Sequential:
    """The paper's decoder: ReLU layers of ``hidden`` units on the masked capsules
    (``capsule_floats`` inputs), then one sigmoid unit per pixel."""
    sizes = [capsule_floats, *hidden]
    layers: list[nn.Module] = []
    for n_in, n_out in zip(sizes, sizes[1:]):
        layers += [nn.Linear(n_in, n_out), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers, nn.Linear(sizes[-1], pixels), nn.Sigmoid())


def decoder_parameter_count(capsule_floats: int, hidden: tuple[int, ...], pixels: int) -> int:
    """Parameters of :func:`reconstruction_decoder`, from its sizes alone."""
    sizes = [capsule_floats, *hidden, pixels]
    return sum((n_in + 1) * n_out for n_in, n_out in zip(sizes, sizes[1:]))
