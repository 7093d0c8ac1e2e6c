"""Forms of the model's training and inference steps, compared in one process.

Each form is the model as capsnet runs it (compiled, fused Adam, fused routing where the
device has it) but for the changes its name lists. The forms are stepped in turns with the
model's two convolutions alone (with backward and Adam, in the form's precision), so that a
busy machine slows all alike; each form's ratio to the convolutions is printed.

    python scripts/ab.py [--device cpu|cuda] [--network NAME] [--train-batch N]
                         [--infer-batch N] TURNS FORM...

FORM is ``default`` or changes joined by ``+``:
    eager          not compiled
    graphs         compiled in torch's reduce-overhead mode (CUDA graphs; GPU only)
    bf16           bfloat16 autocast (the convolutions alone are timed in bf16 too)
    layout         inductor's layout optimization on (torch's default; capsnet turns it off
                   on a CPU)
    plain-adam     Adam one operation per weight at a time (torch's default on a CPU)
    torch-routing  routing in torch, not in the fused operators (the model is made with
                   CAPSNET_ROUTING_KERNEL=off)
    groups=M/G     on a CPU, route in torch in at most G groups of at least M examples
                   (capsnet's: 8/16; 1000000/1 routes the whole batch at once)

    python scripts/ab.py 25 default layout plain-adam layout+plain-adam
    python scripts/ab.py --device cuda --train-batch 128 --infer-batch 1024 50 \
        default torch-routing graphs graphs+torch-routing
    python scripts/ab.py --network em-capsnet-small --train-batch 16 --infer-batch 64 5 \
        eager eager+torch-routing default
Defaults: the network `capsnet` (any name of capsnet.nn.registry.MODELS, with 3 routing
iterations where it iterates), batch 64 and 256 on a CPU (2 threads), 128 and 1024 on a GPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
from typing import Callable

import torch

import capsnet.nn.layers as layers
from capsnet.nn.registry import MODELS
from capsnet.nn.routing_kernel import SWITCH
from capsnet.tools.bench import bench_config, timed, train_step
from capsnet.training.trainer import make_optimizer
from capsnet.utils.device import autocast, compile_options

CHANGES = {"eager", "graphs", "bf16", "layout", "plain-adam", "torch-routing"}


class Form:
    """The model, its optimizer, precision and routing groups, as FORM's changes make them."""

    def __init__(self, name: str, device: torch.device, network: str) -> None:
        changes = set() if name == "default" else set(name.split("+"))
        groups = next((c for c in changes if c.startswith("groups=")), "groups=8/16")
        smallest, most = groups.removeprefix("groups=").split("/")
        self.groups = int(smallest), int(most)
        unknown = changes - CHANGES - {groups}
        if unknown:
            raise SystemExit(f"unknown change(s) {', '.join(sorted(unknown))} in form {name!r}")
        self.device = device
        self.precision = "bf16" if "bf16" in changes else "fp32"
        os.environ[SWITCH] = "off" if "torch-routing" in changes else "on"  # read by layers
        torch.manual_seed(0)
        self.model = build(network, device)
        if "eager" not in changes:
            options = compile_options(device, cuda_graphs="graphs" in changes)
            if "layout" in changes:
                options["layout_optimization"] = True
            self.model.compile(options=options)
        parameters = self.model.parameters()
        self.adam = (torch.optim.Adam(parameters, lr=1e-3, foreach=False)
                     if "plain-adam" in changes else make_optimizer(parameters, 1e-3, device))

    def run(self, step: Callable[["Form"], None]) -> float:
        layers.CPU_ROUTING_MIN, layers.CPU_ROUTING_GROUPS = self.groups
        return timed(lambda: step(self), self.device)


def build(network: str, device: torch.device) -> torch.nn.Module:
    return MODELS[network].model(bench_config(network, None)).to(device)


def main(device: torch.device, network: str, train_batch: int, infer_batch: int, turns: int,
         names: list[str]) -> None:
    if device.type == "cpu":
        torch.set_num_threads(2)
    images = torch.rand(train_batch, 1, 28, 28, device=device)
    labels = torch.randint(0, 10, (train_batch,), device=device)
    test_images = torch.rand(infer_batch, 1, 28, 28, device=device)
    forms = {name: Form(name, device, network) for name in names}
    os.environ[SWITCH] = "on"
    torch.manual_seed(0)
    convs = build(network, device).convolutions()
    convs_adam = make_optimizer(convs.parameters(), 1e-3, device)

    def train(form: Form) -> None:
        train_step(form.model, form.adam, images, labels, form.precision, MODELS[network].loss)

    def train_convs(precision: str) -> None:
        train_step(convs, convs_adam, images, None, precision)

    def infer(model: torch.nn.Module, precision: str) -> None:
        with torch.inference_mode(), autocast(device, precision):
            model(test_images)

    for kind, step, floor in (
            ("training", train, train_convs),
            ("inference", lambda form: infer(form.model, form.precision),
             lambda precision: infer(convs, precision))):
        times: dict[str, list[float]] = {name: [] for name in forms}
        floor_times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for turn in range(turns + 2):  # the first two turns warm up (and compile)
            for name, form in forms.items():
                seconds = form.run(step)
                if turn >= 2:
                    times[name].append(seconds)
            for precision in {form.precision for form in forms.values()}:
                seconds = timed(lambda: floor(precision), device)
                if turn >= 2:
                    floor_times[precision].append(seconds)
        print(f"{kind}: " + ", ".join(
            f"{name} {statistics.median(floor_times[form.precision]) / statistics.median(times[name]):.3f}"
            for name, form in forms.items()), flush=True)


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--network", choices=sorted(MODELS), default="capsnet")
    parser.add_argument("--train-batch", type=int)
    parser.add_argument("--infer-batch", type=int)
    parser.add_argument("turns", type=int)
    parser.add_argument("forms", nargs="+")
    args = parser.parse_args()
    gpu = args.device == "cuda"
    args.train_batch = args.train_batch or (128 if gpu else 64)
    args.infer_batch = args.infer_batch or (1024 if gpu else 256)
    return args


if __name__ == "__main__":
    options = parse()
    main(torch.device(options.device), options.network, options.train_batch,
         options.infer_batch, options.turns, options.forms)
