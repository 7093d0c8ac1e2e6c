"""Dynamic routing on a CUDA GPU in Triton, forward and backward: the CUDA implementations of
the ``capsnet::route`` and ``capsnet::route_backward`` operators (``routing_kernel``).

torch makes the predictions û for the whole batch (94 MB for MNIST at batch 128), writes
them to memory and reads them again in every iteration and in backward, in about ten small
launches per iteration. Here û never leaves the chip: each program makes it for a block of
input capsules of one example from W and u (eight multiply-adds an element, with W's block
shared by the examples a program takes), in every pass that needs it. The logits need no
storage either: those of iteration t are û · (v_0 + ... + v_{t-1}). A pass over the input
capsules sums its blocks' parts of s (or of the gradient of v) into a buffer; a small
launch per example adds them, in a fixed order (the same bits every run), and squashes.
What the backward keeps is the couplings of every iteration, as on the CPU.

Shapes (as ``routing_kernel``): u (batch, in_caps, in_dim); W rearranged
``weight_t`` (out_caps, out_dim, in_dim, in_caps), so a block of input capsules is one
contiguous row; couplings (batch, slots, out_caps, in_caps); s (batch, slots, out_caps,
out_dim). Inputs are float32 or bfloat16, every sum is float32. Without a GPU the kernels
run in Triton's interpreter (``TRITON_INTERPRET=1``, CPU tensors), which is how the tests
check them against torch.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
import triton
import triton.language as tl

from .cbuild import source_version

VERSION = source_version("routing_triton", Path(__file__).read_bytes())  # as imported

BLOCK_ELEMENTS = 8192  # û values a program holds at once: (out_caps, out_dim, inputs) padded
MAX_BLOCK_INPUTS = 32
EXAMPLES_PER_PROGRAM = 8  # a program's examples share each block of W it loads


def block_inputs(out_caps: int, out_dim: int) -> int:
    """Input capsules per program for these output capsules; 0 when one capsule's û alone
    is more than a program holds (such layers route in torch)."""
    padded = triton.next_power_of_2(out_caps) * triton.next_power_of_2(out_dim)
    return min(MAX_BLOCK_INPUTS, BLOCK_ELEMENTS // padded)


@triton.jit
def _predict(u_ptr, weight_t_ptr, b, in_caps, i, j, d, IN_DIM: tl.constexpr,
             OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr):
    """û (out_caps, out_dim, inputs) of example b, padded with zeros."""
    i_ok = i < in_caps
    mask = ((j[:, None, None] < OUT_CAPS) & (d[None, :, None] < OUT_DIM)
            & i_ok[None, None, :])
    rows = (j[:, None, None] * OUT_DIM + d[None, :, None]) * IN_DIM * in_caps + i[None, None, :]
    u_hat = tl.zeros(mask.shape, tl.float32)
    for k in tl.static_range(IN_DIM):
        w = tl.load(weight_t_ptr + rows + k * in_caps, mask=mask, other=0.0).to(tl.float32)
        u_k = tl.load(u_ptr + (b * in_caps + i) * IN_DIM + k, mask=i_ok, other=0.0)
        u_hat += w * u_k.to(tl.float32)[None, None, :]
    return u_hat


@triton.jit
def _block(in_caps, OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr, JP: tl.constexpr,
           DP: tl.constexpr, BLOCK: tl.constexpr):
    """This program's block of input capsules i, the output indices j and d, and which of
    (j, d) and (j, i) are real rather than padding."""
    j, d = tl.arange(0, JP), tl.arange(0, DP)
    i = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    jd = (j[:, None] < OUT_CAPS) & (d[None, :] < OUT_DIM)
    ji = (j[:, None] < OUT_CAPS) & (i[None, :] < in_caps)
    return i, j, d, jd, ji


@triton.jit
def _agree(u_ptr, weight_t_ptr, v_sum_ptr, coupling_ptr, part_ptr, batch, in_caps, slot, slots,
           IN_DIM: tl.constexpr, OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr,
           JP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr, EXAMPLES: tl.constexpr,
           FIRST: tl.constexpr, LEAKY: tl.constexpr):
    """One routing iteration over one block of input capsules of a few examples: the
    couplings (stored in ``slot``) and this block's part of s."""
    block = tl.program_id(1)
    i, j, d, jd, ji = _block(in_caps, OUT_DIM, OUT_CAPS, JP, DP, BLOCK)
    first = tl.program_id(0) * EXAMPLES
    for b in range(first, tl.minimum(first + EXAMPLES, batch)):
        u_hat = _predict(u_ptr, weight_t_ptr, b, in_caps, i, j, d, IN_DIM, OUT_DIM, OUT_CAPS)
        if FIRST:
            logits = tl.zeros((JP, BLOCK), tl.float32)
        else:  # the logits are û · (sum of the earlier iterations' v)
            v_sum = tl.load(v_sum_ptr + (b * OUT_CAPS + j[:, None]) * OUT_DIM + d[None, :],
                            mask=jd, other=0.0)
            logits = tl.sum(u_hat * v_sum[:, :, None], axis=1)  # (JP, BLOCK)
        logits = tl.where(j[:, None] < OUT_CAPS, logits, float("-inf"))
        top = tl.max(logits, axis=0)
        if LEAKY:  # one more output, logit 0, whose coupling is dropped
            top = tl.maximum(top, 0.0)
        e = tl.exp(logits - top[None, :])
        total = tl.sum(e, axis=0)
        if LEAKY:
            total += tl.exp(-top)
        coupling = e / total[None, :]  # (JP, BLOCK)
        tl.store(coupling_ptr + ((b * slots + slot) * OUT_CAPS + j[:, None]) * in_caps
                 + i[None, :], coupling, mask=ji)
        part = tl.sum(coupling[:, None, :] * u_hat, axis=2)  # (JP, DP)
        blocks = tl.num_programs(1)
        tl.store(part_ptr + ((b * blocks + block) * OUT_CAPS + j[:, None]) * OUT_DIM + d[None, :],
                 part, mask=jd)


