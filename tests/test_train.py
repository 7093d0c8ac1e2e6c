"""The training loop's choices: which checkpoint is tested, warm starts, any Dataset."""

from __future__ import annotations

import json
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from capsnet.data.batching import batches
from capsnet.data.splits import Split, load_splits
from capsnet.errors import CapsNetError
from capsnet.training.checkpoint import load_checkpoint, model_from_checkpoint
from capsnet.nn.losses import capsule_loss
from capsnet.nn.model import CapsNet
from capsnet.training.config import make_config, model_config_for
from capsnet.training.evaluate import evaluate
from capsnet.training.task import Classification
from capsnet.training.run import Run
from capsnet.training.trainer import Trainer, train


def tiny_config(tiny_dataset: Path, **overrides):
    """The seed preset on the tiny data set, with 2 primary capsule maps (not 32): a tenth of
    the arithmetic, and the same training engine."""
    return make_config("seed", **{"dataset": str(tiny_dataset), "epochs": 1, "batch_size": 50,
                                  "val_size": 40, "device": "cpu", "eval_batch_size": 100,
                                  "primary_maps": 2, **overrides})


class ScriptedValidation(Classification):
    """Validation losses and accuracies from a script (measured ones once it runs out);
    records the weights the test sees."""

    def __init__(self, *args, losses=(), accuracies=(), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.script = {"loss": iter(losses), "accuracy": iter(accuracies)}
        self.tested: list[dict[str, torch.Tensor]] = []

    def validate(self, model, device, world):
        measured = super().validate(model, device, world)
        return {name: next(self.script[name], value) for name, value in measured.items()}

    def test(self, model, device, world):
        self.tested.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return super().test(model, device, world)


@pytest.mark.slow
def test_a_run_that_gets_worse_reports_the_test_score_of_best_pt(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    config = tiny_config(tiny_dataset, epochs=3, batch_size=20)
    splits = load_splits(config.dataset, val_size=config.val_size)
    task = ScriptedValidation(config, splits.train, splits.val, splits.test, num_classes=10,
                              losses=[0.5, 0.2, 0.9])  # epoch 2 is the best; epoch 3 is worse
    summary = Trainer(task, tmp_path / "run", show_progress=False).fit()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["improved"] for r in records] == [True, True, False]
    best, last = (load_checkpoint(tmp_path / "run" / name) for name in ("best.pt", "last.pt"))
    assert best["progress"]["epoch"] == 2 and last["progress"]["epoch"] == 3
    assert summary["checkpoint"] == str(tmp_path / "run" / "best.pt")
    assert summary["best_val_loss"] == 0.2
    # The one test evaluation saw best.pt's weights, which differ from the last ones.
    assert len(task.tested) == 1
    assert all(torch.equal(task.tested[0][k], best["model"][k]) for k in best["model"])
    assert not all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])
    again = evaluate(model_from_checkpoint(best), splits.test, batch_size=100,
                     reconstruction_weight=config.reconstruction_weight,
                     reduction=config.reconstruction_reduction)
    assert summary["test_accuracy"] == again.accuracy
    # the routing kernel the model ran in, by name and hash, or none (torch)
    assert summary["kernel"] == model_from_checkpoint(best).routing_kernel(torch.device("cpu"))


