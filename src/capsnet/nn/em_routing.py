"""Matrix capsules with EM routing (Hinton, Sabour and Frosst, "Matrix capsules with EM
routing", ICLR 2018): a capsule is a 4x4 pose matrix and an activation in [0, 1], and each
layer of capsules is a mixture of Gaussians fitted to the votes of the layer below.

    images -> ReLU conv1 (5x5, stride 2, A channels)
           -> primary capsules (1x1: B types, each a 4x4 pose and a sigmoid activation)
           -> ConvCaps1 (3x3, stride 2, C types)              EM routing
           -> ConvCaps2 (3x3, stride 1, D types)              EM routing
           -> class capsules (one per class, transformation
              matrices shared across positions, coordinate
              addition)                                       EM routing
           -> class activations (the scores) and class poses
                  | optional: mask by label or prediction -> decoder -> image

Where the defaults come from:

* The architecture, the routing (the paper's Procedure 1), coordinate addition and the spread
  loss with its margin rising from 0.2 to 0.9: the paper, sections 3 to 4.1
  (https://openreview.net/forum?id=HJWLfGWRb).
* A=B=C=D=32 (the default) is the network of the paper's Figure 1: 1.8% test error on
  smallNORB (310K parameters by the paper's count; 317,194 here for 32x32 stereo pairs,
  2 channels, and 5 classes), and 0.44% on MNIST, the only MNIST result the paper gives.
  A=64, B=8, C=D=16 (:meth:`EMCapsNetConfig.small`) is its small smallNORB network: 2.2%
  with 68K parameters (68,754 here). Public implementations train the small one on MNIST
  too (yl-1993/Matrix-Capsules-EM-PyTorch, 99.1% with 2 iterations), and IBM's
  (IBM/matrix-capsules-with-em-routing) uses it by default on smallNORB.
* 3 EM iterations: the paper ("normally 3"); the ``em`` training preset routes with 2,
  which learn much faster (docs/PRESETS.md).
* lambda: iteration t (from 0) uses ``inverse_temperature * (1 - 0.95 ** (t + 1))`` with
  ``inverse_temperature = 0.01``: the authors' answer on OpenReview, quoted in IBM's
  em_routing.py.
* beta_u and beta_a: one of each per output capsule type (the authors on OpenReview, cited in
  yl-1993's model/capsules.py), starting at zero. beta_a is learned in units of the last
  iteration's activation logit (``beta_a_units``): as written, lambda (about 1e-3) scales
  it down so far that an optimiser moving it by its learning rate a step leaves every
  activation near 0.5 for thousands of steps, and the spread loss with it at a floor. IBM's
  implementation starts beta_a near -1000 (so lambda beta_a is near -1) for the same reason.
* Transformation matrices: truncated normal, std 1, as IBM's and
  www0wwwjs1/Matrix-Capsules-EM-Tensorflow's implementations.
* conv1 pads by 2 ("same"), 28x28 -> 14x14, as yl-1993 and IBM; the paper does not say.
* Convolutional capsules: an input capsule's assignments sum to one over every output capsule
  of every window that holds it, not window by window (the paper, section 4; Gritzman,
  arXiv:1907.00652, pitfall 3). The paper's cost is used as it is by default: no rescaling
  of a layer's cost by its number of inputs (Gritzman's pitfall 2, not in the paper), which
  ``cost_scale="outputs-per-input"`` adds as IBM's implementation does.
* No decoder by default: for smallNORB the authors used a weight decay of 2e-7 "rather than
  the reconstruction loss" (OpenReview, quoted in IBM's models.py); public MNIST
  implementations differ (yl-1993: none; www0wwwjs1: a reconstruction loss).
  ``decoder_hidden=(512, 1024)`` adds CapsNet's decoder on the class poses.

On a CPU in float32, the capsule layers (the convolutional ones and the class capsules) make
their votes inside the fused operators of :mod:`capsnet.nn.em_kernel` (as
:class:`WindowVotes`) instead of storing them;
elsewhere, and in layers made with ``CAPSNET_ROUTING_KERNEL=off`` (or ``fused = False``),
routing runs in torch alone.

Shapes use these names: ``batch``; ``height, width`` of a capsule grid; ``types`` of
capsules at each position; ``windows`` (output positions) and ``inputs`` (input capsules in
one window) in routing; ``outputs`` (output capsule types); 16 = a flattened 4x4 pose.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any, Callable, Sequence

import torch
from torch import Tensor, nn
import torch.nn.functional as F

from ..utils.device import check_fits_in_memory
from ..utils.settings import MAX_IMAGE_SIDE, check_settings, setting, settings_from_dict
from . import em_kernel
from .base import CapsNetOutput, CapsuleModel
from .routing_kernel import enabled
from .layers import decoder_parameter_count, reconstruction_decoder

POSE = 4  # a pose is a 4x4 matrix
POSE_SIZE = POSE * POSE
CONV1_KERNEL, CONV1_STRIDE = 5, 2
CAPS_KERNEL, CAPS1_STRIDE, CAPS2_STRIDE = 3, 2, 1
TEMPERATURE_DECAY = 0.95  # of the inverse temperature schedule (the authors on OpenReview)
# Keeps the M-step's means finite where no active input capsule reaches an output capsule.
EPSILON = 1e-8
# Added to every variance: one vote alone, or identical votes (a blank image), have none,
# and the log-density and the cost divide by it and take its log.
VARIANCE_EPSILON = 1e-4
SMALL = {"conv1_channels": 64, "primary_types": 8, "caps1_types": 16, "caps2_types": 16}
COST_SCALES = ("paper", "outputs-per-input")
# outputs-per-input: lambda = 0.01 was tuned with the cost scaled by 100 outputs / inputs
# (IBM's em_routing.py), which makes lambda times the scale outputs / inputs.
COST_SCALE_PER_INPUT = 100.0


@dataclass(frozen=True)
class EMCapsNetConfig:
    """Architecture of an :class:`EMCapsNet`, bounded as
    :class:`~capsnet.nn.model.CapsNetConfig` is. The defaults are the paper's network
    (A=B=C=D=32) for MNIST; :meth:`small` gives its small one (A=64, B=8, C=D=16)."""

    image_size: int = setting(28, "side of the square input images (28 MNIST, 32 smallNORB "
                              "crops); 13 is the smallest with a ConvCaps2 capsule",
                              min=13, max=MAX_IMAGE_SIDE)
    in_channels: int = setting(1, "channels of the input images", min=1, max=64)
    num_classes: int = setting(10, "classes, one class capsule each", min=2, max=10_000)
    conv1_channels: int = setting(32, "A: channels of the ReLU convolution (small: 64)",
                                  min=1, max=8192)
    primary_types: int = setting(32, "B: primary capsule types (small: 8)", min=1, max=4096)
    caps1_types: int = setting(32, "C: capsule types of ConvCaps1 (small: 16)", min=1,
                               max=4096)
    caps2_types: int = setting(32, "D: capsule types of ConvCaps2 (small: 16)", min=1,
                               max=4096)
    routing_iterations: int = setting(3, "EM iterations between two capsule layers (the "
                                      "paper: 3)", min=1, max=100)
    inverse_temperature: float = setting(0.01, "lambda: EM iteration t (from 0) uses lambda * "
                                         "(1 - 0.95^(t+1)) (the authors: 0.01)", gt=0, max=1e6)
    weight_init_std: float = setting(1.0, "standard deviation of the transformation matrices "
                                     "(truncated normal)", gt=0, max=100)
    beta_a_units: str = setting(
        "logit", "EM routing: what a learned beta_a counts. logit: the last iteration's "
        "activation logit (beta_a enters lambda (beta_a - cost) divided by that iteration's "
        "lambda); paper: beta_a as written, which a lambda near 1e-3 leaves almost still",
        choices=("logit", "paper"), before="paper", train="logit")
    cost_scale: str = setting(
        "paper", "EM routing: what multiplies each output capsule's cost in its activation. "
        "paper: 1; outputs-per-input: 100 x outputs / inputs of a window, so that class "
        "capsules, each gathering the votes of a whole grid, weigh cost as convolutional "
        "ones do (IBM/matrix-capsules-with-em-routing)", choices=COST_SCALES,
        before="paper", train="paper")
    decoder_hidden: tuple[int, ...] | None = setting(
        None, "hidden layers of a decoder that reconstructs the image from the masked class "
        "poses (CapsNet's: 512 1024); none: no decoder", min=1, max=65_536, max_len=16)

    def __post_init__(self) -> None:
        if isinstance(self.decoder_hidden, list):
            object.__setattr__(self, "decoder_hidden", tuple(self.decoder_hidden))
        check_settings(self)
        check_fits_in_memory(4 * self.parameter_count, "its weights")

    @classmethod
    def small(cls, **overrides: Any) -> "EMCapsNetConfig":
        """The paper's small network: A=64, B=8, C=D=16 (68,444 parameters on MNIST)."""
        return cls(**{**SMALL, **overrides})

    @property
    def grids(self) -> tuple[int, int, int]:
        """Sides of the primary, ConvCaps1 and ConvCaps2 capsule grids ((14, 6, 4) for 28x28
        inputs, (16, 7, 5) for 32x32)."""
        primary = (self.image_size - 1) // CONV1_STRIDE + 1  # padded conv1: half, rounded up
        caps1 = (primary - CAPS_KERNEL) // CAPS1_STRIDE + 1
        return primary, caps1, (caps1 - CAPS_KERNEL) // CAPS2_STRIDE + 1

    @property
    def image_pixels(self) -> int:
        return self.in_channels * self.image_size ** 2

    @property
    def parameter_count(self) -> int:
        """Number of parameters, from the config alone (318,964 by default, 68,444 for
        :meth:`small`)."""
        a, b, c, d = self.conv1_channels, self.primary_types, self.caps1_types, self.caps2_types
        classes, window = self.num_classes, CAPS_KERNEL ** 2
        conv1 = (self.in_channels * CONV1_KERNEL ** 2 + 1) * a
        primary = (a + 1) * b * (POSE_SIZE + 1)  # a pose and an activation per type
        matrices = (window * b * c + window * c * d + d * classes) * POSE_SIZE
        betas = 2 * (c + d + classes)
        decoder = 0
        if self.decoder_hidden:
            decoder = decoder_parameter_count(classes * POSE_SIZE, self.decoder_hidden,
                                              self.image_pixels)
        return conv1 + primary + matrices + betas + decoder

    def activation_floats(self, training: bool, device: torch.device | None = None) -> int:
        """Floats of activations one image needs on ``device`` (an upper bound, for memory
        estimates): the votes of each capsule layer, kept per routing iteration while
        training; where the capsule layers route in the CPU kernel (a CPU, the kernel
        built), their window poses and a few routing-sized tensors per iteration (one number
        per vote: the kernel keeps no votes) instead of their votes."""
        primary, caps1, caps2 = self.grids
        window = CAPS_KERNEL ** 2
        # one number per (window, input, output) of each capsule layer; the class layer's
        # one window is every position of the last grid
        routes = (caps1 ** 2 * window * self.primary_types * self.caps1_types
                  + caps2 ** 2 * window * self.caps1_types * self.caps2_types
                  + caps2 ** 2 * self.caps2_types * self.num_classes)
        features = self.conv1_channels * primary ** 2 + self.image_pixels
        if device is not None and enabled() and em_kernel.runs_on(device):
            # Measured by scripts/measure_memory.py: about 5 routing-sized copies while
            # training at 2 iterations and 7 at 3, under 2 in inference.
            window_poses = (caps1 ** 2 * window * self.primary_types
                            + caps2 ** 2 * window * self.caps1_types
                            + caps2 ** 2 * self.caps2_types) * POSE_SIZE
            copies = 2 * self.routing_iterations + 3 if training else 3
            layers = copies * routes + 2 * window_poses
        else:
            copies = 2 * self.routing_iterations + 2 if training else 3
            layers = copies * routes * POSE_SIZE
        return layers + 2 * features + sum(self.decoder_hidden or ())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["decoder_hidden"] = list(self.decoder_hidden) if self.decoder_hidden else None
        return d

    @classmethod
    def from_dict(cls, data: Any) -> "EMCapsNetConfig":
        """A config from stored ``data`` (a checkpoint, a safetensors header): checked."""
        return settings_from_dict(cls, data, "model config")


