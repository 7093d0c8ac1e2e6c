"""Checkpoints of training runs. The file (written atomically, read without running code,
checksummed) is :mod:`capsnet.utils.checkpoint_file`; here the training settings and the
progress it stores are checked and its model is built.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..data.splits import locate_dataset
from ..errors import CapsNetError
from ..nn.baseline import ARCHITECTURE as CNN, BaselineCNN, BaselineConfig
from ..nn.model import CapsNet, CapsNetConfig
from ..nn.registry import ARCHITECTURES as CAPSULE_NETWORKS
from ..nn.pretrained import (Stored, built, check_fits, checkpoint_of, dtype_name, outline,
                             read_model)
from ..utils.checkpoint_file import read_checkpoint
# The trainer and the tests import these from here:
from ..utils.checkpoint_file import FORMAT, VERSION, save_checkpoint, state_digest  # noqa: F401
from ..utils.settings import check_settings, setting, settings_from_dict, short
from .config import TrainConfig

LEGACY_BEST = "best_val_loss"  # what "best" was called before tasks had metrics
MAX_STEP = 2 ** 53  # a step count must stay exact as a float

ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {  # name -> (model, its config)
    **CAPSULE_NETWORKS, CNN: (BaselineCNN, BaselineConfig)}


@dataclass
class Progress:
    """How far a run got: stored in each checkpoint, and checked as settings are when read
    (a checkpoint is untrusted). The Trainer updates it in place."""

    epoch: int = setting(0, "epochs trained", min=0, required=True)
    batch: int = setting(0, "steps trained in the current epoch", min=0, required=True)
    step: int = setting(0, "optimiser steps trained", min=0, required=True)
    best: float = setting(-math.inf, "best validation value of the metric that picks best.pt "
                          "(an infinity before the first)", infinite=True, required=True)
    wall_seconds: float = setting(0.0, "seconds of all the run's calls so far", min=0)
    init_from: str | None = setting(None, "the checkpoint the run started from", max_len=4096)
    val_accuracy: float | None = setting(None, "the last validation accuracy (what stop_at "
                                         "compares)")
    # The sums of an epoch stopped part way (Ctrl-C), which its resumption continues:
    epoch_losses: tuple[float, ...] = setting((), "the loss of each of its steps")
    epoch_correct: int = setting(0, "its correct predictions", min=0)
    epoch_seen: int = setting(0, "its examples", min=0)

    def __post_init__(self) -> None:
        check_settings(self)
        if len(self.epoch_losses) > self.batch:
            raise CapsNetError(f"epoch_losses holds {len(self.epoch_losses)} steps, more than "
                               f"the {self.batch} of batch")
        if self.batch > self.step:
            raise CapsNetError(f"batch {self.batch} counts more steps than step {self.step}")
        if self.epoch_correct > self.epoch_seen:
            raise CapsNetError(f"epoch_correct {self.epoch_correct} is more than epoch_seen "
                               f"{self.epoch_seen}")

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "Progress":
        if isinstance(data, dict) and "best" not in data and LEGACY_BEST in data:
            data = {("best" if k == LEGACY_BEST else k): v for k, v in data.items()}
        return settings_from_dict(cls, data, what)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epoch_losses": list(self.epoch_losses)}


def load_checkpoint(path: str | os.PathLike, *, resumable: bool = False) -> dict[str, Any]:
    """:func:`~capsnet.utils.checkpoint_file.read_checkpoint`, checked through before any of
    it is used (training resumes and starts from what this returns): the stored training
    settings obey the flags' rules, the progress is sane, the weights are those of the
    model the config describes, and the optimizer state and random state fit them."""
    payload = read_checkpoint(path, resumable=resumable)
    if "train_config" in payload:
        settings_of(payload["train_config"], path)
    if "progress" in payload:
        progress_of(payload, path)
    parameters = stored_parameters(payload, path)
    if "optimizer" in payload:
        check_optimizer(payload["optimizer"], parameters, f"{path}: checkpoint's optimizer")
    if payload.get("rng_state") is not None:
        check_rng_state(payload["rng_state"], path)
    return payload


def stored_parameters(payload: dict[str, Any], path: str | os.PathLike
                      ) -> list[tuple[str, torch.Tensor]]:
    """The named parameters of the model a checkpoint describes, in the optimizer's order,
    as meta tensors (shapes and dtypes, no memory), once its weights are known to fit it."""
    architecture = payload.get("architecture", "capsnet")
    if architecture not in ARCHITECTURES:
        raise CapsNetError(f"{path}: unknown architecture {short(architecture)}")
    model_class, config_class = ARCHITECTURES[architecture]
    model = outline(model_class, config_class, payload["model_config"], payload["model"], str(path))
    if "training_weights" in payload:
        check_fits(model.state_dict(), payload["training_weights"], f"{path}: training_weights")
    return list(model.named_parameters())


def check_optimizer(state: dict[str, Any], parameters: list[tuple[str, torch.Tensor]],
                    what: str) -> None:
    """Refuse an optimizer state that Adam over ``parameters`` cannot take as it is: Adam
    trusts the shapes of its moments (the fused kernel writes past a short one) and its
    settings."""
    if set(state) != {"state", "param_groups"}:
        raise CapsNetError(f"{what} state must hold state and param_groups, got "
                           f"{short(sorted(map(str, state)))}")
    groups = state["param_groups"]
    if len(groups) != 1:
        raise CapsNetError(f"{what} has {len(groups)} parameter groups; capsnet's Adam has one")
    group = groups[0]
    if not isinstance(group, dict):
        raise CapsNetError(f"{what}'s parameter group must be a dict, got {short(group)}")
    check_adam_settings(group, what)
    order = group["params"]
    count = len(parameters)
    if not (isinstance(order, list) and all(type(i) is int for i in order)
            and sorted(order) == list(range(count))):
        raise CapsNetError(f"{what}'s params must name each of the model's {count} parameters "
                           f"once (0 .. {count - 1}), got {short(order)}")
    moments = state["state"]
    unknown = [key for key in moments if type(key) is not int or key not in order]
    if unknown:
        raise CapsNetError(f"{what} holds state for {short(unknown[0])}, not one of the model's "
                           f"{count} parameters")
    for index, (name, parameter) in zip(order, parameters):
        if index in moments:
            check_moments(moments[index], parameter, group.get("amsgrad", False),
                          f"{what}'s state of parameter {index} ({name})")


def finite_at_least(low: float) -> Callable[[Any], bool]:
    def check(value: Any) -> bool:
        number = scalar(value)
        return number is not None and low <= number < math.inf
    return check


def flag(value: Any) -> bool:
    return isinstance(value, bool)


def betas(value: Any) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == 2
            and all(scalar(b) is not None and 0 <= scalar(b) < 1 for b in value))


# Adam's settings in a stored parameter group: name -> (what it must be, its check). Those
# capsnet never sets differently stay as it sets them: maximize would climb the loss, and
# the fused kernel cannot differentiate through a step.
ADAM_SETTINGS: dict[str, tuple[str, Callable[[Any], bool]]] = {
    "lr": ("a finite number >= 0", finite_at_least(0)),
    "betas": ("two numbers in [0, 1)", betas),
    "eps": ("a finite number >= 0", finite_at_least(0)),
    "weight_decay": ("a finite number >= 0", finite_at_least(0)),
    "amsgrad": ("true or false", flag),
    "capturable": ("true or false", flag),
    "decoupled_weight_decay": ("true or false", flag),
    "foreach": ("true, false or null", lambda value: value is None or flag(value)),
    "fused": ("true, false or null", lambda value: value is None or flag(value)),
    "maximize": ("false", lambda value: value is False),
    "differentiable": ("false", lambda value: value is False),
}
ADAM_REQUIRED = ("params", "lr", "betas", "eps", "weight_decay")  # the others have defaults


def check_adam_settings(group: dict[str, Any], what: str) -> None:
    """Refuse a parameter group with a missing, unknown or bad setting."""
    missing = [key for key in ADAM_REQUIRED if key not in group]
    unknown = sorted(str(key) for key in group if key != "params" and key not in ADAM_SETTINGS)
    if missing or unknown:
        raise CapsNetError(f"{what}'s parameter group: " + "; ".join(
            text for text in (missing and f"missing {', '.join(missing)}",
                              unknown and f"unknown {', '.join(unknown)[:200]}") if text))
    for key, value in group.items():
        if key != "params" and not ADAM_SETTINGS[key][1](value):
            raise CapsNetError(f"{what}'s {key} must be {ADAM_SETTINGS[key][0]}, got "
                               f"{short(value)}")


def check_moments(entry: Any, parameter: torch.Tensor, amsgrad: bool, what: str) -> None:
    """Refuse Adam's state of one parameter unless its step count is a whole number and its
    moments are finite tensors of the parameter's shape and dtype (squares not negative)."""
    keys = {"step", "exp_avg", "exp_avg_sq", *(("max_exp_avg_sq",) if amsgrad else ())}
    if not isinstance(entry, dict) or set(entry) != keys:
        got = sorted(map(str, entry)) if isinstance(entry, dict) else entry
        raise CapsNetError(f"{what} must hold {', '.join(sorted(keys))}, got {short(got)}")
    step = scalar(entry["step"])
    if step is None or not (0 <= step <= MAX_STEP and step == int(step)):
        raise CapsNetError(f"{what}: step must be a whole number >= 0, got {short(entry['step'])}")
    for key in sorted(keys - {"step"}):
        tensor = entry[key]
        # Contiguous too: a stored tensor keeps its strides, and the fused kernel walks each
        # moment as one dense block (a broadcast one would be written far past its storage).
        if not (isinstance(tensor, torch.Tensor) and tensor.dtype == parameter.dtype
                and tensor.shape == parameter.shape and tensor.is_contiguous()):
            raise CapsNetError(f"{what}: {key} must be a contiguous {dtype_name(parameter.dtype)} "
                               f"tensor of shape {tuple(parameter.shape)}, got {described(tensor)}")
        if key == "exp_avg" and not bool(torch.isfinite(tensor).all()):
            raise CapsNetError(f"{what}: {key} holds NaN or infinite values")
        if key != "exp_avg" and not bool(((tensor >= 0) & torch.isfinite(tensor)).all()):
            raise CapsNetError(f"{what}: {key} holds NaN, infinite or negative values")


