"""Regenerate the tables of docs/RESULTS.md (and docs/PERFORMANCE.md) from the run records
in docs/runs/.

Each table sits between ``<!-- begin table: NAME -->`` and ``<!-- end table: NAME -->``
and is made from every docs/runs/*/summary.json (with the run's config.json, metrics logs
and campaign.json): never typed by hand. A field a record lacks is shown as "not recorded".

    python scripts/results_tables.py            # rewrite the tables in docs/RESULTS.md
    python scripts/results_tables.py --check    # exit 1 when RESULTS.md differs from them
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable

import torch

from capsnet.data.splits import DEFAULT_VAL_SIZE
from capsnet.nn.model import CapsNetConfig
from capsnet.nn.registry import ARCHITECTURES, MODELS
from capsnet.training.config import TrainConfig, make_config
from capsnet.training.status import duration as spoken_duration
from capsnet.utils.settings import training_fields

DOCS = Path(__file__).resolve().parent.parent / "docs"
MISSING = "not recorded"
BENCH_SIDE = 28  # the images of bench records from before they named their size
# Training settings that only some networks of the registry have (declared in their configs).
NETWORK_FIELDS = {f.name for entry in MODELS.values() if entry.config is not CapsNetConfig
                  for f in training_fields(entry.config)}
DATASET_NAMES = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}


class Run:
    """One record folder: its summary, config, campaign record and metrics logs."""

    def __init__(self, folder: Path) -> None:
        self.name = folder.name
        self.folder = folder
        self.summary = read_json(folder / "summary.json")
        self.config = read_json(folder / "config.json") if (folder / "config.json").is_file() else {}
        campaign = folder / "campaign.json"
        self.campaign = read_json(campaign) if campaign.is_file() else {}

    @property
    def kind(self) -> str:
        if "infer_images_per_s" in self.summary:
            return "bench"
        return "experiments" if "experiment" in self.summary else "training"

    @property
    def train(self) -> dict[str, Any]:
        return self.config.get("train", {})

    def models(self) -> dict[str, dict[str, Any]]:
        """The trained models' summaries: the run's own, or the affine experiment's two."""
        return self.summary.get("models") or {"": self.summary}

    def metrics(self, model: str) -> list[dict[str, Any]] | None:
        path = self.folder / (f"{model}-metrics.jsonl" if model else "metrics.jsonl")
        if not path.is_file():
            return None
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        return [r for r in records if isinstance(r["epoch"], int)]  # not the curve's points


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{path}: cannot read the record ({exc})") from None


# -- cells ------------------------------------------------------------------------------

def percent(value: Any) -> str:
    return MISSING if value is None else f"{value:.2%}"


def count(value: Any) -> str:
    return MISSING if value is None else f"{value:,.0f}"


def ratio(part: Any, whole: Any) -> str:
    return MISSING if part is None or not whole else times(part / whole)


def times(value: float) -> str:
    """``0.86x``; under 0.1 with two significant digits (``0.0017x``), never ``0.00x``."""
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.2g}x"


def duration(seconds: Any) -> str:
    return MISSING if seconds is None else spoken_duration(seconds)


def per_model(run: Run, cell: Callable[[str, dict[str, Any]], str]) -> str:
    """One value, or "capsnet X, cnn Y" for the affine experiment's two models."""
    values = {name: cell(name, summary) for name, summary in run.models().items()}
    if len(set(values.values())) == 1:
        return next(iter(values.values()))
    return ", ".join(f"{name} {value}" for name, value in values.items())


def epochs(run: Run) -> str:
    def cell(_: str, summary: dict[str, Any]) -> str:
        shown = str(summary.get("epochs", MISSING))
        cut = summary.get("cut_short")
        return f"{shown} (cut short: {cut})" if cut else shown
    return per_model(run, cell)


def training_images(run: Run) -> str:
    """Images trained on, from the metrics log: the sum of its epochs' images."""
    def cell(model: str, _: dict[str, Any]) -> str:
        records = run.metrics(model)
        if not records or any("images" not in r and "images_per_s" not in r for r in records):
            return MISSING
        return count(sum(epoch_images(records)))
    return per_model(run, cell)


