"""The GPU campaign's machinery on the CPU: the tiny plan end to end (the same script and
runs as the GPU parts, tiny settings), its records brought home, and the generated tables
of docs/RESULTS.md checked against docs/runs/."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from capsnet.training.config import make_config
from capsnet.utils.device import device_name
from conftest import REPO, copy_docs, tables

CAMPAIGN = REPO / "scripts" / "gpu_campaign.sh"
TOOLS = REPO / "scripts" / "campaign_tools.py"

BENCH = ["bench-eager-b8", "bench-fast-b8", "bench-compiled-b8", "bench-fp32-b8",
         "bench-graphs-b8"]
TRAIN = ["mnist-paper-s0", "mnist-paper-s1", "mnist-paper-s2", "mnist-seed-s0",
         "fashion-paper-s0", "mnist-paper-decay-s0", "mnist-paper-decay-s1",
         "mnist-paper-decay-s2", "fashion-paper-decay-s0", "mnist-seed-e20-s0"]
EXPERIMENTS = {"multimnist-s0": "multimnist", "affnist-s0": "affnist",
               "multimnist-long-s0": "multimnist"}
GROUPS = [[*TRAIN[1:5], "multimnist-s0", "affnist-s0"], [*TRAIN[5:], "multimnist-long-s0"]]


@pytest.fixture(scope="module")
def tiny_campaign(tiny_dataset: Path, module_tmp: Callable[[str], Path]
                  ) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """``gpu_campaign.sh tiny`` on the synthetic data set: (output folder, archive, result)."""
    tmp = module_tmp("campaign")
    out, archive = tmp / "out", tmp / "returned" / "tiny.tar.gz"
    # The tiny plan's own hard stop (900 s) came before its benches on a slow 2-core CPU with
    # the rest of the suite beside it: room for that here, inside the run's time-out.
    env = {**os.environ, "CAMPAIGN_DATA": str(tiny_dataset), "PYTHON": sys.executable,
           "CAMPAIGN_STOP": "1700"}
    result = subprocess.run(["bash", str(CAMPAIGN), "tiny", str(out), str(archive)], env=env,
                            capture_output=True, text=True, timeout=1800)
    return out, archive, result


@pytest.mark.slow
def test_tiny_plan_writes_a_finished_record_for_every_run(tiny_campaign) -> None:
    out, _, result = tiny_campaign
    assert result.returncode == 0, result.stdout + result.stderr
    machine = json.loads((out / "machine.json").read_text())
    assert machine["torch"] and machine["cpu"] and machine["cuda_available"] in (True, False)
    assert "nvidia-smi" in (out / "machine.txt").read_text()
    log = (out / "campaign.log").read_text()
    for name in [*BENCH, *TRAIN, *EXPERIMENTS]:
        assert f"{name}: ok" in log, log
        record = json.loads((out / name / "campaign.json").read_text())
        assert record["status"] == "ok" and record["plan"] == "tiny"
        assert record["command"].startswith("capsnet ")
        assert record["machine"] == machine
        # Parts 2 and 3 start their runs together; the record says which ran alongside.
        group = next((g for g in GROUPS if name in g), [name])
        assert sorted(record["alongside"]) == sorted(set(group) - {name})


@pytest.mark.slow
def test_tiny_bench_records_are_capsnet_bench_json(tiny_campaign) -> None:
    out, _, _ = tiny_campaign
    for name in BENCH:
        summary = json.loads((out / name / "summary.json").read_text())
        assert summary["train_batch"] == int(name.rsplit("-b", 1)[1])
        assert summary["infer_batch"] == 16
        # the tiny plan's benches are eager fp32 (the GPU parts': bf16, compiled or graphed)
        assert (summary["precision"], summary["compile"], summary["cuda_graphs"]) == \
            ("fp32", False, False)
        assert summary["train_images_per_s"] > 0 and summary["infer_images_per_s"] > 0
        assert summary["device"].startswith("cpu")


@pytest.mark.slow
def test_tiny_training_runs_are_cut_short_by_their_time_limit(tiny_campaign) -> None:
    out, _, _ = tiny_campaign
    for name in TRAIN:
        folder = out / name
        config = json.loads((folder / "config.json").read_text())["train"]
        summary = json.loads((folder / "summary.json").read_text())
        assert (folder / "best.pt").is_file() and (folder / "metrics.jsonl").is_file()
        assert (config["epochs"], config["time_limit"]) == (2, 1.0)
        # the tiny plan's runs are eager fp32 (the GPU parts': bf16, compiled)
        assert (config["precision"], config["compile"], config["device"]) == ("fp32", "off", "cpu")
        assert summary["epochs"] == 1 and summary["compiled"] is False
        assert summary["cut_short"] == "time limit of 1 s: stopped after epoch 1 of 2"
        assert 0 <= summary["test_accuracy"] <= 1
        assert summary["device"].startswith("cpu") and summary["date"] and summary["torch"]
    seeds = {name: json.loads((out / name / "config.json").read_text())["train"]
             for name in TRAIN}
    assert [seeds[n]["seed"] for n in TRAIN] == [0, 1, 2, 0, 0] * 2
    assert [seeds[n]["preset"] for n in TRAIN] == ["paper", "paper", "paper", "seed", "paper",
                                                   "paper", "paper", "paper", "paper", "seed"]
    assert [seeds[n]["lr_decay"] for n in TRAIN] == [0.96, 0.96, 0.96, 1.0, 0.96, 0.9, 0.9, 0.9, 0.9, 1.0]


@pytest.mark.slow
def test_tiny_experiments_are_cut_short_too(tiny_campaign) -> None:
    out, _, _ = tiny_campaign
    for name in ("multimnist-s0", "multimnist-long-s0"):
        multimnist = json.loads((out / name / "summary.json").read_text())
        assert multimnist["experiment"] == "multimnist" and 0 <= multimnist["test_error"] <= 1
        assert multimnist["cut_short"]
    affnist = json.loads((out / "affnist-s0" / "summary.json").read_text())
    assert sorted(affnist["models"]) == ["capsnet", "cnn"]
    for model in affnist["models"].values():
        assert 0 <= model["affine_test_accuracy"] <= 1 and model["cut_short"]


@pytest.mark.slow
def test_archive_holds_every_record_and_no_checkpoint(tiny_campaign) -> None:
    _, archive, _ = tiny_campaign
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert not [n for n in names if n.endswith(".pt")]
    for name in [*BENCH, *TRAIN, *EXPERIMENTS]:
        assert f"{name}/summary.json" in names and f"{name}/campaign.json" in names
    assert "affnist-s0/capsnet/metrics.jsonl" in names and "machine.txt" in names


@pytest.mark.slow
def test_records_come_home_and_fill_the_tables(tiny_campaign, tmp_path: Path) -> None:
    _, archive, _ = tiny_campaign
    docs = copy_docs(tmp_path)
    home = [sys.executable, str(TOOLS), "home", str(archive), "--runs", str(docs / "runs"),
            "--tag", "tiny"]
    assert subprocess.run(home, capture_output=True).returncode == 0
    affnist = docs / "runs" / "affnist-s0-tiny"
    assert sorted(p.name for p in affnist.iterdir()) == [
        "campaign.json", "capsnet-metrics.jsonl", "cnn-metrics.jsonl", "config.json",
        "summary.json"]
    assert sorted(p.name for p in (docs / "runs" / "mnist-paper-s0-tiny").iterdir()) == [
        "campaign.json", "config.json", "metrics.jsonl", "summary.json"]
    # Bringing the same runs home again overwrites nothing and says so.
    assert subprocess.run(home, capture_output=True).returncode == 1
    assert tables(docs, "--check").returncode == 1
    assert tables(docs).returncode == 0 and tables(docs, "--check").returncode == 0
    text = (docs / "RESULTS.md").read_text()
    for name in [*BENCH, *TRAIN, *EXPERIMENTS]:
        assert f"[runs/{name}-tiny](runs/{name}-tiny)" in text
    assert "1 (cut short: time limit of 1 s: stopped after epoch 1 of 2)" in text
    assert "alongside 5 other runs" in text
    # Cut short, the tiny runs take no part in any mean over seeds.
    means = [line for line in text.splitlines() if line.startswith("Mean test accuracy")]
    assert not any("-tiny" in line for line in means)


def test_a_run_past_its_time_is_stopped_and_recorded(tmp_path: Path) -> None:
    began = time.monotonic()
    result = subprocess.run([sys.executable, str(TOOLS), "run", str(tmp_path), "slow", "--plan",
                             "tiny", "--timeout", "1", "--", "sleep", "60"],
                            capture_output=True, text=True)
    assert result.returncode == 0 and time.monotonic() - began < 30
    record = json.loads((tmp_path / "slow" / "campaign.json").read_text())
    assert record["status"] == "stopped at the part's hard stop after 1 s"
    assert "slow: stopped" in (tmp_path / "campaign.log").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_gpu_part_without_cuda_stops_before_any_run(tmp_path: Path) -> None:
    result = subprocess.run(["bash", str(CAMPAIGN), "part1", str(tmp_path / "out"),
                             str(tmp_path / "part1.tar.gz")], capture_output=True, text=True,
                            env={**os.environ, "PYTHON": sys.executable}, timeout=300)
    assert result.returncode == 1 and "needs CUDA" in result.stderr
    written = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name[0] != ".")
    assert written == ["machine.json", "machine.txt"]
    with tarfile.open(tmp_path / "part1.tar.gz") as tar:  # what says why comes home
        assert sorted(tar.getnames()) == ["machine.json", "machine.txt"]


def test_results_tables_agree_with_the_committed_records() -> None:
    result = tables(REPO / "docs", "--check")
    assert result.returncode == 0, result.stderr


def test_check_fails_when_a_committed_summary_changes(tmp_path: Path) -> None:
    docs = copy_docs(tmp_path)
    summary_path = docs / "runs" / "mnist-quick-cpu" / "summary.json"
    summary = json.loads(summary_path.read_text())
    summary["test_accuracy"] = 0.5
    summary_path.write_text(json.dumps(summary))
    result = tables(docs, "--check")
    assert result.returncode == 1 and "+| MNIST | quick" in result.stderr
    assert "50.00%" in result.stderr
    assert tables(docs).returncode == 0 and tables(docs, "--check").returncode == 0


def test_a_field_a_record_lacks_shows_as_not_recorded(tmp_path: Path) -> None:
    docs = copy_docs(tmp_path)
    folder = docs / "runs" / "bare"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"test_accuracy": 0.9}))
    assert tables(docs).returncode == 0
    row = next(line for line in (docs / "RESULTS.md").read_text().splitlines()
               if "runs/bare" in line)
    assert row.count("not recorded") == 8 and "90.00%" in row


@pytest.mark.parametrize("checkpoint, shown", [
    ("runs/first/best.pt", "continued from [runs/base](runs/base)"),
    ("runs/first/last.pt", "continued from [runs/base](runs/base)"),
    ("runs/elsewhere/best.pt", "continued from a trained checkpoint"),
])
def test_a_continued_run_links_the_record_of_the_run_it_started_from(
        tmp_path: Path, checkpoint: str, shown: str) -> None:
    docs = copy_docs(tmp_path)
    for name, config, summary in (
            ("base", {"train": {"epochs": 3}}, {"checkpoint": "runs/first/best.pt"}),
            ("continued", {"train": {"epochs": 2}, "init_from": checkpoint}, {})):
        write_record(docs, name, {"test_accuracy": 0.9, **summary}, config)
    assert tables(docs).returncode == 0
    row = next(line for line in (docs / "RESULTS.md").read_text().splitlines()
               if "[runs/continued]" in line)
    assert shown in row


@pytest.mark.parametrize("preset, train, shown", [
    # no average, so its warm-up does not apply to the run and is not a difference
    ("em", {"ema_decay": 0.0}, "| em, ema_decay 0.0 |"),
    ("paper", {"ema_decay": 0.999, "ema_warmup": False},
     "| paper, ema_decay 0.999, ema_warmup False |"),
])
def test_a_recipe_names_the_settings_that_differ_from_its_preset_and_apply_to_the_run(
        tmp_path: Path, preset: str, train: dict, shown: str) -> None:
    docs = copy_docs(tmp_path)
    config = {"train": {**make_config(preset).to_dict(), **train}}
    write_record(docs, "recipe", {"test_accuracy": 0.9}, config)
    assert tables(docs).returncode == 0
    row = next(line for line in (docs / "RESULTS.md").read_text().splitlines()
               if "[runs/recipe]" in line)
    assert shown in row


def ratio(docs: Path, run: str) -> str:
    """The generated routings table's ratio to the convolutions for the em-capsnet-small
    record ``run``."""
    assert tables(docs).returncode == 0
    row = next(line for line in (docs / "RESULTS.md").read_text().splitlines()
               if line.startswith("| `em-capsnet-small`") and f"[runs/{run}]" in line)
    return row.split(" | ")[8]


def test_a_training_run_is_compared_with_benches_of_its_own_routing_iterations_and_kernel(
        tmp_path: Path) -> None:
    docs = copy_docs(tmp_path)
    device = "cpu (Test CPU, 2 threads)"
    bench = {"network": "em-capsnet-small", "device": device, "precision": "fp32",
             "compile": True, "date": "2026-01-01", "convs_train_images_per_s": 1000.0,
             "infer_images_per_s": 1.0}

    run = {"test_accuracy": 0.9, "device": device, "precision": "fp32", "compiled": True,
           "train_images_per_s": 100.0}
    config = {"train": {"network": "em-capsnet-small", "routing_iterations": 2}}
    write_record(docs, "em-two", run, config)
    write_record(docs, "bench-three",
                 {**bench, "routing_iterations": 3, "train_images_per_s": 50.0})
    assert ratio(docs, "em-two") == "not measured"
    write_record(docs, "bench-two", {**bench, "routing_iterations": 2, "train_images_per_s": 80.0})
    assert ratio(docs, "em-two") == "0.08x"
    # a newer kernel's bench speaks for runs of that kernel, not for a run of the older one
    newer = {**bench, "routing_iterations": 2, "date": "2026-02-01", "kernel": "em_kernel-1"}
    write_record(docs, "bench-newer", {**newer, "train_images_per_s": 160.0})
    assert ratio(docs, "em-two") == "0.08x"
    (docs / "runs" / "em-two" / "summary.json").write_text(
        json.dumps({**run, "kernel": "em_kernel-1"}))
    assert ratio(docs, "em-two") == "0.16x"


def test_a_training_run_is_compared_with_benches_of_its_own_vector_instructions(
        tmp_path: Path) -> None:
    """One CPU model name comes with AVX-512 or AVX2 alone, which the kernels are built for:
    records that name them are compared only with records of the same."""
    docs = copy_docs(tmp_path)
    avx2, avx512 = "cpu (Test CPU, AVX2, 2 threads)", "cpu (Test CPU, AVX512, 2 threads)"

    write_record(docs, "em-avx2", {"test_accuracy": 0.9, "device": avx2, "precision": "fp32",
                                   "compiled": True, "train_images_per_s": 100.0},
                 {"train": {"network": "em-capsnet-small", "routing_iterations": 2}})
    bench = {"network": "em-capsnet-small", "precision": "fp32", "compile": True,
             "routing_iterations": 2, "date": "2026-01-01", "convs_train_images_per_s": 1000.0,
             "infer_images_per_s": 1.0}
    write_record(docs, "bench-avx512", {**bench, "device": avx512, "train_images_per_s": 90.0})
    assert ratio(docs, "em-avx2") == "not measured"
    write_record(docs, "bench-avx2", {**bench, "device": avx2, "train_images_per_s": 60.0})
    assert ratio(docs, "em-avx2") == "0.06x"


def test_a_training_run_is_compared_with_benches_of_its_own_image_size(tmp_path: Path) -> None:
    """A run on 24x24 crops is not compared with benches of 28x28 images (those from before
    bench records named their size, or that name it)."""
    docs = copy_docs(tmp_path)
    device = "cpu (Test CPU, AVX2, 2 threads)"

    write_record(docs, "em-crop", {"test_accuracy": 0.9, "device": device, "precision": "fp32",
                                   "compiled": True, "train_images_per_s": 100.0},
                 {"train": {"network": "em-capsnet-small", "routing_iterations": 2, "crop": 24},
                  "model": {"image_size": 24}})
    bench = {"network": "em-capsnet-small", "device": device, "precision": "fp32",
             "compile": True, "routing_iterations": 2, "date": "2026-01-01",
             "convs_train_images_per_s": 1000.0, "infer_images_per_s": 1.0}
    write_record(docs, "bench-before-sizes", {**bench, "train_images_per_s": 90.0})
    write_record(docs, "bench-28", {**bench, "image_size": 28, "train_images_per_s": 80.0})
    assert ratio(docs, "em-crop") == "not measured"
    write_record(docs, "bench-24", {**bench, "image_size": 24, "train_images_per_s": 70.0})
    assert ratio(docs, "em-crop") == "0.07x"


def test_a_cpus_device_name_says_which_vector_instructions_the_kernels_use() -> None:
    name = device_name(torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()
    assert name.startswith("cpu (") and name.endswith(f" {torch.get_num_threads()} threads)")
    assert (f", {capability}, " in name) == (capability != "DEFAULT")


@pytest.mark.parametrize("epochs, shown", [
    # records that count each epoch's images
    ([{"step": 10, "images": 80}, {"step": 20, "images": 80}], "160"),
    # older ones: images/s times seconds, which for epoch 2 (resumed part way) is its end alone
    ([{"step": 10, "images_per_s": 8.0, "epoch_seconds": 10.0},
      {"step": 20, "images_per_s": 10.0, "epoch_seconds": 3.0},
      {"step": 25, "images_per_s": 5.0, "epoch_seconds": 4.0}], "180"),
])
def test_training_images_count_a_resumed_epoch_whole(tmp_path: Path, epochs: list[dict],
                                                    shown: str) -> None:
    docs = copy_docs(tmp_path)
    write_record(docs, "resumed", {"test_accuracy": 0.9, "epochs": len(epochs)},
                 {"train": {"epochs": len(epochs)}})
    curve_point = {"step": 5, "epoch": 0.5, "train_loss": 1.0}
    lines = [curve_point] + [{"epoch": n, **r} for n, r in enumerate(epochs, start=1)]
    (docs / "runs" / "resumed" / "metrics.jsonl").write_text(
        "".join(json.dumps(line) + "\n" for line in lines))
    assert tables(docs).returncode == 0
    rows = [line.split(" | ") for line in (docs / "RESULTS.md").read_text().splitlines()
            if "[runs/resumed]" in line]
    assert rows[0][3] == shown  # the first table: training runs


def write_record(docs: Path, name: str, summary: dict, config: dict | None = None) -> None:
    """A run record ``docs/runs/name``: its summary.json and, when given, its config.json."""
    folder = docs / "runs" / name
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    if config is not None:
        (folder / "config.json").write_text(json.dumps(config))