@pytest.mark.slow
def test_init_from_starts_a_new_run_from_the_weights_and_optimizer_state(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    config = tiny_config(tiny_dataset)
    train(config, tmp_path / "first", show_progress=False)
    best = load_checkpoint(tmp_path / "first" / "best.pt")
    trainer = Trainer(Classification.from_config(config), tmp_path / "second",
                      show_progress=False, init_from=tmp_path / "first" / "best.pt")
    assert all(torch.equal(v, best["model"][k]) for k, v in trainer.model.state_dict().items())
    adam = trainer.optimizer.state_dict()["state"]
    assert adam and all(torch.equal(adam[i]["exp_avg"], best["optimizer"]["state"][i]["exp_avg"])
                        for i in adam)
    assert trainer.progress.epoch == 0 and trainer.progress.step == 0
    summary = trainer.fit()
    assert summary["epochs"] == 1
    config_json = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config_json["init_from"] == str(tmp_path / "first" / "best.pt")


@pytest.mark.slow
def test_a_resumed_run_keeps_where_it_started_and_its_earlier_time(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    config = tiny_config(tiny_dataset)
    train(config, tmp_path / "first", show_progress=False)
    origin = tmp_path / "first" / "best.pt"
    first = Trainer(Classification.from_config(config), tmp_path / "second",
                    show_progress=False, init_from=origin).fit()
    resumed = Trainer(Classification.from_config(replace(config, epochs=2)), tmp_path / "second",
                      show_progress=False, resume=True)
    assert resumed.progress.init_from == str(origin)
    summary = resumed.fit()
    assert summary["epochs"] == 2 and summary["wall_seconds"] > first["wall_seconds"]
    config_json = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config_json["init_from"] == str(origin)


def test_init_from_refuses_a_different_model(tiny_dataset: Path, tmp_path: Path,
                                             one_thread) -> None:
    config = tiny_config(tiny_dataset)
    train(config, tmp_path / "first", show_progress=False)
    other = replace(config, routing_iterations=3)
    with pytest.raises(CapsNetError, match="does not fit this run's data and settings"):
        Trainer(Classification.from_config(other), tmp_path / "second", show_progress=False,
                init_from=tmp_path / "first" / "best.pt")


@pytest.mark.slow
@pytest.mark.parametrize("wrap", ["dataset", "loader"])
def test_a_plain_dataset_trains_exactly_as_the_in_memory_split(
        tiny_dataset: Path, tmp_path: Path, one_thread, wrap: str) -> None:
    config = tiny_config(tiny_dataset, epochs=2, batch_size=32, max_shift=2)
    splits = load_splits(config.dataset, val_size=config.val_size)

    def plain(split):  # what a PyTorch user has: float images in [0, 1], int labels
        dataset = TensorDataset(split.images.float() / 255, split.labels)
        return dataset if wrap == "dataset" else DataLoader(dataset, batch_size=7, num_workers=0)

    fast = Trainer(Classification.from_splits(config, splits), tmp_path / "fast",
                   show_progress=False)
    fast.fit()
    task = Classification(config, *(plain(s) for s in (splits.train, splits.val, splits.test)),
                          num_classes=splits.num_classes)
    general = Trainer(task, tmp_path / "general", show_progress=False)
    general.fit()
    for name, tensor in fast.model.state_dict().items():
        assert torch.equal(tensor, general.model.state_dict()[name]), name


@pytest.mark.slow
def test_the_mnist_run_is_the_plain_training_loop(tiny_dataset: Path, tmp_path: Path,
                                                  one_thread) -> None:
    """The Trainer adds checkpoints, logs, validation and resume around the loop below and
    changes nothing in it: the same weights, bit for bit (shifts and lr decay included)."""
    config = make_config("paper", dataset=str(tiny_dataset), epochs=2, batch_size=32,
                         val_size=40, device="cpu", lr_decay=0.5, lr_decay_steps=3,
                         primary_maps=2)
    trainer = Trainer(Classification.from_config(config), tmp_path / "run", show_progress=False)
    trainer.fit()

    splits = load_splits(config.dataset, val_size=config.val_size)
    torch.manual_seed(config.seed)
    model = CapsNet(model_config_for(config, 28, 1, 10))
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, fused=True)  # as on a CPU
    step = 0
    for epoch in range(config.epochs):
        for images, labels in batches(splits.train, config.batch_size,
                                      seed=config.seed * 1_000_003 + epoch,
                                      max_shift=config.max_shift):
            optimizer.param_groups[0]["lr"] = config.lr * 0.5 ** (step / 3)
            out = model(images, labels)
            loss, _, _ = capsule_loss(out.lengths, out.reconstructions, images, labels, 0.0005, "sum")
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step += 1
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, trainer.model.state_dict()[name]), name


@pytest.mark.slow
def test_a_time_limit_stops_between_epochs_and_says_so(tiny_dataset: Path, tmp_path: Path,
                                                       one_thread) -> None:
    config = tiny_config(tiny_dataset, epochs=50, time_limit=1e-6)
    summary = train(config, tmp_path / "run", show_progress=False)
    assert summary["epochs"] == 1  # the first epoch always runs
    assert summary["cut_short"] == "time limit of 1e-06 s: stopped after epoch 1 of 50"
    assert train(tiny_config(tiny_dataset), tmp_path / "whole",
                 show_progress=False)["cut_short"] is None


@pytest.mark.slow
def test_stop_at_stops_after_the_first_epoch_reaching_it_and_resume_keeps_the_rule(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    config = tiny_config(tiny_dataset, epochs=6, batch_size=10, stop_at=0.9)
    splits = load_splits(config.dataset, val_size=config.val_size)
    train = Split(splits.train.images[:20], splits.train.labels[:20])  # 2 steps an epoch

    def fit(config, accuracies, resume=True):
        task = ScriptedValidation(config, train, splits.val, splits.test, num_classes=10,
                                  accuracies=accuracies)
        return Trainer(task, tmp_path / "run", resume=resume, show_progress=False).fit()

    summary = fit(config, [0.5, 0.95, 0.8], resume=False)
    assert (summary["epochs"], summary["steps"]) == (2, 4)
    assert summary["cut_short"] == ("validation accuracy 95.00% reached the stop at 90.00%: "
                                    "stopped after epoch 2 of 6")
    # Resumed under the same rule it trains no further; a higher target trains on to it.
    assert fit(config, [])["steps"] == 4
    summary = fit(replace(config, stop_at=0.97), [0.96, 0.98])
    assert summary["epochs"] == 4 and summary["cut_short"].endswith("after epoch 4 of 6")
    assert fit(replace(config, stop_at=0.0), [0.99, 0.99])["cut_short"] is None
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["val_accuracy"] for r in records][:4] == [0.5, 0.95, 0.96, 0.98]
    assert len(records) == 6


