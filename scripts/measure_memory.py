"""What an image costs in memory on a CPU, measured beside what capsnet counts for it.

For each of two batch sizes, a fresh process takes one training step (or one inference) of
the network and reports its peak resident memory; the growth from the small batch to the
large one, per image, is the activations' cost, printed beside
``capsnet.utils.memory.capsnet_image_bytes`` (which must not be smaller).

    python scripts/measure_memory.py NETWORK [--routing-iterations N] [--batches 16 64]
                                     [--inference]

    python scripts/measure_memory.py em-capsnet --batches 16 32
    python scripts/measure_memory.py em-capsnet-small --routing-iterations 2 --inference \
        --batches 16 272
``CAPSNET_ROUTING_KERNEL=off`` measures routing in torch.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch

from capsnet.nn.registry import MODELS
from capsnet.tools.bench import bench_config, infer_step, train_step
from capsnet.training.trainer import make_optimizer
from capsnet.utils.memory import capsnet_image_bytes

CPU = torch.device("cpu")
MiB = 2 ** 20


def peak_after_one_step(network: str, iterations: int | None, batch: int,
                        inference: bool) -> int:
    """Peak resident bytes of this process after one step at ``batch``."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = MODELS[network].model(bench_config(network, iterations))
    images = torch.rand(batch, 1, 28, 28)
    if inference:
        infer_step(model, images, "fp32")()
    else:
        labels = torch.randint(0, 10, (batch,))
        train_step(model, make_optimizer(model.parameters(), 1e-3, CPU), images, labels,
                   loss=MODELS[network].loss)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("network", choices=MODELS)
    parser.add_argument("--routing-iterations", type=int)
    parser.add_argument("--batches", type=int, nargs=2, default=(16, 64))
    parser.add_argument("--inference", action="store_true")
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a child's batch
    args = parser.parse_args()
    if args.one is not None:
        print(peak_after_one_step(args.network, args.routing_iterations, args.one,
                                  args.inference))
        return
    peaks = []
    for batch in args.batches:
        child = [sys.executable, __file__, *sys.argv[1:], "--one", str(batch)]
        peaks.append(int(subprocess.run(child, check=True, capture_output=True,
                                        text=True).stdout.split()[-1]))
    small, large = args.batches
    measured = (peaks[1] - peaks[0]) / (large - small)
    counted = capsnet_image_bytes(bench_config(args.network, args.routing_iterations),
                                  not args.inference, CPU)
    print(f"{args.network}, {'inference' if args.inference else 'training'}: "
          f"{measured / MiB:.1f} MiB an image measured (batches {small} and {large}), "
          f"{counted / MiB:.1f} counted")


if __name__ == "__main__":
    main()
