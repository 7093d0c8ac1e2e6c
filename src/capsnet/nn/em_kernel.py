"""The vote-sized parts of EM routing as fused CPU operators, forward and backward
(``em_kernel.c``), for convolutional matrix capsules.

EM routing is memory-bound: torch writes the votes V = M W of the paper's ConvCaps1 (5.3
million floats an image) and reads them several times an iteration and again in backward.
The two operators here make each vote where it is used, one image's window at a time, while
that window's poses and the layer's weights are in the core's cache, and never store one:

* :func:`moments`, the M-step's weighted mean and spread of the votes for every output
  capsule, from the data assigned to it (its shares are made inside, per window), and
* :func:`deviations`, the E-step's squared deviations of every vote from its output's mean,
  scaled per pose element.

Everything smaller than the votes (assignments, costs, activations) stays in torch, which
also differentiates it; the operators' own backward passes are written out and checked
against torch by tests/test_em_kernel.py. The kernel is built as the dynamic routing's
(:mod:`capsnet.nn.cbuild`); a layer made with ``CAPSNET_ROUTING_KERNEL=off`` routes in torch.

Shapes: ``poses`` ``(batch, windows, inputs, 16)``, each window's input poses; ``weight``
``(inputs, outputs, 16)``; ``weights`` ``(batch, windows, outputs, inputs)``; means, spreads
and their inverses ``(batch, windows, outputs, 16)``.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import torch
from torch import Tensor

from . import cbuild
from .cbuild import pointer
from .routing_kernel import constant_when_compiled

SOURCE = Path(__file__).with_name("em_kernel.c")


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f32 = ctypes.c_float
    lib.em_scratch.argtypes, lib.em_scratch.restype = [i64, i64, i32], i64
    lib.em_moments.argtypes = [p] * 3 + [i64] * 3 + [i32, f32] + [p] * 4
    lib.em_moments_backward.argtypes = [p] * 8 + [i64] * 3 + [i32, f32] + [p] * 3
    lib.em_deviations.argtypes = [p] * 4 + [i64] * 3 + [i32, p]
    lib.em_deviations_backward.argtypes = [p] * 6 + [i64] * 3 + [i32] + [p] * 4
    for name in ("em_moments", "em_moments_backward", "em_deviations",
                 "em_deviations_backward"):
        getattr(lib, name).restype = None
    return lib


@functools.cache
def library() -> ctypes.CDLL | None:
    """The kernel for this CPU, built on first use; None (with a warning) when it cannot be
    built or loaded."""
    return cbuild.load(SOURCE, lambda: cbuild.builds(SOURCE, "em", []), _declare, "EM routing")


@constant_when_compiled  # asked once when compiling, not in the graph
def available() -> bool:
    return library() is not None


def runs_on(device: torch.device) -> bool:
    """Whether the fused operators run on ``device``: a CPU, with the kernel built."""
    return device.type == "cpu" and available()


def supports(poses: Tensor, weight: Tensor) -> bool:
    """Whether votes of ``poses`` and ``weight`` can be routed by the fused operators: float32
    where they run."""
    return (poses.dtype == weight.dtype == torch.float32 and poses.shape[0] > 0
            and runs_on(poses.device))


def _sizes(poses: Tensor, weight: Tensor) -> tuple[int, int, int, int]:
    """Blocks (batch x windows), inputs, outputs and threads."""
    return (poses.shape[0] * poses.shape[1], poses.shape[2], weight.shape[1],
            torch.get_num_threads())


def _scratch(poses: Tensor, weight: Tensor, backward: bool) -> Tensor:
    """Each thread's buffers; zeros, as the weight gradients are sums (and a thread that
    OpenMP does not start leaves its own as they are)."""
    _, inputs, outputs, threads = _sizes(poses, weight)
    return poses.new_zeros(threads, library().em_scratch(inputs, outputs, int(backward)))


def _weight_grad(scratch: Tensor, weight: Tensor) -> Tensor:
    """The sum of the threads' weight gradients, kept first in each thread's buffers."""
    return scratch[:, :weight.numel()].sum(dim=0).view_as(weight)


def _transposed(weight: Tensor) -> Tensor:
    """Each 4x4 matrix of ``weight`` ``(inputs, outputs, 16)`` transposed: the backward
    passes read W^T by rows."""
    return weight.unflatten(-1, (4, 4)).transpose(-1, -2).flatten(-2).contiguous()


# --- the M-step's moments ---------------------------------------------------------------------


@torch.library.custom_op("capsnet::em_moments", mutates_args=())
def moments(poses: Tensor, weight: Tensor, weights: Tensor, epsilon: float
            ) -> tuple[Tensor, Tensor, Tensor]:
    """The votes' moments under each output capsule's shares of ``weights`` ``(batch,
    windows, outputs, inputs)`` (the data assigned to it, R_ij a_i): with ``mass = sum_i
    weights_i`` ``(batch, windows, outputs)`` and ``share_i = weights_i / (mass + epsilon)``,
    ``mean = sum_i share_i V_i`` and ``spread = sum_i share_i (V_i - mean)^2``, ``(batch,
    windows, outputs, 16)`` each; returns mean, spread and mass."""
    poses, weight, weights = poses.contiguous(), weight.contiguous(), weights.contiguous()
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    mean, spread, mass = _moments_outputs(poses, weight, weights, epsilon)
    scratch = _scratch(poses, weight, backward=False)  # alive while the call uses it
    library().em_moments(pointer(poses), pointer(weight), pointer(weights), blocks, inputs,
                         outputs, threads, epsilon, pointer(scratch), pointer(mean),
                         pointer(spread), pointer(mass))
    return mean, spread, mass


@moments.register_fake
def _moments_outputs(poses: Tensor, weight: Tensor, weights: Tensor, epsilon: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    shape = (*weights.shape[:3], 16)
    return poses.new_empty(shape), poses.new_empty(shape), poses.new_empty(weights.shape[:3])


@torch.library.custom_op("capsnet::em_moments_backward", mutates_args=())
def moments_backward(poses: Tensor, weight: Tensor, weights: Tensor, mean: Tensor,
                     grad_mean: Tensor, grad_spread: Tensor, grad_mass: Tensor, epsilon: float
                     ) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of :func:`moments`' poses, weight and weights; ``mean`` is the mean it
    returned, which the gradient of the spread through the mean is made from."""
    poses, weight, weights = poses.contiguous(), weight.contiguous(), weights.contiguous()
    grads = [grad.contiguous() for grad in (grad_mean, grad_spread, grad_mass)]
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    # kept alive here while the call uses their addresses
    scratch, weight_t = _scratch(poses, weight, backward=True), _transposed(weight)
    mean, grad_poses, grad_weights = (mean.contiguous(), torch.empty_like(poses),
                                      torch.empty_like(weights))
    library().em_moments_backward(pointer(poses), pointer(weight), pointer(weight_t),
                                  pointer(weights), pointer(mean),
                                  *(pointer(grad) for grad in grads), blocks, inputs, outputs,
                                  threads, epsilon, pointer(scratch), pointer(grad_poses),
                                  pointer(grad_weights))
    return grad_poses, _weight_grad(scratch, weight), grad_weights


