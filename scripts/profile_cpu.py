"""Where a CPU training step's time goes: the model's operations beside its convolutions'.

Profiles STEPS compiled training steps of a network (as ``capsnet bench --compile`` builds
it: by default the dynamic-routing CapsNet with 3 routing iterations, batch 64, 2 threads)
and as many of its convolutions alone, with inductor's kernels named, and prints each one's
time per step and its longest operations, each with its share of the step.

    python scripts/profile_cpu.py [STEPS] [--torch-routing] [--network NAME]
                                  [--routing-iterations N] [--batch N]

    python scripts/profile_cpu.py 6
    python scripts/profile_cpu.py 3 --network em-capsnet --routing-iterations 2

``--torch-routing`` routes in torch instead of the C kernels (CAPSNET_ROUTING_KERNEL=off).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch._inductor.config as inductor_config
from torch.profiler import ProfilerActivity, profile

from capsnet.nn.registry import MODELS
from capsnet.tools.bench import bench_config, steps

CPU = torch.device("cpu")
ROWS = 25


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(2)
    inductor_config.cpp.enable_kernel_profile = True
    if args.torch_routing:
        os.environ["CAPSNET_ROUTING_KERNEL"] = "off"  # read as the layers are made
    config = bench_config(args.network, args.routing_iterations)
    step, _ = steps(CPU, "fp32", True, args.network, config, args.batch, args.batch)
    for _ in range(3):  # compile and warm up
        step["train"]()
        step["train_convs"]()
    for name, run in (("model", step["train"]), ("convolutions", step["train_convs"])):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(args.steps):
                run()
        events = prof.key_averages()
        total = sum(event.self_cpu_time_total for event in events)
        per_step = 1000 * args.steps  # profiler times are in microseconds
        print(f"{name}: {total / per_step:.1f} ms a step")
        for event in sorted(events, key=lambda e: -e.self_cpu_time_total)[:ROWS]:
            print(f"  {event.self_cpu_time_total / per_step:7.2f} ms "
                  f"{100 * event.self_cpu_time_total / total:5.1f}%  "
                  f"{event.count // args.steps:3d}x  {event.key[:100]}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("steps", nargs="?", type=int, default=6)
    parser.add_argument("--torch-routing", action="store_true")
    parser.add_argument("--network", default="capsnet", choices=sorted(MODELS))
    parser.add_argument("--routing-iterations", type=int)
    parser.add_argument("--batch", type=int, default=64)
    main(parser.parse_args())
