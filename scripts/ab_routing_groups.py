"""Routing in groups on a CPU against the whole batch, in one process: the same model twice
(the same weights), stepped in turns with its two convolutions alone; prints each form's
ratio to the convolutions for training (batch 64) and inference (batch 256).

    python scripts/ab_routing_groups.py TURNS COMPILE MIN GROUPS
    python scripts/ab_routing_groups.py 25 1 8 16     # what capsnet.nn.layers does
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

import capsnet.nn.layers as layers
from capsnet.nn.losses import capsule_loss
from capsnet.nn.model import CapsNet, CapsNetConfig


def main(turns: int, compiled: bool, smallest: int, groups: int) -> None:
    torch.set_num_threads(2)
    forms = {"whole": (10**9, 1), "groups": (smallest, groups)}
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    test_images = torch.rand(256, 1, 28, 28)
    models = {}
    for name in forms:
        torch.manual_seed(0)
        model = CapsNet(CapsNetConfig(routing_iterations=3))
        if compiled:
            model.compile()
        models[name] = model, torch.optim.Adam(model.parameters(), lr=1e-3)
    base = models["whole"][0]
    convs = torch.nn.Sequential(base.conv1, torch.nn.ReLU(), base.primary.conv, torch.nn.ReLU())
    convs_adam = torch.optim.Adam(convs.parameters(), lr=1e-3)

    def train(model: CapsNet, adam: torch.optim.Optimizer) -> None:
        out = model(images, labels)
        loss, _, _ = capsule_loss(out.lengths, out.reconstructions, images, labels)
        adam.zero_grad()
        loss.backward()
        adam.step()

    def train_convs() -> None:
        loss = convs(images).square().mean()
        convs_adam.zero_grad()
        loss.backward()
        convs_adam.step()

    def infer(model: CapsNet, _: torch.optim.Optimizer) -> None:
        with torch.inference_mode():
            model(test_images)

    def infer_convs() -> None:
        with torch.inference_mode():
            convs(test_images)

    def timed(step, *args) -> float:
        began = time.perf_counter()
        step(*args)
        return time.perf_counter() - began

    for kind, step, floor in (("training", train, train_convs), ("inference", infer, infer_convs)):
        times: dict[str, list[float]] = {name: [] for name in forms}
        floor_times = []
        for turn in range(turns + 2):  # the first two turns warm up (and compile)
            for name, (model, adam) in models.items():
                layers.CPU_ROUTING_MIN, layers.CPU_ROUTING_GROUPS = forms[name]
                seconds = timed(step, model, adam)
                if turn >= 2:
                    times[name].append(seconds)
            if turn >= 2:
                floor_times.append(timed(floor))
        floor_median = statistics.median(floor_times)
        print(kind, "compiled" if compiled else "eager", ", ".join(
            f"{name}: {floor_median / statistics.median(t):.3f}" for name, t in times.items()))


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2] == "1", int(sys.argv[3]), int(sys.argv[4]))