def epoch_images(records: list[dict[str, Any]]) -> list[int]:
    """Each epoch's training images: its record's ``images``; in records from before they had
    them, its images/s times its seconds, which for an epoch resumed part way count only
    the last part: such an epoch counts as many as the run's epoch of as many steps that
    had most (every epoch of as many steps trains as many images)."""
    if all("images" in r for r in records):
        return [r["images"] for r in records]
    timed = [round(r["images_per_s"] * r["epoch_seconds"]) for r in records]
    if any("step" not in r for r in records):
        return timed
    steps = [r["step"] - before for r, before in
             zip(records, [0] + [r["step"] for r in records[:-1]])]
    most: dict[int, int] = {}
    for n, images in zip(steps, timed):
        most[n] = max(most.get(n, 0), images)
    return [most[n] for n in steps]


def wall_seconds(run: Run) -> float | None:
    """The summary's wall time, or the epochs' training time in the metrics log when that is
    longer (a run resumed by code that counted only the last call's time)."""
    logged = sum(m.get("epoch_seconds", 0) for m in run.metrics("") or [])
    recorded = run.summary.get("wall_seconds")
    return max(recorded, logged) if recorded is not None else None


def hardware(run: Run) -> str:
    device = run.summary.get("device", MISSING)
    alongside = run.campaign.get("alongside")
    return f"{device}, alongside {len(alongside)} other runs" if alongside else device


def date(run: Run) -> str:
    dates = {s.get("date") for s in run.models().values()} | {run.summary.get("date")}
    dates.discard(None)
    return ", ".join(sorted(dates)) or MISSING


def dataset(run: Run) -> str:
    name = run.train.get("dataset") or run.summary.get("dataset")
    return MISSING if name is None else DATASET_NAMES.get(name, f"`{name}`")


def link(run: Run) -> str:
    return f"[runs/{run.name}](runs/{run.name})"


def result(run: Run) -> str:
    s = run.summary
    if s["experiment"] == "multimnist":
        return (f"test error {percent(s.get('test_error'))} on {count(s.get('test_examples'))} "
                f"pairs; both digits among the two longest capsules in "
                f"{percent(s.get('test_classes_found'))}")
    if s["experiment"] == "affnist":
        shown = {"capsnet": "CapsNet", "cnn": "CNN"}
        return "; ".join(f"{shown.get(name, name)} {percent(m.get('translated_test_accuracy'))} "
                         f"translated, {percent(m.get('affine_test_accuracy'))} affine"
                         for name, m in s["models"].items())
    return MISSING


# -- tables -----------------------------------------------------------------------------

def markdown(header: list[str], rows: list[list[str]], empty: str) -> str:
    if not rows:
        return empty
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def changed(run: Run) -> dict[str, Any]:
    """The recipe settings in which the run differs from its preset as the preset is today
    (fields added since the run was recorded take their defaults, as the run then had), but
    those that do not apply to the run (see :func:`effective`)."""
    preset = run.train.get("preset")
    if preset is None:
        return {}
    recorded = effective(TrainConfig.from_dict(run.train).to_dict())
    return {k: recorded[k] for k, v in effective(make_config(preset).to_dict()).items()
            if k not in HOW and recorded[k] is not None and recorded[k] != v}


