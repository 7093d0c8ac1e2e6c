"""Hostile model files with valid checksums: every part of a checkpoint (optimizer state,
progress, random state, weights) and of a save_pretrained folder is checked before any of it
is used, and save_pretrained replaces its two files together or not at all."""

from __future__ import annotations

import copy
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from PIL import Image

import capsnet.nn.pretrained as pretrained
from capsnet import CapsNet, CapsNetConfig, make_config
from capsnet.cli import main
from capsnet.errors import CapsNetError
from capsnet.nn.pretrained import built, read_model, save_pretrained
from capsnet.training.checkpoint import (FORMAT, VERSION, load_checkpoint, save_checkpoint,
                                         state_digest)
from capsnet.training.trainer import make_optimizer
from conftest import refuses_in_one_line, write_dataset

TINY = CapsNetConfig(image_size=17, conv1_channels=4, primary_maps=2, digit_dim=4,
                     decoder_hidden=(8,), num_classes=3)
TRAIN = ["--epochs", "1", "--batch-size", "60", "--val-size", "40", "--device", "cpu",
         "--no-progress"]


def tiny_payload() -> dict[str, Any]:
    """What the trainer saves for a 17x17 three-class CapsNet after one step of its (fused)
    Adam."""
    torch.manual_seed(0)
    model = CapsNet(TINY)
    optimizer = make_optimizer(model.parameters(), 1e-3, torch.device("cpu"))
    out = model(torch.rand(2, 1, 17, 17), torch.tensor([0, 2]))
    (out.lengths.sum() + out.reconstructions.mean()).backward()
    optimizer.step()
    return {"model_config": TINY.to_dict(), "train_config": make_config("seed").to_dict(),
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "progress": {"epoch": 1, "batch": 0, "step": 1, "best": 0.5},
            "rng_state": torch.get_rng_state()}


def sealed(path: Path, payload: dict[str, Any]) -> Path:
    """``payload`` as a capsnet checkpoint with a valid checksum, whatever it holds (unlike
    save_checkpoint, which refuses NaN weights)."""
    full = {"format": FORMAT, "version": VERSION, **payload}
    full["sha256"] = state_digest(full)
    torch.save(full, path)
    return path


def group(payload: dict[str, Any]) -> dict[str, Any]:
    return payload["optimizer"]["param_groups"][0]


def moments(payload: dict[str, Any], index: int = 0) -> dict[str, Any]:
    return payload["optimizer"]["state"][index]


def without(mapping: dict[str, Any], key: Any) -> None:
    del mapping[key]


