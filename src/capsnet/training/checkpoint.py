"""Checkpoints of training runs. The file (written atomically, read without running code,
checksummed) is :mod:`capsnet.utils.checkpoint_file`; here the training settings and the
progress it stores are checked and its model is built.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from ..data.splits import locate_dataset
from ..errors import CapsNetError
from ..nn.baseline import ARCHITECTURE as CNN, BaselineCNN, BaselineConfig
from ..nn.model import CapsNet, CapsNetConfig
from ..nn.pretrained import Stored, built, checkpoint_of, read_model
from ..utils.checkpoint_file import read_checkpoint
# The trainer and the tests import these from here:
from ..utils.checkpoint_file import FORMAT, VERSION, save_checkpoint, state_digest  # noqa: F401
from ..utils.settings import check_settings, setting, settings_from_dict, short
from .config import TrainConfig

LEGACY_BEST = "best_val_loss"  # what "best" was called before tasks had metrics

ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {  # name -> (model, its config)
    "capsnet": (CapsNet, CapsNetConfig),
    CNN: (BaselineCNN, BaselineConfig),
}


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

    @classmethod
    def from_dict(cls, data: Any, what: str) -> "Progress":
        if isinstance(data, dict) and "best" not in data and LEGACY_BEST in data:
            data = {("best" if k == LEGACY_BEST else k): v for k, v in data.items()}
        return settings_from_dict(cls, data, what)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "epoch_losses": list(self.epoch_losses)}


def load_checkpoint(path: str | os.PathLike, *, resumable: bool = False) -> dict[str, Any]:
    """:func:`~capsnet.utils.checkpoint_file.read_checkpoint`, whose stored training settings
    must also obey the flags' rules, and whose progress must be sane."""
    payload = read_checkpoint(path, resumable=resumable)
    if "train_config" in payload:
        settings_of(payload["train_config"], path)
    if "progress" in payload:
        progress_of(payload, path)
    return payload


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

    model: CapsNet  # in eval mode, on the CPU
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
    model = built(stored, {"capsnet": ARCHITECTURES["capsnet"]}).eval()
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


def stored_settings(stored: Stored, model_config: CapsNetConfig) -> TrainConfig:
    """The training settings ``stored`` records; else the defaults, with the model's image size
    and channels (what a class-folder data set is converted to)."""
    if stored.train_config is not None:
        return settings_of(stored.train_config, stored.path)
    channels = model_config.in_channels if model_config.in_channels in (1, 3) else 0
    return TrainConfig(image_size=model_config.image_size, channels=channels)


def run_dataset(dataset: str, run_dir: Path, strict: bool) -> str:
    """:func:`~capsnet.data.splits.locate_dataset`; unless ``strict``, a data set that cannot
    be found is kept as recorded (the page of ``capsnet explore`` works without it)."""
    try:
        return locate_dataset(dataset, run_dir)
    except CapsNetError:
        if strict:
            raise
        return dataset
