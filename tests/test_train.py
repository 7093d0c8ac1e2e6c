"""The training loop's choices: which checkpoint is tested, what the summary says."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from capsnet.training import trainer as train_module
from capsnet.training.checkpoint import load_checkpoint, model_from_checkpoint
from capsnet.training.config import make_config
from capsnet.errors import CapsNetError
from capsnet.training.evaluate import evaluate


def test_a_run_that_gets_worse_reports_the_test_score_of_best_pt(
        tiny_dataset: Path, tmp_path: Path, monkeypatch, one_thread) -> None:
    config = make_config("seed", dataset=str(tiny_dataset), epochs=3, batch_size=20,
                         val_size=40, device="cpu", eval_batch_size=100)
    trainer = train_module.Trainer(config, tmp_path / "run", progress=False)
    scripted = iter([0.5, 0.2, 0.9])  # epoch 2 is the best; epoch 3 gets worse
    tested: list[dict[str, torch.Tensor]] = []
    real = train_module.evaluate

    def scripted_validation(model, split, **kwargs):
        result = real(model, split, **kwargs)
        if split is trainer.splits.val:
            return replace(result, loss=next(scripted))
        tested.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return result

    monkeypatch.setattr(train_module, "evaluate", scripted_validation)
    summary = trainer.fit()

    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
    assert [r["improved"] for r in records] == [True, True, False]
    best, last = (load_checkpoint(tmp_path / "run" / name) for name in ("best.pt", "last.pt"))
    assert best["progress"]["epoch"] == 2 and last["progress"]["epoch"] == 3
    assert summary["checkpoint"] == str(tmp_path / "run" / "best.pt")
    assert summary["best_val_loss"] == 0.2
    # The one test evaluation saw best.pt's weights, which differ from the last ones.
    assert len(tested) == 1
    assert all(torch.equal(tested[0][k], best["model"][k]) for k in best["model"])
    assert not all(torch.equal(last["model"][k], best["model"][k]) for k in best["model"])
    model = model_from_checkpoint(best, "best.pt")
    again = evaluate(model, trainer.splits.test, batch_size=100,
                     reconstruction_weight=config.reconstruction_weight,
                     reduction=config.reconstruction_reduction)
    assert summary["test_accuracy"] == again.accuracy


def test_init_from_starts_a_new_run_from_the_weights_and_optimizer_state(
        tiny_dataset: Path, tmp_path: Path, one_thread) -> None:
    config = make_config("seed", dataset=str(tiny_dataset), epochs=1, batch_size=50,
                         val_size=40, device="cpu", eval_batch_size=100)
    train_module.train(config, tmp_path / "first", progress=False)
    best = load_checkpoint(tmp_path / "first" / "best.pt")
    trainer = train_module.Trainer(config, tmp_path / "second", progress=False,
                                   init_from=tmp_path / "first" / "best.pt")
    assert all(torch.equal(v, best["model"][k]) for k, v in trainer.model.state_dict().items())
    adam = trainer.optimizer.state_dict()["state"]
    assert adam and all(torch.equal(adam[i]["exp_avg"], best["optimizer"]["state"][i]["exp_avg"])
                        for i in adam)
    assert trainer.progress["epoch"] == 0 and trainer.progress["step"] == 0
    summary = trainer.fit()
    assert summary["epochs"] == 1
    config_json = json.loads((tmp_path / "second" / "config.json").read_text())
    assert config_json["init_from"] == str(tmp_path / "first" / "best.pt")


def test_init_from_refuses_a_different_model(tiny_dataset: Path, tmp_path: Path,
                                             one_thread) -> None:
    config = make_config("seed", dataset=str(tiny_dataset), epochs=1, batch_size=50,
                         val_size=40, device="cpu", eval_batch_size=100)
    train_module.train(config, tmp_path / "first", progress=False)
    other = replace(config, routing_iterations=3)
    with pytest.raises(CapsNetError, match="its model differs from this run's"):
        train_module.Trainer(other, tmp_path / "second", progress=False,
                             init_from=tmp_path / "first" / "best.pt")
