"""scripts/reproduce_gpu.sh on the CPU: its tiny mode runs every step of the GPU plan with
tiny settings, writes a record for each run that the tables take, and bad input is refused
in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest
import torch

from capsnet.training.config import make_config
from conftest import REPO, copy_docs, tables

REPRODUCE = REPO / "scripts" / "reproduce_gpu.sh"
BENCH = ["bench-eager-b8", "bench-compiled-b8", "bench-graphs-b8"]
WAVES = [["mnist-paper-s0", "mnist-paper-s1", "mnist-paper-s2", "mnist-paper-decay-s0",
          "mnist-paper-decay-s1", "mnist-paper-decay-s2"],
         ["mnist-seed-s0", "mnist-seed-s1", "mnist-seed-s2", "mnist-seed-s3", "mnist-seed-s4",
          "mnist-seed-e20-s0"],
         ["fashion-paper-s0", "fashion-paper-decay-s0", "mnist-paper-fp32-s0",
          "mnist-paper-torchinit-s0", "mnist-paper-officialmargin-s0", "affnist-s0"],
         ["efficient-mnist-s0", "efficient-fashion-s0", "em-mnist-s0", "em-fashion-s0",
          "em-small-mnist-s0", "em-small-fashion-s0"],  # the other routings
         ["multimnist-s0"]]
RUNS = BENCH + [name for wave in WAVES for name in wave]


def reproduce(*args: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPRODUCE), *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, "PYTHON": sys.executable}, timeout=1200)


@pytest.fixture(scope="module")
def tiny(tiny_dataset: Path, module_tmp: Callable[[str], Path]
         ) -> tuple[Path, subprocess.CompletedProcess]:
    """The tiny reproduction on the synthetic data set: (output folder, result)."""
    out = module_tmp("reproduce") / "out"
    return out, reproduce("--budget", "20m", "--out", out, "--tiny", tiny_dataset)


@pytest.mark.slow
def test_every_run_finishes_with_its_record(tiny) -> None:
    out, result = tiny
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(RUNS)} of {len(RUNS)} runs finished" in result.stdout
    assert f"python scripts/campaign_tools.py home {out} --tag cpu" in result.stdout
    assert "python scripts/results_tables.py" in result.stdout
    for name in RUNS:
        record = json.loads((out / name / "campaign.json").read_text())
        assert record["status"] == "ok" and record["plan"] == "reproduce-tiny"
        assert (out / name / "summary.json").is_file()
        # The benches run alone; the training runs six at a time, MultiMNIST alone.
        group = next((wave for wave in WAVES if name in wave), [name])
        assert sorted(record["alongside"]) == sorted(set(group) - {name})
    for name in BENCH:  # the tiny benches are eager fp32 (the GPU's: bf16, compiled or graphed)
        summary = json.loads((out / name / "summary.json").read_text())
        assert (summary["precision"], summary["compile"], summary["cuda_graphs"]) == \
            ("fp32", False, False)


@pytest.mark.slow
def test_training_runs_keep_their_recipes(tiny) -> None:
    out, _ = tiny
    train = {name: json.loads((out / name / "config.json").read_text())["train"]
             for wave in WAVES[:4] for name in wave if name != "affnist-s0"}
    assert [train[f"mnist-paper-decay-s{s}"]["lr_decay"] for s in range(3)] == [0.9] * 3
    assert [train[f"mnist-seed-s{s}"]["seed"] for s in range(5)] == list(range(5))
    assert train["mnist-paper-fp32-s0"]["precision"] == "fp32"
    assert train["mnist-paper-torchinit-s0"]["init"] == "torch"
    assert train["mnist-paper-officialmargin-s0"]["margin_loss"] == "official"
    assert [train[f"{name}-mnist-s0"]["network"] for name in ("efficient", "em", "em-small")] \
        == ["efficient-capsnet", "em-capsnet", "em-capsnet-small"]
    assert train["em-small-fashion-s0"]["dataset"] == train["em-small-mnist-s0"]["dataset"]
    em = make_config("em")  # the EM runs train on their preset's schedule
    for name in ("em-mnist-s0", "em-small-mnist-s0", "em-fashion-s0", "em-small-fashion-s0"):
        assert (train[name]["preset"], train[name]["lr_decay"], train[name]["lr_decay_steps"],
                train[name]["ema_decay"]) == ("em", em.lr_decay, em.lr_decay_steps, em.ema_decay)
    assert all(config["epochs"] == 1 and config["device"] == "cpu" for config in train.values())


@pytest.mark.slow
def test_the_affine_experiment_stops_both_models_by_one_rule(tiny) -> None:
    out, _ = tiny
    config = json.loads((out / "affnist-s0" / "config.json").read_text())["train"]
    assert config["stop_at"] == 0.992
    for model in ("capsnet", "cnn"):
        trained = json.loads((out / "affnist-s0" / model / "config.json").read_text())["train"]
        assert trained["stop_at"] == 0.992
        assert trained["time_limit"] == config["time_limit"]


@pytest.mark.slow
def test_the_records_fill_the_tables(tiny, tmp_path: Path) -> None:
    out, _ = tiny
    docs = copy_docs(tmp_path)
    home = subprocess.run([sys.executable, str(REPO / "scripts" / "campaign_tools.py"), "home",
                           str(out), "--runs", str(docs / "runs"), "--tag", "cpu"],
                          capture_output=True, text=True)
    assert home.returncode == 0, home.stderr
    assert tables(docs).returncode == 0
    results, performance = ((docs / name).read_text() for name in ("RESULTS.md", "PERFORMANCE.md"))
    for name in RUNS:
        assert f"[runs/{name}-cpu](runs/{name}-cpu)" in results
    assert "[runs/bench-graphs-b8-cpu](runs/bench-graphs-b8-cpu)" in performance


@pytest.mark.parametrize("args, message", [
    (["--budget", "90x", "--out", "OUT"], "argument --budget: expected a duration such as 90m"),
    (["--out", "OUT"], "the following arguments are required: --budget"),
    (["--budget", "1m", "--out", "FILE"], "--out FILE already holds files; name a new folder"),
    (["--budget", "1m", "--out", "OUT", "--tiny", "MISSING"], "argument --tiny: MISSING is not a "
                                                             "folder"),
])
def test_bad_input_is_refused_in_one_line(tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "FILE").write_text("the user's")
    places = {"OUT": tmp_path / "out", "FILE": tmp_path / "FILE", "MISSING": tmp_path / "none"}
    result = reproduce(*(places.get(a, a) for a in args))
    shown = message.replace("FILE", str(places["FILE"])).replace("MISSING", str(places["MISSING"]))
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith(f"reproduce_gpu: {shown}") and result.stderr.count("\n") == 1
    assert (tmp_path / "FILE").read_text() == "the user's" and not (tmp_path / "out").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_without_cuda_it_stops_before_any_run(tmp_path: Path) -> None:
    result = reproduce("--budget", "90m", "--out", tmp_path / "out")
    assert result.returncode == 1 and "needs CUDA" in result.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["machine.json", "machine.txt"]
