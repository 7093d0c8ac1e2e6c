"""The plan of scripts/reproduce_gpu.sh: every GPU figure of docs/RESULTS.md and
docs/PERFORMANCE.md from one CUDA GPU within a time budget. Each run is recorded as the GPU
campaign records its runs (scripts/campaign_tools.py): OUT/NAME/ holds the run folder,
log.txt and campaign.json, so that ``campaign_tools.py home`` and ``results_tables.py``
take them.

    python scripts/reproduce_gpu.py --budget 90m --out OUT [--data-dir DIR]
    python scripts/reproduce_gpu.py --budget 10m --out OUT --tiny DATA     (CPU, tiny)

The budget is split as the top of scripts/reproduce_gpu.sh says: the benches alone, each
within BENCH_SECONDS; three waves of six MNIST, Fashion-MNIST and affine runs within
MNIST_SHARE of the time then left (each wave gets that share's rest over the waves left); the
other routings (six runs) with half of what is then left; MultiMNIST with all the rest. Every --time-limit leaves OVERHEAD seconds for the run's
start-up and test; a run still going at the budget's end is stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import campaign_tools as tools

REPO = Path(__file__).resolve().parent.parent
CAPSNET = [sys.executable, "-m", "capsnet.cli"]
MNIST_SHARE = 0.6  # of the time left after the benches; MultiMNIST gets the rest
# The paper trains CapsNet and the CNN to about 99.2% on translated MNIST before the affine
# test: both models stop after the first epoch whose validation accuracy reaches it.
AFFINE_STOP_AT = "0.992"
UNITS = {"s": 1, "m": 60, "h": 3600}
# PERFORMANCE.md's GPU benches: their names and speed settings.
BENCH_KINDS = {"eager": ("--precision", "fp32"), "compiled": ("--precision", "bf16", "--compile"),
               "graphs": ("--precision", "bf16", "--cuda-graphs")}


@dataclass(frozen=True)
class Mode:
    """Where the runs go and how big they are: on the GPU as the records ran, or tiny on the
    CPU, every step the same (tests/test_reproduce.py)."""

    plan: str
    device: str
    fast: tuple[str, ...]  # every training run's speed settings
    size: tuple[str, ...]  # after each recipe, so they win
    experiment_size: tuple[str, ...]
    bench_batches: tuple[int, ...]
    bench_kinds: dict[str, tuple[str, ...]]  # each bench's name and speed settings
    bench_flags: tuple[str, ...]
    bench_seconds: float  # BENCH_SECONDS: a bench is stopped after it
    overhead: float  # OVERHEAD: a run's start-up and test, outside its --time-limit
    threads: int  # OpenMP threads a process: six share the machine


GPU = Mode(plan="reproduce", device="cuda", fast=("--precision", "bf16", "--compile", "on"),
           size=(), experiment_size=(), bench_batches=(128, 512), bench_kinds=BENCH_KINDS,
           bench_flags=("--infer-batch", "1024", "--warmup", "5", "--repeats", "20"),
           bench_seconds=120, overhead=60, threads=2)
TINY = Mode(plan="reproduce-tiny", device="cpu", fast=("--compile", "off"),
            size=("--epochs", "1", "--train-limit", "32", "--val-size", "20", "--batch-size",
                  "16", "--eval-batch-size", "20"),
            experiment_size=("--test-limit", "10", "--figures", "1"), bench_batches=(8,),
            # every bench runs, eager in fp32: compiling bf16 on a CPU takes minutes
            bench_kinds={kind: ("--precision", "fp32") for kind in BENCH_KINDS},
            bench_flags=("--infer-batch", "16", "--warmup", "1", "--repeats", "2"),
            bench_seconds=120, overhead=5, threads=1)


@dataclass(frozen=True)
class Run:
    name: str
    verb: tuple[str, ...]  # ("train",) or ("experiment", NAME)
    recipe: tuple[str, ...]
    dataset: str = "mnist"

    @property
    def models(self) -> int:
        """Models trained one after the other, each within its share of the time limit."""
        return 2 if self.verb == ("experiment", "affnist") else 1


def seeds(prefix: str, recipe: tuple[str, ...], count: int) -> list[Run]:
    return [Run(f"{prefix}-s{s}", ("train",), (*recipe, "--seed", str(s))) for s in range(count)]


PAPER = ("--preset", "paper")
DECAY = (*PAPER, "--epochs", "36", "--lr-decay", "0.9", "--lr-decay-steps", "430")
# The training runs of RESULTS.md, six at a time: one process rarely fills the GPU.
WAVES = [
    seeds("mnist-paper", PAPER, 3) + seeds("mnist-paper-decay", DECAY, 3),
    seeds("mnist-seed", ("--preset", "seed"), 5)
    + [Run("mnist-seed-e20-s0", ("train",), ("--preset", "seed", "--epochs", "20"))],
    [Run("fashion-paper-s0", ("train",), PAPER, "fashion-mnist"),
     Run("fashion-paper-decay-s0", ("train",), DECAY, "fashion-mnist"),
     Run("mnist-paper-fp32-s0", ("train",), (*PAPER, "--precision", "fp32")),
     Run("mnist-paper-torchinit-s0", ("train",),
         (*PAPER, "--init", "torch", "--primary-style", "notebook", "--no-routing-bias")),
     Run("mnist-paper-officialmargin-s0", ("train",), (*PAPER, "--margin-loss", "official")),
     Run("affnist-s0", ("experiment", "affnist"), ("--seed", "0", "--stop-at", AFFINE_STOP_AT))],
]
# The other routings of docs/RESULTS.md's comparison, each with its own preset.
ROUTINGS = [Run(f"{name}-{data}-s0", ("train",), recipe, dataset)
            for name, recipe in (("efficient", ("--preset", "efficient")),
                                 ("em", ("--preset", "em")),
                                 ("em-small", ("--preset", "em", "--network", "em-capsnet-small")))
            for data, dataset in (("mnist", "mnist"), ("fashion", "fashion-mnist"))]
MULTIMNIST = Run("multimnist-s0", ("experiment", "multimnist"), ("--seed", "0", "--epochs", "100"))


def benches(mode: Mode, data_dir: list[str]) -> list[tuple[str, list[str]]]:
    """(name, capsnet bench flags) of PERFORMANCE.md's GPU table; ``data_dir``: MNIST's
    --data-dir flags, for the timed epoch."""
    found = [(f"bench-{kind}-b{batch}", [*flags, "--train-batch", str(batch)])
             for batch in mode.bench_batches for kind, flags in mode.bench_kinds.items()]
    if mode is GPU:  # one timed epoch of the paper preset: it needs MNIST itself
        found.append(("bench-epoch-b128", [*BENCH_KINDS["compiled"], "--train-batch", "128",
                                           "--epoch", *data_dir]))
    return found


class Plan:
    """The runs of one call, against the clock of its budget."""

    def __init__(self, mode: Mode, out: Path, deadline: float, data: dict[str, list[str]]
                 ) -> None:
        self.mode, self.out, self.data, self.deadline = mode, out, data, deadline

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def record(self, name: str, together: list[str], command: list[str],
               json_summary: bool = False, at_most: float | None = None) -> None:
        """One run through campaign_tools.run, stopped at the budget's end at the latest."""
        timeout = min(self.left(), at_most or self.left())
        if timeout < 5:
            self.skip(name, "the budget is spent")
            return
        tools.run(self.out, name, self.mode.plan, timeout, together, json_summary, None, command)

    def skip(self, name: str, why: str) -> None:
        with open(self.out / "campaign.log", "a") as log:
            log.write(f"{name}: SKIPPED: {why}\n")
        tools.say(f"{name}: SKIPPED: {why}")

    def command(self, run: Run, limit: float) -> list[str]:
        mode = self.mode
        per_model = max((limit - mode.overhead) / run.models, 1)
        return [*CAPSNET, *run.verb, "--run-dir", str(self.out / run.name), "--no-progress",
                "--device", mode.device, *mode.fast, "--time-limit", f"{per_model:.0f}",
                *run.recipe, *mode.size, *(mode.experiment_size if run.verb[0] == "experiment"
                                           else ()), *self.data[run.dataset]]

    def together(self, runs: list[Run], limit: float) -> None:
        """``runs`` at the same time, each with ``limit`` seconds in all."""
        for run in runs:
            if run.dataset not in self.data:
                self.skip(run.name, f"{run.dataset} is not available")
        runs = [r for r in runs if r.dataset in self.data]
        names = [r.name for r in runs]
        with ThreadPoolExecutor(max_workers=max(len(runs), 1)) as pool:
            list(pool.map(lambda r: self.record(r.name, names, self.command(r, limit)), runs))

    def benches(self) -> None:
        """One at a time: each alone on the GPU."""
        for name, flags in benches(self.mode, self.data["mnist"][2:]):  # its --data-dir
            self.record(name, [name], [*CAPSNET, "bench", "--device", self.mode.device, "--json",
                                       *self.mode.bench_flags, *flags],
                        json_summary=True, at_most=self.mode.bench_seconds)

    def training(self) -> None:
        """The waves within their share, then the other routings and MultiMNIST, each with
        half of what is left."""
        share_end = time.monotonic() + MNIST_SHARE * self.left()
        for index, wave in enumerate(WAVES):
            self.together(wave, (share_end - time.monotonic()) / (len(WAVES) - index))
        self.together(ROUTINGS, self.left() / 2)
        self.together([MULTIMNIST], self.left())


