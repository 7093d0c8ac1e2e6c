"""Where a CPU training step's time goes: the model's operations beside its convolutions'.

Profiles STEPS compiled training steps of the default model (3 routing iterations, batch 64,
as ``capsnet bench --compile``) and as many of its two convolutions alone, with inductor's
kernels named, and prints each one's time per step and its longest operations.

    python scripts/profile_cpu.py [STEPS] [--torch-routing]

``--torch-routing`` routes in torch instead of the C kernel (CAPSNET_ROUTING_KERNEL=off).
"""

from __future__ import annotations

import sys

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.tools.bench import train_step
from capsnet.training.trainer import make_optimizer
from capsnet.utils.device import compile_options

CPU = torch.device("cpu")
ROWS = 25


def main(steps: int, kernel: bool) -> None:
    torch.set_num_threads(2)
    inductor_config.cpp.enable_kernel_profile = True
    torch.manual_seed(0)
    model = CapsNet(CapsNetConfig(routing_iterations=3))
    model.digits.fused = kernel
    convs = model.convolutions()
    model.compile(options=compile_options(CPU))
    adam, convs_adam = (make_optimizer(m.parameters(), 1e-3, CPU) for m in (model, convs))
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))

    def train() -> None:
        train_step(model, adam, images, labels)

    def train_convs() -> None:
        train_step(convs, convs_adam, images, None)

    for _ in range(3):  # compile and warm up
        train()
        train_convs()
    for name, step in (("model", train), ("convolutions", train_convs)):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages(group_by_input_shape=True)
        per_step = 1000 * steps  # profiler times are in microseconds
        print(f"{name}: {prof.key_averages().self_cpu_time_total / per_step:.1f} ms a step")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:ROWS]:
            print(f"  {event.self_cpu_time_total / per_step:7.2f} ms  {event.count // steps:3d}x  "
                  f"{event.key[:60]}  {str(event.input_shapes)[:60]}")


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--torch-routing"]
    main(int(args[0]) if args else 6, "--torch-routing" not in sys.argv)