def effective(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with ``val_size`` 0 (the data set's default) as the number it stands for
    on the named data sets every record trained on, ``ema_warmup`` only where there is an
    average to warm up, and another network's fields (``beta_a_units``) only on it."""
    declared = {f.name for f in fields(MODELS[settings["network"]].config)}
    return {**settings, "val_size": settings["val_size"] or DEFAULT_VAL_SIZE,
            "ema_warmup": settings["ema_warmup"] if settings["ema_decay"] else None,
            **{name: None for name in NETWORK_FIELDS - declared}}


def recipe_name(run: Run) -> str:
    """The preset and what the run changed of it, e.g. ``paper, epochs 36, lr_decay 0.9``."""
    parts = [run.train.get("preset", MISSING)]
    parts += [f"{k} {v}" for k, v in changed(run).items()]
    if run.config.get("init_from"):
        parts.append(f"continued from {started_from(run)}")
    return ", ".join(map(str, parts))


def started_from(run: Run) -> str:
    """The record of the run whose checkpoint ``run`` started from (``--init-from``: its
    best.pt or last.pt), as a link, or "a trained checkpoint" when no record beside it is of
    the run folder that checkpoint is in."""
    init_from = Path(run.config["init_from"])
    for folder in sorted(run.folder.parent.iterdir()):
        summary = folder / "summary.json"
        if folder != run.folder and summary.is_file():
            checkpoint = read_json(summary).get("checkpoint")
            if checkpoint is not None and Path(checkpoint).parent == init_from.parent:
                return link(Run(folder))
    return "a trained checkpoint"


def training_table(runs: list[Run]) -> str:
    header = ["data set", "recipe", "epochs", "training images", "wall time", "hardware",
              "test accuracy", "seed", "date", "run"]
    rows = [[dataset(r), recipe_name(r), epochs(r), training_images(r),
             duration(wall_seconds(r)), hardware(r),
             percent(r.summary.get("test_accuracy")), str(r.train.get("seed", MISSING)),
             date(r), link(r)] for r in runs]
    return markdown(header, rows, "No training runs recorded yet.") + seed_means(runs)


RUN_ONLY = {"seed", "time_limit", "device"}  # settings that do not make another recipe
# ... nor do where and how fast it ran: only what it learned from counts
HOW = RUN_ONLY | {"dataset", "precision", "compile", "eval_batch_size", "deterministic",
                  "cuda_graphs", "log_every", "stop_at"}


def recipe(run: Run) -> str:
    """What the run learned from: its settings but the seed and where, how fast and how long
    it ran, and the checkpoint it started from."""
    settings = effective(TrainConfig.from_dict(run.train).to_dict()) if run.train else {}
    return json.dumps({**{k: v for k, v in settings.items() if k not in HOW},
                       "init_from": run.config.get("init_from")}, sort_keys=True)


def full_runs_by_recipe(runs: list[Run]) -> dict[tuple[str, str, str], list[Run]]:
    """Runs that trained all their epochs, grouped by data set, hardware and recipe."""
    groups: dict[tuple[str, str, str], list[Run]] = {}
    for r in runs:
        if r.summary.get("test_accuracy") is not None and not r.summary.get("cut_short"):
            groups.setdefault((dataset(r), r.summary.get("device", MISSING), recipe(r)),
                              []).append(r)
    return groups


def seed_means(runs: list[Run]) -> str:
    """A line for each recipe trained in full with several seeds on the same hardware: the
    mean test accuracy over them."""
    lines = []
    for (data, device, _), group in full_runs_by_recipe(runs).items():
        seeds = sorted({r.train.get("seed") for r in group}, key=str)
        if len(seeds) > 1:
            mean = sum(r.summary["test_accuracy"] for r in group) / len(group)
            lines.append(f"\n\nMean test accuracy of {data}, {recipe_name(group[0])}, "
                         f"on {device}, over {len(group)} runs (seeds "
                         f"{', '.join(map(str, seeds))}): {percent(mean)} "
                         f"({', '.join(link(r) for r in group)}).")
    return "".join(lines)


def experiments_table(runs: list[Run]) -> str:
    header = ["experiment", "data set", "epochs", "training images", "wall time", "hardware",
              "result", "seed", "date", "run"]
    rows = [[r.summary["experiment"], dataset(r), epochs(r), training_images(r),
             duration(r.summary.get("wall_seconds")), hardware(r), result(r),
             str(r.train.get("seed", MISSING)), date(r), link(r)] for r in runs]
    return markdown(header, rows, "No experiment runs recorded yet.")


def bench_table(runs: list[Run]) -> str:
    header = ["network", "images", "hardware", "precision", "compiled", "routing", "training batch",
              "training images/s", "convolutions alone, training images/s", "ratio",
              "inference batch", "inference images/s", "convolutions alone, inference images/s",
              "ratio", "peak memory (MB)", "date", "run"]
    rows = []
    for r in runs:
        s = r.summary
        side = s.get("image_size", BENCH_SIDE)
        rows.append([f"`{bench_network(r)}`", f"{side}×{side}", hardware(r),
                     s.get("precision", MISSING),
                     "yes, CUDA graphs" if s.get("cuda_graphs") else
                     "yes" if s.get("compile") else "no",
                     # records from before the CPU kernel have no "routing": torch routed
                     s.get("routing", "torch"), count(s.get("train_batch")),
                     count(s.get("train_images_per_s")), count(s.get("convs_train_images_per_s")),
                     ratio(s.get("train_images_per_s"), s.get("convs_train_images_per_s")),
                     count(s.get("infer_batch")), count(s.get("infer_images_per_s")),
                     count(s.get("convs_infer_images_per_s")),
                     ratio(s.get("infer_images_per_s"), s.get("convs_infer_images_per_s")),
                     count(s.get("peak_memory_mb")), s.get("date", MISSING), link(r)])
    return markdown(header, rows, "No `capsnet bench` records yet.")


def bench_network(run: Run) -> str:
    return run.summary.get("network", "capsnet")  # records from before --network: capsnet


def hardware_model(device: str | None) -> str | None:
    """The CPU or GPU model a device string names, without the CPU's thread count:
    ``AMD EPYC`` for both ``cpu (AMD EPYC, 2 threads)`` (bench records, newer training
    runs) and ``AMD EPYC (2 threads)``, ``AMD EPYC, AVX2`` for ``cpu (AMD EPYC, AVX2, 2
    threads)`` (records that name the vector instructions); None for ``cpu (2 threads)``,
    which names none."""
    if device is None:
        return None
    name = re.sub(r"^cpu \((.*)\)$", r"\1", device)
    name = re.sub(r"(^|, | \()\d+ threads\)?$", "", name)
    return name or None


def convolutions_ratio(name: str, run: Run, benches: list[Run]) -> str:
    """The training rate over its convolutions' in the newest bench records of network
    ``name`` on the hardware of training ``run``, in the run's precision, compile mode and
    CUDA graphs where it names them, with its routing iterations where the network iterates
    and the same routing kernel (by its source's hash; records from before they kept it
    match each other) on images of the same size: one ratio, or the range of several of
    that date."""
    model = hardware_model(run.summary.get("device"))
    iterations = run.train.get("routing_iterations")
    side = run.config.get("model", {}).get("image_size", BENCH_SIDE)
    # records from before a setting existed ran without it: no CUDA graphs
    settings = {"precision": run.summary.get("precision") or run.train.get("precision"),
                "compile": run.summary.get("compiled"),
                "cuda_graphs": bool(run.train.get("cuda_graphs"))}
    found = [s for s in (r.summary for r in benches if bench_network(r) == name)
             if model and hardware_model(s.get("device")) == model
             and all(value is None or (bool(s.get(key)) if key == "cuda_graphs"
                                       else s.get(key)) == value
                     for key, value in settings.items())
             and s.get("routing_iterations") in (None, iterations)  # None: routes once
             and s.get("kernel") == run.summary.get("kernel")
             and s.get("image_size", BENCH_SIDE) == side
             and s.get("train_images_per_s") and s.get("convs_train_images_per_s")]
    newest = max((s.get("date", "") for s in found), default=None)
    ratios = sorted(s["train_images_per_s"] / s["convs_train_images_per_s"]
                    for s in found if s.get("date", "") == newest)
    if not ratios:
        return "not measured"
    low, high = times(ratios[0]), times(ratios[-1])
    return low if low == high else f"{low} to {high}"


TUNED = {"epochs", "lr_decay", "lr_decay_steps"}  # issue 16: tune these within the recipe
# Issue 28: each routing's preset against its paper's MNIST result; an EM run may take the
# small network, and its schedule and a weight average may be tuned to a CPU's budget.
ROUTING_TARGETS = (("efficient", 0.997, "99.74%, a mean over runs", frozenset(), ""),
                   ("em", 0.995, "99.56%, the Figure 1 network",
                    frozenset({"network", "ema_decay", "ema_warmup", *TUNED}),
                    " (network, epochs, decay and weight average tuned)"))


def as_preset(run: Run, preset: str, data: str, tuned: frozenset[str] = frozenset()) -> bool:
    """A run of ``preset`` on ``data`` from fresh weights that trained all its epochs with
    every setting of the recipe as the preset gives it today, but the ``tuned`` ones (seed,
    device, speed and time may always differ)."""
    return (run.train.get("preset") == preset and run.train.get("dataset") == data
            and not run.summary.get("cut_short") and not run.config.get("init_from")
            and set(changed(run)) <= tuned)


def best_mean(runs: list[Run]) -> tuple[float, list[Run]] | None:
    """The highest mean test accuracy of one recipe over three or more seeds."""
    groups = [g for g in full_runs_by_recipe(runs).values()
              if len({r.train.get("seed") for r in g}) >= 3]
    means = [(sum(r.summary["test_accuracy"] for r in g) / len(g), g) for g in groups]
    return max(means, key=lambda m: m[0]) if means else None


def best(runs: list[Run], value: Callable[[Run], float | None]) -> tuple[float, list[Run]] | None:
    found = [(value(r), r) for r in runs if value(r) is not None]
    return (max(v for v, _ in found), [r for _, r in found]) if found else None


def targets_table(runs: list[Run]) -> str:
    """Issue 16's targets against the records that measure them."""
    training = [r for r in runs if r.kind == "training"]
    fast = [r for r in runs if r.kind == "bench" and r.summary.get("device", "").startswith("NVIDIA")
            and r.summary.get("compile") and r.summary.get("train_batch") == 128]
    rows = []

    def add(target: str, wanted: float, unit: str, runs_used: list[Run], measured: float | None,
            higher: bool = True) -> None:
        shown = (MISSING if measured is None else percent(measured) if unit == "%" else
                 f"{count(measured)} {unit}" if unit == "images/s" else f"{measured:.1f} {unit}")
        met = (MISSING if measured is None else
               "yes" if (measured >= wanted if higher else measured <= wanted) else "no")
        rows.append([target, shown, met, ", ".join(link(r) for r in runs_used) or MISSING])

    paper = [r for r in training if as_preset(r, "paper", "mnist", TUNED)]
    accuracy = lambda r: r.summary.get("test_accuracy")
    top = best(paper, accuracy)
    add("paper preset (epochs and decay tuned), MNIST, one run >= 99.70%", 0.997, "%",
        top[1] if top else [], top[0] if top else None)
    mean = best_mean(paper)
    add("paper preset (epochs and decay tuned), MNIST, best mean of 3 seeds (the paper: "
        "99.75%)", 0.9975, "%", mean[1] if mean else [], mean[0] if mean else None)
    seed = [r for r in training if as_preset(r, "seed", "mnist")]
    top = best(seed, accuracy)
    add("seed preset, MNIST, >= 99.50% (the notebook: 99.53%)", 0.995, "%",
        top[1] if top else [], top[0] if top else None)
    fashion = [r for r in training if as_preset(r, "paper", "fashion-mnist", TUNED)]
    top = best(fashion, accuracy)
    add("paper preset, Fashion-MNIST, >= 92%", 0.92, "%", top[1] if top else [],
        top[0] if top else None)
    for key, target, wanted in (("train_images_per_s", "training at batch 128", 40_000),
                                ("infer_images_per_s", "inference at batch 1,024", 150_000)):
        top = best(fast, lambda r: r.summary.get(key))
        add(f"{target}, >= {wanted:,} images/s (fastest compiled path)", wanted, "images/s",
            top[1] if top else [], top[0] if top else None)
    # A paper run alone (its wall time over its epochs: compilation and test included) or
    # capsnet bench --epoch (an epoch after the one that compiles).
    timed = {r: r.summary["wall_seconds"] / r.summary["epochs"] for r in paper
             if not r.campaign.get("alongside") and r.summary.get("device", "").startswith("NVIDIA")}
    timed.update({r: r.summary["epoch_seconds"] for r in runs
                  if r.kind == "bench" and r.summary.get("epoch_seconds")
                  and r.summary.get("device", "").startswith("NVIDIA")})
    add("one paper-preset epoch with its validation, <= 2 s", 2.0, "s", list(timed),
        min(timed.values()) if timed else None, higher=False)
    for preset, wanted, paper_says, tuned, tuned_says in ROUTING_TARGETS:
        top = best([r for r in training if as_preset(r, preset, "mnist", tuned)], accuracy)
        add(f"issue 28: {preset} preset{tuned_says}, MNIST, one run >= {wanted:.2%} (the "
            f"paper: {paper_says})", wanted, "%", top[1] if top else [], top[0] if top else None)
    return markdown(["target (issue 16 unless named)", "measured", "met", "runs"], rows, "")


NOTEBOOK = DOCS.parent.parent / "shared" / "seed" / "capsnet-notebook.txt"


def notebook_curve() -> list[float] | None:
    """The notebook's printed validation accuracy per epoch (its "Epoch: N  Val accuracy:
    X%" lines), read from the notebook's text beside the checkout."""
    if not NOTEBOOK.is_file():
        return None
    found = re.findall(r"Epoch: (\d+)  Val accuracy: ([\d.]+)%", NOTEBOOK.read_text())
    return [float(accuracy) / 100 for _, accuracy in sorted(found, key=lambda f: int(f[0]))]


def seed_curve_table(runs: list[Run]) -> str:
    """Validation accuracy per epoch of every seed-preset run beside the notebook's."""
    rows = []
    curve = notebook_curve()
    if curve:
        rows.append(["the notebook (printed after restoring an earlier checkpoint)",
                     *map(percent, curve)])
    for r in runs:
        if r.train.get("preset") == "seed" and r.train.get("dataset") == "mnist":
            accuracy = [m["val_accuracy"] for m in r.metrics("") or []]
            rows.append([f"{link(r)} ({hardware(r)})", *map(percent, accuracy)])
    epochs = max((len(row) - 1 for row in rows), default=0)
    rows = [row + [""] * (epochs + 1 - len(row)) for row in rows]
    return markdown(["run", *(str(e) for e in range(1, epochs + 1))], rows,
                    "No seed-preset runs recorded yet.")


def network(run: Run) -> str:
    return run.train.get("network", "capsnet")


def routing_parameters(run: Run) -> str:
    """Parameters of the recorded network without its decoder (counted on the meta device)."""
    architecture = run.config.get("architecture", "capsnet")
    if architecture not in ARCHITECTURES or "model" not in run.config:
        return MISSING
    model_class, config_class = ARCHITECTURES[architecture]
    with torch.device("meta"):
        model = model_class(config_class.from_dict(run.config["model"]))
    return count(sum(p.numel() for name, p in model.named_parameters()
                     if not name.startswith("decoder.")))


def mean_accuracy(group: list[Run]) -> float:
    return sum(r.summary["test_accuracy"] for r in group) / len(group)


def rank(group: list[Run]) -> tuple[bool, float]:
    """Runs trained in full first, then the higher mean test accuracy."""
    return not any(r.summary.get("cut_short") for r in group), mean_accuracy(group)


def routings_table(runs: list[Run]) -> str:
    """Each network on each data set and hardware: its recipe with the best mean test
    accuracy over its runs (seeds), runs trained in full before runs cut short, and its
    training speed, also as a ratio to its convolutions' from the bench records of the same
    network on the same CPU or GPU model."""
    benches = [r for r in runs if r.kind == "bench"]
    groups: dict[tuple[str, str, str, str], list[Run]] = {}
    for r in runs:
        if r.kind == "training" and r.summary.get("test_accuracy") is not None:
            key = (network(r), dataset(r), r.summary.get("device", MISSING), recipe(r))
            groups.setdefault(key, []).append(r)
    best: dict[tuple[str, str, str], list[Run]] = {}
    for key, group in groups.items():
        if key[:3] not in best or rank(group) > rank(best[key[:3]]):
            best[key[:3]] = group
    header = ["network", "data set", "parameters (no decoder)", "recipe", "epochs",
              "test accuracy (mean)", "runs", "training images/s",
              "training / its convolutions", "hardware", "records"]
    rows = []
    for (name, data, device), group in sorted(best.items()):
        speeds = [r.summary.get("train_images_per_s") for r in group]
        speed = (count(round(sum(speeds) / len(speeds)))
                 if all(v is not None for v in speeds) else MISSING)
        rows.append([f"`{name}`", data, routing_parameters(group[0]), recipe_name(group[0]),
                     epochs(group[0]), percent(mean_accuracy(group)), str(len(group)), speed,
                     convolutions_ratio(name, group[0], benches), device,
                     ", ".join(link(r) for r in group)])
    return markdown(header, rows, "No training runs recorded yet.")


TABLES = {"training": training_table, "experiments": experiments_table, "bench": bench_table,
          "targets": targets_table, "seed-curve": seed_curve_table, "routings": routings_table}


def load_runs(runs_dir: Path) -> dict[str, list[Run]]:
    """Each table's runs, oldest first (then by name); a record without a date sorts first."""
    runs = [Run(p.parent) for p in runs_dir.glob("*/summary.json")]
    runs.sort(key=lambda r: (date(r) if date(r) != MISSING else "", r.name))
    tables = {kind: [r for r in runs if r.kind == kind] for kind in ("training", "experiments", "bench")}
    return {**tables, "targets": runs, "seed-curve": tables["training"],
            "routings": tables["training"] + tables["bench"]}


DOCUMENTS = {"RESULTS.md": tuple(TABLES), "PERFORMANCE.md": ()}  # tables each must hold


def generate(text: str, runs_dir: Path, required: tuple[str, ...]) -> str:
    """``text`` with every marked table regenerated; the ``required`` ones must be marked."""
    runs = load_runs(runs_dir)
    for name, table in TABLES.items():
        pattern = re.compile(rf"(<!-- begin table: {name} [^\n]*-->\n)(?:.*?\n)?"
                             rf"(<!-- end table: {name} -->)", re.S)
        if not pattern.search(text):
            if name in required:
                raise SystemExit(f"no marked table {name!r}: add the lines '<!-- begin table: "
                                 f"{name} (generated by scripts/results_tables.py) -->' and "
                                 f"'<!-- end table: {name} -->'")
            continue
        text = pattern.sub(lambda m: m.group(1) + table(runs[name]) + "\n" + m.group(2), text)
    return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="change nothing; exit 1 when a document differs from the records")
    parser.add_argument("--docs", type=Path, default=DOCS,
                        help="the folder holding the documents and runs/ (default: docs/)")
    args = parser.parse_args(argv)
    status = 0
    for document, required in DOCUMENTS.items():
        path = args.docs / document
        current = path.read_text()
        wanted = generate(current, args.docs / "runs", required)
        if current == wanted:
            continue
        if args.check:
            diff = difflib.unified_diff(current.splitlines(), wanted.splitlines(), str(path),
                                        "generated from the records", lineterm="")
            print("\n".join(diff), file=sys.stderr)
            print(f"{path} disagrees with {args.docs / 'runs'}: run python "
                  f"scripts/results_tables.py", file=sys.stderr)
            status = 1
        else:
            path.write_text(wanted)
            print(f"rewrote the tables of {path}")
    return status


if __name__ == "__main__":
    sys.exit(main())