@moments_backward.register_fake
def _(poses: Tensor, weight: Tensor, weights: Tensor, mean: Tensor, grad_mean: Tensor,
      grad_spread: Tensor, grad_mass: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(poses), torch.empty_like(weight), torch.empty_like(weights)


def _save_moments(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
    ctx.save_for_backward(*inputs[:3], output[0])
    ctx.epsilon = inputs[3]


def _moments_grad(ctx, grad_mean, grad_spread, grad_mass):  # noqa: ANN001, ANN202 (torch's)
    return *moments_backward(*ctx.saved_tensors, grad_mean, grad_spread, grad_mass,
                             ctx.epsilon), None


moments.register_autograd(_moments_grad, setup_context=_save_moments)


# --- the E-step's deviations ------------------------------------------------------------------


@torch.library.custom_op("capsnet::em_deviations", mutates_args=())
def deviations(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor) -> Tensor:
    """``sum_h (V_ih - mean_h)^2 inverse_h`` for every vote, ``(batch, windows, outputs,
    inputs)``: the squared deviations scaled by the inverse of each output's variance."""
    poses, weight = poses.contiguous(), weight.contiguous()
    mean, inverse = mean.contiguous(), inverse.contiguous()
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    scaled = _deviations_output(poses, weight, mean, inverse)
    library().em_deviations(pointer(poses), pointer(weight), pointer(mean), pointer(inverse),
                            blocks, inputs, outputs, threads, pointer(scaled))
    return scaled


@deviations.register_fake
def _deviations_output(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor) -> Tensor:
    return poses.new_empty(*mean.shape[:3], poses.shape[2])


@torch.library.custom_op("capsnet::em_deviations_backward", mutates_args=())
def deviations_backward(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor,
                        grad_scaled: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`deviations`' poses, weight, mean and inverse."""
    poses, weight = poses.contiguous(), weight.contiguous()
    mean, inverse, grad_scaled = mean.contiguous(), inverse.contiguous(), grad_scaled.contiguous()
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    scratch, weight_t = _scratch(poses, weight, backward=True), _transposed(weight)
    grad_poses, grad_mean, grad_inverse = (torch.empty_like(poses), torch.empty_like(mean),
                                           torch.empty_like(inverse))
    library().em_deviations_backward(pointer(poses), pointer(weight), pointer(weight_t),
                                     pointer(mean), pointer(inverse), pointer(grad_scaled),
                                     blocks, inputs,
                                     outputs, threads, pointer(scratch), pointer(grad_poses),
                                     pointer(grad_mean), pointer(grad_inverse))
    return grad_poses, _weight_grad(scratch, weight), grad_mean, grad_inverse


@deviations_backward.register_fake
def _(poses: Tensor, weight: Tensor, mean: Tensor, inverse: Tensor, grad_scaled: Tensor
      ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(poses), torch.empty_like(weight), torch.empty_like(mean),
            torch.empty_like(inverse))


def _save_deviations(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
    ctx.save_for_backward(*inputs)


def _deviations_grad(ctx, grad_scaled):  # noqa: ANN001, ANN202 (torch's signature)
    return deviations_backward(*ctx.saved_tensors, grad_scaled)


deviations.register_autograd(_deviations_grad, setup_context=_save_deviations)