def data_flags(tiny: Path | None, data_dir: Path | None, out: Path) -> dict[str, list[str]]:
    """Each data set's capsnet flags, checked (downloaded and verified when need be) before
    any run; a data set that cannot be had is left out, and its runs are skipped."""
    if tiny is not None:
        return {name: ["--dataset", str(tiny)] for name in ("mnist", "fashion-mnist")}
    found = {}
    for name in ("mnist", "fashion-mnist"):
        flags = ["--dataset", name] + (["--data-dir", str(data_dir / name)] if data_dir else [])
        with open(out / "data.log", "a") as log:
            fetched = subprocess.run([*CAPSNET, "data", *flags[1:]], stdout=log, stderr=log)
        if fetched.returncode == 0:
            found[name] = flags
        else:
            tools.say(f"{name}: not available (see {out / 'data.log'}); its runs are skipped")
    return found


def card_tag(out: Path) -> str:
    """A short name of the card for the records' folders: h100, h200, a100; else gpu."""
    facts = json.loads((out / "machine.json").read_text())
    found = re.search(r"\b([A-Z]{1,2}\d{2,4})\b", " ".join(facts["gpus"][:1]))
    return found.group(1).lower() if found else "gpu" if facts["gpus"] else "cpu"


def closing_words(out: Path) -> int:
    """Print the runs' outcomes and how to make the tables from them; 0 when all finished."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/campaign.json"))]
    failed = [r for r in records if r["status"] != "ok"]
    log = (out / "campaign.log").read_text() if (out / "campaign.log").is_file() else ""
    tag = card_tag(out)
    print(f"\nruns ({out / 'campaign.log'}):\n{log}{len(records) - len(failed)} of "
          f"{len(records)} runs finished. To see them in the tables of docs/RESULTS.md and "
          f"docs/PERFORMANCE.md, copy the finished ones to docs/runs/NAME-{tag}/ and regenerate "
          f"the tables from docs/runs/ (--docs DIR: a copy of docs/ instead):\n"
          f"  python scripts/campaign_tools.py home {out} --tag {tag}\n"
          f"  python scripts/results_tables.py")
    return 1 if failed else 0


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"reproduce_gpu: {message}\n")


def budget_seconds(text: str) -> float:
    """``90m``, ``1.5h``, ``5400s`` or ``5400``, in seconds."""
    found = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not found or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"expected a duration such as 90m, 1.5h or 5400s, "
                                         f"got {text!r}")
    return float(found.group(1)) * UNITS[found.group(2) or "s"]


def folder(text: str) -> Path:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text} is not a folder")
    return Path(text)


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="reproduce_gpu.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=budget_seconds, required=True,
                        help="time for everything, e.g. 90m or 2h (at least 45m for full runs)")
    parser.add_argument("--out", type=Path, required=True, help="a new folder for the records")
    parser.add_argument("--data-dir", type=folder, help="a folder holding mnist/ and "
                        "fashion-mnist/ IDX files (as scripts/gpu_campaign.sh bundle writes); "
                        "default: capsnet's own sources, downloaded and verified")
    parser.add_argument("--tiny", type=folder, metavar="DATA", help="every step on the CPU "
                        "with tiny settings, on the IDX files in DATA (tests/test_reproduce.py)")
    args = parser.parse_args(argv)
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        parser.error(f"--out {args.out} already holds files; name a new folder (nothing is "
                     f"overwritten)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    mode = TINY if args.tiny else GPU
    began = time.monotonic()
    # capsnet from this checkout, with no install; six processes share the CPU cores.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"),
                                                             os.environ.get("PYTHONPATH")]))
    os.environ["OMP_NUM_THREADS"] = str(mode.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    if tools.machine(args.out, need_cuda=mode is GPU):
        return 1
    plan = Plan(mode, args.out, began + args.budget, data_flags(args.tiny, args.data_dir, args.out))
    if "mnist" not in plan.data:
        print("MNIST is not available: nothing to run", file=sys.stderr)
        return 1
    plan.benches()
    plan.training()
    print(f"done in {(time.monotonic() - began) / 60:.1f} min")
    return closing_words(args.out)


if __name__ == "__main__":
    sys.exit(main())