@triton.jit
def _squash_factors(s, eps):
    """g and g' with squash(s) = g(n) s, n = |s|^2, for each row of s (JP, DP)."""
    n = tl.sum(s * s, axis=1)
    root = tl.sqrt(n + eps)
    g = n / (1.0 + n) / root
    dg = 1.0 / ((1.0 + n) * root) - g / (1.0 + n) - 0.5 * g / (n + eps)
    return g, dg


@triton.jit
def _finish(part_ptr, blocks, bias_ptr, s_ptr, v_ptr, v_sum_ptr, slot, slots, eps,
            OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr,
            HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr):
    """s of one example from its blocks' parts (and the bias), then v = squash(s)."""
    b = tl.program_id(0)
    j, d = tl.arange(0, JP), tl.arange(0, DP)
    jd = (j[:, None] < OUT_CAPS) & (d[None, :] < OUT_DIM)
    here = j[:, None] * OUT_DIM + d[None, :]
    s = tl.zeros((JP, DP), tl.float32)
    for block in range(blocks):  # in order: the same sum every run
        s += tl.load(part_ptr + (b * blocks + block) * OUT_CAPS * OUT_DIM + here, mask=jd,
                     other=0.0)
    if HAS_BIAS:
        s += tl.load(bias_ptr + here, mask=jd, other=0.0).to(tl.float32)
    g, _ = _squash_factors(s, eps)
    v = g[:, None] * s
    tl.store(s_ptr + (b * slots + slot) * OUT_CAPS * OUT_DIM + here, s, mask=jd)
    tl.store(v_ptr + b * OUT_CAPS * OUT_DIM + here, v, mask=jd)
    if ACCUMULATE:
        at = v_sum_ptr + b * OUT_CAPS * OUT_DIM + here
        tl.store(at, tl.load(at, mask=jd, other=0.0) + v, mask=jd)


