"""How much memory a request needs, estimated from its sizes before anything is allocated, and
how much there is: what cannot fit is refused in one line that says what to lower.

The estimates count float32 tensors (bf16 autocast keeps the routing in float32) and err on
the large side. Measured on a CPU as the growth of the process's peak memory over one step of
the 28x28 network with 3 routing iterations, an image takes 0.84 MiB to infer and 2.7 MiB to
train with torch's routing (1.8 MiB with capsnet's CPU kernel); :func:`capsnet_image_bytes`
counts 2.0 and 3.2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import CapsNetError
from .device import physical_memory

FLOAT = 4  # bytes of a float32
MARGIN = 1.25  # the allocator's slack and the small temporaries the counts leave out
TRAINING_STATE = 4  # floats a parameter holds while training: weight, gradient, Adam's two moments


def available_memory(device: torch.device | str = "cpu") -> int:
    """Bytes a new allocation on ``device`` can take: what CUDA reports free on a GPU; on a
    CPU the kernel's MemAvailable, else the physical memory; 0 when nothing says."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    return meminfo_available() or physical_memory()


def meminfo_available() -> int:
    """MemAvailable of /proc/meminfo in bytes (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == "MemAvailable":
                return int(value.split()[0]) * 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return 0


def gib(size: int) -> str:
    return f"{size / 2**30:,.1f} GiB"


def check_memory(needed: int, what: str, advice: str,
                 device: torch.device | str = "cpu") -> None:
    """Refuse ``what`` when its ``needed`` bytes exceed the memory available on ``device``,
    in one line ending with ``advice`` (what to lower). Nothing is refused where the system
    does not say how much memory there is."""
    available = available_memory(device)
    if available and needed > available:
        where = "free on the GPU" if torch.device(device).type == "cuda" else "available"
        raise CapsNetError(f"{what} would need {gib(needed)}, more than the {gib(available)} "
                           f"of memory {where}; {advice}")


def capsnet_image_bytes(config: Any, training: bool, device: torch.device | str = "cpu") -> int:
    """Bytes of activations one image takes in a CapsNet of ``config`` (a CapsNetConfig) on
    ``device``: what a training step keeps for its backward pass, or the largest set of
    tensors alive at once in inference. Other capsule networks' configs give their own count
    (``activation_floats``), which may depend on the device (EM routing's CPU kernel keeps
    no votes); a CapsNet's is torch's routing's, an upper bound where its kernel runs."""
    if hasattr(config, "activation_floats"):
        return int(MARGIN * FLOAT * config.activation_floats(training, torch.device(device)))
    conv1 = config.conv1_channels * (config.image_size - config.conv1_kernel + 1) ** 2
    primary = config.primary_caps * config.primary_dim
    predictions = config.primary_caps * config.num_classes * config.digit_dim  # u_hat
    logits = config.primary_caps * config.num_classes  # routing logits, couplings, agreements
    decoder = config.num_classes * config.digit_dim + sum(config.decoder_hidden) \
        + config.image_pixels
    if training:
        floats = (config.image_pixels + 2 * conv1 + 3 * primary + 2 * predictions
                  + 2 * config.routing_iterations * logits + 2 * decoder)
    else:
        floats = max(2 * conv1, conv1 + 3 * primary, primary + 2 * predictions + 3 * logits) \
            + config.image_pixels + 2 * decoder
    return int(MARGIN * FLOAT * floats)


def capsnet_state_bytes(config: Any, training: bool, averaged: bool = False) -> int:
    """Bytes of a CapsNet's parameters: the weights, while training their gradients and
    Adam's moments too, and with ``averaged`` a moving average's copy of the weights."""
    floats = (TRAINING_STATE if training else 1) + averaged
    return FLOAT * config.parameter_count * floats
