"""Forms of the model's training and inference steps on a CPU, compared in one process.

Each form is the model as capsnet runs it on a CPU (compiled, fused Adam, routing in groups)
but for the changes its name lists. The forms are stepped in turns with the model's two
convolutions alone (with backward and Adam), so that a busy machine slows all alike; each
form's ratio to the convolutions is printed, training at batch 64 and inference at 256.

    python scripts/ab_cpu.py TURNS FORM [FORM ...]

FORM is ``default`` or changes joined by ``+``:
    eager        not compiled
    layout       inductor's layout optimization on (torch's default)
    plain-adam   Adam one operation per weight at a time (torch's default on a CPU)
    torch-routing  routing in torch, not in the C kernel (CAPSNET_ROUTING_KERNEL=off)
    groups=M/G   route in torch in at most G groups of at least M examples (capsnet's:
                 8/16; 1000000/1 routes the whole batch at once)

    python scripts/ab_cpu.py 25 default layout plain-adam layout+plain-adam
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable

import torch

import capsnet.nn.layers as layers
from capsnet.nn.model import CapsNet, CapsNetConfig
from capsnet.tools.bench import convolutions, timed, train_step
from capsnet.training.trainer import make_optimizer
from capsnet.utils.device import compile_options

CPU = torch.device("cpu")


class Form:
    """The model, its optimizer and its routing groups, as FORM's changes make them."""

    def __init__(self, name: str) -> None:
        changes = set() if name == "default" else set(name.split("+"))
        groups = next((c for c in changes if c.startswith("groups=")), "groups=8/16")
        smallest, most = groups.removeprefix("groups=").split("/")
        self.groups = int(smallest), int(most)
        unknown = changes - {"eager", "layout", "plain-adam", "torch-routing", groups}
        if unknown:
            raise SystemExit(f"unknown change(s) {', '.join(sorted(unknown))} in form {name!r}")
        torch.manual_seed(0)
        self.model = CapsNet(CapsNetConfig(routing_iterations=3))
        self.model.digits.fused = "torch-routing" not in changes
        if "eager" not in changes:
            options = compile_options(CPU)
            options["layout_optimization"] = "layout" in changes
            self.model.compile(options=options)
        parameters = self.model.parameters()
        self.adam = (torch.optim.Adam(parameters, lr=1e-3, foreach=False)
                     if "plain-adam" in changes else make_optimizer(parameters, 1e-3, CPU))

    def run(self, step: Callable[[CapsNet, torch.optim.Optimizer], None]) -> float:
        layers.CPU_ROUTING_MIN, layers.CPU_ROUTING_GROUPS = self.groups
        return timed(lambda: step(self.model, self.adam), CPU)


def main(turns: int, names: list[str]) -> None:
    torch.set_num_threads(2)
    images, labels = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    test_images = torch.rand(256, 1, 28, 28)
    forms = {name: Form(name) for name in names}
    torch.manual_seed(0)
    convs = convolutions(CapsNet(CapsNetConfig(routing_iterations=3)))
    convs_adam = make_optimizer(convs.parameters(), 1e-3, CPU)

    def train(model: CapsNet, adam: torch.optim.Optimizer) -> None:
        train_step(model, adam, images, labels)

    def train_convs() -> None:
        train_step(convs, convs_adam, images, None)

    def infer(model: torch.nn.Module, *_: object) -> None:
        with torch.inference_mode():
            model(test_images)

    for kind, step, floor in (("training", train, train_convs), ("inference", infer,
                                                                  lambda: infer(convs))):
        times: dict[str, list[float]] = {name: [] for name in forms}
        floor_times = []
        for turn in range(turns + 2):  # the first two turns warm up (and compile)
            for name, form in forms.items():
                seconds = form.run(step)
                if turn >= 2:
                    times[name].append(seconds)
            if turn >= 2:
                floor_times.append(timed(floor, CPU))
        floor_median = statistics.median(floor_times)
        print(f"{kind}: " + ", ".join(f"{name} {floor_median / statistics.median(t):.3f}"
                                      for name, t in times.items()), flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    main(int(sys.argv[1]), sys.argv[2:])
