"""Presets: every field of every preset pinned to its source."""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path

import pytest

from capsnet.cli import build_parser
from capsnet.nn.model import CapsNetConfig
from capsnet.nn.registry import ARCHITECTURES
from capsnet.training.config import (PRESETS, TrainConfig, learning_rate, make_config,
                                     model_config_for, resume_config)
from capsnet.errors import CapsNetError
from capsnet.utils.settings import training_fields, training_fields_of

REPO = Path(__file__).resolve().parents[1]
MODEL_FIELDS = {"primary_maps", "routing_iterations", "primary_style", "routing_bias",
                "leaky_routing", "init"}

# Where a run is and how it is executed: not part of any source's recipe.
HOW = {"dataset": "mnist", "network": "capsnet", "seed": 0, "device": "auto", "precision": "fp32", "compile": "auto",
       "cuda_graphs": False, "deterministic": False, "eval_batch_size": 500, "time_limit": 0.0,
       "stop_at": 0.0, "log_every": 50, "image_size": 0, "channels": 0,
       "beta_a_units": "logit",  # how EM networks learn beta_a; the others have none
       "cost_scale": "paper",  # EM networks' routing cost; the others have none
       "margin_ramp_epochs": 0}  # the spread loss's margin rises over the whole run

# The tutorial notebook and the TensorFlow helper it calls (read_data_sets).
NOTEBOOK = {
    "epochs": 10, "batch_size": 50, "routing_iterations": 2, "lr": 1e-3, "lr_decay": 1.0,
    "lr_decay_steps": 2000, "warmup_steps": 0, "max_shift": 0, "reconstruction_reduction": "mean",
    "reconstruction_weight": 0.0005, "margin_loss": "paper", "init": "glorot",
    "primary_style": "notebook", "routing_bias": False, "leaky_routing": False,
    "primary_maps": 32, "crop": 0, "rotation": 0.0, "val_size": 0, "val_split": "first",
    "train_limit": 0, "augment": "shift", "lr_min": 0.0, "none_fraction": 0.0, "ema_decay": 0.0,
    "ema_warmup": True,
}  # val_size 0: the data set's default, read_data_sets' 5,000 on MNIST

# The paper, and the official code where the paper is silent.
PAPER = {
    "epochs": 30, "batch_size": 128, "routing_iterations": 3, "lr": 1e-3, "lr_decay": 0.96,
    "lr_decay_steps": 2000, "warmup_steps": 0, "max_shift": 2, "reconstruction_reduction": "sum",
    "reconstruction_weight": 0.0005, "margin_loss": "paper", "init": "official",
    "primary_style": "official", "routing_bias": True, "leaky_routing": False,
    "primary_maps": 32, "crop": 0, "rotation": 0.0, "val_size": 0, "val_split": "first",
    "train_limit": 0, "augment": "shift", "lr_min": 0.0, "none_fraction": 0.0, "ema_decay": 0.0,
    "ema_warmup": True,
}

# The notebook's network and losses for one epoch, bf16 where the CPU has AMX: 99% on a CPU.
QUICK = {**NOTEBOOK, "epochs": 1}
QUICK_HOW = {"precision": "auto"}

# The paper's section on CIFAR-10, with the paper preset where it is silent.
CIFAR10 = {**PAPER, "max_shift": 0, "crop": 24, "primary_maps": 64, "leaky_routing": True}

# Efficient-CapsNet's official config.json (lr, its per-epoch decay, batch, epochs; the
# reconstruction's 0.392 x mean is 0.0005 x sum), the floor of tools.py's learn_scheduler
# and its augmentation (pre_process_mnist.py,
# in place of pixel shifts), the paper preset elsewhere.
EFFICIENT = {**PAPER, "network": "efficient-capsnet", "batch_size": 16, "lr": 5e-4,
             "lr_decay": 0.97, "lr_decay_steps": 3438, "lr_min": 5e-5, "epochs": 150,
             "augment": "efficient", "max_shift": 0}