@triton.jit
def _disagree(u_ptr, weight_t_ptr, coupling_ptr, grad_s_ptr, grad_logits_ptr, part_ptr, batch,
              in_caps, t, iterations, IN_DIM: tl.constexpr, OUT_DIM: tl.constexpr,
              OUT_CAPS: tl.constexpr, JP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
              EXAMPLES: tl.constexpr, LAST: tl.constexpr):
    """Backward through the softmax of iteration t >= 1 for one block of input capsules:
    the gradient of its logits (which add to those of iteration t + 1, as the logits of t + 1
    are those of t plus an agreement), and this block's part of the gradient of v_{t-1}."""
    block = tl.program_id(1)
    i, j, d, jd, ji = _block(in_caps, OUT_DIM, OUT_CAPS, JP, DP, BLOCK)
    first = tl.program_id(0) * EXAMPLES
    for b in range(first, tl.minimum(first + EXAMPLES, batch)):
        u_hat = _predict(u_ptr, weight_t_ptr, b, in_caps, i, j, d, IN_DIM, OUT_DIM, OUT_CAPS)
        here = (b * iterations + t) * OUT_CAPS
        grad_s = tl.load(grad_s_ptr + (here + j[:, None]) * OUT_DIM + d[None, :], mask=jd,
                         other=0.0)
        grad_coupling = tl.sum(u_hat * grad_s[:, :, None], axis=1)  # (JP, BLOCK)
        rows = (here + j[:, None]) * in_caps + i[None, :]
        coupling = tl.load(coupling_ptr + rows, mask=ji, other=0.0)
        mean = tl.sum(coupling * grad_coupling, axis=0)
        # leaky routing's dropped output has no gradient: the same formula holds
        grad_logits = coupling * (grad_coupling - mean[None, :])
        if not LAST:
            grad_logits += tl.load(grad_logits_ptr + rows + OUT_CAPS * in_caps, mask=ji,
                                   other=0.0)
        tl.store(grad_logits_ptr + rows, grad_logits, mask=ji)
        part = tl.sum(grad_logits[:, None, :] * u_hat, axis=2)  # (JP, DP)
        blocks = tl.num_programs(1)
        tl.store(part_ptr + ((b * blocks + block) * OUT_CAPS + j[:, None]) * OUT_DIM + d[None, :],
                 part, mask=jd)


@triton.jit
def _finish_backward(part_ptr, blocks, grad_v_ptr, s_ptr, grad_s_ptr, t, iterations, eps,
                     OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr, JP: tl.constexpr,
                     DP: tl.constexpr, FROM_GRAD_V: tl.constexpr):
    """The gradient of s_t of one example from that of v_t: given (the last iteration), or
    summed from the blocks' parts."""
    b = tl.program_id(0)
    j, d = tl.arange(0, JP), tl.arange(0, DP)
    jd = (j[:, None] < OUT_CAPS) & (d[None, :] < OUT_DIM)
    here = j[:, None] * OUT_DIM + d[None, :]
    if FROM_GRAD_V:
        grad_v = tl.load(grad_v_ptr + b * OUT_CAPS * OUT_DIM + here, mask=jd,
                         other=0.0).to(tl.float32)
    else:
        grad_v = tl.zeros((JP, DP), tl.float32)
        for block in range(blocks):
            grad_v += tl.load(part_ptr + (b * blocks + block) * OUT_CAPS * OUT_DIM + here,
                              mask=jd, other=0.0)
    at = (b * iterations + t) * OUT_CAPS * OUT_DIM + here
    s = tl.load(s_ptr + at, mask=jd, other=0.0)
    g, dg = _squash_factors(s, eps)
    s_dot_grad = tl.sum(s * grad_v, axis=1)
    grad_s = g[:, None] * grad_v + (2.0 * dg * s_dot_grad)[:, None] * s
    tl.store(grad_s_ptr + at, grad_s, mask=jd)


