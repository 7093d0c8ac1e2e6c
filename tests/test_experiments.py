"""Experiments run on the one Trainer: interrupted and resumed, they end exactly where an
uninterrupted run ends (weights, optimizer state, metrics)."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from capsnet.cli import main
from capsnet.experiments import EXPERIMENTS
from capsnet.training.checkpoint import load_checkpoint
from capsnet.training.trainer import Trainer

COMMON = ["--epochs", "2", "--val-size", "40", "--test-limit", "32", "--figures", "0",
          "--device", "cpu", "--no-progress"]
# 3 steps an epoch (multimnist), 2 for each model (affnist), and 2 primary capsule maps, not
# 32: each step takes a fraction of a second
ARGS = {
    "multimnist": ["--train-limit", "48", "--batch-size", "16", "--primary-maps", "2"],
    "affnist": ["--train-limit", "32", "--batch-size", "16", "--primary-maps", "2"],
}
INTERRUPT_AT = {"multimnist": 4, "affnist": 7}  # the 7th step overall is the CNN's 3rd
SUB_RUNS = {"multimnist": [""], "affnist": ["capsnet", "cnn"]}


def interrupt_at(monkeypatch: pytest.MonkeyPatch, call: int) -> None:
    """Ctrl-C during the ``call``-th training step of the process."""
    train_step, calls = Trainer.train_step, [0]

    def step_then_ctrl_c(self: Trainer, batch: Any) -> Any:
        calls[0] += 1
        result = train_step(self, batch)
        if calls[0] == call:
            signal.raise_signal(signal.SIGINT)
        return result

    monkeypatch.setattr(Trainer, "train_step", step_then_ctrl_c)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_interrupted_and_resumed_experiment_equals_an_uninterrupted_one(
        name: str, tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], one_thread) -> None:
    args = ["experiment", name, "--dataset", str(tiny_dataset), *COMMON, *ARGS[name]]
    assert main([*args, "--run-dir", str(tmp_path / "whole")]) == 0
    interrupt_at(monkeypatch, INTERRUPT_AT[name])
    assert main([*args, "--run-dir", str(tmp_path / "cut")]) == 130
    err = capsys.readouterr().err
    # the folder --resume takes: the experiment's, also where a model trains in a subfolder
    assert err.count("\n") == 1
    assert err.rstrip().endswith(f"capsnet experiment {name} --resume {tmp_path / 'cut'}"), err
    monkeypatch.undo()
    assert main(["experiment", name, "--resume", str(tmp_path / "cut"), "--no-progress"]) == 0
    for sub in SUB_RUNS[name]:
        whole, cut = tmp_path / "whole" / sub, tmp_path / "cut" / sub
        for checkpoint in ("last.pt", "best.pt"):
            a, b = load_checkpoint(whole / checkpoint), load_checkpoint(cut / checkpoint)
            for key in a["model"]:
                assert torch.equal(a["model"][key], b["model"][key]), (sub, checkpoint, key)
            assert a["optimizer"]["state"].keys() == b["optimizer"]["state"].keys()
            for index, state in a["optimizer"]["state"].items():
                for key, value in state.items():
                    assert torch.equal(value, b["optimizer"]["state"][index][key])
        records = [(whole / "metrics.jsonl").read_text(), (cut / "metrics.jsonl").read_text()]
        timing = ("images_per_s", "epoch_seconds", "wall_seconds", "unix_time")
        strip = [[{k: v for k, v in json.loads(line).items() if k not in timing}
                  for line in text.splitlines()] for text in records]
        assert strip[0] == strip[1] and len(strip[0]) == 2


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPERIMENTS))
def test_resume_keeps_the_experiments_settings(name: str, tiny_dataset: Path, tmp_path: Path,
                                               capsys, one_thread) -> None:
    run_dir = tmp_path / "run"
    args = ["experiment", name, "--dataset", str(tiny_dataset), *COMMON, *ARGS[name],
            "--epochs", "1", "--run-dir", str(run_dir)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["experiment", name, "--resume", str(run_dir), "--test-limit", "16"]) == 2
    err = capsys.readouterr().err
    assert "--resume keeps the run's settings: test_limit is 32 there, not 16" in err
    assert main(["experiment", name, "--resume", str(run_dir), "--batch-size", "8"]) == 2
    assert "batch_size is 16 there, not 8" in capsys.readouterr().err
    # A new run into the folder is refused, not overwritten.
    assert main(args) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.slow
def test_an_experiment_checks_every_models_checkpoint_before_training_any(
        tiny_dataset: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], one_thread) -> None:
    """A damaged checkpoint of the CNN stops ``--resume`` at once, not after the CapsNet has
    trained on: nothing in the folder changes."""
    run_dir = tmp_path / "run"
    args = ["experiment", "affnist", "--dataset", str(tiny_dataset), *COMMON, *ARGS["affnist"]]
    interrupt_at(monkeypatch, 2)  # in the CapsNet's first epoch
    assert main([*args, "--run-dir", str(run_dir)]) == 130
    monkeypatch.undo()
    (run_dir / "cnn").mkdir()
    (run_dir / "cnn" / "last.pt").write_bytes(b"not a checkpoint")
    before = {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}
    capsys.readouterr()
    assert main(["experiment", "affnist", "--resume", str(run_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cnn" in err, err
    assert {p: p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()} == before


@pytest.mark.slow
@pytest.mark.parametrize("name, canvas", [("multimnist", 36), ("affnist", 40)])
def test_an_experiment_replaces_a_presets_crops_with_its_own_input(
        name: str, canvas: int, tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    """The cifar10 preset trains on 24x24 crops; an experiment places its digits on its own
    canvas and trains on all of it."""
    run_dir = tmp_path / "run"
    args = ["experiment", name, "--preset", "cifar10", "--dataset", str(tiny_dataset), *COMMON,
            *ARGS[name], "--epochs", "1", "--run-dir", str(run_dir)]
    assert main(args + (["--model", "capsnet"] if name == "affnist" else [])) == 0
    config = json.loads((run_dir / "config.json").read_text())
    assert (config["train"]["crop"], config["train"]["rotation"]) == (0, 0.0)
    model = load_checkpoint(run_dir / ("capsnet" if name == "affnist" else "") / "best.pt")
    assert model["model_config"]["image_size"] == canvas
