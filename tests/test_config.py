"""Presets: every field of every preset pinned to its source."""

from __future__ import annotations

from dataclasses import fields

import pytest

from capsnet.training.config import PRESETS, TrainConfig, learning_rate, make_config
from capsnet.errors import CapsNetError

# Where a run is and how it is executed: not part of any source's recipe.
HOW = {"dataset": "mnist", "seed": 0, "device": "auto", "precision": "fp32", "compile": False,
       "deterministic": False, "eval_batch_size": 500}

# The tutorial notebook and the TensorFlow helper it calls (read_data_sets).
NOTEBOOK = {
    "epochs": 10, "batch_size": 50, "routing_iterations": 2, "lr": 1e-3, "lr_decay": 1.0,
    "lr_decay_steps": 2000, "max_shift": 0, "reconstruction_reduction": "mean",
    "reconstruction_weight": 0.0005, "margin_loss": "paper", "init": "glorot",
    "primary_style": "notebook", "routing_bias": False, "val_size": 5000, "val_split": "first",
    "train_limit": 0,
}

# The paper, and the official code where the paper is silent.
PAPER = {
    "epochs": 30, "batch_size": 128, "routing_iterations": 3, "lr": 1e-3, "lr_decay": 0.96,
    "lr_decay_steps": 2000, "max_shift": 2, "reconstruction_reduction": "sum",
    "reconstruction_weight": 0.0005, "margin_loss": "paper", "init": "official",
    "primary_style": "official", "routing_bias": True, "val_size": 5000, "val_split": "first",
    "train_limit": 0,
}

# The paper's model and losses, briefly, for a CPU.
QUICK = {**PAPER, "epochs": 1, "batch_size": 32, "train_limit": 30_000, "lr_decay": 1.0,
         "max_shift": 0}

EXPECTED = {"seed": NOTEBOOK, "paper": PAPER, "quick": QUICK}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_field_of_every_preset_is_pinned(preset: str) -> None:
    config = make_config(preset).to_dict()
    expected = {"preset": preset, **HOW, **EXPECTED[preset]}
    assert set(expected) == {f.name for f in fields(TrainConfig)}, "a field is not pinned"
    assert config == expected


def test_every_preset_is_pinned() -> None:
    assert set(PRESETS) == set(EXPECTED)


def test_paper_preset_is_the_default() -> None:
    assert TrainConfig() == make_config("paper")


def test_overrides_win_over_the_preset_and_none_is_ignored() -> None:
    config = make_config("seed", routing_iterations=3, init=None, val_split="last")
    assert (config.routing_iterations, config.init, config.val_split) == (3, "glorot", "last")


@pytest.mark.parametrize("field, value", [
    ("margin_loss", "half"), ("init", "xavier"), ("primary_style", "relu"),
    ("val_split", "middle"), ("reconstruction_reduction", "max")])
def test_choices_are_checked(field: str, value: str) -> None:
    with pytest.raises(CapsNetError, match=f"{field} must be one of"):
        make_config("paper", **{field: value})


def test_learning_rate_decays_like_the_official_code() -> None:
    config = make_config("paper")
    assert learning_rate(config, 0) == 1e-3
    assert learning_rate(config, 2000) == pytest.approx(0.96e-3)
    assert learning_rate(config, 4000) == pytest.approx(0.96 ** 2 * 1e-3)
    assert learning_rate(make_config("seed"), 10_000) == 1e-3
