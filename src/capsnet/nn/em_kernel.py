"""The vote-sized parts of EM routing as fused CPU operators, forward and backward
(``em_kernel.c``), for convolutional matrix capsules and the class capsules.

EM routing is memory-bound: torch writes the votes V = M W of the paper's ConvCaps1 (5.3
million floats an image) and reads them several times an iteration and again in backward.
The two operators here make each vote where it is used, one image's window at a time, while
that window's poses and the layer's weights are in the core's cache, and never store one:

* :func:`moments`, the M-step's weighted mean and spread of the votes for every output
  capsule, from the data assigned to it (the assignments, from their logits, and each
  output's shares are made inside, per window), and
* :func:`assignment_logits`, the E-step's log of each output's activation times the density
  of each vote, with their log-sum-exp over the outputs.

Everything smaller than the votes (the assignments' normalisers, costs, activations) stays
in torch, which also differentiates it; the operators' own backward passes are written out
and checked against torch by tests/test_em_kernel.py. The kernel is built as the dynamic
routing's (:mod:`capsnet.nn.cbuild`); a layer made with ``CAPSNET_ROUTING_KERNEL=off``
routes in torch.

Shapes: ``poses`` ``(batch, windows, inputs, 16)``, each window's input poses; ``weight``
``(inputs, outputs, 16)``; ``offset`` ``(inputs, 16)`` or None, a constant added to each
input's every vote (the class capsules' coordinate addition: ``V = M W + offset``, no
gradient); assignment logits ``(batch, windows, outputs, inputs)``;
activations and the assignments' normalisers ``(batch, windows, inputs)``; means, spreads
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


def _declare(lib: cbuild.Library) -> cbuild.Library:
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    f32 = ctypes.c_float
    lib.em_scratch.argtypes, lib.em_scratch.restype = [i64, i64, i32], i64
    lib.em_moments.argtypes = [p] * 6 + [i64] * 3 + [i32, f32] + [p] * 4
    lib.em_moments_backward.argtypes = [p] * 11 + [i64] * 3 + [i32, f32] + [p] * 5
    lib.em_assignment_logits.argtypes = [p] * 6 + [i64] * 3 + [i32] + [p] * 3
    lib.em_assignment_logits_backward.argtypes = [p] * 10 + [i64] * 3 + [i32] + [p] * 5
    for name in ("em_moments", "em_moments_backward", "em_assignment_logits",
                 "em_assignment_logits_backward"):
        getattr(lib, name).restype = None
    return lib


@functools.cache
def library() -> cbuild.Library | None:
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


def _contiguous(*tensors: Tensor | None) -> list[Tensor | None]:
    return [None if t is None else t.contiguous() for t in tensors]


def _pointer(tensor: Tensor | None) -> ctypes.c_void_p | None:
    """The address of ``tensor``; NULL for None."""
    return None if tensor is None else pointer(tensor)


def _transposed(weight: Tensor) -> Tensor:
    """Each 4x4 matrix of ``weight`` ``(inputs, outputs, 16)`` transposed: the backward
    passes read W^T by rows."""
    return weight.unflatten(-1, (4, 4)).transpose(-1, -2).flatten(-2).contiguous()


# --- the M-step's moments ---------------------------------------------------------------------


@cbuild.operator("em_moments")
def moments(poses: Tensor, weight: Tensor, offset: Tensor | None, logits: Tensor | None,
            log_total: Tensor, activations: Tensor, epsilon: float
            ) -> tuple[Tensor, Tensor, Tensor]:
    """The moments of the votes ``V = M W + offset`` under each output capsule's shares of
    its data. The assignments are ``R = exp(logits - log_total)`` (``logits`` ``(batch,
    windows, outputs, inputs)``, None: zeros; ``log_total`` ``(batch, windows, inputs)``) and
    an output's data ``w_i = R_i a_i`` for the ``activations`` a ``(batch, windows, inputs)``;
    with ``mass = sum_i w_i`` ``(batch, windows, outputs)`` and ``share_i = w_i / (mass +
    epsilon)``, ``mean = sum_i share_i V_i`` and ``spread = sum_i share_i (V_i - mean)^2``,
    ``(batch, windows, outputs, 16)`` each; returns mean, spread and mass."""
    poses, weight, offset, logits, log_total, activations = _contiguous(
        poses, weight, offset, logits, log_total, activations)
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    mean, spread, mass = _moments_outputs(poses, weight, offset, logits, log_total,
                                          activations, epsilon)
    scratch = _scratch(poses, weight, backward=False)  # alive while the call uses it
    library().em_moments(pointer(poses), pointer(weight), _pointer(offset), _pointer(logits),
                         pointer(log_total), pointer(activations), blocks, inputs, outputs,
                         threads, epsilon, pointer(scratch), pointer(mean), pointer(spread),
                         pointer(mass))
    return mean, spread, mass


@torch.library.register_fake("capsnet::em_moments")
def _moments_outputs(poses: Tensor, weight: Tensor, offset: Tensor | None,
                     logits: Tensor | None, log_total: Tensor, activations: Tensor,
                     epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    shape = (*poses.shape[:2], weight.shape[1])
    return poses.new_empty(*shape, 16), poses.new_empty(*shape, 16), poses.new_empty(shape)


@cbuild.operator("em_moments_backward")
def moments_backward(poses: Tensor, weight: Tensor, offset: Tensor | None,
                     logits: Tensor | None, log_total: Tensor, activations: Tensor,
                     mean: Tensor, grad_mean: Tensor, grad_spread: Tensor, grad_mass: Tensor,
                     epsilon: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`moments`' poses, weight, logits (empty without them),
    log_total and activations (the offset has none); ``mean`` is the mean it returned, which
    the gradient of the spread through the mean is made from."""
    poses, weight, offset, logits, log_total, activations, mean, *grads = _contiguous(
        poses, weight, offset, logits, log_total, activations, mean, grad_mean, grad_spread,
        grad_mass)
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    # kept alive here while the call uses their addresses
    scratch, weight_t = _scratch(poses, weight, backward=True), _transposed(weight)
    grad_poses, grad_logits, grad_log_total, grad_activations = _moments_grads(
        poses, weight, logits, log_total, activations)
    library().em_moments_backward(
        pointer(poses), pointer(weight), pointer(weight_t), _pointer(offset), _pointer(logits),
        pointer(log_total), pointer(activations), pointer(mean),
        *(pointer(grad) for grad in grads), blocks, inputs, outputs, threads, epsilon,
        pointer(scratch), pointer(grad_poses), _pointer(None if logits is None else grad_logits),
        pointer(grad_log_total), pointer(grad_activations))
    return (grad_poses, _weight_grad(scratch, weight), grad_logits, grad_log_total,
            grad_activations)