# --- EM routing ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowVotes:
    """The votes V = M W + offset of capsules, left unmade: the fused CPU operators of
    :mod:`capsnet.nn.em_kernel` make each where they use it. ``poses`` ``(batch, windows,
    inputs, 16)``: M, each window's input poses; ``weight`` ``(inputs, outputs, 16)``: W;
    ``offset`` ``(inputs, 16)``: a constant added to each input's votes (the class capsules'
    coordinate addition), or None."""

    poses: Tensor
    weight: Tensor
    offset: Tensor | None = None

    @property
    def routing_shape(self) -> tuple[int, int, int, int]:
        """``(batch, windows, outputs, inputs)``"""
        return (*self.poses.shape[:2], self.weight.shape[1], self.poses.shape[2])


def em_routing(votes: Tensor | WindowVotes, activations: Tensor, beta_u: Tensor,
               beta_a: Tensor, iterations: int, inverse_temperature: float,
               children: Tensor | None = None, num_children: int = 0,
               cost_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """EM routing (the paper's Procedure 1) from input to output capsules, in windows.

    ``votes`` ``(batch, windows, inputs, outputs, 16)``: V_ij, the vote of input capsule i
    for output capsule j of its window, or the same as :class:`WindowVotes`;
    ``activations`` ``(batch, windows, inputs)``: a_i;
    ``beta_u``, ``beta_a`` ``(outputs,)``: the learned costs of each output capsule type.
    ``children`` ``(windows, inputs)``: which of ``num_children`` input capsules each entry is,
    where windows overlap (convolutional capsules); an input capsule's assignments then sum
    to one over every output capsule of every window that holds it. None: every entry is an
    input capsule of its own. ``cost_scale`` multiplies the cost in the activation.

    Returns the means ``(batch, windows, outputs, 16)``, the output poses, and the
    activations ``(batch, windows, outputs)`` of the last M-step. Gradients flow through
    every iteration ("We do not use stop gradient", the authors on OpenReview). Give float32
    or float64 tensors.
    """
    batch, windows, outputs, inputs = routing_shape(votes)
    if not isinstance(votes, WindowVotes):
        # outputs before inputs from here on: the sums over inputs then copy no votes
        votes = votes.transpose(2, 3).contiguous()  # (batch, windows, outputs, inputs, 16)
    # The assignments are R_ij = exp(logits_ij - log_total_i); at first all logits are equal
    # (None) and R_ij = 1 / (number of output capsules i reaches).
    logits = None
    log_total = log_totals(activations.new_full((batch, windows, inputs), math.log(outputs)),
                           children, num_children)
    for iteration in range(iterations):
        lambda_ = inverse_temperature * (1 - TEMPERATURE_DECAY ** (iteration + 1))
        mean, variance, activation_logits, logits_of = m_step(
            votes, logits, log_total, activations, beta_u, beta_a, lambda_, cost_scale)
        if iteration < iterations - 1:  # the last E-step would change nothing returned
            logits, per_window = e_step(logits_of, variance, activation_logits)
            log_total = log_totals(per_window, children, num_children)
    return mean, torch.sigmoid(activation_logits)


def routing_shape(votes: Tensor | WindowVotes) -> tuple[int, int, int, int]:
    """``(batch, windows, outputs, inputs)`` of :func:`em_routing`'s ``votes``."""
    if isinstance(votes, WindowVotes):
        return votes.routing_shape
    batch, windows, inputs, outputs, _ = votes.shape
    return batch, windows, outputs, inputs


# The E-step's assignment logits: given the inverse of each output's variance (batch, windows,
# outputs, 16) and the rest of the log, log a_j and the log-density's normaliser (batch,
# windows, outputs), log a_j p_j(V_ij) for every vote (batch, windows, outputs, inputs) and
# their log-sum-exp over the outputs (batch, windows, inputs).
AssignmentLogits = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


def m_step(votes: Tensor | WindowVotes, logits: Tensor | None, log_total: Tensor,
           activations: Tensor, beta_u: Tensor, beta_a: Tensor, inverse_temperature: float,
           cost_scale: float = 1.0) -> tuple[Tensor, Tensor, Tensor, AssignmentLogits]:
    """Fit each output capsule's Gaussian to the votes ``(batch, windows, outputs, inputs,
    16)`` (or :class:`WindowVotes`) weighted by the data assigned to it, R_ij a_i, with the
    assignments ``R = exp(logits - log_total)`` (see :func:`moments`).

    Returns its mean and variance ``(batch, windows, outputs, 16)``, its activation logit
    ``lambda * (beta_a - cost_scale * sum_h cost_h)`` with
    ``cost_h = (beta_u + log sigma_h) * sum_i R_ij a_i`` ``(batch, windows, outputs)``, and
    the votes' :data:`AssignmentLogits` for that mean.
    """
    mean, spread, mass, logits_of = moments(votes, logits, log_total, activations)
    variance = spread + VARIANCE_EPSILON
    # cost_h (batch, windows, outputs, 16), with log sigma = log(variance) / 2
    cost = (beta_u[:, None] + 0.5 * variance.log()) * mass[..., None]
    return (mean, variance, inverse_temperature * (beta_a - cost_scale * cost.sum(dim=-1)),
            logits_of)


def moments(votes: Tensor | WindowVotes, logits: Tensor | None, log_total: Tensor,
            activations: Tensor) -> tuple[Tensor, Tensor, Tensor, AssignmentLogits]:
    """The votes' mean ``sum_i share_i V_i`` and spread ``sum_i share_i (V_i - mean)^2`` for
    each output ``(batch, windows, outputs, 16)``, where ``share_i`` is the output's share of
    its data ``w_i = R_i a_i``, with the assignments ``R = exp(logits - log_total)``
    (``logits`` ``(batch, windows, outputs, inputs)``, None: all zeros; ``log_total`` and
    the activations a ``(batch, windows, inputs)``); its mass ``sum_i w_i`` ``(batch,
    windows, outputs)``; and the votes' :data:`AssignmentLogits` for that mean: by the fused
    CPU operators for :class:`WindowVotes`, else in torch, where the squared deviations are
    made once for both."""
    if isinstance(votes, WindowVotes):
        mean, spread, mass = em_kernel.moments(votes.poses, votes.weight, votes.offset, logits,
                                               log_total, activations, EPSILON)
        return mean, spread, mass, partial(em_kernel.assignment_logits, votes.poses,
                                           votes.weight, votes.offset, mean)
    normalised = -log_total[:, :, None] if logits is None else logits - log_total[:, :, None]
    # (batch, windows, outputs, inputs)
    weights = (normalised.exp() * activations[:, :, None]).expand(votes.shape[:4])
    mass = weights.sum(dim=-1)
    share = weights / (mass[..., None] + EPSILON)
    mean = torch.einsum("nwoi,nwoih->nwoh", share, votes)  # (batch, windows, outputs, 16)
    squared = (votes - mean[:, :, :, None]).square()  # (batch, windows, outputs, inputs, 16)
    spread = torch.einsum("nwoi,nwoih->nwoh", share, squared)
    return mean, spread, mass, partial(_assignment_logits, squared)


def _assignment_logits(squared: Tensor, inverse: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """:data:`AssignmentLogits` from the votes' squared deviations ``(batch, windows,
    outputs, inputs, 16)``."""
    scaled = torch.einsum("nwoih,nwoh->nwoi", squared, inverse)
    logits = bias[..., None] - 0.5 * scaled  # (batch, windows, outputs, inputs)
    return logits, logits.logsumexp(dim=2)


def e_step(logits_of: AssignmentLogits, variance: Tensor, activation_logits: Tensor
           ) -> tuple[Tensor, Tensor]:
    """The logits of the new assignments, R_ij proportional to a_j p_j(V_ij) in log space:
    log a_j is the logsigmoid of the ``activation_logits``, and log p_j the log-density of
    output j's Gaussian with the ``variance`` of :func:`m_step`. Returns them ``(batch,
    windows, outputs, inputs)`` and their log-sum-exp over each window's outputs ``(batch,
    windows, inputs)``."""
    log_normaliser = torch.log(2 * math.pi * variance).sum(dim=-1)  # (batch, windows, outputs)
    return logits_of(variance.reciprocal(),
                     F.logsigmoid(activation_logits) - 0.5 * log_normaliser)


def log_totals(per_window: Tensor, children: Tensor | None, num_children: int) -> Tensor:
    """The normaliser of each input capsule's assignments, ``log sum exp(per_window)`` over
    every window that holds it ``(batch, windows, inputs)``, from ``per_window``, the
    log-sum-exp of its logits over one window's outputs: with ``children``, over the outputs
    of every window (see :func:`em_routing`); without, ``per_window`` itself."""
    if children is None:
        return per_window
    flat = per_window.flatten(1)  # (batch, windows * inputs)
    index = children.flatten().expand_as(flat)
    # Each child's largest term keeps exp() in range; the shift cancels in the result.
    with torch.no_grad():
        peak = flat.new_full((flat.shape[0], num_children), -math.inf)
        shift = peak.scatter_reduce(1, index, flat, "amax").gather(1, index)
    total = flat.new_zeros(flat.shape[0], num_children)
    total = total.scatter_add(1, index, (flat - shift).exp())  # (batch, num_children)
    return (total.log().gather(1, index) + shift).view_as(per_window)


# --- layers -------------------------------------------------------------------------------


class PrimaryMatrixCapsules(nn.Module):
    """1x1 convolutions of the ReLU features: at every position, ``types`` capsules, each a
    4x4 pose (a linear map of the features) and an activation (a sigmoid of another).

    Input ``(batch, in_channels, height, width)``; output poses
    ``(batch, height, width, types, 4, 4)`` and activations ``(batch, height, width, types)``.
    Pose channel ``16 * type + 4 * row + column`` is that element of that type's pose.
    """

    def __init__(self, in_channels: int, types: int) -> None:
        super().__init__()
        self.types = types
        self.pose = nn.Conv2d(in_channels, types * POSE_SIZE, 1)
        self.activation = nn.Conv2d(in_channels, types, 1)

    def forward(self, features: Tensor) -> tuple[Tensor, Tensor]:
        batch, _, height, width = features.shape
        poses = self.pose(features).view(batch, self.types, POSE, POSE, height, width)
        activations = torch.sigmoid(self.activation(features))  # (batch, types, height, width)
        return poses.permute(0, 4, 5, 1, 2, 3), activations.permute(0, 2, 3, 1)


class MatrixCapsules(nn.Module):
    """What every routing layer has: transformation matrices ``(*shape, 4, 4)``, beta_u and
    beta_a per output type, and the routing settings. Routing runs in float32 under autocast
    too: its sums of squares and logs of variances are beyond bfloat16's 8-bit mantissa."""

    def __init__(self, shape: tuple[int, ...], out_types: int, iterations: int,
                 inverse_temperature: float, init_std: float, beta_a_units: str = "logit",
                 cost_scale: str = "paper") -> None:
        super().__init__()
        self.iterations = iterations
        self.inverse_temperature = inverse_temperature
        self.cost_per_input = cost_scale == "outputs-per-input"
        # lambda is about 1e-3, so a beta_a the optimiser moves by its learning rate a step
        # would take thousands of steps to move an activation: learned in units of the last
        # iteration's logit instead, it moves as any bias does (the function is the same).
        last_lambda = inverse_temperature * (1 - TEMPERATURE_DECAY ** iterations)
        self.beta_a_scale = 1 / last_lambda if beta_a_units == "logit" else 1.0
        self.weight = nn.Parameter(torch.empty(*shape, POSE, POSE))
        nn.init.trunc_normal_(self.weight, std=init_std, a=-2 * init_std, b=2 * init_std)
        self.beta_u = nn.Parameter(torch.zeros(out_types))
        self.beta_a = nn.Parameter(torch.zeros(out_types))
        self.fused = enabled()  # False: route in torch alone (see capsnet.nn.em_kernel)

    def route(self, votes: Tensor, activations: Tensor, children: Tensor | None = None,
              num_children: int = 0) -> tuple[Tensor, Tensor]:
        """:func:`em_routing` with this layer's betas and settings."""
        cost_scale = 1.0
        if self.cost_per_input:
            _, _, outputs, inputs = routing_shape(votes)
            cost_scale = COST_SCALE_PER_INPUT * outputs / inputs
        return em_routing(votes, activations, self.beta_u, self.beta_a * self.beta_a_scale,
                          self.iterations, self.inverse_temperature, children, num_children,
                          cost_scale)


class ConvMatrixCapsules(MatrixCapsules):
    """Convolutional capsules: each output position routes the ``kernel x kernel x in_types``
    input capsules of its window, with one transformation matrix per (kernel offset, input
    type, output type), shared across positions.

    Input poses ``(batch, height, width, in_types, 4, 4)`` and activations
    ``(batch, height, width, in_types)``; outputs the same with the output grid and
    ``out_types``. Input rows and columns no window reaches (when the stride does not fit)
    take no part.
    """

    def __init__(self, in_types: int, out_types: int, kernel: int, stride: int,
                 **routing: Any) -> None:
        """``routing``: :class:`MatrixCapsules`' settings, from ``iterations`` on."""
        super().__init__((kernel * kernel, in_types, out_types), out_types, **routing)
        self.kernel, self.stride = kernel, stride

    def output_grid(self, height: int, width: int) -> tuple[int, int]:
        return ((height - self.kernel) // self.stride + 1,
                (width - self.kernel) // self.stride + 1)

    def window_positions(self, height: int, width: int, device: torch.device) -> Tensor:
        """``(windows, kernel * kernel)``: the flat input position ``row * width + column``
        of each kernel offset of each window, both in row-major order."""
        rows, cols = self.output_grid(height, width)
        offsets = torch.arange(self.kernel, device=device)
        top = torch.arange(rows, device=device) * self.stride
        left = torch.arange(cols, device=device) * self.stride
        row = top[:, None, None, None] + offsets[None, None, :, None]  # (rows, 1, kernel, 1)
        col = left[None, :, None, None] + offsets[None, None, None, :]  # (1, cols, 1, kernel)
        return (row * width + col).view(rows * cols, self.kernel ** 2)

    def votes(self, poses: Tensor, positions: Tensor) -> Tensor | WindowVotes:
        """V = M W for the input ``poses`` at ``positions`` (see :meth:`window_positions`):
        ``(batch, windows, kernel * kernel * in_types, out_types, 16)``, inputs ordered
        (kernel row, kernel column, type); as :class:`WindowVotes` where the fused CPU
        operators take them."""
        # (batch, windows, k*k*in_types, 16) and (k*k*in_types, out_types, 16)
        windows = poses.flatten(1, 2)[:, positions].flatten(2, 3).flatten(-2)
        weight = self.weight.flatten(0, 1).flatten(-2)
        if self.fused and em_kernel.supports(windows, weight):
            return WindowVotes(windows, weight)
        votes = torch.einsum("nwipq,ioqr->nwoipr", windows.unflatten(-1, (POSE, POSE)),
                             self.weight.flatten(0, 1))
        # Stored outputs first, as em_routing works on them:
        # (batch, windows, out_types, k*k*in_types, 16), returned transposed.
        return votes.flatten(-2).transpose(2, 3)

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(poses.device.type, enabled=False):
            poses, activations = poses.to(self.weight.dtype), activations.to(self.weight.dtype)
            rows, cols = self.output_grid(*activations.shape[1:3])
            height = (rows - 1) * self.stride + self.kernel  # the rows some window reaches
            width = (cols - 1) * self.stride + self.kernel
            poses, activations = poses[:, :height, :width], activations[:, :height, :width]
            batch, in_types = activations.shape[0], activations.shape[3]
            positions = self.window_positions(height, width, poses.device)
            # (windows, k*k, in_types): the input capsule, position and type, of each entry
            children = positions[..., None] * in_types + torch.arange(in_types, device=poses.device)
            # (batch, windows, k*k * in_types), as the votes' inputs
            window_activations = activations.flatten(1, 2)[:, positions].flatten(2)
            mean, out_activations = self.route(self.votes(poses, positions), window_activations,
                                               children.flatten(1), height * width * in_types)
        return (mean.view(batch, rows, cols, -1, POSE, POSE),
                out_activations.view(batch, rows, cols, -1))


def receptive_field(layers: Sequence[tuple[int, int, int]]) -> tuple[float, float]:
    """``(step, first)`` for a stack of ``layers``, each ``(kernel, stride, padding)``, first
    to last: the receptive field of row (or column) ``r`` of the last one is centred on
    image coordinate ``step * r + first``, pixel ``x`` spanning ``[x, x + 1)``."""
    step, first = 1, 0.5
    for kernel, stride, padding in layers:
        first += ((kernel - 1) / 2 - padding) * step
        step *= stride
    return step, first


# conv1 (padded), the 1x1 primary capsules, ConvCaps1 and ConvCaps2: (4, 6.5)
FIGURE_1_FIELD = receptive_field([(CONV1_KERNEL, CONV1_STRIDE, CONV1_KERNEL // 2), (1, 1, 0),
                                  (CAPS_KERNEL, CAPS1_STRIDE, 0), (CAPS_KERNEL, CAPS2_STRIDE, 0)])


def receptive_field_centres(grid: int, image_size: int,
                            field: tuple[float, float] = FIGURE_1_FIELD) -> Tensor:
    """Centre of the receptive field of each of ``grid`` rows (or columns) in the image,
    scaled to [0, 1] by the image's side: ``(step * row + first) / image_size`` for the
    ``field`` of :func:`receptive_field` (``(4 * row + 6.5) / image_size`` for EMCapsNet)."""
    step, first = field
    return (step * torch.arange(grid, dtype=torch.float64) + first) / image_size


class ClassMatrixCapsules(MatrixCapsules):
    """Class capsules: every input capsule votes for every class, with one transformation
    matrix per (input type, class) shared across positions, and Coordinate Addition: the
    scaled (row, column) of the centre of the capsule's receptive field
    (:func:`receptive_field_centres`) is added to elements (0, 3) and (1, 3), the first two of
    the right-hand column, of its votes.

    Input as :class:`ConvMatrixCapsules`; outputs the class poses ``(batch, classes, 16)`` and
    activations ``(batch, classes)``.
    """

    def __init__(self, in_types: int, classes: int, image_size: int,
                 field: tuple[float, float] = FIGURE_1_FIELD, **routing: Any) -> None:
        """``field``: :func:`receptive_field` of the layers below (EMCapsNet's by default);
        ``routing``: :class:`MatrixCapsules`' settings, from ``iterations`` on."""
        super().__init__((in_types, classes), classes, **routing)
        self.image_size, self.field = image_size, field

    def coordinates(self, height: int, width: int, like: Tensor) -> Tensor:
        """``(height, width, 1, 1, 4, 4)``: what Coordinate Addition adds to the votes."""
        rows = receptive_field_centres(height, self.image_size, self.field).to(like)
        cols = receptive_field_centres(width, self.image_size, self.field).to(like)
        offsets = like.new_zeros(height, width, 1, 1, POSE, POSE)
        offsets[..., 0, 3] = rows[:, None, None, None]
        offsets[..., 1, 3] = cols[None, :, None, None]
        return offsets

    def votes(self, poses: Tensor) -> Tensor | WindowVotes:
        """V = M W + coordinates for ``poses`` ``(batch, height, width, in_types, 4, 4)``, as
        one window of ``height * width * in_types`` inputs (row, column, type): ``(batch, 1,
        inputs, classes, 16)``, or :class:`WindowVotes` where the fused CPU operators take
        them (each position's matrices repeated, the coordinates as the offset)."""
        height, width, in_types = poses.shape[1:4]
        coordinates = self.coordinates(height, width, poses)  # (height, width, 1, 1, 4, 4)
        if self.fused and em_kernel.supports(poses, self.weight):
            window = poses.flatten(1, 3).flatten(-2)[:, None]  # (batch, 1, inputs, 16)
            weight = self.weight.flatten(-2).repeat(height * width, 1, 1)  # (inputs, classes, 16)
            offset = coordinates.expand(height, width, in_types, 1, POSE, POSE)
            return WindowVotes(window, weight, offset.flatten(0, 3).flatten(-2))  # (inputs, 16)
        votes = torch.einsum("nhwipq,ioqr->nhwiopr", poses, self.weight) + coordinates
        return votes.flatten(1, 3).flatten(-2)[:, None]

    def forward(self, poses: Tensor, activations: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(poses.device.type, enabled=False):
            poses, activations = poses.to(self.weight.dtype), activations.to(self.weight.dtype)
            mean, class_activations = self.route(self.votes(poses),
                                                 activations.flatten(1)[:, None])
        return mean[:, 0], class_activations[:, 0]


# --- the network --------------------------------------------------------------------------


class EMCapsNet(CapsuleModel, nn.Module):
    """The matrix capsule network of Hinton, Sabour and Frosst (2018).

    ``forward(images, labels=None)`` takes images ``(batch, channels, size, size)`` and returns
    a :class:`~capsnet.nn.model.CapsNetOutput`: ``digit_caps`` the class poses
    ``(batch, classes, 16)``, ``lengths`` the class activations ``(batch, classes)`` in [0, 1]
    (the class scores, for :func:`spread_loss`), ``predictions`` the most active class, and
    ``reconstructions``: with a decoder (``config.decoder_hidden``), the image decoded from the
    class pose of ``labels`` when given, else of the prediction, ``(batch, channels, size,
    size)``; without one, an empty ``(batch, 0)`` tensor.
    """

    architecture = "em-capsnet"  # the tag stored with trained models
    config_class = EMCapsNetConfig

    def __init__(self, config: EMCapsNetConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or EMCapsNetConfig()
        # What the outputs mean, kept with trained models (see capsnet.nn.pretrained).
        self.class_names = tuple(str(i) for i in range(config.num_classes))
        self.prepare = "mnist"
        routing = {"iterations": config.routing_iterations, "init_std": config.weight_init_std,
                   "inverse_temperature": config.inverse_temperature,
                   "beta_a_units": config.beta_a_units, "cost_scale": config.cost_scale}
        self.conv1 = nn.Conv2d(config.in_channels, config.conv1_channels, CONV1_KERNEL,
                               CONV1_STRIDE, padding=CONV1_KERNEL // 2)
        self.primary = PrimaryMatrixCapsules(config.conv1_channels, config.primary_types)
        self.caps1 = ConvMatrixCapsules(config.primary_types, config.caps1_types, CAPS_KERNEL,
                                        CAPS1_STRIDE, **routing)
        self.caps2 = ConvMatrixCapsules(config.caps1_types, config.caps2_types, CAPS_KERNEL,
                                        CAPS2_STRIDE, **routing)
        self.classes = ClassMatrixCapsules(config.caps2_types, config.num_classes,
                                           config.image_size, **routing)
        self.decoder = (reconstruction_decoder(config.num_classes * POSE_SIZE,
                                               config.decoder_hidden, config.image_pixels)
                        if config.decoder_hidden else None)

    def capsules(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Class poses ``(batch, classes, 16)`` and activations ``(batch, classes)``."""
        features = torch.relu(self.conv1(images))  # (batch, A, 14, 14) for 28x28 images
        # poses (batch, rows, columns, types, 4, 4), activations (batch, rows, columns, types)
        poses, activations = self.primary(features)  # 14 x 14 x B
        poses, activations = self.caps1(poses, activations)  # 6 x 6 x C
        poses, activations = self.caps2(poses, activations)  # 4 x 4 x D
        return self.classes(poses, activations)

    def convolutions(self) -> nn.Module:
        """This model's floor in ``capsnet bench``, sharing its weights: conv1 with its ReLU,
        then the primary capsules' pose and activation 1x1 convolutions (their two outputs)."""
        return nn.Sequential(self.conv1, nn.ReLU(), self.primary)

    def routing_kernel(self, device: torch.device) -> str | None:
        """The fused operators' version where the capsule layers route in them on ``device``
        (they take float32), else None."""
        fused = (self.caps1.fused and self.caps1.weight.dtype == torch.float32
                 and em_kernel.runs_on(device))
        return em_kernel.library().version if fused else None

    def reconstruct(self, class_poses: Tensor, classes: Tensor) -> Tensor:
        """Decode the pose of ``classes`` ``(batch,)`` from ``class_poses`` (the others zeroed):
        ``(batch, channels, size, size)``, or ``(batch, 0)`` without a decoder."""
        if self.decoder is None:
            return class_poses.new_zeros(class_poses.shape[0], 0)
        mask = F.one_hot(classes, self.config.num_classes).to(class_poses.dtype)  # (batch, classes)
        decoded = self.decoder((class_poses * mask[..., None]).flatten(1))  # (batch, pixels)
        return decoded.view(-1, self.config.in_channels, self.config.image_size,
                            self.config.image_size)

    def forward(self, images: Tensor, labels: Tensor | None = None) -> CapsNetOutput:
        class_poses, scores = self.capsules(images)
        predictions = scores.argmax(dim=1)
        reconstructions = self.reconstruct(class_poses, predictions if labels is None else labels)
        return CapsNetOutput(class_poses, scores, predictions, reconstructions)



# --- spread loss --------------------------------------------------------------------------


def spread_loss(activations: Tensor, targets: Tensor, margin: float | Tensor) -> Tensor:
    """The paper's eq. 3, averaged over the batch: ``sum over i != t of
    max(0, margin - (a_t - a_i))^2``, where ``a_t`` is the activation of the target class.

    ``activations``: class activations ``(batch, classes)``; ``targets``: class indices
    ``(batch,)``; ``margin``: see :func:`spread_margin`.
    """
    target = activations.gather(1, targets[:, None])  # (batch, 1)
    penalties = torch.relu(margin - (target - activations)).square()  # (batch, classes)
    return penalties.scatter(1, targets[:, None], 0.0).sum(dim=1).mean()


def spread_margin(step: int, ramp_steps: int, start: float = 0.2, end: float = 0.9) -> float:
    """The spread loss margin at training ``step`` (from 0): ``start`` rising linearly to
    ``end`` over ``ramp_steps`` steps, then ``end``."""
    # The paper, section 4.1: "By starting with a small margin of 0.2 and linearly increasing
    # it during training to 0.9, we avoid dead capsules in the earlier layers"; it does not
    # say over how many steps (a run's steps is the plain reading). On OpenReview the authors
    # gave the one they used: 0.2 + 0.79 * sigmoid(min(10, step / 50000 - 4)) at batch 64
    # (quoted in IBM/matrix-capsules-with-em-routing, models.py).
    if ramp_steps < 1:
        raise ValueError(f"ramp_steps must be at least 1, got {ramp_steps}")
    return start + (end - start) * min(max(step, 0) / ramp_steps, 1.0)
