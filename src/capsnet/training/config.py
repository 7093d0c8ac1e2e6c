"""Training settings: the one dataclass, its defaults and the presets.

``seed`` is the tutorial notebook exactly; ``paper`` follows Sabour et al. (3 routing
iterations, 2-pixel shifts, summed reconstruction loss, Adam with exponential decay) and is
the default; ``quick`` is the paper's model trained briefly, for a CPU. Every field can be
overridden after a preset is applied.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from ..errors import CapsNetError
from ..nn.layers import PRIMARY_STYLES
from ..nn.model import INITS

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("fp32", "bf16")
REDUCTIONS = ("sum", "mean")
MARGIN_FORMS = ("paper", "official")
VAL_SPLITS = ("first", "last")
RESUME_MAY_CHANGE = ("epochs", "device", "compile")  # all else is the run's own on resume
LIMITS = {"epochs": 100_000, "batch_size": 65_536, "eval_batch_size": 65_536,
          "routing_iterations": 100}  # beyond these a value is a typo, not a plan


@dataclass(frozen=True)
class TrainConfig:
    """Everything a training run depends on, apart from where its files go."""

    preset: str = "paper"
    dataset: str = "mnist"  # a registered name or a folder of IDX files
    epochs: int = 30
    batch_size: int = 128
    routing_iterations: int = 3
    lr: float = 1e-3
    lr_decay: float = 0.96  # multiply the learning rate by this every lr_decay_steps steps
    lr_decay_steps: int = 2000  # decay is continuous: lr * lr_decay ** (step / lr_decay_steps)
    max_shift: int = 2  # random translation in pixels, each axis, zero padded
    reconstruction_reduction: str = "sum"  # "sum" over pixels (paper) or "mean" (notebook)
    reconstruction_weight: float = 0.0005
    margin_loss: str = "paper"  # "paper": eq. 4; "official": the official code's, 1/20 of it
    init: str = "official"  # "official" truncated normals, "glorot" (notebook) or "torch"
    primary_style: str = "official"  # "official": no ReLU, conv / maps; "notebook": ReLU
    routing_bias: bool = True  # the official code's learned bias on s_j
    val_size: int = 5000
    val_split: str = "first"  # hold out the first val_size training images (TensorFlow's) or the last
    eval_batch_size: int = 500
    train_limit: int = 0  # use only the first N training images (0: all); for quick runs
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"  # "bf16": autocast matmuls and convolutions to bfloat16
    compile: bool = False  # torch.compile the routing layer
    deterministic: bool = False

    def __post_init__(self) -> None:
        positive = ("epochs", "batch_size", "routing_iterations", "lr_decay_steps", "val_size",
                    "eval_batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise CapsNetError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_shift", "train_limit", "seed"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CapsNetError(f"{name} must be a non-negative integer, got {value!r}")
        if not 0 < self.lr < 1:
            raise CapsNetError(f"lr must be in (0, 1), got {self.lr}")
        if not 0 < self.lr_decay <= 1:
            raise CapsNetError(f"lr_decay must be in (0, 1], got {self.lr_decay}")
        if not 0 <= self.reconstruction_weight <= 1:
            raise CapsNetError(f"reconstruction_weight must be in [0, 1], got "
                               f"{self.reconstruction_weight}")
        for name, most in LIMITS.items():
            if getattr(self, name) > most:
                raise CapsNetError(f"{name} must be at most {most:,}, got {getattr(self, name):,}")
        for name, allowed in (("reconstruction_reduction", REDUCTIONS), ("device", DEVICES),
                              ("precision", PRECISIONS), ("preset", tuple(PRESETS)),
                              ("margin_loss", MARGIN_FORMS), ("init", INITS),
                              ("primary_style", PRIMARY_STYLES), ("val_split", VAL_SPLITS)):
            if getattr(self, name) not in allowed:
                raise CapsNetError(f"{name} must be one of {', '.join(allowed)}, "
                                   f"got {getattr(self, name)!r}")
        if self.max_shift > 8:
            raise CapsNetError(f"max_shift must be at most 8 pixels, got {self.max_shift}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CapsNetError(f"unknown training settings: {', '.join(unknown)}")
        return cls(**d)


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "seed": dict(epochs=10, batch_size=50, routing_iterations=2, lr_decay=1.0, max_shift=0,
                 reconstruction_reduction="mean", init="glorot", primary_style="notebook",
                 routing_bias=False),
    # Sized for a 2-core CPU in minutes: one pass over 30,000 images, small batches, no shifts.
    "quick": dict(epochs=1, batch_size=32, train_limit=30_000, lr_decay=1.0, max_shift=0),
}


def make_config(preset: str = "paper", **overrides: Any) -> TrainConfig:
    """The ``preset``'s settings with ``overrides`` (``None`` values are ignored) on top."""
    if preset not in PRESETS:
        raise CapsNetError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    settings = {**PRESETS[preset], **{k: v for k, v in overrides.items() if v is not None}}
    return replace(TrainConfig(preset=preset), **settings)


def learning_rate(config: TrainConfig, step: int) -> float:
    """Learning rate at optimiser step ``step`` (0-based): exponential decay as the official code."""
    return config.lr * config.lr_decay ** (step / config.lr_decay_steps)