def _moments_grads(poses: Tensor, weight: Tensor, logits: Tensor | None, log_total: Tensor,
                   activations: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Room for the gradients of poses, logits (none without them), log_total and
    activations."""
    grad_logits = poses.new_empty(0) if logits is None else torch.empty_like(logits)
    return (torch.empty_like(poses), grad_logits, torch.empty_like(log_total),
            torch.empty_like(activations))


@torch.library.register_fake("capsnet::em_moments_backward")
def _(poses: Tensor, weight: Tensor, offset: Tensor | None, logits: Tensor | None,
      log_total: Tensor, activations: Tensor, mean: Tensor, grad_mean: Tensor,
      grad_spread: Tensor, grad_mass: Tensor, epsilon: float
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    grad_poses, *rest = _moments_grads(poses, weight, logits, log_total, activations)
    return grad_poses, torch.empty_like(weight), *rest


def _save_moments(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
    ctx.save_for_backward(*inputs[:6], output[0])
    ctx.epsilon = inputs[6]


def _moments_grad(ctx, grad_mean, grad_spread, grad_mass):  # noqa: ANN001, ANN202 (torch's)
    poses, weight, offset, logits, log_total, activations, mean = ctx.saved_tensors
    grad_poses, grad_weight, grad_logits, *rest = moments_backward(
        poses, weight, offset, logits, log_total, activations, mean, grad_mean, grad_spread,
        grad_mass, ctx.epsilon)
    return (grad_poses, grad_weight, None, None if logits is None else grad_logits, *rest,
            None)


torch.library.register_autograd(moments, _moments_grad, setup_context=_save_moments)


# --- the E-step's assignment logits -----------------------------------------------------------


@cbuild.operator("em_assignment_logits")
def assignment_logits(poses: Tensor, weight: Tensor, offset: Tensor | None, mean: Tensor,
                      inverse: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    """``bias - sum_h (V_ih - mean_h)^2 inverse_h / 2`` for every vote ``V = M W + offset``,
    ``(batch, windows, outputs, inputs)``: the log of its output's activation times the
    Gaussian density of the vote, the log-density's normaliser and log a_j in ``bias``
    ``(batch, windows, outputs)`` and the inverse of the variance in ``inverse`` ``(batch,
    windows, outputs, 16)``; and their log-sum-exp over the outputs ``(batch, windows,
    inputs)``."""
    poses, weight, offset, mean, inverse, bias = _contiguous(poses, weight, offset, mean,
                                                             inverse, bias)
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    logits, lse = _logits_outputs(poses, weight, offset, mean, inverse, bias)
    scratch = _scratch(poses, weight, backward=False)
    library().em_assignment_logits(pointer(poses), pointer(weight), _pointer(offset),
                                   pointer(mean), pointer(inverse), pointer(bias), blocks,
                                   inputs, outputs, threads, pointer(scratch), pointer(logits),
                                   pointer(lse))
    return logits, lse


@torch.library.register_fake("capsnet::em_assignment_logits")
def _logits_outputs(poses: Tensor, weight: Tensor, offset: Tensor | None, mean: Tensor,
                    inverse: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return poses.new_empty(*bias.shape, poses.shape[2]), poses.new_empty(poses.shape[:3])


@cbuild.operator("em_assignment_logits_backward")
def assignment_logits_backward(poses: Tensor, weight: Tensor, offset: Tensor | None,
                               mean: Tensor, inverse: Tensor, logits: Tensor, lse: Tensor,
                               grad_logits: Tensor, grad_lse: Tensor
                               ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of :func:`assignment_logits`' poses, weight, mean, inverse and bias
    (the offset has none); ``logits`` and ``lse`` are what it returned."""
    poses, weight, offset, mean, inverse, *given = _contiguous(
        poses, weight, offset, mean, inverse, logits, lse, grad_logits, grad_lse)
    blocks, inputs, outputs, threads = _sizes(poses, weight)
    scratch, weight_t = _scratch(poses, weight, backward=True), _transposed(weight)
    grad_poses, grad_mean, grad_inverse = (torch.empty_like(poses), torch.empty_like(mean),
                                           torch.empty_like(inverse))
    grad_bias = poses.new_empty(mean.shape[:3])
    library().em_assignment_logits_backward(
        pointer(poses), pointer(weight), pointer(weight_t), _pointer(offset), pointer(mean),
        pointer(inverse), *map(pointer, given), blocks, inputs, outputs, threads, pointer(scratch),
        pointer(grad_poses), pointer(grad_mean), pointer(grad_inverse), pointer(grad_bias))
    return grad_poses, _weight_grad(scratch, weight), grad_mean, grad_inverse, grad_bias


@torch.library.register_fake("capsnet::em_assignment_logits_backward")
def _(poses: Tensor, weight: Tensor, offset: Tensor | None, mean: Tensor, inverse: Tensor,
      logits: Tensor, lse: Tensor, grad_logits: Tensor, grad_lse: Tensor
      ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(poses), torch.empty_like(weight), torch.empty_like(mean),
            torch.empty_like(inverse), poses.new_empty(mean.shape[:3]))


def _save_logits(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
    ctx.save_for_backward(*inputs[:5], *output)


def _logits_grad(ctx, grad_logits, grad_lse):  # noqa: ANN001, ANN202 (torch's signature)
    grad_poses, grad_weight, *rest = assignment_logits_backward(*ctx.saved_tensors,
                                                               grad_logits, grad_lse)
    return grad_poses, grad_weight, None, *rest


torch.library.register_autograd(assignment_logits, _logits_grad,
                                setup_context=_save_logits)