def check_rng_state(state: Any, path: str | os.PathLike) -> None:
    """Refuse a random state that is not one of this PyTorch's CPU generator states."""
    fresh = torch.Generator().get_state()
    if not (isinstance(state, torch.Tensor) and state.dtype == fresh.dtype
            and state.shape == fresh.shape and state.is_contiguous()):
        raise CapsNetError(f"{path}: checkpoint's rng_state is not a random generator state "
                           f"(got {described(state)})")


def scalar(value: Any) -> float | None:
    """``value`` as a float when it is a real number or a real tensor of one number."""
    if isinstance(value, torch.Tensor):
        return float(value) if value.dim() == 0 and value.is_floating_point() else None
    if isinstance(value, float) or (isinstance(value, int) and not isinstance(value, bool)
                                    and abs(value) <= MAX_STEP):
        return float(value)
    return None


def described(value: Any) -> str:
    """A stored value in a few words: a tensor by dtype and shape (and strides, when they
    are not a dense block's)."""
    if not isinstance(value, torch.Tensor):
        return short(value)
    layout = "" if value.is_contiguous() else f" with strides {value.stride()}"
    return f"a {dtype_name(value.dtype)} tensor of shape {tuple(value.shape)}{layout}"


def settings_of(train_config: Any, path: str | os.PathLike) -> TrainConfig:
    """Training settings stored in the file ``path``, checked as flags are."""
    try:
        return TrainConfig.from_dict(train_config)
    except CapsNetError as exc:
        raise CapsNetError(f"{path}: {exc}") from None


