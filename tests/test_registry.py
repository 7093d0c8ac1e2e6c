"""The routing family: every registered network trains with the one Trainer, is stored with
its architecture, and loads back the same way from every kind of file."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from capsnet.errors import CapsNetError
from capsnet.nn.em_routing import spread_loss, spread_margin
from capsnet.nn.losses import margin_loss
from capsnet.nn.registry import ARCHITECTURES, MODELS, load_model, model_config
from capsnet.training.config import make_config, model_config_for
from capsnet.training.evaluate import evaluate
from capsnet.training.task import Classification
from capsnet.training.trainer import Trainer
from capsnet.data.splits import Split
from capsnet.tools.explore import make_server
from conftest import serving
from test_cli import cli
from test_explore import bar_image, request


def split(n: int, seed: int) -> Split:
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g),
                 torch.randint(0, 10, (n,), generator=g))


def trained_run(network: str, folder: Path) -> Trainer:
    config = make_config("paper", network=network, epochs=1, batch_size=8, val_size=8,
                         eval_batch_size=8, device="cpu", compile="off", log_every=0)
    task = Classification(config, split(16, 0), split(8, 1), split(8, 2), num_classes=10,
                          prepare="mnist")
    trainer = Trainer(task, folder, show_progress=False)
    trainer.fit()
    return trainer


def test_every_entry_builds_its_own_model_from_its_config() -> None:
    for name, entry in MODELS.items():
        config = model_config(name, image_size=28, in_channels=1, num_classes=10)
        assert isinstance(config, entry.config)
        assert ARCHITECTURES[entry.architecture] == (entry.model, entry.config)


def test_a_network_flag_picks_the_model_and_its_iterations() -> None:
    config = make_config("paper", network="em-capsnet-small", routing_iterations=2)
    em = model_config_for(config, 28, 1, 10)
    assert (em.conv1_channels, em.primary_types, em.routing_iterations) == (64, 8, 2)
    efficient = model_config_for(make_config("efficient"), 28, 1, 10)
    assert efficient.classifier_parameter_count == 161_824


def test_an_unknown_network_is_one_line() -> None:
    with pytest.raises(CapsNetError, match="network"):
        make_config("paper", network="dynamic")


def test_cuda_graphs_are_refused_for_a_loss_that_changes_every_step() -> None:
    with pytest.raises(CapsNetError, match="spread loss"):
        make_config("em", cuda_graphs=True, device="cuda")


@pytest.mark.slow
@pytest.mark.parametrize("network", ["efficient-capsnet", "em-capsnet-small"])
def test_each_network_trains_and_loads_back_from_every_kind_of_file(network: str,
                                                                    tmp_path: Path) -> None:
    trainer = trained_run(network, tmp_path / "run")
    entry = MODELS[network]
    images = split(4, 3).images.float() / 255
    expected = trainer.best_model().eval()(images).lengths
    from_run = load_model(tmp_path / "run")
    assert type(from_run) is entry.model
    from_run.save_pretrained(tmp_path / "saved")
    for source in (tmp_path / "run", tmp_path / "run" / "best.pt", tmp_path / "saved",
                   tmp_path / "saved" / "model.safetensors"):
        model = load_model(source)
        assert type(model) is entry.model and model.config == from_run.config
        torch.testing.assert_close(model(images).lengths, expected)


def test_the_spread_margin_follows_the_optimiser_step(tmp_path: Path) -> None:
    config = make_config("em", network="em-capsnet-small", epochs=2, batch_size=8)
    task = Classification(config, split(16, 0), split(8, 1), split(8, 2), num_classes=10)
    assert (task.best_metric, task.higher_is_better) == ("accuracy", True)
    task.schedule(0, 4)
    assert task.margin == pytest.approx(0.2)
    task.schedule(2, 4)
    assert task.margin == pytest.approx(spread_margin(2, 4)) == pytest.approx(0.55)
    # over the first of the two epochs' four steps
    ramped = Classification(replace(config, margin_ramp_epochs=1), split(16, 0), split(8, 1),
                            split(8, 2), num_classes=10)
    for step, margin in ((1, 0.55), (2, 0.9), (3, 0.9)):
        ramped.schedule(step, 4)
        assert ramped.margin == pytest.approx(margin)
    margin_task = Classification(make_config("efficient"), split(16, 0), split(8, 1),
                                 split(8, 2), num_classes=10)
    assert margin_task.best_metric == "loss"


@pytest.fixture(scope="module")
def tiny_runs(tiny_dataset: Path, module_tmp) -> dict[str, Path]:
    """A run of two steps of Efficient-CapsNet and of the small EM network (no decoder) on
    the tiny data set, as the CLI trains them."""
    runs = {}
    for network, preset in (("efficient-capsnet", "efficient"), ("em-capsnet-small", "em")):
        runs[network] = module_tmp("tiny-runs") / network
        code, _, err = cli("train", "--preset", preset, "--network", network, "--dataset",
                           tiny_dataset, "--val-size", "40", "--train-limit", "32",
                           "--batch-size", "16", "--epochs", "1", "--device", "cpu",
                           "--compile", "off", "--no-progress", "--run-dir", runs[network])
        assert code == 0, err
    return runs


@pytest.mark.slow
def test_figures_draw_what_each_network_has(tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    for network, run in tiny_runs.items():
        code, _, err = cli("figures", run, "--out", tmp_path / network, "--samples", "2")
        assert code == 0, err
        drawn = sorted(path.name for path in (tmp_path / network).iterdir())
        if network == "em-capsnet-small":  # no decoder: nothing to reconstruct
            assert drawn == ["curves.png", "samples.png"]
        else:
            assert "reconstructions.png" in drawn and len(drawn) == 3 + 16  # 16 pose dims


@pytest.mark.slow
def test_explore_shows_efficient_capsnet_and_refuses_em_before_serving(
        tiny_runs: dict[str, Path], tiny_dataset: Path) -> None:
    run = tiny_runs["efficient-capsnet"]
    with serving(make_server(run, "127.0.0.1", 0, dataset=str(tiny_dataset))) as server:
        status, result = request(server, "POST", "/api/predict", {"image": bar_image()})
        assert status == 200, result
        config = server.explorer.model.config
        assert np.asarray(result["coupling"]).shape == (
            config.primary_maps, config.primary_grid, config.primary_grid)
        assert len(result["pose"]) == config.digit_dim
    with pytest.raises(CapsNetError, match="explore shows vector capsules.*em-capsnet model"):
        make_server(tiny_runs["em-capsnet-small"], "127.0.0.1", 0, dataset=str(tiny_dataset))


@pytest.mark.slow
def test_a_spread_loss_run_resumed_for_more_epochs_keeps_its_margin_ramp(
        tiny_runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["em-capsnet-small"], run)
    code, _, err = cli("train", "--resume", run, "--epochs", "2", "--no-progress")
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())["train"]
    assert (config["epochs"], config["margin_ramp_epochs"]) == (2, 1)
    # resumed again with the same epochs: the pinned ramp is now the run's own setting
    code, _, err = cli("train", "--resume", run, "--epochs", "2", "--no-progress")
    assert code == 0, err


def test_evaluation_reports_the_loss_each_network_trains_with() -> None:
    data = split(12, 3)
    images = data.images.float() / 255
    for network in ("em-capsnet-small", "efficient-capsnet"):
        torch.manual_seed(0)
        model = MODELS[network].model(model_config(network)).eval()
        kind = MODELS[network].loss
        result = evaluate(model, data, batch_size=5, loss_kind=kind)
        with torch.no_grad():
            out = model(images)
        want = (spread_loss(out.lengths, data.labels, 0.9) if kind == "spread"
                else margin_loss(out.lengths, data.labels))
        assert result.class_loss == pytest.approx(want.item(), rel=1e-5)
        other = "margin_loss" if kind == "spread" else "spread_loss"
        assert f"{kind}_loss" in result.to_dict() and other not in result.to_dict()