# name: (change to a good payload, expected part of the message)
HOSTILE: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    # Adam's moments
    "exp-avg-short": (lambda p: moments(p).__setitem__("exp_avg", torch.zeros(3)),
                      "exp_avg must be a contiguous float32 tensor of shape (4, 1, 9, 9), got "
                      "a float32 tensor of shape (3,)"),
    "exp-avg-broadcast": (lambda p: moments(p).__setitem__("exp_avg",
                                                           torch.zeros(1).expand(4, 1, 9, 9)),
                          "got a float32 tensor of shape (4, 1, 9, 9) with strides (0, 0, 0, 0)"),
    "exp-avg-sq-transposed": (lambda p: moments(p, 4).__setitem__(
        "exp_avg_sq", moments(p, 4)["exp_avg_sq"].transpose(-1, -2).contiguous().transpose(-1, -2)),
        "exp_avg_sq must be a contiguous float32 tensor"),
    "exp-avg-sq-float64": (lambda p: moments(p, 1).__setitem__(
        "exp_avg_sq", moments(p, 1)["exp_avg_sq"].double()), "got a float64 tensor of shape (4,)"),
    "exp-avg-a-list": (lambda p: moments(p).__setitem__("exp_avg", [0.0] * 4),
                       "got [0.0, 0.0, 0.0, 0.0]"),
    "exp-avg-nan": (lambda p: moments(p)["exp_avg"].view(-1)[0].fill_(float("nan")),
                    "exp_avg holds NaN or infinite values"),
    "exp-avg-sq-negative": (lambda p: moments(p)["exp_avg_sq"].view(-1)[0].fill_(-1.0),
                            "exp_avg_sq holds NaN, infinite or negative values"),
    "moment-missing": (lambda p: without(moments(p), "exp_avg_sq"),
                       "must hold exp_avg, exp_avg_sq, step, got ['exp_avg', 'step']"),
    "moment-extra": (lambda p: moments(p).__setitem__("momentum_buffer", torch.zeros(1)),
                     "must hold exp_avg, exp_avg_sq, step"),
    "state-not-a-dict": (lambda p: p["optimizer"]["state"].__setitem__(0, "oops"),
                         "state of parameter 0 (conv1.weight) must hold"),
    "step-negative": (lambda p: moments(p).__setitem__("step", torch.tensor(-1.0)),
                      "step must be a whole number >= 0, got tensor(-1.)"),
    "step-fraction": (lambda p: moments(p).__setitem__("step", 1.5), "step must be a whole number"),
    "step-nan": (lambda p: moments(p).__setitem__("step", torch.tensor(float("nan"))),
                 "step must be a whole number"),
    "step-text": (lambda p: moments(p).__setitem__("step", "3"), "step must be a whole number"),
    "step-not-scalar": (lambda p: moments(p).__setitem__("step", torch.ones(2)),
                        "step must be a whole number"),
    "step-huge-int": (lambda p: moments(p).__setitem__("step", 10**400),
                      "step must be a whole number"),
    "amsgrad-without-its-moment": (lambda p: group(p).__setitem__("amsgrad", True),
                                   "must hold exp_avg, exp_avg_sq, max_exp_avg_sq, step"),
    "state-of-unknown-parameter": (lambda p: p["optimizer"]["state"].__setitem__(99, moments(p)),
                                   "holds state for 99, not one of the model's 9 parameters"),
    "state-key-text": (lambda p: p["optimizer"]["state"].__setitem__("0", moments(p)),
                       "holds state for '0'"),
    # the parameter group's structure
    "param-missing": (lambda p: group(p)["params"].pop(),
                      "params must name each of the model's 9 parameters once (0 .. 8), got "
                      "[0, 1, 2, 3, 4, 5, 6, 7]"),
    "param-twice": (lambda p: group(p)["params"].__setitem__(8, 0), "params must name each"),
    "param-bool": (lambda p: group(p)["params"].__setitem__(1, True), "params must name each"),
    "params-not-a-list": (lambda p: group(p).__setitem__("params", "0-8"), "params must name each"),
    "two-groups": (lambda p: p["optimizer"]["param_groups"].append(dict(group(p))),
                   "optimizer has 2 parameter groups; capsnet's Adam has one"),
    "no-groups": (lambda p: p["optimizer"].__setitem__("param_groups", []),
                  "optimizer has 0 parameter groups"),
    "group-not-a-dict": (lambda p: p["optimizer"].__setitem__("param_groups", [[0, 1]]),
                         "parameter group must be a dict, got [0, 1]"),
    "optimizer-extra-entry": (lambda p: p["optimizer"].__setitem__("extra", 1),
                              "state must hold state and param_groups"),
    # the parameter group's settings
    "betas-text": (lambda p: group(p).__setitem__("betas", "oops"),
                   "betas must be two numbers in [0, 1), got 'oops'"),
    "beta-one": (lambda p: group(p).__setitem__("betas", (0.9, 1.0)), "betas must be two numbers"),
    "betas-three": (lambda p: group(p).__setitem__("betas", (0.9, 0.99, 0.999)),
                    "betas must be two numbers"),
    "lr-nan": (lambda p: group(p).__setitem__("lr", float("nan")),
               "lr must be a finite number >= 0, got nan"),
    "lr-negative": (lambda p: group(p).__setitem__("lr", -1e-3), "lr must be a finite number"),
    "lr-text": (lambda p: group(p).__setitem__("lr", "0.001"), "lr must be a finite number"),
    "lr-vector": (lambda p: group(p).__setitem__("lr", torch.ones(3)),
                  "lr must be a finite number"),
    "eps-inf": (lambda p: group(p).__setitem__("eps", float("inf")), "eps must be a finite number"),
    "weight-decay-negative": (lambda p: group(p).__setitem__("weight_decay", -1),
                              "weight_decay must be a finite number >= 0"),
    "amsgrad-text": (lambda p: group(p).__setitem__("amsgrad", "yes"),
                     "amsgrad must be true or false"),
    "fused-number": (lambda p: group(p).__setitem__("fused", 1),
                     "fused must be true, false or null"),
    "maximize": (lambda p: group(p).__setitem__("maximize", True), "maximize must be false"),
    "differentiable": (lambda p: group(p).__setitem__("differentiable", True),
                       "differentiable must be false"),
    "setting-missing": (lambda p: without(group(p), "lr"), "parameter group: missing lr"),
    "setting-unknown": (lambda p: group(p).__setitem__("momentum", 0.9),
                        "parameter group: unknown momentum"),
    # progress and random state
    "batch-beyond-step": (lambda p: p["progress"].update(batch=5, step=1),
                          "checkpoint's progress: batch 5 counts more steps than step 1"),
    "correct-beyond-seen": (lambda p: p["progress"].update(epoch_correct=9, epoch_seen=3),
                            "epoch_correct 9 is more than epoch_seen 3"),
    "rng-state-short": (lambda p: p.__setitem__("rng_state", torch.zeros(3)),
                        "rng_state is not a random generator state (got a float32 tensor of "
                        "shape (3,))"),
    "rng-state-text": (lambda p: p.__setitem__("rng_state", "seed"), "rng_state is not"),
    "rng-state-broadcast": (lambda p: p.__setitem__("rng_state", torch.zeros(
        1, dtype=torch.uint8).expand(p["rng_state"].shape)), "with strides (0,)"),
    # weights
    "weights-int8": (lambda p: p["model"].__setitem__("conv1.weight",
                                                      p["model"]["conv1.weight"].to(torch.int8)),
                     "weight conv1.weight is int8, not floating point (float16, bfloat16, "
                     "float32, float64)"),
    "weights-bool": (lambda p: p["model"].__setitem__("conv1.bias", p["model"]["conv1.bias"] > 0),
                     "weight conv1.bias is bool, not floating point"),
    "weights-inf": (lambda p: p["model"]["decoder.0.bias"].fill_(float("inf")),
                    "weight decoder.0.bias holds NaN or infinite values"),
    "config-far-larger": (lambda p: p["model_config"].update(num_classes=10_000),
                          "weights do not fit the model config (it describes 968,137 "
                          "parameters, the file stores 8,425)"),
    "weight-of-other-shape": (lambda p: p["model"].__setitem__(
        "conv1.weight", p["model"]["conv1.weight"].reshape(1, 4, 9, 9)),
        "conv1.weight is (1, 4, 9, 9) in the file, (4, 1, 9, 9) in the model"),
    "weight-renamed": (lambda p: p["model"].__setitem__("conv2.bias", p["model"].pop("conv1.bias")),
                       "missing conv1.bias, unexpected conv2.bias"),
}


