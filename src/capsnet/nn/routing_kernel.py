"""Dynamic routing as one fused operator, forward and backward: in C on a CPU
(``routing_kernel.c``, here) and in Triton on a CUDA GPU (:mod:`capsnet.nn.routing_triton`).

Routing is memory-bound: torch makes the predictions û for a batch (47 MB at batch 64) and
reads them again in every iteration and in backward. The kernel makes û for one example at a
time (737 KB for MNIST), routes it while it is in the core's cache, and makes it again in
backward instead of keeping it; its backward is written out (tests/test_routing_kernel.py
checks it against torch). It is built with the system's C compiler (``$CC``, else gcc or cc;
torch.compile needs one on a CPU too), once per CPU kind and capsule shape, into
``$XDG_CACHE_HOME/capsnet/kernels`` (about a second); a cached library that does not load
or lacks the kernel's functions is built again. When it cannot be built, or with
``CAPSNET_ROUTING_KERNEL=off``, routing runs in torch (``layers.RoutingCapsules``).

Both directions are torch custom operators, so a compiled model calls them as they are; on a
GPU they need Triton, which comes with every CUDA build of torch.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from pathlib import Path

import torch
from torch import Tensor

from ..errors import CapsNetError
from . import cbuild
from .cbuild import pointer

SOURCE = Path(__file__).with_name("routing_kernel.c")
EPSILON = 1e-7  # inside squash's square root (layers.squash uses it too)
LANES = 16  # input capsules the kernel's gradient loops take at a time
SWITCH = "CAPSNET_ROUTING_KERNEL"
SWITCH_VALUES = {"on": True, "1": True, "true": True, "off": False, "0": False, "false": False}


def enabled() -> bool:
    """``CAPSNET_ROUTING_KERNEL=off`` (or 0, false) keeps routing in torch; on (1, true,
    empty or unset) lets it use the fused operator. Any other value is refused."""
    value = os.environ.get(SWITCH, "")
    try:
        return SWITCH_VALUES[value.strip().lower() or "on"]
    except KeyError:
        raise CapsNetError(f"{SWITCH}={value!r} is not a setting; use one of "
                           f"{', '.join(SWITCH_VALUES)} (or leave it unset)") from None


def supports(u: Tensor, weight: Tensor) -> bool:
    """Whether routing ``u`` with ``weight`` can run in the fused operator: on a CPU, float32
    with input capsules in whole blocks and a kernel built for these shapes; on a GPU, float32
    or bfloat16 with Triton there and output capsules a program can hold."""
    in_caps, out_caps, out_dim, in_dim = weight.shape
    if u.dtype != weight.dtype or u.shape[0] == 0:
        return False
    if u.device.type == "cuda":
        return u.dtype in (torch.float32, torch.bfloat16) and triton_takes(out_caps, out_dim)
    return (u.device.type == "cpu" and u.dtype == torch.float32 and in_caps % LANES == 0
            and available(out_caps, out_dim, in_dim))


def version(u: Tensor, weight: Tensor) -> str | None:
    """The code that routes ``u`` with ``weight`` in the fused operator, by its source's name
    and hash (:func:`capsnet.nn.cbuild.source_version`): the C library as it was built, or
    the Triton kernels on a GPU; None where it cannot take them."""
    if not supports(u, weight):
        return None
    if u.device.type == "cuda":
        return _triton().VERSION
    return library(*weight.shape[1:]).version


def constant_when_compiled(fn):  # noqa: ANN001, ANN201 (any function)
    """``torch.compiler.assume_constant_result(fn)`` without its import of torch._dynamo,
    which takes about a second: every capsnet command would pay it at start-up, compiled or
    not. It sets the mark torch.compile reads when it traces (tests/test_routing_kernel.py
    checks that it is the same mark)."""
    fn._dynamo_marked_constant = True
    return fn


@constant_when_compiled  # asked once when compiling, not in the graph
@functools.cache  # and once per shape in eager mode, not at every forward
def triton_takes(out_caps: int, out_dim: int) -> bool:
    """Whether Triton is installed (every CUDA build of torch brings it) and its kernels hold
    this many output capsules."""
    return (importlib.util.find_spec("triton") is not None
            and _triton().block_inputs(out_caps, out_dim) > 0)


def _triton():  # noqa: ANN202 (a module)
    """The GPU kernels, imported on first use: a CPU install need not have Triton."""
    from . import routing_triton
    return routing_triton


@constant_when_compiled  # asked once when compiling, not in the graph
def available(out_caps: int, out_dim: int, in_dim: int) -> bool:
    """Whether the kernel builds for these shapes."""
    return library(out_caps, out_dim, in_dim) is not None


def builds(out_caps: int, out_dim: int, in_dim: int) -> list[cbuild.Build]:
    """The ways to build the kernel for these capsule shapes and this CPU, best first: its
    compiler flags, libraries and cached file (named by a hash of the source and flags)."""
    return cbuild.builds(SOURCE, "routing", [f"-DOUT_CAPS={out_caps}", f"-DOUT_DIM={out_dim}",
                                             f"-DIN_DIM={in_dim}"])


@functools.cache
def library(out_caps: int, out_dim: int, in_dim: int) -> cbuild.Library | None:
    """The kernel for these capsule shapes and this CPU, built on first use; None (with a
    warning) when it cannot be built or loaded."""
    return cbuild.load(SOURCE, lambda: builds(out_caps, out_dim, in_dim), _declare, "routing")


def _declare(lib: cbuild.Library) -> cbuild.Library:
    pointer, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.routing_forward_scratch.argtypes = [i64]
    lib.routing_backward_scratch.argtypes = [i64, i64, i32]
    lib.routing_forward_scratch.restype = lib.routing_backward_scratch.restype = i64
    lib.routing_forward.argtypes = [pointer] * 3 + [i64, i64, i32, i32, i32, f32, i32] + \
        [pointer] * 5
    lib.routing_backward.argtypes = [pointer] * 5 + [i64, i64, i32, f32, i32] + [pointer] * 8
    lib.routing_forward.restype = lib.routing_backward.restype = None
    return lib


@cbuild.operator("route")
def route(u: Tensor, weight: Tensor, bias: Tensor | None, iterations: int, leaky: bool,
          keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Route input capsules ``u`` (batch, in_caps, in_dim) with ``weight`` (in_caps, out_caps,
    out_dim, in_dim), ``bias`` (out_caps, out_dim) or None, and leaky routing or not, as
    :class:`capsnet.nn.layers.RoutingCapsules`. Returns v (batch, out_caps, out_dim), the
    couplings (batch, slots, out_caps, in_caps), s (batch, slots, out_caps, out_dim) and W
    rearranged (out_caps, out_dim, in_dim, in_caps); the slots are every iteration's with
    ``keep`` (which the backward needs), else the last one's alone."""
    u, weight = u.contiguous(), weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    batch, in_caps, in_dim = u.shape
    _, out_caps, out_dim, _ = weight.shape
    lib, threads = library(out_caps, out_dim, in_dim), torch.get_num_threads()
    scratch = u.new_empty(threads, lib.routing_forward_scratch(in_caps))
    v, coupling, s, weight_t = _outputs(u, weight, bias, iterations, leaky, keep)
    bias_pointer = None if bias is None else pointer(bias)
    lib.routing_forward(pointer(u), pointer(weight), bias_pointer, batch, in_caps,
                        iterations, int(leaky), int(keep), EPSILON, threads, pointer(scratch),
                        pointer(weight_t), pointer(v), pointer(coupling), pointer(s))
    return v, coupling, s, weight_t