def progress_of(payload: dict[str, Any], path: str | os.PathLike) -> Progress:
    """The progress stored in the checkpoint ``path``, checked; one line names what is wrong."""
    what = f"{path}: checkpoint's progress"
    try:
        return Progress.from_dict(payload["progress"], what)
    except CapsNetError as exc:  # a value's own check does not know where it was read
        raise CapsNetError(str(exc) if str(exc).startswith(what) else f"{what}: {exc}") from None


def model_from_checkpoint(payload: dict[str, Any], source: str = "checkpoint",
                          architecture: str | None = "capsnet") -> Any:
    """Build the model a checkpoint describes and load its weights; it must be an
    ``architecture`` (a key of :data:`ARCHITECTURES`; None: any of them). Stored class names
    and image preparation, when there are, come with it."""
    stored = checkpoint_of(payload, Path(source))
    if stored.architecture not in ARCHITECTURES:
        raise CapsNetError(f"{source}: unknown architecture {short(stored.architecture)}")
    wanted = ARCHITECTURES if architecture is None else {architecture: ARCHITECTURES[architecture]}
    return built(stored, wanted)


def load_model(path: str | os.PathLike) -> tuple[CapsNet, dict[str, Any]]:
    """CapsNet (in eval mode, on CPU) and payload of the checkpoint at ``path``."""
    payload = load_checkpoint(path)
    model = model_from_checkpoint(payload, str(path))
    return model.eval(), payload