@triton.jit
def _input_gradients(u_ptr, weight_t_ptr, coupling_ptr, s_ptr, grad_s_ptr, grad_logits_ptr,
                     grad_u_part_ptr, grad_weight_ptr, batch, in_caps, eps,
                     IN_DIM: tl.constexpr, OUT_DIM: tl.constexpr, OUT_CAPS: tl.constexpr,
                     KP: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                     ITERATIONS: tl.constexpr):
    """The gradients of W (summed over the batch here, in a fixed order) and of u (this
    output capsule's part) for one block of input capsules and one output capsule j. The
    gradient of û is sum_t c_t grad_s_t + sum_{t>=1} grad_logits_t v_{t-1}."""
    block, j = tl.program_id(0), tl.program_id(1)
    d, k = tl.arange(0, DP), tl.arange(0, KP)
    i = block * BLOCK + tl.arange(0, BLOCK)
    i_ok = i < in_caps
    d_ok = d < OUT_DIM
    dki = d_ok[:, None, None] & (k[None, :, None] < IN_DIM) & i_ok[None, None, :]
    ki = (k[:, None] < IN_DIM) & i_ok[None, :]
    weight = tl.load(weight_t_ptr + ((j * OUT_DIM + d[:, None, None]) * IN_DIM
                                     + k[None, :, None]) * in_caps + i[None, None, :],
                     mask=dki, other=0.0).to(tl.float32)  # (DP, KP, BLOCK)
    grad_weight = tl.zeros((DP, KP, BLOCK), tl.float32)
    for b in range(batch):
        grad_u_hat = tl.zeros((DP, BLOCK), tl.float32)
        for t in tl.static_range(ITERATIONS):
            row = (b * ITERATIONS + t) * OUT_CAPS + j
            coupling = tl.load(coupling_ptr + row * in_caps + i, mask=i_ok, other=0.0)
            grad_s = tl.load(grad_s_ptr + row * OUT_DIM + d, mask=d_ok, other=0.0)
            grad_u_hat += grad_s[:, None] * coupling[None, :]
            if t > 0:
                grad_logits = tl.load(grad_logits_ptr + row * in_caps + i, mask=i_ok, other=0.0)
                s = tl.load(s_ptr + (row - OUT_CAPS) * OUT_DIM + d, mask=d_ok, other=0.0)
                n = tl.sum(s * s, axis=0)
                v = s * (n / (1.0 + n) / tl.sqrt(n + eps))
                grad_u_hat += v[:, None] * grad_logits[None, :]
        u = tl.load(u_ptr + (b * in_caps + i[None, :]) * IN_DIM + k[:, None], mask=ki,
                    other=0.0).to(tl.float32)  # (KP, BLOCK)
        grad_weight += grad_u_hat[:, None, :] * u[None, :, :]
        grad_u = tl.sum(grad_u_hat[:, None, :] * weight, axis=0)  # (KP, BLOCK)
        tl.store(grad_u_part_ptr + ((j * batch + b) * in_caps + i[None, :]) * IN_DIM + k[:, None],
                 grad_u, mask=ki)
    tl.store(grad_weight_ptr + ((i[None, None, :] * OUT_CAPS + j) * OUT_DIM + d[:, None, None])
             * IN_DIM + k[None, :, None], grad_weight, mask=dki)


def _sizes(in_caps: int, in_dim: int, out_caps: int, out_dim: int) -> dict[str, int]:
    return {"IN_DIM": in_dim, "OUT_DIM": out_dim, "OUT_CAPS": out_caps,
            "JP": triton.next_power_of_2(out_caps), "DP": triton.next_power_of_2(out_dim)}