def test_the_good_payload_loads_and_its_optimizer_steps(tmp_path: Path) -> None:
    """The control: what the trainer writes passes every check and continues."""
    payload = load_checkpoint(sealed(tmp_path / "good.pt", tiny_payload()), resumable=True)
    model = CapsNet(TINY)
    model.load_state_dict(payload["model"])
    optimizer = make_optimizer(model.parameters(), 1e-3, torch.device("cpu"), payload["optimizer"])
    out = model(torch.rand(2, 1, 17, 17), torch.tensor([0, 1]))
    out.lengths.sum().backward()
    optimizer.step()
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())


def test_amsgrad_with_its_moment_is_accepted(tmp_path: Path) -> None:
    payload = tiny_payload()
    group(payload)["amsgrad"] = True
    for state in payload["optimizer"]["state"].values():
        state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
    load_checkpoint(sealed(tmp_path / "amsgrad.pt", payload), resumable=True)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_a_hostile_checkpoint_is_refused_in_one_line(name: str, tmp_path: Path) -> None:
    change, expected = HOSTILE[name]
    payload = tiny_payload()
    change(payload)
    path = sealed(tmp_path / f"{name}.pt", payload)
    before = path.read_bytes()
    with pytest.raises(CapsNetError) as info:
        load_checkpoint(path, resumable=True)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "\n" not in message
    assert path.read_bytes() == before


# -- save_pretrained folders ----------------------------------------------------------------

def tiny_model() -> CapsNet:
    torch.manual_seed(0)
    return CapsNet(TINY).eval()


def saved(folder: Path) -> Path:
    save_pretrained(tiny_model(), folder)
    return folder