@dataclass
class Trained:
    """A trained model with what evaluating it needs: its training settings (defaults where
    none are stored) on the data set to use (``config``: None when no data set is known), and
    the file it was read from (a run's checkpoint: metrics.jsonl is beside it)."""

    model: nn.Module  # a capsule network, in eval mode, on the CPU
    config: TrainConfig | None
    path: Path


def load_trained(source: str | os.PathLike, dataset: str | None = None, *,
                 val_size: int | None = None, need_dataset: bool = True) -> Trained:
    """The CapsNet ``source`` stands for (:func:`~capsnet.nn.pretrained.read_model`: a run
    folder, a checkpoint, a save_pretrained folder, a safetensors file or a shipped name) with
    its training settings, on ``dataset`` or else the data set it was trained on, when it
    records one (``val_size``: validation images, when not the recorded ones). Without a data
    set, ``need_dataset`` refuses it; without ``need_dataset`` a recorded data set that cannot
    be found is kept, for the caller to report when used."""
    stored = read_model(source)
    model = built(stored, CAPSULE_NETWORKS).eval()
    settings = stored_settings(stored, model.config)
    if dataset is None and stored.train_config is not None:
        dataset = run_dataset(settings.dataset, stored.path.parent, need_dataset)
    dataset = dataset or stored.dataset
    if dataset is None and need_dataset:
        raise CapsNetError(f"{source}: the model does not record the data set it was trained "
                           f"on; give one with --dataset")
    if dataset is None:
        return Trained(model, None, stored.path)
    settings = replace(settings, dataset=dataset, val_size=val_size or settings.val_size)
    return Trained(model, settings, stored.path)


def stored_settings(stored: Stored, model_config: Any) -> TrainConfig:
    """The training settings ``stored`` records; else the defaults, with the model's image size
    and channels (what a class-folder data set is converted to)."""
    if stored.train_config is not None:
        return settings_of(stored.train_config, stored.path)
    channels = model_config.in_channels if model_config.in_channels in (1, 3) else 0
    return TrainConfig(image_size=model_config.image_size, channels=channels,
                       network=stored.architecture)


def run_dataset(dataset: str, run_dir: Path, strict: bool) -> str:
    """:func:`~capsnet.data.splits.locate_dataset`; unless ``strict``, a data set that cannot
    be found is kept as recorded (the page of ``capsnet explore`` works without it)."""
    try:
        return locate_dataset(dataset, run_dir)
    except CapsNetError:
        if strict:
            raise
        return dataset