# EM routing: the paper's network and spread loss, no decoder, the authors' batch of 64;
# yl-1993's 2 iterations and learning rate; the released code's input; our schedule.
EM = {**PAPER, "network": "em-capsnet", "batch_size": 64, "reconstruction_weight": 0.0,
      "routing_iterations": 2, "lr": 1e-2, "crop": 24, "max_shift": 0, "rotation": 15.0,
      "epochs": 60, "lr_decay": 0.9, "lr_decay_steps": 2360, "ema_decay": 0.999}

EXPECTED = {"seed": NOTEBOOK, "paper": PAPER, "quick": QUICK, "cifar10": CIFAR10,
            "efficient": EFFICIENT, "em": EM}


@pytest.mark.parametrize("preset", sorted(EXPECTED))
def test_every_field_of_every_preset_is_pinned(preset: str) -> None:
    config = make_config(preset).to_dict()
    expected = {"preset": preset, **HOW, **EXPECTED[preset],
                **(QUICK_HOW if preset == "quick" else {})}
    if preset == "cifar10":
        expected["dataset"] = "cifar10"
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


@pytest.mark.parametrize("stored, message", [
    ({"lr": "0.001"}, "lr must be a number in (0, 1), got '0.001'"),
    ({"lr": float("nan")}, "lr must be a number in (0, 1), got nan"),
    ({"epochs": 2.5}, "epochs must be an integer in [1, 100,000], got 2.5"),
    ({"epochs": True}, "epochs must be an integer in [1, 100,000], got True"),
    ({"routing_bias": 1}, "routing_bias must be true or false, got 1"),
    ({"seed": 2**40}, "seed must be an integer in [0, 4,294,967,295]"),
    ({"batch_size": 0}, "batch_size must be an integer in [1, 65,536], got 0"),
    ({"dataset": ["mnist"]}, "dataset must be text"),
    ({"surprise": 1}, "training settings: unknown settings 'surprise'"),
])
def test_stored_settings_are_checked_as_flags_are(stored: dict, message: str) -> None:
    with pytest.raises(CapsNetError, match=re.escape(message)):
        TrainConfig.from_dict({**TrainConfig().to_dict(), **stored})


def test_stored_settings_must_be_a_dict() -> None:
    with pytest.raises(CapsNetError, match="training settings must be a dict"):
        TrainConfig.from_dict(["lr", 0.1])


@pytest.mark.parametrize("preset, overrides, message", [
    ("em", dict(primary_maps=8), "--primary-maps 8 would change nothing: em-capsnet does not "
                                 "use it (a setting of --network capsnet)"),
    ("em", dict(leaky_routing=True), "--leaky-routing would change nothing: em-capsnet does"),
    ("paper", dict(beta_a_units="paper"), "--beta-a-units paper would change nothing: capsnet "
                                          "does not use it (a setting of --network em-capsnet "
                                          "or em-capsnet-small)"),
    ("efficient", dict(cost_scale="outputs-per-input"), "efficient-capsnet does not use it"),
    ("em", dict(margin_loss="official"), "--margin-loss official would change nothing: "
                                         "em-capsnet trains with the spread loss"),
    ("em", dict(reconstruction_weight=0.1), "--reconstruction-weight 0.1 would change nothing: "
                                            "em-capsnet has no decoder"),
    ("efficient", dict(routing_iterations=5), "efficient-capsnet routes without iterations"),
    ("efficient", dict(rotation=10.0), "--rotation 10 would change nothing: --augment efficient "
                                       "draws its own shifts and rotations"),
    ("paper", dict(augment="efficient", max_shift=3), "--max-shift 3 would change nothing"),
    ("seed", dict(lr_decay_steps=10), "--lr-decay-steps 10 would change nothing: the learning "
                                      "rate does not decay (--lr-decay 1)"),
    ("paper", dict(ema_warmup=False), "--no-ema-warmup would change nothing: no weights are "
                                      "averaged (--ema-decay 0)"),
    ("paper", dict(image_size=24), "--image-size 24 would change nothing: only class folders (a "
                                   "folder with train/) are resized; 'mnist' keeps its images"),
    ("paper", dict(channels=3), "--channels 3 would change nothing: only class folders"),
])
def test_a_setting_the_run_would_never_read_is_refused(preset: str, overrides: dict,
                                                       message: str) -> None:
    with pytest.raises(CapsNetError, match=re.escape(message)):
        make_config(preset, **overrides)