def changed(folder: Path, change: Callable[[dict[str, torch.Tensor]], None],
            config: Callable[[dict[str, Any]], None] = lambda c: None) -> Path:
    """The save_pretrained ``folder`` with its stored tensors (and the model config in their
    metadata) changed."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    weights = folder / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata, state = f.metadata(), {key: f.get_tensor(key) for key in f.keys()}
    change(state)
    model_config = json.loads(metadata["model_config"])
    config(model_config)
    save_file(state, str(weights), metadata={**metadata, "model_config": json.dumps(model_config)})
    return folder


def fill(value: float) -> Callable[[dict[str, torch.Tensor]], None]:
    return lambda state: state["digits.weight"].view(-1)[5].fill_(value)


def as_int8(state: dict[str, torch.Tensor]) -> None:
    state.update({key: (tensor * 100).to(torch.int8) for key, tensor in state.items()})


PRETRAINED: dict[str, tuple[Callable[[Path], Path], str]] = {
    "nan": (lambda d: changed(saved(d), fill(float("nan"))),
            "model.safetensors: weight digits.weight holds NaN or infinite values"),
    "inf": (lambda d: changed(saved(d), fill(float("-inf"))),
            "model.safetensors: weight digits.weight holds NaN or infinite values"),
    "int8": (lambda d: changed(saved(d), as_int8), "model.safetensors: weight "),
    "far-larger-config": (lambda d: changed(saved(d), lambda s: None,
                                            lambda c: c.update(num_classes=10_000)),
                          "model.safetensors: weights do not fit the model config (it describes "
                          "968,137 parameters, the file stores 8,425)"),
    "shape-swapped": (lambda d: changed(saved(d), lambda s: s.update(
        {"conv1.weight": s["conv1.weight"].reshape(9, 9, 1, 4)})),
        "conv1.weight is (9, 9, 1, 4) in the file, (4, 1, 9, 9) in the model"),
}


class NoFullModels(CapsNet):
    """A CapsNet that records every construction outside the meta device."""

    built_on: list[torch.device] = []

    def __init__(self, config: CapsNetConfig) -> None:
        NoFullModels.built_on.append(torch.empty(0).device)
        super().__init__(config)


@pytest.mark.parametrize("name", list(PRETRAINED))
def test_hostile_pretrained_weights_are_refused_before_a_model_is_built(
        name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make, expected = PRETRAINED[name]
    folder = make(tmp_path / name)
    monkeypatch.setattr(NoFullModels, "built_on", [])
    with pytest.raises(CapsNetError) as info:
        built(read_model(folder), {"capsnet": (NoFullModels, CapsNetConfig)})
    message = str(info.value)
    assert expected in message and str(folder) in message and "\n" not in message, message
    assert all(device.type == "meta" for device in NoFullModels.built_on)


def test_a_far_larger_config_in_a_checkpoint_builds_nothing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = tiny_payload()
    payload["model_config"]["num_classes"] = 10_000
    path = sealed(tmp_path / "big.pt", payload)
    monkeypatch.setattr(NoFullModels, "built_on", [])
    with pytest.raises(CapsNetError, match="it describes 968,137 parameters"):
        built(read_model(path), {"capsnet": (NoFullModels, CapsNetConfig)})
    assert NoFullModels.built_on == []  # refused from the config's fields alone


def listing(folder: Path) -> dict[str, str]:
    """Every entry below ``folder`` (hidden ones too) and a hash of each file's bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            if p.is_file() and not p.is_symlink() else "other" for p in sorted(folder.rglob("*"))}


def test_save_pretrained_replaces_the_pair_and_keeps_other_files(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    save_pretrained(tiny_model(), folder)
    (folder / "README.md").write_text("my notes\n")
    other = CapsNet(TINY)
    save_pretrained(other, folder)
    loaded = CapsNet.from_pretrained(folder)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in other.state_dict().items())
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "model.safetensors"]
    assert (folder / "README.md").read_text() == "my notes\n"


def test_save_pretrained_never_lowers_the_precision_of_a_folder(tmp_path: Path) -> None:
    """A model saved back into the folder it came from in float16 would lose its float32
    weights: refused, the folder unchanged; float16 over float16 and float32 over either
    are replacements like any other."""
    full, half = tmp_path / "full", tmp_path / "half"
    save_pretrained(tiny_model(), full)
    before = listing(full)
    model = CapsNet.from_pretrained(full)
    with pytest.raises(CapsNetError, match=r"holds float32 weights; writing float16 ones over "
                                           r"them would lose precision: save to another folder"):
        save_pretrained(model, full, torch.float16)
    assert listing(full) == before
    save_pretrained(model, half, torch.float16)
    save_pretrained(CapsNet.from_pretrained(half), half, torch.float16)
    save_pretrained(model, half)  # float32 over float16
    assert CapsNet.from_pretrained(half).state_dict().keys() == model.state_dict().keys()


