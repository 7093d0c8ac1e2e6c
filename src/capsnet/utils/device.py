"""Where a model runs: the device, bfloat16 autocast, and the name of the hardware."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from pathlib import Path

import torch

from ..errors import CapsNetError


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CapsNetError("--device cuda: no CUDA device is available (use cpu or auto)")
    return torch.device(device)


def cpuinfo(field: str) -> str:
    """The first value of ``field`` in /proc/cpuinfo; empty where there is none."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return ""


@functools.cache  # read once: autocast asks at every step
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux's names: avx512f, amx_bf16, ...)."""
    return frozenset(cpuinfo("flags").split())


def resolved_precision(device: torch.device, precision: str) -> str:
    """``auto``: bf16 on a CPU with AMX, whose tiles multiply bfloat16 (the ``quick``
    preset, docs/PRESETS.md); fp32 elsewhere, where bf16 convolutions on a CPU do not pay."""
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cpu" and "amx_bf16" in cpu_flags() else "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for ``precision`` bf16 (or auto, where that is bf16), else nothing."""
    if resolved_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def compile_options(device: torch.device, cuda_graphs: bool = False) -> dict[str, bool]:
    """``torch.compile`` options for a model on ``device``.

    On a CPU, without inductor's layout optimization: it makes the primary-capsule
    convolution channels-last, which there copies its 21 MB weight twice a step and runs the
    convolution itself slower (training 0.83x -> 0.88x of the convolutions' rate,
    docs/PERFORMANCE.md). ``cuda_graphs`` is torch's reduce-overhead mode.
    """
    options = {"triton.cudagraphs": True} if cuda_graphs else {}
    if device.type == "cpu":
        options["layout_optimization"] = False
    return options


def cpu_model() -> str:
    """The CPU's model name as lscpu shows it (from /proc/cpuinfo), else the platform's."""
    return cpuinfo("model name") or platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: torch.device) -> str:
    """The GPU's name, or ``cpu (<model>, <vector instructions>, <n> threads)``: the vector
    instructions are torch's name for what the CPU kernels are built for (``AVX512``,
    ``AVX2``; none where it is neither), as one model name may come with either."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    isa = torch.backends.cpu.get_cpu_capability()
    vectors = "" if isa == "DEFAULT" else f"{isa}, "
    return f"cpu ({cpu_model()}, {vectors}{torch.get_num_threads()} threads)"


def physical_memory() -> int:
    """Bytes of memory of this machine (0 when the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_fits_in_memory(needed: int, what: str) -> None:
    """Refuse to allocate ``needed`` bytes for ``what`` when this machine has fewer."""
    total = physical_memory()
    if total and needed > total:
        raise CapsNetError(f"{what} would need {needed / 2**30:,.1f} GiB, more than this "
                           f"machine's {total / 2**30:,.1f} GiB of memory")