@pytest.mark.parametrize("preset, overrides", [
    ("em", dict(primary_maps=32)),  # the value the run has anyway
    ("em", dict(network="capsnet", primary_maps=8, margin_loss="official")),
    ("efficient", dict(augment="shift", rotation=10.0, max_shift=1)),
    ("seed", dict(lr_decay=0.9, lr_decay_steps=10, lr_min=1e-5)),
    ("paper", dict(ema_decay=0.999, ema_warmup=False)),
])
def test_the_same_settings_are_taken_where_the_run_reads_them(preset: str,
                                                               overrides: dict) -> None:
    config = make_config(preset, **overrides)
    assert all(getattr(config, name) == value for name, value in overrides.items())


def test_a_stored_run_with_a_setting_it_never_read_still_resumes() -> None:
    stored = {**make_config("em").to_dict(), "primary_maps": 8, "margin_loss": "official"}
    config = resume_config(TrainConfig.from_dict(stored), {"epochs": 40})
    assert (config.primary_maps, config.margin_loss, config.epochs) == (8, "official", 40)


def test_resume_may_change_only_how_long_and_where() -> None:
    saved = make_config("seed", epochs=2)
    resumed = resume_config(saved, {"epochs": 5, "device": "cpu", "compile": "on",
                                    "batch_size": 50, "lr": None})
    assert (resumed.epochs, resumed.device, resumed.compile) == (5, "cpu", "on")
    assert replace(resumed, epochs=2, device="auto", compile="auto") == saved
    with pytest.raises(CapsNetError, match=r"batch_size is 50 there, not 64 \(only --epochs, "
                                           r"--time-limit, --stop-at, --device, --compile, "
                                           r"--cuda-graphs, --log-every may change\)"):
        resume_config(saved, {"batch_size": 64})


def test_resuming_a_spread_loss_run_for_other_epochs_keeps_its_margins_ramp() -> None:
    saved = make_config("em", epochs=12)
    assert resume_config(saved, {"epochs": 24}).margin_ramp_epochs == 12
    assert resume_config(saved, {"epochs": 12}).margin_ramp_epochs == 0  # nothing changed
    ramped = replace(saved, margin_ramp_epochs=5)
    assert resume_config(ramped, {"epochs": 24}).margin_ramp_epochs == 5
    assert resume_config(make_config("paper", epochs=12), {"epochs": 24}).margin_ramp_epochs == 0
    with pytest.raises(CapsNetError, match="--margin-ramp-epochs ramps the spread loss's margin; "
                                           "capsnet trains with the margin loss"):
        make_config("paper", margin_ramp_epochs=5)


def test_warmup_scales_the_learning_rate_linearly() -> None:
    config = make_config("paper", warmup_steps=200)
    assert learning_rate(config, 0) == pytest.approx(1e-3 / 200)
    assert learning_rate(config, 99) == pytest.approx(1e-3 * 0.96 ** (99 / 2000) / 2)
    assert learning_rate(config, 4000) == pytest.approx(1e-3 * 0.96 ** 2)


def test_learning_rate_decays_like_the_official_code() -> None:
    config = make_config("paper")
    assert learning_rate(config, 0) == 1e-3
    assert learning_rate(config, 2000) == pytest.approx(0.96e-3)
    assert learning_rate(config, 4000) == pytest.approx(0.96 ** 2 * 1e-3)
    assert learning_rate(make_config("seed"), 10_000) == 1e-3


def test_the_learning_rate_stops_at_its_floor() -> None:
    config = make_config("efficient")  # 5e-4 x 0.97 an epoch, down to 5e-5 (76 epochs on)
    epoch = config.lr_decay_steps
    assert learning_rate(config, 10 * epoch) == pytest.approx(5e-4 * 0.97 ** 10)
    assert learning_rate(config, 75 * epoch) == pytest.approx(5e-4 * 0.97 ** 75)  # above it
    assert learning_rate(config, 76 * epoch) == 5e-5 == learning_rate(config, 150 * epoch)
    with pytest.raises(CapsNetError, match="--lr-min 0.01 is above --lr 0.001"):
        make_config("paper", lr_min=0.01)