def test_a_failing_rename_leaves_the_old_pair(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """model.safetensors is already replaced when config.json fails: it is put back."""
    folder = tmp_path / "m"
    save_pretrained(tiny_model(), folder)
    before = listing(tmp_path)
    replace = os.replace

    def failing(source: Any, target: Any) -> None:
        if Path(target).name == "config.json":
            raise OSError(28, "No space left on device")
        replace(source, target)

    monkeypatch.setattr(pretrained.os, "replace", failing)
    with pytest.raises(CapsNetError, match="could not write .*No space left on device"):
        save_pretrained(CapsNet(TINY), folder)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("existing", [False, True])
def test_a_failing_write_leaves_the_old_pair_or_none(tmp_path: Path, existing: bool,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "m"
    if existing:
        save_pretrained(tiny_model(), folder)
    before = listing(tmp_path)
    write = pretrained.write_synced

    def failing(path: Path, data: bytes) -> None:
        if "config.json" in path.name:
            raise OSError(28, "No space left on device")
        write(path, data)

    monkeypatch.setattr(pretrained, "write_synced", failing)
    with pytest.raises(CapsNetError, match="No space left on device"):
        save_pretrained(CapsNet(TINY), folder)
    assert listing(tmp_path) == before


@pytest.mark.parametrize("name, make, expected", [
    ("output-is-a-file", lambda d: (d / "m").write_text("mine"), "m: it is not a folder"),
    ("config-is-a-folder", lambda d: (d / "m" / "config.json").mkdir(parents=True),
     "config.json: it exists and is not a regular file"),
    ("weights-are-a-link", lambda d: ((d / "m").mkdir(), (d / "target").write_text("mine"),
                                      (d / "m" / "model.safetensors").symlink_to(d / "target")),
     "model.safetensors: it exists and is not a regular file"),
])
def test_save_pretrained_refuses_to_replace_what_is_not_its_file(
        tmp_path: Path, name: str, make: Callable[[Path], Any], expected: str) -> None:
    make(tmp_path)
    before = listing(tmp_path)
    with pytest.raises(CapsNetError, match=expected):
        save_pretrained(tiny_model(), tmp_path / "m")
    assert listing(tmp_path) == before


# -- the real command -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(module_tmp: Callable[[str], Path]) -> Path:
    """A trained run, copies of it with hostile optimizer states, and hostile
    save_pretrained folders."""
    w = module_tmp("hostile-checkpoints")
    data = write_dataset(w / "data")
    # 2 primary capsule maps: checkpoints of 22 MB, not 98, to copy, damage and refuse
    assert main(["train", "--preset", "seed", "--dataset", str(data), *TRAIN, "--primary-maps",
                 "2", "--run-dir", str(w / "run")]) == 0
    last = load_checkpoint(w / "run" / "last.pt")
    for name, change in {
        "short-moment": lambda p: moments(p).__setitem__("exp_avg", torch.zeros(3)),
        "betas-oops": lambda p: group(p).__setitem__("betas", "oops"),
        "group-missing-param": lambda p: group(p)["params"].pop(),
    }.items():
        payload = copy.deepcopy({k: v for k, v in last.items() if k not in ("format", "version",
                                                                            "sha256")})
        change(payload)
        (w / name).mkdir()
        save_checkpoint(w / name / "last.pt", payload)
    for name, change in {"nan-model": lambda s: s["digits.weight"].view(-1)[0].fill_(float("nan")),
                         "int8-model": as_int8}.items():
        save_pretrained(CapsNet.from_pretrained("mnist"), w / name)
        changed(w / name, change)
    Image.new("L", (28, 28), 128).save(w / "digit.png")
    return w


CLI_CASES: dict[str, tuple[list[str], str]] = {
    "resume-short-moment": (["train", "--resume", "short-moment"],
                            "exp_avg must be a contiguous float32 tensor of shape (256, 1, 9, 9), "
                            "got a float32 tensor of shape (3,)"),
    "init-from-short-moment": (["train", "--dataset", "data", "--init-from", "short-moment/last.pt",
                                "--run-dir", "new", *TRAIN], "got a float32 tensor of shape (3,)"),
    "resume-betas-oops": (["train", "--resume", "betas-oops"],
                          "betas must be two numbers in [0, 1), got 'oops'"),
    "init-from-group-missing-param": (["train", "--dataset", "data", "--init-from",
                                       "group-missing-param/last.pt", "--run-dir", "new", *TRAIN],
                                      "params must name each of the model's"),
    "predict-nan-weights": (["predict", "nan-model", "digit.png", "--json"],
                            "weight digits.weight holds NaN or infinite values"),
    "predict-int8-weights": (["predict", "int8-model", "digit.png"], "is int8, not floating point"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CLI_CASES))
def test_the_command_refuses_in_one_line_and_changes_nothing(name: str, workspace: Path) -> None:
    argv, expected = CLI_CASES[name]
    before = listing(workspace)
    refuses_in_one_line(argv, workspace, expected)
    assert listing(workspace) == before
