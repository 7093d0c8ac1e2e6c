"""The weights' moving average (--ema-decay, capsnet.training.average): the update by hand,
its warmup, training itself untouched by it, what the checkpoints keep, exact resume, and
refusals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch import nn

from capsnet.cli import main
from capsnet.training.average import WeightAverage
from capsnet.training.checkpoint import load_checkpoint, save_checkpoint
from capsnet.training.config import TrainConfig, make_config

pytestmark = pytest.mark.usefixtures("one_thread")

DECAY = 0.75


def test_an_update_moves_each_weight_part_of_the_way_and_copies_counts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    average = WeightAverage(model, DECAY)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
    model[1].num_batches_tracked.fill_(7)
    average.update(0)
    after = average.model.state_dict()
    for name, weight in model.state_dict().items():
        if weight.is_floating_point():
            expected = before[name] + (1 - DECAY) * (weight - before[name])
            torch.testing.assert_close(after[name], expected, msg=name)
        else:
            assert torch.equal(after[name], weight), name
    assert not torch.equal(after["0.weight"], model[0].weight)
    assert not average.model.training and not any(p.requires_grad
                                                  for p in average.model.parameters())


def test_the_warmup_lowers_the_decay_of_the_first_steps_only() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    average = WeightAverage(model, 0.999, warmup=True)
    assert [average.decay_at(t) for t in (0, 1, 90)] == [0.1, 2 / 11, 0.91]
    assert average.decay_at(9_000) == average.decay_at(10**6) == 0.999
    assert WeightAverage(model, 0.999).decay_at(0) == 0.999
    before = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    average.update(0)
    torch.testing.assert_close(average.model.weight, before + 0.9)


def test_a_stored_config_from_before_the_warmup_resumes_without_it() -> None:
    stored = {k: v for k, v in make_config("paper", ema_decay=0.999).to_dict().items()
              if k != "ema_warmup"}
    assert make_config("paper").ema_warmup and not TrainConfig.from_dict(stored).ema_warmup


def test_an_average_starts_from_a_given_state_and_refuses_a_decay_outside_0_1() -> None:
    model, other = nn.Linear(2, 2), nn.Linear(2, 2)
    average = WeightAverage(model, DECAY, other.state_dict())
    assert torch.equal(average.model.weight, other.weight)
    for decay in (0.0, 1.0, -0.5):
        with pytest.raises(ValueError, match="decay must be in"):
            WeightAverage(model, decay)


def cli(args: list[Any], capsys: pytest.CaptureFixture) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def tiny_args(dataset: Path, run_dir: Path, epochs: int) -> list[Any]:
    """Epochs of 2 steps of 8 images of Efficient-CapsNet (small, and its batch norms have
    buffers to average), on the CPU, deterministic."""
    return ["train", "--network", "efficient-capsnet", "--dataset", dataset, "--device", "cpu",
            "--deterministic", "--no-progress",
            "--train-limit", 16, "--batch-size", 8, "--val-size", 10, "--epochs", epochs,
            "--run-dir", run_dir]


@pytest.fixture(scope="module")
def runs(tiny_dataset: Path, module_tmp: Callable[[str], Path]) -> dict[str, Path]:
    """The same 2 epochs without and with the average, on one thread as the tests run (the
    last bits of a sum depend on the thread count)."""
    root = module_tmp("average")
    folders = {"plain": root / "plain", "averaged": root / "averaged"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main([str(a) for a in tiny_args(tiny_dataset, folders["plain"], 2)]) == 0
        assert main([str(a) for a in [*tiny_args(tiny_dataset, folders["averaged"], 2),
                                      "--ema-decay", DECAY]]) == 0
    finally:
        torch.set_num_threads(threads)
    return folders


def test_the_average_leaves_training_as_it_was(runs: dict[str, Path]) -> None:
    plain = load_checkpoint(runs["plain"] / "last.pt")
    averaged = load_checkpoint(runs["averaged"] / "last.pt")
    assert "training_weights" not in plain
    for name, weight in plain["model"].items():
        assert torch.equal(averaged["training_weights"][name], weight), name
    assert any(not torch.equal(averaged["model"][n], w) for n, w in plain["model"].items())
    assert plain["progress"]["step"] == averaged["progress"]["step"] == 4


@pytest.mark.parametrize("warmup, decay", [("--ema-warmup", 0.1), ("--no-ema-warmup", DECAY)])
def test_one_step_from_known_weights_gives_the_average_by_hand(
        runs: dict[str, Path], tiny_dataset: Path, tmp_path: Path, capsys, warmup: str,
        decay: float) -> None:
    start = load_checkpoint(runs["plain"] / "last.pt")["model"]
    args = tiny_args(tiny_dataset, tmp_path / "run", 1)
    args[args.index("--train-limit") + 1] = 8  # one step
    code, _, err = cli([*args, "--init-from", runs["plain"] / "last.pt", "--ema-decay", DECAY,
                        warmup], capsys)
    assert code == 0, err
    saved = load_checkpoint(tmp_path / "run" / "last.pt")
    for name, first in start.items():
        trained = saved["training_weights"][name]
        if first.is_floating_point():
            torch.testing.assert_close(saved["model"][name], torch.lerp(first, trained, 1 - decay),
                                       msg=name)


def test_resume_continues_the_average_exactly(runs: dict[str, Path], tiny_dataset: Path,
                                              tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    code, _, err = cli([*tiny_args(tiny_dataset, run_dir, 1), "--ema-decay", DECAY], capsys)
    assert code == 0, err
    code, _, err = cli(["train", "--resume", run_dir, "--epochs", 2, "--no-progress"], capsys)
    assert code == 0, err
    mine, theirs = (load_checkpoint(d / "last.pt") for d in (run_dir, runs["averaged"]))
    for key in ("model", "training_weights"):
        for name, weight in theirs[key].items():
            assert torch.equal(mine[key][name], weight), (key, name)


def assert_validation_measured_best(run_dir: Path, capsys: pytest.CaptureFixture,
                                    rel: float = 1e-5) -> None:
    """The run's best.pt, evaluated on the validation set, gives its best epoch's numbers
    (the loss to ``rel``: evaluate runs eagerly)."""
    code, out, err = cli(["evaluate", run_dir, "--split", "val", "--json"], capsys)
    assert code == 0, err
    measured = json.loads(out)
    epochs = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()
              if '"val_loss"' in line]
    best = next(e for e in reversed(epochs) if e["improved"])
    assert measured["accuracy"] == best["val_accuracy"]
    assert measured["loss"] == pytest.approx(best["val_loss"], rel=rel)


def test_the_best_checkpoint_holds_the_average_that_validation_measured(
        runs: dict[str, Path], capsys) -> None:
    assert_validation_measured_best(runs["averaged"], capsys)
    summary = json.loads((runs["averaged"] / "summary.json").read_text())
    code, out, err = cli(["evaluate", runs["averaged"], "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["accuracy"] == summary["test_accuracy"]


@pytest.mark.slow
def test_a_compiled_run_validates_the_average_it_keeps(tiny_dataset: Path, tmp_path: Path,
                                                       capsys) -> None:
    """The compiled average sees the weights its updates write in place."""
    run_dir = tmp_path / "run"
    code, _, err = cli([*tiny_args(tiny_dataset, run_dir, 2), "--ema-decay", DECAY,
                        "--compile", "on"], capsys)
    assert code == 0, err
    assert_validation_measured_best(run_dir, capsys, rel=1e-4)


def assert_one_line(code: int, err: str, needle: str) -> None:
    lines = err.splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("capsnet: "), err
    assert needle in lines[0], lines[0]


def test_resume_refuses_another_decay_and_a_checkpoint_without_training_weights(
        runs: dict[str, Path], tmp_path: Path, capsys) -> None:
    code, _, err = cli(["train", "--resume", runs["averaged"], "--epochs", 3, "--ema-decay", 0.5],
                      capsys)
    assert_one_line(code, err, "ema")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    payload = load_checkpoint(runs["averaged"] / "last.pt")
    del payload["training_weights"]
    save_checkpoint(run_dir / "last.pt", payload)
    code, _, err = cli(["train", "--resume", run_dir, "--epochs", 3], capsys)
    assert_one_line(code, err, "has no training_weights")
    assert (run_dir / "last.pt").is_file()


@pytest.mark.parametrize("damage, needle", [
    (lambda weights: "not a dict", "training_weights is not a dict"),
    (lambda weights: {**weights, "extra": torch.zeros(2)}, "training_weights"),
    (lambda weights: {name: w.new_full(w.shape, float("nan")) if w.is_floating_point() else w
                      for name, w in weights.items()}, "holds NaN or infinite values"),
])
def test_damaged_training_weights_are_refused_in_one_line(
        runs: dict[str, Path], tmp_path: Path, capsys, damage, needle: str) -> None:  # noqa: ANN001
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    payload = load_checkpoint(runs["averaged"] / "last.pt")
    payload["training_weights"] = damage(payload["training_weights"])
    save_checkpoint(run_dir / "last.pt", payload)
    code, _, err = cli(["train", "--resume", run_dir, "--epochs", 3], capsys)
    assert_one_line(code, err, needle)