def test_training_leaves_the_process_settings_as_it_found_them(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    """--deterministic and the seed hold inside fit() only, also when it fails."""
    config = tiny_config(tiny_dataset, deterministic=True)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    assert not torch.are_deterministic_algorithms_enabled()
    train(config, tmp_path / "run", show_progress=False)
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.equal(torch.rand(3), expected)  # the caller's random stream is untouched

    switched_on = []

    class Failing(Classification):
        def validate(self, model, device, world):
            switched_on.append(torch.are_deterministic_algorithms_enabled())
            raise RuntimeError("validation failed")

    with pytest.raises(RuntimeError, match="validation failed"):
        Trainer(Failing.from_config(config), tmp_path / "failed", show_progress=False).fit()
    assert switched_on == [True] and not torch.are_deterministic_algorithms_enabled()


@pytest.mark.parametrize("epochs, compile_setting, compiled", [
    (3, "auto", True), (2, "auto", False), (2, "on", True), (3, "off", False)])
def test_auto_compiles_runs_long_enough_to_pay_for_it(tiny_dataset: Path, tmp_path: Path,
                                                      epochs: int, compile_setting: str,
                                                      compiled: bool) -> None:
    # 200 training images at batch 1: 200 steps an epoch; auto compiles from 500 steps on.
    config = tiny_config(tiny_dataset, epochs=epochs, batch_size=1, compile=compile_setting,
                         ema_decay=0.999)
    trainer = Trainer(Classification.from_config(config), tmp_path / "run", show_progress=False)
    assert trainer.compiled is compiled
    # the weights' average, which validation measures, is compiled with the model
    for model in (trainer.model, trainer.average.model):
        assert (model._compiled_call_impl is not None) is compiled


def test_the_training_curve_has_a_point_every_log_every_steps(tiny_dataset: Path, tmp_path: Path,
                                                             one_thread) -> None:
    config = tiny_config(tiny_dataset, epochs=2, batch_size=20, log_every=2)
    summary = train(config, tmp_path / "run", show_progress=False)
    run = Run(tmp_path / "run")
    epochs, skipped = run.read_metrics()
    points, _ = run.read_metrics(curve=True)
    assert skipped == 0 and [r["epoch"] for r in epochs] == [1, 2]
    steps_per_epoch = epochs[0]["step"]
    assert [p["step"] for p in points] == list(range(2, summary["steps"] + 1, 2))
    for point in points:
        assert point["epoch"] == pytest.approx(point["step"] / steps_per_epoch)
        assert 0 < point["train_accuracy"] <= 1 and point["train_loss"] > 0
    times = [p["unix_time"] for p in points]  # when written: status's speed in an epoch
    assert times == sorted(times) and times[-1] <= time.time()
    # the points of an epoch average to its record (every window here is 2 steps of 20)
    if steps_per_epoch % 2 == 0:
        first = [p["train_loss"] for p in points if p["step"] <= steps_per_epoch]
        assert sum(first) / len(first) == pytest.approx(epochs[0]["train_loss"], rel=1e-5)


def test_a_resume_drops_the_metrics_lines_past_its_checkpoint_step(tmp_path: Path) -> None:
    lines = [{"step": 2, "epoch": 0.5, "train_loss": 1.0}, {"step": 4, "epoch": 1, "val_loss": 1},
             {"step": 6, "epoch": 1.5, "train_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    Run(tmp_path).metrics_log(4).close()
    kept = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert kept == lines[:2]


class RecordingWriter:
    """Stands in for TensorBoard's SummaryWriter (an optional extra): keeps what it is given."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir, self.scalars, self.closed = log_dir, [], False

    def add_scalar(self, tag: str, value: float, step: int, walltime: float | None = None) -> None:
        self.scalars.append((tag, value, step, walltime))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


def test_metrics_are_mirrored_to_tensorboard_when_it_is_installed(tmp_path: Path,
                                                                   monkeypatch) -> None:
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = RecordingWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    log = Run(tmp_path).metrics_log(0)
    log.write({"step": 10, "epoch": 0.5, "train_loss": 0.25, "unix_time": 123.0})
    log.write({"step": 20, "epoch": 1, "val_accuracy": 0.75, "improved": True, "note": "x"})
    log.close()
    writer = log.writer
    assert writer.log_dir == str(tmp_path / "tensorboard") and writer.closed
    # curve points and epochs in their own groups, at the global step; flags and text skipped
    assert writer.scalars == [("steps/train_loss", 0.25, 10, 123.0),
                              ("epoch/val_accuracy", 0.75, 20, None)]
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
