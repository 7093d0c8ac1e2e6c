"""The capsule networks capsnet trains, by name: a new routing is one module and one line here.

Each entry says which model class and config a name builds, the config values of that
variant, and the loss that trains it (``margin``: the margin loss on capsule lengths plus the
reconstruction; ``spread``: EM routing's spread loss on class activations, plus the
reconstruction when the model has a decoder). Trained models store their ``architecture``
tag, which :data:`ARCHITECTURES` turns back into a class, so one tag serves every variant.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import pretrained
from .efficient import EfficientCapsNet, EfficientCapsNetConfig
from .em_routing import SMALL, EMCapsNet, EMCapsNetConfig
from .model import CapsNet, CapsNetConfig

LOSSES = ("margin", "spread")


@dataclass(frozen=True)
class ModelEntry:
    model: type[nn.Module]
    config: type
    summary: str  # one line for --help
    loss: str = "margin"  # one of LOSSES
    defaults: dict[str, Any] = field(default_factory=dict)  # config values of this variant

    @property
    def architecture(self) -> str:
        """The tag stored with trained models of this entry."""
        return self.model.architecture  # type: ignore[attr-defined]


MODELS: dict[str, ModelEntry] = {
    "capsnet": ModelEntry(CapsNet, CapsNetConfig,
                          "dynamic routing (Sabour, Frosst and Hinton 2017)"),
    "efficient-capsnet": ModelEntry(EfficientCapsNet, EfficientCapsNetConfig,
                                    "self-attention routing (Mazzia et al. 2021)"),
    "em-capsnet": ModelEntry(EMCapsNet, EMCapsNetConfig,
                             "EM routing, A=B=C=D=32 (Hinton, Sabour and Frosst 2018)", "spread"),
    "em-capsnet-small": ModelEntry(EMCapsNet, EMCapsNetConfig,
                                   "EM routing, the paper's small A=64, B=8, C=D=16", "spread",
                                   SMALL),
}

ARCHITECTURES: dict[str, tuple[type[nn.Module], type]] = {
    entry.architecture: (entry.model, entry.config) for entry in MODELS.values()}


def model_config(name: str, **sizes: Any) -> Any:
    """The config of model ``name`` with ``sizes`` (image_size, in_channels, num_classes and
    any field of that config) on top of its variant's values."""
    entry = MODELS[name]
    return entry.config(**{**entry.defaults, **sizes})


def load_model(source: str | os.PathLike) -> nn.Module:
    """Any trained capsule network in eval mode, float32, on the CPU, with its class names
    and image preparation: a shipped name (``"mnist"``), a run folder, a checkpoint, a
    ``save_pretrained`` folder or a safetensors file."""
    return pretrained.built(pretrained.read_model(source), ARCHITECTURES).eval()