@torch.library.register_fake("capsnet::route")
def _outputs(u: Tensor, weight: Tensor, bias: Tensor | None, iterations: int, leaky: bool,
             keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch, in_caps, in_dim = u.shape
    _, out_caps, out_dim, _ = weight.shape
    slots = iterations if keep else 1
    return (u.new_empty(batch, out_caps, out_dim),  # couplings and s: float32 on any input
            u.new_empty(batch, slots, out_caps, in_caps, dtype=torch.float32),
            u.new_empty(batch, slots, out_caps, out_dim, dtype=torch.float32),
            weight.new_empty(out_caps, out_dim, in_dim, in_caps))


@torch.library.impl("capsnet::route", "cuda")
def _(u: Tensor, weight: Tensor, bias: Tensor | None, iterations: int, leaky: bool,
      keep: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _triton().route(u, weight, bias, iterations, leaky, keep, EPSILON)


@cbuild.operator("route_backward")
def route_backward(grad_v: Tensor, u: Tensor, weight_t: Tensor, coupling: Tensor, s: Tensor
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of ``route``'s u and weight, and that of every s (whose sum is the
    bias's), from the gradient of its v."""
    grad_v, u = grad_v.contiguous(), u.contiguous()
    batch, in_caps, in_dim = u.shape
    out_caps, out_dim = weight_t.shape[:2]
    iterations = coupling.shape[1]
    lib, threads = library(out_caps, out_dim, in_dim), torch.get_num_threads()
    scratch = u.new_empty(threads, lib.routing_backward_scratch(batch, in_caps, iterations))
    grad_s, v_all = torch.empty_like(s), torch.empty_like(s)
    grad_logits = torch.empty_like(coupling)
    u_t, grad_u_t = u.new_empty(batch, in_dim, in_caps), u.new_empty(batch, in_dim, in_caps)
    grad_u = torch.empty_like(u)
    grad_weight = u.new_empty(in_caps, out_caps, out_dim, in_dim)
    lib.routing_backward(pointer(u), pointer(weight_t), pointer(grad_v), pointer(coupling),
                         pointer(s), batch, in_caps, iterations, EPSILON, threads,
                         pointer(scratch), pointer(grad_s), pointer(grad_logits),
                         pointer(v_all), pointer(u_t), pointer(grad_u_t), pointer(grad_u),
                         pointer(grad_weight))
    return grad_u, grad_weight, grad_s


@torch.library.register_fake("capsnet::route_backward")
def _(grad_v: Tensor, u: Tensor, weight_t: Tensor, coupling: Tensor, s: Tensor
      ) -> tuple[Tensor, Tensor, Tensor]:
    out_caps, out_dim, in_dim, in_caps = weight_t.shape
    return (torch.empty_like(u), weight_t.new_empty(in_caps, out_caps, out_dim, in_dim),
            torch.empty_like(s))


@torch.library.impl("capsnet::route_backward", "cuda")
def _(grad_v: Tensor, u: Tensor, weight_t: Tensor, coupling: Tensor, s: Tensor
      ) -> tuple[Tensor, Tensor, Tensor]:
    return _triton().route_backward(grad_v, u, weight_t, coupling, s, EPSILON)


def _save(ctx, inputs, output) -> None:  # noqa: ANN001 (torch's signature)
    u, _, bias, iterations, _, _ = inputs
    _, coupling, s, weight_t = output
    ctx.save_for_backward(u, weight_t, coupling, s)
    ctx.iterations, ctx.bias = iterations, bias is not None
    ctx.mark_non_differentiable(coupling, s, weight_t)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_v, *_):  # noqa: ANN001 (torch's signature)
    u, weight_t, coupling, s = ctx.saved_tensors
    if coupling.shape[1] != ctx.iterations:
        raise RuntimeError("capsnet::route kept the last iteration alone (keep=False): "
                           "it has no backward")
    grad_u, grad_weight, grad_s = route_backward(grad_v, u, weight_t, coupling, s)
    grad_bias = grad_s.sum(dim=(0, 1)) if ctx.bias else None
    return grad_u, grad_weight, grad_bias, None, None, None


torch.library.register_autograd(route, _backward, setup_context=_save)