def route(u: Tensor, weight: Tensor, bias: Tensor | None, iterations: int, leaky: bool,
          keep: bool, eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``capsnet::route`` on a GPU; the arguments and results of ``routing_kernel.route``."""
    u, weight = u.contiguous(), weight.contiguous()
    batch, in_caps, in_dim = u.shape
    _, out_caps, out_dim, _ = weight.shape
    weight_t = weight.permute(1, 2, 3, 0).contiguous()  # (out_caps, out_dim, in_dim, in_caps)
    slots = iterations if keep else 1
    sizes, block = _sizes(in_caps, in_dim, out_caps, out_dim), block_inputs(out_caps, out_dim)
    blocks = triton.cdiv(in_caps, block)
    as_float = {"device": u.device, "dtype": torch.float32}
    v = torch.empty(batch, out_caps, out_dim, **as_float)
    coupling = torch.empty(batch, slots, out_caps, in_caps, **as_float)
    s = torch.empty(batch, slots, out_caps, out_dim, **as_float)
    v_sum = torch.zeros(batch, out_caps, out_dim, **as_float)
    part = torch.empty(batch, blocks, out_caps, out_dim, **as_float)
    grid = (triton.cdiv(batch, EXAMPLES_PER_PROGRAM), blocks)
    for t in range(iterations):
        slot = t if keep else 0
        _agree[grid](u, weight_t, v_sum, coupling, part, batch, in_caps, slot, slots,
                     BLOCK=block, EXAMPLES=EXAMPLES_PER_PROGRAM, FIRST=t == 0, LEAKY=leaky,
                     **sizes, num_warps=8)
        _finish[(batch,)](part, blocks, v if bias is None else bias, s, v, v_sum, slot, slots,
                          eps, HAS_BIAS=bias is not None, ACCUMULATE=t < iterations - 1,
                          OUT_DIM=out_dim, OUT_CAPS=out_caps, JP=sizes["JP"], DP=sizes["DP"])
    return v.to(u.dtype), coupling, s, weight_t


def route_backward(grad_v: Tensor, u: Tensor, weight_t: Tensor, coupling: Tensor, s: Tensor,
                   eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """``capsnet::route_backward`` on a GPU: the gradients of u, W and every s."""
    grad_v, u = grad_v.contiguous(), u.contiguous()
    batch, in_caps, in_dim = u.shape
    out_caps, out_dim = weight_t.shape[:2]
    iterations = coupling.shape[1]
    sizes, block = _sizes(in_caps, in_dim, out_caps, out_dim), block_inputs(out_caps, out_dim)
    blocks = triton.cdiv(in_caps, block)
    small = {"OUT_DIM": out_dim, "OUT_CAPS": out_caps, "JP": sizes["JP"], "DP": sizes["DP"]}
    grad_s = torch.empty_like(s)
    grad_logits = torch.empty_like(coupling)  # slot 0 unused: the first coupling is uniform
    part = torch.empty(batch, blocks, out_caps, out_dim, device=u.device, dtype=torch.float32)
    _finish_backward[(batch,)](part, blocks, grad_v, s, grad_s, iterations - 1, iterations, eps,
                               FROM_GRAD_V=True, **small)
    grid = (triton.cdiv(batch, EXAMPLES_PER_PROGRAM), blocks)
    for t in range(iterations - 1, 0, -1):
        _disagree[grid](u, weight_t, coupling, grad_s, grad_logits, part, batch, in_caps, t,
                        iterations, BLOCK=block, EXAMPLES=EXAMPLES_PER_PROGRAM,
                        LAST=t == iterations - 1, **sizes, num_warps=8)
        _finish_backward[(batch,)](part, blocks, grad_v, s, grad_s, t - 1, iterations, eps,
                                   FROM_GRAD_V=False, **small)
    grad_u_part = torch.empty(out_caps, batch, in_caps, in_dim, device=u.device,
                              dtype=torch.float32)
    grad_weight = torch.empty(in_caps, out_caps, out_dim, in_dim, device=u.device,
                              dtype=torch.float32)
    _input_gradients[(blocks, out_caps)](
        u, weight_t, coupling, s, grad_s, grad_logits, grad_u_part, grad_weight, batch, in_caps,
        eps, IN_DIM=in_dim, OUT_DIM=out_dim, OUT_CAPS=out_caps,
        KP=triton.next_power_of_2(in_dim), DP=sizes["DP"], BLOCK=block, ITERATIONS=iterations,
        num_warps=4)
    return grad_u_part.sum(dim=0).to(u.dtype), grad_weight.to(weight_t.dtype), grad_s