def test_stored_compile_flags_of_older_runs_still_load() -> None:
    stored = {**make_config("seed").to_dict(), "compile": True}
    assert TrainConfig.from_dict(stored).compile == "on"
    assert TrainConfig.from_dict({**stored, "compile": False}).compile == "off"


def test_settings_stored_before_a_field_existed_mean_what_the_code_then_did() -> None:
    # Runs recorded before the presets followed their sources: PyTorch's initialisation,
    # ReLU primary capsules, no routing bias, the last 5,000 images held out.
    older = {k: v for k, v in make_config("paper").to_dict().items()
             if k not in ("init", "primary_style", "routing_bias", "val_split")}
    config = TrainConfig.from_dict(older)
    assert (config.init, config.primary_style, config.routing_bias, config.val_split) == \
        ("torch", "notebook", False, "last")
    assert TrainConfig.from_dict(make_config("paper").to_dict()) == make_config("paper")


# --- the model's fields a run chooses: declared once, in CapsNetConfig -----------------------


def test_each_model_field_is_declared_once() -> None:
    model = {f.name: f for f in training_fields(CapsNetConfig)}
    train = {f.name: f for f in fields(TrainConfig)}
    assert set(model) == MODEL_FIELDS
    for name, declared in model.items():
        assert train[name].metadata == declared.metadata  # help, bounds, choices, before
        assert train[name].default == declared.metadata["train"]
    # TrainConfig's image_size is its own: the side class-folder images are resized to.
    assert set(train) & {f.name for f in fields(CapsNetConfig)} == MODEL_FIELDS | {"image_size"}
    with pytest.raises(TypeError, match="Again.init is declared in CapsNetConfig"):
        @training_fields_of(CapsNetConfig)
        class Again:  # a second declaration is refused
            init: str = "torch"


@pytest.mark.parametrize("command", ["train", "experiment multimnist"])
def test_model_fields_are_flags_of_train_and_experiment(command: str) -> None:
    args = build_parser().parse_args([*command.split(), "--routing-iterations", "4", "--init",
                                      "torch", "--primary-style", "notebook",
                                      "--no-routing-bias", "--leaky-routing",
                                      "--primary-maps", "8"])
    assert {name: getattr(args, name) for name in MODEL_FIELDS} == {
        "routing_iterations": 4, "init": "torch", "primary_style": "notebook",
        "routing_bias": False, "leaky_routing": True, "primary_maps": 8}


def test_the_notebook_preset_builds_the_library_default_network() -> None:
    assert model_config_for(make_config("seed"), 28, 1, 10) == CapsNetConfig()
    paper = model_config_for(make_config("paper"), 28, 1, 10)
    assert (paper.routing_iterations, paper.init, paper.primary_style, paper.routing_bias) == \
        (3, "official", "official", True)


@pytest.mark.parametrize("record", sorted(REPO.glob("docs/runs/*/config.json")),
                         ids=lambda path: path.parent.name)
def test_committed_run_records_load_and_build_the_network_they_recorded(record: Path) -> None:
    stored = json.loads(record.read_text())
    settings = TrainConfig.from_dict(stored["train"])
    if "model" in stored:
        _, config_class = ARCHITECTURES[stored.get("architecture", "capsnet")]
        model = config_class.from_dict(stored["model"])
        assert model_config_for(settings, model.image_size, model.in_channels,
                                model.num_classes) == model


def test_the_shipped_model_config_loads_as_the_paper_presets_network() -> None:
    stored = json.loads((REPO / "src/capsnet/pretrained/mnist/config.json").read_text())
    expected = model_config_for(make_config("paper"), 28, 1, 10)
    assert CapsNetConfig.from_dict(stored["model_config"]) == expected
