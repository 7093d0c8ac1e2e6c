"""``capsnet bench``: every registered network timed beside its own convolutions, its losses,
its refusals, and the epoch timing on the tiny data set."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from capsnet.errors import CapsNetError
from capsnet.nn.base import CapsNetOutput
from capsnet.nn.em_routing import spread_loss
from capsnet.nn.losses import reconstruction_loss
from capsnet.nn.registry import MODELS, model_config
from capsnet.tools import bench
from capsnet.tools.bench import (SPREAD_MARGIN, bench_epoch, benchmark,
                                 train_step)
from capsnet.training.evaluate import network_loss
from capsnet.training.config import make_config
from capsnet.utils import memory
from capsnet.utils.memory import FLOAT, capsnet_image_bytes, capsnet_state_bytes
from conftest import copy_docs, refuses_in_one_line, tables

CPU = torch.device("cpu")
# The modules each network's floor must hold: its convolutional layers up to the capsules.
FLOOR = {
    "capsnet": lambda m: [m.conv1, m.primary.conv],
    "efficient-capsnet": lambda m: [*(layer for layer in m.features
                                      if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d))),
                                    m.primary.conv],
    "em-capsnet": lambda m: [m.conv1, m.primary.pose, m.primary.activation],
    "em-capsnet-small": lambda m: [m.conv1, m.primary.pose, m.primary.activation],
}
TINY_EM = dict(image_size=13, conv1_channels=4, primary_types=2, caps1_types=2, caps2_types=2,
               num_classes=3)


def test_every_registered_network_has_a_floor() -> None:
    assert set(FLOOR) == set(MODELS)


@pytest.mark.parametrize("name", list(MODELS))
def test_the_floor_is_the_networks_own_convolutions(name: str, one_thread) -> None:
    model = MODELS[name].model(model_config(name))
    floor = model.convolutions()
    holding = [m for m in floor.modules() if list(m.parameters(recurse=False))]
    assert [id(m) for m in holding] == [id(m) for m in FLOOR[name](model)]
    model_tensors = {p.data_ptr() for p in model.parameters()}
    assert {p.data_ptr() for p in floor.parameters()} <= model_tensors  # shared, not copied
    floor(torch.rand(2, 1, 28, 28))  # it runs on the network's images


@pytest.mark.parametrize("name", ["capsnet", "efficient-capsnet"])
def test_each_rate_comes_with_its_floors_and_their_ratio(name: str, one_thread) -> None:
    result = benchmark(CPU, "fp32", False, None, 2, 2, 0, 1, network=name)
    assert result["network"] == name and result["routing"] in ("kernel", "torch")
    model = MODELS[name].model(model_config(name))
    assert result["kernel"] == model.routing_kernel(CPU)
    assert (result["kernel"] is None) == (result["routing"] == "torch")
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    for kind in ("train", "infer"):
        rate, floor = result[f"{kind}_images_per_s"], result[f"convs_{kind}_images_per_s"]
        assert rate > 0 and floor > 0 and result[f"{kind}_ratio"] == rate / floor
    assert result["routing_iterations"] == (3 if name == "capsnet" else None)
    assert result["peak_memory_mb"] > 0 and result["first_calls_seconds"] > 0


def test_the_spread_loss_network_trains_a_step(one_thread) -> None:
    torch.manual_seed(0)
    model = MODELS["em-capsnet-small"].model(model_config("em-capsnet-small", **TINY_EM))
    before = [p.detach().clone() for p in model.parameters()]
    images, labels = torch.rand(2, 1, 13, 13), torch.tensor([0, 2])
    train_step(model, torch.optim.Adam(model.parameters()), images, labels, loss="spread")
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("decoder", [False, True], ids=["no decoder", "decoder"])
def test_the_spread_loss_adds_the_reconstruction_only_with_a_decoder(decoder: bool) -> None:
    images, labels = torch.rand(2, 1, 2, 2), torch.tensor([0, 1])
    scores = torch.tensor([[0.9, 0.2], [0.6, 0.4]])
    reconstructions = torch.zeros(2, 1, 2, 2) if decoder else torch.zeros(2, 0)
    out = CapsNetOutput(torch.zeros(2, 2, 16), scores, scores.argmax(1), reconstructions)
    spread = spread_loss(scores, labels, SPREAD_MARGIN)
    recon = reconstruction_loss(reconstructions, images)
    assert (recon > 0) == decoder
    total, class_loss, reconstruction = network_loss(out, images, labels, "spread",
                                                     SPREAD_MARGIN, bench.RECONSTRUCTION_WEIGHT)
    assert torch.equal(total, spread + bench.RECONSTRUCTION_WEIGHT * recon)
    assert torch.equal(class_loss, spread) and torch.equal(reconstruction, recon)


def test_a_bench_of_smaller_images_times_the_network_on_them(one_thread) -> None:
    """A run on 24x24 crops is compared with benches of 24x24 images (its record's ratio)."""
    result = benchmark(CPU, "fp32", False, 2, 2, 2, 0, 1, network="em-capsnet-small",
                       image_size=24)
    assert result["image_size"] == 24
    model = MODELS["em-capsnet-small"].model(model_config("em-capsnet-small", image_size=24))
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["train_images_per_s"] > 0 and result["convs_train_images_per_s"] > 0


@pytest.mark.parametrize("name", ["capsnet", "em-capsnet"])
def test_memory_is_checked_for_the_chosen_network(name: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    config = model_config(name, routing_iterations=3)
    batch = 8  # room for this network's training batch of 8 with its inputs, not for 9
    room = capsnet_state_bytes(config, training=True) + batch * (
        capsnet_image_bytes(config, training=True) + FLOAT * config.image_pixels)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": room)
    monkeypatch.setattr(bench, "bench_model", lambda *a, **k: {})  # no timing: the check only
    benchmark(CPU, "fp32", False, None, batch, 1, 0, 1, network=name)
    with pytest.raises(CapsNetError, match="a training batch of 9 images .* lower --train-batch"):
        benchmark(CPU, "fp32", False, None, batch + 1, 1, 0, 1, network=name)


@pytest.mark.parametrize("argv, expected", [
    (["--network", "efficient-capsnet", "--routing-iterations", "3"],
     "--routing-iterations: efficient-capsnet routes in one pass, without iterations"),
    (["--network", "em-capsnet", "--epoch"],
     "--epoch times the paper preset's CapsNet epoch only, not em-capsnet's"),
    (["--epoch", "--image-size", "24"],
     "--epoch times the paper preset's epoch of 28x28 MNIST images; drop --epoch or --image-size"),
    (["--network", "em-capsnet-small", "--image-size", "12"],
     "image_size must be an integer in [13, 4,096], got 12"),
], ids=["routing-iterations", "epoch", "epoch-image-size", "image-size-too-small"])
def test_what_another_network_cannot_take_is_refused_in_one_line(
        argv: list[str], expected: str, tmp_path: Path) -> None:
    refuses_in_one_line(["bench", "--device", "cpu", *argv], tmp_path, expected)


def test_a_networks_bench_record_fills_its_routings_row(tmp_path: Path) -> None:
    docs = copy_docs(tmp_path)
    device = "cpu (Test CPU, 2 threads)"
    run = docs / "runs" / "efficient-run"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({
        "test_accuracy": 0.99, "device": device, "precision": "bf16", "compiled": True,
        "train_images_per_s": 50.0}))
    (run / "config.json").write_text(json.dumps({"train": {"network": "efficient-capsnet",
                                                           "preset": "efficient"}}))
    record = docs / "runs" / "bench-efficient"
    record.mkdir()
    (record / "summary.json").write_text(json.dumps({
        "network": "efficient-capsnet", "device": device, "precision": "bf16", "compile": True,
        "date": "2999-01-01", "train_images_per_s": 50.0, "convs_train_images_per_s": 100.0,
        "infer_images_per_s": 80.0, "convs_infer_images_per_s": 100.0}))

    def routings_row() -> str:
        assert tables(docs).returncode == 0
        routings = (docs / "RESULTS.md").read_text().split("<!-- begin table: routings")[1]
        return next(row for row in routings.splitlines() if "[runs/efficient-run]" in row)

    assert routings_row().startswith("| `efficient-capsnet`")
    assert f"| 0.50x | {device} |" in routings_row()
    # the bench table names the network and its images (28x28 where a record does not say)
    assert f"| `efficient-capsnet` | 28×28 | {device} |" in (docs / "PERFORMANCE.md").read_text()
    # a record in another precision is another measurement: not the run's
    summary = json.loads((record / "summary.json").read_text())
    (record / "summary.json").write_text(json.dumps({**summary, "precision": "fp32"}))
    assert "0.50x" not in routings_row()


@pytest.mark.slow
def test_the_timed_epoch_trains_every_image_after_the_untimed_one(tiny_dataset: Path,
                                                                 one_thread) -> None:
    config = make_config("seed", dataset=str(tiny_dataset), batch_size=50, val_size=40,
                         device="cpu", eval_batch_size=100)
    result = bench_epoch(config, None)
    assert result["epoch_images"] == 200  # 240 training images less the 40 held out
    assert result["epoch_seconds"] > 0 and result["epoch_train_images_per_s"] > 0
